//! The run's state machine: admission, rank assignment, the ring, the plan of work units and
//! the aggregation of the workers' reports. Pure state (no I/O besides queueing orders), so
//! every transition is unit-tested.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster_proto::run::{Job, RunConfig};
use cluster_proto::v1::{
    self, Assignment, BenchResult, BenchWork, CheckpointCommit, EpochResult, EpochWork, Finish, Order, Phase,
    Welcome, assignment::Work, order, work_report::Result as ReportResult,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

use crate::error::Refusal;

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Admitting workers until the expected number joined.
    Waiting,
    /// Phase 1: training the new head on the frozen backbone.
    Head,
    /// Phase 2: fine-tuning everything but BatchNorm.
    Finetune,
    /// Running the all-reduce benchmark.
    Bench,
    /// Finished successfully.
    Done,
    /// Stopped by an error.
    Failed,
}

impl Stage {
    /// Lowercase name, as in status output.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Waiting => "waiting",
            Stage::Head => "head",
            Stage::Finetune => "finetune",
            Stage::Bench => "bench",
            Stage::Done => "done",
            Stage::Failed => "failed",
        }
    }
}

/// One unit of work, done by all ranks together.
#[derive(Debug, Clone, PartialEq)]
pub enum Unit {
    /// An epoch of a phase.
    Epoch {
        /// Head or fine-tune.
        phase: Phase,
        /// 0-based epoch within the phase.
        epoch: u32,
        /// Evaluate on the test set afterwards.
        test: bool,
        /// Write a checkpoint afterwards.
        checkpoint: bool,
    },
    /// The all-reduce benchmark.
    Bench,
}

/// The units of a run, in order.
pub fn plan(config: &RunConfig) -> Vec<Unit> {
    if config.job == Job::AllreduceBench {
        return vec![Unit::Bench];
    }
    let mut units = Vec::new();
    for (phase, epochs) in [
        (Phase::Head, config.head_epochs),
        (Phase::Finetune, config.finetune_epochs),
    ] {
        for epoch in 0..epochs {
            let last = epoch + 1 == epochs;
            let every = config.checkpoint_every > 0 && (epoch + 1) % config.checkpoint_every == 0;
            units.push(Unit::Epoch {
                phase,
                epoch,
                test: false,
                checkpoint: last || every,
            });
        }
    }
    if let Some(Unit::Epoch { test, .. }) = units.last_mut() {
        *test = true;
    }
    units
}

/// A worker the coordinator knows.
#[derive(Debug)]
pub struct Worker {
    /// Its name (host and device).
    pub name: String,
    /// Where it serves the peer service.
    pub advertise: String,
    /// Its device.
    pub device: String,
    /// Rank in the current ring, once formed.
    pub rank: Option<u32>,
    /// When it last sent a heartbeat (or joined).
    pub last_seen: Instant,
    /// The last step it reported.
    pub step: u64,
    /// Recent steps per second (smoothed over heartbeats), once measured.
    pub steps_per_second: Option<f64>,
    /// Holds the run's training state (false for a worker admitted mid-run until a ring
    /// has shared it).
    pub has_state: bool,
    /// What its last heartbeat said of its progress (waiting in the ring, step time).
    pub progress: crate::stuck::Reported,
    rate_mark: (u64, Instant),
    orders: UnboundedSender<Result<Order, Status>>,
}

/// The aggregate of one finished epoch over all ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    /// `head` or `finetune`.
    pub phase: String,
    /// 0-based epoch within the phase.
    pub epoch: u32,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Mean training loss over all images of the epoch.
    pub train_loss: f64,
    /// Training accuracy.
    pub train_accuracy: f64,
    /// Mean validation loss.
    pub val_loss: Option<f64>,
    /// Validation accuracy.
    pub val_accuracy: Option<f64>,
    /// Test loss (last epoch only).
    pub test_loss: Option<f64>,
    /// Test accuracy (last epoch only).
    pub test_accuracy: Option<f64>,
    /// Test confusion matrix, rows = actual class (last epoch only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_confusion: Option<Vec<Vec<u64>>>,
    /// Class names in label order (last epoch only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
    /// Training images processed, all ranks together.
    pub train_images: u64,
    /// Wall time of the slowest rank, seconds.
    pub seconds: f64,
    /// Mean time spent in all-reduce per rank, seconds.
    pub allreduce_seconds: f64,
    /// Training images per second, all ranks together.
    pub images_per_second: f64,
    /// Seconds of training steps of the slowest rank, without evaluation (the wall time
    /// when the epoch spans rings).
    #[serde(default)]
    pub train_seconds: f64,
    /// Phase 1 feature cache: backbone outputs served from the cache, all ranks together.
    #[serde(default)]
    pub feature_cache_hits: u64,
    /// Phase 1 feature cache: backbone outputs computed, all ranks together.
    #[serde(default)]
    pub feature_cache_misses: u64,
}

/// What rings that broke during an epoch trained of it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Carried {
    loss_sum: f64,
    correct: u64,
    count: u64,
    /// Steps of the epoch taken before the last ring started.
    steps: u64,
    /// The epoch's wall time when it spans rings (the coordinator's clock).
    seconds: Option<f64>,
}

/// A committed checkpoint, as status shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpointed {
    /// Where it is (root URL and name).
    pub location: String,
    /// Its name under the checkpoint root.
    pub name: String,
    /// Steps completed when it was taken.
    pub step: u64,
}

/// Where a resumed run continues: what a checkpoint's `state.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    /// The run that wrote it.
    pub run_id: String,
    /// Phase of the last completed epoch (`head`, `finetune`).
    pub phase: String,
    /// Epochs of that phase completed.
    pub epoch: u32,
    /// Optimizer steps completed in the run.
    pub step: u64,
    /// The sampler position to continue from: the global epoch (both phases counted) and
    /// the examples of it already consumed.
    pub sampler_epoch: u64,
    /// Examples of `sampler_epoch` already consumed.
    pub sampler_consumed: u64,
    /// The run's seed; every other random stream (shuffles, augmentation, dropout) is
    /// derived from it, the epoch and the rank.
    pub seed: u64,
    /// The run's configuration.
    pub config: RunConfig,
    /// Every finished epoch so far.
    pub history: Vec<EpochSummary>,
    /// How many times the run had been restarted from a checkpoint when this one was taken.
    #[serde(default)]
    pub restarts: u32,
}

/// One checkpoint commit, as the coordinator timed it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CommitStat {
    /// Verification, state, manifest and `LATEST`, seconds.
    pub seconds: f64,
    /// Bytes of every object of the checkpoint.
    pub bytes: u64,
}

/// What the coordinator needs to commit rank 0's upload.
#[derive(Debug, Clone)]
pub struct CommitPlan {
    /// Checkpoint name.
    pub name: String,
    /// The state to store beside rank 0's objects.
    pub state: SavedState,
    /// Validation accuracy of the checkpointed epoch.
    pub val_accuracy: Option<f64>,
    /// Rank 0's objects.
    pub objects: Vec<checkpoint::ObjectEntry>,
}

/// The run.
#[derive(Debug)]
pub struct Run {
    /// Identifies this run in logs and status.
    pub run_id: String,
    /// What the run does.
    pub config: RunConfig,
    /// Workers to wait for.
    pub expected: usize,
    /// Known workers by id.
    pub workers: BTreeMap<String, Worker>,
    /// The device of every worker that joined, by worker name (for the report: workers leave
    /// when the run ends).
    pub devices: BTreeMap<String, String>,
    /// Ring generation: 0 before the first ring.
    pub generation: u64,
    /// Where the run is.
    pub stage: Stage,
    /// Units of work.
    pub plan: Vec<Unit>,
    /// Index of the unit in progress.
    pub current: usize,
    /// Steps taken before the current unit.
    pub steps_done: u64,
    /// Reports of the current generation for the current unit, by worker id.
    reports: BTreeMap<String, ReportResult>,
    /// Fewest ranks the run continues with after losing workers (below it, it fails).
    pub min_workers: usize,
    /// Examples per optimizer step over all ranks, whatever the ring's size.
    pub global_batch: u32,
    /// A ranked worker left during the current unit: the ring must be re-formed.
    ring_lost_member: bool,
    /// Where the current generation started the current unit (global step).
    unit_generation_step: u64,
    /// Training sums of the current unit from earlier generations.
    carried: Carried,
    /// Times the ring was re-formed after losing a worker.
    pub ring_reforms: u32,
    /// When the current unit started.
    unit_started: Instant,
    /// Most workers in the ring: workers that join mid-run are admitted up to it.
    pub max_workers: usize,
    /// A unit waiting to be assigned (for enough workers, when paused), from this step.
    pending_step: Option<u64>,
    /// The generation already asked to stop for new workers.
    regroup_asked: u64,
    /// The last restart step and how many rings in a row restarted there.
    restarts_at: (u64, u32),
    /// Steps done when this coordinator started the run (0, or the resumed checkpoint's).
    start_step: u64,
    /// Finished epochs.
    pub history: Vec<EpochSummary>,
    /// Benchmark results (rank 0's measurements).
    pub bench: Option<BenchResult>,
    /// Rank 0's grid of test predictions (PNG), from the last tested epoch.
    pub prediction_grid: Option<Vec<u8>>,
    /// The latest committed checkpoint.
    pub last_checkpoint: Option<Checkpointed>,
    /// The checkpoint this run resumed from: workers load it instead of fresh weights.
    pub resume_from: Option<String>,
    /// The epoch whose checkpoint rank 0 is uploading; the next unit waits for its commit.
    pub awaiting_checkpoint: Option<(Phase, u32)>,
    /// How many times this run has been restarted from a checkpoint (carried in the
    /// checkpoints, so it counts across coordinator restarts).
    pub restarts: u32,
    /// The generation in which stuck ranks were spared for holding the only training state
    /// (said once per generation).
    spared_generation: u64,
    /// Every checkpoint commit of this coordinator, timed (for metrics).
    pub commit_stats: Vec<CommitStat>,
    /// Why the run failed.
    pub error: Option<String>,
    /// Step checksums by step and rank, until every rank has sent its own.
    checksums: BTreeMap<u64, BTreeMap<u32, u64>>,
    next_id: u64,
}

impl Run {
    /// A run of `config` waiting for `expected` workers.
    pub fn new(run_id: String, config: RunConfig, expected: usize) -> Self {
        let plan = plan(&config);
        let global_batch = match config.global_batch {
            0 => config.batch_size * expected as u32,
            n => n,
        };
        Self {
            run_id,
            config,
            expected,
            workers: BTreeMap::new(),
            devices: BTreeMap::new(),
            generation: 0,
            stage: Stage::Waiting,
            plan,
            current: 0,
            steps_done: 0,
            reports: BTreeMap::new(),
            min_workers: expected,
            global_batch,
            ring_lost_member: false,
            unit_generation_step: 0,
            carried: Carried::default(),
            ring_reforms: 0,
            unit_started: Instant::now(),
            max_workers: expected,
            pending_step: None,
            regroup_asked: 0,
            restarts_at: (u64::MAX, 0),
            start_step: 0,
            history: Vec::new(),
            bench: None,
            prediction_grid: None,
            last_checkpoint: None,
            resume_from: None,
            awaiting_checkpoint: None,
            restarts: 0,
            spared_generation: u64::MAX,
            commit_stats: Vec::new(),
            error: None,
            checksums: BTreeMap::new(),
            next_id: 0,
        }
    }

    /// Whether the run is over.
    pub fn finished(&self) -> bool {
        matches!(self.stage, Stage::Done | Stage::Failed)
    }

    /// Admit a worker; it receives its welcome (and, if it completes the cluster, everyone
    /// receives their first assignment) through `orders`.
    pub fn join(
        &mut self,
        request: v1::JoinRequest,
        orders: UnboundedSender<Result<Order, Status>>,
    ) -> Result<String, Refusal> {
        let training = matches!(self.stage, Stage::Head | Stage::Finetune);
        if self.stage != Stage::Waiting && !training {
            return Err(Refusal::Started(self.stage.label()));
        }
        let limit = if training { self.max_workers } else { self.expected };
        if self.workers.len() >= limit {
            return Err(Refusal::Full(limit));
        }
        if request.advertise.is_empty() {
            return Err(Refusal::BadRequest("advertise address is empty".into()));
        }
        if let Some((id, _)) = self
            .workers
            .iter()
            .find(|(_, w)| w.advertise == request.advertise)
        {
            return Err(Refusal::BadRequest(format!(
                "address {} is already used by worker {id}; give each worker its own --advertise",
                request.advertise
            )));
        }
        self.next_id += 1;
        let id = format!("w{}", self.next_id);
        let welcome = Order {
            order: Some(order::Order::Welcome(Welcome {
                worker_id: id.clone(),
                run_id: self.run_id.clone(),
                expected_workers: self.expected as u32,
            })),
        };
        // A closed receiver means the worker already left; departure handling removes it.
        let _ = orders.send(Ok(welcome));
        tracing::info!(worker = %id, name = %request.name, address = %request.advertise, device = %request.device,
            joined = self.workers.len() + 1, expected = self.expected, "worker joined");
        self.devices.insert(request.name.clone(), request.device.clone());
        self.workers.insert(
            id.clone(),
            Worker {
                name: request.name,
                advertise: request.advertise,
                device: request.device,
                rank: None,
                last_seen: Instant::now(),
                step: 0,
                steps_per_second: None,
                has_state: self.stage == Stage::Waiting,
                rate_mark: (0, Instant::now()),
                progress: Default::default(),
                orders,
            },
        );
        if training {
            self.admit_waiting();
        } else if self.workers.len() == self.expected {
            self.form_ring();
        }
        Ok(id)
    }

    /// Ranks in join order; the ring follows the ranks.
    fn form_ring(&mut self) {
        self.rank_members();
        tracing::info!(
            generation = self.generation,
            world = self.workers.len(),
            "ring formed"
        );
        self.start_unit();
    }

    fn peers(&self) -> Vec<String> {
        let mut peers: Vec<(u32, String)> = self
            .workers
            .values()
            .filter_map(|w| w.rank.map(|r| (r, w.advertise.clone())))
            .collect();
        peers.sort();
        peers.into_iter().map(|(_, a)| a).collect()
    }

    fn start_unit(&mut self) {
        self.reports.clear();
        self.carried = Carried::default();
        self.unit_started = Instant::now();
        self.pending_step = Some(self.steps_done);
        // Workers admitted since the last ring join at this unit boundary.
        let new_ring = self.workers.values().any(|w| w.rank.is_none());
        self.go_on_if_enough(new_ring);
    }

    /// Send the current unit to every ranked worker, continuing from
    /// `unit_generation_step` (the unit's first step, unless a ring broke during it).
    fn assign_unit(&mut self) {
        let Some(unit) = self.plan.get(self.current).cloned() else {
            self.finish(None);
            return;
        };
        let work = match unit {
            Unit::Epoch {
                phase,
                epoch,
                test,
                checkpoint,
            } => {
                self.stage = if phase == Phase::Head {
                    Stage::Head
                } else {
                    Stage::Finetune
                };
                let done_in_epoch = self.unit_generation_step.saturating_sub(self.steps_done);
                tracing::info!(
                    phase = phase.label(),
                    epoch,
                    first_step = self.unit_generation_step,
                    generation = self.generation,
                    "epoch started"
                );
                Work::Epoch(EpochWork {
                    phase: phase as i32,
                    epoch,
                    first_step: self.unit_generation_step,
                    consumed: done_in_epoch * u64::from(self.global_batch),
                    test,
                    checkpoint,
                    global_batch: self.global_batch,
                    sync: self.workers.values().any(|w| w.rank.is_some() && !w.has_state),
                })
            }
            Unit::Bench => {
                self.stage = Stage::Bench;
                Work::Bench(BenchWork {
                    sizes: self
                        .config
                        .bench_sizes_mb
                        .iter()
                        .map(|mb| (mb * 1024.0 * 1024.0).round() as u64)
                        .collect(),
                    warmup: self.config.bench_warmup,
                    iterations: self.config.bench_iterations,
                    bf16: self.config.bf16_allreduce,
                })
            }
        };
        let peers = self.peers();
        let config_json = self.config.to_json();
        for worker in self.workers.values() {
            let Some(rank) = worker.rank else { continue };
            let assignment = Assignment {
                generation: self.generation,
                rank,
                world: peers.len() as u32,
                peers: peers.clone(),
                config_json: config_json.clone(),
                work: Some(work.clone()),
                resume_checkpoint: self.resume_from.clone().unwrap_or_default(),
            };
            let _ = worker.orders.send(Ok(Order {
                order: Some(order::Order::Assignment(assignment)),
            }));
        }
    }

    /// End the run, telling every worker.
    pub fn finish(&mut self, error: Option<String>) {
        if self.finished() {
            return;
        }
        match &error {
            None => tracing::info!(run = %self.run_id, "run finished"),
            Some(e) => tracing::error!(run = %self.run_id, error = %e, "run failed"),
        }
        self.stage = if error.is_some() {
            Stage::Failed
        } else {
            Stage::Done
        };
        self.error = error.clone();
        for worker in self.workers.values() {
            let _ = worker.orders.send(Ok(Order {
                order: Some(order::Order::Finish(Finish {
                    error: error.clone().unwrap_or_default(),
                })),
            }));
        }
    }

    fn rank_of(&self, worker_id: &str) -> Result<u32, Refusal> {
        let worker = self
            .workers
            .get(worker_id)
            .ok_or_else(|| Refusal::UnknownWorker(worker_id.to_string()))?;
        worker
            .rank
            .ok_or_else(|| Refusal::BadRequest(format!("worker {worker_id} has no rank yet")))
    }

    /// A worker's heartbeat, with the weight checksums it took since the last one. When
    /// every rank has sent its checksum of a step, they are compared: ranks that disagree
    /// stop the run at once, rather than at the end of the epoch.
    pub fn heartbeat(
        &mut self,
        worker_id: &str,
        step: u64,
        checksums: &[(u64, u64, u64)],
        progress: crate::stuck::Reported,
        now: Instant,
    ) -> Result<(), Refusal> {
        let worker = self
            .workers
            .get_mut(worker_id)
            .ok_or_else(|| Refusal::UnknownWorker(worker_id.to_string()))?;
        worker.last_seen = now;
        worker.step = step;
        worker.progress = progress;
        let (mark_step, mark_time) = worker.rate_mark;
        let elapsed = now.saturating_duration_since(mark_time).as_secs_f64();
        if step < mark_step {
            worker.rate_mark = (step, now);
        } else if step > mark_step && elapsed >= 1.0 {
            // Measured over windows that hold a step, and smoothed: a step slower than the
            // heartbeat would otherwise halve the rate every second without one (a 30 s
            // step put the ETA at millions of hours), and the pause for evaluation between
            // epochs does not swing it to 0 either.
            let measured = (step - mark_step) as f64 / elapsed;
            worker.steps_per_second = Some(match worker.steps_per_second {
                Some(rate) => 0.5 * rate + 0.5 * measured,
                None => measured,
            });
            worker.rate_mark = (step, now);
        }
        let Some(rank) = worker.rank else {
            return Ok(());
        };
        let ranks = self.workers.values().filter(|w| w.rank.is_some()).count();
        for &(at, checksum, generation) in checksums {
            // A step of a ring that broke may be redone by the next one.
            if generation != self.generation {
                continue;
            }
            let seen = self.checksums.entry(at).or_default();
            seen.insert(rank, checksum);
            if seen.len() < ranks {
                continue;
            }
            let seen = self.checksums.remove(&at).unwrap_or_default();
            let first = seen.values().next().copied().unwrap_or_default();
            if seen.values().any(|c| *c != first) {
                let listed: Vec<String> = seen.iter().map(|(r, c)| format!("rank {r}: {c:016x}")).collect();
                self.finish(Some(format!(
                    "ranks diverged at step {at}: weight checksums differ ({}); the all-reduce or a \
                     worker's arithmetic is broken",
                    listed.join(", ")
                )));
                return Ok(());
            }
            tracing::debug!(step = at, ranks, "weights agree on every rank");
        }
        // Checksums of steps some rank never reported (a lost heartbeat) are dropped once the
        // run is past them.
        let done = self.steps_done;
        self.checksums.retain(|&at, _| at + 10_000 > done);
        Ok(())
    }

    /// A worker's results for the current unit; when every rank has reported, the unit is
    /// aggregated and the next one starts, or, when the ring broke, the unit goes on over a
    /// new ring of the survivors.
    pub fn report(&mut self, report: v1::WorkReport) -> Result<(), Refusal> {
        if self.finished() {
            return Err(Refusal::Finished(self.stage.label()));
        }
        self.rank_of(&report.worker_id)?;
        if report.generation != self.generation {
            return Err(Refusal::Stale {
                got: report.generation,
                current: self.generation,
            });
        }
        let result = report
            .result
            .ok_or_else(|| Refusal::BadRequest("report carries no result".into()))?;
        let unit = self.plan.get(self.current).cloned();
        match (&unit, &result) {
            (Some(Unit::Epoch { phase, epoch, .. }), ReportResult::Epoch(r))
                if r.phase == *phase as i32 && r.epoch == *epoch => {}
            (Some(Unit::Epoch { phase, epoch, .. }), ReportResult::Broken(r))
                if r.phase == *phase as i32 && r.epoch == *epoch => {}
            (Some(Unit::Bench), ReportResult::Bench(_)) => {}
            _ => {
                return Err(Refusal::BadRequest(format!(
                    "report does not match the work in progress ({unit:?})"
                )));
            }
        }
        if let ReportResult::Broken(b) = &result
            && b.completed_steps < self.unit_generation_step
        {
            return Err(Refusal::BadRequest(format!(
                "broken-ring report at step {}, but this ring started at step {}",
                b.completed_steps, self.unit_generation_step
            )));
        }
        if let ReportResult::Broken(b) = &result {
            tracing::warn!(worker = %report.worker_id, generation = report.generation,
                completed_steps = b.completed_steps, reason = %b.reason, "worker lost its ring");
        }
        self.reports.insert(report.worker_id, result);
        self.advance();
        Ok(())
    }

    /// Once every ranked worker has reported the current unit: finish it, or re-form the
    /// ring when it broke.
    fn advance(&mut self) {
        if self.finished() || self.awaiting_checkpoint.is_some() {
            return;
        }
        let ranked: Vec<&String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.rank.is_some())
            .map(|(id, _)| id)
            .collect();
        if ranked.iter().any(|id| !self.reports.contains_key(*id)) {
            return;
        }
        let broken = self
            .reports
            .values()
            .any(|r| matches!(r, ReportResult::Broken(_)));
        if broken || self.ring_lost_member {
            self.reform_ring();
            return;
        }
        let unit = self.plan.get(self.current).cloned();
        let reports = std::mem::take(&mut self.reports);
        match unit {
            Some(Unit::Epoch { phase, epoch, .. }) => {
                let results: Vec<&EpochResult> = reports
                    .values()
                    .filter_map(|r| match r {
                        ReportResult::Epoch(e) => Some(e),
                        _ => None,
                    })
                    .collect();
                if let Some(grid) = results.iter().find(|r| !r.prediction_grid_png.is_empty()) {
                    self.prediction_grid = Some(grid.prediction_grid_png.clone());
                }
                let checksums: Vec<u64> = results.iter().map(|r| r.weights_checksum).collect();
                if checksums.iter().any(|c| *c != checksums[0]) {
                    let listed: Vec<String> = reports
                        .keys()
                        .zip(&checksums)
                        .map(|(id, c)| format!("{id}: {c:016x}"))
                        .collect();
                    self.finish(Some(format!(
                        "ranks diverged after {} epoch {epoch}: weight checksums differ ({}); \
                         the all-reduce or a worker's arithmetic is broken",
                        phase.label(),
                        listed.join(", ")
                    )));
                    return;
                }
                let mut carried = std::mem::take(&mut self.carried);
                carried.steps = self.unit_generation_step.saturating_sub(self.steps_done);
                if carried.steps > 0 || carried.count > 0 {
                    carried.seconds = Some(self.unit_started.elapsed().as_secs_f64());
                }
                let summary = summarize(phase, epoch, &results, &carried);
                tracing::info!(phase = %summary.phase, epoch, train_loss = summary.train_loss,
                    train_accuracy = summary.train_accuracy, val_accuracy = ?summary.val_accuracy,
                    test_accuracy = ?summary.test_accuracy, seconds = summary.seconds,
                    train_seconds = summary.train_seconds, feature_cache_hits = summary.feature_cache_hits,
                    feature_cache_misses = summary.feature_cache_misses, "epoch finished");
                self.steps_done += summary.steps;
                self.history.push(summary);
                if matches!(unit, Some(Unit::Epoch { checkpoint: true, .. })) {
                    tracing::info!(phase = phase.label(), epoch, "waiting for rank 0's checkpoint");
                    self.awaiting_checkpoint = Some((phase, epoch));
                    return;
                }
            }
            Some(Unit::Bench) => {
                let rank0 = self
                    .workers
                    .iter()
                    .find(|(_, w)| w.rank == Some(0))
                    .map(|(id, _)| id.clone());
                self.bench = rank0.and_then(|id| reports.get(&id)).and_then(|r| match r {
                    ReportResult::Bench(b) => Some(b.clone()),
                    _ => None,
                });
            }
            None => {}
        }
        self.current += 1;
        self.start_unit();
    }

    /// The ring of the current unit broke (or stopped to admit workers) and every member
    /// has said how far it got: continue the unit over a new ring from the last step all
    /// members with state completed (a member one step ahead rolls back; at most one step is
    /// redone). With too few workers the run pauses until more join.
    fn reform_ring(&mut self) {
        let reports = std::mem::take(&mut self.reports);
        self.ring_lost_member = false;
        for (id, report) in &reports {
            let has_state = match report {
                ReportResult::Broken(b) => b.has_state,
                _ => true,
            };
            if let Some(w) = self.workers.get_mut(id) {
                w.has_state = has_state;
            }
        }
        let completed_by = |id: &String| -> Option<u64> {
            if !self.workers.get(id)?.has_state {
                return None;
            }
            match reports.get(id)? {
                ReportResult::Broken(b) => Some(b.completed_steps),
                ReportResult::Epoch(e) => Some(self.unit_generation_step + e.steps),
                ReportResult::Bench(_) => None,
            }
        };
        let restart = self.workers.keys().filter_map(completed_by).min();
        // Nobody holds state, but nobody has trained since the run (re)started either (a
        // worker died while the first weights were shared): start the unit over, building or
        // loading the model afresh.
        let fresh = self.steps_done == self.start_step && self.unit_generation_step == self.start_step;
        let restart = match restart {
            None if fresh && !self.workers.is_empty() => {
                for w in self.workers.values_mut() {
                    w.has_state = true;
                }
                Some(self.start_step)
            }
            other => other,
        };
        let Some(restart) = restart else {
            self.finish(Some(
                "every worker holding the training state is gone; restart the coordinator to resume \
                 from the last checkpoint"
                    .into(),
            ));
            return;
        };
        // The survivors' training sums count (a departed rank's are lost with it); a step
        // that is rolled back is taken out, as it will be trained again.
        for report in reports.values() {
            match report {
                ReportResult::Broken(b) => {
                    let rolled_back = b.completed_steps > restart;
                    self.carried.loss_sum +=
                        b.train_loss_sum - if rolled_back { b.last_loss_sum } else { 0.0 };
                    self.carried.correct +=
                        b.train_correct
                            .saturating_sub(if rolled_back { b.last_correct } else { 0 });
                    self.carried.count +=
                        b.train_count
                            .saturating_sub(if rolled_back { b.last_count } else { 0 });
                }
                ReportResult::Epoch(e) => {
                    // A rank that finished the epoch and now rolls back a step keeps that
                    // step's sums: its report does not separate them (a small overcount).
                    self.carried.loss_sum += e.train_loss_sum;
                    self.carried.correct += e.train_correct;
                    self.carried.count += e.train_count;
                }
                ReportResult::Bench(_) => {}
            }
        }
        let (at, times) = self.restarts_at;
        self.restarts_at = (restart, if at == restart { times + 1 } else { 1 });
        if self.restarts_at.1 > 5 {
            self.finish(Some(format!(
                "the ring broke 5 times in a row at step {restart} without progress; see the workers' logs"
            )));
            return;
        }
        self.pending_step = Some(restart);
        self.go_on_if_enough(true);
    }

    /// Why the run waits for workers before going on, when it does.
    pub fn paused(&self) -> Option<String> {
        let members = self.workers.len();
        (self.pending_step.is_some() && !self.finished() && members < self.min_workers.max(1)).then(|| {
            format!(
                "{members} workers, fewer than --min-workers {}; waiting for more to join",
                self.min_workers
            )
        })
    }

    /// Assign the pending unit from `pending_step` when enough workers are there (over a new
    /// ring when `new_ring`, or when it has new members), or pause.
    fn go_on_if_enough(&mut self, new_ring: bool) {
        let Some(restart) = self.pending_step else {
            return;
        };
        if let Some(reason) = self.paused() {
            tracing::warn!(reason = %reason, "run paused");
            return;
        }
        self.pending_step = None;
        if new_ring || self.workers.values().any(|w| w.rank.is_none()) {
            // Members keep their order (rank 0 stays rank 0 when it survives); new ones follow.
            self.renumber();
            tracing::info!(
                generation = self.generation,
                restart_step = restart,
                "the unit goes on from its last common step"
            );
        }
        self.unit_generation_step = restart;
        self.assign_unit();
    }

    /// Workers joined mid-run: take them in at the next step boundary (ask the ring to stop
    /// after its current step), at the next unit, or now when the run is paused.
    fn admit_waiting(&mut self) {
        if self.pending_step.is_some() {
            self.go_on_if_enough(true);
            return;
        }
        if self.awaiting_checkpoint.is_some() || self.regroup_asked == self.generation {
            return;
        }
        self.regroup_asked = self.generation;
        tracing::info!(
            generation = self.generation,
            "workers waiting to join; asking the ring to stop after this step"
        );
        for w in self.workers.values().filter(|w| w.rank.is_some()) {
            let _ = w.orders.send(Ok(Order {
                order: Some(order::Order::Regroup(v1::Regroup {
                    generation: self.generation,
                })),
            }));
        }
    }

    /// Rank 0 uploaded a checkpoint: check that it is the one the run waits for, and say
    /// what to commit.
    pub fn prepare_commit(&self, commit: &CheckpointCommit) -> Result<CommitPlan, Refusal> {
        let rank = self.rank_of(&commit.worker_id)?;
        if rank != 0 {
            return Err(Refusal::BadRequest(format!(
                "only rank 0 commits checkpoints; worker {} is rank {rank}",
                commit.worker_id
            )));
        }
        let Some((phase, epoch)) = self.awaiting_checkpoint else {
            return Err(self.commit_not_due(commit));
        };
        if commit.phase != phase as i32 || commit.epoch != epoch + 1 {
            return Err(Refusal::BadRequest(format!(
                "checkpoint for phase {} epoch {} does not match the one due ({} epoch {})",
                commit.phase,
                commit.epoch,
                phase.label(),
                epoch + 1
            )));
        }
        if commit.step != self.steps_done {
            return Err(Refusal::BadRequest(format!(
                "checkpoint at step {} but the run completed {} steps",
                commit.step, self.steps_done
            )));
        }
        if !commit.checkpoint.starts_with("step-") || commit.checkpoint.contains('/') {
            return Err(Refusal::BadRequest(format!(
                "bad checkpoint name {:?}",
                commit.checkpoint
            )));
        }
        let global_epoch = match phase {
            Phase::Finetune => u64::from(self.config.head_epochs) + u64::from(epoch) + 1,
            _ => u64::from(epoch) + 1,
        };
        Ok(CommitPlan {
            name: commit.checkpoint.clone(),
            state: SavedState {
                run_id: self.run_id.clone(),
                phase: phase.label().to_string(),
                epoch: epoch + 1,
                step: self.steps_done,
                sampler_epoch: global_epoch,
                sampler_consumed: 0,
                seed: self.config.seed,
                // Resolved: a resume with another worker count keeps this global batch.
                config: RunConfig {
                    global_batch: self.global_batch,
                    ..self.config.clone()
                },
                history: self.history.clone(),
                restarts: self.restarts,
            },
            val_accuracy: self.history.last().and_then(|h| h.val_accuracy),
            objects: commit
                .objects
                .iter()
                .map(|o| checkpoint::ObjectEntry {
                    name: o.name.clone(),
                    size: o.size,
                    sha256: o.sha256.clone(),
                })
                .collect(),
        })
    }

    /// Why a commit that arrives while no checkpoint is due cannot be taken now. Rank 0
    /// commits as soon as its own report is in, so a commit regularly overtakes a slower
    /// rank's report of the same epoch: that one is held, not refused. One whose epoch was
    /// taken over by a new ring (a rank was lost meanwhile) is superseded: the epoch goes
    /// on and its checkpoint is taken when it ends.
    fn commit_not_due(&self, commit: &CheckpointCommit) -> Refusal {
        let due_next = match self.plan.get(self.current) {
            Some(Unit::Epoch {
                phase,
                epoch,
                checkpoint: true,
                ..
            }) => commit.phase == *phase as i32 && commit.epoch == epoch + 1,
            _ => false,
        };
        let reported = matches!(self.reports.get(&commit.worker_id), Some(ReportResult::Epoch(_)));
        if due_next && reported && self.pending_step.is_none() {
            Refusal::NotYet(format!(
                "the checkpoint of epoch {} waits for the other ranks' reports",
                commit.epoch
            ))
        } else {
            Refusal::Superseded(format!(
                "checkpoint {} is not due any more: the run went on without it (a ring was \
                 re-formed, or the epoch is redone); the last committed checkpoint stays LATEST",
                commit.checkpoint
            ))
        }
    }

    /// The checkpoint the run waited for is committed: record it and start the next unit.
    pub fn checkpoint_committed(&mut self, checkpoint: Checkpointed) {
        if self.finished() || self.awaiting_checkpoint.is_none() {
            return;
        }
        tracing::info!(location = %checkpoint.location, step = checkpoint.step, "checkpoint committed");
        self.last_checkpoint = Some(checkpoint);
        self.awaiting_checkpoint = None;
        self.current += 1;
        self.start_unit();
    }

    /// A run continuing from a checkpoint whose state is `state`: the plan resumes after the
    /// checkpointed epoch, with its history and step count.
    pub fn resume(state: SavedState, checkpoint: Checkpointed, expected: usize) -> Result<Self, String> {
        let mut run = Run::new(state.run_id.clone(), state.config.clone(), expected);
        let phase = match state.phase.as_str() {
            "head" => Phase::Head,
            "finetune" => Phase::Finetune,
            other => return Err(format!("phase '{other}': expected head or finetune")),
        };
        let position = run
            .plan
            .iter()
            .position(|u| matches!(u, Unit::Epoch { phase: p, epoch, .. } if *p == phase && epoch + 1 == state.epoch))
            .ok_or_else(|| format!("{} epoch {} is not part of this run's plan", state.phase, state.epoch))?;
        run.current = position + 1;
        run.steps_done = state.step;
        run.start_step = state.step;
        run.history = state.history;
        run.restarts = state.restarts + 1;
        // Ring generations stay unique across coordinators, so a worker still holding a ring
        // of the previous one can never be mistaken for a member of this one's.
        run.generation = u64::from(run.restarts) << 32;
        run.resume_from = Some(checkpoint.name.clone());
        run.last_checkpoint = Some(checkpoint);
        Ok(run)
    }

    /// A worker's order stream closed. Before the run starts it simply leaves. During
    /// training the ring is re-formed from the survivors (once each has said how far it got);
    /// with fewer than `min_workers` left the run pauses until more join. During a benchmark
    /// the run fails, so that no survivor waits for it.
    pub fn depart(&mut self, worker_id: &str) {
        let Some(worker) = self.workers.remove(worker_id) else {
            return;
        };
        if self.finished() {
            return;
        }
        let Some(rank) = worker.rank else {
            tracing::info!(worker = %worker_id, "worker left before it was given a rank");
            if self.pending_step.is_some() {
                self.go_on_if_enough(true);
            }
            return;
        };
        let left = self.workers.len();
        if !matches!(self.stage, Stage::Head | Stage::Finetune) {
            self.finish(Some(format!(
                "worker {worker_id} ({}, rank {rank}) disconnected during {}",
                worker.name,
                self.stage.label()
            )));
            return;
        }
        tracing::warn!(worker = %worker_id, name = %worker.name, rank, left, generation = self.generation,
            "worker lost; re-forming the ring from the survivors");
        if self.pending_step.is_some() {
            // Nothing runs; the pause goes on (or ends) with the remaining members.
            self.go_on_if_enough(true);
            return;
        }
        if let Some((phase, epoch)) = self.awaiting_checkpoint {
            // The epoch is complete on every survivor; only its checkpoint is pending.
            if rank == 0 {
                tracing::warn!(
                    phase = phase.label(),
                    epoch,
                    "rank 0 left before committing the checkpoint; \
                    going on without it (the previous committed checkpoint stays LATEST)"
                );
                self.awaiting_checkpoint = None;
                self.current += 1;
                self.renumber();
                self.start_unit();
            } else {
                // Rank 0 still commits; the next unit starts on a new ring.
                self.renumber();
            }
            return;
        }
        self.ring_lost_member = true;
        self.advance();
    }

    /// Rank every member in a new ring generation: members holding the state first, in
    /// their old rank order (so rank 0 can share the state), then the others by id.
    fn rank_members(&mut self) {
        let mut order: Vec<(bool, u32, String)> = self
            .workers
            .iter()
            .map(|(id, w)| (!w.has_state, w.rank.unwrap_or(u32::MAX), id.clone()))
            .collect();
        order.sort();
        for (rank, (_, _, id)) in order.iter().enumerate() {
            if let Some(w) = self.workers.get_mut(id) {
                w.rank = Some(rank as u32);
            }
        }
        self.generation += 1;
        self.checksums.clear();
    }

    /// A new generation of the members after losing or gaining some.
    fn renumber(&mut self) {
        self.rank_members();
        self.ring_reforms += 1;
        tracing::warn!(
            generation = self.generation,
            world = self.workers.len(),
            "ring re-formed from the survivors"
        );
    }

    /// Remove a ranked worker that has been silent for longer than `limit` (it is presumed
    /// dead or hung; its order stream is closed, so it stops if it is still running).
    pub fn check_liveness(&mut self, limit: Duration) {
        if self.finished() || self.stage == Stage::Waiting {
            return;
        }
        let silent = self
            .workers
            .iter()
            .find(|(_, w)| w.rank.is_some() && w.last_seen.elapsed() > limit)
            .map(|(id, w)| (id.clone(), w.last_seen.elapsed()));
        if let Some((id, elapsed)) = silent {
            tracing::warn!(worker = %id, silent_seconds = elapsed.as_secs_f64(), "no heartbeat; presumed dead");
            if let Some(w) = self.workers.get(&id) {
                let _ = w.orders.send(Ok(Order {
                    order: Some(order::Order::Finish(Finish {
                        error: format!(
                            "this worker sent no heartbeat for {:.0} s and was removed from the run",
                            elapsed.as_secs_f64()
                        ),
                    })),
                }));
            }
            self.depart(&id);
        }
    }

    /// Remove the ranks that hold the ring up past the step timeout (see [`crate::stuck`]):
    /// each is told it was fenced (it joins again as a new worker), the others are told to
    /// abandon the ring, and the ring is re-formed from them once they have reported.
    pub fn check_progress(&mut self, timeout: crate::stuck::StepTimeout, now: Instant) {
        let training = matches!(self.stage, Stage::Head | Stage::Finetune);
        // Only while a ring trains a unit and nobody has reported it yet (a rank that has
        // reported waits for no collective).
        if self.finished()
            || !training
            || self.awaiting_checkpoint.is_some()
            || self.pending_step.is_some()
            || self.ring_lost_member
            || !self.reports.is_empty()
        {
            return;
        }
        let ranked = || self.workers.iter().filter_map(|(id, w)| Some((id, w, w.rank?)));
        // Step times of this unit only (workers report none before their first step of
        // it): the first steps of a phase compile kernels and fill caches, which the last
        // phase's step time says nothing about.
        let recent_step_seconds = crate::stuck::median_step_seconds(
            ranked()
                .filter(|(_, w, _)| w.progress.generation == self.generation)
                .map(|(_, w, _)| w.progress.step_seconds),
        );
        let limit = crate::stuck::limit(timeout, recent_step_seconds);
        let beats: Vec<crate::stuck::RankBeat> = ranked()
            .map(|(_, w, rank)| crate::stuck::RankBeat {
                rank,
                seen: w.last_seen,
                waiting_seconds: w.progress.waiting_seconds,
                current: w.progress.generation == self.generation,
                exchanging: w.progress.exchanging,
            })
            .collect();
        let Some(stuck) = crate::stuck::stuck_ranks(&beats, limit, now) else {
            return;
        };
        let culprits: Vec<(String, String, u32)> = ranked()
            .filter(|(_, _, rank)| stuck.ranks.contains(rank))
            .map(|(id, w, rank)| (id.clone(), w.name.clone(), rank))
            .collect();
        // Removing every rank that holds the training state would end the run: a slow holder
        // is waited for (a dead one is caught by its closed streams or --peer-timeout).
        let holders_left = ranked()
            .filter(|(_, w, rank)| w.has_state && !stuck.ranks.contains(rank))
            .count();
        if holders_left == 0 {
            if self.spared_generation != self.generation {
                self.spared_generation = self.generation;
                tracing::warn!(ranks = ?stuck.ranks, waited_seconds = stuck.waited_seconds,
                    "ranks hold the ring up, but they alone hold the training state; not removing them");
            }
            return;
        }
        let named: Vec<String> = culprits
            .iter()
            .map(|(_, name, rank)| format!("rank {rank} ({name})"))
            .collect();
        let reason = format!(
            "{} completed no step while the others waited {:.1} s in the all-reduce (step timeout {:.1} s)",
            named.join(", "),
            stuck.waited_seconds,
            stuck.limit.as_secs_f64()
        );
        for (id, name, rank) in &culprits {
            tracing::warn!(worker = %id, name = %name, rank, waited_seconds = stuck.waited_seconds,
                step_timeout_seconds = stuck.limit.as_secs_f64(), generation = self.generation,
                "rank held the ring up past the step timeout; removing it");
            if let Some(w) = self.workers.get(id) {
                let _ = w.orders.send(Ok(Order {
                    order: Some(order::Order::Fenced(v1::Fenced {
                        reason: reason.clone(),
                    })),
                }));
            }
        }
        for (_, w, _) in ranked().filter(|(_, _, rank)| !stuck.ranks.contains(rank)) {
            let _ = w.orders.send(Ok(Order {
                order: Some(order::Order::AbortRing(v1::AbortRing {
                    generation: self.generation,
                    reason: reason.clone(),
                })),
            }));
        }
        for (id, _, _) in culprits {
            self.depart(&id);
        }
    }

    /// Steps the ring has completed: the slowest ranked worker's last heartbeat, never less
    /// than what finished epochs account for.
    pub fn ring_step(&self) -> u64 {
        self.workers
            .values()
            .filter(|w| w.rank.is_some())
            .map(|w| w.step)
            .min()
            .unwrap_or(0)
            .max(self.steps_done)
    }

    /// Seconds to the end of the run, from the last epoch's step count and the ring's recent
    /// speed (the slowest rank's): `None` until both are known.
    pub fn eta_seconds(&self) -> Option<f64> {
        if self.finished() {
            return Some(0.0);
        }
        let per_epoch = self.history.last()?.steps;
        let rate = self
            .workers
            .values()
            .filter(|w| w.rank.is_some())
            .map(|w| w.steps_per_second)
            .collect::<Option<Vec<f64>>>()?
            .into_iter()
            .fold(f64::INFINITY, f64::min);
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        let epochs_left = self.plan[self.current.min(self.plan.len())..]
            .iter()
            .filter(|u| matches!(u, Unit::Epoch { .. }))
            .count() as u64;
        let in_progress = self.ring_step().saturating_sub(self.steps_done).min(per_epoch);
        Some((epochs_left * per_epoch).saturating_sub(in_progress) as f64 / rate)
    }

    /// The status reply.
    pub fn status(&self) -> v1::StatusReply {
        let epoch = match self.plan.get(self.current) {
            Some(Unit::Epoch { epoch, .. }) => *epoch,
            _ => 0,
        };
        let ranked = self.workers.values().filter(|w| w.rank.is_some()).count();
        v1::StatusReply {
            run_id: self.run_id.clone(),
            state: if self.paused().is_some() {
                "paused".into()
            } else {
                self.stage.label().into()
            },
            generation: self.generation,
            epoch,
            workers: self
                .workers
                .iter()
                .map(|(id, w)| v1::WorkerStatus {
                    worker_id: id.clone(),
                    name: w.name.clone(),
                    rank: w.rank.unwrap_or(u32::MAX),
                    address: w.advertise.clone(),
                    device: w.device.clone(),
                    step: w.step,
                    seconds_since_heartbeat: w.last_seen.elapsed().as_secs_f64(),
                    steps_per_second: w.steps_per_second.unwrap_or(0.0),
                    // Each rank takes its share of the global batch.
                    images_per_second: w.steps_per_second.unwrap_or(0.0) * f64::from(self.global_batch)
                        / ranked.max(1) as f64,
                })
                .collect(),
            history_json: serde_json::to_string(&self.history).unwrap_or_default(),
            last_checkpoint: self
                .last_checkpoint
                .as_ref()
                .map(|c| c.location.clone())
                .unwrap_or_default(),
            error: self.error.clone().unwrap_or_default(),
            step: self.ring_step(),
            val_accuracy: self.history.iter().rev().find_map(|h| h.val_accuracy),
            eta_seconds: self.eta_seconds(),
            paused: self.paused().unwrap_or_default(),
        }
    }
}

fn ratio(num: f64, den: u64) -> Option<f64> {
    (den > 0).then(|| num / den as f64)
}

/// Sum exact counts over ranks, and over the rings that broke during the epoch (`carried`).
fn summarize(phase: Phase, epoch: u32, results: &[&EpochResult], carried: &Carried) -> EpochSummary {
    let sum_f = |f: fn(&EpochResult) -> f64| results.iter().map(|r| f(r)).sum::<f64>();
    let sum_u = |f: fn(&EpochResult) -> u64| results.iter().map(|r| f(r)).sum::<u64>();
    let train_count = sum_u(|r| r.train_count) + carried.count;
    let val_count = sum_u(|r| r.val_count);
    let test_count = sum_u(|r| r.test_count);
    let seconds = carried
        .seconds
        .unwrap_or_else(|| results.iter().map(|r| r.seconds).fold(0.0, f64::max));
    let confusion_len = results.iter().map(|r| r.test_confusion.len()).max().unwrap_or(0);
    let test_confusion = (confusion_len > 0).then(|| {
        let classes = (confusion_len as f64).sqrt().round() as usize;
        let mut total = vec![0u64; confusion_len];
        for r in results {
            for (t, v) in total.iter_mut().zip(&r.test_confusion) {
                *t += v;
            }
        }
        total.chunks(classes.max(1)).map(<[u64]>::to_vec).collect()
    });
    EpochSummary {
        phase: phase.label().into(),
        epoch,
        steps: carried.steps + results.iter().map(|r| r.steps).max().unwrap_or(0),
        train_loss: ratio(sum_f(|r| r.train_loss_sum) + carried.loss_sum, train_count).unwrap_or(f64::NAN),
        train_accuracy: ratio((sum_u(|r| r.train_correct) + carried.correct) as f64, train_count)
            .unwrap_or(f64::NAN),
        val_loss: ratio(sum_f(|r| r.val_loss_sum), val_count),
        val_accuracy: ratio(sum_u(|r| r.val_correct) as f64, val_count),
        test_loss: ratio(sum_f(|r| r.test_loss_sum), test_count),
        test_accuracy: ratio(sum_u(|r| r.test_correct) as f64, test_count),
        test_confusion,
        classes: results
            .iter()
            .find(|r| !r.classes.is_empty())
            .map(|r| r.classes.clone()),
        train_images: train_count,
        seconds,
        allreduce_seconds: results.iter().map(|r| r.allreduce_seconds).sum::<f64>()
            / results.len().max(1) as f64,
        images_per_second: if seconds > 0.0 {
            train_count as f64 / seconds
        } else {
            0.0
        },
        train_seconds: carried
            .seconds
            .unwrap_or_else(|| results.iter().map(|r| r.train_seconds).fold(0.0, f64::max)),
        feature_cache_hits: sum_u(|r| r.feature_cache_hits),
        feature_cache_misses: sum_u(|r| r.feature_cache_misses),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with_two_workers() -> (Run, Vec<String>) {
        run_of_two(RunConfig::default())
    }

    fn run_of_two(config: RunConfig) -> (Run, Vec<String>) {
        let mut run = Run::new("r".into(), config, 2);
        let mut ids = Vec::new();
        for i in 0..2 {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            std::mem::forget(rx);
            let request = v1::JoinRequest {
                name: format!("w{i}"),
                advertise: format!("127.0.0.1:{}", 1000 + i),
                device: "cpu".into(),
            };
            ids.push(run.join(request, tx).unwrap());
        }
        (run, ids)
    }

    type Orders = tokio::sync::mpsc::UnboundedReceiver<Result<Order, Status>>;

    /// A training run of `n` workers (batch 4 each, 4 head epochs) whose order streams the
    /// test reads.
    fn elastic_run(n: usize, min_workers: usize) -> (Run, Vec<String>, Vec<Orders>) {
        let config = RunConfig {
            batch_size: 4,
            head_epochs: 4,
            finetune_epochs: 0,
            ..RunConfig::default()
        };
        let mut run = Run::new("r".into(), config, n);
        run.min_workers = min_workers;
        run.max_workers = n + 1;
        let mut ids = Vec::new();
        let mut streams = Vec::new();
        for i in 0..n {
            let (id, rx) = join_worker(&mut run, i).unwrap();
            ids.push(id);
            streams.push(rx);
        }
        (run, ids, streams)
    }

    fn join_worker(run: &mut Run, i: usize) -> Result<(String, Orders), Refusal> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let request = v1::JoinRequest {
            name: format!("w{i}"),
            advertise: format!("127.0.0.1:{}", 2000 + i),
            device: "cpu".into(),
        };
        Ok((run.join(request, tx)?, rx))
    }

    /// The orders queued on a stream so far.
    fn drain(rx: &mut Orders) -> Vec<order::Order> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|o| o.ok()?.order)
            .collect()
    }

    fn last_assignment(rx: &mut Orders) -> Assignment {
        drain(rx)
            .into_iter()
            .filter_map(|o| match o {
                order::Order::Assignment(a) => Some(a),
                _ => None,
            })
            .next_back()
            .expect("an assignment")
    }

    fn broken(worker: &str, generation: u64, completed: u64, count: u64) -> v1::WorkReport {
        v1::WorkReport {
            worker_id: worker.to_string(),
            generation,
            result: Some(ReportResult::Broken(v1::RingBroken {
                phase: Phase::Head as i32,
                epoch: 0,
                completed_steps: completed,
                train_loss_sum: 2.0 * count as f64,
                train_correct: count / 2,
                train_count: count,
                last_loss_sum: 8.0,
                last_correct: 2,
                last_count: 4,
                reason: "test".into(),
                has_state: true,
            })),
        }
    }

    #[test]
    fn a_lost_worker_leaves_a_ring_of_the_survivors_from_their_last_common_step() {
        let (mut run, ids, mut streams) = elastic_run(3, 1);
        let first = last_assignment(&mut streams[0]);
        let Some(Work::Epoch(work)) = first.work else {
            panic!()
        };
        assert_eq!((work.global_batch, work.first_step, work.sync), (12, 0, false));
        run.depart(&ids[2]);
        assert_eq!(
            run.generation, 1,
            "waits for the survivors to say how far they got"
        );
        // Rank 1 finished step 5 (6 completed) before the ring broke; rank 0 did not.
        run.report(broken(&ids[0], 1, 5, 20)).unwrap();
        run.report(broken(&ids[1], 1, 6, 24)).unwrap();
        assert_eq!(run.generation, 2);
        assert_eq!(run.ring_reforms, 1);
        for rx in &mut streams[..2] {
            let a = last_assignment(rx);
            let Some(Work::Epoch(work)) = a.work else { panic!() };
            assert_eq!((a.generation, a.world), (2, 2));
            // The rest of the epoch from step 5: 5 global batches of 12 consumed.
            assert_eq!((work.first_step, work.consumed, work.global_batch), (5, 60, 12));
            assert!(!work.sync, "every member holds the state");
        }
        // A report of the broken ring is fenced off.
        let stale = run.report(epoch_report(&ids[0], Phase::Head, 0, 3)).unwrap_err();
        assert!(
            matches!(stale, Refusal::Stale { got: 1, current: 2 }),
            "{stale:?}"
        );
        // Steps count from the epoch's start; rank 1's rolled-back step is not counted twice.
        for id in &ids[..2] {
            let mut r = epoch_report(id, Phase::Head, 0, 3);
            r.generation = 2;
            run.report(r).unwrap();
        }
        let epoch = run.history.last().unwrap();
        assert_eq!(epoch.steps, 8);
        assert_eq!(run.steps_done, 8);
        assert_eq!(epoch.train_images, 20 + (24 - 4) + 2 * 8);
        assert_eq!(run.ring_reforms, 1);
    }

    #[test]
    fn a_worker_lost_while_the_first_weights_are_shared_restarts_the_unit_afresh() {
        let (mut run, ids, mut streams) = elastic_run(3, 1);
        run.depart(&ids[2]);
        for id in &ids[..2] {
            let mut r = broken(id, 1, 0, 0);
            if let Some(ReportResult::Broken(b)) = r.result.as_mut() {
                b.has_state = false;
            }
            run.report(r).unwrap();
        }
        assert_eq!(run.stage, Stage::Head, "{:?}", run.error);
        let a = last_assignment(&mut streams[0]);
        let Some(Work::Epoch(work)) = a.work else { panic!() };
        assert_eq!(
            (a.generation, a.world, work.first_step, work.sync),
            (2, 2, 0, false)
        );
        // Once a step has been taken, stateless survivors cannot start over.
        let (mut later, ids, _streams) = elastic_run(2, 1);
        later.steps_done = 4;
        later.unit_generation_step = 4;
        later.depart(&ids[1]);
        let mut r = broken(&ids[0], 1, 4, 0);
        if let Some(ReportResult::Broken(b)) = r.result.as_mut() {
            b.has_state = false;
        }
        later.report(r).unwrap();
        assert_eq!(later.stage, Stage::Failed);
        assert!(
            later
                .error
                .as_deref()
                .unwrap_or("")
                .contains("restart the coordinator")
        );
    }

    #[test]
    fn below_min_workers_the_run_pauses_until_a_worker_joins_and_takes_the_state() {
        let (mut run, ids, mut streams) = elastic_run(2, 2);
        run.depart(&ids[1]);
        run.report(broken(&ids[0], 1, 3, 12)).unwrap();
        assert_eq!(run.status().state, "paused");
        assert!(
            run.status().paused.contains("fewer than --min-workers 2"),
            "{:?}",
            run.status()
        );
        assert_eq!(run.generation, 1);
        let (late, mut late_rx) = join_worker(&mut run, 5).unwrap();
        assert_eq!(run.status().state, "head");
        assert_eq!(run.generation, 2);
        let survivor = last_assignment(&mut streams[0]);
        let newcomer = last_assignment(&mut late_rx);
        assert_eq!((survivor.rank, newcomer.rank), (0, 1), "rank 0 holds the state");
        let Some(Work::Epoch(work)) = newcomer.work else {
            panic!()
        };
        assert!(work.sync, "the new worker takes the state from rank 0");
        assert_eq!(work.first_step, 3);
        assert!(!run.workers[&late].has_state);
    }

    #[test]
    fn a_worker_joining_mid_run_asks_the_ring_to_stop_after_a_step() {
        let (mut run, ids, mut streams) = elastic_run(2, 1);
        drain(&mut streams[0]);
        let (late, mut late_rx) = join_worker(&mut run, 7).unwrap();
        for rx in &mut streams {
            let regroup = drain(rx)
                .into_iter()
                .any(|o| matches!(o, order::Order::Regroup(v1::Regroup { generation: 1 })));
            assert!(regroup);
        }
        // One more than --max-workers (3) is refused.
        assert!(matches!(join_worker(&mut run, 8), Err(Refusal::Full(3))));
        run.report(broken(&ids[0], 1, 4, 16)).unwrap();
        run.report(broken(&ids[1], 1, 4, 16)).unwrap();
        assert_eq!(run.generation, 2);
        let a = last_assignment(&mut late_rx);
        let Some(Work::Epoch(work)) = a.work else { panic!() };
        assert_eq!((a.rank, a.world, work.first_step, work.sync), (2, 3, 4, true));
        assert_eq!(run.workers[&late].rank, Some(2));
    }

    #[test]
    fn a_rank_that_holds_the_ring_up_is_fenced_and_the_others_abandon_the_ring() {
        use crate::stuck::{Reported, StepTimeout};
        let (mut run, ids, mut streams) = elastic_run(3, 1);
        let _ = drain(&mut streams[1]);
        let now = Instant::now() + Duration::from_secs(60);
        let waiting = |s: f64| Reported {
            waiting_seconds: s,
            step_seconds: 0.2,
            generation: 1,
            exchanging: false,
        };
        // Ranks 0 and 2 wait in step 3's all-reduce; rank 1 is at step 2, not in it.
        run.heartbeat(&ids[0], 2, &[], waiting(2.0), now).unwrap();
        run.heartbeat(&ids[1], 2, &[], waiting(0.0), now).unwrap();
        run.heartbeat(&ids[2], 2, &[], waiting(2.0), now).unwrap();
        let timeout = StepTimeout::Fixed(Duration::from_secs(3));
        run.check_progress(timeout, now);
        assert_eq!(run.workers.len(), 3, "2 s of waiting is within the timeout");
        // A second later, still nothing from rank 1 but its heartbeats.
        let later = now + Duration::from_millis(1500);
        run.heartbeat(&ids[1], 2, &[], waiting(0.0), later).unwrap();
        run.check_progress(timeout, later);
        assert_eq!(run.workers.len(), 2, "rank 1 removed");
        let fenced = drain(&mut streams[1]);
        let [order::Order::Fenced(fenced)] = fenced.as_slice() else {
            panic!("{fenced:?}")
        };
        assert!(
            fenced.reason.contains("rank 1 (w1) completed no step"),
            "{}",
            fenced.reason
        );
        assert!(fenced.reason.contains("step timeout 3.0 s"), "{}", fenced.reason);
        for i in [0, 2] {
            let orders = drain(&mut streams[i]);
            assert!(
                orders
                    .iter()
                    .any(|o| matches!(o, order::Order::AbortRing(a) if a.generation == 1)),
                "{orders:?}"
            );
        }
        // The survivors leave the collective, report, and go on over a ring of two.
        run.report(broken(&ids[0], 1, 2, 8)).unwrap();
        run.report(broken(&ids[2], 1, 2, 8)).unwrap();
        assert_eq!(run.generation, 2);
        let a = last_assignment(&mut streams[2]);
        assert_eq!((a.rank, a.world), (1, 2));
        // The fenced worker's late heartbeat names it unknown: it must join again.
        let err = run.heartbeat(&ids[1], 3, &[], waiting(0.0), later).unwrap_err();
        assert!(matches!(err, Refusal::UnknownWorker(_)), "{err}");
    }

    #[test]
    fn the_only_holders_of_the_training_state_are_never_removed_for_slowness() {
        use crate::stuck::{Reported, StepTimeout};
        let (mut run, ids, _streams) = elastic_run(2, 1);
        // Rank 1 joined mid-run, holds no state yet, and waits in a collective for rank 0.
        run.workers.get_mut(&ids[1]).unwrap().has_state = false;
        let now = Instant::now() + Duration::from_secs(60);
        let beat = |s: f64| Reported {
            waiting_seconds: s,
            step_seconds: 0.2,
            generation: 1,
            exchanging: false,
        };
        run.heartbeat(&ids[0], 2, &[], beat(0.0), now).unwrap();
        run.heartbeat(&ids[1], 2, &[], beat(30.0), now).unwrap();
        run.check_progress(StepTimeout::Fixed(Duration::from_secs(3)), now);
        assert_eq!(run.workers.len(), 2, "rank 0 alone holds the state");
        assert_eq!(run.stage, Stage::Head);
    }

    #[test]
    fn agreeing_step_checksums_keep_the_run_going_and_differing_ones_stop_it() {
        let (mut run, ids) = run_with_two_workers();
        assert_eq!(run.stage, Stage::Head);
        run.heartbeat(&ids[0], 100, &[(100, 7, 1)], Default::default(), Instant::now())
            .unwrap();
        run.heartbeat(&ids[1], 100, &[(100, 7, 1)], Default::default(), Instant::now())
            .unwrap();
        assert_eq!(run.stage, Stage::Head);
        run.heartbeat(&ids[0], 200, &[(200, 8, 1)], Default::default(), Instant::now())
            .unwrap();
        assert_eq!(run.stage, Stage::Head, "waits for the other rank");
        run.heartbeat(&ids[1], 200, &[(200, 9, 1)], Default::default(), Instant::now())
            .unwrap();
        assert_eq!(run.stage, Stage::Failed);
        let error = run.error.unwrap();
        assert!(error.contains("ranks diverged at step 200"), "{error}");
        assert!(error.contains("rank 1: 0000000000000009"), "{error}");
    }

    fn epoch_report(worker: &str, phase: Phase, epoch: u32, steps: u64) -> v1::WorkReport {
        v1::WorkReport {
            worker_id: worker.to_string(),
            generation: 1,
            result: Some(ReportResult::Epoch(EpochResult {
                phase: phase as i32,
                epoch,
                steps,
                train_count: 8,
                val_count: 4,
                val_correct: 3,
                ..Default::default()
            })),
        }
    }

    fn commit(worker: &str, epoch: u32, step: u64) -> CheckpointCommit {
        CheckpointCommit {
            worker_id: worker.to_string(),
            checkpoint: format!("step-{step:010}-head-e{epoch:03}-00000000"),
            phase: Phase::Head as i32,
            epoch,
            step,
            objects: vec![v1::StoredObject {
                name: "weights.safetensors".into(),
                size: 3,
                sha256: "ab".repeat(32),
            }],
        }
    }

    #[test]
    fn checkpointed_epochs_wait_for_rank_0s_commit_and_resume_continues_after_them() {
        let config = RunConfig {
            head_epochs: 2,
            finetune_epochs: 1,
            checkpoint_every: 1,
            ..RunConfig::default()
        };
        let (mut run, ids) = run_of_two(config);
        run.report(epoch_report(&ids[0], Phase::Head, 0, 4)).unwrap();
        run.report(epoch_report(&ids[1], Phase::Head, 0, 4)).unwrap();
        assert_eq!(run.awaiting_checkpoint, Some((Phase::Head, 0)));
        assert_eq!(run.current, 0, "the next epoch waits for the checkpoint");

        // Only rank 0, only the due epoch, only at the run's step count.
        let err = run
            .prepare_commit(&commit(&ids[1], 1, 4))
            .unwrap_err()
            .to_string();
        assert!(err.contains("only rank 0"), "{err}");
        let err = run
            .prepare_commit(&commit(&ids[0], 2, 4))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match the one due"), "{err}");
        let err = run
            .prepare_commit(&commit(&ids[0], 1, 5))
            .unwrap_err()
            .to_string();
        assert!(err.contains("completed 4 steps"), "{err}");

        let plan = run.prepare_commit(&commit(&ids[0], 1, 4)).unwrap();
        assert_eq!(plan.state.phase, "head");
        assert_eq!(plan.state.epoch, 1);
        assert_eq!(plan.state.step, 4);
        assert_eq!((plan.state.sampler_epoch, plan.state.sampler_consumed), (1, 0));
        assert_eq!(plan.state.history.len(), 1);
        assert_eq!(plan.val_accuracy, Some(0.75));
        assert_eq!(plan.objects[0].name, "weights.safetensors");
        let checkpointed = Checkpointed {
            location: format!("mem://x/{}", plan.name),
            name: plan.name.clone(),
            step: 4,
        };
        run.checkpoint_committed(checkpointed.clone());
        assert_eq!(run.current, 1);
        assert_eq!(run.awaiting_checkpoint, None);
        assert_eq!(run.stage, Stage::Head);
        let err = run.prepare_commit(&commit(&ids[0], 1, 4)).unwrap_err();
        assert!(matches!(err, Refusal::Superseded(_)), "{err}");
        assert!(err.to_string().contains("not due any more"), "{err}");

        // A restarted coordinator continues with head epoch 1 (index 1 of the plan), and
        // workers are told which checkpoint to load.
        let resumed = Run::resume(plan.state.clone(), checkpointed, 2).unwrap();
        assert_eq!(resumed.current, 1);
        assert_eq!(resumed.steps_done, 4);
        assert_eq!(resumed.history.len(), 1);
        assert_eq!(resumed.resume_from.as_deref(), Some(plan.name.as_str()));
        assert_eq!(resumed.run_id, "r");
        // Restarts count across coordinators: the state carries them into later checkpoints.
        assert_eq!((plan.state.restarts, resumed.restarts), (0, 1));
        let again = Run::resume(
            SavedState {
                restarts: resumed.restarts,
                ..plan.state.clone()
            },
            run.last_checkpoint.clone().unwrap(),
            2,
        )
        .unwrap();
        assert_eq!(again.restarts, 2);
        let mut beyond = plan.state;
        beyond.epoch = 7;
        let err = Run::resume(beyond, run.last_checkpoint.clone().unwrap(), 2).unwrap_err();
        assert!(
            err.contains("head epoch 7 is not part of this run's plan"),
            "{err}"
        );
    }

    #[test]
    fn a_commit_that_overtakes_another_ranks_report_is_held_not_refused() {
        let config = RunConfig {
            head_epochs: 2,
            finetune_epochs: 0,
            checkpoint_every: 1,
            ..RunConfig::default()
        };
        let (mut run, ids) = run_of_two(config);
        // Rank 0 reported and committed at once; rank 1 is still evaluating.
        run.report(epoch_report(&ids[0], Phase::Head, 0, 4)).unwrap();
        let err = run.prepare_commit(&commit(&ids[0], 1, 4)).unwrap_err();
        assert!(matches!(err, Refusal::NotYet(_)), "{err}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
        run.report(epoch_report(&ids[1], Phase::Head, 0, 4)).unwrap();
        let plan = run.prepare_commit(&commit(&ids[0], 1, 4)).unwrap();
        assert_eq!((plan.state.epoch, plan.state.step), (1, 4));

        // A commit whose epoch a new ring took over is superseded, which a worker survives.
        let (mut run, ids) = run_of_two(RunConfig {
            head_epochs: 2,
            finetune_epochs: 0,
            checkpoint_every: 1,
            ..RunConfig::default()
        });
        run.report(epoch_report(&ids[0], Phase::Head, 0, 4)).unwrap();
        run.report(broken(&ids[1], 1, 3, 12)).unwrap();
        assert_eq!(run.generation, 2, "re-formed");
        let err = run.prepare_commit(&commit(&ids[0], 1, 4)).unwrap_err();
        assert!(matches!(err, Refusal::Superseded(_)), "{err}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
    }

    #[test]
    fn heartbeats_give_speed_and_the_eta_follows_the_plan() {
        let config = RunConfig {
            head_epochs: 2,
            finetune_epochs: 1,
            ..RunConfig::default()
        };
        let (mut run, ids) = run_of_two(config);
        assert_eq!(run.eta_seconds(), None, "nothing timed yet");
        run.report(epoch_report(&ids[0], Phase::Head, 0, 4)).unwrap();
        run.report(epoch_report(&ids[1], Phase::Head, 0, 4)).unwrap();
        assert_eq!(run.steps_done, 4);
        assert_eq!(run.eta_seconds(), None, "no speed yet");
        // Two seconds ago both ranks were at step 4; now they are at 6: 1 step/s.
        for id in &ids {
            let worker = run.workers.get_mut(id).unwrap();
            worker.rate_mark = (4, Instant::now() - Duration::from_secs(2));
            run.heartbeat(id, 6, &[], Default::default(), Instant::now())
                .unwrap();
        }
        let rate = run.workers[&ids[0]].steps_per_second.unwrap();
        assert!((rate - 1.0).abs() < 0.05, "{rate}");
        assert_eq!(run.ring_step(), 6);
        // Head epoch 1 (2 of 4 steps done) and the fine-tune epoch are left: 6 steps at 1/s.
        let eta = run.eta_seconds().unwrap();
        assert!((eta - 6.0).abs() < 0.3, "{eta}");
        let status = run.status();
        assert_eq!(status.step, 6);
        assert_eq!(status.val_accuracy, Some(0.75));
        assert!((status.workers[0].images_per_second - rate * 32.0).abs() < 1e-9);
        // Steps slower than the heartbeat: one every 10 s, a heartbeat every second.
        let start = Instant::now();
        for id in &ids {
            run.workers.get_mut(id).unwrap().rate_mark = (6, start);
        }
        for second in 1..=80u64 {
            let step = 6 + second / 10;
            for id in &ids {
                run.heartbeat(
                    id,
                    step,
                    &[],
                    Default::default(),
                    start + Duration::from_secs(second),
                )
                .unwrap();
            }
        }
        let rate = run.workers[&ids[0]].steps_per_second.unwrap();
        assert!((rate - 0.1).abs() < 0.02, "one step in 10 s, measured {rate}");
    }
}

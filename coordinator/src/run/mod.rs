//! The run's state machine: admission, rank assignment, the ring, the plan of work units and
//! the aggregation of the workers' reports. Pure state: no I/O besides queueing orders in the
//! workers' mailboxes (the gRPC service streams them), and the clock is an argument of every
//! transition that reads it, so every transition is unit-tested at the times a test chooses.
//!
//! One state ([`Run`]), its transitions in rooms by concern:
//! - [`roster`]: joining, heartbeats (speed, step checksums), departures, liveness and the
//!   step timeout's fencing;
//! - [`plan`]: the units of work, assigning them, collecting reports, epoch summaries;
//! - [`ring`]: ring generations, ranks, re-forming after a loss or to admit joiners, pauses;
//! - [`commit`]: checkpoint commits and resuming from one.

use std::collections::BTreeMap;
use std::time::Instant;

use cluster_proto::v1::{
    self, BenchResult, Finish, Order, Phase, order, work_report::Result as ReportResult,
};
use run_config::RunConfig;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

mod commit;
mod plan;
mod ring;
mod roster;
#[cfg(test)]
mod tests;

pub use commit::{Checkpointed, CommitPlan, CommitStat, SavedState};
use plan::Carried;
pub use plan::{EpochSummary, Unit, plan};

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

/// Where a worker's orders go; the service streams them to the worker. Sending to a closed
/// mailbox does nothing: the worker left, and its departure is handled on its own.
pub type Mailbox = UnboundedSender<Order>;

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
    orders: Mailbox,
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
    /// When the current unit started (none before the first).
    unit_started: Option<Instant>,
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

impl Worker {
    /// Queue `order` for this worker.
    fn send(&self, order: order::Order) {
        // A closed mailbox means the worker already left; departure handling removes it.
        let _ = self.orders.send(Order { order: Some(order) });
    }
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
            unit_started: None,
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
            worker.send(order::Order::Finish(Finish {
                error: error.clone().unwrap_or_default(),
            }));
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

    /// The status reply at `now`.
    pub fn status(&self, now: Instant) -> v1::StatusReply {
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
                    seconds_since_heartbeat: now.saturating_duration_since(w.last_seen).as_secs_f64(),
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

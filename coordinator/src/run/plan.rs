//! The run's plan of work units, their assignment to the ring, the workers' reports and the
//! epoch summaries made of them.

use std::time::Instant;

use cluster_proto::v1::{
    self, Assignment, BenchWork, EpochResult, EpochWork, Phase, assignment::Work, order,
    work_report::Result as ReportResult,
};
use run_config::{Job, RunConfig};
use serde::{Deserialize, Serialize};

use super::{Run, Stage};
use crate::error::Refusal;

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
pub(super) struct Carried {
    pub(super) loss_sum: f64,
    pub(super) correct: u64,
    pub(super) count: u64,
    /// Steps of the epoch taken before the last ring started.
    pub(super) steps: u64,
    /// The epoch's wall time when it spans rings (the coordinator's clock).
    pub(super) seconds: Option<f64>,
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

impl Run {
    pub(super) fn start_unit(&mut self, now: Instant) {
        self.reports.clear();
        self.carried = Carried::default();
        self.unit_started = Some(now);
        self.pending_step = Some(self.steps_done);
        // Workers admitted since the last ring join at this unit boundary.
        let new_ring = self.workers.values().any(|w| w.rank.is_none());
        self.go_on_if_enough(new_ring);
    }

    /// Send the current unit to every ranked worker, continuing from
    /// `unit_generation_step` (the unit's first step, unless a ring broke during it).
    pub(super) fn assign_unit(&mut self) {
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
            worker.send(order::Order::Assignment(assignment));
        }
    }

    /// A worker's results for the current unit; when every rank has reported, the unit is
    /// aggregated and the next one starts, or, when the ring broke, the unit goes on over a
    /// new ring of the survivors.
    pub fn report(&mut self, report: v1::WorkReport, now: Instant) -> Result<(), Refusal> {
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
        self.advance(now);
        Ok(())
    }

    /// Once every ranked worker has reported the current unit: finish it, or re-form the
    /// ring when it broke.
    pub(super) fn advance(&mut self, now: Instant) {
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
                    carried.seconds = self
                        .unit_started
                        .map(|started| now.saturating_duration_since(started).as_secs_f64());
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
        self.start_unit(now);
    }
}

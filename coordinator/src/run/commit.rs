//! Checkpoint commits (is rank 0's upload the one due, and what state goes beside it) and
//! resuming a run from a committed checkpoint.

use std::time::Instant;

use cluster_proto::v1::{CheckpointCommit, Phase, work_report::Result as ReportResult};
use run_config::RunConfig;
use serde::{Deserialize, Serialize};

use super::{EpochSummary, Run, Unit};
use crate::error::Refusal;

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

impl Run {
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
        if !checkpoint::objects::is_checkpoint_name(&commit.checkpoint) {
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
    pub(super) fn commit_not_due(&self, commit: &CheckpointCommit) -> Refusal {
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
    pub fn checkpoint_committed(&mut self, checkpoint: Checkpointed, now: Instant) {
        if self.finished() || self.awaiting_checkpoint.is_none() {
            return;
        }
        tracing::info!(location = %checkpoint.location, step = checkpoint.step, "checkpoint committed");
        self.last_checkpoint = Some(checkpoint);
        self.awaiting_checkpoint = None;
        self.current += 1;
        self.start_unit(now);
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
}

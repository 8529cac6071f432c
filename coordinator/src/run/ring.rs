//! Ring generations: ranking the members, re-forming the ring from the survivors after a loss
//! (or to take joiners in) from their last common step, and pausing below `--min-workers`.

use cluster_proto::v1::work_report::Result as ReportResult;

use std::time::Instant;

use super::Run;

impl Run {
    /// Ranks in join order; the ring follows the ranks.
    pub(super) fn form_ring(&mut self, now: Instant) {
        self.rank_members();
        tracing::info!(
            generation = self.generation,
            world = self.workers.len(),
            "ring formed"
        );
        self.start_unit(now);
    }

    pub(super) fn peers(&self) -> Vec<String> {
        let mut peers: Vec<(u32, String)> = self
            .workers
            .values()
            .filter_map(|w| w.rank.map(|r| (r, w.advertise.clone())))
            .collect();
        peers.sort();
        peers.into_iter().map(|(_, a)| a).collect()
    }

    /// Rank every member in a new ring generation: members holding the state first, in
    /// their old rank order (so rank 0 can share the state), then the others by id.
    pub(super) fn rank_members(&mut self) {
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
    pub(super) fn renumber(&mut self) {
        self.rank_members();
        self.ring_reforms += 1;
        tracing::warn!(
            generation = self.generation,
            world = self.workers.len(),
            "ring re-formed from the survivors"
        );
    }

    /// The ring of the current unit broke (or stopped to admit workers) and every member
    /// has said how far it got: continue the unit over a new ring from the last step all
    /// members with state completed (a member one step ahead rolls back; at most one step is
    /// redone). With too few workers the run pauses until more join.
    pub(super) fn reform_ring(&mut self) {
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
    pub(super) fn go_on_if_enough(&mut self, new_ring: bool) {
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
}

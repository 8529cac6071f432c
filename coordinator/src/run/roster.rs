//! Who is in the run: joining, heartbeats (speed and step checksums), departures, and the
//! removal of ranks that went silent or hold the ring up.

use std::time::{Duration, Instant};

use cluster_proto::v1::{self, Finish, Welcome, order};

use super::{Mailbox, Run, Stage, Worker};
use crate::error::Refusal;

impl Run {
    /// Admit a worker at `now`; it receives its welcome (and, if it completes the cluster,
    /// everyone receives their first assignment) in its mailbox `orders`.
    pub fn join(
        &mut self,
        request: v1::JoinRequest,
        orders: Mailbox,
        now: Instant,
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
                last_seen: now,
                step: 0,
                steps_per_second: None,
                has_state: self.stage == Stage::Waiting,
                rate_mark: (0, now),
                progress: Default::default(),
                orders,
            },
        );
        if let Some(worker) = self.workers.get(&id) {
            worker.send(order::Order::Welcome(Welcome {
                worker_id: id.clone(),
                run_id: self.run_id.clone(),
                expected_workers: self.expected as u32,
            }));
        }
        if training {
            self.admit_waiting();
        } else if self.workers.len() == self.expected {
            self.form_ring(now);
        }
        Ok(id)
    }

    pub(super) fn rank_of(&self, worker_id: &str) -> Result<u32, Refusal> {
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

    /// A worker's order stream closed. Before the run starts it simply leaves. During
    /// training the ring is re-formed from the survivors (once each has said how far it got);
    /// with fewer than `min_workers` left the run pauses until more join. During a benchmark
    /// the run fails, so that no survivor waits for it.
    pub fn depart(&mut self, worker_id: &str, now: Instant) {
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
                self.start_unit(now);
            } else {
                // Rank 0 still commits; the next unit starts on a new ring.
                self.renumber();
            }
            return;
        }
        self.ring_lost_member = true;
        self.advance(now);
    }

    /// Remove a ranked worker that has been silent for longer than `limit` at `now` (it is
    /// presumed dead or hung; its order stream is closed, so it stops if it is still running).
    pub fn check_liveness(&mut self, limit: Duration, now: Instant) {
        if self.finished() || self.stage == Stage::Waiting {
            return;
        }
        let silent = self
            .workers
            .iter()
            .map(|(id, w)| (id, w, now.saturating_duration_since(w.last_seen)))
            .find(|(_, w, silent)| w.rank.is_some() && *silent > limit)
            .map(|(id, _, silent)| (id.clone(), silent));
        if let Some((id, elapsed)) = silent {
            tracing::warn!(worker = %id, silent_seconds = elapsed.as_secs_f64(), "no heartbeat; presumed dead");
            if let Some(w) = self.workers.get(&id) {
                w.send(order::Order::Finish(Finish {
                    error: format!(
                        "this worker sent no heartbeat for {:.0} s and was removed from the run",
                        elapsed.as_secs_f64()
                    ),
                }));
            }
            self.depart(&id, now);
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
                w.send(order::Order::Fenced(v1::Fenced {
                    reason: reason.clone(),
                }));
            }
        }
        for (_, w, _) in ranked().filter(|(_, _, rank)| !stuck.ranks.contains(rank)) {
            w.send(order::Order::AbortRing(v1::AbortRing {
                generation: self.generation,
                reason: reason.clone(),
            }));
        }
        for (id, _, _) in culprits {
            self.depart(&id, now);
        }
    }

    /// Workers joined mid-run: take them in at the next step boundary (ask the ring to stop
    /// after its current step), at the next unit, or now when the run is paused.
    pub(super) fn admit_waiting(&mut self) {
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
            w.send(order::Order::Regroup(v1::Regroup {
                generation: self.generation,
            }));
        }
    }
}

//! One epoch of either phase on this rank, in lockstep with the others: batches dealt by
//! home rank, augmented, through the feature cache in phase 1, forward and backward, the
//! gradients averaged over the ring, the optimizer step; then validation and the report.

use super::*;

/// An epoch's decisions, made before its first step from the work, the run and the ring.
struct EpochPlan {
    /// When the epoch started: its seconds and rates count the planning too.
    started: Instant,
    phase: Phase,
    /// How its batches are made ready.
    draws: Draws,
    /// This rank's batches (indices into the dataset), one per step.
    batches: Vec<Vec<usize>>,
    /// This rank's examples in each step, and the step's examples over all ranks.
    shares: Vec<(usize, usize)>,
    /// Optimizer steps of this phase before this epoch's first (a decaying learning rate
    /// depends on it): whole epochs, then what earlier rings of this epoch consumed.
    phase_iterations: u64,
}

/// What an epoch's steps left behind.
struct Trained {
    model: Classifier,
    steps: u64,
    /// The epoch's loss and accuracy sums on this rank.
    train: Totals,
    /// The last step's sums (a broken ring takes that step back).
    last: Totals,
    /// Rank 0's BatchNorm statistics, when the steps ran to the end.
    stats: Option<Vec<(String, RawTensor)>>,
    /// Why the steps stopped early, if they did.
    broken: Option<String>,
    train_seconds: f64,
    /// What the metrics have been told of the feature cache's counters.
    cache_seen: CacheStats,
}

impl Trainer {
    /// Train the epoch of `work` (from its step on), then evaluate this rank's validation
    /// (and, when asked, test) shard. `beat` gets the step after every optimizer step and a
    /// checksum every `checksum_every` steps, for heartbeats.
    ///
    /// When the ring breaks (a peer died, or a later ring fenced this one off) the epoch
    /// stops without error: the model and optimizer stay in memory as they were after the
    /// last completed step, with the state one step before that kept, so that the next ring
    /// can start from a step every survivor has (see [`EpochOutcome::Broken`]).
    pub fn epoch<N: Link, P: Link>(
        &mut self,
        work: &EpochWork,
        io: &mut RingIo<'_, N, P>,
        beat: &Beat,
    ) -> Result<EpochOutcome> {
        io.seconds = 0.0;
        let (plan, mut loaded) = self.plan_epoch(work, io.ring.world, io.ring.rank)?;
        let started = plan.started;
        let mut cache = self.cache.take();
        let stats_before = cache.as_ref().map(FeatureCache::stats).unwrap_or_default();
        let trained = self.train_steps(work, plan, io, beat, loaded.model, &mut cache)?;
        if let Some(reason) = trained.broken {
            self.cache = cache;
            loaded.model = trained.model;
            self.model = Some(loaded);
            let completed = self.completed.unwrap_or(work.first_step);
            tracing::warn!(generation = io.ring.generation, completed_steps = completed, reason = %reason,
                "the ring broke; keeping this rank's state for the next ring");
            return Ok(EpochOutcome::Broken(v1::RingBroken {
                phase: work.phase,
                epoch: work.epoch,
                completed_steps: completed,
                train_loss_sum: trained.train.loss_sum,
                train_correct: trained.train.correct,
                train_count: trained.train.count,
                last_loss_sum: trained.last.loss_sum,
                last_correct: trained.last.correct,
                last_count: trained.last.count,
                reason,
                has_state: true,
            }));
        }
        let model = match trained.stats {
            Some(stats) => write_running_stats(trained.model, stats, &self.transfers)?,
            None => trained.model,
        };
        let rank_slice = |items: &[usize]| -> Vec<usize> {
            items
                .iter()
                .skip(io.ring.rank)
                .step_by(io.ring.world)
                .copied()
                .collect()
        };
        let evaluating = Instant::now();
        let eval_model = model.valid();
        let val = self.evaluate_with(&eval_model, &rank_slice(&self.splits.val), false, cache.as_mut())?;
        let cache_stats = cache.as_ref().map(FeatureCache::stats).unwrap_or_default();
        if cache.is_some() {
            report_cache(&beat.metrics, cache_stats, trained.cache_seen);
        }
        self.cache = cache;
        let test = if work.test {
            self.evaluate(&eval_model, &rank_slice(&self.splits.test), true)?
        } else {
            Totals::default()
        };
        beat.metrics
            .eval_seconds
            .inc_by(evaluating.elapsed().as_secs_f64());
        loaded.model = model;
        let checksum = weights_checksum(&loaded.model.valid());
        self.model = Some(loaded);
        let train = trained.train;
        Ok(EpochOutcome::Done(EpochResult {
            phase: work.phase,
            epoch: work.epoch,
            steps: trained.steps,
            train_loss_sum: train.loss_sum,
            train_correct: train.correct,
            train_count: train.count,
            val_loss_sum: val.loss_sum,
            val_correct: val.correct,
            val_count: val.count,
            test_loss_sum: test.loss_sum,
            test_correct: test.correct,
            test_count: test.count,
            test_confusion: test.confusion,
            seconds: started.elapsed().as_secs_f64(),
            allreduce_seconds: io.seconds,
            weights_checksum: checksum,
            train_seconds: trained.train_seconds,
            feature_cache_hits: cache_stats.hits - stats_before.hits,
            feature_cache_misses: cache_stats.misses - stats_before.misses,
            prediction_grid_png: Vec::new(),
            classes: if work.test {
                self.dataset.classes.clone()
            } else {
                Vec::new()
            },
        }))
    }

    /// Decide what the epoch of `work` does on this rank of `world`: its phase (entering it
    /// when new: the model prepared, a fresh optimizer), the step it starts from (rolling
    /// back one when the ring restarts there), the feature cache, the backend's seed, and
    /// this rank's batches. Returns the model, taken out for the epoch.
    fn plan_epoch(
        &mut self,
        work: &EpochWork,
        world: usize,
        rank: usize,
    ) -> Result<(EpochPlan, LoadedModel)> {
        let started = Instant::now();
        let phase = match v1::Phase::try_from(work.phase) {
            Ok(v1::Phase::Head) => Phase::Head,
            Ok(v1::Phase::Finetune) => Phase::FineTune,
            _ => {
                return Err(Error::Protocol(format!(
                    "unknown phase {} in the assignment",
                    work.phase
                )));
            }
        }
        .in_run(self.config.from_scratch());
        self.roll_back_to(work.first_step)?;
        let mut loaded = self
            .model
            .take()
            .ok_or_else(|| Error::Internal("the model was lost by an earlier error".into()))?;
        if self.phase != Some(phase) {
            loaded.model = phase::prepare(loaded.model, phase);
            self.optimizer = Some(optim::adam(&self.config).init());
            self.phase = Some(phase);
        }
        // Features are valid only while the backbone is frozen.
        let cached = phase.backbone_frozen() && self.config.feature_cache;
        if !cached {
            self.cache = None;
        } else if self.cache.is_none() {
            self.cache = Some(FeatureCache::new(self.cache_budget()));
        }
        let global_epoch = match phase {
            Phase::Head | Phase::Scratch => u64::from(work.epoch),
            Phase::FineTune => u64::from(self.config.head_epochs) + u64::from(work.epoch),
        };
        // Dropout and stochastic depth draw from the backend's generator: seeding it per
        // epoch and rank makes an epoch's randomness independent of what ran before, so a run
        // resumed from a checkpoint takes exactly the steps an uninterrupted one would. (A
        // ring re-formed mid-epoch draws afresh from where it starts.)
        self.device
            .seed(epoch_seed(self.config.seed, global_epoch, rank).wrapping_add(work.consumed));
        let sampler = SamplerConfig {
            len: self.splits.train.len(),
            seed: self.config.seed,
            shuffle: true,
            drop_last: false,
        };
        let state = SamplerState {
            epoch: global_epoch,
            consumed: work.consumed as usize,
        };
        let global_batch = match work.global_batch {
            0 => self.config.batch_size as usize * world,
            n => n as usize,
        };
        let steps_plan = if cached && world > 1 {
            self.steps_by_home(&sampler, state, global_batch, world, rank)
        } else {
            sampler.global_steps(state, global_batch, world, rank)
        };
        let shares = steps_plan
            .iter()
            .map(|s| (s.indices.len(), s.step_total))
            .collect();
        let batches = steps_plan
            .into_iter()
            .map(|s| s.indices.into_iter().map(|i| self.splits.train[i]).collect())
            .collect();
        let plan = EpochPlan {
            started,
            phase,
            draws: Draws {
                augment: Augment::of_run(&self.config),
                pool: match phase {
                    Phase::Head => self.config.head_variants,
                    Phase::FineTune | Phase::Scratch => 8,
                },
                global_epoch,
                input_ahead: !cached,
            },
            batches,
            shares,
            phase_iterations: u64::from(work.epoch) * self.splits.train.len().div_ceil(global_batch) as u64
                + work.consumed / global_batch as u64,
        };
        Ok((plan, loaded))
    }

    /// The epoch's training steps over `plan`'s batches, each all-reduced over the ring in
    /// lockstep, until the batches run out, the ring breaks or the coordinator asks the ring
    /// to stop for joiners; then rank 0's BatchNorm statistics. `self.completed` and
    /// `self.undo` follow every step.
    ///
    /// The loop stays whole (about 125 lines) on purpose: the order of a step's parts (the
    /// local pass, the all-reduce with the next batch prepared meanwhile, the undo state, the
    /// update, the report) is what keeps ranks in lockstep and a broken ring recoverable,
    /// and it reads in one place; the parts themselves are in `step.rs`.
    fn train_steps<N: Link, P: Link>(
        &mut self,
        work: &EpochWork,
        plan: EpochPlan,
        io: &mut RingIo<'_, N, P>,
        beat: &Beat,
        mut model: Classifier,
        cache: &mut Option<FeatureCache>,
    ) -> Result<Trained> {
        let kit = StepKit::new(plan.phase, &model, &self.device, &self.config, &self.transfers);
        let trainable = kit.trainable;
        let optimizer = self
            .optimizer
            .as_mut()
            .ok_or_else(|| Error::Internal("no optimizer for this phase".into()))?;
        let mut sums = RunningSums::default();
        let mut steps = 0u64;
        let transfers_before = self.transfers.snapshot();
        let mut broken: Option<String> = None;
        let mut cache_seen = cache.as_ref().map(FeatureCache::stats).unwrap_or_default();
        let preparer = kit.preparer(&self.config, &self.device, plan.draws, io.ring.rank);
        let mut prefetch = Prefetcher::spawn(self.dataset.clone(), plan.batches, PREFETCH)
            .map_err(|source| Error::data_read(&self.config.data, source))?;
        let metrics = &beat.metrics;
        metrics.phase.set(i64::from(plan.phase.number()));
        let session = beat.session.load(Ordering::Relaxed);
        let (config, transfers) = (&self.config, &self.transfers);
        beat.watch.new_epoch();
        // Prepared during the last step's all-reduce, and how long the step then waited for it.
        let mut ahead: Option<(Option<Result<Prepared>>, f64)> = None;
        loop {
            if beat.session.load(Ordering::Relaxed) != session {
                broken = Some("the coordinator was lost".into());
                break;
            }
            let (next, waited) = match ahead.take() {
                Some(ready) => ready,
                None => {
                    let waiting = Instant::now();
                    let next = preparer.next(&mut prefetch);
                    (next, waiting.elapsed().as_secs_f64())
                }
            };
            let Some(next) = next else { break };
            let step_started = Instant::now();
            metrics.data_wait_seconds.observe(waited);
            let prepared = next?;
            let n = prepared.batch.samples.len();
            let Local {
                logits,
                loss,
                labels,
                grads,
                mut flat,
            } = kit.local_gradients(&model, cache.as_mut(), prepared)?;
            let global_step = work.first_step + steps;
            let asked = beat.regroup.load(Ordering::Relaxed) == io.ring.generation;
            weigh_and_flag(&mut flat, plan.shares[steps as usize], io.ring.world, asked);
            let reducing = io.seconds;
            let reduced = all_reduce_while_preparing(io, global_step, &mut flat, &preparer, &mut prefetch);
            ahead = Some(reduced.1);
            if let Err(e) = reduced.0 {
                broken = Some(format!("step {global_step}: {e}"));
                break;
            }
            let regroup = flat.pop().is_some_and(|v| v > 0.0);
            metrics.allreduce_seconds.observe(io.seconds - reducing);
            metrics
                .allreduce_bytes
                .inc_by(collective::bytes_sent(&io.ring, flat.len()));
            let grads = trainable.unflatten(&model, &grads, &flat, transfers);
            // Burn's tensors share storage, so keeping the previous step copies nothing here;
            // its cost is that the update below writes new buffers instead of updating the
            // weights and moments in place (memory for one more copy of them).
            self.undo = Some(Undo {
                completed: global_step,
                model: model.clone(),
                optimizer: optimizer.clone(),
            });
            let lr = optim::learning_rate(config, plan.phase, plan.phase_iterations + steps);
            model = trainable.update(optimizer, lr, model, grads);
            steps += 1;
            self.completed = Some(global_step + 1);
            beat.step.store(global_step + 1, Ordering::Relaxed);
            queue_checksum(beat, config, &model, global_step + 1, io.ring.generation);
            sums.add(
                DeviceTotals::step(&loss, &logits, &labels, n),
                steps,
                transfers,
                metrics,
            )?;
            // The gradient copy above waited for the device, so this is the step's real time
            // (the update's kernels are queued, and overlap the next step's input).
            let seconds = step_started.elapsed().as_secs_f64();
            cache_seen = record_step(
                beat,
                cache.as_ref(),
                cache_seen,
                seconds,
                n,
                sums.images(),
                plan.started,
            );
            if regroup {
                broken = Some(format!("stopped after step {global_step} to admit new workers"));
                break;
            }
        }
        let stats = rank0_stats(&model, io, plan.draws.global_epoch, &mut broken);
        let train_seconds = plan.started.elapsed().as_secs_f64();
        self.step_transfers = (steps, self.transfers.snapshot() - transfers_before);
        let (train, last) = sums.read(&self.transfers)?;
        if train.count > 0 {
            metrics.train_loss.set(train.loss_sum / train.count as f64);
        }
        Ok(Trained {
            model,
            steps,
            train,
            last,
            stats,
            broken,
            train_seconds,
            cache_seen,
        })
    }

    /// Where this worker's feature cache may keep entries.
    fn cache_budget(&self) -> CacheBudget {
        let mib = 1 << 20;
        CacheBudget {
            memory_bytes: self.config.feature_cache_memory_mb.saturating_mul(mib),
            disk_bytes: self.config.feature_cache_disk_mb.saturating_mul(mib),
            dir: if self.config.feature_cache_dir.is_empty() {
                std::env::temp_dir()
            } else {
                std::path::PathBuf::from(&self.config.feature_cache_dir)
            },
        }
    }

    /// This rank's shares of the epoch's steps with each global batch dealt by home rank
    /// (see [`deal_by_home`]): the same global batches, but an image lands on the same rank
    /// epoch after epoch, so that rank's cached features serve it.
    fn steps_by_home(
        &self,
        sampler: &SamplerConfig,
        state: SamplerState,
        global_batch: usize,
        world: usize,
        rank: usize,
    ) -> Vec<StepShare> {
        let all: Vec<Vec<StepShare>> = (0..world)
            .map(|r| sampler.global_steps(state, global_batch, world, r))
            .collect();
        let train = &self.splits.train;
        (0..all[rank].len())
            .map(|step| {
                let shares: Vec<Vec<usize>> = all.iter().map(|a| a[step].indices.clone()).collect();
                let mut dealt = deal_by_home(&shares, |i| home_rank(train[i], world));
                StepShare {
                    indices: std::mem::take(&mut dealt[rank]),
                    step_total: all[rank][step].step_total,
                }
            })
            .collect()
    }
}

/// Tell `metrics` what the feature cache did since `seen`; returns `now` as the new mark.
fn report_cache(metrics: &WorkerMetrics, now: CacheStats, seen: CacheStats) -> CacheStats {
    metrics.cache_hits.inc_by(now.hits - seen.hits);
    metrics.cache_misses.inc_by(now.misses - seen.misses);
    metrics.cache_memory_bytes.set(now.memory_bytes as i64);
    metrics.cache_disk_bytes.set(now.disk_bytes as i64);
    now
}

/// Rank 0's BatchNorm running statistics after the epoch's steps, unless they stopped early
/// (`broken`, which a failure here sets). A BatchNorm that trains (the tutorial head's, in
/// phase 1) has seen only this rank's batches: every rank takes rank 0's statistics, as
/// PyTorch DDP broadcasts its buffers.
fn rank0_stats<N: Link, P: Link>(
    model: &Classifier,
    io: &mut RingIo<'_, N, P>,
    global_epoch: u64,
    broken: &mut Option<String>,
) -> Option<Vec<(String, RawTensor)>> {
    if broken.is_some() {
        return None;
    }
    match running_stats_from_rank0(model, io, global_epoch) {
        Ok(stats) => Some(stats),
        Err(e) => {
            *broken = Some(format!("sharing BatchNorm statistics: {e}"));
            None
        }
    }
}

/// Queue the weights' checksum after `step` for the next heartbeat, every `checksum_every`
/// steps of the run.
fn queue_checksum(beat: &Beat, config: &RunConfig, model: &Classifier, step: u64, generation: u64) {
    let every = u64::from(config.checksum_every);
    if every > 0 && step.is_multiple_of(every) {
        let checksum = parameters_checksum(model);
        if let Ok(mut pending) = beat.checksums.lock() {
            pending.push((step, checksum, generation));
        }
    }
}

/// A finished step of `n` images that took `seconds`, told to the metrics and the ring
/// watch; `images` so far this epoch, which started at `started`. Returns the cache mark
/// (see [`report_cache`]).
fn record_step(
    beat: &Beat,
    cache: Option<&FeatureCache>,
    cache_seen: CacheStats,
    seconds: f64,
    n: usize,
    images: u64,
    started: Instant,
) -> CacheStats {
    let metrics = &beat.metrics;
    metrics.step_seconds.observe(seconds);
    beat.watch.record_step(seconds);
    metrics.steps.inc();
    metrics.train_images.inc_by(n as u64);
    let seen = match cache {
        Some(cache) => report_cache(metrics, cache.stats(), cache_seen),
        None => cache_seen,
    };
    metrics
        .images_per_second
        .set(images as f64 / started.elapsed().as_secs_f64().max(1e-9));
    seen
}

/// The backend seed of one rank's epoch: distinct per (run seed, epoch, rank).
fn epoch_seed(seed: u64, global_epoch: u64, rank: usize) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(global_epoch.to_le_bytes());
    h.update((rank as u64).to_le_bytes());
    let digest = h.finalize();
    u64::from_le_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ])
}

//! One epoch of either phase on this rank, in lockstep with the others: batches dealt by
//! home rank, augmented, through the feature cache in phase 1, forward and backward, the
//! gradients averaged over the ring, the optimizer step; then validation and the report.

use super::*;

/// A batch ready for a training step.
struct Prepared {
    batch: dataset::loader::Batch,
    /// The augmentation of each sample.
    variants: Vec<Variant>,
    /// The model input, when made ahead (without the feature cache).
    input: Option<Tensor<4>>,
    /// The batch's labels, on the training device.
    labels: Tensor<1, Int>,
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
        let started = Instant::now();
        io.seconds = 0.0;
        let phase = match v1::Phase::try_from(work.phase) {
            Ok(v1::Phase::Head) => Phase::Head,
            Ok(v1::Phase::Finetune) => Phase::FineTune,
            _ => return Err(cluster(format!("unknown phase {} in the assignment", work.phase))),
        }
        .in_run(self.config.from_scratch());
        self.roll_back_to(work.first_step)?;
        let mut loaded = self
            .model
            .take()
            .ok_or_else(|| cluster("the model was lost by an earlier error"))?;
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
        let mut cache = self.cache.take();
        let stats_before = cache.as_ref().map(FeatureCache::stats).unwrap_or_default();
        // What the metrics have been told of the cache's counters so far.
        let mut cache_seen = stats_before;
        let inner = self.device.clone().inner();
        // Phase 1 runs the frozen backbone in inference mode on the plain device, outside the
        // autodiff graph that only the head needs (phase 1 never changes the backbone, so one
        // copy serves the epoch); it computes the cache's misses, or every batch without one.
        let frozen = phase.backbone_frozen().then(|| loaded.model.valid());
        // Where a batch's input tensor is made: the frozen backbone's device in phase 1.
        let input_device = if phase.backbone_frozen() {
            inner.clone()
        } else {
            self.device.clone()
        };
        // Epochs count across phases, so shuffles and augmentations never repeat.
        let global_epoch = match phase {
            Phase::Head | Phase::Scratch => u64::from(work.epoch),
            Phase::FineTune => u64::from(self.config.head_epochs) + u64::from(work.epoch),
        };
        // Dropout and stochastic depth draw from the backend's generator: seeding it per
        // epoch and rank makes an epoch's randomness independent of what ran before, so a run
        // resumed from a checkpoint takes exactly the steps an uninterrupted one would. (A
        // ring re-formed mid-epoch draws afresh from where it starts.)
        self.device
            .seed(epoch_seed(self.config.seed, global_epoch, io.ring.rank).wrapping_add(work.consumed));
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
            0 => self.config.batch_size as usize * io.ring.world,
            n => n as usize,
        };
        let steps_plan = if cached && io.ring.world > 1 {
            self.steps_by_home(&sampler, state, global_batch, io.ring.world, io.ring.rank)
        } else {
            sampler.global_steps(state, global_batch, io.ring.world, io.ring.rank)
        };
        let weights: Vec<(usize, usize)> = steps_plan
            .iter()
            .map(|s| (s.indices.len(), s.step_total))
            .collect();
        let batch_list: Vec<Vec<usize>> = steps_plan
            .into_iter()
            .map(|s| s.indices.into_iter().map(|i| self.splits.train[i]).collect())
            .collect();
        let augment = Augment::of_run(&self.config);
        let pool = match phase {
            Phase::Head => self.config.head_variants,
            Phase::FineTune | Phase::Scratch => 8,
        };
        // Optimizer steps of this phase before this epoch's next one (the learning rate of a
        // decaying phase depends on it): whole epochs, then what earlier rings consumed.
        let phase_iterations = u64::from(work.epoch) * self.splits.train.len().div_ceil(global_batch) as u64
            + work.consumed / global_batch as u64;
        let loss_fn = CrossEntropyLossConfig::new().init(&self.device);
        let optimizer = self
            .optimizer
            .as_mut()
            .ok_or_else(|| cluster("no optimizer for this phase"))?;
        let mut model = loaded.model;
        // This epoch's loss and accuracy, and the last step's (a broken ring takes it back).
        let mut train: Option<DeviceTotals> = None;
        let mut last: Option<DeviceTotals> = None;
        let mut steps = 0u64;
        let transfers_before = self.transfers.snapshot();
        let mut broken: Option<String> = None;
        let mut prefetch = Prefetcher::spawn(self.dataset.clone(), batch_list, PREFETCH)
            .map_err(|e| cluster(format!("data loader: {e}")))?;
        let metrics = &beat.metrics;
        metrics.phase.set(i64::from(phase.number()));
        let session = beat.session.load(Ordering::Relaxed);
        let size = self.config.image_size as usize;
        let (config, device, transfers) = (&self.config, &input_device, &self.transfers);
        let train_device = &self.device;
        // The next batch with its variants and, without the cache, its input tensor. Run on
        // a second thread while the gradients are all-reduced, so that a step does not wait
        // for loading and preprocessing after the network.
        let rank = io.ring.rank;
        beat.watch.new_epoch();
        let prepare = |prefetch: &mut Prefetcher| -> Option<Result<Prepared>> {
            stall_loader_once(rank);
            let batch = prefetch.next()?;
            Some(
                batch
                    .map_err(|e| cluster(format!("dataset {}: {e}", config.data)))
                    .map(|batch| {
                        let variants: Vec<Variant> = batch
                            .indices
                            .iter()
                            .map(|&i| Variant::draw_pooled(augment, pool, config.seed, global_epoch, i))
                            .collect();
                        let input =
                            (!cached).then(|| to_input(transfers, &batch.samples, size, &variants, device));
                        let labels = labels(transfers, &batch.samples, train_device);
                        Prepared {
                            batch,
                            variants,
                            input,
                            labels,
                        }
                    }),
            )
        };
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
                    let next = prepare(&mut prefetch);
                    (next, waiting.elapsed().as_secs_f64())
                }
            };
            let Some(next) = next else { break };
            let step_started = Instant::now();
            metrics.data_wait_seconds.observe(waited);
            let Prepared {
                batch,
                variants,
                input,
                labels,
            } = next?;
            let make_input = || to_input(transfers, &batch.samples, size, &variants, device);
            let logits = match (cache.as_mut(), &frozen) {
                (Some(cache), Some(frozen)) => {
                    let features =
                        cached_head_input(transfers, cache, frozen, &batch, &variants, size, &inner)?;
                    model.head.forward(Tensor::from_inner(features))
                }
                (None, Some(frozen)) => {
                    let x = input.unwrap_or_else(make_input);
                    model.head.forward(Tensor::from_inner(frozen.head_input(x)))
                }
                _ => model.forward(input.unwrap_or_else(make_input)),
            };
            let loss = loss_fn.forward(logits.clone(), labels.clone());
            // Phase 1 trains the head alone, so its gradients, the all-reduce buffer and the
            // update are taken over the head: the same values (the frozen backbone has no
            // gradients), without Burn walking the backbone's 200-odd frozen tensors twice a
            // step, which was half of a cached head step on LibTorch.
            let head_only = frozen.is_some();
            let grads = match head_only {
                true => GradientsParams::from_grads(loss.backward(), &model.head),
                false => GradientsParams::from_grads(loss.backward(), &model),
            };
            // One copy to the host for all the gradients; it also waits for the backward pass.
            let mut flat = match head_only {
                true => flatten(&model.head, &grads, transfers)?,
                false => flatten(&model, &grads, transfers)?,
            };
            let (share, total) = weights[steps as usize];
            if share * io.ring.world != total {
                // Unequal shares (a ring that does not divide the global batch): weigh each
                // rank's mean gradient by its share, so the average is the global batch's mean.
                let scale = (share * io.ring.world) as f32 / total as f32;
                flat.iter_mut().for_each(|v| *v *= scale);
            }
            let global_step = work.first_step + steps;
            // One more value rides on the gradients: whether any rank was asked to stop for a
            // regroup. Every rank sees the same sum, so all stop after the same step.
            let asked = beat.regroup.load(Ordering::Relaxed) == io.ring.generation;
            flat.push(if asked { 1.0 } else { 0.0 });
            let reducing = io.seconds;
            let (reduced, prepared) = std::thread::scope(|scope| {
                let preparing = scope.spawn(|| prepare(&mut prefetch));
                let reduced = io.all_reduce(global_step, &mut flat, true);
                let waiting = Instant::now();
                let prepared = preparing
                    .join()
                    .unwrap_or_else(|_| Some(Err(cluster("preparing the next batch panicked"))));
                (reduced, (prepared, waiting.elapsed().as_secs_f64()))
            });
            ahead = Some(prepared);
            if let Err(e) = reduced {
                broken = Some(format!("step {global_step}: {e}"));
                break;
            }
            let regroup = flat.pop().is_some_and(|v| v > 0.0);
            metrics.allreduce_seconds.observe(io.seconds - reducing);
            metrics
                .allreduce_bytes
                .inc_by(collective::bytes_sent(&io.ring, flat.len()));
            let grads = match head_only {
                true => unflatten(&model.head, &grads, &flat, transfers),
                false => unflatten(&model, &grads, &flat, transfers),
            };
            // Burn's tensors share storage, so keeping the previous step copies nothing here;
            // its cost is that the update below writes new buffers instead of updating the
            // weights and moments in place (memory for one more copy of them).
            self.undo = Some(Undo {
                completed: global_step,
                model: model.clone(),
                optimizer: optimizer.clone(),
            });
            let lr = optim::learning_rate(config, phase, phase_iterations + steps);
            model = match head_only {
                true => {
                    let mut model = model;
                    model.head = optimizer.step(lr, model.head, grads);
                    model
                }
                false => optimizer.step(lr, model, grads),
            };
            steps += 1;
            self.completed = Some(global_step + 1);
            beat.step.store(global_step + 1, Ordering::Relaxed);
            let every = u64::from(self.config.checksum_every);
            if every > 0 && (global_step + 1).is_multiple_of(every) {
                let checksum = parameters_checksum(&model);
                if let Ok(mut pending) = beat.checksums.lock() {
                    pending.push((global_step + 1, checksum, io.ring.generation));
                }
            }
            let n = batch.samples.len();
            let this = DeviceTotals::step(&loss, &logits, &labels, n);
            train = Some(match train.take() {
                Some(sum) => sum.add(&this),
                None => this.clone(),
            });
            if steps.is_multiple_of(METRICS_READ_STEPS) {
                let now = this.read(transfers)?;
                metrics.train_loss.set(now.loss_sum / now.count.max(1) as f64);
            }
            last = Some(this);
            // The gradient copy above waited for the device, so this is the step's real time
            // (the update's kernels are queued, and overlap the next step's input).
            metrics.step_seconds.observe(step_started.elapsed().as_secs_f64());
            beat.watch.record_step(step_started.elapsed().as_secs_f64());
            metrics.steps.inc();
            metrics.train_images.inc_by(n as u64);
            if let Some(cache) = &cache {
                cache_seen = report_cache(metrics, cache.stats(), cache_seen);
            }
            let images = train.as_ref().map_or(0, |t| t.count);
            metrics
                .images_per_second
                .set(images as f64 / started.elapsed().as_secs_f64().max(1e-9));
            if regroup {
                broken = Some(format!("stopped after step {global_step} to admit new workers"));
                break;
            }
        }
        // A BatchNorm that trains (the tutorial head's, in phase 1) has seen only this rank's
        // batches: take rank 0's statistics, as PyTorch DDP broadcasts its buffers.
        let stats = match broken {
            Some(_) => None,
            None => match running_stats_from_rank0(&model, io, u64::MAX - 1 - global_epoch) {
                Ok(stats) => Some(stats),
                Err(e) => {
                    broken = Some(format!("sharing BatchNorm statistics: {e}"));
                    None
                }
            },
        };
        let train_seconds = started.elapsed().as_secs_f64();
        self.step_transfers = (steps, self.transfers.snapshot() - transfers_before);
        let (train, last) = (
            read_totals(train.as_ref(), &self.transfers)?,
            read_totals(last.as_ref(), &self.transfers)?,
        );
        if train.count > 0 {
            metrics.train_loss.set(train.loss_sum / train.count as f64);
        }
        if let Some(reason) = broken {
            drop(prefetch);
            self.cache = cache;
            loaded.model = model;
            self.model = Some(loaded);
            let completed = self.completed.unwrap_or(work.first_step);
            tracing::warn!(generation = io.ring.generation, completed_steps = completed, reason = %reason,
                "the ring broke; keeping this rank's state for the next ring");
            return Ok(EpochOutcome::Broken(v1::RingBroken {
                phase: work.phase,
                epoch: work.epoch,
                completed_steps: completed,
                train_loss_sum: train.loss_sum,
                train_correct: train.correct,
                train_count: train.count,
                last_loss_sum: last.loss_sum,
                last_correct: last.correct,
                last_count: last.count,
                reason,
                has_state: true,
            }));
        }
        let model = match stats {
            Some(stats) => write_running_stats(model, stats, &self.transfers)?,
            None => model,
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
            report_cache(metrics, cache_stats, cache_seen);
        }
        self.cache = cache;
        let test = if work.test {
            self.evaluate(&eval_model, &rank_slice(&self.splits.test), true)?
        } else {
            Totals::default()
        };
        metrics.eval_seconds.inc_by(evaluating.elapsed().as_secs_f64());
        loaded.model = model;
        let checksum = weights_checksum(&loaded.model.valid());
        self.model = Some(loaded);
        Ok(EpochOutcome::Done(EpochResult {
            phase: work.phase,
            epoch: work.epoch,
            steps,
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
            train_seconds,
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

/// The head's input for `batch` from `cache`, pairs not held computed by `frozen` (phase 1's
/// backbone in inference mode, on `device`). `variants` has one per sample, or is empty for
/// none (evaluation).
pub(super) fn cached_head_input(
    transfers: &Transfers,
    cache: &mut FeatureCache,
    frozen: &Classifier,
    batch: &dataset::loader::Batch,
    variants: &[Variant],
    size: usize,
    device: &Device,
) -> Result<Tensor<4>> {
    let keys: Vec<(usize, u8)> = batch
        .indices
        .iter()
        .enumerate()
        .map(|(p, &i)| (i, variants.get(p).map_or(0, |v| v.id())))
        .collect();
    cache.features(transfers, &keys, device, |missing| {
        let samples: Vec<Sample> = missing.iter().map(|&p| batch.samples[p].clone()).collect();
        let variants: Vec<Variant> = missing.iter().filter_map(|&p| variants.get(p).copied()).collect();
        Ok(frozen.head_input(to_input(transfers, &samples, size, &variants, device)))
    })
}

/// Tell `metrics` what the feature cache did since `seen`; returns `now` as the new mark.
fn report_cache(metrics: &WorkerMetrics, now: CacheStats, seen: CacheStats) -> CacheStats {
    metrics.cache_hits.inc_by(now.hits - seen.hits);
    metrics.cache_misses.inc_by(now.misses - seen.misses);
    metrics.cache_memory_bytes.set(now.memory_bytes as i64);
    metrics.cache_disk_bytes.set(now.disk_bytes as i64);
    now
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

pub(super) fn labels(transfers: &Transfers, samples: &[Sample], device: &Device) -> Tensor<1, Int> {
    let data: Vec<i64> = samples.iter().map(|s| i64::from(s.label)).collect();
    transfers.upload(TensorData::new(data, [samples.len()]), device)
}

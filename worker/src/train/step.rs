//! The parts of one training step: a batch made ready (on a second thread, during the last
//! step's all-reduce), this rank's forward and backward pass, and the gradient buffer the
//! ring averages. [`Trainer::epoch`](super::Trainer::epoch) strings them together.

use super::*;

/// A batch ready for a training step.
pub(super) struct Prepared {
    pub(super) batch: dataset::loader::Batch,
    /// The augmentation of each sample.
    pub(super) variants: Vec<Variant>,
    /// The model input, when made ahead (without the feature cache).
    pub(super) input: Option<Tensor<4>>,
    /// The batch's labels, on the training device.
    pub(super) labels: Tensor<1, Int>,
}

/// What every step of an epoch reads besides its batch.
pub(super) struct StepKit<'a> {
    pub(super) trainable: Trainable,
    /// Phase 1 runs the frozen backbone in inference mode on the plain device, outside the
    /// autodiff graph that only the head needs (phase 1 never changes the backbone, so one
    /// copy serves the epoch); it computes the cache's misses, or every batch without one.
    pub(super) frozen: Option<Classifier>,
    /// The frozen backbone's device.
    pub(super) inner: Device,
    /// Where a batch's input tensor is made: the frozen backbone's device in phase 1.
    pub(super) input_device: Device,
    pub(super) loss_fn: CrossEntropyLoss,
    pub(super) transfers: &'a Transfers,
    pub(super) size: usize,
}

/// One step on this rank, before the all-reduce.
pub(super) struct Local {
    pub(super) logits: Tensor<2>,
    pub(super) loss: Tensor<1>,
    pub(super) labels: Tensor<1, Int>,
    pub(super) grads: GradientsParams,
    /// `grads` in one host buffer, to be all-reduced.
    pub(super) flat: Vec<f32>,
}

/// How an epoch's batches are made ready.
#[derive(Debug, Clone, Copy)]
pub(super) struct Draws {
    pub(super) augment: Augment,
    /// How many symmetries an image's augmentation draws from.
    pub(super) pool: u8,
    /// Epochs counted across phases, so shuffles and augmentations never repeat.
    pub(super) global_epoch: u64,
    /// Whether the input tensor is made ahead, during the last step's all-reduce; not with
    /// the feature cache, whose misses are computed from the samples at the step.
    pub(super) input_ahead: bool,
}

/// Makes a step's batch ready: its augmentation variants, its labels and, without the
/// feature cache, its input tensor.
pub(super) struct Preparer<'a> {
    pub(super) config: &'a RunConfig,
    pub(super) transfers: &'a Transfers,
    /// Where the input tensor is made (see [`StepKit::input_device`]).
    pub(super) input_device: &'a Device,
    /// Where the labels go.
    pub(super) train_device: &'a Device,
    pub(super) draws: Draws,
    pub(super) size: usize,
    pub(super) rank: usize,
}

impl Preparer<'_> {
    /// The next batch of `prefetch`, ready; `None` after the epoch's last.
    pub(super) fn next(&self, prefetch: &mut Prefetcher) -> Option<Result<Prepared>> {
        stall_loader_once(self.rank);
        let batch = prefetch.next()?;
        let (config, transfers, draws) = (self.config, self.transfers, self.draws);
        Some(
            batch
                .map_err(|source| Error::data_read(&config.data, source))
                .map(|batch| {
                    let variants: Vec<Variant> = batch
                        .indices
                        .iter()
                        .map(|&i| {
                            Variant::draw_pooled(
                                draws.augment,
                                draws.pool,
                                config.seed,
                                draws.global_epoch,
                                i,
                            )
                        })
                        .collect();
                    let input = draws.input_ahead.then(|| {
                        to_input(transfers, &batch.samples, self.size, &variants, self.input_device)
                    });
                    let labels = labels(transfers, &batch.samples, self.train_device);
                    Prepared {
                        batch,
                        variants,
                        input,
                        labels,
                    }
                }),
        )
    }
}

/// The all-reduce of step `step`'s gradients in `flat`, with the next batch prepared on a
/// second thread meanwhile, so that a step does not wait for loading and preprocessing
/// after the network. Returns the all-reduce's outcome, and the next batch with the seconds
/// the step then waited for it.
pub(super) fn all_reduce_while_preparing<N: Link, P: Link>(
    io: &mut RingIo<'_, N, P>,
    step: u64,
    flat: &mut [f32],
    preparer: &Preparer<'_>,
    prefetch: &mut Prefetcher,
) -> (Result<()>, (Option<Result<Prepared>>, f64)) {
    std::thread::scope(|scope| {
        let preparing = scope.spawn(|| preparer.next(prefetch));
        let reduced = io.all_reduce(step, flat, true);
        let waiting = Instant::now();
        let prepared = preparing
            .join()
            .unwrap_or_else(|_| Some(Err(Error::Internal("preparing the next batch panicked".into()))));
        (reduced, (prepared, waiting.elapsed().as_secs_f64()))
    })
}

impl<'a> StepKit<'a> {
    /// The step kit of an epoch of `phase` training `model` on `device`.
    pub(super) fn new(
        phase: Phase,
        model: &Classifier,
        device: &Device,
        config: &RunConfig,
        transfers: &'a Transfers,
    ) -> Self {
        let trainable = Trainable::of(phase);
        let inner = device.clone().inner();
        StepKit {
            trainable,
            frozen: phase.backbone_frozen().then(|| model.valid()),
            input_device: match trainable {
                Trainable::Head => inner.clone(),
                Trainable::Whole => device.clone(),
            },
            inner,
            loss_fn: CrossEntropyLossConfig::new().init(device),
            transfers,
            size: config.image_size as usize,
        }
    }

    /// What makes batches ready as `draws` says on `rank`, with this kit's input device.
    pub(super) fn preparer<'b>(
        &'b self,
        config: &'b RunConfig,
        train_device: &'b Device,
        draws: Draws,
        rank: usize,
    ) -> Preparer<'b> {
        Preparer {
            config,
            transfers: self.transfers,
            input_device: &self.input_device,
            train_device,
            draws,
            size: self.size,
            rank,
        }
    }

    /// This rank's forward and backward pass over one batch.
    pub(super) fn local_gradients(
        &self,
        model: &Classifier,
        cache: Option<&mut FeatureCache>,
        prepared: Prepared,
    ) -> Result<Local> {
        let Prepared {
            batch,
            variants,
            input,
            labels,
        } = prepared;
        let (transfers, size) = (self.transfers, self.size);
        let make_input = || to_input(transfers, &batch.samples, size, &variants, &self.input_device);
        let logits = match (cache, &self.frozen) {
            (Some(cache), Some(frozen)) => {
                let features =
                    cached_head_input(transfers, cache, frozen, &batch, &variants, size, &self.inner)?;
                model.head.forward(Tensor::from_inner(features))
            }
            (None, Some(frozen)) => {
                let x = input.unwrap_or_else(make_input);
                model.head.forward(Tensor::from_inner(frozen.head_input(x)))
            }
            _ => model.forward(input.unwrap_or_else(make_input)),
        };
        let loss = self.loss_fn.forward(logits.clone(), labels.clone());
        let grads = self.trainable.gradients(&loss, model);
        let flat = self.trainable.flatten(model, &grads, transfers)?;
        Ok(Local {
            logits,
            loss,
            labels,
            grads,
            flat,
        })
    }
}

/// Make this rank's gradients in `flat` ready for the all-reduce of a step where it holds
/// `share` = (its examples, the step's examples over the ring of `world`), and append the
/// regroup flag.
pub(super) fn weigh_and_flag(flat: &mut Vec<f32>, share: (usize, usize), world: usize, asked: bool) {
    let (mine, total) = share;
    if mine * world != total {
        // Unequal shares (a ring that does not divide the global batch): weigh each rank's
        // mean gradient by its share, so the average is the global batch's mean.
        let scale = (mine * world) as f32 / total as f32;
        flat.iter_mut().for_each(|v| *v *= scale);
    }
    // One more value rides on the gradients: whether any rank was asked to stop for a
    // regroup. Every rank sees the same sum, so all stop after the same step.
    flat.push(if asked { 1.0 } else { 0.0 });
}

/// An epoch's loss and accuracy sums on the device, and the last step's (a broken ring takes
/// that step back).
#[derive(Default)]
pub(super) struct RunningSums {
    train: Option<DeviceTotals>,
    last: Option<DeviceTotals>,
}

impl RunningSums {
    /// Add step `steps`'s sums; every [`METRICS_READ_STEPS`] steps the running loss is read
    /// back for `metrics`.
    pub(super) fn add(
        &mut self,
        this: DeviceTotals,
        steps: u64,
        transfers: &Transfers,
        metrics: &WorkerMetrics,
    ) -> Result<()> {
        self.train = Some(DeviceTotals::sum(self.train.take(), &this));
        if steps.is_multiple_of(METRICS_READ_STEPS) {
            let now = this.read(transfers)?;
            metrics.train_loss.set(now.loss_sum / now.count.max(1) as f64);
        }
        self.last = Some(this);
        Ok(())
    }

    /// Images summed so far.
    pub(super) fn images(&self) -> u64 {
        self.train.as_ref().map_or(0, |t| t.count)
    }

    /// The epoch's sums and the last step's, read back.
    pub(super) fn read(&self, transfers: &Transfers) -> Result<(Totals, Totals)> {
        Ok((
            read_totals(self.train.as_ref(), transfers)?,
            read_totals(self.last.as_ref(), transfers)?,
        ))
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

/// `samples`' labels as a tensor on `device`.
pub(super) fn labels(transfers: &Transfers, samples: &[Sample], device: &Device) -> Tensor<1, Int> {
    let data: Vec<i64> = samples.iter().map(|s| i64::from(s.label)).collect();
    transfers.upload(TensorData::new(data, [samples.len()]), device)
}

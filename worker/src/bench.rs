//! Throughput measurements: the model's inference and training steps per phase, and the
//! input pipeline.

use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

use crate::error::Result;
use crate::grads::{flatten, unflatten};
use crate::transfer::{TransferCounts, Transfers};
use effnet::config::EfficientNetConfig;
use effnet::model::Classifier;
use effnet::phase::{self, Phase};

/// Median images per second of one measured operation, and its host-device copies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    /// Median over the measured iterations.
    pub images_per_sec: f64,
    /// Median seconds per iteration.
    pub secs_per_iter: f64,
    /// Median seconds per iteration spent copying between host and device (the device is
    /// synchronised first, so this is the copies alone, not the compute they would wait for).
    pub transfer_secs_per_iter: f64,
    /// Copies to the host per iteration.
    pub downloads_per_iter: u64,
    /// Copies to the device per iteration.
    pub uploads_per_iter: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run `op` `warmup` times untimed, then `iters` times timed; the median gives the rate.
/// `op` returns the copies it made.
fn measure(
    batch: usize,
    warmup: usize,
    iters: usize,
    mut op: impl FnMut() -> Result<TransferCounts>,
) -> Result<Throughput> {
    for _ in 0..warmup {
        op()?;
    }
    let mut times = Vec::new();
    let mut copies = Vec::new();
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        copies.push(op()?);
        times.push(start.elapsed().as_secs_f64());
    }
    let secs = median(times);
    let last = copies.last().copied().unwrap_or_default();
    Ok(Throughput {
        images_per_sec: batch as f64 / secs,
        secs_per_iter: secs,
        transfer_secs_per_iter: median(copies.iter().map(|c| c.seconds).collect()),
        downloads_per_iter: last.downloads,
        uploads_per_iter: last.uploads,
    })
}

/// Wait for queued work, so that a copy timed after it is the copy alone.
fn sync(device: &Device) -> Result<()> {
    device
        .sync()
        .map_err(|e| crate::Error::Transfer(format!("waiting for the device: {e:?}")))
}

/// What a model benchmark measures, per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// A forward pass in inference mode.
    Inference,
    /// Forward, cross-entropy, backward and an Adam update of every parameter (ImageNet top).
    FullStep,
    /// Phase 1 without the feature cache: the frozen backbone in inference mode, then a new
    /// 10-class linear head trained.
    HeadStep,
    /// Phase 1 from cached features: the head's step alone.
    CachedHeadStep,
    /// Phase 2: everything trained except BatchNorm (running statistics used, not updated).
    FineTuneStep,
}

impl Workload {
    /// Every workload, in table order.
    pub const ALL: [Workload; 5] = [
        Workload::Inference,
        Workload::FullStep,
        Workload::HeadStep,
        Workload::CachedHeadStep,
        Workload::FineTuneStep,
    ];

    /// The name used in tables and by the PyTorch script.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Inference => "infer",
            Workload::FullStep => "train",
            Workload::HeadStep => "phase1",
            Workload::CachedHeadStep => "phase1_cached",
            Workload::FineTuneStep => "phase2",
        }
    }

    /// A description for tables.
    pub fn describe(self) -> &'static str {
        match self {
            Workload::Inference => "inference",
            Workload::FullStep => "full training step",
            Workload::HeadStep => "phase 1 step, no cache",
            Workload::CachedHeadStep => "phase 1 step, cached features",
            Workload::FineTuneStep => "phase 2 step (BN frozen)",
        }
    }
}

/// Classes of the transfer-learning head in the phase workloads (CIFAR-10's).
const TRANSFER_CLASSES: usize = 10;

/// Throughput of `workload` on `batch` random images of `size` pixels: `warmup` untimed
/// iterations, then the median of `iters` timed ones. A training step is what a worker does
/// per step apart from the all-reduce: forward, loss, backward, the gradients copied to the
/// host in one buffer and back, and an Adam update.
pub fn model(
    cfg: &EfficientNetConfig,
    workload: Workload,
    batch: usize,
    size: usize,
    warmup: usize,
    iters: usize,
    device: &Device,
) -> Result<Throughput> {
    let inner = device.clone().inner();
    let transfers = Transfers::default();
    if workload == Workload::Inference {
        let model = Classifier::new(cfg, 1000, &inner);
        let x = Tensor::<4>::random([batch, 3, size, size], Distribution::Uniform(0.0, 255.0), &inner);
        return measure(batch, warmup, iters, || {
            let logits = model.forward(x.clone());
            sync(&inner)?;
            let before = transfers.snapshot();
            // Reading the result is what a caller of inference does.
            transfers.download(logits)?;
            Ok(transfers.snapshot() - before)
        });
    }
    let device = device.clone().autodiff();
    let model = Classifier::new(cfg, 1000, &device);
    let phase = match workload {
        Workload::FullStep => None,
        Workload::FineTuneStep => Some(Phase::FineTune),
        _ => Some(Phase::Head),
    };
    let (model, classes) = match phase {
        None => (model, 1000),
        Some(phase) => (
            phase::prepare(model.with_new_head(TRANSFER_CLASSES, cfg.dropout, &device), phase),
            TRANSFER_CLASSES,
        ),
    };
    let x = Tensor::<4>::random([batch, 3, size, size], Distribution::Uniform(0.0, 255.0), &device);
    // Phase 1 runs the frozen backbone outside the autodiff graph, as the trainer does;
    // with the cache, its output for this batch is simply there.
    let frozen = matches!(workload, Workload::HeadStep | Workload::CachedHeadStep).then(|| model.valid());
    let features = |frozen: &Classifier| Tensor::from_inner(frozen.head_input(x.clone().inner()));
    let cached = match (&frozen, workload) {
        (Some(frozen), Workload::CachedHeadStep) => Some(features(frozen)),
        _ => None,
    };
    let labels: Vec<i64> = (0..batch as i64).map(|i| (i * 37) % classes as i64).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), &device);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut optim = AdamConfig::new().init();
    // Taken out and put back each step: the optimizer consumes the model.
    let mut model = Some(model);
    measure(batch, warmup, iters, || {
        let Some(m) = model.take() else {
            return Ok(TransferCounts::default());
        };
        let logits = match (&cached, &frozen) {
            (Some(cached), _) => m.head.forward(cached.clone()),
            (None, Some(frozen)) => m.head.forward(features(frozen)),
            (None, None) => m.forward(x.clone()),
        };
        let loss = loss_fn.forward(logits, y.clone());
        // Phase 1 updates the head alone, as the trainer does; the gradients go to the host
        // and back as they do around the all-reduce.
        let before;
        model = Some(match frozen {
            Some(_) => {
                let grads = GradientsParams::from_grads(loss.backward(), &m.head);
                sync(&inner)?;
                before = transfers.snapshot();
                let flat = flatten(&m.head, &grads, &transfers)?;
                let grads = unflatten(&m.head, &grads, &flat, &transfers);
                let mut m = m;
                m.head = optim.step(1e-4, m.head, grads);
                m
            }
            None => {
                let grads = GradientsParams::from_grads(loss.backward(), &m);
                sync(&inner)?;
                before = transfers.snapshot();
                let flat = flatten(&m, &grads, &transfers)?;
                let grads = unflatten(&m, &grads, &flat, &transfers);
                optim.step(1e-4, m, grads)
            }
        });
        let copies = transfers.snapshot() - before;
        // The update is queued; wait for it so that the step is timed whole.
        sync(&inner)?;
        Ok(copies)
    })
}

/// What a worker adds around the all-reduce each step: the gradients of every parameter of
/// `cfg`'s model copied into one buffer and back into tensors. Returns the number of values and
/// the median seconds of `iters` round trips.
pub fn gradient_copies(cfg: &EfficientNetConfig, iters: usize, device: &Device) -> Result<(usize, f64)> {
    let transfers = Transfers::default();
    let device = device.clone().autodiff();
    let model = Classifier::new(cfg, 1000, &device);
    // The gradients' size does not depend on the input's: a small one is enough.
    let x = Tensor::<4>::random([2, 3, 64, 64], Distribution::Uniform(0.0, 255.0), &device);
    let grads = GradientsParams::from_grads(model.forward(x).sum().backward(), &model);
    let mut len = 0;
    let mut times = Vec::new();
    for _ in 0..iters.max(1) {
        sync(&device)?;
        let start = Instant::now();
        let flat = flatten(&model, &grads, &transfers)?;
        len = flat.len();
        let back = unflatten(&model, &grads, &flat, &transfers);
        drop(back);
        sync(&device)?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok((len, median(times)))
}

/// Images per epoch of CIFAR-10's official training split (50,000 less 10% validation).
pub const CIFAR10_TRAIN_IMAGES: usize = 45_000;

/// Throughput of the input pipeline, in images per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PipelineThroughput {
    /// Reading and decoding on the prefetch thread alone.
    pub read_decode: f64,
    /// Reading, decoding, uploading, resizing and augmenting, as training consumes it.
    pub full: f64,
}

/// Measure the input pipeline over the first `images` training samples of `dataset`.
pub fn data_pipeline(
    dataset: std::sync::Arc<dataset::source::Dataset>,
    images: usize,
    batch: usize,
    size: usize,
    augment: crate::augment::Augment,
    device: &Device,
) -> Result<PipelineThroughput> {
    use crate::augment::{Variant, to_input};
    use dataset::loader::{Prefetcher, batches};
    let indices: Vec<usize> = dataset.train.iter().copied().take(images).collect();
    let plan = batches(&indices, batch);
    let start = Instant::now();
    let mut n = 0;
    for b in Prefetcher::spawn(dataset.clone(), plan.clone(), 4)? {
        n += b?.samples.len();
    }
    let read_decode = n as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for b in Prefetcher::spawn(dataset, plan, 4)? {
        let b = b?;
        let variants: Vec<Variant> = b
            .indices
            .iter()
            .map(|&i| Variant::draw(augment, 0, 0, i))
            .collect();
        let x = to_input(&Transfers::default(), &b.samples, size, &variants, device);
        // The resize and augmentation kernels are queued: wait for them.
        drop(x);
        sync(device)?;
    }
    Ok(PipelineThroughput {
        read_decode,
        full: n as f64 / start.elapsed().as_secs_f64(),
    })
}

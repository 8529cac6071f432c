//! Model throughput measurements: inference and a full training step.

use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

use crate::config::EfficientNetConfig;
use crate::model::Classifier;

/// Median images per second of one measured operation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    /// Median over the measured iterations.
    pub images_per_sec: f64,
    /// Median seconds per iteration.
    pub secs_per_iter: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run `op` `warmup` times untimed, then `iters` times timed; the median gives the rate.
fn measure(batch: usize, warmup: usize, iters: usize, mut op: impl FnMut()) -> Throughput {
    for _ in 0..warmup {
        op();
    }
    let times: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let start = Instant::now();
            op();
            start.elapsed().as_secs_f64()
        })
        .collect();
    let secs = median(times);
    Throughput {
        images_per_sec: batch as f64 / secs,
        secs_per_iter: secs,
    }
}

/// Inference throughput: `warmup` untimed then `iters` timed forward passes of `batch`
/// random images of `size` pixels.
pub fn inference(
    cfg: &EfficientNetConfig,
    batch: usize,
    size: usize,
    warmup: usize,
    iters: usize,
    device: &Device,
) -> Throughput {
    let model = Classifier::new(cfg, 1000, device).valid();
    let device = device.clone().inner();
    let x = Tensor::<4>::random([batch, 3, size, size], Distribution::Uniform(0.0, 255.0), &device);
    measure(batch, warmup, iters, || {
        // Reading the result forces the (possibly asynchronous) computation to finish.
        let _ = model.forward(x.clone()).into_data();
    })
}

/// Training-step throughput: forward, cross-entropy, backward and an Adam update.
pub fn train_step(
    cfg: &EfficientNetConfig,
    batch: usize,
    size: usize,
    warmup: usize,
    iters: usize,
    device: &Device,
) -> Throughput {
    let device = device.clone().autodiff();
    // Taken out and put back each step: the optimizer consumes the model.
    let mut model = Some(Classifier::new(cfg, 1000, &device));
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let x = Tensor::<4>::random([batch, 3, size, size], Distribution::Uniform(0.0, 255.0), &device);
    let labels: Vec<i64> = (0..batch as i64).map(|i| (i * 37) % 1000).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), &device);
    measure(batch, warmup, iters, || {
        let Some(m) = model.take() else { return };
        let loss = loss_fn.forward(m.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        model = Some(optim.step(1e-4, m, grads));
        let _ = loss.into_data();
    })
}

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
) -> dataset::Result<PipelineThroughput> {
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
        let x = to_input(&b.samples, size, &variants, device);
        // Reading the data back waits for the device to finish.
        let _ = x.narrow(0, 0, 1).into_data();
    }
    Ok(PipelineThroughput {
        read_decode,
        full: n as f64 / start.elapsed().as_secs_f64(),
    })
}

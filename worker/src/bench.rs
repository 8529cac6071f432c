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

fn throughput(batch: usize, times: Vec<f64>) -> Throughput {
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
    let mut times = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let start = Instant::now();
        let logits = model.forward(x.clone());
        // Reading the result forces the (possibly asynchronous) computation to finish.
        let _ = logits.into_data();
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    throughput(batch, times)
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
    let mut model = Classifier::new(cfg, 1000, &device);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let x = Tensor::<4>::random([batch, 3, size, size], Distribution::Uniform(0.0, 255.0), &device);
    let labels: Vec<i64> = (0..batch as i64).map(|i| (i * 37) % 1000).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), &device);
    let mut times = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let start = Instant::now();
        let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-4, model, grads);
        let _ = loss.into_data();
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    throughput(batch, times)
}

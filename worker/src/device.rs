//! Choosing the compute device.

use burn::tensor::Device;

use crate::error::{Error, Result};

/// Whether this build can run on CUDA GPUs.
pub const CUDA_ENABLED: bool = cfg!(feature = "cuda");

/// Whether this build carries Burn's LibTorch backend (`--cpu-backend libtorch`).
pub const LIBTORCH_ENABLED: bool = cfg!(feature = "libtorch");

/// Which Burn backend runs the model when there is no GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuBackend {
    /// Burn's own CPU backend: pure Rust, always built in.
    #[default]
    Flex,
    /// PyTorch's CPU kernels (oneDNN convolutions, vectorised element-wise ops) through Burn's
    /// LibTorch backend; 1.5-3.5x Flex's speed on EfficientNet (docs/benchmarks.md).
    Libtorch,
}

impl CpuBackend {
    /// The name `--cpu-backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            CpuBackend::Flex => "flex",
            CpuBackend::Libtorch => "libtorch",
        }
    }
}

/// The device for `--gpu N`, or the CPU through `cpu` when `gpu` is `None`.
pub fn select(gpu: Option<usize>, cpu: CpuBackend) -> Result<Device> {
    match (gpu, cpu) {
        (None, CpuBackend::Flex) => Ok(Device::flex()),
        (None, CpuBackend::Libtorch) => libtorch(),
        (Some(index), _) => cuda(index),
    }
}

/// How the device is named in logs, status and reports: `cpu`, `cpu-libtorch` or `cuda:N`.
pub fn describe(gpu: Option<usize>, cpu: CpuBackend) -> String {
    match (gpu, cpu) {
        (Some(index), _) => format!("cuda:{index}"),
        (None, CpuBackend::Flex) => "cpu".into(),
        (None, backend) => format!("cpu-{}", backend.name()),
    }
}

#[cfg(feature = "libtorch")]
// Burn 0.22 marks burn-tch deprecated in favour of its CubeCL CPU backend, whose build needs
// an LLVM download; on the pinned 0.22 line LibTorch stays available and is the fast one.
#[allow(deprecated)]
fn libtorch() -> Result<Device> {
    Ok(Device::libtorch())
}

#[cfg(not(feature = "libtorch"))]
fn libtorch() -> Result<Device> {
    Err(Error::Device(
        "--cpu-backend libtorch requested, but this worker binary was built without it; \
         rebuild with `LIBTORCH=<libtorch dir> cargo build --release -p worker --features libtorch` \
         (see the README), or use --cpu-backend flex"
            .into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device> {
    let count = cuda_device_count();
    if index >= count {
        return Err(Error::Device(format!(
            "--gpu {index} requested but {count} CUDA device(s) are visible; \
             check CUDA_VISIBLE_DEVICES and nvidia-smi"
        )));
    }
    Ok(Device::cuda(index))
}

#[cfg(feature = "cuda")]
fn cuda_device_count() -> usize {
    // The driver lists one directory per GPU; this avoids initialising a CUDA context (which
    // panics inside the backend when the device does not exist) just to count devices.
    std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|entries| entries.count())
        .unwrap_or(0)
}

#[cfg(not(feature = "cuda"))]
fn cuda(index: usize) -> Result<Device> {
    Err(Error::Device(format!(
        "--gpu {index} requested, but this worker binary was built without CUDA support; \
         rebuild with `cargo build --release -p worker --features cuda`, or pass --cpu"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available() {
        assert!(select(None, CpuBackend::Flex).is_ok());
        assert_eq!(describe(None, CpuBackend::Flex), "cpu");
        assert_eq!(describe(None, CpuBackend::Libtorch), "cpu-libtorch");
        assert_eq!(describe(Some(3), CpuBackend::Libtorch), "cuda:3");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn gpu_without_cuda_build_says_how_to_fix_it() {
        let err = select(Some(0), CpuBackend::Flex).unwrap_err().to_string();
        assert!(err.contains("without CUDA support"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[cfg(not(feature = "libtorch"))]
    #[test]
    fn libtorch_without_the_feature_says_how_to_fix_it() {
        let err = select(None, CpuBackend::Libtorch).unwrap_err().to_string();
        assert!(err.contains("built without it"), "{err}");
        assert!(err.contains("--features libtorch"), "{err}");
        assert!(err.contains("--cpu-backend flex"), "{err}");
    }

    /// The LibTorch backend must train the same network: one BatchNorm-training step of a
    /// scaled-down EfficientNet on both backends from the same weights and images gives the
    /// same logits, loss, gradients, updated weights and BatchNorm statistics (the inference
    /// output after the step), up to float summation order.
    #[cfg(feature = "libtorch")]
    #[test]
    fn libtorch_computes_what_flex_computes() {
        use burn::module::Module;
        use burn::nn::loss::CrossEntropyLossConfig;
        use burn::optim::{AdamConfig, GradientsParams};
        use burn::tensor::{Distribution, Int, Tensor, TensorData};

        use crate::config::{EfficientNetConfig, Padding};
        use crate::grads::flatten;
        use crate::model::Classifier;

        let flex = Device::flex().autodiff();
        let torch = select(None, CpuBackend::Libtorch).unwrap().autodiff();
        flex.seed(7);
        // No dropout or stochastic depth: their masks come from each backend's own generator.
        // Symmetric padding, and TF-style "same", which pads unevenly at stride 2 (crate::native
        // pads those inputs itself before PyTorch's convolution).
        for padding in [Padding::Symmetric, Padding::TfSame] {
            let mut cfg = EfficientNetConfig::b(0)
                .unwrap()
                .with_width(0.5)
                .with_depth(0.5)
                .with_dropout(0.0)
                .with_stochastic_depth(0.0);
            cfg.padding = padding;
            let model = Classifier::new(&cfg, 10, &flex);
            // A model of its own, loaded with the same values: a clone would share the BatchNorm
            // running statistics (RunningState is shared between clones) and see both updates.
            let twin = Classifier::new(&cfg, 10, &torch).load_record(model.clone().into_record());
            let x = Tensor::<4>::random([4, 3, 48, 48], Distribution::Uniform(0.0, 255.0), &flex);
            let labels = TensorData::new(vec![0i64, 3, 7, 9], [4]);

            let step = |model: Classifier, device: &Device| {
                let y = Tensor::<1, Int>::from_data(labels.clone(), device);
                let logits = model.forward(x.clone().to_device(device));
                let loss = CrossEntropyLossConfig::new()
                    .init(device)
                    .forward(logits.clone(), y);
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                let flat = flatten(&model, &grads);
                let updated = AdamConfig::new().init().step(1e-3, model, grads);
                // Inference after the update checks the new weights and BatchNorm statistics.
                let after = updated.valid().forward(x.clone().to_device(device).inner());
                let logits: Vec<f32> = logits.into_data().try_to_vec::<f32>().unwrap();
                let loss: Vec<f32> = loss.into_data().try_to_vec::<f32>().unwrap();
                let after: Vec<f32> = after.into_data().try_to_vec::<f32>().unwrap();
                (logits, loss[0], flat, after)
            };
            let (logits_a, loss_a, grads_a, after_a) = step(model, &flex);
            let (logits_b, loss_b, grads_b, after_b) = step(twin, &torch);

            let largest = |a: &[f32], b: &[f32]| {
                assert_eq!(a.len(), b.len());
                a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max)
            };
            let scale = |a: &[f32]| a.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            assert!(
                largest(&logits_a, &logits_b) <= 1e-3 * scale(&logits_a).max(1.0),
                "logits differ by {}: {logits_a:?} vs {logits_b:?}",
                largest(&logits_a, &logits_b)
            );
            assert!((loss_a - loss_b).abs() <= 1e-4, "loss {loss_a} vs {loss_b}");
            assert!(grads_a.len() > 100_000, "{} gradients", grads_a.len());
            assert!(
                largest(&grads_a, &grads_b) <= 1e-3 * scale(&grads_a),
                "gradients differ by {} (largest {})",
                largest(&grads_a, &grads_b),
                scale(&grads_a)
            );
            assert!(
                largest(&after_a, &after_b) <= 1e-3 * scale(&after_a).max(1.0),
                "logits after the update differ by {} (largest {}): {after_a:?} vs {after_b:?}",
                largest(&after_a, &after_b),
                scale(&after_a)
            );
        }
    }
}

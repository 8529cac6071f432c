//! Operations that Burn builds out of several kernels, run as one kernel each way on the CPU:
//! PyTorch's own on the LibTorch backend (`--cpu-backend libtorch`, the `libtorch` feature),
//! `cpu-kernels`' fused loops on flex (the default CPU backend); on the GPU backends they are
//! Burn's.
//!
//! Burn's LibTorch backend maps Burn's primitive ops one to one onto PyTorch's, so anything
//! Burn composes stays composed there: a convolution's backward pass is Burn's generic one (a
//! grouped convolution's weight gradient is one small convolution per group, 1,152 of them in
//! B0's widest depthwise layer, where PyTorch runs one oneDNN kernel), SiLU is a sigmoid and a
//! product with a temporary each way, and a training BatchNorm is a dozen passes. These three
//! are EfficientNet's hot spots; here they go to `aten::convolution_backward`, `aten::silu`
//! and `aten::native_batch_norm`, through a Burn backend extension with hand-written
//! backward passes (Burn's autodiff records them as one operation each).
//!
//! On flex (`flex.rs`) the same idea covers what flex's profile names: SiLU (flex runs a
//! scalar `exp` per element and a temporary each way), depthwise and 1x1 convolutions (flex's
//! backward passes go through its generic convolution with transposes around it), and
//! squeeze-excitation's pooling and gate, and training BatchNorm. `EFFNET_CPU_KERNELS=burn` in the environment, or
//! [`with_burn_ops`] in code, runs Burn's own ops instead (to compare, or to rule the kernels
//! out).

use std::cell::Cell;
use std::sync::OnceLock;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, ExtensionType};
use burn::tensor::ops::ConvOptions;
#[cfg(feature = "libtorch")]
use burn::tensor::ops::PadMode;
use burn::tensor::{Tensor, activation, module};

mod flex;
#[cfg(test)]
mod flex_tests;
#[cfg(feature = "libtorch")]
mod torch;

/// What the extensions' training BatchNorm returns (both extensions' `Dispatch` code maps it).
#[derive(ExtensionType)]
pub struct BatchNormTrain<B: Backend> {
    /// The normalised input.
    pub output: FloatTensor<B>,
    /// Batch mean per channel.
    pub mean: FloatTensor<B>,
    /// Batch (biased) variance per channel.
    pub variance: FloatTensor<B>,
}

thread_local! {
    static BURN_OPS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with Burn's own operations on flex instead of the fused kernels, on this thread
/// (what an operation records for its backward pass is decided in the forward pass, so the
/// backward of a graph built inside `f` is Burn's too).
pub fn with_burn_ops<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the setting back even if `f` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            BURN_OPS.set(self.0);
        }
    }
    let _restore = Restore(BURN_OPS.replace(true));
    f()
}

/// The layer's bias, or zeros (the extensions' ops take one either way).
fn bias_or_zeros(bias: Option<Tensor<1>>, weight: &Tensor<4>) -> Tensor<1> {
    let [out, ..] = weight.dims();
    bias.unwrap_or_else(|| Tensor::zeros([out], &weight.device()))
}

/// Whether the fused kernels run for `x`: on flex, in f32, unless switched off.
fn kernels_for<const D: usize>(x: &Tensor<D>) -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("EFFNET_CPU_KERNELS").is_ok_and(|v| v == "burn"));
    !off && !BURN_OPS.get() && flex::runs(x)
}

/// A 2-d convolution (Burn's `conv2d`), with PyTorch's backward pass on LibTorch, and the
/// fused kernels on flex for depthwise and 1x1 convolutions.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    #[cfg(feature = "libtorch")]
    if torch::runs(&x) {
        // PyTorch pads symmetrically only. TF-style "same" at stride 2 pads one more row and
        // column after than before: pad the input here (Burn's pad, whose backward is a
        // slice) and convolve it unpadded, as burn-tch's forward does.
        let (x, options) = if options.is_asymmetric() {
            let padded = x.pad(options.padding, PadMode::Constant(0.0));
            (
                padded,
                ConvOptions::new(options.stride, [0, 0], options.dilation, options.groups),
            )
        } else {
            (x, options)
        };
        return torch::conv2d(x, weight, bias, options);
    }
    if kernels_for(&x) && flex::Conv::of(x.dims(), weight.dims(), &options).is_some() {
        return flex::conv2d(x, weight, bias, options);
    }
    module::conv2d(x, weight, bias, options)
}

/// [`conv2d`] followed by SiLU: on flex, where nothing is tracked (inference, the frozen
/// backbone), the convolution applies SiLU to its output before storing it, saving a pass over
/// the activation.
pub fn conv2d_silu(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    if kernels_for(&x) && flex::Conv::of(x.dims(), weight.dims(), &options).is_some() {
        return flex::conv2d_silu(x, weight, bias, options);
    }
    silu(conv2d(x, weight, bias, options))
}

/// SiLU (`x * sigmoid(x)`), one kernel each way on LibTorch and flex.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "libtorch")]
    if torch::runs(&x) {
        return torch::silu(x);
    }
    if kernels_for(&x) {
        return flex::silu(x);
    }
    activation::silu(x)
}

/// The mean of each `(b, c)` plane of `[b, c, h, w]`, as `[b, c, 1, 1]` (global average
/// pooling).
pub fn plane_means(x: Tensor<4>) -> Tensor<4> {
    if kernels_for(&x) {
        return flex::plane_means(x);
    }
    x.mean_dim(3).mean_dim(2)
}

/// Squeeze-excitation's gate: `x * sigmoid(gate)`, with `gate` `[b, c, 1, 1]` scaling each
/// plane of `x`.
pub fn gate(x: Tensor<4>, gate: Tensor<4>) -> Tensor<4> {
    if kernels_for(&x) {
        return flex::gate(x, gate);
    }
    x * activation::sigmoid(gate)
}

/// BatchNorm over the batch's own statistics: the normalised output, and the batch mean and
/// biased variance per channel (what the running statistics are fed). Burn's
/// `batch_norm_train`, PyTorch's fused kernels on LibTorch, `cpu-kernels`' on flex.
pub fn batch_norm_train(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    #[cfg(feature = "libtorch")]
    if torch::runs(&x) {
        return torch::batch_norm_train(x, gamma, beta, epsilon);
    }
    if kernels_for(&x) {
        return flex::batch_norm_train(x, gamma, beta, epsilon);
    }
    let result = module::batch_norm_train(x, gamma, beta, epsilon);
    (result.output, result.mean, result.variance)
}

/// What the tests of both extensions compare with.
#[cfg(test)]
pub(crate) mod testing {
    use burn::tensor::{Device, Distribution, Tensor, module};

    fn values<const D: usize>(x: Tensor<D>) -> Vec<f32> {
        x.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// Largest difference relative to the largest magnitude in `expected`.
    pub fn relative_error<const D: usize>(found: Tensor<D>, expected: Tensor<D>) -> f32 {
        assert_eq!(found.dims(), expected.dims());
        let (found, expected) = (values(found), values(expected));
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "all zeros: the comparison would prove nothing");
        let diff = found
            .iter()
            .zip(&expected)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        diff / scale
    }

    /// [`super::batch_norm_train`] on `device` (an autodiff device) against Burn's own op:
    /// output, statistics and the three gradients.
    pub fn batch_norm_matches_burns(device: &Device, seed: u64) {
        device.seed(seed);
        let data = Tensor::<4>::random([4, 6, 5, 7], Distribution::Normal(2.0, 3.0), device);
        let gamma = Tensor::<1>::random([6], Distribution::Uniform(0.5, 2.0), device);
        let beta = Tensor::<1>::random([6], Distribution::Uniform(-1.0, 1.0), device);
        let run = |fused: bool| {
            let (x, g, b) = (leaf(&data), leaf(&gamma), leaf(&beta));
            let (y, mean, variance) = if fused {
                super::batch_norm_train(x.clone(), g.clone(), b.clone(), 1e-3)
            } else {
                let r = module::batch_norm_train(x.clone(), g.clone(), b.clone(), 1e-3);
                (r.output, r.mean, r.variance)
            };
            let grads = (y.clone() * y.clone().cos()).sum().backward();
            let grads = [
                x.grad(&grads).unwrap().reshape([-1]),
                g.grad(&grads).unwrap(),
                b.grad(&grads).unwrap(),
            ];
            (y, mean, variance, grads)
        };
        let (y, mean, variance, grads) = run(true);
        let (y_ref, mean_ref, variance_ref, grads_ref) = run(false);
        assert!(relative_error(y.inner(), y_ref.inner()) < 1e-5, "output");
        assert!(relative_error(mean.inner(), mean_ref.inner()) < 1e-5, "mean");
        assert!(
            relative_error(variance.inner(), variance_ref.inner()) < 1e-4,
            "variance"
        );
        for (name, (found, expected)) in ["input", "gamma", "beta"]
            .iter()
            .zip(grads.into_iter().zip(grads_ref))
        {
            assert!(relative_error(found, expected) < 1e-4, "{name} gradient");
        }
    }

    /// The same values on the same device, tracked.
    pub fn leaf<const D: usize>(data: &Tensor<D>) -> Tensor<D> {
        Tensor::from_data(data.to_data(), &data.device()).require_grad()
    }
}

//! The LibTorch side of [`super`]: a Burn backend extension whose operations are PyTorch's
//! kernels, with hand-written backward passes that call PyTorch's backward kernels.
// burn-tch is deprecated in Burn 0.22 (see device.rs); on the pinned line it is the fast CPU one.
#![allow(deprecated)]

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::TchTensor;
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, DispatchDevice, LibTorch, backend_extension};
use burn::tensor::Tensor;
use burn::tensor::ops::ConvOptions;

use super::BatchNormTrain;

/// Whether `x` lives on the LibTorch backend (with or without autodiff).
pub fn runs<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(x.device().inner().as_dispatch(), DispatchDevice::LibTorch(_))
}

/// The operations this module routes to PyTorch.
#[backend_extension(LibTorch, Autodiff)]
pub trait AtenOps: Backend {
    /// A convolution; `bias` is zeros where the layer has none.
    fn aten_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;
    /// SiLU.
    fn aten_silu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// BatchNorm with the batch's statistics.
    fn aten_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> BatchNormTrain<Self>;
}

impl AtenOps for LibTorch {
    fn aten_conv2d(x: TchTensor, weight: TchTensor, bias: TchTensor, options: ConvOptions<2>) -> TchTensor {
        LibTorch::conv2d(x, weight, Some(bias), options)
    }

    fn aten_silu(x: TchTensor) -> TchTensor {
        TchTensor::new(x.tensor.silu())
    }

    fn aten_batch_norm_train(
        x: TchTensor,
        gamma: TchTensor,
        beta: TchTensor,
        epsilon: f64,
    ) -> BatchNormTrain<Self> {
        let forward = aten::batch_norm_train(&x, &gamma, &beta, epsilon);
        BatchNormTrain {
            output: forward.output,
            mean: forward.mean,
            variance: forward.variance,
        }
    }
}

impl<C: CheckpointStrategy> AtenOps for Autodiff<LibTorch, C> {
    fn aten_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Conv2dBackward;

        impl Backward<LibTorch, 3> for Conv2dBackward {
            type State = (TchTensor, TchTensor, ConvOptions<2>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<LibTorch>(&ops.node);
                let (x, weight, options) = ops.state;
                let nodes = ops.parents.map(|node| node.map(|node| node.id));
                register(grads, nodes, |wanted| {
                    aten::conv2d_backward(&grad, &x, &weight, &options, wanted)
                });
            }
        }

        let nodes = [x.node(), weight.node(), bias.node()];
        let (x, weight, bias) = (x.into_primitive(), weight.into_primitive(), bias.into_primitive());
        match Conv2dBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = LibTorch::aten_conv2d(x.clone(), weight.clone(), bias, options.clone());
                prep.finish((x, weight, options), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(LibTorch::aten_conv2d(x, weight, bias, options)),
        }
    }

    fn aten_silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SiluBackward;

        impl Backward<LibTorch, 1> for SiluBackward {
            type State = TchTensor;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_x] = ops.parents;
                let grad = grads.consume::<LibTorch>(&ops.node);
                if let Some(node) = node_x {
                    let grad = ops.state.tensor.silu_backward(&grad.tensor);
                    grads.register::<LibTorch>(node.id, TchTensor::new(grad));
                }
            }
        }

        let nodes = [x.node()];
        let x = x.into_primitive();
        match SiluBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let output = LibTorch::aten_silu(x.clone());
                prep.finish(x, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(LibTorch::aten_silu(x)),
        }
    }

    fn aten_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> BatchNormTrain<Self> {
        #[derive(Debug)]
        struct BatchNormBackward;

        impl Backward<LibTorch, 3> for BatchNormBackward {
            // Input, gamma, and the batch mean and inverse standard deviation.
            type State = (TchTensor, TchTensor, TchTensor, TchTensor, f64);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = grads.consume::<LibTorch>(&ops.node);
                let (x, gamma, mean, invstd, epsilon) = ops.state;
                let nodes = ops.parents.map(|node| node.map(|node| node.id));
                register(grads, nodes, |wanted| {
                    aten::batch_norm_backward(&grad, &x, &gamma, &mean, &invstd, epsilon, wanted)
                });
            }
        }

        let nodes = [x.node(), gamma.node(), beta.node()];
        let (x, gamma, beta) = (x.into_primitive(), gamma.into_primitive(), beta.into_primitive());
        let forward = aten::batch_norm_train(&x, &gamma, &beta, epsilon);
        let (mean, invstd) = (forward.mean, forward.invstd);
        let output = match BatchNormBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x, gamma, mean.clone(), invstd, epsilon), forward.output),
            OpsKind::UnTracked(prep) => prep.finish(forward.output),
        };
        // The statistics are results, not part of the graph (as in Burn's own op).
        BatchNormTrain {
            output,
            mean: <FloatTensor<Self>>::new(mean),
            variance: <FloatTensor<Self>>::new(forward.variance),
        }
    }
}

/// Asks PyTorch (`compute`) for the gradients of the inputs the graph tracks (`nodes`) and
/// hands each to its node.
fn register(
    grads: &mut Gradients,
    nodes: [Option<NodeId>; 3],
    compute: impl FnOnce([bool; 3]) -> [Option<tch::Tensor>; 3],
) {
    let found = compute(nodes.map(|node| node.is_some()));
    for (node, grad) in nodes.into_iter().zip(found) {
        if let (Some(node), Some(grad)) = (node, grad) {
            grads.register::<LibTorch>(node, TchTensor::new(grad));
        }
    }
}

/// [`super::conv2d`] on LibTorch.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    let bias = super::bias_or_zeros(bias, &weight);
    let output = <Dispatch as AtenOps>::aten_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        options,
    );
    Tensor::from_dispatch(output)
}

/// [`super::silu`] on LibTorch.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as AtenOps>::aten_silu(x.into_dispatch()))
}

/// [`super::batch_norm_train`] on LibTorch.
pub fn batch_norm_train(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    let result = <Dispatch as AtenOps>::aten_batch_norm_train(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
    );
    (
        Tensor::from_dispatch(result.output),
        Tensor::from_dispatch(result.mean),
        Tensor::from_dispatch(result.variance),
    )
}

/// Calls into PyTorch: tch's wrappers, and the C++ shim (csrc/aten_ops.cpp) for the operators
/// tch does not wrap.
#[allow(deprecated)]
mod aten {
    use std::ffi::{CStr, c_char, c_int, c_void};

    use burn::backend::libtorch::TchTensor;
    use burn::tensor::ops::ConvOptions;
    use tch::Tensor;

    // at::Tensor* on the C++ side; tch does not export its name for the type.
    type Handle = *mut c_void;

    unsafe extern "C" {
        fn effnet_aten_last_error() -> *const c_char;
        fn effnet_conv2d_backward(
            grad_output: *const c_void,
            input: *const c_void,
            weight: *const c_void,
            stride: *const i64,
            padding: *const i64,
            dilation: *const i64,
            groups: i64,
            mask: *const c_int,
            out: *mut Handle,
        ) -> c_int;
        fn effnet_batch_norm_backward(
            grad_output: *const c_void,
            input: *const c_void,
            gamma: *const c_void,
            save_mean: *const c_void,
            save_invstd: *const c_void,
            epsilon: f64,
            mask: *const c_int,
            out: *mut Handle,
        ) -> c_int;
    }

    /// Calls a shim function with the output mask `wanted` and room for its three handles,
    /// then takes over the handles it filled in, or panics with PyTorch's message: Burn's
    /// backend operations have no error path, and PyTorch refuses only inputs that Burn's own
    /// shape checks already rule out.
    fn call(
        op: &str,
        wanted: [bool; 3],
        shim: impl FnOnce(*const c_int, *mut Handle) -> c_int,
    ) -> [Option<Tensor>; 3] {
        let mask = wanted.map(c_int::from);
        let mut out: [Handle; 3] = [std::ptr::null_mut(); 3];
        let status = shim(mask.as_ptr(), out.as_mut_ptr());
        if status != 0 {
            // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated message.
            let message = unsafe { CStr::from_ptr(effnet_aten_last_error()) };
            panic!("PyTorch's {op} failed: {}", message.to_string_lossy());
        }
        // SAFETY: each non-null handle is a new at::Tensor the shim allocated for us alone.
        out.map(|handle| (!handle.is_null()).then(|| unsafe { Tensor::from_ptr(handle.cast()) }))
    }

    /// The gradients of a convolution's input, weight and bias that `wanted` asks for.
    pub fn conv2d_backward(
        grad: &TchTensor,
        x: &TchTensor,
        weight: &TchTensor,
        options: &ConvOptions<2>,
        wanted: [bool; 3],
    ) -> [Option<Tensor>; 3] {
        let as_i64 = |values: [usize; 2]| values.map(|v| v as i64);
        let (stride, padding, dilation) = (
            as_i64(options.stride),
            as_i64(options.padding_begin()),
            as_i64(options.dilation),
        );
        // SAFETY: the tensors outlive the call, the arrays hold two values each as the shim
        // reads, and `call` passes a mask of three and room for the three handles it writes.
        call("convolution_backward", wanted, |mask, out| unsafe {
            effnet_conv2d_backward(
                grad.tensor.as_ptr().cast(),
                x.tensor.as_ptr().cast(),
                weight.tensor.as_ptr().cast(),
                stride.as_ptr(),
                padding.as_ptr(),
                dilation.as_ptr(),
                options.groups as i64,
                mask,
                out,
            )
        })
    }

    /// What BatchNorm's forward with the batch's statistics gives.
    pub struct BatchNormForward {
        /// The normalised input.
        pub output: TchTensor,
        /// Batch mean per channel.
        pub mean: TchTensor,
        /// Batch inverse standard deviation per channel (what the backward takes).
        pub invstd: TchTensor,
        /// Batch (biased) variance per channel, as Burn's op reports it.
        pub variance: TchTensor,
    }

    /// BatchNorm's forward with the batch's statistics.
    pub fn batch_norm_train(
        x: &TchTensor,
        gamma: &TchTensor,
        beta: &TchTensor,
        epsilon: f64,
    ) -> BatchNormForward {
        let none: Option<&Tensor> = None;
        let (output, mean, invstd) = x.tensor.native_batch_norm(
            Some(&gamma.tensor),
            Some(&beta.tensor),
            none,
            none,
            true,
            0.0,
            epsilon,
        );
        // PyTorch keeps 1 / sqrt(var + eps); the running statistics want the variance.
        let variance = invstd.pow_tensor_scalar(-2.0) - epsilon;
        BatchNormForward {
            output: TchTensor::new(output),
            mean: TchTensor::new(mean),
            invstd: TchTensor::new(invstd),
            variance: TchTensor::new(variance),
        }
    }

    /// The gradients of BatchNorm's input, gamma and beta that `wanted` asks for.
    pub fn batch_norm_backward(
        grad: &TchTensor,
        x: &TchTensor,
        gamma: &TchTensor,
        mean: &TchTensor,
        invstd: &TchTensor,
        epsilon: f64,
        wanted: [bool; 3],
    ) -> [Option<Tensor>; 3] {
        // SAFETY: as in conv2d_backward.
        call("native_batch_norm_backward", wanted, |mask, out| unsafe {
            effnet_batch_norm_backward(
                grad.tensor.as_ptr().cast(),
                x.tensor.as_ptr().cast(),
                gamma.tensor.as_ptr().cast(),
                mean.tensor.as_ptr().cast(),
                invstd.tensor.as_ptr().cast(),
                epsilon,
                mask,
                out,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Device, Distribution, Tensor, activation, module};

    use crate::device::{CpuBackend, cpu};
    use crate::native::testing::{leaf, relative_error};

    fn libtorch() -> Device {
        cpu(CpuBackend::Libtorch).unwrap().autodiff()
    }

    #[test]
    fn libtorch_convolution_gradients_match_burns() {
        let device = libtorch();
        device.seed(11);
        // Depthwise at stride 2 with a bias, a plain 1x1, a grouped 3x3 with dilation, one
        // whose input is not tracked (the stem: PyTorch is asked for no input gradient), and
        // a depthwise one padded unevenly.
        for (groups, kernel, stride, padding, dilation, bias, input_tracked) in [
            (8, 3, 2, 1, 1, true, true),
            (1, 1, 1, 0, 1, false, true),
            (2, 3, 1, 2, 2, true, true),
            (1, 3, 2, 1, 1, false, false),
            (8, 3, 2, 9, 1, true, true),
        ] {
            let x = Tensor::<4>::random([2, 8, 9, 9], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<4>::random(
                [8, 8 / groups, kernel, kernel],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let b = Tensor::<1>::random([8], Distribution::Normal(0.0, 1.0), &device);
            // Padding 9 stands for TF's "same" at stride 2 on an even size: 0 before, 1 after.
            let pairs = match padding {
                9 => [(0, 1), (0, 1)],
                p => [(p, p), (p, p)],
            };
            let options =
                ConvOptions::new_with_padding([stride, stride], pairs, [dilation, dilation], groups);
            let run = |native: bool| {
                let x = if input_tracked { leaf(&x) } else { x.clone() };
                let (w, b) = (leaf(&w), leaf(&b));
                let with_bias = bias.then(|| b.clone());
                let y = if native {
                    crate::native::conv2d(x.clone(), w.clone(), with_bias, options.clone())
                } else {
                    module::conv2d(x.clone(), w.clone(), with_bias, options.clone())
                };
                let target = Tensor::<4>::ones(y.dims(), &device).mul_scalar(0.5) + y.clone().sin();
                let grads = (y.clone() * target).sum().backward();
                let gx = x.grad(&grads);
                assert_eq!(gx.is_some(), input_tracked);
                assert_eq!(b.grad(&grads).is_some(), bias, "bias gradient");
                (y, gx, w.grad(&grads).unwrap(), b.grad(&grads))
            };
            let (y, gx, gw, gb) = run(true);
            let (y_ref, gx_ref, gw_ref, gb_ref) = run(false);
            let case = format!("groups {groups} kernel {kernel} stride {stride}");
            assert!(relative_error(y.inner(), y_ref.inner()) < 1e-5, "{case}: output");
            assert!(relative_error(gw, gw_ref) < 1e-4, "{case}: weight gradient");
            if let (Some(gx), Some(gx_ref)) = (gx, gx_ref) {
                assert!(relative_error(gx, gx_ref) < 1e-4, "{case}: input gradient");
            }
            if let (Some(gb), Some(gb_ref)) = (gb, gb_ref) {
                assert!(relative_error(gb, gb_ref) < 1e-4, "{case}: bias gradient");
            }
        }
    }

    #[test]
    fn libtorch_silu_and_its_gradient_match_burns() {
        let device = libtorch();
        device.seed(12);
        let data = Tensor::<3>::random([3, 5, 7], Distribution::Normal(0.0, 3.0), &device);
        let run = |native: bool| {
            let x = leaf(&data);
            let y = if native {
                crate::native::silu(x.clone())
            } else {
                activation::silu(x.clone())
            };
            let grads = (y.clone() * y.clone()).sum().backward();
            (y, x.grad(&grads).unwrap())
        };
        let ((y, g), (y_ref, g_ref)) = (run(true), run(false));
        assert!(relative_error(y.inner(), y_ref.inner()) < 1e-6, "output");
        assert!(relative_error(g, g_ref) < 1e-5, "gradient");
    }

    #[test]
    fn libtorch_training_batchnorm_matches_burns() {
        crate::native::testing::batch_norm_matches_burns(&libtorch(), 13);
    }
}

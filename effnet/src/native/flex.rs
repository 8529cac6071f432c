//! The flex side of [`super`]: a Burn backend extension whose operations are `cpu-kernels`'
//! fused loops, with backward passes that are those kernels too (Burn's autodiff records each
//! as one operation).

use super::BatchNormTrain;
use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, DispatchDevice, Flex, backend_extension};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Shape, Tensor, TensorData};
use cpu_kernels::batch_norm::Statistics;
use cpu_kernels::depthwise::Depthwise;
use cpu_kernels::pointwise::Pointwise;
use cpu_kernels::{ConvGradients, Epilogue, activation, batch_norm, depthwise, pointwise};

/// Whether `x` is an f32 tensor on flex (with or without autodiff).
pub fn runs<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_)) && x.dtype() == DType::F32
}

/// A convolution the kernels cover: depthwise (one filter per channel, any stride and
/// padding) or 1x1 at stride 1 without padding. Dilation 1 either way.
#[derive(Clone, Copy, Debug)]
pub enum Conv {
    /// Depthwise.
    Depthwise(Depthwise),
    /// 1x1.
    Pointwise(Pointwise),
}

impl Conv {
    /// The kernel for `x (*) weight` with `options`, if one covers it.
    pub fn of(x: [usize; 4], weight: [usize; 4], options: &ConvOptions<2>) -> Option<Self> {
        let [batch, channels, height, width] = x;
        let [out, per_group, kh, kw] = weight;
        if options.dilation != [1, 1] {
            return None;
        }
        let depthwise = options.groups == channels && out == channels && per_group == 1;
        let pointwise = options.groups == 1
            && per_group == channels
            && [kh, kw] == [1, 1]
            && options.stride == [1, 1]
            && options.padding_begin() == [0, 0]
            && options.padding_end() == [0, 0];
        if depthwise {
            Some(Self::Depthwise(Depthwise {
                batch,
                channels,
                input: [height, width],
                kernel: [kh, kw],
                stride: options.stride,
                pad_begin: options.padding_begin(),
                pad_end: options.padding_end(),
            }))
        } else if pointwise {
            Some(Self::Pointwise(Pointwise {
                batch,
                in_channels: channels,
                out_channels: out,
                plane: height * width,
            }))
        } else {
            None
        }
    }

    /// The output's shape for input shape `x`.
    fn output(&self, x: [usize; 4]) -> [usize; 4] {
        let [batch, _, height, width] = x;
        match self {
            Self::Depthwise(g) => {
                let [h, w] = g.output();
                [batch, g.channels, h, w]
            }
            Self::Pointwise(g) => [batch, g.out_channels, height, width],
        }
    }

    fn forward(&self, x: &[f32], weight: &[f32], bias: &[f32], epilogue: Epilogue, y: &mut [f32]) {
        match self {
            Self::Depthwise(g) => depthwise::forward(g, x, weight, Some(bias), epilogue, y),
            Self::Pointwise(g) => pointwise::forward(g, x, weight, Some(bias), epilogue, y),
        }
    }

    fn backward(&self, x: &[f32], weight: &[f32], grad: &[f32], wanted: [bool; 3]) -> ConvGradients {
        match self {
            Self::Depthwise(g) => depthwise::backward(g, x, weight, grad, wanted),
            Self::Pointwise(g) => pointwise::backward(g, x, weight, grad, wanted),
        }
    }
}

/// The operations this module routes to the kernels.
#[backend_extension(Flex, Autodiff)]
pub trait KernelOps: Backend {
    /// A depthwise or 1x1 convolution ([`Conv::of`] says which); `bias` is zeros where the
    /// layer has none.
    fn kernel_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;
    /// [`KernelOps::kernel_conv2d`] followed by SiLU, in one pass where nothing is tracked.
    fn kernel_conv2d_silu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;
    /// SiLU.
    fn kernel_silu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The mean of each `(b, c)` plane of `[b, c, h, w]`, as `[b, c, 1, 1]`.
    fn kernel_plane_means(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x * sigmoid(gate)`, `gate` `[b, c, 1, 1]` broadcast over each plane of `x`.
    fn kernel_gate(x: FloatTensor<Self>, gate: FloatTensor<Self>) -> FloatTensor<Self>;
    /// BatchNorm with the batch's statistics, over `[b, c, h, w]`.
    fn kernel_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> BatchNormTrain<Self>;
}

/// BatchNorm's forward pass on flex tensors: the output and the statistics.
fn batch_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    epsilon: f64,
) -> (FlexTensor, Statistics) {
    let [_, c, h, w] = dims4(x);
    let (gamma, beta) = (contiguous(gamma), contiguous(beta));
    let mut y = vec![0f32; x.shape().num_elements()];
    let statistics = batch_norm::forward(
        values(x),
        c,
        h * w,
        values(&gamma),
        values(&beta),
        epsilon as f32,
        &mut y,
    );
    (tensor(y, x.shape()), statistics)
}

fn statistics_tensors(statistics: &Statistics) -> (FlexTensor, FlexTensor) {
    let shape = Shape::new([statistics.mean.len()]);
    (
        tensor(statistics.mean.clone(), shape.clone()),
        tensor(statistics.variance.clone(), shape),
    )
}

/// The f32 values of a flex tensor, in row-major order (a copy only if it is a strided view).
fn contiguous(x: &FlexTensor) -> FlexTensor {
    if x.as_slice::<f32>().is_some() {
        x.clone()
    } else {
        x.to_contiguous()
    }
}

/// `x`'s values to overwrite in place, when nothing else shares them (an inference pass's
/// activations: the autodiff graph keeps what its backward passes need).
fn unique_values(x: &mut FlexTensor) -> Option<&mut [f32]> {
    let elements = x.shape().num_elements();
    let (start, end) = x.layout().contiguous_offsets()?;
    if end - start != elements || x.dtype() != DType::F32 {
        return None;
    }
    x.try_storage_mut::<f32>().map(|storage| &mut storage[start..end])
}

fn values(x: &FlexTensor) -> &[f32] {
    x.as_slice::<f32>().expect("made contiguous f32 by `contiguous`")
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn dims4(x: &FlexTensor) -> [usize; 4] {
    x.shape().dims::<4>()
}

fn conv_of(x: &FlexTensor, weight: &FlexTensor, options: &ConvOptions<2>) -> Conv {
    Conv::of(dims4(x), dims4(weight), options)
        .expect("effnet::native::conv2d sends flex only the convolutions Conv::of covers")
}

/// A convolution on flex tensors, with `epilogue` applied to its output.
fn conv_forward(
    x: FlexTensor,
    weight: FlexTensor,
    bias: FlexTensor,
    options: ConvOptions<2>,
    epilogue: Epilogue,
) -> FlexTensor {
    let conv = conv_of(&x, &weight, &options);
    let (x, weight, bias) = (contiguous(&x), contiguous(&weight), contiguous(&bias));
    let shape = Shape::new(conv.output(dims4(&x)));
    let mut y = vec![0f32; shape.num_elements()];
    conv.forward(values(&x), values(&weight), values(&bias), epilogue, &mut y);
    tensor(y, shape)
}

impl KernelOps for Flex {
    fn kernel_conv2d_silu(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        options: ConvOptions<2>,
    ) -> FlexTensor {
        conv_forward(x, weight, bias, options, Epilogue::Silu)
    }

    fn kernel_batch_norm_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> BatchNormTrain<Self> {
        let (output, statistics) = batch_norm_forward(&contiguous(&x), &gamma, &beta, epsilon);
        let (mean, variance) = statistics_tensors(&statistics);
        BatchNormTrain {
            output,
            mean,
            variance,
        }
    }

    fn kernel_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        options: ConvOptions<2>,
    ) -> FlexTensor {
        conv_forward(x, weight, bias, options, Epilogue::None)
    }

    fn kernel_silu(mut x: FlexTensor) -> FlexTensor {
        if let Some(values) = unique_values(&mut x) {
            activation::silu_in_place(values);
            return x;
        }
        let x = contiguous(&x);
        let mut y = vec![0f32; x.shape().num_elements()];
        activation::silu(values(&x), &mut y);
        tensor(y, x.shape())
    }

    fn kernel_plane_means(x: FlexTensor) -> FlexTensor {
        let x = contiguous(&x);
        let [b, c, h, w] = dims4(&x);
        let mut means = vec![0f32; b * c];
        activation::plane_means(values(&x), h * w, &mut means);
        tensor(means, Shape::new([b, c, 1, 1]))
    }

    fn kernel_gate(mut x: FlexTensor, gate: FlexTensor) -> FlexTensor {
        let gate = contiguous(&gate);
        let [_, _, h, w] = dims4(&x);
        if let Some(values) = unique_values(&mut x) {
            activation::gate_in_place(values, self::values(&gate), h * w);
            return x;
        }
        let x = contiguous(&x);
        let mut y = vec![0f32; x.shape().num_elements()];
        activation::gate(values(&x), values(&gate), h * w, &mut y);
        tensor(y, x.shape())
    }
}

/// Hands each gradient that was computed to its node in the graph.
fn register<const N: usize>(
    grads: &mut Gradients,
    ops: &Ops<impl Sized, N>,
    found: [Option<(Vec<f32>, Shape)>; N],
) {
    for (parent, grad) in ops.parents.iter().zip(found) {
        if let (Some(node), Some((values, shape))) = (parent, grad) {
            grads.register::<Flex>(node.id, tensor(values, shape));
        }
    }
}

impl<C: CheckpointStrategy> KernelOps for Autodiff<Flex, C> {
    fn kernel_conv2d_silu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        // SiLU's backward pass needs the convolution's output: two operations in the graph
        // (the second runs in place where nothing is tracked).
        Self::kernel_silu(Self::kernel_conv2d(x, weight, bias, options))
    }

    fn kernel_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> BatchNormTrain<Self> {
        #[derive(Debug)]
        struct BatchNormBackward;

        impl Backward<Flex, 3> for BatchNormBackward {
            type State = (FlexTensor, FlexTensor, Statistics, f64);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = contiguous(&grads.consume::<Flex>(&ops.node));
                let (x, gamma, statistics, epsilon) = &ops.state;
                let [_, c, h, w] = dims4(x);
                let found = batch_norm::backward(
                    values(x),
                    c,
                    h * w,
                    values(gamma),
                    statistics,
                    *epsilon as f32,
                    values(&grad),
                );
                let channels = Shape::new([c]);
                let found = [
                    Some((found.input, x.shape())),
                    Some((found.gamma, channels.clone())),
                    Some((found.beta, channels)),
                ];
                register(grads, &ops, found);
            }
        }

        let nodes = [x.node(), gamma.node(), beta.node()];
        let (x, gamma, beta) = (x.into_primitive(), gamma.into_primitive(), beta.into_primitive());
        let x = contiguous(&x);
        let (output, statistics) = batch_norm_forward(&x, &gamma, &beta, epsilon);
        let (mean, variance) = statistics_tensors(&statistics);
        let output = match BatchNormBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x, contiguous(&gamma), statistics, epsilon), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        // The statistics are results, not part of the graph (as in Burn's own op).
        BatchNormTrain {
            output,
            mean: <FloatTensor<Self>>::new(mean),
            variance: <FloatTensor<Self>>::new(variance),
        }
    }

    fn kernel_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ConvBackward;

        impl Backward<Flex, 3> for ConvBackward {
            type State = (FlexTensor, FlexTensor, ConvOptions<2>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = contiguous(&grads.consume::<Flex>(&ops.node));
                let (x, weight, options) = &ops.state;
                let conv = conv_of(x, weight, options);
                let wanted = ops.parents.each_ref().map(Option::is_some);
                let found = conv.backward(values(x), values(weight), values(&grad), wanted);
                let [out, ..] = dims4(weight);
                let shapes = [x.shape(), weight.shape(), Shape::new([out])];
                let [s0, s1, s2] = shapes;
                let found = [
                    found.input.map(|v| (v, s0)),
                    found.weight.map(|v| (v, s1)),
                    found.bias.map(|v| (v, s2)),
                ];
                register(grads, &ops, found);
            }
        }

        let nodes = [x.node(), weight.node(), bias.node()];
        let (x, weight, bias) = (x.into_primitive(), weight.into_primitive(), bias.into_primitive());
        match ConvBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, weight) = (contiguous(&x), contiguous(&weight));
                let output = Flex::kernel_conv2d(x.clone(), weight.clone(), bias, options.clone());
                prep.finish((x, weight, options), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::kernel_conv2d(x, weight, bias, options)),
        }
    }

    fn kernel_silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SiluBackward;

        impl Backward<Flex, 1> for SiluBackward {
            type State = FlexTensor;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = contiguous(&grads.consume::<Flex>(&ops.node));
                let x = &ops.state;
                let found = ops.parents[0].is_some().then(|| {
                    let mut dx = vec![0f32; x.shape().num_elements()];
                    activation::silu_backward(values(x), values(&grad), &mut dx);
                    (dx, x.shape())
                });
                register(grads, &ops, [found]);
            }
        }

        let nodes = [x.node()];
        let x = x.into_primitive();
        match SiluBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let x = contiguous(&x);
                let output = Flex::kernel_silu(x.clone());
                prep.finish(x, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::kernel_silu(x)),
        }
    }

    fn kernel_plane_means(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct MeansBackward;

        impl Backward<Flex, 1> for MeansBackward {
            type State = Shape;

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = contiguous(&grads.consume::<Flex>(&ops.node));
                let shape = ops.state.clone();
                let [_, _, h, w] = shape.dims::<4>();
                let found = ops.parents[0].is_some().then(|| {
                    let mut dx = vec![0f32; shape.num_elements()];
                    activation::plane_means_backward(values(&grad), h * w, &mut dx);
                    (dx, shape)
                });
                register(grads, &ops, [found]);
            }
        }

        let nodes = [x.node()];
        let x = x.into_primitive();
        match MeansBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let shape = x.shape();
                prep.finish(shape, Flex::kernel_plane_means(x))
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::kernel_plane_means(x)),
        }
    }

    fn kernel_gate(x: FloatTensor<Self>, gate: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GateBackward;

        impl Backward<Flex, 2> for GateBackward {
            type State = (FlexTensor, FlexTensor);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let grad = contiguous(&grads.consume::<Flex>(&ops.node));
                let (x, gate) = &ops.state;
                let [_, _, h, w] = dims4(x);
                let mut dx = vec![0f32; x.shape().num_elements()];
                let mut dgate = vec![0f32; gate.shape().num_elements()];
                activation::gate_backward(values(x), values(gate), values(&grad), h * w, &mut dx, &mut dgate);
                register(grads, &ops, [Some((dx, x.shape())), Some((dgate, gate.shape()))]);
            }
        }

        let nodes = [x.node(), gate.node()];
        let (x, gate) = (x.into_primitive(), gate.into_primitive());
        match GateBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, gate) = (contiguous(&x), contiguous(&gate));
                let output = Flex::kernel_gate(x.clone(), gate.clone());
                prep.finish((x, gate), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::kernel_gate(x, gate)),
        }
    }
}

/// [`super::conv2d`] on flex, for a convolution [`Conv::of`] covers.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    let bias = super::bias_or_zeros(bias, &weight);
    let (x, weight, bias) = (x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch());
    Tensor::from_dispatch(<Dispatch as KernelOps>::kernel_conv2d(x, weight, bias, options))
}

/// [`super::conv2d_silu`] on flex, for a convolution [`Conv::of`] covers.
pub fn conv2d_silu(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    let bias = super::bias_or_zeros(bias, &weight);
    let (x, weight, bias) = (x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch());
    Tensor::from_dispatch(<Dispatch as KernelOps>::kernel_conv2d_silu(
        x, weight, bias, options,
    ))
}

/// [`super::batch_norm_train`] on flex.
pub fn batch_norm_train(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    let result = <Dispatch as KernelOps>::kernel_batch_norm_train(
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

/// [`super::silu`] on flex.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as KernelOps>::kernel_silu(x.into_dispatch()))
}

/// [`super::plane_means`] on flex.
pub fn plane_means(x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as KernelOps>::kernel_plane_means(x.into_dispatch()))
}

/// [`super::gate`] on flex.
pub fn gate(x: Tensor<4>, gate: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as KernelOps>::kernel_gate(
        x.into_dispatch(),
        gate.into_dispatch(),
    ))
}

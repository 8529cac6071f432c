//! EfficientNet modules: the backbone (Keras `include_top=False`), the ImageNet-style top and
//! the classifier that puts preprocessing, backbone and head together.

use burn::module::{Flag, Initializer, Module, Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu6;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Tensor};

use crate::config::{Activation, BlockSpec, EfficientNetConfig, Padding, Preprocess};
use crate::native;

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn activate<const D: usize>(act: Activation, x: Tensor<D>) -> Tensor<D> {
    match act {
        Activation::Silu => native::silu(x),
        Activation::Relu6 => relu6(x),
    }
}

/// torchvision's EfficientNet init for convolutions: Kaiming-normal over PyTorch's fan-out
/// (`out_channels * k * k`, not divided by groups). Burn's default shrinks activations layer by
/// layer, which leaves a randomly initialised network with vanishing features.
fn conv_init(out_channels: usize, kernel: usize) -> Initializer {
    Initializer::Normal {
        mean: 0.0,
        std: (2.0 / (out_channels * kernel * kernel) as f64).sqrt(),
    }
}

/// A 1x1 convolution with bias (squeeze-excitation), initialised as torchvision does.
fn conv1x1_bias(channels: [usize; 2], device: &Device) -> Conv2d {
    let mut conv = Conv2dConfig::new(channels, [1, 1])
        .with_initializer(conv_init(channels[1], 1))
        .init(device);
    conv.bias = Some(Initializer::Zeros.init([channels[1]], device));
    conv
}

fn padding(padding: Padding, kernel: usize) -> PaddingConfig2d {
    match padding {
        Padding::Symmetric => {
            let p = (kernel - 1) / 2;
            PaddingConfig2d::Explicit(p, p, p, p)
        }
        Padding::TfSame => PaddingConfig2d::Same,
    }
}

/// Convolution (no bias), BatchNorm and an optional activation.
#[derive(Module, Debug)]
pub struct ConvBn {
    /// The convolution.
    pub conv: Conv2d,
    /// Its BatchNorm.
    pub bn: BatchNorm,
    #[module(skip)]
    act: Option<Activation>,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: &EfficientNetConfig,
        channels: [usize; 2],
        kernel: usize,
        stride: usize,
        groups: usize,
        act: Option<Activation>,
        device: &Device,
    ) -> Self {
        let conv = Conv2dConfig::new(channels, [kernel, kernel])
            .with_stride([stride, stride])
            .with_groups(groups)
            .with_padding(padding(cfg.padding, kernel))
            .with_bias(false)
            .with_initializer(conv_init(channels[1], kernel))
            .init(device);
        let bn = BatchNormConfig::new(channels[1])
            .with_epsilon(cfg.bn_eps)
            .init(device);
        Self { conv, bn, act }
    }

    /// Convolution, BatchNorm and activation.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        // BatchNorm::forward's own test for normalising with the batch's statistics.
        let batch_statistics = x.device().is_autodiff() && self.bn.training.is_enabled();
        if batch_statistics {
            let x = self.normalised(x);
            return match self.act {
                Some(act) => activate(act, x),
                None => x,
            };
        }
        let (weight, bias, options) = self.folded(&x);
        match self.act {
            Some(Activation::Silu) => native::conv2d_silu(x, weight, Some(bias), options),
            Some(act) => activate(act, native::conv2d(x, weight, Some(bias), options)),
            None => native::conv2d(x, weight, Some(bias), options),
        }
    }

    /// The convolution and a BatchNorm that uses its running statistics, as one convolution
    /// (its weight, bias and options for input `x`, which the caller runs with its activation):
    /// the per-channel scale `gamma / sqrt(var + eps)` goes into the weight and the shift into a
    /// bias. Inference and the BN-frozen fine-tuning phase take this path; BatchNorm's own
    /// inference path is four element-wise passes over the activation forward and as many
    /// backward, where this multiplies weight-sized tensors. Gradients reach the convolution's
    /// weight through the scale, so fine-tuning trains what it trained before.
    fn folded(&self, x: &Tensor<4>) -> (Tensor<4>, Tensor<1>, ConvOptions<2>) {
        let options = conv_options(&self.conv, x);
        let device = x.device();
        let (bn, conv) = (&self.bn, &self.conv);
        let mean = bn.running_mean.value().to_device(&device);
        let var = bn.running_var.value().to_device(&device);
        let scale = bn.gamma.val() / var.add_scalar(bn.epsilon).sqrt();
        let shift = bn.beta.val() - mean * scale.clone();
        let bias = match &conv.bias {
            Some(bias) => bias.val() * scale.clone() + shift,
            None => shift,
        };
        let [out] = scale.dims();
        let weight = conv.weight.val() * scale.reshape([out, 1, 1, 1]);
        (weight, bias, options)
    }

    /// The convolution, then BatchNorm over the batch's statistics, which also moves the
    /// running statistics towards them (as `BatchNorm::forward` does while training).
    fn normalised(&self, x: Tensor<4>) -> Tensor<4> {
        let (bn, conv) = (&self.bn, &self.conv);
        let options = conv_options(conv, &x);
        let x = native::conv2d(x, conv.weight.val(), conv.bias.as_ref().map(|b| b.val()), options);
        let (output, mean, variance) = native::batch_norm_train(x, bn.gamma.val(), bn.beta.val(), bn.epsilon);
        let device = output.device();
        let momentum = bn.momentum;
        let update = |state: &RunningState<Tensor<1>>, batch: Tensor<1>| {
            let running = state.value_sync().to_device(&device);
            let running = running
                .mul_scalar(1.0 - momentum)
                .add(batch.detach().mul_scalar(momentum));
            state.update(running.detach());
        };
        update(&bn.running_mean, mean);
        update(&bn.running_var, variance);
        output
    }
}

/// The options `Conv2d::forward` uses for input `x`: Burn keeps its padding calculation
/// private, and [`ConvBn`] calls the convolution op itself.
fn conv_options(conv: &Conv2d, x: &Tensor<4>) -> ConvOptions<2> {
    let [_, _, height, width] = x.dims();
    let (size, kernel, stride) = ([height, width], conv.kernel_size, conv.stride);
    // TensorFlow's "same": the output is ceil(in / stride); odd totals pad more after.
    let same = |i: usize| {
        let out = size[i].div_ceil(stride[i]);
        let total = (out.saturating_sub(1) * stride[i] + kernel[i]).saturating_sub(size[i]);
        (total / 2, total - total / 2)
    };
    let padding = match conv.padding {
        PaddingConfig2d::Same => [same(0), same(1)],
        PaddingConfig2d::Valid => [(0, 0), (0, 0)],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
    };
    ConvOptions::new_with_padding(stride, padding, conv.dilation, conv.groups)
}

/// Squeeze-excitation: a per-channel gate computed from the pooled feature map.
#[derive(Module, Debug)]
pub struct SqueezeExcite {
    /// 1x1 convolution down to the bottleneck.
    pub reduce: Conv2d,
    /// 1x1 convolution back up to the block's width.
    pub expand: Conv2d,
    #[module(skip)]
    act: Activation,
}

impl SqueezeExcite {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let scale = native::plane_means(x.clone());
        let scale = activate(self.act, self.reduce.forward(scale));
        native::gate(x, self.expand.forward(scale))
    }
}

/// The inverted-bottleneck block (MBConv) with optional squeeze-excitation and stochastic depth.
#[derive(Module, Debug)]
pub struct MbConv {
    /// 1x1 expansion, absent when the expansion ratio is 1.
    pub expand: Option<ConvBn>,
    /// Depthwise convolution.
    pub depthwise: ConvBn,
    /// Squeeze-excitation, absent in the Lite models.
    pub se: Option<SqueezeExcite>,
    /// 1x1 projection, without activation.
    pub project: ConvBn,
    /// Whether the block adds its input back (stride 1 and same width).
    pub residual: bool,
    /// Probability of dropping the residual branch for a sample while training.
    pub drop_path: f64,
    /// Stochastic depth is active only while training.
    pub training: Param<Flag>,
}

impl MbConv {
    fn new(cfg: &EfficientNetConfig, spec: &BlockSpec, device: &Device) -> Self {
        let act = Some(cfg.activation);
        let expand = (spec.expanded_channels != spec.in_channels).then(|| {
            ConvBn::new(
                cfg,
                [spec.in_channels, spec.expanded_channels],
                1,
                1,
                1,
                act,
                device,
            )
        });
        let depthwise = ConvBn::new(
            cfg,
            [spec.expanded_channels, spec.expanded_channels],
            spec.kernel,
            spec.stride,
            spec.expanded_channels,
            act,
            device,
        );
        let se = spec.se_channels.map(|squeeze| SqueezeExcite {
            reduce: conv1x1_bias([spec.expanded_channels, squeeze], device),
            expand: conv1x1_bias([squeeze, spec.expanded_channels], device),
            act: cfg.activation,
        });
        let project = ConvBn::new(
            cfg,
            [spec.expanded_channels, spec.out_channels],
            1,
            1,
            1,
            None,
            device,
        );
        Self {
            expand,
            depthwise,
            se,
            project,
            residual: spec.stride == 1 && spec.in_channels == spec.out_channels,
            drop_path: spec.drop_path,
            training: Param::from_bool(true),
        }
    }

    /// The block applied to `[batch, in, h, w]`.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let Some(expand) = &self.expand {
            x = expand.forward(x);
        }
        x = self.depthwise.forward(x);
        if let Some(se) = &self.se {
            x = se.forward(x);
        }
        x = self.project.forward(x);
        if !self.residual {
            return x;
        }
        if self.drop_path > 0.0 && self.training.is_enabled() && x.device().is_autodiff() {
            // "Row" stochastic depth: each sample keeps or drops the whole branch.
            let keep = 1.0 - self.drop_path;
            let [batch, _, _, _] = x.dims();
            let mask = Tensor::<4>::random([batch, 1, 1, 1], Distribution::Bernoulli(keep), &x.device());
            x = x * mask.div_scalar(keep);
        }
        x + input
    }
}

/// The convolutional trunk: stem, MBConv blocks and the final 1x1 convolution. Its output is
/// the feature map a head is attached to (Keras `include_top=False`).
#[derive(Module, Debug)]
pub struct Backbone {
    /// 3x3 stride-2 stem convolution.
    pub stem: ConvBn,
    /// The MBConv blocks of all stages, in order.
    pub blocks: Vec<MbConv>,
    /// 1x1 convolution to the feature width.
    pub head: ConvBn,
}

impl Backbone {
    /// A randomly initialised backbone for `cfg`.
    pub fn new(cfg: &EfficientNetConfig, device: &Device) -> Self {
        let act = Some(cfg.activation);
        let blocks = cfg.blocks();
        let last = blocks.last().map_or(cfg.stem_channels(), |b| b.out_channels);
        Self {
            stem: ConvBn::new(cfg, [3, cfg.stem_channels()], 3, 2, 1, act, device),
            blocks: blocks.iter().map(|spec| MbConv::new(cfg, spec, device)).collect(),
            head: ConvBn::new(cfg, [last, cfg.head_channels()], 1, 1, 1, act, device),
        }
    }

    /// Rescale stochastic depth so the last block drops its branch with probability `p`
    /// (earlier blocks linearly less, as at construction); 0 turns it off.
    pub fn set_stochastic_depth(&mut self, p: f64) {
        let total = self.blocks.len();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            block.drop_path = p * i as f64 / total as f64;
        }
    }

    /// Feature maps `[batch, features, h/32, w/32]` for model-ready input.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.stem.forward(x);
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.head.forward(x)
    }
}

/// Global average pooling, dropout and a dense layer: the ImageNet top, and the linear head
/// used for transfer learning.
#[derive(Module, Debug)]
pub struct LinearHead {
    /// Dropout before the dense layer.
    pub dropout: Dropout,
    /// The dense layer (`[features, classes]`).
    pub fc: Linear,
}

impl LinearHead {
    /// A randomly initialised head (torchvision's init: uniform in +-1/sqrt(classes), zero
    /// bias).
    pub fn new(features: usize, classes: usize, dropout: f64, device: &Device) -> Self {
        let range = 1.0 / (classes as f64).sqrt();
        let mut fc = LinearConfig::new(features, classes)
            .with_initializer(Initializer::Uniform {
                min: -range,
                max: range,
            })
            .init(device);
        fc.bias = Some(Initializer::Zeros.init([classes], device));
        Self {
            dropout: DropoutConfig::new(dropout).init(),
            fc,
        }
    }

    /// A new head for transfer learning, initialised as PyTorch's `nn.Linear` (what
    /// `model.classifier[1] = nn.Linear(1280, 10)` gives): uniform in +-1/sqrt(features),
    /// zero bias. torchvision's ImageNet-top init (+-1/sqrt(classes)) is ~11x larger for 10
    /// classes over 1280 features; on real CIFAR-10 with Lite0 features it started at a loss
    /// of 15 and trained worse.
    pub fn for_transfer(features: usize, classes: usize, dropout: f64, device: &Device) -> Self {
        Self {
            dropout: DropoutConfig::new(dropout).init(),
            fc: fan_in_dense(features, classes, device),
        }
    }

    /// Logits `[batch, classes]` from feature maps `[batch, features, h, w]`.
    pub fn forward(&self, features: Tensor<4>) -> Tensor<2> {
        let [batch, channels, _, _] = features.dims();
        let pooled = native::plane_means(features).reshape([batch, channels]);
        self.fc.forward(self.dropout.forward(pooled))
    }
}

/// A dense layer initialised uniform in +-1/sqrt(fan_in), zero bias.
fn fan_in_dense(d_in: usize, d_out: usize, device: &Device) -> Linear {
    let range = 1.0 / (d_in as f64).sqrt();
    let mut fc = LinearConfig::new(d_in, d_out)
        .with_initializer(Initializer::Uniform {
            min: -range,
            max: range,
        })
        .init(device);
    fc.bias = Some(Initializer::Zeros.init([d_out], device));
    fc
}

/// The tutorial's head: a 7x7 convolution with 7 filters over the feature map, BatchNorm,
/// global average pooling, dropout, a 512-unit ReLU layer and the output layer.
#[derive(Module, Debug)]
pub struct TutorialHead {
    /// 7x7 convolution to 7 channels, "same" padding.
    pub conv: Conv2d,
    /// BatchNorm over the 7 channels (Keras defaults: eps 1e-3, momentum 0.99).
    pub bn: BatchNorm,
    /// Dropout after pooling.
    pub dropout: Dropout,
    /// Dense 7 -> 512 with ReLU.
    pub fc1: Linear,
    /// Dense 512 -> classes.
    pub fc2: Linear,
}

/// Width of the tutorial head's hidden dense layer.
pub const TUTORIAL_HIDDEN: usize = 512;
/// Filters of the tutorial head's convolution.
pub const TUTORIAL_FILTERS: usize = 7;

impl TutorialHead {
    /// A randomly initialised tutorial head over `features` channels.
    pub fn new(features: usize, classes: usize, dropout: f64, device: &Device) -> Self {
        Self {
            conv: Conv2dConfig::new([features, TUTORIAL_FILTERS], [7, 7])
                .with_padding(PaddingConfig2d::Same)
                .with_initializer(conv_init(TUTORIAL_FILTERS, 7))
                .init(device),
            bn: BatchNormConfig::new(TUTORIAL_FILTERS)
                .with_epsilon(1e-3)
                .with_momentum(0.01)
                .init(device),
            dropout: DropoutConfig::new(dropout).init(),
            fc1: fan_in_dense(TUTORIAL_FILTERS, TUTORIAL_HIDDEN, device),
            fc2: fan_in_dense(TUTORIAL_HIDDEN, classes, device),
        }
    }

    /// Logits `[batch, classes]` from feature maps `[batch, features, h, w]`.
    pub fn forward(&self, features: Tensor<4>) -> Tensor<2> {
        let x = self.bn.forward(self.conv.forward(features));
        let [batch, channels, _, _] = x.dims();
        let pooled = native::plane_means(x).reshape([batch, channels]);
        let hidden = burn::tensor::activation::relu(self.fc1.forward(self.dropout.forward(pooled)));
        self.fc2.forward(hidden)
    }
}

/// Which head a classifier has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// Pool, dropout, dense.
    Linear,
    /// The tutorial's conv-BN-pool-dropout-dense-dense head.
    Tutorial,
}

impl std::str::FromStr for HeadKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "linear" => Ok(HeadKind::Linear),
            "tutorial" => Ok(HeadKind::Tutorial),
            other => Err(format!("head {other:?}: expected linear or tutorial")),
        }
    }
}

/// A classification head. Module paths skip the variant (`head.fc.weight`,
/// `head.conv.weight`): our weight visitors leave enum levels out.
// One head per model: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Head {
    /// Pool, dropout, dense (also the ImageNet top).
    Linear(LinearHead),
    /// The tutorial's head.
    Tutorial(TutorialHead),
}

impl Head {
    /// A fresh head of `kind` over `features` channels.
    pub fn new(kind: HeadKind, features: usize, classes: usize, dropout: f64, device: &Device) -> Self {
        match kind {
            HeadKind::Linear => Head::Linear(LinearHead::for_transfer(features, classes, dropout, device)),
            HeadKind::Tutorial => Head::Tutorial(TutorialHead::new(features, classes, dropout, device)),
        }
    }

    /// Logits from feature maps.
    pub fn forward(&self, features: Tensor<4>) -> Tensor<2> {
        match self {
            Head::Linear(h) => h.forward(features),
            Head::Tutorial(h) => h.forward(features),
        }
    }

    /// Number of output classes.
    pub fn num_classes(&self) -> usize {
        match self {
            Head::Linear(h) => h.fc.weight.dims()[1],
            Head::Tutorial(h) => h.fc2.weight.dims()[1],
        }
    }

    /// Which kind it is.
    pub fn kind(&self) -> HeadKind {
        match self {
            Head::Linear(_) => HeadKind::Linear,
            Head::Tutorial(_) => HeadKind::Tutorial,
        }
    }
}

/// An image classifier: in-model preprocessing, an EfficientNet backbone and a head.
#[derive(Module, Debug)]
pub struct Classifier {
    /// The convolutional trunk.
    pub backbone: Backbone,
    /// The classification head.
    pub head: Head,
    #[module(skip)]
    preprocess: Preprocess,
}

impl Classifier {
    /// A randomly initialised classifier with `classes` outputs (1000 for the ImageNet top).
    pub fn new(cfg: &EfficientNetConfig, classes: usize, device: &Device) -> Self {
        Self {
            backbone: Backbone::new(cfg, device),
            head: Head::Linear(LinearHead::new(cfg.head_channels(), classes, cfg.dropout, device)),
            preprocess: cfg.preprocess,
        }
    }

    /// Replace the head with a fresh linear one of `classes` outputs (transfer learning).
    pub fn with_new_head(self, classes: usize, dropout: f64, device: &Device) -> Self {
        self.with_head(HeadKind::Linear, classes, dropout, device)
    }

    /// Replace the head with a fresh one of `kind` with `classes` outputs.
    pub fn with_head(self, kind: HeadKind, classes: usize, dropout: f64, device: &Device) -> Self {
        let features = self.backbone.head.conv.weight.dims()[0];
        Self {
            head: Head::new(kind, features, classes, dropout, device),
            ..self
        }
    }

    /// Number of output classes.
    pub fn num_classes(&self) -> usize {
        self.head.num_classes()
    }

    /// Logits for raw pixels `[batch, 3, h, w]` in 0..255 (RGB).
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.features(pixels))
    }

    /// The backbone's feature maps `[batch, features, h/32, w/32]` for raw pixels.
    pub fn features(&self, pixels: Tensor<4>) -> Tensor<4> {
        self.backbone.forward(preprocess(self.preprocess, pixels))
    }

    /// The least of the backbone's output for raw pixels that the head needs, for a feature
    /// cache to keep: a linear head starts by pooling, which has no parameters, so the pooled
    /// `[batch, features, 1, 1]` gives it the same logits; the tutorial's head convolves the
    /// whole map.
    pub fn head_input(&self, pixels: Tensor<4>) -> Tensor<4> {
        let features = self.features(pixels);
        match self.head {
            Head::Linear(_) => native::plane_means(features),
            Head::Tutorial(_) => features,
        }
    }
}

/// Scale raw 0..255 RGB pixels `[batch, 3, h, w]` to what the network was trained on.
pub fn preprocess(kind: Preprocess, pixels: Tensor<4>) -> Tensor<4> {
    match kind {
        Preprocess::Symmetric127 => pixels.sub_scalar(127.0).div_scalar(128.0),
        Preprocess::ImagenetMeanStd => {
            let device = pixels.device();
            let mean =
                Tensor::<1>::from_floats(IMAGENET_MEAN.map(|m| m * 255.0), &device).reshape([1, 3, 1, 1]);
            let std =
                Tensor::<1>::from_floats(IMAGENET_STD.map(|s| s * 255.0), &device).reshape([1, 3, 1, 1]);
            (pixels - mean) / std
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, Param, RunningState};
    use burn::tensor::{Device, Distribution, Tensor};

    use super::ConvBn;
    use crate::config::{Activation, EfficientNetConfig, Padding};

    /// A ConvBn whose BatchNorm has non-trivial affine parameters and running statistics, so a
    /// fold that dropped or misplaced any of them would show.
    fn conv_bn(padding: Padding, kernel: usize, stride: usize, groups: usize, device: &Device) -> ConvBn {
        let mut cfg = EfficientNetConfig::b(0).unwrap();
        cfg.padding = padding;
        let channels = 6;
        let mut layer = ConvBn::new(
            &cfg,
            [channels, channels],
            kernel,
            stride,
            groups,
            Some(Activation::Silu),
            device,
        );
        let random =
            |low: f64, high: f64| Tensor::<1>::random([channels], Distribution::Uniform(low, high), device);
        layer.bn.gamma = Param::from_tensor(random(0.5, 2.0));
        layer.bn.beta = Param::from_tensor(random(-1.0, 1.0));
        layer.bn.running_mean = RunningState::new(random(-0.5, 0.5));
        layer.bn.running_var = RunningState::new(random(0.2, 3.0));
        layer
    }

    /// BatchNorm::forward, which the fold replaces.
    fn unfolded(layer: &ConvBn, x: Tensor<4>) -> Tensor<4> {
        super::activate(Activation::Silu, layer.bn.forward(layer.conv.forward(x)))
    }

    fn largest_difference(a: Tensor<4>, b: Tensor<4>) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).abs().max().into_scalar::<f32>()
    }

    #[test]
    fn folding_batchnorm_into_the_convolution_changes_no_output() {
        let device = Device::flex();
        device.seed(3);
        // TF "same" padding at stride 2 on an odd size pads unevenly (0 before, 1 after); the
        // depthwise case is what EfficientNet's blocks run.
        for (padding, kernel, stride, groups, size) in [
            (Padding::TfSame, 3, 2, 6, 10),
            (Padding::TfSame, 5, 1, 1, 9),
            (Padding::Symmetric, 3, 2, 6, 10),
            (Padding::Symmetric, 1, 1, 1, 7),
        ] {
            let layer = conv_bn(padding, kernel, stride, groups, &device).valid();
            let x = Tensor::<4>::random([2, 6, size, size], Distribution::Normal(0.0, 1.0), &device);
            let folded = layer.forward(x.clone());
            let reference = unfolded(&layer, x);
            let scale = reference.clone().abs().max().into_scalar::<f32>();
            let diff = largest_difference(folded, reference);
            assert!(scale > 0.5, "{scale}");
            assert!(
                diff <= 1e-5 * scale,
                "{padding:?} k{kernel} s{stride}: differs by {diff}"
            );
        }
    }

    #[test]
    fn a_frozen_batchnorm_folded_trains_the_convolution_as_before() {
        let device = Device::flex().autodiff();
        device.seed(5);
        let layer = conv_bn(Padding::TfSame, 3, 2, 6, &device);
        // What the fine-tuning phase does: BatchNorm frozen (inference statistics, no updates).
        let layer = ConvBn {
            bn: layer.bn.clone().freeze(),
            ..layer
        };
        let x = Tensor::<4>::random([2, 6, 9, 9], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let target = Tensor::<4>::random([2, 6, 5, 5], Distribution::Normal(0.0, 1.0), &device);
        let grads = |out: Tensor<4>| {
            let loss = (out * target.clone()).sum();
            let grads = loss.backward();
            let weight = layer.conv.weight.grad(&grads).unwrap();
            let input = x.grad(&grads).unwrap();
            (weight, input)
        };
        let (weight, input) = grads(layer.forward(x.clone()));
        let (weight_ref, input_ref) = grads(unfolded(&layer, x.clone()));
        let weight_diff = largest_difference(weight.clone(), weight_ref);
        let input_diff = largest_difference(input, input_ref);
        let scale = weight.abs().max().into_scalar::<f32>();
        assert!(scale > 0.1, "{scale}");
        assert!(
            weight_diff <= 1e-4 * scale,
            "weight gradients differ by {weight_diff}"
        );
        assert!(
            input_diff <= 1e-4 * scale,
            "input gradients differ by {input_diff}"
        );
    }
}

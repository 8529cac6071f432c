//! `worker summary`: a model's layers, output shapes and parameter counts, as Keras's
//! `model.summary()` prints them, with what each training phase trains.
//!
//! Counts come from the model itself: the tensors of a freshly built classifier, and for
//! "trainable" the ones that require gradients once [`phase::prepare`] has set it up for a
//! phase. Like Keras, BatchNorm's moving mean and variance count as non-trainable parameters.
//! Keras's own EfficientNets also carry a `Normalization` layer whose mean, variance and count
//! (7 numbers) it counts as non-trainable; ours preprocess with constants, which count nothing.

use std::fmt;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};

use crate::config::EfficientNetConfig;
use crate::model::{Classifier, HeadKind, TUTORIAL_FILTERS, TUTORIAL_HIDDEN};
use crate::phase::{self, Phase};
use crate::weights::ModulePath;

/// One layer of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// Module path, e.g. `backbone.blocks.3.depthwise.conv`.
    pub name: String,
    /// Keras's name for the kind of layer.
    pub kind: &'static str,
    /// Output shape without the batch dimension: channels, then height and width for maps
    /// (the model computes in NCHW).
    pub shape: Vec<usize>,
    /// Parameters, BatchNorm statistics included.
    pub params: usize,
}

/// A model's table and totals for one phase.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// What was summarised.
    pub title: String,
    /// Layers in order.
    pub layers: Vec<Layer>,
    /// Every phase asked for, with its trainable count.
    pub trainable: Vec<(Phase, usize)>,
}

impl Summary {
    /// All parameters and BatchNorm statistics.
    pub fn total(&self) -> usize {
        self.layers.iter().map(|l| l.params).sum()
    }
}

/// A tensor of the model: its module path, size, and whether it trains in a phase.
struct TensorInfo {
    path: String,
    numel: usize,
    trainable: bool,
}

#[derive(Default)]
struct Tensors {
    path: ModulePath,
    out: Vec<TensorInfo>,
}

impl ModuleVisitor for Tensors {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.path.exit(container_type);
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.joined();
        let tensor = param.val();
        let statistic = path.ends_with("running_mean") || path.ends_with("running_var");
        self.out.push(TensorInfo {
            numel: tensor.shape().num_elements(),
            trainable: !statistic && tensor.is_require_grad(),
            path,
        });
    }
}

fn tensors(model: &Classifier) -> Vec<TensorInfo> {
    let mut v = Tensors::default();
    model.visit(&mut v);
    v.out
}

/// The module path of the layer a tensor belongs to.
fn layer_of(path: &str) -> &str {
    path.rsplit_once('.').map_or(path, |(layer, _)| layer)
}

/// Spatial side after a stride-`s` convolution ("same" padding either way: TensorFlow's and
/// the symmetric `(k - 1) / 2` both give `ceil(in / s)` for odd kernels).
fn strided(side: usize, stride: usize) -> usize {
    side.div_ceil(stride)
}

/// Kinds and output shapes of every layer that has tensors, by module path, in model order.
fn layout(
    cfg: &EfficientNetConfig,
    head: Option<HeadKind>,
    classes: usize,
    size: usize,
) -> Vec<(String, &'static str, Vec<usize>)> {
    let mut rows = Vec::new();
    let conv_bn = |rows: &mut Vec<_>, at: &str, kind: &'static str, shape: Vec<usize>| {
        rows.push((format!("{at}.conv"), kind, shape.clone()));
        rows.push((format!("{at}.bn"), "BatchNormalization", shape));
    };
    let mut side = strided(size, 2);
    conv_bn(
        &mut rows,
        "backbone.stem",
        "Conv2D",
        vec![cfg.stem_channels(), side, side],
    );
    for (i, b) in cfg.blocks().iter().enumerate() {
        let at = format!("backbone.blocks.{i}");
        if b.expanded_channels != b.in_channels {
            conv_bn(
                &mut rows,
                &format!("{at}.expand"),
                "Conv2D",
                vec![b.expanded_channels, side, side],
            );
        }
        side = strided(side, b.stride);
        conv_bn(
            &mut rows,
            &format!("{at}.depthwise"),
            "DepthwiseConv2D",
            vec![b.expanded_channels, side, side],
        );
        if let Some(se) = b.se_channels {
            rows.push((format!("{at}.se.reduce"), "Conv2D", vec![se, 1, 1]));
            rows.push((
                format!("{at}.se.expand"),
                "Conv2D",
                vec![b.expanded_channels, 1, 1],
            ));
        }
        conv_bn(
            &mut rows,
            &format!("{at}.project"),
            "Conv2D",
            vec![b.out_channels, side, side],
        );
    }
    let features = cfg.head_channels();
    conv_bn(&mut rows, "backbone.head", "Conv2D", vec![features, side, side]);
    match head {
        None => {}
        Some(HeadKind::Linear) => {
            rows.push(("head.pool".into(), "GlobalAveragePooling2D", vec![features]));
            rows.push(("head.dropout".into(), "Dropout", vec![features]));
            rows.push(("head.fc".into(), "Dense", vec![classes]));
        }
        Some(HeadKind::Tutorial) => {
            rows.push(("head.conv".into(), "Conv2D", vec![TUTORIAL_FILTERS, side, side]));
            rows.push((
                "head.bn".into(),
                "BatchNormalization",
                vec![TUTORIAL_FILTERS, side, side],
            ));
            rows.push((
                "head.pool".into(),
                "GlobalAveragePooling2D",
                vec![TUTORIAL_FILTERS],
            ));
            rows.push(("head.dropout".into(), "Dropout", vec![TUTORIAL_FILTERS]));
            rows.push(("head.fc1".into(), "Dense", vec![TUTORIAL_HIDDEN]));
            rows.push(("head.fc2".into(), "Dense", vec![classes]));
        }
    }
    rows
}

/// Summarise `cfg` with `head` (`None`: the backbone alone, Keras's `include_top=False`) for
/// `classes` outputs at `size` pixels, with the trainable count of each of `phases`.
pub fn summarize(
    cfg: &EfficientNetConfig,
    head: Option<HeadKind>,
    classes: usize,
    size: usize,
    phases: &[Phase],
) -> Summary {
    let device = Device::flex().autodiff();
    let model = Classifier::new(cfg, classes, &device).with_head(
        head.unwrap_or(HeadKind::Linear),
        classes,
        0.0,
        &device,
    );
    let counted = |info: &TensorInfo| head.is_some() || !info.path.starts_with("head.");
    let all = tensors(&model);
    let layers = layout(cfg, head, classes, size)
        .into_iter()
        .map(|(name, kind, shape)| Layer {
            params: all
                .iter()
                .filter(|t| layer_of(&t.path) == name)
                .map(|t| t.numel)
                .sum(),
            name,
            kind,
            shape,
        })
        .collect::<Vec<_>>();
    let trainable = phases
        .iter()
        .map(|&p| {
            let prepared = tensors(&phase::prepare(model.clone(), p));
            let n = prepared
                .iter()
                .filter(|t| counted(t) && t.trainable)
                .map(|t| t.numel)
                .sum();
            (p, n)
        })
        .collect();
    let input = Layer {
        name: "input".into(),
        kind: "InputLayer",
        shape: vec![3, size, size],
        params: 0,
    };
    let title = match head {
        Some(kind) => format!("{} + {} head", cfg.name, head_name(kind)),
        None => format!("{} (backbone)", cfg.name),
    };
    Summary {
        title,
        layers: std::iter::once(input).chain(layers).collect(),
        trainable,
    }
}

fn head_name(kind: HeadKind) -> &'static str {
    match kind {
        HeadKind::Linear => "linear",
        HeadKind::Tutorial => "tutorial",
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Head => "head",
        Phase::FineTune => "finetune",
        Phase::Scratch => "scratch",
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rule = |f: &mut fmt::Formatter<'_>, c: char| writeln!(f, "{}", c.to_string().repeat(96));
        writeln!(f, "Model: \"{}\"", self.title)?;
        rule(f, '_')?;
        writeln!(
            f,
            " {:<56}{:<26}{:>12}",
            "Layer (type)", "Output Shape", "Param #"
        )?;
        rule(f, '=')?;
        for layer in &self.layers {
            let shape = std::iter::once("None".to_string())
                .chain(layer.shape.iter().map(usize::to_string))
                .collect::<Vec<_>>()
                .join(", ");
            let name = format!("{} ({})", layer.name, layer.kind);
            writeln!(
                f,
                " {name:<56}{:<26}{:>12}",
                format!("({shape})"),
                thousands(layer.params)
            )?;
        }
        rule(f, '=')?;
        let total = self.total();
        writeln!(f, "Total params: {}", thousands(total))?;
        for &(phase, trainable) in &self.trainable {
            let label = match self.trainable.len() {
                1 => String::new(),
                _ => format!(" in phase {}", phase_name(phase)),
            };
            writeln!(f, "Trainable params{label}: {}", thousands(trainable))?;
            writeln!(f, "Non-trainable params{label}: {}", thousands(total - trainable))?;
        }
        rule(f, '_')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b0_counts_what_keras_and_torchvision_count() {
        let cfg = EfficientNetConfig::from_name("efficientnet-b0").unwrap();
        let s = summarize(&cfg, None, 10, 224, &[Phase::Head, Phase::FineTune]);
        // torchvision's efficientnet_b0().features has 4,007,548 parameters and 42,016
        // BatchNorm statistics; Keras's EfficientNetB0(include_top=False) prints 4,049,571,
        // the same plus its Normalization layer's 7 numbers.
        assert_eq!(s.total(), 4_007_548 + 42_016);
        assert_eq!(s.total() + 7, 4_049_571);
        let finetune = s.trainable[1].1;
        // Phase 2 trains every parameter but BatchNorm's gamma and beta (as many as the
        // statistics: two per channel).
        assert_eq!(finetune, 4_007_548 - 42_016);
        assert_eq!(
            s.trainable[0].1, 0,
            "the backbone alone has nothing to train in phase 1"
        );
        let last = s.layers.last().unwrap();
        assert_eq!(
            (last.name.as_str(), last.shape.as_slice()),
            ("backbone.head.bn", &[1280, 7, 7][..])
        );
        // Keras's top_bn: 1,280 gamma and beta each (the 2,560 its tutorial unfreezes) and as
        // many moving means and variances.
        assert_eq!(last.params, 4 * 1280);
    }

    #[test]
    fn heads_add_their_layers_and_phase_one_trains_only_them() {
        let cfg = EfficientNetConfig::from_name("efficientnet-lite0").unwrap();
        let linear = summarize(
            &cfg,
            Some(HeadKind::Linear),
            10,
            224,
            &[Phase::Head, Phase::Scratch],
        );
        let fc = 1280 * 10 + 10;
        assert_eq!(linear.trainable[0].1, fc);
        let backbone = summarize(&cfg, None, 10, 224, &[]).total();
        assert_eq!(linear.total(), backbone + fc);
        // From scratch everything trains but the BatchNorm statistics.
        let stats: usize = linear
            .layers
            .iter()
            .filter(|l| l.kind == "BatchNormalization")
            .map(|l| l.params / 2)
            .sum();
        assert_eq!(linear.trainable[1].1, linear.total() - stats);
        let tutorial = summarize(&cfg, Some(HeadKind::Tutorial), 10, 224, &[Phase::Head]);
        let head = (1280 * 49 * 7 + 7) + 4 * 7 + (7 * 512 + 512) + (512 * 10 + 10);
        assert_eq!(tutorial.total(), backbone + head);
        // Phase 1 trains the head's BatchNorm gamma and beta, not its statistics.
        assert_eq!(tutorial.trainable[0].1, head - 2 * 7);
        let text = tutorial.to_string();
        assert!(
            text.contains("head.conv (Conv2D)") && text.contains("(None, 7, 7, 7)"),
            "{text}"
        );
        assert!(
            text.contains(&format!("Total params: {}", thousands(tutorial.total()))),
            "{text}"
        );
        assert!(text.contains("Trainable params: 448,287"), "{text}");
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4_049_571), "4,049,571");
    }
}

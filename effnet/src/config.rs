//! One config struct for the whole EfficientNet family.
//!
//! Every variant is the B0 baseline scaled by the paper's width and depth coefficients; the
//! Lite variants change the block (no squeeze-excitation, ReLU6), the padding (TensorFlow
//! "SAME"), BatchNorm epsilon and keep the stem, the head and the first and last stages'
//! repeats unscaled.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How an image is turned into the model's input range, as Keras's in-model `Rescaling` does:
/// callers always pass raw 0..255 pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preprocess {
    /// Scale to 0..1, then subtract the ImageNet mean and divide by its standard deviation
    /// (torchvision and timm models).
    ImagenetMeanStd,
    /// `(x - 127) / 128` on 0..255 pixels (the TensorFlow Lite models).
    Symmetric127,
}

/// Activation used throughout the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    /// `x * sigmoid(x)`, the original EfficientNet activation.
    Silu,
    /// `min(max(x, 0), 6)`, friendlier to quantisation, used by the Lite models.
    Relu6,
}

/// Convolution padding convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Padding {
    /// `(k - 1) / 2` on every side, as PyTorch models use.
    Symmetric,
    /// TensorFlow "SAME": output size `ceil(in / stride)`, the odd pixel of padding at the
    /// bottom and right.
    TfSame,
}

/// One stage of the B0 baseline, before scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageSpec {
    /// Expansion ratio of the inverted bottleneck.
    pub expand_ratio: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Stride of the first block of the stage.
    pub stride: usize,
    /// Input channels of the stage, before width scaling.
    pub in_channels: usize,
    /// Output channels of the stage, before width scaling.
    pub out_channels: usize,
    /// Number of blocks, before depth scaling.
    pub repeats: usize,
}

/// The B0 baseline stages (Tan & Le, 2019, table 1).
pub const B0_STAGES: [StageSpec; 7] = [
    stage(1, 3, 1, 32, 16, 1),
    stage(6, 3, 2, 16, 24, 2),
    stage(6, 5, 2, 24, 40, 2),
    stage(6, 3, 2, 40, 80, 3),
    stage(6, 5, 1, 80, 112, 3),
    stage(6, 5, 2, 112, 192, 4),
    stage(6, 3, 1, 192, 320, 1),
];

const fn stage(
    expand_ratio: usize,
    kernel: usize,
    stride: usize,
    in_channels: usize,
    out_channels: usize,
    repeats: usize,
) -> StageSpec {
    StageSpec {
        expand_ratio,
        kernel,
        stride,
        in_channels,
        out_channels,
        repeats,
    }
}

/// A fully resolved block: what one MBConv layer is built from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockSpec {
    /// Index of the stage this block belongs to.
    pub stage: usize,
    /// Index of the block inside its stage.
    pub index_in_stage: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Channels after expansion (equal to `in_channels` when the ratio is 1).
    pub expanded_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Depthwise stride.
    pub stride: usize,
    /// Squeeze-excitation bottleneck width, `None` when the block has no SE.
    pub se_channels: Option<usize>,
    /// Probability of dropping the residual branch while training.
    pub drop_path: f64,
}

/// Configuration of one EfficientNet model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EfficientNetConfig {
    /// Model name, e.g. `efficientnet-b0`.
    pub name: String,
    /// Channel multiplier.
    pub width: f64,
    /// Repeat multiplier.
    pub depth: f64,
    /// Native input resolution in pixels (square).
    pub resolution: usize,
    /// Dropout before the classifier.
    pub dropout: f64,
    /// Largest stochastic-depth probability (reached by the last block).
    pub stochastic_depth: f64,
    /// Whether blocks carry squeeze-excitation.
    pub squeeze_excitation: bool,
    /// Activation function.
    pub activation: Activation,
    /// Padding convention.
    pub padding: Padding,
    /// BatchNorm epsilon.
    pub bn_eps: f64,
    /// Lite models keep the stem, head and first and last stage repeats unscaled.
    pub lite: bool,
    /// Input scaling applied inside the model.
    pub preprocess: Preprocess,
}

/// Names accepted by [`EfficientNetConfig::from_name`].
pub const MODEL_NAMES: [&str; 13] = [
    "efficientnet-b0",
    "efficientnet-b1",
    "efficientnet-b2",
    "efficientnet-b3",
    "efficientnet-b4",
    "efficientnet-b5",
    "efficientnet-b6",
    "efficientnet-b7",
    "efficientnet-lite0",
    "efficientnet-lite1",
    "efficientnet-lite2",
    "efficientnet-lite3",
    "efficientnet-lite4",
];

impl EfficientNetConfig {
    /// EfficientNet-B`n` (0..=7) exactly as torchvision builds it.
    pub fn b(n: usize) -> Result<Self> {
        // (width, depth, resolution, dropout) from the paper and torchvision.
        const COEFFS: [(f64, f64, usize, f64); 8] = [
            (1.0, 1.0, 224, 0.2),
            (1.0, 1.1, 240, 0.2),
            (1.1, 1.2, 260, 0.3),
            (1.2, 1.4, 300, 0.3),
            (1.4, 1.8, 380, 0.4),
            (1.6, 2.2, 456, 0.4),
            (1.8, 2.6, 528, 0.5),
            (2.0, 3.1, 600, 0.5),
        ];
        let &(width, depth, resolution, dropout) = COEFFS
            .get(n)
            .ok_or_else(|| Error::UnknownModel(format!("efficientnet-b{n}")))?;
        Ok(Self {
            name: format!("efficientnet-b{n}"),
            width,
            depth,
            resolution,
            dropout,
            stochastic_depth: 0.2,
            squeeze_excitation: true,
            activation: Activation::Silu,
            padding: Padding::Symmetric,
            // torchvision ports B5-B7 from TensorFlow with its BatchNorm epsilon.
            bn_eps: if n >= 5 { 1e-3 } else { 1e-5 },
            lite: false,
            preprocess: Preprocess::ImagenetMeanStd,
        })
    }

    /// EfficientNet-Lite`n` (0..=4), the TensorFlow Lite variants.
    pub fn lite(n: usize) -> Result<Self> {
        const COEFFS: [(f64, f64, usize, f64); 5] = [
            (1.0, 1.0, 224, 0.2),
            (1.0, 1.1, 240, 0.2),
            (1.1, 1.2, 260, 0.3),
            (1.2, 1.4, 280, 0.3),
            (1.4, 1.8, 300, 0.3),
        ];
        let &(width, depth, resolution, dropout) = COEFFS
            .get(n)
            .ok_or_else(|| Error::UnknownModel(format!("efficientnet-lite{n}")))?;
        Ok(Self {
            name: format!("efficientnet-lite{n}"),
            width,
            depth,
            resolution,
            dropout,
            stochastic_depth: 0.2,
            squeeze_excitation: false,
            activation: Activation::Relu6,
            padding: Padding::TfSame,
            bn_eps: 1e-3,
            lite: true,
            preprocess: Preprocess::Symmetric127,
        })
    }

    /// Look a model up by name (`efficientnet-b0` .. `efficientnet-b7`,
    /// `efficientnet-lite0` .. `efficientnet-lite4`; `_` is accepted for `-`).
    pub fn from_name(name: &str) -> Result<Self> {
        let normalized = name.trim().to_ascii_lowercase().replace('_', "-");
        let unknown = || Error::UnknownModel(name.to_string());
        let rest = normalized.strip_prefix("efficientnet-").ok_or_else(unknown)?;
        if let Some(n) = rest.strip_prefix("lite") {
            Self::lite(n.parse().map_err(|_| unknown())?).map_err(|_| unknown())
        } else if let Some(n) = rest.strip_prefix('b') {
            Self::b(n.parse().map_err(|_| unknown())?).map_err(|_| unknown())
        } else {
            Err(unknown())
        }
    }

    /// Override the width multiplier (used for small test models).
    pub fn with_width(mut self, width: f64) -> Self {
        self.width = width;
        self
    }

    /// Override the depth multiplier (used for small test models).
    pub fn with_depth(mut self, depth: f64) -> Self {
        self.depth = depth;
        self
    }

    /// Override the classifier dropout.
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }

    /// Override the largest stochastic-depth probability.
    pub fn with_stochastic_depth(mut self, p: f64) -> Self {
        self.stochastic_depth = p;
        self
    }

    /// Channels after width scaling, rounded to a multiple of 8 and never more than 10% down.
    pub fn scale_channels(&self, channels: usize) -> usize {
        make_divisible(channels as f64 * self.width, 8)
    }

    fn scale_repeats(&self, stage: usize, repeats: usize) -> usize {
        if self.lite && (stage == 0 || stage == B0_STAGES.len() - 1) {
            repeats
        } else {
            (repeats as f64 * self.depth).ceil() as usize
        }
    }

    /// Output channels of the stem convolution.
    pub fn stem_channels(&self) -> usize {
        if self.lite { 32 } else { self.scale_channels(32) }
    }

    /// Channels of the final 1x1 convolution: the backbone's feature width.
    pub fn head_channels(&self) -> usize {
        if self.lite {
            1280
        } else {
            4 * self.scale_channels(B0_STAGES[B0_STAGES.len() - 1].out_channels)
        }
    }

    /// Every MBConv block in order, with channels, strides and drop-path rates resolved.
    pub fn blocks(&self) -> Vec<BlockSpec> {
        let total: usize = B0_STAGES
            .iter()
            .enumerate()
            .map(|(s, st)| self.scale_repeats(s, st.repeats))
            .sum();
        let mut blocks = Vec::with_capacity(total);
        let mut in_channels = self.stem_channels();
        for (s, st) in B0_STAGES.iter().enumerate() {
            let out_channels = self.scale_channels(st.out_channels);
            for i in 0..self.scale_repeats(s, st.repeats) {
                let expanded = in_channels * st.expand_ratio;
                // torchvision sizes the SE bottleneck from the block input, not the expansion.
                let se_channels = self.squeeze_excitation.then(|| (in_channels / 4).max(1));
                blocks.push(BlockSpec {
                    stage: s,
                    index_in_stage: i,
                    in_channels,
                    expanded_channels: expanded,
                    out_channels,
                    kernel: st.kernel,
                    stride: if i == 0 { st.stride } else { 1 },
                    se_channels,
                    drop_path: self.stochastic_depth * blocks.len() as f64 / total as f64,
                });
                in_channels = out_channels;
            }
        }
        blocks
    }
}

/// torchvision's and TensorFlow's `_make_divisible`.
fn make_divisible(value: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let rounded = (((value + d / 2.0) / d).floor() * d).max(d);
    let rounded = if rounded < 0.9 * value {
        rounded + d
    } else {
        rounded
    };
    rounded as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b0_has_the_torchvision_block_layout() {
        let cfg = EfficientNetConfig::b(0).unwrap();
        let blocks = cfg.blocks();
        assert_eq!(blocks.len(), 16);
        assert_eq!(cfg.stem_channels(), 32);
        assert_eq!(cfg.head_channels(), 1280);
        let first = blocks[0];
        assert_eq!(
            (first.in_channels, first.expanded_channels, first.out_channels),
            (32, 32, 16)
        );
        assert_eq!(first.se_channels, Some(8));
        let last = blocks[15];
        assert_eq!((last.in_channels, last.out_channels, last.kernel), (192, 320, 3));
        assert_eq!(last.se_channels, Some(48));
        assert!((last.drop_path - 0.2 * 15.0 / 16.0).abs() < 1e-12);
        let strides: Vec<usize> = blocks.iter().map(|b| b.stride).collect();
        assert_eq!(strides, [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]);
    }

    #[test]
    fn scaled_variants_match_torchvision_widths_and_depths() {
        // Values from torchvision's efficientnet_b{n} state dicts.
        let cases = [(3, 40, 1536, 26), (4, 48, 1792, 32), (7, 64, 2560, 55)];
        for (n, stem, head, blocks) in cases {
            let cfg = EfficientNetConfig::b(n).unwrap();
            assert_eq!(cfg.stem_channels(), stem, "b{n} stem");
            assert_eq!(cfg.head_channels(), head, "b{n} head");
            assert_eq!(cfg.blocks().len(), blocks, "b{n} blocks");
        }
    }

    #[test]
    fn lite_keeps_stem_head_and_end_stages_unscaled() {
        let cfg = EfficientNetConfig::lite(4).unwrap();
        assert_eq!(cfg.stem_channels(), 32);
        assert_eq!(cfg.head_channels(), 1280);
        let blocks = cfg.blocks();
        assert_eq!(blocks.iter().filter(|b| b.stage == 0).count(), 1);
        assert_eq!(blocks.iter().filter(|b| b.stage == 6).count(), 1);
        assert!(blocks.iter().all(|b| b.se_channels.is_none()));
        assert_eq!(EfficientNetConfig::lite(0).unwrap().blocks().len(), 16);
    }

    #[test]
    fn names_resolve_and_unknown_names_are_rejected() {
        assert_eq!(
            EfficientNetConfig::from_name("EfficientNet_B2")
                .unwrap()
                .resolution,
            260
        );
        assert_eq!(
            EfficientNetConfig::from_name("efficientnet-lite0")
                .unwrap()
                .bn_eps,
            1e-3
        );
        for bad in [
            "efficientnet-b8",
            "resnet50",
            "efficientnet-lite",
            "efficientnet-",
        ] {
            let err = EfficientNetConfig::from_name(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
            assert!(err.contains("efficientnet-b0"), "error lists valid names: {err}");
        }
    }
}

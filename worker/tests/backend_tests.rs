//! Every backend computes what flex computes: the same weights and images give the same
//! logits, loss, gradients, updated weights and BatchNorm statistics with flex's fused kernels
//! and with Burn's own ops on flex (`effnet::native`, every build), on LibTorch (the
//! `libtorch` feature) and on a wgpu device (the `wgpu` feature; in CI Mesa's lavapipe, a
//! software Vulkan device). These are the tests that catch a host-only assumption, a tensor
//! on the wrong device, or a fused kernel that computes something else.

use std::path::PathBuf;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use effnet::config::{EfficientNetConfig, Padding};
use effnet::model::{Classifier, HeadKind};
use effnet::phase::{self, Phase};
use worker::grads::flatten;
use worker::transfer::Transfers;

/// The step's learning rate.
const LR: f32 = 1e-3;

/// What one step produced, read back to the host.
struct Outcome {
    logits: Vec<f32>,
    loss: f32,
    grads: Vec<f32>,
    /// Every trainable float parameter after the Adam update, in visit order.
    weights: Vec<f32>,
    /// Inference logits after the update: new weights and BatchNorm running statistics.
    after: Vec<f32>,
}

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

struct Weights(Vec<f32>);

impl ModuleVisitor for Weights {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data().convert::<f32>();
        self.0.extend(data.try_to_vec::<f32>().unwrap());
    }
}

/// One step of phase `how` on `device` (an autodiff device), mirroring the trainer: the head
/// phase runs the frozen backbone outside the graph and updates the head alone; fine-tuning
/// and training from scratch (every BatchNorm in training mode) update the whole network.
fn step(model: Classifier, how: Phase, x: &Tensor<4>, labels: &TensorData, device: &Device) -> Outcome {
    let x = x.clone().to_device(device);
    let y = Tensor::<1, Int>::from_data(labels.clone(), device);
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut adam = AdamConfig::new().init();
    let (logits, loss, grads, model) = match how {
        Phase::Head => {
            let mut model = phase::prepare(model, Phase::Head);
            let frozen = model.valid();
            let features = frozen.head_input(x.clone().inner());
            let logits = model.head.forward(Tensor::from_inner(features));
            let loss = loss_fn.forward(logits.clone(), y);
            let grads = GradientsParams::from_grads(loss.backward(), &model.head);
            let flat = flatten(&model.head, &grads, &Transfers::default()).unwrap();
            model.head = adam.step(f64::from(LR), model.head, grads);
            (logits, loss, flat, model)
        }
        Phase::FineTune | Phase::Scratch => {
            let model = phase::prepare(model, how);
            let logits = model.forward(x.clone());
            let loss = loss_fn.forward(logits.clone(), y);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let flat = flatten(&model, &grads, &Transfers::default()).unwrap();
            let model = adam.step(f64::from(LR), model, grads);
            (logits, loss, flat, model)
        }
    };
    let mut weights = Weights(Vec::new());
    model.visit(&mut weights);
    let after = host(model.valid().forward(x.inner()));
    let loss = loss.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()[0];
    Outcome {
        logits: host(logits),
        loss,
        grads,
        weights: weights.0,
        after,
    }
}

/// Largest absolute difference, and the largest magnitude of `a` (the scale it is judged by).
fn gap(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let diff = a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = a.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    (diff, scale)
}

/// Within `tolerance` of the largest magnitude (float sums in another order differ by a few
/// ulps per layer; a wrong kernel differs by the values' own size).
fn assert_close(what: &str, a: &[f32], b: &[f32], tolerance: f32) {
    let (diff, scale) = gap(a, b);
    println!("{what}: largest difference {diff:e}, largest value {scale:e}");
    assert!(
        diff <= tolerance * scale.max(1e-6),
        "{what} differ by {diff} (largest value {scale}, tolerance {tolerance} of it)"
    );
}

/// Adam's first step moves each weight by about the learning rate times the sign of its
/// gradient, so a gradient that is zero up to float noise may move a weight either way on
/// two backends: at most that many such weights (of every thousand), and never by more than
/// two steps. An optimizer computing something else moves nearly every weight differently.
fn assert_updates_close(what: &str, a: &[f32], b: &[f32], lr: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let apart = a
        .iter()
        .zip(b)
        .filter(|(a, b)| (*a - *b).abs() > 1e-2 * lr)
        .count();
    let (diff, _) = gap(a, b);
    println!(
        "{what}: {apart} of {} differ by more than {:e}, largest difference {diff:e}",
        a.len(),
        1e-2 * lr
    );
    assert!(
        apart <= a.len() / 1000,
        "{what}: {apart} of {} weights differ",
        a.len()
    );
    assert!(
        diff <= 2.0 * lr * 1.01,
        "{what}: a weight differs by {diff} (learning rate {lr})"
    );
}

/// The network a comparison starts from.
#[derive(Clone, Copy, Debug)]
enum Start {
    /// A scaled-down B0 (SiLU, squeeze-excitation), randomly initialised, with this padding.
    RandomB0(Padding),
    /// The real ImageNet Lite0 (ReLU6, TF-style "same" padding). A frozen random backbone
    /// passes next to nothing on (its activations shrink to ~1e-13), so the phase steps
    /// start from real weights.
    Lite0,
}

/// The real Lite0 weights; `None` (the caller skips, saying so) outside CI without them.
fn lite0_weights() -> Option<PathBuf> {
    let path = std::env::var_os("EFFNET_LITE0_WEIGHTS").map(PathBuf::from);
    if path.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set EFFNET_LITE0_WEIGHTS"
        );
        eprintln!("skipped: set EFFNET_LITE0_WEIGHTS to efficientnet-lite0-57934424.pth");
    }
    path
}

/// `start` on `device` with a fresh head of `kind`: random weights from the device's seeded
/// generator, or the file's.
fn network(start: Start, kind: HeadKind, device: &Device) -> Classifier {
    // No dropout or stochastic depth: their masks come from each backend's own generator.
    let cfg = |cfg: EfficientNetConfig| cfg.with_dropout(0.0).with_stochastic_depth(0.0);
    match start {
        Start::RandomB0(padding) => {
            let mut cfg = cfg(EfficientNetConfig::b(0).unwrap().with_width(0.5).with_depth(0.5));
            cfg.padding = padding;
            Classifier::new(&cfg, 10, device).with_head(kind, 10, 0.0, device)
        }
        Start::Lite0 => {
            let path = lite0_weights().expect("checked by the caller");
            let cfg = cfg(EfficientNetConfig::lite(0).unwrap());
            let file = effnet::weights::read_weights(&path).unwrap();
            let (model, _) =
                effnet::weights::apply_weights(Classifier::new(&cfg, 1000, device), &cfg, &file, &path)
                    .unwrap();
            model.with_head(kind, 10, 0.0, device)
        }
    }
}

/// The same step on flex and on `other`, from the same weights and images, compared.
#[cfg(any(feature = "libtorch", feature = "wgpu"))]
fn compare_steps(other: &Device, how: Phase, start: Start) {
    compare(other, Ops::Fused, how, start);
}

/// Which operations `other` runs in [`compare`].
#[derive(Clone, Copy, PartialEq)]
enum Ops {
    /// Whatever `effnet::native` picks for the device (flex: the fused kernels).
    #[cfg_attr(not(any(feature = "libtorch", feature = "wgpu")), allow(dead_code))]
    Fused,
    /// Burn's own (`effnet::native::with_burn_ops`).
    Burn,
}

/// [`compare_steps`], with `other` running `ops`.
fn compare(other: &Device, ops: Ops, how: Phase, start: Start) {
    if matches!(start, Start::Lite0) && lite0_weights().is_none() {
        return;
    }
    let flex = Device::flex().autodiff();
    let other = other.clone().autodiff();
    flex.seed(7);
    let kind = match how {
        // The tutorial head has a BatchNorm that trains in phase 1.
        Phase::Head => HeadKind::Tutorial,
        _ => HeadKind::Linear,
    };
    let model = network(start, kind, &flex);
    // A model of its own, loaded with the same values: a clone would share the BatchNorm
    // running statistics (RunningState is shared between clones) and see both updates.
    let twin = network(start, kind, &other).load_record(model.clone().into_record());
    let x = Tensor::<4>::random([4, 3, 48, 48], Distribution::Uniform(0.0, 255.0), &flex);
    let labels = TensorData::new(vec![0i64, 3, 7, 9], [4]);
    let a = step(model, how, &x, &labels, &flex);
    let b = match ops {
        Ops::Fused => step(twin, how, &x, &labels, &other),
        Ops::Burn => effnet::native::with_burn_ops(|| step(twin, how, &x, &labels, &other)),
    };
    let what = format!("{how:?}, {start:?}");
    assert_close(&format!("{what}: logits"), &a.logits, &b.logits, 1e-3);
    assert!(
        (a.loss - b.loss).abs() <= 1e-4,
        "{what}: loss {} vs {}",
        a.loss,
        b.loss
    );
    let least = match how {
        Phase::Head => 5_000,
        _ => 100_000,
    };
    assert!(a.grads.len() > least, "{what}: {} gradients", a.grads.len());
    assert_close(&format!("{what}: gradients"), &a.grads, &b.grads, 1e-3);
    assert_updates_close(&format!("{what}: updated weights"), &a.weights, &b.weights, LR);
    assert_close(
        &format!("{what}: logits after the update"),
        &a.after,
        &b.after,
        1e-3,
    );
}

/// Flex's fused kernels (`cpu-kernels`, through `effnet::native`) against Burn's own ops on
/// flex: every phase, both paddings, SiLU and squeeze-excitation (B0) and ReLU6 (Lite0).
mod kernels {
    use super::*;

    #[test]
    fn fused_kernels_train_from_scratch_as_burns_ops_do() {
        for padding in [Padding::Symmetric, Padding::TfSame] {
            compare(
                &Device::flex(),
                Ops::Burn,
                Phase::Scratch,
                Start::RandomB0(padding),
            );
        }
    }

    #[test]
    fn fused_kernels_fine_tune_as_burns_ops_do() {
        // Frozen BatchNorm: every convolution folded, with a bias.
        compare(
            &Device::flex(),
            Ops::Burn,
            Phase::FineTune,
            Start::RandomB0(Padding::TfSame),
        );
        compare(&Device::flex(), Ops::Burn, Phase::FineTune, Start::Lite0);
    }

    #[test]
    fn fused_kernels_take_phase1_steps_as_burns_ops_do() {
        compare(&Device::flex(), Ops::Burn, Phase::Head, Start::Lite0);
    }
}

#[cfg(feature = "libtorch")]
mod libtorch {
    use super::*;
    use effnet::device::{CpuBackend, cpu};

    /// The LibTorch backend must train the same network, with symmetric padding and with
    /// TF-style "same" (uneven at stride 2: crate::native pads those inputs itself).
    #[test]
    fn libtorch_computes_what_flex_computes() {
        let torch = cpu(CpuBackend::Libtorch).unwrap();
        for padding in [Padding::Symmetric, Padding::TfSame] {
            compare_steps(&torch, Phase::Scratch, Start::RandomB0(padding));
        }
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    use effnet::device::{Choice, GpuBackend};

    fn vulkan() -> Device {
        let choice = Choice {
            gpu: Some(0),
            gpu_backend: Some(GpuBackend::Wgpu),
            ..Choice::default()
        };
        let selected = choice
            .select()
            .expect("a Vulkan device (CI installs Mesa's lavapipe: mesa-vulkan-drivers)");
        println!("device: {}", selected.name);
        assert!(selected.name.starts_with("vulkan:0 ("), "{}", selected.name);
        selected.device
    }

    #[test]
    fn wgpu_trains_from_scratch_as_flex_does() {
        compare_steps(&vulkan(), Phase::Scratch, Start::RandomB0(Padding::Symmetric));
    }

    #[test]
    fn wgpu_phase1_step_matches_flex() {
        compare_steps(&vulkan(), Phase::Head, Start::Lite0);
    }

    #[test]
    fn wgpu_phase2_step_matches_flex() {
        compare_steps(&vulkan(), Phase::FineTune, Start::Lite0);
    }

    /// The real ImageNet Lite0 weights on the two real photographs: the Vulkan device gives
    /// flex's logits. Tolerance: 1e-3 of the largest logit. Forty-odd layers of float sums in
    /// another order (tiled matrix products, tree reductions) differ from flex by ~1e-5
    /// relative; a kernel that computes something else is off by the logits' own size.
    #[test]
    fn wgpu_real_lite0_logits_match_flex() {
        let (Some(weights), Some(photos)) = (
            std::env::var_os("EFFNET_LITE0_WEIGHTS").map(PathBuf::from),
            std::env::var_os("EFFNET_TEST_PHOTOS").map(PathBuf::from),
        ) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set EFFNET_LITE0_WEIGHTS and EFFNET_TEST_PHOTOS"
            );
            eprintln!("skipped: set EFFNET_LITE0_WEIGHTS and EFFNET_TEST_PHOTOS");
            return;
        };
        let cfg = EfficientNetConfig::lite(0).unwrap();
        let file = effnet::weights::read_weights(&weights).unwrap();
        let images: Vec<Vec<u8>> = ["chelsea.png", "coffee.png"]
            .iter()
            .map(|name| effnet::image::load_rgb(&photos.join(name), 224).unwrap())
            .collect();
        let logits = |device: &Device| {
            let (model, _) =
                effnet::weights::apply_weights(Classifier::new(&cfg, 1000, device), &cfg, &file, &weights)
                    .unwrap();
            host(model.forward(effnet::image::to_tensor(&images, 224, device)))
        };
        let flex = logits(&Device::flex());
        let ours = logits(&vulkan());
        assert_close("Lite0 logits on the photos", &flex, &ours, 1e-3);
        let top = |v: &[f32]| {
            (0..v.len())
                .max_by(|&i, &j| v[i].total_cmp(&v[j]))
                .unwrap_or_default()
        };
        // Egyptian cat and espresso, as on flex.
        assert_eq!(top(&ours[..1000]), 285);
        assert_eq!(top(&ours[1000..]), 967);
    }
}

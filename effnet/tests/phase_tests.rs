//! What each phase trains: which parameters receive gradients, and whether BatchNorm
//! statistics move during a step. (Checked on gradients rather than on weight changes: a
//! randomly initialised network in inference mode has vanishing activations, in torchvision as
//! here, so weight updates of a frozen-backbone step can be below float resolution.)

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use effnet::config::EfficientNetConfig;
use effnet::model::{Classifier, HeadKind};
use effnet::phase::{Phase, prepare};
use effnet::weights::{ModulePath, collect_tensors};

fn model(device: &Device) -> Classifier {
    let cfg = EfficientNetConfig::b(0)
        .unwrap()
        .with_width(0.25)
        .with_depth(0.25)
        .with_dropout(0.0);
    Classifier::new(&cfg, 3, device)
}

/// Gradients of one training batch.
fn grads(m: &Classifier, device: &Device) -> GradientsParams {
    let n = 4;
    let data: Vec<f32> = (0..n * 3 * 32 * 32).map(|p| ((p * 7) % 256) as f32).collect();
    let x = Tensor::<4>::from_data(TensorData::new(data, [n, 3, 32, 32]), device);
    let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 1], [n]), device);
    let loss = CrossEntropyLossConfig::new()
        .init(device)
        .forward(m.forward(x), y);
    GradientsParams::from_grads(loss.backward(), m)
}

/// Module paths of the parameters that received a gradient.
fn with_grads(m: &Classifier, grads: &GradientsParams) -> Vec<String> {
    struct V<'a> {
        grads: &'a GradientsParams,
        path: ModulePath,
        out: Vec<String>,
    }
    impl ModuleVisitor for V<'_> {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.enter(name, container);
        }
        fn exit_module(&mut self, _: &str, container: &str) {
            self.path.exit(container);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.grads.get::<D>(param.id).is_some() {
                self.out.push(self.path.joined());
            }
        }
    }
    let mut v = V {
        grads,
        path: ModulePath::default(),
        out: Vec::new(),
    };
    m.visit(&mut v);
    v.out
}

/// BatchNorm statistics that a training step changes. Values are copied before the step:
/// clones of a module share their running statistics.
fn stats_moved_by_step(m: Classifier, device: &Device) -> Vec<String> {
    let stats = |m: &Classifier| {
        collect_tensors(&m.valid())
            .into_iter()
            .filter(|(n, _)| n.contains("running_"))
            .collect::<Vec<_>>()
    };
    let before = stats(&m);
    let g = grads(&m, device);
    let after = stats(&SgdConfig::new().init().step(0.5, m, g));
    before
        .iter()
        .zip(&after)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, _)| a.0.clone())
        .collect()
}

#[test]
fn head_phase_trains_only_the_head() {
    let device = Device::flex().autodiff();
    let m = prepare(model(&device), Phase::Head);
    assert_eq!(
        with_grads(&m, &grads(&m, &device)),
        ["head.fc.weight", "head.fc.bias"]
    );
    assert_eq!(stats_moved_by_step(m, &device), Vec::<String>::new());
}

#[test]
fn finetune_phase_trains_everything_but_batchnorm() {
    let device = Device::flex().autodiff();
    let m = prepare(model(&device), Phase::FineTune);
    let trained = with_grads(&m, &grads(&m, &device));
    let expected: Vec<String> = collect_tensors(&m)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !n.contains(".bn."))
        .collect();
    assert_eq!(
        trained, expected,
        "every conv and dense parameter, no BatchNorm one"
    );
    assert!(
        trained
            .iter()
            .any(|n| n == "backbone.blocks.0.depthwise.conv.weight")
    );
    assert_eq!(stats_moved_by_step(m, &device), Vec::<String>::new());
}

#[test]
fn scratch_phase_trains_everything_and_batchnorm_follows_the_batch() {
    // Phase 1 of a run from random weights: nothing is frozen, BatchNorm included.
    let device = Device::flex().autodiff();
    let m = prepare(prepare(model(&device), Phase::Head), Phase::Scratch);
    let trained = with_grads(&m, &grads(&m, &device));
    let parameters: Vec<String> = collect_tensors(&m)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !n.contains("running_"))
        .collect();
    assert_eq!(
        trained, parameters,
        "every parameter, BatchNorm's gamma and beta too"
    );
    let moved = stats_moved_by_step(m, &device);
    assert!(
        moved.iter().any(|n| n == "backbone.stem.bn.running_mean"),
        "{moved:?}"
    );
}

#[test]
fn an_unfrozen_model_would_train_batchnorm() {
    // The control for the two tests above: without the phases, BatchNorm trains and its
    // statistics follow the batch.
    let device = Device::flex().autodiff();
    let m = model(&device);
    assert!(
        with_grads(&m, &grads(&m, &device))
            .iter()
            .any(|n| n.ends_with("bn.gamma"))
    );
    assert!(
        stats_moved_by_step(m, &device)
            .iter()
            .any(|n| n.ends_with("bn.running_mean"))
    );
}

fn tutorial_model(device: &Device) -> Classifier {
    model(device).with_head(HeadKind::Tutorial, 3, 0.0, device)
}

#[test]
fn tutorial_head_phases_train_its_conv_and_dense_layers_and_its_batchnorm_only_in_phase_1() {
    let device = Device::flex().autodiff();
    let m = prepare(tutorial_model(&device), Phase::Head);
    let head: Vec<&str> = vec![
        "head.conv.weight",
        "head.conv.bias",
        "head.bn.gamma",
        "head.bn.beta",
        "head.fc1.weight",
        "head.fc1.bias",
        "head.fc2.weight",
        "head.fc2.bias",
    ];
    assert_eq!(with_grads(&m, &grads(&m, &device)), head);
    // The head's own BatchNorm learns in phase 1 (it is new); the backbone's never moves.
    let moved = stats_moved_by_step(m, &device);
    assert!(moved.iter().all(|n| n.starts_with("head.bn.")), "{moved:?}");
    let m = prepare(tutorial_model(&device), Phase::FineTune);
    let trained = with_grads(&m, &grads(&m, &device));
    assert!(
        trained.iter().any(|n| n == "head.conv.weight") && trained.iter().any(|n| n == "head.fc2.weight")
    );
    assert!(!trained.iter().any(|n| n.contains(".bn.")), "{trained:?}");
    assert_eq!(stats_moved_by_step(m, &device), Vec::<String>::new());
}

#[test]
fn a_tutorial_head_model_file_loads_back_with_its_head() {
    let device = Device::flex();
    let cfg = EfficientNetConfig::b(0)
        .unwrap()
        .with_width(0.25)
        .with_depth(0.25);
    let loaded = effnet::modelfile::LoadedModel {
        model: Classifier::new(&cfg, 3, &device).with_head(HeadKind::Tutorial, 3, 0.0, &device),
        config: cfg,
        classes: ["a", "b", "c"]
            .iter()
            .map(|c| effnet::modelfile::ClassLabel {
                label: c.to_string(),
                wnid: None,
            })
            .collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tutorial.safetensors");
    effnet::modelfile::save(&path, &loaded).unwrap();
    let back = effnet::modelfile::load(None, &effnet::modelfile::WeightsSource::File(path), &device).unwrap();
    assert_eq!(back.model.head.kind(), HeadKind::Tutorial);
    let x = Tensor::<4>::from_data(
        TensorData::new(
            (0..2 * 3 * 32 * 32).map(|p| (p % 251) as f32).collect::<Vec<_>>(),
            [2, 3, 32, 32],
        ),
        &device,
    );
    let a = loaded
        .model
        .valid()
        .forward(x.clone())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let b = back
        .model
        .valid()
        .forward(x)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(a.len(), 6);
    assert_eq!(a, b);
}

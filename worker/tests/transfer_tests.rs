//! How many host-device copies a training step makes, measured on the trainer itself: the
//! gradients cross once each way whatever the number of parameters, the batch and its labels
//! go up on the prefetch thread, and loss and accuracy stay on the device until the epoch
//! ends. On a GPU each copy is a synchronisation; this is the count that keeps a step there.

use burn::tensor::Device;
use cluster_proto::v1::{self, EpochWork};
use collective::{Ring, local};
use run_config::RunConfig;
use worker::train::{EpochOutcome, RingIo, Trainer};
use worker::watch::Beat;

/// A run on the generated set; `weights` is `none` (phase 1 then trains from scratch) or a
/// model file (its backbone is frozen in phase 1, as pretrained weights are).
fn config(feature_cache: bool, weights: &str) -> RunConfig {
    RunConfig {
        model: "efficientnet-lite0".into(),
        weights: weights.into(),
        data: "synthetic".into(),
        image_size: 32,
        batch_size: 4,
        synthetic_train: 40,
        synthetic_test: 8,
        limit_train: Some(16),
        limit_val: Some(4),
        limit_test: Some(4),
        augment: false,
        feature_cache,
        // The periodic weight checksums read every tensor back: not part of a step.
        checksum_every: 0,
        ..RunConfig::default()
    }
}

/// Train `epochs` (phase, epoch) in order on a ring of one; for each, the steps and the
/// copies those steps made.
fn copies_per_epoch(config: &RunConfig, epochs: &[(v1::Phase, u32)]) -> Vec<(u64, u64, u64)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut links = local::ring(1, 4);
    let (mut next, mut prev) = links.pop().unwrap();
    let mut io = RingIo {
        ring: Ring::new(1, 0, 1),
        next: &mut next,
        prev: &mut prev,
        handle: runtime.handle().clone(),
        seconds: 0.0,
        watch: Default::default(),
    };
    let device = Device::flex().autodiff();
    let mut trainer = Trainer::new(config, device, &mut io).unwrap();
    let beat = Beat::default();
    let mut first_step = 0;
    let mut out = Vec::new();
    for &(phase, epoch) in epochs {
        let work = EpochWork {
            phase: phase as i32,
            epoch,
            first_step,
            ..EpochWork::default()
        };
        let EpochOutcome::Done(result) = trainer.epoch(&work, &mut io, &beat).unwrap() else {
            panic!("the ring of one broke");
        };
        let (steps, copies) = trainer.step_transfers();
        assert_eq!(steps, result.steps);
        assert_eq!(result.train_count, 16, "every image trained once");
        out.push((steps, copies.downloads, copies.uploads));
        first_step += steps;
    }
    out
}

#[test]
fn a_step_copies_its_gradients_once_each_way_and_reads_no_loss() {
    let epochs = [(v1::Phase::Head, 0), (v1::Phase::Finetune, 0)];
    for (steps, downloads, uploads) in copies_per_epoch(&config(false, "none"), &epochs) {
        assert_eq!(steps, 4);
        // Down: the gradients. Up: the batch, its labels, the reduced gradients.
        assert_eq!(downloads, steps, "copies to the host in {steps} steps");
        assert_eq!(uploads, 3 * steps, "copies to the device in {steps} steps");
    }
}

#[test]
fn a_cached_head_step_uploads_no_pixels() {
    // The first epoch fills the cache from the backbone (the pixels go up for the misses);
    // the second finds every feature map in device memory.
    let epochs = [(v1::Phase::Head, 0), (v1::Phase::Head, 1)];
    // A randomly initialised model file: frozen in phase 1 like pretrained weights, so its
    // features are cached (with `--weights none` phase 1 trains everything, uncached).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random-lite0.safetensors");
    let device = Device::flex();
    let cfg = effnet::config::EfficientNetConfig::from_name("efficientnet-lite0").unwrap();
    let random = effnet::modelfile::LoadedModel {
        model: effnet::model::Classifier::new(&cfg, 10, &device),
        config: cfg,
        classes: (0..10)
            .map(|i| effnet::modelfile::ClassLabel {
                label: format!("class {i}"),
                wnid: None,
            })
            .collect(),
    };
    effnet::modelfile::save(&path, &random).unwrap();
    let counts = copies_per_epoch(&config(true, path.to_str().unwrap()), &epochs);
    let (steps, downloads, uploads) = counts[0];
    assert_eq!(
        (downloads, uploads),
        (steps, 3 * steps),
        "first epoch: {counts:?}"
    );
    let (steps, downloads, uploads) = counts[1];
    assert_eq!(
        (downloads, uploads),
        (steps, 2 * steps),
        "second epoch: {counts:?}"
    );
}

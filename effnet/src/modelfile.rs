//! Building a classifier from a weights choice, and our own model files.
//!
//! Our files are safetensors with Burn module paths as tensor names and three metadata
//! entries: `format` (`effnet-cluster/1`), `config` (the [`EfficientNetConfig`] as JSON) and
//! `classes` (a JSON list of `{label, wnid}`), so a fine-tuned model carries its class names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::config::EfficientNetConfig;
use crate::download;
use crate::error::{Error, Result};
use crate::imagenet;
use crate::model::{Classifier, HeadKind};
use crate::weights::{self, LoadReport};

/// Value of the `format` metadata entry of our model files.
pub const FORMAT: &str = "effnet-cluster/1";

/// A class the model predicts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassLabel {
    /// Human-readable name.
    pub label: String,
    /// WordNet id, for ImageNet classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wnid: Option<String>,
}

/// The ImageNet-1k classes as [`ClassLabel`]s.
pub fn imagenet_labels() -> Vec<ClassLabel> {
    imagenet::classes()
        .into_iter()
        .map(|c| ClassLabel {
            label: c.label.to_string(),
            wnid: Some(c.wnid.to_string()),
        })
        .collect()
}

/// Where a model's weights come from. (The worker adds a fourth source, a checkpoint of a
/// run: `worker::source::ModelSource`.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    /// Random initialisation.
    None,
    /// The canonical ImageNet weights, downloaded into the cache on first use.
    Imagenet,
    /// A local file: PyTorch, safetensors, or one of our model files.
    File(PathBuf),
}

impl std::str::FromStr for WeightsSource {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "none" => WeightsSource::None,
            "imagenet" => WeightsSource::Imagenet,
            path => WeightsSource::File(PathBuf::from(path)),
        })
    }
}

/// A classifier ready to use, with what it is and what it predicts.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network.
    pub model: Classifier,
    /// Its architecture.
    pub config: EfficientNetConfig,
    /// One label per output.
    pub classes: Vec<ClassLabel>,
}

/// Build the classifier for `model` (a name from [`crate::config::MODEL_NAMES`]; may be
/// `None` for our own model files, which name their architecture) with `weights`.
pub fn load(model: Option<&str>, weights: &WeightsSource, device: &Device) -> Result<LoadedModel> {
    let config = |default: &str| EfficientNetConfig::from_name(model.unwrap_or(default));
    match weights {
        WeightsSource::None => {
            let config = config("efficientnet-b0")?;
            let classes = imagenet_labels();
            Ok(LoadedModel {
                model: Classifier::new(&config, classes.len(), device),
                config,
                classes,
            })
        }
        WeightsSource::Imagenet => {
            let config = config("efficientnet-b0")?;
            let path = imagenet_weights(&config)?;
            load_external(config, &path, device)
        }
        WeightsSource::File(path) => {
            let file = weights::read_weights(path)?;
            if file.metadata.get("format").map(String::as_str) == Some(FORMAT) {
                load_ours(model, file, path, device)
            } else {
                load_external_file(config("efficientnet-b0")?, file, path, device)
            }
        }
    }
}

fn imagenet_weights(config: &EfficientNetConfig) -> Result<PathBuf> {
    if config.name != "efficientnet-b0" {
        return Err(Error::Download {
            url: String::new(),
            reason: format!(
                "no ImageNet weights download is built in for {}; pass --weights FILE \
                 (torchvision, timm or EfficientNet-PyTorch weights)",
                config.name
            ),
        });
    }
    let url = download::TORCHVISION_B0_URL;
    let prefix = download::sha256_prefix_from_name(url).unwrap_or_default();
    download::fetch_cached(
        url,
        &download::cache_dir().join("weights"),
        prefix,
        "EfficientNet-B0 ImageNet weights",
        "--weights FILE",
    )
}

fn load_external(config: EfficientNetConfig, path: &Path, device: &Device) -> Result<LoadedModel> {
    let file = weights::read_weights(path)?;
    load_external_file(config, file, path, device)
}

fn load_external_file(
    config: EfficientNetConfig,
    file: weights::WeightsFile,
    path: &Path,
    device: &Device,
) -> Result<LoadedModel> {
    let classes = imagenet_labels();
    let model = Classifier::new(&config, classes.len(), device);
    let (model, report) = weights::apply_weights(model, &config, &file, path)?;
    log_report(path, &report);
    Ok(LoadedModel {
        model,
        config,
        classes,
    })
}

/// One of our model files already in memory (`name` says where it came from, for errors).
pub fn from_bytes(model: Option<&str>, name: &Path, bytes: &[u8], device: &Device) -> Result<LoadedModel> {
    let file = weights::safetensors_from_bytes(name, bytes)?;
    if file.metadata.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(Error::ModelFile {
            path: name.to_path_buf(),
            reason: format!("not an effnet-cluster model file (metadata 'format' is not {FORMAT})"),
        });
    }
    load_ours(model, file, name, device)
}

fn load_ours(
    model: Option<&str>,
    file: weights::WeightsFile,
    path: &Path,
    device: &Device,
) -> Result<LoadedModel> {
    let meta = |key: &str| {
        file.metadata.get(key).ok_or_else(|| Error::ModelFile {
            path: path.to_path_buf(),
            reason: format!("metadata entry '{key}' is missing"),
        })
    };
    let config: EfficientNetConfig = serde_json::from_str(meta("config")?).map_err(|e| Error::ModelFile {
        path: path.to_path_buf(),
        reason: format!("metadata entry 'config' is not a model config: {e}"),
    })?;
    let classes: Vec<ClassLabel> = serde_json::from_str(meta("classes")?).map_err(|e| Error::ModelFile {
        path: path.to_path_buf(),
        reason: format!("metadata entry 'classes' is not a list of classes: {e}"),
    })?;
    if let Some(name) = model {
        let asked = EfficientNetConfig::from_name(name)?;
        if asked.name != config.name {
            return Err(Error::ModelFile {
                path: path.to_path_buf(),
                reason: format!(
                    "the file holds a {} model but --model {} was given",
                    config.name, asked.name
                ),
            });
        }
    }
    // The head's tensors say which head it is.
    let kind = if file.tensors.contains_key("head.conv.weight") {
        HeadKind::Tutorial
    } else {
        HeadKind::Linear
    };
    let mut net = Classifier::new(&config, classes.len(), device);
    if kind == HeadKind::Tutorial {
        net = net.with_head(kind, classes.len(), config.dropout, device);
    }
    let (net, report) = weights::apply_weights(net, &config, &file, path)?;
    log_report(path, &report);
    Ok(LoadedModel {
        model: net,
        config,
        classes,
    })
}

fn log_report(path: &Path, report: &LoadReport) {
    tracing::info!(
        file = %path.display(),
        scheme = ?report.scheme,
        tensors = report.applied,
        "loaded weights"
    );
}

/// Save a classifier with its architecture and class names, atomically.
pub fn save(path: &Path, model: &LoadedModel) -> Result<()> {
    weights::write_atomic(path, &to_bytes(path, model)?)
}

/// A classifier as the bytes of a model file (`path` names the destination in errors).
pub fn to_bytes(path: &Path, model: &LoadedModel) -> Result<Vec<u8>> {
    let tensors = weights::collect_tensors(&model.model);
    let config = serde_json::to_string(&model.config).map_err(|e| Error::ModelFile {
        path: path.to_path_buf(),
        reason: format!("cannot encode config: {e}"),
    })?;
    let classes = serde_json::to_string(&model.classes).map_err(|e| Error::ModelFile {
        path: path.to_path_buf(),
        reason: format!("cannot encode classes: {e}"),
    })?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("config".to_string(), config),
        ("classes".to_string(), classes),
    ]);
    weights::safetensors_bytes(path, &tensors, metadata)
}

//! Where a model comes from on the worker's command line: what the model crate loads (random,
//! ImageNet, a file) or the newest good checkpoint of a run.

use std::path::Path;

use burn::tensor::Device;
use effnet::modelfile::{self, LoadedModel, WeightsSource};

use crate::error::Result;

/// A `--weights` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// Random initialisation, the ImageNet weights, or a local file.
    Weights(WeightsSource),
    /// The newest good checkpoint under a checkpoint root: `s3://...`, `memory://...`,
    /// `file://...`, or a local directory holding `LATEST`.
    Checkpoint(String),
}

impl std::str::FromStr for ModelSource {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let checkpoint = ["s3://", "memory://", "file://"]
            .iter()
            .any(|scheme| s.starts_with(scheme))
            || Path::new(s).join("LATEST").is_file();
        Ok(if checkpoint {
            ModelSource::Checkpoint(s.to_string())
        } else {
            let Ok(weights) = s.parse();
            ModelSource::Weights(weights)
        })
    }
}

/// Build the classifier for `model` (may be `None` for our own model files and checkpoints,
/// which name their architecture) from `source`.
pub fn load(model: Option<&str>, source: &ModelSource, device: &Device) -> Result<LoadedModel> {
    match source {
        ModelSource::Weights(weights) => Ok(modelfile::load(model, weights, device)?),
        ModelSource::Checkpoint(url) => {
            let (name, bytes) = crate::state::latest_weights(url)?;
            Ok(modelfile::from_bytes(model, &name, &bytes, device)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn checkpoint_roots_are_told_from_weight_files() {
        let parse = |s: &str| s.parse::<ModelSource>().unwrap();
        assert_eq!(
            parse("s3://bucket/run"),
            ModelSource::Checkpoint("s3://bucket/run".into())
        );
        assert_eq!(
            parse("file:///tmp/run"),
            ModelSource::Checkpoint("file:///tmp/run".into())
        );
        assert_eq!(parse("none"), ModelSource::Weights(WeightsSource::None));
        assert_eq!(parse("imagenet"), ModelSource::Weights(WeightsSource::Imagenet));
        assert_eq!(
            parse("model.safetensors"),
            ModelSource::Weights(WeightsSource::File(PathBuf::from("model.safetensors")))
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("LATEST"), "step-1").unwrap();
        let root = dir.path().display().to_string();
        assert_eq!(parse(&root), ModelSource::Checkpoint(root.clone()));
    }
}

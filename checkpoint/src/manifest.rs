//! What a checkpoint says about itself, and the `LATEST` pointer.

use serde::{Deserialize, Serialize};

/// Version of the manifest format; a reader refuses newer ones with a clear message.
pub const FORMAT: u32 = 1;

/// One object of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    /// Name inside the checkpoint (`weights.safetensors`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the bytes, lowercase hex.
    pub sha256: String,
}

/// `MANIFEST.json`: written after every object, so its presence means the objects were
/// complete and verified when it was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The checkpoint's name (its prefix under the root).
    pub name: String,
    /// The run that wrote it; `--fresh` starts a new one.
    pub run_id: String,
    /// Training phase the checkpoint was taken in (`head`, `finetune`).
    pub phase: String,
    /// Epochs of that phase completed.
    pub epoch: u32,
    /// Optimizer steps completed in the whole run.
    pub step: u64,
    /// Validation accuracy after the epoch, when there was a validation split.
    pub val_accuracy: Option<f64>,
    /// Unix time of the commit, in milliseconds.
    pub committed_unix_ms: u64,
    /// Every object, with size and digest.
    pub objects: Vec<ObjectEntry>,
}

impl Manifest {
    /// The entry for `name`, if the checkpoint has that object.
    pub fn object(&self, name: &str) -> Option<&ObjectEntry> {
        self.objects.iter().find(|o| o.name == name)
    }
}

/// `LATEST`: the one committed checkpoint a reader starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latest {
    /// Name of the checkpoint.
    pub checkpoint: String,
    /// Its run.
    pub run_id: String,
}

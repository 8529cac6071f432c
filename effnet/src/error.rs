//! The model crate's error type: one variant per failure a caller can act on.

use std::path::PathBuf;

/// Result alias for the model crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A shape mismatch between a weights file and the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// Name of the tensor in the file.
    pub key: String,
    /// Shape the model needs (in the file's layout).
    pub expected: Vec<usize>,
    /// Shape found in the file.
    pub found: Vec<usize>,
}

/// Everything that can go wrong building, loading, saving or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model name is not one of the supported EfficientNet variants.
    #[error(
        "unknown model '{0}': expected one of efficientnet-b0 .. efficientnet-b7, \
         efficientnet-lite0 .. efficientnet-lite4"
    )]
    UnknownModel(String),

    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error (in the message, not repeated as a source).
        error: std::io::Error,
    },

    /// A weights file could not be parsed (truncated, corrupt or not a weights file).
    #[error("cannot read weights from {}: {reason}", path.display())]
    WeightsFormat {
        /// The weights file.
        path: PathBuf,
        /// What was wrong, with the offending tensor or offset where known.
        reason: String,
    },

    /// The weights file is readable but does not fit the model.
    #[error("{}", format_mismatch(path, model, missing, unexpected, mismatched))]
    WeightsMismatch {
        /// The weights file.
        path: PathBuf,
        /// The model the weights were loaded into.
        model: String,
        /// Tensors the model needs that the file lacks.
        missing: Vec<String>,
        /// Tensors in the file that the model has no place for.
        unexpected: Vec<String>,
        /// Tensors present in both with different shapes.
        mismatched: Vec<ShapeMismatch>,
    },

    /// A download failed.
    #[error("download of {url} failed: {reason}")]
    Download {
        /// What was being downloaded.
        url: String,
        /// Why it failed, with what the user can do about it.
        reason: String,
    },

    /// A downloaded or cached file does not have the expected checksum.
    #[error("{} has sha256 {found}, expected a digest starting with {expected}; delete it and retry", path.display())]
    Checksum {
        /// The file that failed the check.
        path: PathBuf,
        /// The expected digest (or prefix).
        expected: String,
        /// The digest found.
        found: String,
    },

    /// An image could not be decoded.
    #[error("cannot decode image {}: {reason}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's complaint.
        reason: String,
    },

    /// A model file of ours is missing metadata it needs.
    #[error("{}: {reason}", path.display())]
    ModelFile {
        /// The model file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The requested device cannot be used with this build or machine.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
}

/// Why a device cannot be used: each case names what to install, rebuild or pass instead.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The binary was built without the backend asked for.
    #[error(
        "{asked} requested, but this worker binary was built without {backend}; rebuild with \
         `{build}` (see the README), or {instead}"
    )]
    NotBuilt {
        /// What the command line asked for (`--gpu 0`, `--cpu-backend libtorch`).
        asked: String,
        /// The backend that is missing.
        backend: &'static str,
        /// The build command that includes it.
        build: &'static str,
        /// What works with this binary.
        instead: &'static str,
    },
    /// The GPU index is past the devices this process can see.
    #[error("--gpu {index} requested but {visible} {backend} device(s) are visible{hint}")]
    NoSuchGpu {
        /// The index asked for.
        index: usize,
        /// How many devices of the backend are visible.
        visible: usize,
        /// `CUDA` or `Vulkan`.
        backend: &'static str,
        /// What to check.
        hint: String,
    },
    /// CUDA kernels are compiled at run time through LLVM, which needs CUDA's libdevice.
    #[error(
        "CUDA's math library libdevice (nvvm/libdevice/libdevice.10.bc) was not found in {searched}; \
         Burn compiles kernels at run time and needs it. Install the CUDA toolkit, or \
         `pip install nvidia-nvvm` and set CUDA_PATH=<site-packages>/nvidia/cu13 (any directory \
         holding nvvm/libdevice/libdevice.10.bc)"
    )]
    NoLibdevice {
        /// The directories looked in.
        searched: String,
    },
}

const LIST_LIMIT: usize = 12;

fn format_list<T>(items: &[T], show: impl Fn(&T) -> String) -> String {
    let mut out: Vec<String> = items.iter().take(LIST_LIMIT).map(show).collect();
    if items.len() > LIST_LIMIT {
        out.push(format!("... and {} more", items.len() - LIST_LIMIT));
    }
    out.join(", ")
}

fn format_mismatch(
    path: &std::path::Path,
    model: &str,
    missing: &[String],
    unexpected: &[String],
    mismatched: &[ShapeMismatch],
) -> String {
    let mut msg = format!(
        "weights in {} do not fit {model}: {} missing, {} unexpected, {} with the wrong shape \
         (is this file for another model? pass the matching --model)",
        path.display(),
        missing.len(),
        unexpected.len(),
        mismatched.len()
    );
    if !missing.is_empty() {
        msg.push_str(&format!("\n  missing: {}", format_list(missing, String::clone)));
    }
    if !unexpected.is_empty() {
        msg.push_str(&format!(
            "\n  unexpected: {}",
            format_list(unexpected, String::clone)
        ));
    }
    if !mismatched.is_empty() {
        msg.push_str(&format!(
            "\n  wrong shape: {}",
            format_list(mismatched, |m| format!(
                "{} (model {:?}, file {:?})",
                m.key, m.expected, m.found
            ))
        ));
    }
    msg
}

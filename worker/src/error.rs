//! The worker library's error type.

use std::path::PathBuf;

/// Result alias for the worker library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the worker library. A variant's message includes the
/// message of the error it wraps, and does not also return it as its `source()`: the
/// binaries print the whole chain, and the same words twice helped nobody.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building, loading, saving or running the model failed, or the device is unusable.
    #[error(transparent)]
    Model(#[from] effnet::Error),

    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },

    /// A downloaded dataset archive is not what it should be (truncated, corrupt, or without
    /// the expected files).
    #[error("cannot unpack the dataset archive {}: {reason}", path.display())]
    DataArchive {
        /// The archive.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },

    /// A copy between the host and the compute device failed (the device was lost, or a
    /// kernel before the copy failed).
    #[error("{0}")]
    Transfer(String),

    /// A command-line value cannot be used (the message names the option and what it
    /// expects).
    #[error("{0}")]
    Usage(String),

    /// A listener for peers or metrics could not be set up (a port in use, an address not
    /// of this machine).
    #[error("{what}: {error}")]
    Listen {
        /// What was being set up, and where.
        what: String,
        /// The operating system's error.
        error: std::io::Error,
    },

    /// TLS settings, an address or a server of the cluster's transport is unusable.
    #[error(transparent)]
    Net(#[from] cluster_proto::Error),

    /// The coordinator could not be reached before the deadline (`--connect-timeout`, or
    /// `--coordinator-timeout` after it was lost).
    #[error("{0}")]
    Unreachable(String),

    /// The coordinator refused a request; its reason says what to change.
    #[error("{what}: {reason}")]
    Refused {
        /// The request, as this worker saw it.
        what: String,
        /// The coordinator's reason.
        reason: String,
    },

    /// The coordinator stopped the run with an error (a failure elsewhere, diverged ranks).
    #[error("the run was stopped: {0}")]
    Stopped(String),

    /// The coordinator sent something this worker cannot act on: coordinator and worker
    /// are probably of different versions.
    #[error("{0} (are the coordinator and the workers the same version?)")]
    Protocol(String),

    /// The run's dataset could not be opened or read.
    #[error("dataset {data}: {error}")]
    DataRead {
        /// The dataset, as the run configuration names it.
        data: String,
        /// What went wrong (boxed: it is large, and errors travel in every `Result`).
        error: Box<dataset::Error>,
    },

    /// The run's dataset has no training images once split (and limited).
    #[error("dataset {0} has no training images")]
    NoTrainingImages(String),

    /// A model does not predict the classes of the dataset it is to train or evaluate on.
    #[error(
        "{model} predicts {model_classes} classes, but the dataset {data} has {data_classes}; use a model trained on it"
    )]
    ClassMismatch {
        /// The model, as the user knows it.
        model: String,
        /// Classes it predicts.
        model_classes: usize,
        /// The dataset.
        data: String,
        /// Classes the dataset has.
        data_classes: usize,
    },

    /// Training state (a checkpoint's parts, or the state rank 0 sends a joining worker) is
    /// not what this worker can continue from.
    #[error("{0}")]
    State(String),

    /// A checkpoint root holds no committed checkpoint to load.
    #[error("{0} holds no committed checkpoint (no LATEST and no manifest)")]
    NoCheckpoint(String),

    /// Drawing a chart failed.
    #[error(transparent)]
    Plot(#[from] plots::Error),

    /// The async runtime for storage I/O could not be started (out of threads or memory).
    #[error("cannot start an I/O runtime: {0}")]
    Runtime(std::io::Error),

    /// An invariant of this worker's own state broke: a bug.
    #[error("internal error: {0} (a bug: please report it with the worker's log)")]
    Internal(String),

    /// A collective over the ring failed: a peer died, hung or was fenced off.
    #[error("{0}")]
    Ring(String),

    /// The connection to the coordinator broke (it may come back: workers reconnect).
    #[error("lost the coordinator: {0}")]
    CoordinatorLost(String),

    /// The coordinator removed this worker from the run while it was still connected (it
    /// held the ring up): what it holds is stale; it joins again as a new worker.
    #[error("removed from the run: {0}")]
    Fenced(String),

    /// Writing or reading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),

    /// Reading the dataset failed.
    #[error(transparent)]
    Dataset(#[from] dataset::Error),
}

impl Error {
    /// Reading dataset `data` (as the run configuration names it) failed.
    pub(crate) fn data_read(data: &str, source: dataset::Error) -> Self {
        Error::DataRead {
            data: data.to_string(),
            error: Box::new(source),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
}

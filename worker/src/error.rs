//! The worker library's error type.

use std::path::PathBuf;

/// Result alias for the worker library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the worker library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building, loading, saving or running the model failed, or the device is unusable.
    #[error(transparent)]
    Model(#[from] effnet::Error),

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
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

    /// Talking to the coordinator or the other workers failed, or the run was stopped.
    #[error("{0}")]
    Cluster(String),
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
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

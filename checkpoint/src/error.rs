//! The checkpoint crate's error type.

/// Result alias for the checkpoint crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong writing, committing or reading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed (unreachable, refused, missing object, ...).
    #[error(transparent)]
    Storage(#[from] storage::Error),

    /// An object does not match what the manifest (or the uploader) recorded.
    #[error(
        "checkpoint object {object} is corrupt: expected {expected_size} bytes with sha256 {expected_sha256}, \
         found {found_size} bytes with sha256 {found_sha256}"
    )]
    Corrupt {
        /// The object, as the user would name it.
        object: String,
        /// Size the manifest records.
        expected_size: u64,
        /// Digest the manifest records (hex).
        expected_sha256: String,
        /// Size found.
        found_size: u64,
        /// Digest found (hex).
        found_sha256: String,
    },

    /// A manifest or `LATEST` file cannot be understood.
    #[error("{object}: {reason}")]
    Format {
        /// The file, as the user would name it.
        object: String,
        /// What was expected and what was found.
        reason: String,
    },

    /// A checkpoint does not list an object its reader needs.
    #[error("checkpoint {checkpoint} has no object {object} (it holds: {present})")]
    NoSuchObject {
        /// The checkpoint.
        checkpoint: String,
        /// The object asked for.
        object: String,
        /// What the manifest lists.
        present: String,
    },
}

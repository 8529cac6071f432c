//! The dataset crate's error type.

/// Result alias for the dataset crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file's content is not what its format requires.
    #[error("{file}: at byte offset {offset}: {reason}")]
    Format {
        /// The file (local path or object key).
        file: String,
        /// Byte offset of the problem.
        offset: u64,
        /// What was expected and what was found.
        reason: String,
    },

    /// A dataset location cannot be opened.
    #[error("dataset location {location}: {reason}")]
    Location {
        /// The location as given.
        location: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// An object could not be read.
    #[error("cannot read {file}: {error}")]
    Read {
        /// The file or object.
        file: String,
        /// The store's error (in the message, not repeated as a source).
        error: object_store::Error,
    },

    /// The store failed to give an object (missing, unreachable, refused).
    #[error(transparent)]
    Storage(#[from] storage::Error),

    /// An image could not be decoded.
    #[error("cannot decode image {file}: {reason}")]
    Image {
        /// The image file or object.
        file: String,
        /// The decoder's complaint.
        reason: String,
    },
}

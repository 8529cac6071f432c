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

    /// Another coordinator holds the checkpoint root's lease.
    #[error(
        "the checkpoint root {root} is in use by another coordinator ({holder}); its lease expires in \
         {expires_in_s:.0} s unless renewed. Stop that coordinator, or give this run another \
         --checkpoints root"
    )]
    LeaseHeld {
        /// The root.
        root: String,
        /// Who holds it.
        holder: String,
        /// Seconds until it lapses unless renewed.
        expires_in_s: f64,
    },

    /// This coordinator's lease on the root was taken over (it lapsed, and another
    /// coordinator started on the root): it may not commit any more.
    #[error("lost the lease on the checkpoint root {root} to {by}: another coordinator runs this root now")]
    LeaseLost {
        /// The root.
        root: String,
        /// Who holds it now.
        by: String,
    },

    /// `LATEST` would move backwards (it names a later checkpoint than the one committed).
    #[error("{latest} names {current}, later than {ours}: refusing to move it backwards")]
    Backwards {
        /// The `LATEST` object.
        latest: String,
        /// What it names now.
        current: String,
        /// What this commit would name.
        ours: String,
    },
}

//! The storage crate's error type.

/// Result alias for the storage crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong opening a location or moving bytes in and out of it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A location URL cannot be used.
    #[error("storage location {location}: {reason}")]
    Location {
        /// The location as given.
        location: String,
        /// Why it cannot be used, and what would work.
        reason: String,
    },

    /// An object could not be read.
    #[error("cannot read {object}: {}", explain(source))]
    Read {
        /// The object, named as the user would.
        object: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },

    /// An object could not be written.
    #[error("cannot write {object}: {}", explain(source))]
    Write {
        /// The object, named as the user would.
        object: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },

    /// A conditional write found the object other than it expected: someone else wrote it.
    #[error("{object} was changed by someone else (expected {expected})")]
    Conflict {
        /// The object, named as the user would.
        object: String,
        /// What the write expected ("no object", "the version read before").
        expected: &'static str,
    },

    /// An object is larger than its kind may be.
    #[error(
        "{object} is {size} bytes, more than the {max} such a file may have: it is not one of ours, or it is damaged"
    )]
    TooLarge {
        /// The object, named as the user would.
        object: String,
        /// Its size.
        size: u64,
        /// The most allowed.
        max: u64,
    },

    /// An object could not be listed or deleted.
    #[error("cannot {action} {object}: {}", explain(source))]
    Manage {
        /// What was attempted ("list", "delete").
        action: &'static str,
        /// The object or prefix.
        object: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
}

impl Error {
    /// Whether a conditional write found the object other than expected (created, changed
    /// or deleted by someone else).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// Whether the error says the object does not exist (as opposed to a failure to reach it).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::Read {
                source: object_store::Error::NotFound { .. },
                ..
            } | Error::Manage {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }
}

/// The store's error with the advice a user needs for the common S3 failures: object_store's
/// own text is accurate but does not say what to change.
fn explain(source: &object_store::Error) -> String {
    let text = full_chain(source);
    let advice = if text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
        || text.contains("AccessDenied")
        || text.contains("403 Forbidden")
    {
        Some(
            "the S3 server refused the credentials; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             (or AWS_PROFILE) and that they may use this bucket",
        )
    } else if text.contains("NoSuchBucket") {
        Some("the bucket does not exist on this S3 server; create it or fix the URL")
    } else if text.contains("error sending request")
        || text.contains("Connection refused")
        || text.contains("connection error")
        || text.contains("timed out")
        || text.contains("dns error")
    {
        Some("the S3 endpoint cannot be reached; check AWS_ENDPOINT_URL (or the region) and the network")
    } else {
        None
    };
    match advice {
        Some(advice) => format!("{advice} ({text})"),
        None => text,
    }
}

fn full_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

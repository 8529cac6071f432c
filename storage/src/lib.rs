//! Where effnet-cluster keeps and reads bytes: a local directory (a plain path or
//! `file://...`), `s3://bucket/prefix` on any S3-compatible server, or `memory://name` (one
//! in-process store per name, for tests). Everything goes through `object_store`, so the
//! dataset reader and the checkpoint writer treat every kind the same way.

mod conditional;
mod error;
mod location;
mod profile;

pub use conditional::Version;
pub use error::{Error, Result};
pub use location::{Location, S3_MAX_RETRIES, is_local};
pub use object_store;

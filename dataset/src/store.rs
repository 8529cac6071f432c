//! Where a dataset lives: a local directory, `file://...`, `s3://bucket/prefix` or
//! `memory://name`, all read through `object_store` (see the `storage` crate), so that a worker
//! reads only the bytes it needs.

use std::ops::Deref;

use storage::Location;

use crate::error::{Error, Result};

/// An opened dataset location: a [`Location`] (store, prefix, name for messages) that
/// dataset readers treat as read-only.
#[derive(Debug, Clone)]
pub struct DataStore {
    location: Location,
}

impl Deref for DataStore {
    type Target = Location;

    fn deref(&self) -> &Location {
        &self.location
    }
}

impl From<Location> for DataStore {
    fn from(location: Location) -> Self {
        Self { location }
    }
}

impl DataStore {
    /// Open `spec`: a local path, `file:///abs/path`, `s3://bucket/prefix` or `memory://name`.
    /// S3 endpoint, region and credentials come from the standard `AWS_*` environment
    /// variables, then the AWS profile files (see [`Location::open`]).
    pub fn open(spec: &str) -> Result<Self> {
        Self::open_with(spec, &[] as &[(&str, &str)])
    }

    /// [`open`](Self::open), with S3 settings that override the environment, as `object_store`
    /// keys (`aws_endpoint`, `aws_access_key_id`, `aws_secret_access_key`, `aws_region`,
    /// `aws_allow_http`, ...).
    pub fn open_with<K: AsRef<str>, V: AsRef<str>>(spec: &str, s3_options: &[(K, V)]) -> Result<Self> {
        let location = Location::open_with(spec, s3_options).map_err(|e| match e {
            storage::Error::Location { location, reason } => Error::Location { location, reason },
            other => Error::Location {
                location: spec.to_string(),
                reason: other.to_string(),
            },
        })?;
        Ok(location.into())
    }
}

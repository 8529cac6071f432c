//! Where a dataset lives: a local directory, `file://...` or `s3://bucket/prefix`, all read
//! through `object_store` so that a worker reads only the bytes it needs.

use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::error::{Error, Result};

/// An opened dataset location.
#[derive(Debug, Clone)]
pub struct DataStore {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// Prefix of the dataset inside the store (empty for a local directory).
    pub prefix: ObjectPath,
    /// The location as the user wrote it, for messages.
    pub display: String,
}

impl DataStore {
    /// Open `spec`: a local path, `file:///abs/path`, or `s3://bucket/prefix`. S3 endpoint,
    /// region and credentials come from the standard `AWS_*` environment variables
    /// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...);
    /// plain-HTTP endpoints (local servers) are allowed when the endpoint says `http://`.
    pub fn open(spec: &str) -> Result<Self> {
        Self::open_with(spec, &[])
    }

    /// [`open`](Self::open), with S3 settings that override the environment, as `object_store`
    /// keys (`aws_endpoint`, `aws_access_key_id`, `aws_secret_access_key`, `aws_region`,
    /// `aws_allow_http`, ...).
    pub fn open_with(spec: &str, s3_options: &[(&str, &str)]) -> Result<Self> {
        let location = storage::Location::open_with(spec, s3_options).map_err(|e| match e {
            storage::Error::Location { location, reason } => Error::Location { location, reason },
            other => Error::Location {
                location: spec.to_string(),
                reason: other.to_string(),
            },
        })?;
        Ok(Self {
            store: location.store,
            prefix: location.prefix,
            display: location.display,
        })
    }

    /// Open `spec` as an output location: like [`open`](Self::open), but a local directory
    /// is created when missing.
    pub fn create(spec: &str) -> Result<Self> {
        if storage::is_local(spec) {
            let path = spec.strip_prefix("file://").unwrap_or(spec);
            std::fs::create_dir_all(path).map_err(|e| Error::Location {
                location: spec.to_string(),
                reason: format!("cannot create the directory: {e}"),
            })?;
        }
        Self::open(spec)
    }

    /// Store `bytes` as the object `relative`. Whole or not at all: S3 takes one PUT, a local
    /// directory a temporary file renamed into place, so readers never see a torn object.
    pub async fn put(&self, relative: &str, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put(&self.path(relative), object_store::PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|source| Error::Write {
                file: self.describe(relative),
                source,
            })
    }

    /// The object path of `relative` (a `/`-separated path under the dataset).
    pub fn path(&self, relative: &str) -> ObjectPath {
        let mut parts: Vec<String> = self.prefix.parts().map(|p| p.as_ref().to_string()).collect();
        parts.extend(relative.split('/').filter(|p| !p.is_empty()).map(String::from));
        ObjectPath::from_iter(parts)
    }

    /// `relative` as the user would name it, for messages.
    pub fn describe(&self, relative: &str) -> String {
        format!("{}/{relative}", self.display.trim_end_matches('/'))
    }

    /// The whole object at `relative`; errors name it as the user would.
    pub async fn get_bytes(&self, relative: &str) -> Result<bytes::Bytes> {
        let read_err = |source| Error::Read {
            file: self.describe(relative),
            source,
        };
        self.store
            .get(&self.path(relative))
            .await
            .map_err(read_err)?
            .bytes()
            .await
            .map_err(read_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn created_locations_take_whole_objects_and_errors_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run/one");
        let store = DataStore::create(out.to_str().unwrap()).unwrap();
        store.put("checkpoints/a.bin", vec![1, 2, 3]).await.unwrap();
        assert_eq!(std::fs::read(out.join("checkpoints/a.bin")).unwrap(), [1, 2, 3]);
        assert_eq!(
            store.get_bytes("checkpoints/a.bin").await.unwrap().as_ref(),
            [1, 2, 3]
        );
        // A file where a directory is needed.
        std::fs::write(out.join("blocker"), b"").unwrap();
        let err = store.put("blocker/b.bin", vec![0]).await.unwrap_err().to_string();
        assert!(
            err.contains("cannot write") && err.contains("blocker/b.bin"),
            "{err}"
        );
    }
}

//! Compare-and-swap on one object: read it with its version, write it only if it is still
//! that version (or still absent). S3 (and MinIO, R2) do this with `If-Match` /
//! `If-None-Match`, the in-memory store natively; object_store's local store creates
//! exclusively but cannot update conditionally, so for a local directory the read-compare-write
//! runs under an exclusive lock on a `.lock` file beside the object (every writer of the
//! object goes through here).

use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use crate::error::{Error, Result};
use crate::location::Location;

/// The version of an object as read, for a later conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    e_tag: Option<String>,
    version: Option<String>,
}

impl Location {
    /// The object `relative` and its version; `None` when it does not exist.
    pub async fn get_versioned(&self, relative: &str) -> Result<Option<(bytes::Bytes, Version)>> {
        let read_err = |source| Error::Read {
            object: self.describe(relative),
            source,
        };
        let got = match self.store.get(&self.path(relative)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(source) => return Err(read_err(source)),
        };
        let version = Version {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(read_err)?;
        Ok(Some((bytes, version)))
    }

    /// Write `bytes` as `relative` only if it is still at `expected` (`None`: only if it does
    /// not exist); returns the new version. Someone else's write in between is
    /// [`Error::Conflict`], and nothing is written.
    pub async fn put_if(
        &self,
        relative: &str,
        bytes: impl Into<bytes::Bytes>,
        expected: Option<&Version>,
    ) -> Result<Version> {
        let bytes: bytes::Bytes = bytes.into();
        if let Some(dir) = &self.local_dir {
            let lock = dir.join(format!("{relative}.lock"));
            let _held = lock_file(&lock, &self.describe(&format!("{relative}.lock"))).await?;
            let current = self.get_versioned(relative).await?.map(|(_, v)| v);
            if current.as_ref() != expected {
                return Err(self.conflict(relative, expected));
            }
            return self.put_mode(relative, bytes, PutMode::Overwrite, expected).await;
        }
        let mode = match expected {
            None => PutMode::Create,
            Some(v) => PutMode::Update(UpdateVersion {
                e_tag: v.e_tag.clone(),
                version: v.version.clone(),
            }),
        };
        self.put_mode(relative, bytes, mode, expected).await
    }

    async fn put_mode(
        &self,
        relative: &str,
        bytes: bytes::Bytes,
        mode: PutMode,
        expected: Option<&Version>,
    ) -> Result<Version> {
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&self.path(relative), PutPayload::from(bytes), options)
            .await
        {
            Ok(put) => Ok(Version {
                e_tag: put.e_tag,
                version: put.version,
            }),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Err(self.conflict(relative, expected))
            }
            Err(source) => Err(Error::Write {
                object: self.describe(relative),
                source,
            }),
        }
    }

    fn conflict(&self, relative: &str, expected: Option<&Version>) -> Error {
        Error::Conflict {
            object: self.describe(relative),
            expected: if expected.is_some() {
                "the version read before"
            } else {
                "no object"
            },
        }
    }
}

/// An exclusive lock on `path` (created when missing), held until the file is dropped.
async fn lock_file(path: &std::path::Path, describe: &str) -> Result<std::fs::File> {
    let path = path.to_path_buf();
    let failed = |e: std::io::Error| Error::Write {
        object: describe.to_string(),
        source: object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        },
    };
    tokio::task::spawn_blocking(move || {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.lock()?;
        Ok(file)
    })
    .await
    .map_err(|e| failed(std::io::Error::other(e)))?
    .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn compare_and_swap(location: &Location) {
        let first = location.put_if("LEASE", "a", None).await.unwrap();
        let err = location.put_if("LEASE", "b", None).await.unwrap_err();
        assert!(err.is_conflict(), "{err}");
        assert!(
            err.to_string()
                .contains("LEASE was changed by someone else (expected no object)"),
            "{err}"
        );
        let (bytes, read) = location.get_versioned("LEASE").await.unwrap().unwrap();
        assert_eq!((&bytes[..], &read), (&b"a"[..], &first));
        let second = location.put_if("LEASE", "c", Some(&read)).await.unwrap();
        assert_ne!(second, first);
        // The version read before the last write is stale now.
        let err = location.put_if("LEASE", "d", Some(&read)).await.unwrap_err();
        assert!(err.is_conflict(), "{err}");
        let (bytes, _) = location.get_versioned("LEASE").await.unwrap().unwrap();
        assert_eq!(&bytes[..], b"c");
        assert!(location.get_versioned("nothing").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_local_directory_swaps_only_from_the_version_read() {
        let dir = tempfile::tempdir().unwrap();
        compare_and_swap(&Location::open(dir.path().to_str().unwrap()).unwrap()).await;
        let nested = tempfile::tempdir().unwrap();
        let root = Location::open(nested.path().to_str().unwrap()).unwrap();
        compare_and_swap(&root.join("run/checkpoints")).await;
        assert!(nested.path().join("run/checkpoints/LEASE").is_file());
    }

    #[tokio::test]
    async fn the_memory_store_swaps_only_from_the_version_read() {
        compare_and_swap(&Location::open("memory://conditional-test").unwrap()).await;
    }
}

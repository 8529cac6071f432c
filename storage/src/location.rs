//! Opening a location by URL, and the few operations on it that the rest of the project uses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig};

use crate::error::{Error, Result};

/// How often a failed S3 request is retried before the error reaches the user: enough to ride
/// out a restarting server, few enough that an unreachable endpoint fails in seconds.
pub const S3_MAX_RETRIES: usize = 3;

/// An opened location: a store and the prefix inside it.
#[derive(Debug, Clone)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// Prefix of the location inside the store (empty for a local directory).
    pub prefix: ObjectPath,
    /// The location as the user wrote it, for messages.
    pub display: String,
    /// The directory, when the store is a local one: conditional writes lock files there
    /// (object_store's local store has no compare-and-swap).
    pub local_dir: Option<std::path::PathBuf>,
}

impl Location {
    /// Open `spec`: a local path, `file:///abs/path`, `s3://bucket/prefix` or `memory://name`.
    /// S3 endpoint, region and credentials come from the standard `AWS_*` environment
    /// variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, web identity, ...), then from the shared
    /// AWS files for `AWS_PROFILE` (or `default`); plain-HTTP endpoints (local servers) are
    /// allowed when the endpoint says `http://`. A local directory must exist.
    pub fn open(spec: &str) -> Result<Self> {
        Self::open_with(spec, &[] as &[(&str, &str)])
    }

    /// [`open`](Self::open), with S3 settings that override the environment, as `object_store`
    /// keys (`aws_endpoint`, `aws_access_key_id`, `aws_secret_access_key`, `aws_region`, ...).
    pub fn open_with<K: AsRef<str>, V: AsRef<str>>(spec: &str, s3_options: &[(K, V)]) -> Result<Self> {
        if let Some(rest) = spec.strip_prefix("s3://") {
            return open_s3(spec, rest, s3_options);
        }
        if let Some(name) = spec.strip_prefix("memory://") {
            let (name, prefix) = name.split_once('/').unwrap_or((name, ""));
            return Ok(Self {
                store: memory_store(name),
                prefix: ObjectPath::from(prefix.trim_matches('/')),
                display: spec.to_string(),
                local_dir: None,
            });
        }
        let path = spec.strip_prefix("file://").unwrap_or(spec);
        let dir = std::path::Path::new(path);
        if !dir.is_dir() {
            return Err(Error::Location {
                location: spec.to_string(),
                reason: "no such directory (expected a local directory, file://..., s3://bucket/prefix \
                         or memory://name)"
                    .into(),
            });
        }
        let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| Error::Location {
            location: spec.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            store: Arc::new(store),
            prefix: ObjectPath::default(),
            display: spec.to_string(),
            local_dir: Some(dir.to_path_buf()),
        })
    }

    /// Open `spec` as an output location: like [`open`](Self::open), but a local directory is
    /// created when missing.
    pub fn create(spec: &str) -> Result<Self> {
        Self::create_with(spec, &[] as &[(&str, &str)])
    }

    /// [`create`](Self::create) with S3 settings, as [`open_with`](Self::open_with) takes them.
    pub fn create_with<K: AsRef<str>, V: AsRef<str>>(spec: &str, s3_options: &[(K, V)]) -> Result<Self> {
        if is_local(spec) {
            let path = spec.strip_prefix("file://").unwrap_or(spec);
            std::fs::create_dir_all(path).map_err(|e| Error::Location {
                location: spec.to_string(),
                reason: format!("cannot create the directory: {e}"),
            })?;
        }
        Self::open_with(spec, s3_options)
    }

    /// The location `relative` below this one, sharing the store.
    pub fn join(&self, relative: &str) -> Self {
        Self {
            store: self.store.clone(),
            prefix: self.path(relative),
            display: self.describe(relative),
            local_dir: self.local_dir.as_ref().map(|d| {
                relative
                    .split('/')
                    .filter(|p| !p.is_empty())
                    .fold(d.clone(), |dir, part| dir.join(part))
            }),
        }
    }

    /// The object path of `relative` (a `/`-separated path under the location).
    pub fn path(&self, relative: &str) -> ObjectPath {
        let mut parts: Vec<String> = self.prefix.parts().map(|p| p.as_ref().to_string()).collect();
        parts.extend(relative.split('/').filter(|p| !p.is_empty()).map(String::from));
        ObjectPath::from_iter(parts)
    }

    /// `relative` as the user would name it, for messages.
    pub fn describe(&self, relative: &str) -> String {
        if relative.is_empty() {
            return self.display.clone();
        }
        format!("{}/{relative}", self.display.trim_end_matches('/'))
    }

    /// Store `bytes` as the object `relative`. Whole or not at all: S3 takes one PUT, a local
    /// directory a temporary file renamed into place, so readers never see a torn object.
    pub async fn put(&self, relative: &str, bytes: impl Into<bytes::Bytes>) -> Result<()> {
        let bytes: bytes::Bytes = bytes.into();
        self.store
            .put(&self.path(relative), object_store::PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|source| Error::Write {
                object: self.describe(relative),
                source,
            })
    }

    /// The whole object at `relative`.
    pub async fn get_bytes(&self, relative: &str) -> Result<bytes::Bytes> {
        let read_err = |source| Error::Read {
            object: self.describe(relative),
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

    /// The whole object at `relative`, refused with [`Error::TooLarge`] before anything is
    /// read when it is larger than `max` bytes (small files that name or describe others,
    /// which a damaged or hostile store could make huge).
    pub async fn get_bytes_at_most(&self, relative: &str, max: u64) -> Result<bytes::Bytes> {
        let size = self.head(relative).await?.size;
        let too_large = |size: u64| Error::TooLarge {
            object: self.describe(relative),
            size,
            max,
        };
        if size > max {
            return Err(too_large(size));
        }
        let bytes = self.get_bytes(relative).await?;
        // It may have been replaced between the two requests.
        if bytes.len() as u64 > max {
            return Err(too_large(bytes.len() as u64));
        }
        Ok(bytes)
    }

    /// Size and other metadata of the object at `relative`.
    pub async fn head(&self, relative: &str) -> Result<ObjectMeta> {
        self.store
            .head(&self.path(relative))
            .await
            .map_err(|source| Error::Read {
                object: self.describe(relative),
                source,
            })
    }

    /// The names of the "directories" directly below `relative`, sorted.
    pub async fn list_dirs(&self, relative: &str) -> Result<Vec<String>> {
        let prefix = self.path(relative);
        let listing = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|source| Error::Manage {
                action: "list",
                object: self.describe(relative),
                source,
            })?;
        let mut names: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(String::from))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every object below `relative`, with paths relative to this location.
    pub async fn list(&self, relative: &str) -> Result<Vec<(String, ObjectMeta)>> {
        let prefix = self.path(relative);
        let skip = self.prefix.parts().count();
        let metas: Vec<ObjectMeta> =
            self.store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|source| Error::Manage {
                    action: "list",
                    object: self.describe(relative),
                    source,
                })?;
        Ok(metas
            .into_iter()
            .map(|meta| {
                let rel: Vec<String> = meta
                    .location
                    .parts()
                    .skip(skip)
                    .map(|p| p.as_ref().to_string())
                    .collect();
                (rel.join("/"), meta)
            })
            .collect())
    }

    /// Remove the directory of prefix `relative` of a local store once its objects are
    /// deleted (object stores have no directories; a local one leaves them behind, and an
    /// empty one would list as a prefix forever). Not empty, missing, or not local: nothing
    /// to do.
    pub fn remove_empty_prefix(&self, relative: &str) {
        let Some(dir) = &self.local_dir else { return };
        let path = dir.join(relative);
        // Deepest first; each removal fails harmlessly on a directory that still holds files.
        let mut dirs: Vec<std::path::PathBuf> = walk_dirs(&path);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs.iter().chain(std::iter::once(&path)) {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Delete the object at `relative`; a missing object is not an error.
    pub async fn delete(&self, relative: &str) -> Result<()> {
        match self.store.delete(&self.path(relative)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(Error::Manage {
                action: "delete",
                object: self.describe(relative),
                source,
            }),
        }
    }
}

/// Every directory below `dir` (not `dir` itself).
fn walk_dirs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk_dirs(&path));
                out.push(path);
            }
        }
    }
    out
}

/// Whether `spec` names a local directory (rather than a store reached by URL).
pub fn is_local(spec: &str) -> bool {
    !(spec.starts_with("s3://") || spec.starts_with("memory://"))
}

fn open_s3<K: AsRef<str>, V: AsRef<str>>(spec: &str, rest: &str, s3_options: &[(K, V)]) -> Result<Location> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::Location {
            location: spec.to_string(),
            reason: "expected s3://bucket/prefix".into(),
        });
    }
    // Client options first: setting them later would replace allow-http and the proxy
    // settings the environment gave. A dead endpoint should fail in seconds, while a
    // multi-megabyte part on a slow link still has minutes to go through.
    let client = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(300));
    let mut builder = AmazonS3Builder::new().with_client_options(client);
    for (key, value) in std::env::vars() {
        if key.starts_with("AWS_")
            && let Ok(config_key) = key.to_ascii_lowercase().parse()
        {
            builder = builder.with_config(config_key, value);
        }
    }
    // The shared AWS files fill in only what the environment left unset, as the AWS CLI does.
    let env_has = |key: &str| std::env::var_os(key).is_some_and(|v| !v.is_empty());
    let profile = crate::profile::Profile::load().map_err(|reason| Error::Location {
        location: spec.to_string(),
        reason,
    })?;
    let mut endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
    if let Some(profile) = &profile {
        if !env_has("AWS_ACCESS_KEY_ID")
            && let (Some(id), Some(secret)) = (&profile.access_key_id, &profile.secret_access_key)
        {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(token) = &profile.session_token {
                builder = builder.with_token(token);
            }
        }
        if !env_has("AWS_REGION")
            && !env_has("AWS_DEFAULT_REGION")
            && let Some(region) = &profile.region
        {
            builder = builder.with_region(region);
        }
        if endpoint.is_none()
            && let Some(url) = &profile.endpoint_url
        {
            builder = builder.with_endpoint(url);
            endpoint = Some(url.clone());
        }
    }
    for (key, value) in s3_options {
        if key.as_ref().contains("endpoint") {
            endpoint = Some(value.as_ref().to_string());
        }
    }
    builder = builder.with_allow_http(endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
    for (key, value) in s3_options {
        let key = key.as_ref();
        let parsed = key.parse().map_err(|e| Error::Location {
            location: spec.to_string(),
            reason: format!("unknown S3 option '{key}': {e}"),
        })?;
        builder = builder.with_config(parsed, value.as_ref());
    }
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: S3_MAX_RETRIES,
        retry_timeout: Duration::from_secs(30),
    };
    let store = builder
        .with_bucket_name(bucket)
        .with_retry(retry)
        .build()
        .map_err(|e| Error::Location {
            location: spec.to_string(),
            reason: format!("cannot configure S3 access: {e}"),
        })?;
    Ok(Location {
        store: Arc::new(store),
        prefix: ObjectPath::from(prefix.trim_matches('/')),
        display: spec.to_string(),
        local_dir: None,
    })
}

/// `memory://name` is one store per name for the life of the process, so that two opens of
/// the same URL (a writer and a reader in one test) see the same objects.
fn memory_store(name: &str) -> Arc<dyn ObjectStore> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    let mut stores = stores.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    stores
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(InMemory::new()))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn created_locations_take_whole_objects_and_errors_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run/one");
        let store = Location::create(out.to_str().unwrap()).unwrap();
        store.put("checkpoints/a.bin", vec![1u8, 2, 3]).await.unwrap();
        assert_eq!(std::fs::read(out.join("checkpoints/a.bin")).unwrap(), [1, 2, 3]);
        assert_eq!(
            store.get_bytes("checkpoints/a.bin").await.unwrap().as_ref(),
            [1, 2, 3]
        );
        assert_eq!(store.head("checkpoints/a.bin").await.unwrap().size, 3);
        assert_eq!(store.list_dirs("").await.unwrap(), ["checkpoints"]);
        // A file where a directory is needed.
        std::fs::write(out.join("blocker"), b"").unwrap();
        let err = store
            .put("blocker/b.bin", vec![0u8])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot write") && err.contains("blocker/b.bin"),
            "{err}"
        );
        let missing = store.get_bytes("nope").await.unwrap_err();
        assert!(missing.is_not_found(), "{missing}");
        store.delete("checkpoints/a.bin").await.unwrap();
        store.delete("checkpoints/a.bin").await.unwrap();
        assert!(!out.join("checkpoints/a.bin").exists());
    }

    #[tokio::test]
    async fn memory_urls_share_one_store_per_name() {
        let a = Location::open("memory://shared-test/run").unwrap();
        a.put("x/y", b"hello".to_vec()).await.unwrap();
        let b = Location::open("memory://shared-test/run").unwrap();
        assert_eq!(b.get_bytes("x/y").await.unwrap().as_ref(), b"hello");
        let listed = b.list("").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, "x/y");
        let other = Location::open("memory://other-test").unwrap();
        assert!(other.get_bytes("run/x/y").await.unwrap_err().is_not_found());
        assert_eq!(b.join("x").get_bytes("y").await.unwrap().as_ref(), b"hello");
    }

    #[test]
    fn bad_locations_say_what_is_expected() {
        let err = Location::open("/definitely/not/here").unwrap_err().to_string();
        assert!(
            err.contains("no such directory") && err.contains("s3://"),
            "{err}"
        );
        let err = Location::open("s3:///x").unwrap_err().to_string();
        assert!(err.contains("expected s3://bucket/prefix"), "{err}");
    }
}

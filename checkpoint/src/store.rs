//! Writing, committing, verifying, finding and pruning checkpoints.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use object_store::{ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use storage::Location;

use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::manifest::{FORMAT, Latest, Manifest, ObjectEntry};

/// Objects larger than this go up as multipart uploads of parts this size: S3 needs parts of
/// at least 5 MiB, and a few parts in flight keep a link busy without holding a whole extra
/// copy of the object.
pub const PART_SIZE: usize = 8 << 20;

/// Parts in flight at once during a multipart upload.
const PARTS_IN_FLIGHT: usize = 4;

const MANIFEST: &str = "MANIFEST.json";
const LATEST: &str = "LATEST";

/// `LATEST` names one checkpoint: anything larger is not ours.
const MAX_LATEST_BYTES: u64 = 64 << 10;
/// A manifest lists a few objects; even thousands fit well under this.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// Which checkpoints pruning keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The newest this many committed checkpoints of the run.
    pub keep_last: usize,
    /// Also the one with the best validation accuracy.
    pub keep_best: bool,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep_last: 3,
            keep_best: true,
        }
    }
}

/// A checkpoint that passed verification, and what was skipped on the way to it.
#[derive(Debug, Clone)]
pub struct Good {
    /// Its manifest.
    pub manifest: Manifest,
    /// Newer checkpoints that failed verification, with the reason, newest first.
    pub skipped: Vec<String>,
}

/// The checkpoints of a run, under one root location.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    root: Location,
}

impl CheckpointStore {
    /// Open the checkpoint root `url` (a local directory, created when missing; `file://`,
    /// `s3://bucket/prefix`, `memory://name`).
    pub fn open(url: &str) -> Result<Self> {
        Ok(Self {
            root: Location::create(url)?,
        })
    }

    /// Open with explicit S3 settings (`object_store` keys), for tests and tools.
    pub fn open_with<K: AsRef<str>, V: AsRef<str>>(url: &str, s3_options: &[(K, V)]) -> Result<Self> {
        Ok(Self {
            root: Location::create_with(url, s3_options)?,
        })
    }

    /// The root as the user wrote it.
    pub fn url(&self) -> &str {
        &self.root.display
    }

    /// Where checkpoint `name` (or an object in it) lives, as the user would name it.
    pub fn describe(&self, name: &str) -> String {
        self.root.describe(name)
    }

    /// A fresh, unique checkpoint name: sortable by step, readable, and never reused, so a
    /// retried or concurrent attempt cannot overwrite a committed checkpoint's objects.
    pub fn new_name(step: u64, phase: &str, epoch: u32) -> String {
        format!(
            "{}{step:010}-{phase}-e{epoch:03}-{}",
            crate::objects::NAME_PREFIX,
            unique_hex(4)
        )
    }

    /// Upload `bytes` as object `object` of checkpoint `checkpoint`; large objects go up in
    /// parts. Returns the entry the manifest will carry.
    pub async fn upload(&self, checkpoint: &str, object: &str, bytes: &[u8]) -> Result<ObjectEntry> {
        let relative = format!("{checkpoint}/{object}");
        let write_err = |source| storage::Error::Write {
            object: self.root.describe(&relative),
            source,
        };
        let sha256 = hex::encode(Sha256::digest(bytes));
        if bytes.len() <= PART_SIZE {
            self.root
                .put(&relative, bytes::Bytes::copy_from_slice(bytes))
                .await?;
        } else {
            let upload = self
                .root
                .store
                .put_multipart(&self.root.path(&relative))
                .await
                .map_err(write_err)?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            for part in bytes.chunks(PART_SIZE) {
                if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                    // Best effort: a part that failed leaves an upload the server would keep
                    // (and bill for) until a lifecycle rule removes it.
                    let _ = writer.abort().await;
                    return Err(write_err(e).into());
                }
                writer.write(part);
            }
            writer.finish().await.map_err(write_err)?;
        }
        Ok(ObjectEntry {
            name: object.to_string(),
            size: bytes.len() as u64,
            sha256,
        })
    }

    /// Stream object `entry` of `checkpoint` and check its size and digest without keeping it.
    pub async fn verify_object(&self, checkpoint: &str, entry: &ObjectEntry) -> Result<()> {
        self.read_checked(checkpoint, entry, false).await.map(|_| ())
    }

    /// Object `entry` of `checkpoint`, checked against its size and digest.
    pub async fn read_object(&self, checkpoint: &str, entry: &ObjectEntry) -> Result<bytes::Bytes> {
        self.read_checked(checkpoint, entry, true).await
    }

    /// Object `object` of the committed checkpoint `manifest` describes, verified.
    pub async fn read(&self, manifest: &Manifest, object: &str) -> Result<bytes::Bytes> {
        let entry = manifest.object(object).ok_or_else(|| Error::NoSuchObject {
            checkpoint: self.root.describe(&manifest.name),
            object: object.to_string(),
            present: manifest
                .objects
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        self.read_object(&manifest.name, entry).await
    }

    async fn read_checked(&self, checkpoint: &str, entry: &ObjectEntry, keep: bool) -> Result<bytes::Bytes> {
        let relative = format!("{checkpoint}/{}", entry.name);
        let read_err = |source| storage::Error::Read {
            object: self.root.describe(&relative),
            source,
        };
        let result = self
            .root
            .store
            .get(&self.root.path(&relative))
            .await
            .map_err(read_err)?;
        let mut stream = result.into_stream();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        // Never trust a size from the store for an allocation beyond what the manifest says.
        let mut kept = Vec::with_capacity(if keep { entry.size as usize } else { 0 });
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(read_err)?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            if keep {
                kept.extend_from_slice(&chunk);
            }
        }
        let found = hex::encode(hasher.finalize());
        if size != entry.size || found != entry.sha256 {
            return Err(Error::Corrupt {
                object: self.root.describe(&relative),
                expected_size: entry.size,
                expected_sha256: entry.sha256.clone(),
                found_size: size,
                found_sha256: found,
            });
        }
        Ok(kept.into())
    }

    /// Commit: check every object the manifest lists, then write the manifest, then point
    /// `LATEST` at it. Only the coordinator calls this. The checkpoint counts from the moment
    /// `LATEST` is written; a failure before leaves the previous one current.
    pub async fn commit(&self, mut manifest: Manifest) -> Result<Manifest> {
        manifest.format = FORMAT;
        manifest.committed_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        for entry in &manifest.objects {
            self.verify_object(&manifest.name, entry).await?;
        }
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Format {
            object: self.root.describe(&format!("{}/{MANIFEST}", manifest.name)),
            reason: e.to_string(),
        })?;
        self.root
            .put(&format!("{}/{MANIFEST}", manifest.name), text)
            .await?;
        let latest = Latest {
            checkpoint: manifest.name.clone(),
            run_id: manifest.run_id.clone(),
        };
        let text = serde_json::to_vec_pretty(&latest).map_err(|e| Error::Format {
            object: self.root.describe(LATEST),
            reason: e.to_string(),
        })?;
        // Compare-and-swap from what was read, and never backwards: a commit racing another
        // (which the lease rules out) fails rather than undoing a later checkpoint.
        let current = self.root.get_versioned(LATEST).await?;
        if let Some((bytes, _)) = &current
            && let Ok(named) = serde_json::from_slice::<Latest>(bytes)
            && named.checkpoint > manifest.name
        {
            return Err(Error::Backwards {
                latest: self.root.describe(LATEST),
                current: named.checkpoint,
                ours: manifest.name,
            });
        }
        self.root
            .put_if(LATEST, text, current.as_ref().map(|(_, v)| v))
            .await?;
        tracing::info!(checkpoint = %self.root.describe(&manifest.name), step = manifest.step, "checkpoint committed");
        Ok(manifest)
    }

    /// What `LATEST` says, if it exists.
    pub async fn latest(&self) -> Result<Option<Latest>> {
        match self.root.get_bytes_at_most(LATEST, MAX_LATEST_BYTES).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Format {
                    object: self.root.describe(LATEST),
                    reason: format!("expected {{\"checkpoint\": ..., \"run_id\": ...}}: {e}"),
                }),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The manifest of checkpoint `name`.
    pub async fn manifest(&self, name: &str) -> Result<Manifest> {
        let relative = format!("{name}/{MANIFEST}");
        let bytes = self.root.get_bytes_at_most(&relative, MAX_MANIFEST_BYTES).await?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Format {
            object: self.root.describe(&relative),
            reason: format!("not a checkpoint manifest: {e}"),
        })?;
        if manifest.format > FORMAT {
            return Err(Error::Format {
                object: self.root.describe(&relative),
                reason: format!(
                    "manifest format {} is newer than this release reads ({FORMAT}); upgrade",
                    manifest.format
                ),
            });
        }
        if manifest.name != name {
            return Err(Error::Format {
                object: self.root.describe(&relative),
                reason: format!(
                    "the manifest names checkpoint {}, but lives under {name}",
                    manifest.name
                ),
            });
        }
        Ok(manifest)
    }

    /// Every checkpoint prefix under the root, committed or not, sorted by name.
    async fn names(&self) -> Result<Vec<String>> {
        Ok(self
            .root
            .list_dirs("")
            .await?
            .into_iter()
            .filter(|n| crate::objects::is_checkpoint_name(n))
            .collect())
    }

    /// The manifests of every committed checkpoint (those with a readable manifest), oldest
    /// first; unreadable manifests are reported with their reason.
    pub async fn list(&self) -> Result<(Vec<Manifest>, Vec<String>)> {
        let mut manifests = Vec::new();
        let mut problems = Vec::new();
        for name in self.names().await? {
            match self.manifest(&name).await {
                Ok(m) => manifests.push(m),
                Err(e) if is_missing(&e) => {}
                Err(e) => problems.push(e.to_string()),
            }
        }
        manifests.sort_by_key(|m| (m.step, m.committed_unix_ms));
        Ok((manifests, problems))
    }

    /// Check the whole checkpoint `name`: manifest readable, every object present with the
    /// recorded size and digest.
    pub async fn verify(&self, name: &str) -> Result<Manifest> {
        let manifest = self.manifest(name).await?;
        for entry in &manifest.objects {
            self.verify_object(name, entry).await?;
        }
        Ok(manifest)
    }

    /// The newest checkpoint that verifies: the one `LATEST` names, or else (with a warning)
    /// the newest older committed checkpoint of the same run that passes. `None` when the root
    /// holds no checkpoint at all; an error when it holds some but none is good.
    pub async fn latest_good(&self) -> Result<Option<Good>> {
        let latest = match self.latest().await {
            Ok(l) => l,
            Err(e @ Error::Format { .. }) => {
                tracing::warn!(error = %e, "ignoring an unreadable LATEST; looking for checkpoints by listing");
                None
            }
            Err(e) => return Err(e),
        };
        let (committed, problems) = self.list().await?;
        let mut candidates: Vec<String> = Vec::new();
        if let Some(latest) = &latest {
            candidates.push(latest.checkpoint.clone());
            let bound = committed
                .iter()
                .find(|m| m.name == latest.checkpoint)
                .map(|m| m.step)
                .unwrap_or(u64::MAX);
            // Newer manifests than LATEST were never committed (a crash between the two
            // writes): they do not count.
            candidates.extend(
                committed
                    .iter()
                    .rev()
                    .filter(|m| m.run_id == latest.run_id && m.name != latest.checkpoint && m.step <= bound)
                    .map(|m| m.name.clone()),
            );
        } else {
            candidates.extend(committed.iter().rev().map(|m| m.name.clone()));
        }
        if candidates.is_empty() {
            if problems.is_empty() {
                return Ok(None);
            }
            return Err(Error::Format {
                object: self.root.display.clone(),
                reason: format!("no readable checkpoint: {}", problems.join("; ")),
            });
        }
        let mut skipped = Vec::new();
        for name in candidates {
            match self.verify(&name).await {
                Ok(manifest) => {
                    if !skipped.is_empty() {
                        tracing::warn!(
                            checkpoint = %self.root.describe(&name),
                            skipped = skipped.len(),
                            "falling back to an older checkpoint"
                        );
                    }
                    return Ok(Some(Good { manifest, skipped }));
                }
                Err(e @ (Error::Corrupt { .. } | Error::Format { .. })) => {
                    tracing::warn!(checkpoint = %self.root.describe(&name), error = %e, "checkpoint failed verification; skipping it");
                    skipped.push(e.to_string());
                }
                Err(e) if is_missing(&e) => {
                    let e = format!("{}: an object is missing ({e})", self.root.describe(&name));
                    tracing::warn!(error = %e, "checkpoint incomplete; skipping it");
                    skipped.push(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Format {
            object: self.root.display.clone(),
            reason: format!(
                "checkpoints exist but none passes verification: {}; start over with --fresh",
                skipped.join("; ")
            ),
        })
    }

    /// Take the root's lease for `holder` (see [`Lease`]), for `ttl` from `now_unix_ms`.
    pub async fn take_lease(
        &self,
        holder: &str,
        ttl: std::time::Duration,
        now_unix_ms: u64,
    ) -> Result<Lease> {
        Lease::take(&self.root, holder, ttl, now_unix_ms).await
    }

    /// Delete what `retention` does not keep among the committed checkpoints of run `run_id`,
    /// and uncommitted prefixes (torn uploads) older than the newest commit. Never touches
    /// the checkpoint `LATEST` names, nor other runs' checkpoints. Returns what was deleted.
    pub async fn prune(&self, run_id: &str, retention: Retention) -> Result<Vec<String>> {
        let latest = self.latest().await?;
        let (committed, _) = self.list().await?;
        let ours: Vec<&Manifest> = committed.iter().filter(|m| m.run_id == run_id).collect();
        let mut keep: BTreeSet<String> = ours
            .iter()
            .rev()
            .take(retention.keep_last)
            .map(|m| m.name.clone())
            .collect();
        if retention.keep_best
            && let Some(best) = ours.iter().filter(|m| m.val_accuracy.is_some()).max_by(|a, b| {
                a.val_accuracy
                    .partial_cmp(&b.val_accuracy)
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
        {
            keep.insert(best.name.clone());
        }
        if let Some(latest) = &latest {
            keep.insert(latest.checkpoint.clone());
        }
        // The bound for torn uploads is the last commit on the root (the lease holder's):
        // nothing newer is deleted, whichever run it belongs to.
        let newest = latest
            .as_ref()
            .map(|l| l.checkpoint.clone())
            .or_else(|| ours.last().map(|m| m.name.clone()));
        let committed_names: BTreeSet<&str> = committed.iter().map(|m| m.name.as_str()).collect();
        let mut doomed: Vec<String> = ours
            .iter()
            .filter(|m| !keep.contains(&m.name))
            .map(|m| m.name.clone())
            .collect();
        if let Some(newest) = &newest {
            // Names sort by step: a prefix with no manifest below the newest commit is an
            // upload that died; anything above may still be in flight.
            doomed.extend(
                self.names()
                    .await?
                    .into_iter()
                    .filter(|n| !committed_names.contains(n.as_str()) && n < newest && !keep.contains(n)),
            );
        }
        for name in &doomed {
            // The manifest goes first: a half-deleted checkpoint then reads as uncommitted
            // rather than as corrupt.
            self.root.delete(&format!("{name}/{MANIFEST}")).await?;
            for (object, _) in self.root.list(name).await? {
                self.root.delete(&object).await?;
            }
            self.root.remove_empty_prefix(name);
            tracing::info!(checkpoint = %self.root.describe(name), "old checkpoint deleted by retention");
        }
        Ok(doomed)
    }
}

/// `bytes` bytes of hex that no other call returns, in this process or (by time and process
/// id) another one: for names that must never collide, such as checkpoint prefixes and run ids.
pub fn unique_hex(bytes: usize) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(nanos.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hex::encode(&h.finalize()[..bytes.min(32)])
}

fn is_missing(e: &Error) -> bool {
    matches!(e, Error::Storage(s) if s.is_not_found())
}

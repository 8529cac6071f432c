//! The frozen-phase feature cache.
//!
//! In phase 1 the backbone is frozen and in inference mode, so its output for an image and
//! an augmentation variant never changes: the cache computes it once and every later epoch
//! trains the head from it. Variants: the tutorial's flips and quarter turns are 16 draws
//! but only the 8 symmetries of a square (both flips together are a half turn), so an image
//! has at most 8 entries, filled lazily as the epochs draw them; an epoch pays a backbone pass
//! only for pairs no earlier epoch drew (with augmentation off, only the first epoch does).
//!
//! Entries stay on the device while they fit `memory_bytes` (on the CPU backend that is RAM),
//! then go to a file on local disk up to `disk_bytes`; beyond both, the pair is computed
//! whenever it is drawn, as without a cache. An entry is what the head needs: the pooled
//! feature vector for a linear head (pooling has no parameters), the whole feature map for
//! the tutorial's convolutional head.

// Host-device copies go through `Transfers`, which counts them (transfer_tests.rs).
#![deny(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::transfer::Transfers;

/// Where the cache may keep entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheBudget {
    /// Bytes of device memory for entries.
    pub memory_bytes: u64,
    /// Bytes of local disk for entries beyond the memory budget.
    pub disk_bytes: u64,
    /// Directory for the spill file (a fresh subdirectory is made and removed on drop).
    pub dir: PathBuf,
}

/// Counters of a cache's use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries served from the cache.
    pub hits: u64,
    /// Entries computed by the backbone.
    pub misses: u64,
    /// Bytes of entries held in device memory.
    pub memory_bytes: u64,
    /// Bytes of entries spilled to disk.
    pub disk_bytes: u64,
}

enum Slot {
    // Boxed: a tensor handle is a few hundred bytes, a disk slot eight.
    Device(Box<Tensor<4>>),
    Disk(u64),
}

struct Spill {
    // Removed, with the file, when the cache is dropped.
    _dir: tempfile::TempDir,
    path: PathBuf,
    file: File,
}

/// Backbone outputs by (dataset index, variant).
pub struct FeatureCache {
    budget: CacheBudget,
    /// Shape of one entry, `[channels, h, w]`, fixed by the first insert.
    dims: Option<[usize; 3]>,
    slots: HashMap<u64, Slot>,
    spill: Option<Spill>,
    /// Set once the disk cannot take more: later entries are not cached.
    full: bool,
    stats: CacheStats,
}

fn key(index: usize, variant: u8) -> u64 {
    ((index as u64) << 3) | u64::from(variant & 7)
}

impl FeatureCache {
    /// An empty cache with `budget`.
    pub fn new(budget: CacheBudget) -> Self {
        Self {
            budget,
            dims: None,
            slots: HashMap::new(),
            spill: None,
            full: false,
            stats: CacheStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The features of `keys` (dataset index, variant id) as one `[n, c, h, w]` tensor on
    /// `device`, in order. Pairs not cached yet are computed together by `compute`, which gets
    /// their positions in `keys` and returns their features in that order; they are then kept
    /// as the budget allows. Entries spilled to disk cross between host and device through
    /// `transfers`; those in device memory do not.
    pub fn features(
        &mut self,
        transfers: &Transfers,
        keys: &[(usize, u8)],
        device: &Device,
        compute: impl FnOnce(&[usize]) -> Result<Tensor<4>>,
    ) -> Result<Tensor<4>> {
        let mut rows: Vec<Option<Tensor<4>>> = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (pos, &(index, variant)) in keys.iter().enumerate() {
            let row = self.get(transfers, key(index, variant), device)?;
            if row.is_none() {
                missing.push(pos);
            }
            rows.push(row);
        }
        self.stats.hits += (keys.len() - missing.len()) as u64;
        self.stats.misses += missing.len() as u64;
        if !missing.is_empty() {
            let computed = compute(&missing)?;
            let [m, c, h, w] = computed.dims();
            if m != missing.len() {
                return Err(Error::Internal(format!(
                    "feature cache: the backbone returned {m} feature maps for {} images",
                    missing.len()
                )));
            }
            for (j, &pos) in missing.iter().enumerate() {
                let row = computed.clone().narrow(0, j, 1);
                let (index, variant) = keys[pos];
                self.insert(transfers, key(index, variant), [c, h, w], &row)?;
                rows[pos] = Some(row);
            }
        }
        Ok(Tensor::cat(rows.into_iter().flatten().collect(), 0))
    }

    fn get(&mut self, transfers: &Transfers, key: u64, device: &Device) -> Result<Option<Tensor<4>>> {
        let (Some(slot), Some(dims)) = (self.slots.get(&key), self.dims) else {
            return Ok(None);
        };
        match slot {
            Slot::Device(t) => Ok(Some(t.as_ref().clone())),
            Slot::Disk(offset) => {
                let Some(spill) = &self.spill else {
                    return Ok(None);
                };
                let len: usize = dims.iter().product();
                let mut bytes = vec![0u8; len * 4];
                spill
                    .file
                    .read_exact_at(&mut bytes, *offset)
                    .map_err(|e| Error::io(&spill.path, e))?;
                let values: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let [c, h, w] = dims;
                Ok(Some(
                    transfers.upload(TensorData::new(values, [1, c, h, w]), device),
                ))
            }
        }
    }

    fn insert(&mut self, transfers: &Transfers, key: u64, dims: [usize; 3], row: &Tensor<4>) -> Result<()> {
        if self.slots.contains_key(&key) {
            // A pair drawn twice in one batch (the padding of an epoch's last step).
            return Ok(());
        }
        match self.dims {
            None => self.dims = Some(dims),
            Some(d) if d != dims => {
                return Err(Error::Internal(format!(
                    "feature cache: feature maps changed shape from {d:?} to {dims:?}"
                )));
            }
            Some(_) => {}
        }
        let bytes = dims.iter().product::<usize>() as u64 * 4;
        if self.stats.memory_bytes + bytes <= self.budget.memory_bytes {
            self.stats.memory_bytes += bytes;
            self.slots.insert(key, Slot::Device(Box::new(row.clone())));
            return Ok(());
        }
        if self.full || self.stats.disk_bytes + bytes > self.budget.disk_bytes {
            self.note_full("its disk budget is used up");
            return Ok(());
        }
        let offset = self.stats.disk_bytes;
        let values = transfers.download_f32(row.clone())?;
        let encoded: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let spill = match &mut self.spill {
            Some(spill) => spill,
            None => match open_spill(&self.budget.dir) {
                Ok(spill) => self.spill.insert(spill),
                Err(e) => {
                    // As with a full disk: training goes on, computing what is not kept.
                    self.note_full(&format!("cannot spill to disk: {e}"));
                    return Ok(());
                }
            },
        };
        if let Err(e) = spill.file.write_all_at(&encoded, offset) {
            // A full disk ends spilling, not training: later pairs are computed each time.
            let reason = format!("writing {} failed: {e}", spill.path.display());
            self.note_full(&reason);
            return Ok(());
        }
        self.stats.disk_bytes += bytes;
        self.slots.insert(key, Slot::Disk(offset));
        Ok(())
    }

    fn note_full(&mut self, reason: &str) {
        if !self.full {
            self.full = true;
            tracing::warn!(
                entries = self.slots.len(),
                memory_bytes = self.stats.memory_bytes,
                disk_bytes = self.stats.disk_bytes,
                reason,
                "feature cache is full; features not cached are computed each time they are drawn"
            );
        }
    }
}

fn open_spill(dir: &Path) -> Result<Spill> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = tempfile::Builder::new()
        .prefix("effnet-feature-cache-")
        .tempdir_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let path = tmp.path().join("features.f32");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    tracing::info!(path = %path.display(), "feature cache spills to disk");
    Ok(Spill {
        _dir: tmp,
        path,
        file,
    })
}

#[cfg(test)]
// The tests read results back directly: they check values, not the copies.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn budget(memory_entries: u64, disk_entries: u64, dir: &Path) -> CacheBudget {
        // Entries below are [1, 2, 1, 3]: 24 bytes.
        CacheBudget {
            memory_bytes: memory_entries * 24,
            disk_bytes: disk_entries * 24,
            dir: dir.to_path_buf(),
        }
    }

    fn row(index: usize, variant: u8) -> Vec<f32> {
        (0..6)
            .map(|j| (index * 100 + usize::from(variant) * 10 + j) as f32)
            .collect()
    }

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().unwrap()
    }

    /// Fetch `keys` through `cache`, computing misses from `row`; returns values and the
    /// positions computed.
    fn fetch(cache: &mut FeatureCache, keys: &[(usize, u8)]) -> (Vec<f32>, Vec<usize>) {
        let device = Device::flex();
        let computed = Cell::new(Vec::new());
        let t = cache
            .features(&Transfers::default(), keys, &device, |missing| {
                computed.set(missing.to_vec());
                let data: Vec<f32> = missing.iter().flat_map(|&p| row(keys[p].0, keys[p].1)).collect();
                Ok(Tensor::from_data(
                    TensorData::new(data, [missing.len(), 2, 1, 3]),
                    &device,
                ))
            })
            .unwrap();
        assert_eq!(t.dims(), [keys.len(), 2, 1, 3]);
        (values(t), computed.take())
    }

    fn expected(keys: &[(usize, u8)]) -> Vec<f32> {
        keys.iter().flat_map(|&(i, v)| row(i, v)).collect()
    }

    #[test]
    fn entries_are_computed_once_and_served_in_order_from_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = FeatureCache::new(budget(2, 2, dir.path()));
        let first = [(7, 0), (3, 5), (7, 1), (9, 0)];
        let (v, computed) = fetch(&mut cache, &first);
        assert_eq!(v, expected(&first));
        assert_eq!(computed, [0, 1, 2, 3]);
        let stats = cache.stats();
        assert_eq!((stats.memory_bytes, stats.disk_bytes), (48, 48));
        // The same image with another variant is a different entry; the rest are hits,
        // whether kept in memory or on disk.
        let second = [(9, 0), (7, 2), (3, 5), (7, 0), (7, 1)];
        let (v, computed) = fetch(&mut cache, &second);
        assert_eq!(v, expected(&second));
        assert_eq!(computed, [1]);
        assert_eq!(cache.stats().hits, 4);
        assert_eq!(cache.stats().misses, 5);
        // Over both budgets, (7, 2) was not kept: drawn again, it is computed again.
        let (_, computed) = fetch(&mut cache, &[(7, 2), (9, 0)]);
        assert_eq!(computed, [0]);
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn the_spill_file_goes_away_with_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = FeatureCache::new(budget(0, 10, dir.path()));
        let keys = [(1, 0), (2, 0)];
        fetch(&mut cache, &keys);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let (v, computed) = fetch(&mut cache, &keys);
        assert_eq!((v, computed), (expected(&keys), vec![]));
        drop(cache);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_unusable_spill_directory_only_stops_caching() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-directory");
        std::fs::write(&file, b"").unwrap();
        let mut cache = FeatureCache::new(budget(1, 10, &file));
        let keys = [(1, 0), (2, 0)];
        let (v, computed) = fetch(&mut cache, &keys);
        assert_eq!((v, computed), (expected(&keys), vec![0, 1]));
        // The first stayed in memory; the second could not be kept and is computed again.
        let (_, computed) = fetch(&mut cache, &keys);
        assert_eq!(computed, [1]);
        assert_eq!(cache.stats().disk_bytes, 0);
    }

    #[test]
    fn a_shape_change_is_an_error_not_a_mixup() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = FeatureCache::new(budget(10, 0, dir.path()));
        fetch(&mut cache, &[(1, 0)]);
        let device = Device::flex();
        let err = cache
            .features(&Transfers::default(), &[(2, 0)], &device, |_| {
                Ok(Tensor::zeros([1, 4, 1, 1], &device))
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("changed shape from [2, 1, 3] to [4, 1, 1]"), "{err}");
    }
}

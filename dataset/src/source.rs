//! A dataset opened from a [`DataStore`]: its classes, its items, and batched reads.
//!
//! The format is recognised from what is there: `data_batch_1.bin` (at the root or under
//! `cifar-10-batches-bin/`) means the CIFAR-10 binary layout; otherwise `train/<class>/` image
//! folders.

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use crate::cifar;
use crate::error::{Error, Result};
use crate::folder;
use crate::store::DataStore;

/// Where one sample's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Record `index` of CIFAR batch file `file` (an index into [`Dataset::files`]).
    Record {
        /// Batch file.
        file: usize,
        /// Record number inside it.
        index: usize,
    },
    /// An image file, by its path relative to the dataset root.
    Image(String),
}

/// A decoded sample: interleaved RGB pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes, row-major RGB.
    pub rgb: Vec<u8>,
    /// Class index.
    pub label: u16,
}

/// An indexed dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Where it lives.
    pub store: DataStore,
    /// Class names; a label is a position here.
    pub classes: Vec<String>,
    /// CIFAR batch files (relative paths), empty for image folders.
    pub files: Vec<String>,
    /// Every sample.
    pub items: Vec<Item>,
    /// The label of every sample, once known: image folders know them from their paths;
    /// CIFAR labels sit inside the records and are fetched by [`Dataset::load_labels`].
    labels: Option<Vec<u16>>,
    /// Indices of the official training samples, in file order.
    pub train: Vec<usize>,
    /// Indices of the official test samples, in file order.
    pub test: Vec<usize>,
}

impl Dataset {
    fn empty(store: DataStore, classes: Vec<String>) -> Self {
        Dataset {
            store,
            classes,
            files: Vec::new(),
            items: Vec::new(),
            labels: None,
            train: Vec::new(),
            test: Vec::new(),
        }
    }

    /// Add an item to the official train or test set.
    fn push(&mut self, item: Item, is_train: bool) {
        let i = self.items.len();
        self.items.push(item);
        if is_train {
            self.train.push(i)
        } else {
            self.test.push(i)
        }
    }

    /// Index the dataset at `store`: CIFAR-10 binary or an image folder.
    pub async fn open(store: DataStore) -> Result<Self> {
        for dir in ["", "cifar-10-batches-bin/"] {
            let first = format!("{dir}{}", cifar::TRAIN_FILES[0]);
            if store.store.head(&store.path(&first)).await.is_ok() {
                return Self::open_cifar(store, dir).await;
            }
        }
        Self::open_folder(store).await
    }

    async fn open_cifar(store: DataStore, dir: &str) -> Result<Self> {
        let meta = format!("{dir}{}", cifar::META_FILE);
        let classes = match store.get_bytes(&meta).await {
            Ok(bytes) => cifar::parse_meta(&store.describe(&meta), &String::from_utf8_lossy(&bytes))?,
            Err(e) if e.is_not_found() => cifar::CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
            Err(e) => return Err(e.into()),
        };
        let mut ds = Dataset::empty(store, classes);
        let names = cifar::TRAIN_FILES
            .iter()
            .map(|f| (f, true))
            .chain([(&cifar::TEST_FILE, false)]);
        for (name, is_train) in names {
            let relative = format!("{dir}{name}");
            let described = ds.store.describe(&relative);
            // Only the size: a worker reads the records of its shard later, nothing more.
            let meta = ds
                .store
                .store
                .head(&ds.store.path(&relative))
                .await
                .map_err(|error| Error::Read {
                    file: described.clone(),
                    error,
                })?;
            let count = cifar::record_count(&described, meta.size)?;
            let file = ds.files.len();
            ds.files.push(relative);
            for index in 0..count {
                ds.push(Item::Record { file, index }, is_train);
            }
        }
        Ok(ds)
    }

    async fn open_folder(store: DataStore) -> Result<Self> {
        let prefix = store.prefix.clone();
        let listed: Vec<object_store::ObjectMeta> = store
            .store
            .list(if prefix.as_ref().is_empty() {
                None
            } else {
                Some(&prefix)
            })
            .try_collect()
            .await
            .map_err(|error| Error::Read {
                file: store.display.clone(),
                error,
            })?;
        let prefix_parts = prefix.parts().count();
        let paths = listed.into_iter().map(|m| {
            m.location
                .parts()
                .skip(prefix_parts)
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/")
        });
        let index = folder::index(&store.display, paths)?;
        let mut labels = Vec::new();
        let mut ds = Dataset::empty(store, index.classes);
        for (items, is_train) in [(index.train, true), (index.test, false)] {
            for item in items {
                ds.push(Item::Image(item.path), is_train);
                labels.push(item.label);
            }
        }
        ds.labels = Some(labels);
        Ok(ds)
    }

    /// Labels of every item, when known (see [`Dataset::load_labels`]).
    pub fn labels(&self) -> Option<&[u16]> {
        self.labels.as_deref()
    }

    /// Make sure every label is known and return them. For CIFAR this reads each batch file
    /// once (labels are one byte in every 3073); only class-balanced limits need it.
    pub async fn load_labels(&mut self) -> Result<&[u16]> {
        if self.labels.is_none() {
            let mut labels = Vec::with_capacity(self.items.len());
            for relative in &self.files {
                let bytes = self.store.get_bytes(relative).await?;
                labels.extend(cifar::labels(&self.store.describe(relative), &bytes)?);
            }
            self.labels = Some(labels);
        }
        Ok(self.labels.as_deref().unwrap_or_default())
    }

    /// Read and decode the samples at `indices`, in that order. CIFAR records are fetched with
    /// one ranged request per file (the store coalesces nearby ranges); images concurrently.
    pub async fn read(&self, indices: &[usize]) -> Result<Vec<Sample>> {
        let mut out: Vec<Option<Sample>> = vec![None; indices.len()];
        let mut by_file: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.files.len()];
        let mut images = Vec::new();
        for (slot, &i) in indices.iter().enumerate() {
            match &self.items[i] {
                Item::Record { file, index } => by_file[*file].push((slot, *index)),
                Item::Image(path) => images.push((slot, i, path.clone())),
            }
        }
        for (file, wanted) in by_file.iter().enumerate().filter(|(_, w)| !w.is_empty()) {
            let relative = &self.files[file];
            let described = self.store.describe(relative);
            let ranges: Vec<std::ops::Range<u64>> = wanted
                .iter()
                .map(|&(_, r)| (r * cifar::RECORD) as u64..((r + 1) * cifar::RECORD) as u64)
                .collect();
            let chunks = self
                .store
                .store
                .get_ranges(&self.store.path(relative), &ranges)
                .await
                .map_err(|error| Error::Read {
                    file: described.clone(),
                    error,
                })?;
            for (&(slot, record), bytes) in wanted.iter().zip(chunks) {
                let (label, rgb) = cifar::decode_record(&described, record, &bytes)?;
                out[slot] = Some(Sample {
                    width: cifar::SIDE,
                    height: cifar::SIDE,
                    rgb,
                    label,
                });
            }
        }
        let decoded: Vec<(usize, Sample)> = futures::stream::iter(images)
            .map(|(slot, i, path)| async move {
                let bytes = self.store.get_bytes(&path).await?;
                let img = image::load_from_memory(&bytes)
                    .map_err(|e| Error::Image {
                        file: self.store.describe(&path),
                        reason: e.to_string(),
                    })?
                    .to_rgb8();
                let (w, h) = (img.width() as usize, img.height() as usize);
                let label = self.labels.as_ref().map_or(0, |l| l[i]);
                Ok::<_, Error>((
                    slot,
                    Sample {
                        width: w,
                        height: h,
                        rgb: img.into_raw(),
                        label,
                    },
                ))
            })
            .buffered(8)
            .try_collect()
            .await?;
        for (slot, sample) in decoded {
            out[slot] = Some(sample);
        }
        Ok(out.into_iter().flatten().collect())
    }
}

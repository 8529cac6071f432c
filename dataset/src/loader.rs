//! Background reading: a thread fetches and decodes the next batches while the caller's
//! device works on the current one.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::source::{Dataset, Sample};

/// One batch as read: the dataset indices and their decoded samples, in the same order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Dataset indices.
    pub indices: Vec<usize>,
    /// Decoded samples.
    pub samples: Vec<Sample>,
}

/// Batches read ahead on a background thread; iterate to receive them in order. Dropping it
/// stops the thread after the batch in flight.
pub struct Prefetcher {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Start reading `batches` (lists of dataset indices) with up to `depth` batches ready
    /// ahead of the consumer.
    pub fn spawn(dataset: Arc<Dataset>, batches: Vec<Vec<usize>>, depth: usize) -> Result<Self> {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("data-prefetch".into())
            .spawn(move || read_all(&dataset, batches, &tx))
            .map_err(|e| Error::Location {
                location: "prefetch thread".into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            rx: Some(rx),
            handle: Some(handle),
        })
    }
}

fn read_all(dataset: &Dataset, batches: Vec<Vec<usize>>, tx: &SyncSender<Result<Batch>>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = tx.send(Err(Error::Location {
                location: "prefetch runtime".into(),
                reason: e.to_string(),
            }));
            return;
        }
    };
    for indices in batches {
        let result = runtime
            .block_on(dataset.read(&indices))
            .map(|samples| Batch { indices, samples });
        let failed = result.is_err();
        // A closed channel means the consumer stopped: nothing left to do.
        if tx.send(result).is_err() || failed {
            return;
        }
    }
}

impl Iterator for Prefetcher {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Close the channel first so a thread blocked on a full queue wakes up and exits.
        drop(self.rx.take());
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Cut `indices` into batches of `batch` (the last may be shorter).
pub fn batches(indices: &[usize], batch: usize) -> Vec<Vec<usize>> {
    indices.chunks(batch.max(1)).map(<[usize]>::to_vec).collect()
}

//! Copies between the host and the compute device, counted and timed.
//!
//! On a GPU each copy is a synchronisation point and a trip over PCIe; a step that copied its
//! 200-odd gradient tensors one by one spent its time there. The training step and the
//! benchmarks move tensors through [`Transfers`] only, so the number of copies a step makes is
//! measured (`transfers_per_step` in the tests, the `host transfers` column of `worker bench
//! model`), not assumed. On flex "the device" is host memory: the counts are the same, the
//! copies are memcpys.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use burn::tensor::kind::Basic;
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{Error, Result};

/// Running totals of host-device copies.
#[derive(Debug, Default)]
pub struct Transfers {
    downloads: AtomicU64,
    uploads: AtomicU64,
    bytes_down: AtomicU64,
    bytes_up: AtomicU64,
    nanos: AtomicU64,
}

/// A snapshot of [`Transfers`]; subtract two to get what happened in between.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct TransferCounts {
    /// Device-to-host copies.
    pub downloads: u64,
    /// Host-to-device copies.
    pub uploads: u64,
    /// Bytes copied to the host.
    pub bytes_down: u64,
    /// Bytes copied to the device.
    pub bytes_up: u64,
    /// Seconds spent in the copies (a download also waits for the work it reads to finish,
    /// unless the caller synchronised first).
    pub seconds: f64,
}

impl std::ops::Sub for TransferCounts {
    type Output = TransferCounts;

    fn sub(self, earlier: TransferCounts) -> TransferCounts {
        TransferCounts {
            downloads: self.downloads - earlier.downloads,
            uploads: self.uploads - earlier.uploads,
            bytes_down: self.bytes_down - earlier.bytes_down,
            bytes_up: self.bytes_up - earlier.bytes_up,
            seconds: self.seconds - earlier.seconds,
        }
    }
}

impl Transfers {
    /// Copy `tensor` to the host.
    pub fn download<const D: usize, K>(&self, tensor: Tensor<D, K>) -> Result<TensorData>
    where
        K: Basic,
    {
        let started = Instant::now();
        let data = tensor
            .try_into_data()
            .map_err(|e| Error::Transfer(format!("reading a tensor back from the device: {e:?}")))?;
        self.count(&self.downloads, &self.bytes_down, data.as_bytes().len(), started);
        Ok(data)
    }

    /// Copy `tensor` to the host as `f32` values.
    pub fn download_f32<const D: usize>(&self, tensor: Tensor<D>) -> Result<Vec<f32>> {
        let data = self.download(tensor)?.convert::<f32>();
        data.try_into_vec::<f32>()
            .map_err(|e| Error::Transfer(format!("the device returned other values than f32: {e:?}")))
    }

    /// Copy `data` to `device`.
    pub fn upload<const D: usize, K>(&self, data: TensorData, device: &Device) -> Tensor<D, K>
    where
        K: Basic,
    {
        let started = Instant::now();
        let bytes = data.as_bytes().len();
        let tensor = Tensor::from_data(data, device);
        self.count(&self.uploads, &self.bytes_up, bytes, started);
        tensor
    }

    fn count(&self, copies: &AtomicU64, bytes: &AtomicU64, n: usize, started: Instant) {
        copies.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The totals so far.
    pub fn snapshot(&self) -> TransferCounts {
        TransferCounts {
            downloads: self.downloads.load(Ordering::Relaxed),
            uploads: self.uploads.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            seconds: self.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Int;

    #[test]
    fn copies_are_counted_both_ways_with_their_bytes() {
        let t = Transfers::default();
        let device = Device::flex();
        let x: Tensor<2> = t.upload(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]), &device);
        let labels: Tensor<1, Int> = t.upload(TensorData::new(vec![3i64, 1], [2]), &device);
        let before = t.snapshot();
        assert_eq!(before.uploads, 2);
        assert_eq!(before.bytes_up, 16 + labels.dims()[0] as u64 * 8);
        assert_eq!(t.download_f32(x.mul_scalar(2.0)).unwrap(), [2.0, 4.0, 6.0, 8.0]);
        let after = t.snapshot() - before;
        assert_eq!((after.downloads, after.uploads, after.bytes_down), (1, 0, 16));
    }
}

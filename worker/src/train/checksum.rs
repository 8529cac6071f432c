//! Checksums of a model's weights, which every rank reports so that the coordinator can tell
//! that all ranks hold the same model bit for bit.

use super::*;

/// Whether a tensor path names a BatchNorm running statistic.
pub(super) fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// The first 8 bytes of the SHA-256 of names and value bits.
fn hash_tensors(tensors: impl Iterator<Item = (String, RawTensor)>) -> u64 {
    let mut hasher = Sha256::new();
    for (name, tensor) in tensors {
        hasher.update(name.as_bytes());
        for v in tensor.data {
            hasher.update(v.to_bits().to_le_bytes());
        }
    }
    let digest = hasher.finalize();
    u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

/// A checksum of every weight and BatchNorm statistic: equal on all ranks when they agree
/// bit for bit.
pub fn weights_checksum<M: Module>(module: &M) -> u64 {
    hash_tensors(collect_tensors(module).into_iter())
}

/// A checksum of the parameters only. BatchNorm statistics are left out: a BatchNorm that
/// trains has each rank's own statistics until the end of the epoch.
pub fn parameters_checksum<M: Module>(module: &M) -> u64 {
    hash_tensors(
        collect_tensors(module)
            .into_iter()
            .filter(|(name, _)| !is_running_stat(name)),
    )
}

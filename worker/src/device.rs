//! Choosing the compute device.

use burn::tensor::Device;

use crate::error::{Error, Result};

/// Whether this build can run on CUDA GPUs.
pub const CUDA_ENABLED: bool = cfg!(feature = "cuda");

/// The device for `--gpu N`, or the CPU (Burn's flex backend) when `gpu` is `None`.
pub fn select(gpu: Option<usize>) -> Result<Device> {
    match gpu {
        None => Ok(Device::flex()),
        Some(index) => cuda(index),
    }
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device> {
    let count = cuda_device_count();
    if index >= count {
        return Err(Error::Device(format!(
            "--gpu {index} requested but {count} CUDA device(s) are visible; \
             check CUDA_VISIBLE_DEVICES and nvidia-smi"
        )));
    }
    Ok(Device::cuda(index))
}

#[cfg(feature = "cuda")]
fn cuda_device_count() -> usize {
    // The driver lists one directory per GPU; this avoids initialising a CUDA context (which
    // panics inside the backend when the device does not exist) just to count devices.
    std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|entries| entries.count())
        .unwrap_or(0)
}

#[cfg(not(feature = "cuda"))]
fn cuda(index: usize) -> Result<Device> {
    Err(Error::Device(format!(
        "--gpu {index} requested, but this worker binary was built without CUDA support; \
         rebuild with `cargo build --release -p worker --features cuda`, or pass --cpu"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available() {
        assert!(select(None).is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn gpu_without_cuda_build_says_how_to_fix_it() {
        let err = select(Some(0)).unwrap_err().to_string();
        assert!(err.contains("without CUDA support"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
    }
}

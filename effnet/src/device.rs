//! Choosing the compute device: the CPU (flex or LibTorch), or a GPU through CUDA or wgpu.

use std::path::{Path, PathBuf};

use burn::tensor::Device;

use crate::error::Result;

/// Whether this build can run on CUDA GPUs.
pub const CUDA_ENABLED: bool = cfg!(feature = "cuda");

/// Whether this build can run on GPUs through wgpu (Vulkan, Metal, DirectX).
pub const WGPU_ENABLED: bool = cfg!(feature = "wgpu");

/// Whether this build carries Burn's LibTorch backend (`--cpu-backend libtorch`).
pub const LIBTORCH_ENABLED: bool = cfg!(feature = "libtorch");

pub use crate::error::DeviceError;

/// Which Burn backend runs the model when there is no GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuBackend {
    /// Burn's own CPU backend: pure Rust, always built in.
    #[default]
    Flex,
    /// PyTorch's CPU kernels (oneDNN convolutions, vectorised element-wise ops) through Burn's
    /// LibTorch backend; 1.5-3.5x Flex's speed on EfficientNet (docs/benchmarks.md).
    Libtorch,
}

impl CpuBackend {
    /// The name `--cpu-backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            CpuBackend::Flex => "flex",
            CpuBackend::Libtorch => "libtorch",
        }
    }
}

/// Which Burn backend runs the model on `--gpu N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuBackend {
    /// NVIDIA GPUs through CUDA (kernels compiled to PTX by LLVM at run time).
    Cuda,
    /// Any GPU with a Vulkan, Metal or DirectX 12 driver, through wgpu; also a software
    /// Vulkan device such as Mesa's lavapipe.
    Wgpu,
}

impl GpuBackend {
    /// The name `--gpu-backend` takes.
    pub fn name(self) -> &'static str {
        match self {
            GpuBackend::Cuda => "cuda",
            GpuBackend::Wgpu => "wgpu",
        }
    }

    /// The backend `--gpu` uses without `--gpu-backend`: CUDA when the binary has it (the
    /// faster one on NVIDIA GPUs), else wgpu, else none (then `--gpu` says how to build one).
    pub fn built_default() -> Option<GpuBackend> {
        if CUDA_ENABLED {
            Some(GpuBackend::Cuda)
        } else if WGPU_ENABLED {
            Some(GpuBackend::Wgpu)
        } else {
            None
        }
    }
}

/// The device the command line asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Choice {
    /// `--gpu N`, or the CPU when absent.
    pub gpu: Option<usize>,
    /// `--gpu-backend`; the binary's default when absent.
    pub gpu_backend: Option<GpuBackend>,
    /// `--cpu-backend`, used without a GPU.
    pub cpu_backend: CpuBackend,
}

/// A device ready for use, and how logs, status and reports name it.
#[derive(Debug, Clone)]
pub struct Selected {
    /// The device.
    pub device: Device,
    /// `cpu`, `cpu-libtorch`, `cuda:0` or `vulkan:0 (llvmpipe ...)`.
    pub name: String,
}

impl Choice {
    /// The CPU with `backend`.
    pub fn cpu(backend: CpuBackend) -> Self {
        Self {
            cpu_backend: backend,
            ..Self::default()
        }
    }

    /// Open the device, or say what is missing. A GPU is checked here, at start, so that a
    /// worker without a usable one fails before it joins a ring rather than at its first
    /// kernel.
    pub fn select(self) -> Result<Selected> {
        let Some(index) = self.gpu else {
            return Ok(match self.cpu_backend {
                CpuBackend::Flex => Selected {
                    device: Device::flex(),
                    name: "cpu".into(),
                },
                backend => Selected {
                    device: libtorch()?,
                    name: format!("cpu-{}", backend.name()),
                },
            });
        };
        match self.gpu_backend.or_else(GpuBackend::built_default) {
            Some(GpuBackend::Cuda) => cuda(index),
            Some(GpuBackend::Wgpu) => wgpu(index),
            None => Err(not_built(index, GpuBackend::Cuda).into()),
        }
    }
}

/// Shorthand for [`Choice::select`] on the CPU.
pub fn cpu(backend: CpuBackend) -> Result<Device> {
    Choice::cpu(backend).select().map(|s| s.device)
}

#[cfg(feature = "libtorch")]
// Burn 0.22 marks burn-tch deprecated in favour of its CubeCL CPU backend, whose build needs
// an LLVM download; on the pinned 0.22 line LibTorch stays available and is the fast one.
#[allow(deprecated)]
fn libtorch() -> Result<Device> {
    Ok(Device::libtorch())
}

#[cfg(not(feature = "libtorch"))]
fn libtorch() -> Result<Device> {
    Err(DeviceError::NotBuilt {
        asked: "--cpu-backend libtorch".into(),
        backend: "it",
        build: "LIBTORCH=<libtorch dir> cargo build --release -p worker --features libtorch",
        instead: "use --cpu-backend flex",
    }
    .into())
}

fn not_built(index: usize, backend: GpuBackend) -> DeviceError {
    let (name, build) = match backend {
        GpuBackend::Cuda => ("CUDA support", "cargo build --release -p worker --features cuda"),
        GpuBackend::Wgpu => ("wgpu support", "cargo build --release -p worker --features wgpu"),
    };
    DeviceError::NotBuilt {
        asked: format!("--gpu {index}"),
        backend: name,
        build,
        instead: "pass --cpu",
    }
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Selected> {
    let installed = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|entries| entries.count())
        .unwrap_or(0);
    let visible_env = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let visible = visible_cuda_devices(installed, visible_env.as_deref());
    if index >= visible {
        let hint = match &visible_env {
            Some(list) => {
                format!(" ({installed} installed, CUDA_VISIBLE_DEVICES={list:?}); check it and nvidia-smi")
            }
            None => format!(" ({installed} installed); check nvidia-smi and the NVIDIA driver"),
        };
        return Err(DeviceError::NoSuchGpu {
            index,
            visible,
            backend: "CUDA",
            hint,
        }
        .into());
    }
    let cuda_path = std::env::var_os("CUDA_PATH").map(PathBuf::from);
    libdevice(cuda_path.as_deref(), &|p| p.is_file())?;
    Ok(Selected {
        // Checked above: creating the device of a missing GPU panics inside the backend.
        device: Device::cuda(index),
        name: format!("cuda:{index}"),
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(index: usize) -> Result<Selected> {
    Err(not_built(index, GpuBackend::Cuda).into())
}

#[cfg(feature = "wgpu")]
fn wgpu(index: usize) -> Result<Selected> {
    use burn::tensor::DeviceType;
    let devices = Device::enumerate(DeviceType::Wgpu);
    let count = devices.len();
    let Some(device) = devices.into_iter().nth(index) else {
        return Err(DeviceError::NoSuchGpu {
            index,
            visible: count,
            backend: "Vulkan",
            hint: "; install the GPU's Vulkan driver (or Mesa's lavapipe, Debian's \
                   mesa-vulkan-drivers, for a software device) and check `vulkaninfo --summary`"
                .into(),
        }
        .into());
    };
    let adapter = device
        .identity()
        .map(|identity| identity.name)
        .unwrap_or_else(|| "unnamed adapter".into());
    let api = if vulkan_adapters().contains(&adapter) {
        "vulkan"
    } else {
        // Another graphics API (OpenGL, Metal, DirectX 12): wgpu chose it.
        "wgpu"
    };
    Ok(Selected {
        device,
        name: format!("{api}:{index} ({adapter})"),
    })
}

/// The adapter names Vulkan lists: wgpu runs on Vulkan wherever Vulkan has the adapter
/// (it falls back to another API only where Vulkan lacks a GPU that API has).
#[cfg(feature = "wgpu")]
fn vulkan_adapters() -> Vec<String> {
    use burn::tensor::wgpu::wgpu;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::VULKAN,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    futures::executor::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN))
        .iter()
        .map(|adapter| adapter.get_info().name)
        .collect()
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(index: usize) -> Result<Selected> {
    Err(not_built(index, GpuBackend::Wgpu).into())
}

/// How many CUDA devices a process sees with `installed` GPUs and `CUDA_VISIBLE_DEVICES` set
/// to `visible`, as the CUDA driver reads it: the list is taken up to its first entry that is
/// not a device (an index past the last GPU, a repeat, or an empty entry); an entry naming a
/// GPU or MIG instance by UUID counts as one device (it cannot be checked without NVML).
pub fn visible_cuda_devices(installed: usize, visible: Option<&str>) -> usize {
    let Some(list) = visible else {
        return installed;
    };
    let mut seen = Vec::new();
    for entry in list.split(',').map(str::trim) {
        let valid = match entry.parse::<usize>() {
            Ok(i) => i < installed && !seen.contains(&entry),
            Err(_) => entry.starts_with("GPU-") || entry.starts_with("MIG-"),
        };
        if !valid {
            break;
        }
        seen.push(entry);
    }
    seen.len()
}

/// The CUDA toolkit roots the LLVM backend looks in when `CUDA_PATH` is not set.
const CUDA_ROOTS: [&str; 4] = ["/usr/local/cuda", "/opt/cuda", "/usr/lib/cuda", "/usr"];

/// Where the LLVM backend will find libdevice: under `cuda_path` alone when set (as cubecl's
/// lookup does), else under the first standard root that has it.
pub fn libdevice(cuda_path: Option<&Path>, exists: &dyn Fn(&Path) -> bool) -> Result<PathBuf> {
    let file = |root: &Path| root.join("nvvm/libdevice/libdevice.10.bc");
    let roots: Vec<PathBuf> = match cuda_path {
        Some(root) => vec![root.to_path_buf()],
        None => CUDA_ROOTS.iter().map(PathBuf::from).collect(),
    };
    roots
        .iter()
        .map(|root| file(root))
        .find(|path| exists(path))
        .ok_or_else(|| {
            let searched = match cuda_path {
                Some(root) => format!("CUDA_PATH={}", root.display()),
                None => format!("{} (CUDA_PATH is not set)", CUDA_ROOTS.join(", ")),
            };
            DeviceError::NoLibdevice { searched }.into()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available() {
        let flex = Choice::cpu(CpuBackend::Flex).select().unwrap();
        assert_eq!(flex.name, "cpu");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn gpu_without_cuda_build_says_how_to_fix_it() {
        let choice = Choice {
            gpu: Some(0),
            gpu_backend: Some(GpuBackend::Cuda),
            ..Choice::default()
        };
        let err = choice.select().unwrap_err().to_string();
        assert!(err.contains("without CUDA support"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
        assert!(err.contains("--cpu"), "{err}");
    }

    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    #[test]
    fn gpu_on_a_cpu_only_build_names_the_cuda_build() {
        let err = Choice {
            gpu: Some(1),
            ..Choice::default()
        }
        .select()
        .unwrap_err()
        .to_string();
        assert!(err.contains("--gpu 1"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_without_the_feature_says_how_to_fix_it() {
        let err = Choice {
            gpu: Some(0),
            gpu_backend: Some(GpuBackend::Wgpu),
            ..Choice::default()
        }
        .select()
        .unwrap_err()
        .to_string();
        assert!(err.contains("without wgpu support"), "{err}");
        assert!(err.contains("--features wgpu"), "{err}");
    }

    #[cfg(not(feature = "libtorch"))]
    #[test]
    fn libtorch_without_the_feature_says_how_to_fix_it() {
        let err = cpu(CpuBackend::Libtorch).unwrap_err().to_string();
        assert!(err.contains("built without it"), "{err}");
        assert!(err.contains("--features libtorch"), "{err}");
        assert!(err.contains("--cpu-backend flex"), "{err}");
    }

    #[test]
    fn cuda_visible_devices_is_read_as_the_driver_reads_it() {
        assert_eq!(visible_cuda_devices(4, None), 4);
        assert_eq!(visible_cuda_devices(4, Some("")), 0);
        assert_eq!(visible_cuda_devices(4, Some("2")), 1);
        assert_eq!(visible_cuda_devices(4, Some("3,1")), 2);
        assert_eq!(visible_cuda_devices(4, Some(" 0, 1 ,2")), 3);
        // Taken up to the first entry that is no device.
        assert_eq!(visible_cuda_devices(4, Some("0,7,1")), 1);
        assert_eq!(visible_cuda_devices(4, Some("1,1,2")), 1);
        assert_eq!(visible_cuda_devices(4, Some("-1")), 0);
        assert_eq!(visible_cuda_devices(0, Some("0")), 0);
        assert_eq!(visible_cuda_devices(2, Some("GPU-8c1d-aa,MIG-11,1")), 3);
        assert_eq!(visible_cuda_devices(2, Some("nvidia0")), 0);
    }

    #[test]
    fn libdevice_is_found_as_the_llvm_backend_finds_it() {
        let only = |want: &'static str| move |p: &Path| p == Path::new(want);
        let found = libdevice(None, &only("/opt/cuda/nvvm/libdevice/libdevice.10.bc")).unwrap();
        assert_eq!(found, Path::new("/opt/cuda/nvvm/libdevice/libdevice.10.bc"));
        let wheel = "/venv/nvidia/cu13/nvvm/libdevice/libdevice.10.bc";
        let found = libdevice(Some(Path::new("/venv/nvidia/cu13")), &only(wheel)).unwrap();
        assert_eq!(found, Path::new(wheel));
        // CUDA_PATH, once set, is the only place looked in.
        let err = libdevice(
            Some(Path::new("/nowhere")),
            &only("/usr/local/cuda/nvvm/libdevice/libdevice.10.bc"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("CUDA_PATH=/nowhere"), "{err}");
        assert!(err.contains("pip install nvidia-nvvm"), "{err}");
        let err = libdevice(None, &|_| false).unwrap_err().to_string();
        assert!(err.contains("/usr/local/cuda, /opt/cuda"), "{err}");
        assert!(err.contains("CUDA_PATH is not set"), "{err}");
    }
}

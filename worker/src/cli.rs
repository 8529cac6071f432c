//! The `worker` command line, in the library so that deployment manifests can be checked
//! against the real parser.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use cluster_proto::net::SecurityArgs;

use crate::source::ModelSource;
use effnet::device::{Choice, CpuBackend, GpuBackend};

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "worker",
    version,
    about = "effnet-cluster worker: EfficientNet on Burn"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Classify images and print the top classes (ImageNet models or our fine-tuned ones).
    Predict(PredictArgs),
    /// Test loss, accuracy and per-class accuracy of a trained model (a model file or a
    /// checkpoint URL) on a dataset's test split.
    Evaluate(EvaluateArgs),
    /// Print a model's layers, output shapes and parameter counts as Keras's `summary()`
    /// does, with the trainable and non-trainable totals of each training phase.
    Summary(SummaryArgs),
    /// Measure throughput.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Join a coordinator and work for it until the run ends.
    Join(JoinArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// The coordinator's address, host:port (https:// when TLS is on).
    #[arg(long, env = "CLUSTER_COORDINATOR", value_name = "URL")]
    pub coordinator: String,
    /// host:port the other workers reach this one at (default: a free port on the address
    /// this host uses to reach the coordinator).
    #[arg(long, env = "CLUSTER_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Name in logs and status (default: host name and device).
    #[arg(long)]
    pub name: Option<String>,
    /// Seconds to keep retrying the first connection to the coordinator.
    #[arg(long, default_value_t = 60.0)]
    pub connect_timeout: f64,
    /// Seconds to keep trying to reach the coordinator again after losing it (a restarted
    /// coordinator resumes the run from its last checkpoint); then the worker exits.
    #[arg(long, default_value_t = 300.0, env = "CLUSTER_COORDINATOR_TIMEOUT")]
    pub coordinator_timeout: f64,
    #[command(flatten)]
    pub security: SecurityArgs,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// The model: one of our model files, or a checkpoint root (`s3://bucket/prefix`, a
    /// directory with `LATEST`, `file://`), whose newest good checkpoint is used.
    #[arg(long)]
    pub weights: ModelSource,
    /// Dataset: `cifar10` (downloaded), `synthetic`, a directory or `s3://bucket/prefix`.
    #[arg(long, default_value = "cifar10")]
    pub data: String,
    /// Network input size in pixels.
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: u32,
    /// Split scheme, as the run used it: `official` or `tutorial`.
    #[arg(long, default_value = "official")]
    pub split: String,
    /// Class-balanced cap on test images, as the run used it.
    #[arg(long)]
    pub limit_test: Option<usize>,
    /// The run's seed (it chooses the splits and the generated dataset).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args, Debug)]
pub struct JoinArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Serve Prometheus metrics (step time, data wait, all-reduce time and bytes, loss,
    /// checkpoint uploads) at http://ADDR/metrics; port 0 picks a free port, logged.
    #[arg(long, env = "WORKER_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
pub struct BenchAllreduceArgs {
    /// Start a ring of N ranks in this process, each with its own gRPC server on loopback.
    #[arg(long, value_name = "N", conflicts_with = "coordinator")]
    pub local: Option<usize>,
    /// Instead, join the coordinator of a run started with `--job allreduce-bench` (its
    /// sizes and iterations apply); rank 0 prints the table.
    #[arg(long, env = "CLUSTER_COORDINATOR", value_name = "URL")]
    pub coordinator: Option<String>,
    /// Buffer sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub size_mb: Vec<f64>,
    /// Untimed iterations per size.
    #[arg(long, default_value_t = 2)]
    pub warmup: u32,
    /// Timed iterations per size (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iterations: u32,
    /// bfloat16 values on the wire.
    #[arg(long)]
    pub bf16: bool,
    /// host:port for peer traffic (with --coordinator).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub security: SecurityArgs,
}

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Run on GPU N: CUDA device N, or the Nth wgpu (Vulkan) adapter with `--gpu-backend
    /// wgpu` (needs a binary built with `--features cuda` or `--features wgpu`).
    #[arg(long, value_name = "N", conflicts_with = "cpu")]
    pub gpu: Option<usize>,
    /// GPU backend for `--gpu`: `cuda` or `wgpu`; by default CUDA when the binary has it,
    /// else wgpu.
    #[arg(long, value_enum, value_name = "BACKEND", env = "EFFNET_GPU_BACKEND")]
    pub gpu_backend: Option<GpuBackend>,
    /// Run on the CPU (the default).
    #[arg(long)]
    pub cpu: bool,
    /// CPU backend: `flex` (Burn's own, always built in) or `libtorch` (PyTorch's CPU kernels
    /// through Burn's LibTorch backend; needs a binary built with `--features libtorch`).
    #[arg(
        long,
        value_enum,
        value_name = "BACKEND",
        default_value_t,
        env = "EFFNET_CPU_BACKEND"
    )]
    pub cpu_backend: CpuBackend,
}

impl DeviceArgs {
    /// The device these flags ask for.
    pub fn choice(&self) -> Choice {
        Choice {
            gpu: self.gpu,
            gpu_backend: self.gpu_backend,
            cpu_backend: self.cpu_backend,
        }
    }
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Architecture: efficientnet-b0..b7 or efficientnet-lite0..lite4. Our own model files
    /// name their architecture, so it can be left out for them.
    #[arg(long)]
    pub model: Option<String>,
    /// `imagenet` (download torchvision's B0 weights), `none`, or a weights file: PyTorch
    /// .pth, safetensors (torchvision, timm or EfficientNet-PyTorch names) or our model file.
    #[arg(long, default_value = "imagenet")]
    pub weights: ModelSource,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Input size in pixels (default: the model's native resolution).
    #[arg(long)]
    pub image_size: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// JPEG or PNG images.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SummaryArgs {
    /// Architecture: efficientnet-b0..b7 or efficientnet-lite0..lite4.
    #[arg(long, default_value = "efficientnet-b0")]
    pub model: String,
    /// The head on top: `linear`, `tutorial`, or `none` for the backbone alone (Keras's
    /// `include_top=False`).
    #[arg(long, default_value = "linear", value_parser = ["linear", "tutorial", "none"])]
    pub head: String,
    /// Only this phase's totals (default: phase 1 and phase 2). `scratch` is phase 1 of a run
    /// with `--weights none`.
    #[arg(long, value_parser = ["head", "finetune", "scratch"])]
    pub phase: Option<String>,
    /// Classes of the head's output.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Input size in pixels, for the output shapes.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Inference and training-step images/s of a model on random input, beside PyTorch's.
    Model(BenchModelArgs),
    /// Images/s of the input pipeline: read, decode, upload, resize and augment.
    Data(BenchDataArgs),
    /// All-reduce bandwidth over the gRPC ring (nccl-tests' algbw and busbw).
    Allreduce(BenchAllreduceArgs),
}

#[derive(Args, Debug)]
pub struct BenchDataArgs {
    /// Dataset: `cifar10`, `synthetic` (generated in memory), a local directory, file://...
    /// or s3://bucket/prefix.
    #[arg(long)]
    pub data: String,
    /// How many training images to push through.
    #[arg(long, default_value_t = 2048)]
    pub images: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Output size in pixels.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Skip the flips and rotations.
    #[arg(long)]
    pub no_augment: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args, Debug)]
pub struct BenchModelArgs {
    /// Architecture to measure.
    #[arg(long, default_value = "efficientnet-b0")]
    pub model: String,
    /// Images per step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Input size in pixels.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Also run torchvision's B0 through `--python` when torch is installed.
    #[arg(long, default_value = "auto", value_parser = ["auto", "yes", "no"])]
    pub torch: String,
    /// Only these workloads: infer, train, phase1, phase1_cached, phase2 (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = ["infer", "train", "phase1", "phase1_cached", "phase2"])]
    pub workloads: Vec<String>,
    /// The Python interpreter for the PyTorch reference.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Images per epoch for the epoch-time columns (CIFAR-10's official training split).
    #[arg(long, default_value_t = crate::bench::CIFAR10_TRAIN_IMAGES)]
    pub epoch_images: usize,
    /// Print the measurements as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

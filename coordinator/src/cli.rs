//! The `coordinator` command line, in the library so that deployment manifests can be
//! checked against the real parser.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use cluster_proto::net::SecurityArgs;

use crate::config::RunArgs;

/// The command line.
#[derive(Parser, Debug)]
#[command(name = "coordinator", version, about = "effnet-cluster coordinator")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a run: wait for the workers, then drive it to the end.
    Start(Box<StartArgs>),
    /// Print a running coordinator's state.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// Address to serve on (default 0.0.0.0:50051; with --local, a free loopback port).
    #[arg(long, env = "CLUSTER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Workers to wait for before the run starts.
    #[arg(long, default_value_t = 1, env = "CLUSTER_WORKERS", conflicts_with = "local")]
    pub workers: usize,
    /// Single-node mode: start N worker processes on this machine and run with them (a
    /// fresh join token is made unless one is given).
    #[arg(long, value_name = "N")]
    pub local: Option<usize>,
    /// With --local: GPUs for the workers, one per worker in order (CPU when absent); a GPU
    /// may be listed twice to run two workers on it.
    #[arg(long, value_delimiter = ',', value_name = "0,1,...", requires = "local")]
    pub gpus: Vec<usize>,
    /// With --local and --gpus: the workers' GPU backend, `cuda` or `wgpu` (Vulkan); by
    /// default CUDA when the worker binary has it, else wgpu.
    #[arg(long, value_name = "BACKEND", value_parser = ["cuda", "wgpu"], requires = "gpus")]
    pub gpu_backend: Option<String>,
    /// With --local: the CPU backend of the workers without a GPU: `flex` (Burn's own) or
    /// `libtorch` (PyTorch's CPU kernels; needs a worker built with `--features libtorch`).
    #[arg(long, value_name = "BACKEND", value_parser = ["flex", "libtorch"], requires = "local")]
    pub cpu_backend: Option<String>,
    /// With --local: how many times each local worker is started again after it fails (it
    /// rejoins the running ring); the next failure stops the run.
    #[arg(long, default_value_t = 3, value_name = "N", requires = "local")]
    pub max_restarts: u32,
    /// With --local: the worker binary (default: next to this one, else on PATH).
    #[arg(long, value_name = "PATH", requires = "local")]
    pub worker_bin: Option<PathBuf>,
    /// Elastic training: when workers are lost mid-run the ring is re-formed from the
    /// survivors and training goes on while at least this many remain (the global batch
    /// stays the same); with fewer, the run pauses until workers join.
    #[arg(long, default_value_t = 1, env = "CLUSTER_MIN_WORKERS", value_name = "N")]
    pub min_workers: usize,
    /// Workers that join after the run started are admitted, up to this many in all, at
    /// the next step boundary; they get the training state from rank 0 (default: the
    /// worker count).
    #[arg(long, env = "CLUSTER_MAX_WORKERS", value_name = "N")]
    pub max_workers: Option<usize>,
    /// Seconds without a heartbeat after which a worker is presumed dead.
    #[arg(long, default_value_t = 30.0, env = "CLUSTER_HEARTBEAT_TIMEOUT")]
    pub heartbeat_timeout: f64,
    /// Seconds a rank may hold the ring up (the others waiting in the all-reduce while it
    /// completes no step) before it is removed and the ring re-formed without it; 0: ten
    /// times the ring's recent step time, at least 30 s (600 s until a step of the current
    /// epoch has been timed).
    #[arg(
        long,
        default_value_t = 0.0,
        env = "CLUSTER_STEP_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub step_timeout: f64,
    /// Seconds the coordinator's lease on the checkpoint root lasts unless renewed (every
    /// third of it). A second coordinator on the root is refused while it is live; one
    /// restarted after a crash can start once it has lapsed.
    #[arg(
        long,
        default_value_t = 30.0,
        env = "CLUSTER_LEASE_TTL",
        value_name = "SECONDS"
    )]
    pub lease_ttl: f64,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free port; the address
    /// is logged). With --local, worker i serves its own on the port 1 + i above (free ports
    /// when this one is 0).
    #[arg(long, env = "CLUSTER_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Start a new run even if the checkpoint root holds checkpoints (they are kept; by
    /// default the run resumes from the newest good one).
    #[arg(long)]
    pub fresh: bool,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The coordinator's address.
    #[arg(long, default_value = "127.0.0.1:50051", env = "CLUSTER_COORDINATOR")]
    pub coordinator: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub security: SecurityArgs,
}

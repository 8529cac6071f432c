//! Single-node mode: the coordinator starts its own worker processes on this machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cluster_proto::auth::Token;
use tokio::process::{Child, Command};

/// Where the `worker` binary is: `explicit`, else next to this executable, else on `PATH`.
pub fn worker_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("--worker-bin {}: no such file", path.display()))
        };
    }
    let name = format!("worker{}", std::env::consts::EXE_SUFFIX);
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&name)))
        .filter(|p| p.is_file())
    {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(&name))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            "cannot find the worker binary next to the coordinator or on PATH; build it \
             (`cargo build --release -p worker`) or pass --worker-bin PATH"
                .to_string()
        })
}

/// The backends local workers run on, as chosen on the command line (`None`: the worker's
/// default, or its `EFFNET_GPU_BACKEND` / `EFFNET_CPU_BACKEND`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backends {
    /// `cuda` or `wgpu`, for the workers with a GPU.
    pub gpu: Option<String>,
    /// `flex` or `libtorch`, for the workers without one.
    pub cpu: Option<String>,
}

/// The device flags of local worker `index`: `--gpu G` from `gpus` (one per worker) with the
/// GPU backend when one was chosen, or `--cpu` with the CPU backend when one was chosen.
pub fn device_args(index: usize, gpus: &[usize], backends: &Backends) -> Vec<String> {
    let mut args = match gpus.get(index) {
        Some(gpu) => vec!["--gpu".into(), gpu.to_string()],
        None => vec!["--cpu".into()],
    };
    let (flag, backend) = match gpus.get(index) {
        Some(_) => ("--gpu-backend", &backends.gpu),
        None => ("--cpu-backend", &backends.cpu),
    };
    if let Some(backend) = backend {
        args.extend([flag.to_string(), backend.clone()]);
    }
    args
}

/// Where local worker `index` serves its metrics when the coordinator serves its own on
/// `coordinator`: the same host, the next ports up (or free ports when the coordinator's is
/// 0).
pub fn worker_metrics_address(coordinator: SocketAddr, index: usize) -> SocketAddr {
    let port = match coordinator.port() {
        0 => 0,
        port => port.saturating_add(1).saturating_add(index as u16),
    };
    SocketAddr::new(coordinator.ip(), port)
}

/// How this coordinator starts its local workers.
#[derive(Debug, Clone)]
pub struct LocalWorkers {
    /// The worker binary.
    pub binary: PathBuf,
    /// GPUs, one per worker in order (CPU for the rest).
    pub gpus: Vec<usize>,
    /// The workers' backends, when chosen.
    pub backends: Backends,
    /// The coordinator's address.
    pub address: String,
    /// The join token.
    pub token: Token,
    /// `text` or `json`.
    pub log_format: String,
    /// The coordinator's metrics address: worker i serves its own next to it.
    pub metrics: Option<SocketAddr>,
    /// Compute threads for each worker without a GPU ([`cpu_threads`]); `None` leaves the
    /// thread pools to choose (every core each).
    pub cpu_threads: Option<usize>,
}

/// The thread-pool sizes that belong to the user when set in the environment.
pub const THREAD_VARIABLES: [&str; 2] = ["OMP_NUM_THREADS", "RAYON_NUM_THREADS"];

/// Compute threads for each of `cpu_workers` local workers without a GPU on a machine with
/// `cores`: the cores shared out, at least one each. Left alone, every worker's pool (rayon for
/// flex, OpenMP for LibTorch) takes every core, and OpenMP's threads spin-wait at each barrier
/// for peers that another process has descheduled: two LibTorch workers on two cores went
/// from 4 to 10 seconds a step when a third process ran beside them (as torchrun, which sets
/// OMP_NUM_THREADS for the processes it starts).
pub fn cpu_threads(cores: usize, cpu_workers: usize) -> usize {
    (cores / cpu_workers.max(1)).max(1)
}

impl LocalWorkers {
    /// Start local worker `i`. The token travels in the environment, never on a command
    /// line (which other users can read); the worker dies with the coordinator.
    pub fn spawn(&self, i: usize) -> Result<Child, String> {
        let mut command = Command::new(&self.binary);
        command
            .arg("--log-format")
            .arg(&self.log_format)
            .arg("join")
            .arg("--coordinator")
            .arg(&self.address)
            .arg("--name")
            .arg(format!("local-{i}"))
            .args(device_args(i, &self.gpus, &self.backends));
        if let Some(base) = self.metrics {
            command
                .arg("--metrics-listen")
                .arg(worker_metrics_address(base, i).to_string());
        }
        if let Some(threads) = self.cpu_threads.filter(|_| self.gpus.get(i).is_none()) {
            for variable in THREAD_VARIABLES {
                command.env(variable, threads.to_string());
            }
        }
        // One address for every local worker would make all but one fail to bind.
        command
            .env("CLUSTER_TOKEN", self.token.expose())
            .env_remove("CLUSTER_ADVERTISE")
            .env_remove("WORKER_METRICS_LISTEN")
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start worker {i} ({}): {e}", self.binary.display()))
    }

    /// Start workers `0..n`.
    pub fn spawn_all(&self, n: usize) -> Result<Vec<Child>, String> {
        (0..n).map(|i| self.spawn(i)).collect()
    }
}

/// Watch local workers. One that exits with a failure is started again, up to `restarts`
/// times each (as torchrun's `--max-restarts`); the new process joins the running ring as a
/// new member (elastic training) or the run's start. The next failure resolves with why, and
/// stops the run rather than waiting for a worker that never comes. When dropped, the workers
/// are killed.
pub async fn supervise(workers: LocalWorkers, mut children: Vec<Child>, restarts: u32) -> String {
    let mut done = vec![false; children.len()];
    let mut restarted = vec![0u32; children.len()];
    loop {
        for i in 0..children.len() {
            if done[i] {
                continue;
            }
            let Ok(Some(status)) = children[i].try_wait() else {
                continue;
            };
            if status.success() {
                done[i] = true;
                continue;
            }
            if restarted[i] >= restarts {
                return format!(
                    "local worker {i} exited ({status}) after {} restarts; its log is above",
                    restarted[i]
                );
            }
            restarted[i] += 1;
            tracing::warn!(worker = i, %status, restart = restarted[i], max_restarts = restarts,
                "local worker exited; starting it again");
            match workers.spawn(i) {
                Ok(child) => children[i] = child,
                Err(e) => return e,
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Write the run's join token to `out/token`, readable by this user only, so that
/// `coordinator status --token-file OUT/token` can reach a local run whose token was made up.
pub fn write_token(
    out: &std::path::Path,
    token: &cluster_proto::auth::Token,
) -> Result<std::path::PathBuf, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(out)
        .map_err(|e| format!("cannot create the output directory {}: {e}", out.display()))?;
    let path = out.join("token");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            // An older file keeps its mode through open(): set it in any case.
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            writeln!(f, "{}", token.expose())
        });
    written.map_err(|e| format!("cannot write the join token to {}: {e}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_workers_share_the_cores_out() {
        assert_eq!(cpu_threads(2, 2), 1);
        assert_eq!(cpu_threads(16, 3), 5);
        assert_eq!(cpu_threads(2, 4), 1, "at least one thread each");
        assert_eq!(cpu_threads(8, 0), 8);
    }

    #[test]
    fn gpus_map_to_workers_in_order_and_the_rest_use_the_cpu() {
        let none = Backends::default();
        let both = Backends {
            gpu: Some("wgpu".into()),
            cpu: Some("libtorch".into()),
        };
        let cpu_only = Backends {
            cpu: Some("libtorch".into()),
            ..Backends::default()
        };
        assert_eq!(device_args(0, &[3, 5], &none), ["--gpu", "3"]);
        assert_eq!(device_args(1, &[3, 5], &cpu_only), ["--gpu", "5"]);
        assert_eq!(
            device_args(1, &[0, 0], &both),
            ["--gpu", "0", "--gpu-backend", "wgpu"]
        );
        assert_eq!(device_args(0, &[], &none), ["--cpu"]);
        assert_eq!(
            device_args(2, &[3, 5], &both),
            ["--cpu", "--cpu-backend", "libtorch"]
        );
    }

    #[test]
    fn local_workers_serve_metrics_on_the_ports_after_the_coordinators() {
        let base: SocketAddr = "127.0.0.1:9100".parse().unwrap();
        assert_eq!(worker_metrics_address(base, 0).to_string(), "127.0.0.1:9101");
        assert_eq!(worker_metrics_address(base, 2).to_string(), "127.0.0.1:9103");
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert_eq!(worker_metrics_address(any, 3).to_string(), "0.0.0.0:0");
    }

    #[test]
    fn a_missing_explicit_worker_binary_is_named() {
        let err = worker_binary(Some(Path::new("/nonexistent/worker"))).unwrap_err();
        assert!(err.contains("/nonexistent/worker"), "{err}");
    }
}

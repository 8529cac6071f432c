//! Single-node mode: the coordinator starts its own worker processes on this machine.

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

/// The device flag of local worker `index`: `--gpu G` from `gpus` (one per worker), or `--cpu`.
pub fn device_args(index: usize, gpus: &[usize]) -> Vec<String> {
    match gpus.get(index) {
        Some(gpu) => vec!["--gpu".into(), gpu.to_string()],
        None => vec!["--cpu".into()],
    }
}

/// Start `n` workers joining `address`. The token travels in the environment, never on a
/// command line (which other users can read); workers die with the coordinator.
pub fn spawn_workers(
    binary: &Path,
    n: usize,
    gpus: &[usize],
    address: &str,
    token: &Token,
    log_format: &str,
) -> Result<Vec<Child>, String> {
    (0..n)
        .map(|i| {
            Command::new(binary)
                .arg("--log-format")
                .arg(log_format)
                .arg("join")
                .arg("--coordinator")
                .arg(address)
                .arg("--name")
                .arg(format!("local-{i}"))
                .args(device_args(i, gpus))
                .env("CLUSTER_TOKEN", token.expose())
                .env_remove("CLUSTER_ADVERTISE")
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start worker {i} ({}): {e}", binary.display()))
        })
        .collect()
}

/// Watch local workers: the first one to exit with a failure while the run is going on
/// resolves with why (a worker that never joins would otherwise keep the run waiting). When
/// dropped, the workers are killed.
pub async fn first_failure(mut children: Vec<Child>) -> String {
    let mut done = vec![false; children.len()];
    loop {
        for (i, child) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                done[i] = true;
                if !status.success() {
                    return format!("local worker {i} exited ({status}); its log is above");
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_map_to_workers_in_order_and_the_rest_use_the_cpu() {
        assert_eq!(device_args(0, &[3, 5]), ["--gpu", "3"]);
        assert_eq!(device_args(1, &[3, 5]), ["--gpu", "5"]);
        assert_eq!(device_args(0, &[]), ["--cpu"]);
    }

    #[test]
    fn a_missing_explicit_worker_binary_is_named() {
        let err = worker_binary(Some(Path::new("/nonexistent/worker"))).unwrap_err();
        assert!(err.contains("/nonexistent/worker"), "{err}");
    }
}

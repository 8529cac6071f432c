//! Coordinators and workers of small runs as separate processes on loopback, and what
//! their runs leave behind (checkpoints, history, metrics).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Proc, history, logged_address, spawn};

pub const TOKEN: &str = "test-token-0123456789abcdef";

pub fn token_file(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join(format!("token-{}", token.len()));
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

/// Start a coordinator on a free loopback port; returns it and its address.
pub fn coordinator(token: &Path, args: &[&str]) -> (Proc, String) {
    coordinator_with_env(token, args, &[])
}

/// [`coordinator`], with extra environment variables.
pub fn coordinator_with_env(token: &Path, args: &[&str], env: &[(&str, &str)]) -> (Proc, String) {
    let mut all = vec![
        "--log-format",
        "json",
        "start",
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    // A run without --out would go to runs/run-<time> below the test's working directory
    // (the source tree), where two coordinators started in one second would share a root.
    let scratch = scratch_dir();
    if !args.contains(&"--out") {
        all.extend(["--out", scratch.to_str().unwrap()]);
    }
    let mut proc = spawn("coordinator", all, env);
    let line = proc.wait_for("coordinator listening", Duration::from_secs(30));
    let address = logged_address(&line);
    (proc, address)
}

/// A fresh directory under the system's temporary directory.
pub fn scratch_dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("effnet-test-{}-{n}", std::process::id()))
}

pub fn worker(token: &Path, address: &str, command: &[&str], extra: &[&str]) -> Proc {
    worker_with_env(token, address, command, extra, &[])
}

/// [`worker`], with extra environment variables.
pub fn worker_with_env(
    token: &Path,
    address: &str,
    command: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut all = vec!["--log-format", "json"];
    all.extend_from_slice(command);
    all.extend_from_slice(&["--coordinator", address, "--token-file", token.to_str().unwrap()]);
    all.extend_from_slice(extra);
    spawn("worker", all, env)
}

/// The manifest of the newest good checkpoint under `out/checkpoints`.
pub fn latest_manifest(out: &Path) -> checkpoint::Manifest {
    let store = checkpoint::CheckpointStore::open(out.join("checkpoints").to_str().unwrap()).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(store.latest_good())
        .unwrap()
        .expect("a committed checkpoint")
        .manifest
}

/// A model file of a randomly initialised EfficientNet-B0 beside `out` (written once).
///
/// Small runs start from it rather than from `--weights none`, which trains the whole network
/// from scratch in phase 1: a backbone from a file is frozen in phase 1 as pretrained weights
/// are, so head steps stay the cheap ones these tests' step timeouts were set for, and the
/// tests exercise the feature cache on the way.
pub fn random_b0(out: &Path) -> PathBuf {
    let path = out.with_file_name("random-b0.safetensors");
    if !path.exists() {
        let device = burn::tensor::Device::flex();
        let config = effnet::config::EfficientNetConfig::from_name("efficientnet-b0").unwrap();
        let model = effnet::modelfile::LoadedModel {
            model: effnet::model::Classifier::new(&config, 10, &device),
            config,
            classes: (0..10)
                .map(|i| effnet::modelfile::ClassLabel {
                    label: format!("class {i}"),
                    wnid: None,
                })
                .collect(),
        };
        effnet::modelfile::save(&path, &model).unwrap();
    }
    path
}

/// `first`, then the run arguments of a small training run on generated data from random
/// initialisation (a frozen random backbone in phase 1: [`random_b0`]): 32 px images, `batch`
/// per worker, `train` training images (24 validation, 24 test), the weights compared after
/// every step, outputs in `out`.
pub fn small_run(first: &[&str], out: &Path, batch: u32, head_epochs: u64, train: u32) -> Vec<String> {
    let weights = random_b0(out);
    first
        .iter()
        .copied()
        .chain(["--data", "synthetic"])
        .map(String::from)
        .chain(["--weights".into(), weights.to_string_lossy().into_owned()])
        .chain(
            [
                "--image-size",
                "32",
                "--finetune-epochs",
                "1",
                "--limit-val",
                "24",
                "--limit-test",
                "24",
                "--checksum-every",
                "1",
            ]
            .map(String::from),
        )
        .chain([
            "--batch-size".into(),
            batch.to_string(),
            "--head-epochs".into(),
            head_epochs.to_string(),
            "--limit-train".into(),
            train.to_string(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ])
        .collect()
}

/// A coordinator (as [`coordinator`]) of a [`small_run`] with `cluster` arguments first.
pub fn small_coordinator(
    token: &Path,
    cluster: &[&str],
    out: &Path,
    batch: u32,
    head_epochs: u64,
    train: u32,
) -> (Proc, String) {
    let args = small_run(cluster, out, batch, head_epochs, train);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    coordinator(token, &args)
}

/// Wait until the worker serving metrics at `address` has taken `steps` optimizer steps;
/// `log` says why when it never does.
pub fn wait_for_steps(address: &str, steps: f64, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !scrape(address)
        .and_then(|b| sample(&b, "effnet_worker_steps_total"))
        .is_some_and(|s| s >= steps)
    {
        assert!(Instant::now() < deadline, "no progress:\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The run in `out` took exactly its plan, failures or not: `epochs` epochs of `steps`
/// optimizer steps each, and its last checkpoint after all of them. Returns the epochs.
pub fn assert_plan(out: &Path, epochs: u64, steps: u64) -> Vec<serde_json::Value> {
    let history = history(out);
    assert_eq!(history.len() as u64, epochs, "{history:?}");
    for epoch in &history {
        assert_eq!(epoch["steps"], steps, "{epoch}");
    }
    let manifest = latest_manifest(out);
    assert_eq!(manifest.step, epochs * steps, "{manifest:?}");
    history
}

/// `GET /metrics` over plain HTTP/1.0; the body, or `None` once the server is gone.
pub fn scrape(address: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("application/openmetrics-text"),
        "{head}"
    );
    Some(body.to_string())
}

/// The value of sample `name` (no labels) in a scrape.
pub fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Send `signal` (`STOP`, `CONT`) to `proc`.
pub fn signal(proc: &Proc, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([format!("-{signal}"), proc.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal} {}", proc.id());
}

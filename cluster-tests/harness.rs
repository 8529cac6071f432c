//! Helpers for tests that run the project's binaries as separate processes.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod manifests;
pub mod processes;

/// Path of a binary of this workspace, built by the same `cargo test` run.
pub fn bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable inside target/<profile>/deps");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo nextest run --workspace` (or `cargo build -p {name}` first)",
        path.display()
    );
    path
}

/// The result of one run of a binary.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Panic with both streams unless the process exited 0.
    pub fn success(self) -> Self {
        assert_eq!(
            self.code,
            Some(0),
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panic unless the process failed cleanly: exit code 1, an `error:` line, no panic.
    pub fn failure(self) -> Self {
        assert_eq!(
            self.code,
            Some(1),
            "expected a clean failure\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert!(self.stderr.contains("error:"), "no error line:\n{}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "it panicked:\n{}", self.stderr);
        self
    }

    /// Standard output parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// Run binary `name` with `args` to completion.
pub fn run<I, S>(name: &str, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(bin(name))
        .args(args)
        .env("WORKER_LOG", "info")
        .output()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A binary running in the background; its output is collected line by line. Dropping it
/// kills the process.
pub struct Proc {
    name: String,
    child: std::process::Child,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn collect(
    stream: impl std::io::Read + Send + 'static,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    std::thread::JoinHandle<()>,
) {
    use std::io::BufRead;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    let handle = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    (lines, handle)
}

/// Start binary `name` with `args` and extra environment `env`.
pub fn spawn<I, S>(name: &str, args: I, env: &[(&str, &str)]) -> Proc
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    spawn_path(&bin(name), args, env)
}

/// Start `program` (any executable, e.g. a sandbox around this workspace's binaries) with
/// `args` and extra environment `env`.
pub fn spawn_path<I, S>(program: &Path, args: I, env: &[(&str, &str)]) -> Proc
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let name = program
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let (stdout, out_reader) = collect(child.stdout.take().expect("piped stdout"));
    let (stderr, err_reader) = collect(child.stderr.take().expect("piped stderr"));
    Proc {
        name: name.to_string(),
        child,
        stdout,
        stderr,
        readers: vec![out_reader, err_reader],
    }
}

impl Proc {
    /// Process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Standard error so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Wait until a line of standard error contains `needle`; return that line.
    pub fn wait_for(&mut self, needle: &str, timeout: std::time::Duration) -> String {
        self.wait_for_lines(&[needle], 1, timeout).remove(0)
    }

    /// Wait until `count` lines of standard error contain every one of `needles`; return
    /// those lines.
    pub fn wait_for_lines(
        &mut self,
        needles: &[&str],
        count: usize,
        timeout: std::time::Duration,
    ) -> Vec<String> {
        let deadline = std::time::Instant::now() + timeout;
        let matching = |lines: &[String]| -> Option<Vec<String>> {
            let found: Vec<String> = lines
                .iter()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .cloned()
                .collect();
            (found.len() >= count).then_some(found)
        };
        loop {
            if let Some(lines) = matching(&self.stderr.lock().unwrap()) {
                return lines;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the readers drain before reporting.
                std::thread::sleep(std::time::Duration::from_millis(100));
                if let Some(lines) = matching(&self.stderr.lock().unwrap()) {
                    return lines;
                }
                panic!(
                    "{} exited ({status}) before printing {count} lines with {needles:?}:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not print {count} lines with {needles:?} within {timeout:?}:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Wait for the process to exit (killing it after `timeout`, which fails the test).
    pub fn finish(mut self, timeout: std::time::Duration) -> Run {
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{} still running after {timeout:?}:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Run {
            code: status.code(),
            stdout: self.stdout.lock().unwrap().join("\n"),
            stderr: self.stderr(),
        }
    }

    /// Kill the process at once (SIGKILL: no chance to say goodbye).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `address` field of a JSON log line such as the coordinator's "coordinator listening".
pub fn logged_address(line: &str) -> String {
    let value: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    value["fields"]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {line}"))
        .to_string()
}

/// A run's epochs, from its `history.json` in `out`.
pub fn history(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("history.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The real ImageNet Lite0 weights that `.ci/run` points `EFFNET_LITE0_WEIGHTS` at; `None`
/// (the caller skips, saying so) elsewhere, never under CI.
pub fn lite0() -> Option<PathBuf> {
    match std::env::var_os("EFFNET_LITE0_WEIGHTS") {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must set EFFNET_LITE0_WEIGHTS"
            );
            eprintln!("skipped: set EFFNET_LITE0_WEIGHTS to the Lite0 .pth file");
            None
        }
    }
}

/// `coordinator start --local N --out out` with `args`, to success; returns the history.
pub fn local_run(out: &Path, workers: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec![
        "start",
        "--local",
        workers,
        "--out",
        out.to_str().unwrap_or_default(),
    ];
    all.extend_from_slice(args);
    spawn("coordinator", all, &[("CLUSTER_TOKEN", "")])
        .finish(std::time::Duration::from_secs(600))
        .success();
    history(out)
}

/// Number `key` of a history entry or report.
pub fn f(value: &serde_json::Value, key: &str) -> f64 {
    value[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in {value}"))
}

/// A small two-phase Lite0 run on the synthetic set with every random choice off
/// (augmentation, dropout, stochastic depth, which draw per rank), so that runs which should
/// take the same steps do, up to float summation order: `batch` images per worker.
pub fn same_steps<'a>(weights: &'a str, batch: &'a str) -> Vec<&'a str> {
    vec![
        "--data",
        "synthetic",
        "--model",
        "efficientnet-lite0",
        "--weights",
        weights,
        "--image-size",
        "32",
        "--batch-size",
        batch,
        "--head-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--limit-train",
        "32",
        "--limit-val",
        "16",
        "--limit-test",
        "16",
        "--no-augment",
        "--dropout",
        "0",
        "--stochastic-depth",
        "0",
        "--lr-head",
        "0.001",
        "--lr-finetune",
        "0.0001",
    ]
}

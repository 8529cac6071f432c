//! Helpers for tests that run the project's binaries as separate processes.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output};

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

//! The coordinator binary refuses bad configurations before it listens.

use std::process::Command;

fn coordinator(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_coordinator"));
    command.args(args).env_remove("CLUSTER_TOKEN");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("coordinator runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_token_is_an_error_that_says_how_to_make_one() {
    let (code, stderr) = coordinator(&["start", "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("no join token") && stderr.contains("openssl rand -hex 32"),
        "{stderr}"
    );
}

#[test]
fn a_short_token_is_refused() {
    let (code, stderr) = coordinator(
        &["start", "--listen", "127.0.0.1:0"],
        &[("CLUSTER_TOKEN", "secret")],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("CLUSTER_TOKEN has 6 characters; use at least 16"),
        "{stderr}"
    );
}

#[test]
fn a_bad_config_file_names_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, "head_epochs = \"ten\"\n").unwrap();
    let (code, stderr) = coordinator(
        &[
            "start",
            "--listen",
            "127.0.0.1:0",
            "--config",
            path.to_str().unwrap(),
        ],
        &[("CLUSTER_TOKEN", "0123456789abcdef0123")],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("run.toml") && stderr.contains("head_epochs"),
        "{stderr}"
    );
}

#[test]
fn environment_variables_override_the_file_and_are_validated() {
    let (code, stderr) = coordinator(
        &["start", "--listen", "127.0.0.1:0"],
        &[
            ("CLUSTER_TOKEN", "0123456789abcdef0123"),
            ("CLUSTER_BATCH_SIZE", "0"),
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("batch_size must be at least 1"), "{stderr}");
}

//! The Kubernetes manifests as rendered by `kubectl kustomize`, as JSON values.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `deploy/k8s`.
pub fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

/// The rendered objects of kustomization `dir`, or `None` (outside CI) when kubectl or
/// PyYAML is missing.
pub fn render(dir: &str) -> Option<Vec<Value>> {
    let missing = |what: &str| {
        assert!(std::env::var_os("CI").is_none(), "CI must provide {what}");
        eprintln!("skipped: {what} is not available");
        None
    };
    let Ok(out) = Command::new("kubectl")
        .arg("kustomize")
        .arg(k8s_dir().join(dir))
        .output()
    else {
        return missing("kubectl");
    };
    assert!(
        out.status.success(),
        "{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut python = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    std::io::Write::write_all(&mut python.stdin.take()?, &out.stdout).unwrap();
    let converted = python.wait_with_output().unwrap();
    if !converted.status.success() {
        return missing("python3 with PyYAML");
    }
    Some(serde_json::from_slice(&converted.stdout).unwrap())
}

/// The object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

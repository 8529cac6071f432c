//! The manifests' containers run the way a pod runs them: each container's command line,
//! environment and mounts from the rendered manifests (the CPU overlay), inside bubblewrap
//! with a read-only root filesystem in which only the pod's volumes are writable, against a
//! real S3-protocol server for the checkpoints, through a tiny 2-worker run to the end.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cluster_tests::manifests::{find, render};
use cluster_tests::{Proc, bin};
use serde_json::Value;

const TOKEN: &str = "pod-test-token-0123456789abcdef";

/// bubblewrap, or `None` (outside CI) when it is not installed.
fn bubblewrap() -> Option<PathBuf> {
    let found = Command::new("bwrap")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "CI must install bubblewrap");
        eprintln!("skipped: bubblewrap (bwrap) is not installed");
        return None;
    }
    Some(PathBuf::from("bwrap"))
}

/// One container as its pod would run it: argv, environment and mounts (host directory,
/// mount path, writable).
struct Container {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    mounts: Vec<(PathBuf, String, bool)>,
}

/// `workload`'s first container, its volumes made under `root`: emptyDirs as fresh writable
/// directories, ConfigMaps and Secrets as read-only directories of their files.
/// `secret_env` stands for the Secrets the manifests only reference (S3 credentials).
fn container(
    objects: &[Value],
    workload: &Value,
    pod_name: &str,
    root: &Path,
    secret_env: &[(String, String)],
) -> Container {
    let namespace = workload["metadata"]["namespace"].as_str().unwrap();
    let pod = &workload["spec"]["template"]["spec"];
    let spec = &pod["containers"][0];
    let mut env: Vec<(String, String)> = Vec::new();
    for var in spec["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_string();
        let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => pod_name.to_string(),
            Some("metadata.namespace") => namespace.to_string(),
            Some(other) => panic!("field {other} is not provided by this test"),
            None => var["value"].as_str().unwrap().to_string(),
        };
        env.push((name, value));
    }
    for from in spec["envFrom"].as_array().into_iter().flatten() {
        if let Some(map) = from["configMapRef"]["name"].as_str() {
            for (k, v) in find(objects, "ConfigMap", map)["data"].as_object().unwrap() {
                env.push((k.clone(), v.as_str().unwrap().to_string()));
            }
        }
        if from["secretRef"].is_object() {
            env.extend(secret_env.iter().cloned());
        }
    }
    let mut argv: Vec<String> = spec["command"]
        .as_array()
        .unwrap()
        .iter()
        .chain(spec["args"].as_array().unwrap())
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    for arg in &mut argv {
        for (name, value) in &env {
            *arg = arg.replace(&format!("$({name})"), value);
        }
    }
    let mut mounts = Vec::new();
    for mount in spec["volumeMounts"].as_array().unwrap() {
        let name = mount["name"].as_str().unwrap();
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap();
        let host = root.join(pod_name).join(name);
        std::fs::create_dir_all(&host).unwrap();
        let path = mount["mountPath"].as_str().unwrap().to_string();
        let writable = if volume["emptyDir"].is_object() {
            true
        } else if let Some(map) = volume["configMap"]["name"].as_str() {
            for (file, text) in find(objects, "ConfigMap", map)["data"].as_object().unwrap() {
                std::fs::write(host.join(file), text.as_str().unwrap()).unwrap();
            }
            false
        } else if volume["secret"]["secretName"] == "effnet-token" {
            std::fs::write(host.join("token"), format!("{TOKEN}\n")).unwrap();
            false
        } else {
            panic!("volume {name}: not an emptyDir, ConfigMap or the token Secret");
        };
        mounts.push((host, path, writable));
    }
    Container { argv, env, mounts }
}

/// Start `c` in bubblewrap: a read-only root (the host's /usr and a few /etc files, the binaries in
/// /opt/effnet/bin), the pod's volumes at their mount paths, `hosts` as /etc/hosts.
fn start(bwrap: &Path, c: &Container, hosts: &Path, extra_env: &[(&str, &str)]) -> Proc {
    let bin_dir = bin("coordinator").parent().unwrap().to_path_buf();
    let mut args: Vec<String> = [
        "--die-with-parent",
        "--tmpfs",
        "/",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]
    .map(String::from)
    .to_vec();
    // Only what a container image's /etc provides, so that the manifests' mounts under /etc
    // land on the sandbox's own (read-only) root.
    for file in [
        "/etc/ld.so.cache",
        "/etc/nsswitch.conf",
        "/etc/passwd",
        "/etc/group",
        "/etc/ssl",
    ] {
        args.extend(["--ro-bind-try".into(), file.into(), file.into()]);
    }
    args.extend([
        "--ro-bind".into(),
        hosts.display().to_string(),
        "/etc/hosts".into(),
    ]);
    for name in ["coordinator", "worker"] {
        args.extend([
            "--ro-bind".into(),
            bin_dir.join(name).display().to_string(),
            format!("/opt/effnet/bin/{name}"),
        ]);
    }
    for (host, path, writable) in &c.mounts {
        let how = if *writable { "--bind" } else { "--ro-bind" };
        args.extend([how.into(), host.display().to_string(), path.clone()]);
    }
    args.extend(["--remount-ro".into(), "/".into(), "--clearenv".into()]);
    let mut env: Vec<(String, String)> = vec![("PATH".into(), "/opt/effnet/bin:/usr/bin".into())];
    env.extend(c.env.iter().cloned());
    env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    for (k, v) in &env {
        args.extend(["--setenv".into(), k.clone(), v.clone()]);
    }
    args.push("--".into());
    args.extend(c.argv.iter().cloned());
    cluster_tests::spawn_path(bwrap, &args, &[])
}

#[test]
fn the_manifests_containers_run_a_tiny_run_to_the_end_on_read_only_roots() {
    let (Some(objects), Some(bwrap)) = (render("overlays/cpu"), bubblewrap()) else {
        return;
    };
    let server = test_s3::S3Server::start(&["effnet"]);
    let s3: Vec<(String, String)> = server
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let coordinator_spec = find(&objects, "Deployment", "effnet-coordinator");
    let workers_spec = find(&objects, "StatefulSet", "effnet-worker");
    let namespace = workers_spec["metadata"]["namespace"].as_str().unwrap();
    let pods = ["effnet-worker-0", "effnet-worker-1"];
    let hosts = dir.path().join("hosts");
    let names: Vec<String> = pods
        .iter()
        .map(|p| format!("{p}.effnet-workers.{namespace}.svc"))
        .collect();
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost effnet-coordinator {}\n", names.join(" ")),
    )
    .unwrap();

    // The run: the manifest's run.toml with a tiny data set and model input (environment
    // variables override its fields, as they would in a pod's env).
    let tiny = [
        ("CLUSTER_DATA", "synthetic"),
        ("CLUSTER_WEIGHTS", "none"),
        ("CLUSTER_IMAGE_SIZE", "32"),
        ("CLUSTER_BATCH_SIZE", "4"),
        ("CLUSTER_HEAD_EPOCHS", "1"),
        ("CLUSTER_FINETUNE_EPOCHS", "1"),
        ("CLUSTER_LIMIT_TRAIN", "32"),
        ("CLUSTER_LIMIT_VAL", "8"),
        ("CLUSTER_LIMIT_TEST", "8"),
    ];
    let c = container(&objects, coordinator_spec, "effnet-coordinator", dir.path(), &s3);
    let mut coordinator = start(&bwrap, &c, &hosts, &tiny);
    coordinator.wait_for("coordinator listening", Duration::from_secs(30));
    let workers: Vec<Proc> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let mut w = container(&objects, workers_spec, pod, dir.path(), &s3);
            // Both pods share this host's network: the second takes the next ports.
            if i == 1 {
                for arg in &mut w.argv {
                    *arg = arg.replace(":50052", ":50053").replace(":9091", ":9092");
                }
            }
            start(&bwrap, &w, &hosts, &[])
        })
        .collect();
    for w in workers {
        let run = w.finish(Duration::from_secs(300)).success();
        assert!(!run.stderr.contains("Read-only file system"), "{}", run.stderr);
    }
    let run = coordinator.finish(Duration::from_secs(60)).success();
    assert!(!run.stderr.contains("worker lost"), "{}", run.stderr);
    // The outputs are in the coordinator's out volume, the checkpoints in S3.
    let out = dir.path().join("effnet-coordinator/out/out");
    for file in ["history.json", "report.json", "curves.png", "predictions.png"] {
        assert!(
            out.join(file).is_file(),
            "no {file} in {}: {}",
            out.display(),
            run.stderr
        );
    }
    let grid = image::open(out.join("predictions.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (5 * 192, 2 * 162));
    assert!(server.object_file("effnet", "checkpoints/LATEST").is_file());
}

//! The Kubernetes manifests against the binaries they run: every kustomization renders, every
//! container command line parses with the real `coordinator` / `worker` parsers, and ports,
//! service names, environment variables, mounted files and the run config agree.
//! (Schema validation is `deploy/validate`, which CI runs.)

use std::collections::BTreeMap;
use std::path::Path;

use clap::Parser;
use cluster_tests::manifests::{find, render};
use serde_json::Value;

fn port_of(hostport: &str) -> u16 {
    hostport.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The container's command line with `$(VAR)` references resolved (each must be defined in
/// the container's env), as argv.
fn argv(container: &Value) -> Vec<String> {
    let env: Vec<&str> = container["env"]
        .as_array()
        .map(|e| e.iter().map(|v| v["name"].as_str().unwrap()).collect())
        .unwrap_or_default();
    let mut argv: Vec<String> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    for arg in container["args"].as_array().unwrap() {
        let mut arg = arg.as_str().unwrap().to_string();
        while let Some(start) = arg.find("$(") {
            let end = start + arg[start..].find(')').unwrap();
            let name = arg[start + 2..end].to_string();
            assert!(
                env.contains(&name.as_str()),
                "$({name}) is not in the container's env"
            );
            arg.replace_range(start..=end, "x");
        }
        argv.push(arg);
    }
    argv
}

/// The file at `path` inside `pod`'s container, if a ConfigMap volume provides it.
fn config_file(objects: &[Value], pod: &Value, container: &Value, path: &Path) -> Option<String> {
    for mount in container["volumeMounts"].as_array()? {
        let Ok(rest) = path.strip_prefix(mount["mountPath"].as_str()?) else {
            continue;
        };
        let volume = pod["volumes"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == mount["name"])?;
        let map = volume["configMap"]["name"].as_str()?;
        let data = &find(objects, "ConfigMap", map)["data"];
        return data[rest.to_str()?].as_str().map(String::from);
    }
    None
}

/// Whether a Secret volume is mounted where `path` lives.
fn secret_mounted(pod: &Value, container: &Value, path: &Path) -> bool {
    container["volumeMounts"].as_array().unwrap().iter().any(|mount| {
        path.starts_with(mount["mountPath"].as_str().unwrap())
            && pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == mount["name"] && v["secret"].is_object())
    })
}

fn container_ports(container: &Value) -> Vec<u64> {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect()
}

fn probe_ports(container: &Value) -> Vec<u64> {
    ["readinessProbe", "livenessProbe"]
        .iter()
        .map(|p| {
            container[p]["grpc"]["port"]
                .as_u64()
                .unwrap_or_else(|| panic!("{p} is not a gRPC probe"))
        })
        .collect()
}

fn service_ports(service: &Value) -> Vec<u64> {
    service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect()
}

fn check(dir: &str) {
    let Some(objects) = render(dir) else { return };
    let coordinator = find(&objects, "Deployment", "effnet-coordinator");
    let workers = find(&objects, "StatefulSet", "effnet-worker");
    let mut checked = BTreeMap::new();

    let pod = &coordinator["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let cli = coordinator::cli::Cli::try_parse_from(argv(container))
        .unwrap_or_else(|e| panic!("{dir}: coordinator command line: {e}"));
    let coordinator::cli::Command::Start(start) = cli.command else {
        panic!("{dir}: the coordinator container does not run `coordinator start`")
    };
    let listen = start.listen.expect("--listen").port() as u64;
    let metrics = start.metrics_listen.expect("--metrics-listen").port() as u64;
    assert_eq!(container_ports(container), [listen, metrics], "{dir}");
    assert!(service_ports(find(&objects, "Service", "effnet-coordinator")).contains(&metrics));
    assert_eq!(
        coordinator["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        metrics.to_string(),
        "{dir}"
    );
    assert_eq!(probe_ports(container), [listen, listen], "{dir}");
    assert!(service_ports(find(&objects, "Service", "effnet-coordinator")).contains(&listen));
    assert_eq!(
        start.workers as u64,
        workers["spec"]["replicas"].as_u64().unwrap(),
        "{dir}: --workers must follow the StatefulSet's replicas"
    );
    let token = start.security.token_file.clone().expect("--token-file");
    assert!(
        secret_mounted(pod, container, &token),
        "{dir}: {token:?} is not on a Secret volume"
    );
    let config_path = start.run.config.clone().expect("--config");
    let run_toml = config_file(&objects, pod, container, &config_path)
        .unwrap_or_else(|| panic!("{dir}: {config_path:?} is not on a ConfigMap volume"));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), run_toml).unwrap();
    let config =
        coordinator::config::load_file(file.path(), None).unwrap_or_else(|e| panic!("{dir}: run.toml: {e}"));
    config.validate().unwrap();
    assert!(
        config.checkpoint_url().starts_with("s3://"),
        "{dir}: a cluster needs shared checkpoints"
    );
    checked.insert("coordinator", true);

    let pod = &workers["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let cli = worker::cli::Cli::try_parse_from(argv(container))
        .unwrap_or_else(|e| panic!("{dir}: worker command line: {e}"));
    let worker::cli::Command::Join(join) = cli.command else {
        panic!("{dir}: the worker container does not run `worker join`")
    };
    let (host, port) = join.cluster.coordinator.rsplit_once(':').unwrap();
    let service = find(&objects, "Service", host);
    assert!(
        service_ports(service).contains(&port.parse().unwrap()),
        "{dir}: --coordinator port"
    );
    let advertise = port_of(join.cluster.advertise.as_deref().expect("--advertise")) as u64;
    let worker_metrics = join.metrics_listen.expect("--metrics-listen").port() as u64;
    assert_eq!(container_ports(container), [advertise, worker_metrics], "{dir}");
    assert_eq!(
        workers["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
        worker_metrics.to_string(),
        "{dir}"
    );
    assert_eq!(probe_ports(container), [advertise, advertise], "{dir}");
    let headless = find(
        &objects,
        "Service",
        workers["spec"]["serviceName"].as_str().unwrap(),
    );
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert!(service_ports(headless).contains(&advertise));
    assert!(service_ports(headless).contains(&worker_metrics));
    let advertised_host = join.cluster.advertise.as_deref().unwrap();
    assert!(advertised_host.contains(&format!(".{}.", workers["spec"]["serviceName"].as_str().unwrap())));
    let token = join.cluster.security.token_file.clone().expect("--token-file");
    assert!(
        secret_mounted(pod, container, &token),
        "{dir}: {token:?} is not on a Secret volume"
    );
    let gpus = container["resources"]["limits"]["nvidia.com/gpu"].as_u64();
    match gpus {
        Some(1) => assert_eq!(join.device.gpu, Some(0), "{dir}: one GPU per worker, --gpu 0"),
        None => assert!(join.device.cpu, "{dir}: no GPU requested, so --cpu"),
        Some(n) => panic!("{dir}: {n} GPUs per worker; a worker uses one"),
    }
    checked.insert("worker", true);
    assert_eq!(checked.len(), 2);
}

#[test]
fn base_manifests_match_the_binaries() {
    check("base");
}

#[test]
fn cpu_overlay_matches_the_binaries() {
    check("overlays/cpu");
}

#[test]
fn minio_overlay_matches_the_binaries_and_points_s3_at_minio() {
    check("overlays/minio");
    let Some(objects) = render("overlays/minio") else {
        return;
    };
    let env = objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap" && o["metadata"]["name"].as_str().unwrap().starts_with("effnet-env")
        })
        .unwrap();
    assert_eq!(env["data"]["AWS_ENDPOINT_URL"], "http://minio:9000");
    let minio = find(&objects, "Service", "minio");
    assert_eq!(service_ports(minio), [9000]);
}

#[test]
fn scaling_is_one_patch_that_the_coordinator_follows() {
    check("overlays/workers-4");
    let Some(objects) = render("overlays/workers-4") else {
        return;
    };
    assert_eq!(
        find(&objects, "StatefulSet", "effnet-worker")["spec"]["replicas"],
        4
    );
}

/// The names of `container`'s ports.
fn port_names(container: &Value) -> Vec<String> {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_network_policy_admits_the_run_to_its_grpc_ports_and_anyone_to_metrics() {
    let Some(objects) = render("base") else {
        return;
    };
    let policy = find(&objects, "NetworkPolicy", "effnet-run");
    let selected = |labels: &Value, selector: &Value| -> bool {
        selector["matchExpressions"].as_array().unwrap().iter().all(|e| {
            assert_eq!(e["operator"], "In", "{e}");
            e["values"]
                .as_array()
                .unwrap()
                .contains(&labels[e["key"].as_str().unwrap()])
        })
    };
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    for (kind, name) in [
        ("Deployment", "effnet-coordinator"),
        ("StatefulSet", "effnet-worker"),
    ] {
        let template = &find(&objects, kind, name)["spec"]["template"];
        let labels = &template["metadata"]["labels"];
        assert!(
            selected(labels, &policy["spec"]["podSelector"]),
            "{name} is not covered"
        );
        let names = port_names(&template["spec"]["containers"][0]);
        // Every port of the pod is named in a rule: gRPC ports only from the run's pods.
        for port in &names {
            let rule = rules
                .iter()
                .find(|r| {
                    r["ports"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| p["port"] == port.as_str())
                })
                .unwrap_or_else(|| panic!("{name}'s port {port} is in no rule"));
            let from_run_only = rule["from"]
                .as_array()
                .is_some_and(|from| from.iter().all(|f| selected(labels, &f["podSelector"])));
            assert_eq!(from_run_only, port != "metrics", "{name} port {port}: {rule}");
        }
    }
}

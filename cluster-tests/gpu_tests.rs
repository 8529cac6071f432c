//! A whole local run on a GPU backend, against the same run on flex: two worker processes on
//! one wgpu device (in CI Mesa's lavapipe, a software Vulkan device), both phases, gradients
//! all-reduced over gRPC. What this catches that the single-step parity tests cannot: state
//! that crosses threads or processes (the prefetch thread's uploads, the all-reduce buffer,
//! BatchNorm statistics sent from rank 0, checkpoints) on a device that is not the host.
//!
//! Built only with `--features cluster-tests/wgpu` (which builds the worker with wgpu).
#![cfg(feature = "wgpu")]

use cluster_tests::{f, lite0, local_run, same_steps};

fn report(out: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("report.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_two_worker_wgpu_run_matches_the_same_run_on_flex() {
    let Some(weights) = lite0() else { return };
    let dir = tempfile::tempdir().unwrap();
    let weights = weights.to_str().unwrap();
    // Both runs take the same steps; only float summation order differs.
    let common = same_steps(weights, "8");
    let (cpu_out, gpu_out) = (dir.path().join("flex"), dir.path().join("wgpu"));
    let on_cpu = local_run(&cpu_out, "2", &common);
    let mut gpu_args = common.to_vec();
    gpu_args.extend(["--gpus", "0,0", "--gpu-backend", "wgpu"]);
    let on_gpu = local_run(&gpu_out, "2", &gpu_args);

    let devices = report(&gpu_out)["devices"].clone();
    let devices: Vec<&str> = devices
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    assert_eq!(devices.len(), 2, "{devices:?}");
    assert!(devices.iter().all(|d| d.starts_with("vulkan:0 (")), "{devices:?}");
    assert_eq!(report(&cpu_out)["devices"], serde_json::json!(["cpu", "cpu"]));

    assert_eq!(on_cpu.len(), 2, "{on_cpu:?}");
    assert_eq!(on_gpu.len(), 2, "{on_gpu:?}");
    for (a, b) in on_cpu.iter().zip(&on_gpu) {
        println!(
            "{} epoch {}: train loss {} (flex) vs {} (wgpu), val loss {} vs {}",
            a["phase"],
            a["epoch"],
            f(a, "train_loss"),
            f(b, "train_loss"),
            f(a, "val_loss"),
            f(b, "val_loss")
        );
        assert_eq!(a["phase"], b["phase"]);
        assert_eq!(a["steps"], b["steps"]);
        assert_eq!(a["train_images"], b["train_images"]);
        // Losses to 1e-3: two epochs of Adam steps on float sums in another order move them
        // by ~1e-5; a wrong kernel, a stale tensor or a missed all-reduce moves them by far
        // more than that.
        for key in ["train_loss", "val_loss"] {
            let (x, y) = (f(a, key), f(b, key));
            assert!(
                (x - y).abs() <= 1e-3 * x.abs().max(1.0),
                "{key}: {x} (flex) vs {y} (wgpu)"
            );
        }
        // Accuracy over 16 images: at most one prediction may flip on a near tie.
        let (x, y) = (f(a, "val_accuracy"), f(b, "val_accuracy"));
        assert!((x - y).abs() <= 1.0 / 16.0 + 1e-9, "val_accuracy: {x} vs {y}");
    }
    let (x, y) = (f(&on_cpu[1], "test_loss"), f(&on_gpu[1], "test_loss"));
    assert!((x - y).abs() <= 1e-3 * x.abs().max(1.0), "test_loss: {x} vs {y}");
}

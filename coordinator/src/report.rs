//! What a finished training run leaves in its output directory: `history.json` (every epoch)
//! and `report.json` (the test results and throughput per phase).

use std::path::Path;

use serde_json::{Value, json};

use crate::run::{EpochSummary, Run};

/// The final report of a run whose last epoch was tested.
pub fn report(run: &Run) -> Value {
    let last = run.history.last();
    let tested = last.filter(|e| e.test_accuracy.is_some());
    let confusion = tested.and_then(|e| e.test_confusion.clone()).unwrap_or_default();
    let classes: Vec<String> = tested
        .and_then(|e| e.classes.clone())
        .unwrap_or_else(|| (0..confusion.len()).map(|i| i.to_string()).collect());
    let per_class: serde_json::Map<String, Value> = confusion
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let total: u64 = row.iter().sum();
            let accuracy = (total > 0).then(|| row[i] as f64 / total as f64);
            (
                classes.get(i).cloned().unwrap_or_else(|| i.to_string()),
                json!(accuracy),
            )
        })
        .collect();
    let phases: serde_json::Map<String, Value> = ["head", "finetune"]
        .iter()
        .filter_map(|phase| {
            let epochs: Vec<&EpochSummary> = run.history.iter().filter(|e| e.phase == *phase).collect();
            let last = epochs.last()?;
            let seconds: f64 = epochs.iter().map(|e| e.seconds).sum();
            let train_seconds: f64 = epochs.iter().map(|e| e.train_seconds).sum();
            let images: u64 = epochs.iter().map(|e| e.train_images).sum();
            let hits: u64 = epochs.iter().map(|e| e.feature_cache_hits).sum();
            let misses: u64 = epochs.iter().map(|e| e.feature_cache_misses).sum();
            let rate = |secs: f64| if secs > 0.0 { images as f64 / secs } else { 0.0 };
            Some((
                phase.to_string(),
                json!({
                    "epochs": epochs.len(),
                    "seconds": seconds,
                    "seconds_per_epoch": seconds / epochs.len() as f64,
                    "epoch_seconds": epochs.iter().map(|e| e.seconds).collect::<Vec<f64>>(),
                    "images_per_second": rate(seconds),
                    "train_seconds": train_seconds,
                    "train_images_per_second": rate(train_seconds),
                    "feature_cache": (hits + misses > 0).then(|| json!({
                        "hits": hits,
                        "misses": misses,
                        "hit_rate": hits as f64 / (hits + misses) as f64,
                    })),
                    "allreduce_seconds": epochs.iter().map(|e| e.allreduce_seconds).sum::<f64>(),
                    "final_train_accuracy": last.train_accuracy,
                    "final_val_accuracy": last.val_accuracy,
                }),
            ))
        })
        .collect();
    json!({
        "run_id": run.run_id,
        "model": run.config.model,
        "weights": run.config.weights,
        // Phase 1 trained the whole network, not a head on frozen features.
        "from_scratch": run.config.from_scratch(),
        "recipe": run.config.recipe,
        "data": run.config.data,
        "workers": run.expected,
        // What the workers ran on (`cpu`, `cuda:0`, `vulkan:0 (llvmpipe ...)`), in the order
        // of their names.
        "devices": run.devices.values().cloned().collect::<Vec<String>>(),
        "test_loss": tested.and_then(|e| e.test_loss),
        "test_accuracy": tested.and_then(|e| e.test_accuracy),
        "test_images": confusion.iter().flatten().sum::<u64>(),
        "classes": classes,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion,
        "phases": phases,
        "last_checkpoint": run.last_checkpoint.as_ref().map(|c| c.location.clone()),
    })
}

fn write_json(dir: &Path, name: &str, value: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| format!("cannot encode {name}: {e}"))?;
    write_file(dir, name, text.as_bytes())
}

/// Write `bytes` as `dir/name`, atomically.
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.partial"));
    std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Write `history.json`, `curves.png`, rank 0's `predictions.png` and, when the run was
/// tested, `report.json` into the
/// run's output directory (each atomically: a reader never sees half a file).
pub fn write_outputs(run: &Run) -> Result<(), String> {
    let dir = Path::new(&run.config.out);
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the output directory {}: {e}", dir.display()))?;
    write_json(dir, "history.json", &run.history)?;
    let points: Vec<plots::EpochPoint> = run
        .history
        .iter()
        .map(|e| plots::EpochPoint {
            phase: e.phase.clone(),
            train_loss: e.train_loss,
            train_accuracy: e.train_accuracy,
            val_loss: e.val_loss,
            val_accuracy: e.val_accuracy,
        })
        .collect();
    if !points.is_empty() {
        plots::curves(&points, &dir.join("curves.png")).map_err(|e| e.to_string())?;
    }
    if run.history.last().is_some_and(|e| e.test_accuracy.is_some()) {
        write_json(dir, "report.json", &report(run))?;
    }
    if let Some(png) = &run.prediction_grid {
        write_file(dir, "predictions.png", png)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use run_config::RunConfig;

    fn epoch(phase: &str, seconds: f64, test: bool) -> EpochSummary {
        EpochSummary {
            phase: phase.into(),
            epoch: 0,
            steps: 4,
            train_loss: 1.0,
            train_accuracy: 0.5,
            val_loss: Some(1.1),
            val_accuracy: Some(0.4),
            test_loss: test.then_some(0.9),
            test_accuracy: test.then_some(0.75),
            test_confusion: test.then(|| vec![vec![3, 1], vec![0, 4]]),
            classes: test.then(|| vec!["cat".into(), "dog".into()]),
            train_images: 100,
            seconds,
            allreduce_seconds: 0.5,
            images_per_second: 100.0 / seconds,
            train_seconds: seconds / 2.0,
            feature_cache_hits: if phase == "head" { 75 } else { 0 },
            feature_cache_misses: if phase == "head" { 25 } else { 0 },
        }
    }

    #[test]
    fn report_has_per_class_accuracy_and_phase_throughput() {
        let mut run = Run::new("r".into(), RunConfig::default(), 2);
        run.history = vec![
            epoch("head", 2.0, false),
            epoch("head", 2.0, false),
            epoch("finetune", 5.0, true),
        ];
        let report = report(&run);
        assert_eq!(report["test_accuracy"], 0.75);
        assert_eq!(report["test_images"], 8);
        assert_eq!(report["per_class_accuracy"]["cat"], 0.75);
        assert_eq!(report["per_class_accuracy"]["dog"], 1.0);
        assert_eq!(report["phases"]["head"]["epochs"], 2);
        assert_eq!(report["phases"]["head"]["seconds_per_epoch"], 2.0);
        assert_eq!(report["phases"]["head"]["epoch_seconds"], json!([2.0, 2.0]));
        // 200 images in 2 s of training steps (4 s with evaluation).
        assert_eq!(report["phases"]["head"]["train_images_per_second"], 100.0);
        assert_eq!(report["phases"]["head"]["images_per_second"], 50.0);
        assert_eq!(report["phases"]["head"]["feature_cache"]["hits"], 150);
        assert_eq!(report["phases"]["head"]["feature_cache"]["hit_rate"], 0.75);
        assert!(report["phases"]["finetune"]["feature_cache"].is_null());
        assert_eq!(report["phases"]["head"]["images_per_second"], 50.0);
        assert_eq!(report["phases"]["finetune"]["images_per_second"], 20.0);
    }

    #[test]
    fn outputs_are_written_and_untested_runs_have_no_report() {
        let dir = tempfile::tempdir().unwrap();
        let config = RunConfig {
            out: dir.path().join("out").to_str().unwrap().into(),
            ..RunConfig::default()
        };
        let mut run = Run::new("r".into(), config, 1);
        run.history = vec![epoch("head", 1.0, false)];
        write_outputs(&run).unwrap();
        assert!(dir.path().join("out/history.json").exists());
        assert!(dir.path().join("out/curves.png").exists());
        assert!(!dir.path().join("out/report.json").exists());
        run.history.push(epoch("finetune", 1.0, true));
        write_outputs(&run).unwrap();
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/report.json")).unwrap())
                .unwrap();
        assert_eq!(report["confusion_matrix"][1][1], 4);
    }
}

//! Prometheus metrics of the coordinator, served as text on `--metrics-listen`. Every value is
//! derived from the run's state at scrape time (the state machine stays free of metric
//! plumbing), so counters are exactly as monotonic as the history they count.

use cluster_metrics::prometheus_client::registry::{Registry, Unit};
use cluster_metrics::{counter, gauge, seconds_histogram};

use crate::run::{Run, Stage};

/// The run's metrics in the OpenMetrics text format.
pub fn render(run: &Run) -> String {
    let mut registry = Registry::with_prefix("effnet");
    add_membership(&mut registry, run);
    add_progress(&mut registry, run);
    add_recovery(&mut registry, run);
    cluster_metrics::encode(&registry)
}

/// Who is in the run, and where it is.
fn add_membership(registry: &mut Registry, run: &Run) {
    let ranked = run.workers.values().filter(|w| w.rank.is_some()).count();
    gauge(
        registry,
        "workers",
        "Workers connected to the coordinator",
        run.workers.len() as f64,
    );
    gauge(
        registry,
        "ranked_workers",
        "Workers in the current ring",
        ranked as f64,
    );
    gauge(
        registry,
        "expected_workers",
        "Workers the run waits for",
        run.expected as f64,
    );
    gauge(
        registry,
        "ring_generation",
        "Current ring generation",
        run.generation as f64,
    );
    let stage = match run.stage {
        Stage::Waiting => 0.0,
        Stage::Head => 1.0,
        Stage::Finetune => 2.0,
        Stage::Bench => 3.0,
        Stage::Done => 4.0,
        Stage::Failed => 5.0,
    };
    gauge(
        registry,
        "run_stage",
        "Run stage: 0 waiting, 1 head, 2 finetune, 3 bench, 4 done, 5 failed",
        stage,
    );
}

/// Training progress: steps, epochs, images, all-reduce time and the last epoch's numbers.
fn add_progress(registry: &mut Registry, run: &Run) {
    counter(
        registry,
        "steps",
        "Optimizer steps completed",
        None,
        run.steps_done as f64,
    );
    counter(
        registry,
        "epochs",
        "Epochs completed, both phases",
        None,
        run.history.len() as f64,
    );
    let images: u64 = run.history.iter().map(|h| h.train_images).sum();
    counter(
        registry,
        "train_images",
        "Training images processed, all ranks",
        None,
        images as f64,
    );
    let allreduce: f64 = run.history.iter().map(|h| h.allreduce_seconds).sum();
    counter(
        registry,
        "allreduce",
        "Mean time per rank spent in all-reduce",
        Some(Unit::Seconds),
        allreduce,
    );
    seconds_histogram(
        registry,
        "epoch_duration",
        "Wall time of an epoch",
        1.0,
        run.history.iter().map(|h| h.seconds),
    );
    if let Some(last) = run.history.last() {
        gauge(
            registry,
            "train_loss",
            "Mean training loss of the last epoch",
            last.train_loss,
        );
        gauge(
            registry,
            "train_accuracy",
            "Training accuracy of the last epoch",
            last.train_accuracy,
        );
        gauge(
            registry,
            "images_per_second",
            "Training images per second of the last epoch, all ranks",
            last.images_per_second,
        );
        if let Some(acc) = last.val_accuracy {
            gauge(
                registry,
                "val_accuracy",
                "Validation accuracy of the last epoch",
                acc,
            );
        }
    }
}

/// Recovery: re-formed rings, restarts and checkpoint commits.
fn add_recovery(registry: &mut Registry, run: &Run) {
    counter(
        registry,
        "ring_reforms",
        "Times the ring was re-formed from the survivors after losing workers",
        None,
        f64::from(run.ring_reforms),
    );
    counter(
        registry,
        "run_restarts",
        "Times this run was restarted from a checkpoint",
        None,
        f64::from(run.restarts),
    );
    counter(
        registry,
        "checkpoint_commits",
        "Checkpoints committed",
        None,
        run.commit_stats.len() as f64,
    );
    seconds_histogram(
        registry,
        "checkpoint_commit_duration",
        "Time to verify and commit a checkpoint",
        0.05,
        run.commit_stats.iter().map(|c| c.seconds),
    );
    if let Some(last) = run.commit_stats.last() {
        gauge(
            registry,
            "checkpoint_size_bytes",
            "Size of the last checkpoint",
            last.bytes as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{CommitStat, EpochSummary};
    use run_config::RunConfig;

    #[test]
    fn metrics_follow_the_run_state_with_prometheus_names() {
        let mut run = Run::new("r".into(), RunConfig::default(), 2);
        let empty = render(&run);
        assert!(empty.contains("effnet_expected_workers 2.0"), "{empty}");
        assert!(empty.contains("effnet_steps_total 0.0"), "{empty}");
        assert!(!empty.contains("effnet_train_loss"), "no epoch yet: {empty}");
        run.steps_done = 8;
        run.history.push(EpochSummary {
            phase: "head".into(),
            epoch: 0,
            steps: 8,
            train_loss: 1.5,
            train_accuracy: 0.25,
            val_loss: Some(1.25),
            val_accuracy: Some(0.5),
            test_loss: None,
            test_accuracy: None,
            test_confusion: None,
            classes: None,
            train_images: 64,
            seconds: 3.0,
            allreduce_seconds: 0.5,
            images_per_second: 21.0,
            train_seconds: 2.5,
            feature_cache_hits: 0,
            feature_cache_misses: 64,
        });
        run.commit_stats.push(CommitStat {
            seconds: 0.2,
            bytes: 1000,
        });
        run.ring_reforms = 1;
        run.restarts = 2;
        let text = render(&run);
        for line in [
            "effnet_steps_total 8.0",
            "effnet_epochs_total 1.0",
            "effnet_train_images_total 64.0",
            "effnet_allreduce_seconds_total 0.5",
            "effnet_train_loss 1.5",
            "effnet_val_accuracy 0.5",
            "effnet_checkpoint_commits_total 1.0",
            "effnet_checkpoint_size_bytes 1000.0",
            "effnet_epoch_duration_seconds_count 1",
            "effnet_epoch_duration_seconds_sum 3.0",
            "# TYPE effnet_checkpoint_commit_duration_seconds histogram",
            "effnet_ring_reforms_total 1.0",
            "effnet_run_restarts_total 2.0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}

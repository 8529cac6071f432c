//! The run configuration: what the coordinator was asked to do, sent to every worker with its
//! assignment (as JSON), so that workers need no flags beyond how to reach the coordinator.

use serde::{Deserialize, Serialize};

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Job {
    /// Transfer learning: the head phase, then the fine-tune phase.
    #[default]
    Train,
    /// Measure all-reduce bandwidth over the workers' ring.
    AllreduceBench,
}

/// Everything that defines a run. Every field has a default, so a TOML file or the command
/// line only names what differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// What the run does.
    pub job: Job,
    /// Model name, e.g. `efficientnet-b0`, `efficientnet-lite0`.
    pub model: String,
    /// Starting weights: `imagenet`, `none` (random initialisation) or a file path.
    pub weights: String,
    /// Dataset: `cifar10` (downloaded), `synthetic` (generated), a directory, or an
    /// `s3://bucket/prefix` URL.
    pub data: String,
    /// Side of the square network input, pixels.
    pub image_size: u32,
    /// Images per step on each worker.
    pub batch_size: u32,
    /// Images per optimizer step over all workers; 0 means `batch_size` times the worker
    /// count. It stays the same when the ring shrinks or grows (each rank takes its share).
    pub global_batch: u32,
    /// Classifier head trained in phase 1: `linear` (pool, dropout, dense) or `tutorial`
    /// (conv 7x7 with 7 filters, BatchNorm, pool, dropout, dense 512 ReLU, dense).
    pub head: String,
    /// Dropout before the head's dense layer while training.
    pub dropout: f64,
    /// Largest stochastic-depth probability while fine-tuning (the last block's); `None`
    /// keeps the model's own (0.2 for all EfficientNets).
    pub stochastic_depth: Option<f64>,
    /// Epochs of phase 1 (frozen backbone).
    pub head_epochs: u32,
    /// Epochs of phase 2 (everything but BatchNorm trainable).
    pub finetune_epochs: u32,
    /// Adam learning rate of phase 1.
    pub lr_head: f64,
    /// Adam learning rate of phase 2.
    pub lr_finetune: f64,
    /// Seed of initialisation, shuffling, augmentation and splits.
    pub seed: u64,
    /// Split scheme: `official` (official test set, validation carved from train) or
    /// `tutorial` (test = train[:10%], val = train[10%:25%]).
    pub split: String,
    /// Fraction of the training set held out for validation with the official split.
    pub val_fraction: f64,
    /// Class-balanced cap on training images.
    pub limit_train: Option<usize>,
    /// Class-balanced cap on validation images.
    pub limit_val: Option<usize>,
    /// Class-balanced cap on test images.
    pub limit_test: Option<usize>,
    /// Training images of the generated dataset (`data = "synthetic"`).
    pub synthetic_train: usize,
    /// Test images of the generated dataset.
    pub synthetic_test: usize,
    /// Random flips and quarter turns while training.
    pub augment: bool,
    /// Phase 1: each image is seen in at most this many of its 8 flip and rotation variants
    /// (a fixed random subset per image; 8: any, as the tutorial). With the feature cache a
    /// phase-1 image costs at most this many backbone passes over the whole phase.
    pub head_variants: u8,
    /// Checkpoint every this many epochs (0: only at the end of each phase).
    pub checkpoint_every: u32,
    /// Compare the ranks' weights every this many steps (0: only after each epoch).
    pub checksum_every: u32,
    /// Where outputs go (a directory).
    pub out: String,
    /// Checkpoint root: a directory, `file://`, `s3://bucket/prefix` or `memory://name`;
    /// empty means `<out>/checkpoints`.
    pub checkpoints: String,
    /// Committed checkpoints kept besides the best by validation accuracy (and `LATEST`).
    pub keep_checkpoints: u32,
    /// Phase 1: keep the frozen backbone's output per image and augmentation variant and
    /// train the head's epochs from it.
    pub feature_cache: bool,
    /// Feature cache: MiB of device memory per worker.
    pub feature_cache_memory_mb: u64,
    /// Feature cache: MiB of local disk per worker beyond the memory.
    pub feature_cache_disk_mb: u64,
    /// Feature cache: directory for the disk part on each worker; empty means the system's
    /// temporary directory.
    pub feature_cache_dir: String,
    /// Send gradients as bfloat16.
    pub bf16_allreduce: bool,
    /// Seconds a worker waits for its ring neighbour before declaring it dead.
    pub peer_timeout_s: f64,
    /// All-reduce benchmark: buffer sizes in MiB.
    pub bench_sizes_mb: Vec<f64>,
    /// All-reduce benchmark: untimed iterations per size.
    pub bench_warmup: u32,
    /// All-reduce benchmark: timed iterations per size.
    pub bench_iterations: u32,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            job: Job::Train,
            model: "efficientnet-b0".into(),
            weights: "imagenet".into(),
            data: "cifar10".into(),
            image_size: 224,
            batch_size: 32,
            global_batch: 0,
            head: "linear".into(),
            dropout: 0.2,
            stochastic_depth: None,
            head_epochs: 10,
            finetune_epochs: 50,
            lr_head: 1e-3,
            lr_finetune: 1e-5,
            seed: 42,
            split: "official".into(),
            val_fraction: 0.1,
            limit_train: None,
            limit_val: None,
            limit_test: None,
            synthetic_train: 2000,
            synthetic_test: 500,
            augment: true,
            head_variants: 8,
            checkpoint_every: 0,
            checksum_every: 100,
            out: "runs/latest".into(),
            checkpoints: String::new(),
            keep_checkpoints: 3,
            feature_cache: true,
            feature_cache_memory_mb: 4096,
            feature_cache_disk_mb: 32768,
            feature_cache_dir: String::new(),
            bf16_allreduce: false,
            peer_timeout_s: 60.0,
            bench_sizes_mb: vec![1.0, 4.0, 16.0, 64.0],
            bench_warmup: 2,
            bench_iterations: 10,
        }
    }
}

impl RunConfig {
    /// Expected backbone passes per training image over the head phase with the feature
    /// cache (each epoch draws one of `head_variants` symmetries, and only unseen ones cost a
    /// pass); `None` when no head phase runs from the cache.
    pub fn head_passes_per_image(&self) -> Option<f64> {
        if self.job != Job::Train || !self.feature_cache || self.head_epochs == 0 {
            return None;
        }
        let epochs = f64::from(self.head_epochs);
        if !self.augment {
            return Some(1.0);
        }
        let k = f64::from(self.head_variants.max(1));
        Some(k * (1.0 - (1.0 - 1.0 / k).powf(epochs)))
    }

    /// The configuration as sent on the wire.
    pub fn to_json(&self) -> String {
        // A struct of plain fields always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The checkpoint root URL: [`checkpoints`](Self::checkpoints), or `<out>/checkpoints`.
    pub fn checkpoint_url(&self) -> String {
        if self.checkpoints.is_empty() {
            format!("{}/checkpoints", self.out.trim_end_matches('/'))
        } else {
            self.checkpoints.clone()
        }
    }

    /// The fields that change what a run computes, with their values, for comparing a
    /// checkpoint's run with the one asked to resume it. Output places, retention, timeouts
    /// and checksum cadence may differ.
    pub fn resume_differences(&self, other: &RunConfig) -> Vec<String> {
        let mut a = serde_json::to_value(self).unwrap_or_default();
        let mut b = serde_json::to_value(other).unwrap_or_default();
        let mut differences = Vec::new();
        if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object_mut()) {
            for free in [
                "out",
                "checkpoints",
                "keep_checkpoints",
                "peer_timeout_s",
                "checksum_every",
                // Where features are kept changes no result beyond floating-point order.
                "feature_cache",
                "feature_cache_memory_mb",
                "feature_cache_disk_mb",
                "feature_cache_dir",
            ] {
                a.remove(free);
                b.remove(free);
            }
            for (key, value) in a.iter() {
                let theirs = b.get(key).cloned().unwrap_or_default();
                if *value != theirs {
                    differences.push(format!("{key} = {value} (checkpoint) vs {theirs} (now)"));
                }
            }
        }
        differences
    }

    /// Parse the configuration received from a coordinator.
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text)
            .map_err(|e| format!("the coordinator sent a run configuration this worker cannot read: {e}"))
    }

    /// Check values that would only fail later, on a worker, in the middle of a run.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.batch_size == 0 {
            problems.push("batch_size must be at least 1".to_string());
        }
        if self.keep_checkpoints == 0 {
            problems.push("keep_checkpoints must be at least 1".to_string());
        }
        if self.image_size < 32 {
            problems.push(format!(
                "image_size {} is below the minimum of 32",
                self.image_size
            ));
        }
        if !["linear", "tutorial"].contains(&self.head.as_str()) {
            problems.push(format!("head {:?}: expected linear or tutorial", self.head));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            problems.push(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        if let Some(p) = self.stochastic_depth.filter(|p| !(0.0..1.0).contains(p)) {
            problems.push(format!("stochastic_depth {p} must be in [0, 1)"));
        }
        if !["official", "tutorial"].contains(&self.split.as_str()) {
            problems.push(format!("split {:?}: expected official or tutorial", self.split));
        }
        if !(1..=8).contains(&self.head_variants) {
            problems.push(format!(
                "head_variants {} must be between 1 and 8",
                self.head_variants
            ));
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            problems.push(format!("val_fraction {} must be in [0, 1)", self.val_fraction));
        }
        for (name, lr) in [("lr_head", self.lr_head), ("lr_finetune", self.lr_finetune)] {
            if !(lr.is_finite() && lr >= 0.0) {
                problems.push(format!("{name} {lr} must be a non-negative number"));
            }
        }
        if !(self.peer_timeout_s.is_finite() && self.peer_timeout_s > 0.0) {
            problems.push(format!("peer_timeout_s {} must be positive", self.peer_timeout_s));
        }
        if self.job == Job::Train && self.head_epochs + self.finetune_epochs == 0 {
            problems.push("head_epochs and finetune_epochs are both 0: nothing to train".into());
        }
        if self.job == Job::AllreduceBench {
            if self.bench_sizes_mb.is_empty() {
                problems.push("bench_sizes_mb is empty".into());
            }
            if self
                .bench_sizes_mb
                .iter()
                .any(|mb| !(mb.is_finite() && *mb > 0.0 && *mb <= 4096.0))
            {
                problems.push("bench_sizes_mb values must be in (0, 4096]".into());
            }
            if self.bench_iterations == 0 {
                problems.push("bench_iterations must be at least 1".into());
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_defaults() {
        let config = RunConfig {
            limit_train: Some(100),
            job: Job::AllreduceBench,
            ..RunConfig::default()
        };
        assert_eq!(RunConfig::from_json(&config.to_json()).unwrap(), config);
        let partial = RunConfig::from_json(r#"{"model":"efficientnet-lite0"}"#).unwrap();
        assert_eq!(partial.model, "efficientnet-lite0");
        assert_eq!(partial.batch_size, 32);
        let err = RunConfig::from_json(r#"{"modle":"x"}"#).unwrap_err();
        assert!(err.contains("unknown field `modle`"), "{err}");
    }

    #[test]
    fn a_resume_may_change_where_features_are_cached_but_not_the_variants() {
        let saved = RunConfig::default();
        let now = RunConfig {
            feature_cache: false,
            feature_cache_memory_mb: 1,
            feature_cache_disk_mb: 2,
            feature_cache_dir: "/scratch".into(),
            ..RunConfig::default()
        };
        assert!(saved.resume_differences(&now).is_empty());
        let now = RunConfig {
            head_variants: 1,
            ..RunConfig::default()
        };
        assert_eq!(
            saved.resume_differences(&now),
            ["head_variants = 8 (checkpoint) vs 1 (now)"]
        );
    }

    #[test]
    fn the_cache_costs_at_most_one_pass_per_variant_drawn() {
        let passes = |head_variants, augment, feature_cache| {
            RunConfig {
                head_epochs: 10,
                head_variants,
                augment,
                feature_cache,
                ..RunConfig::default()
            }
            .head_passes_per_image()
        };
        // 8 (1 - (7/8)^10): the tutorial's draws over its 10 head epochs.
        assert!((passes(8, true, true).unwrap() - 5.8955).abs() < 1e-3);
        assert_eq!(passes(1, true, true), Some(1.0));
        assert_eq!(passes(8, false, true), Some(1.0));
        assert_eq!(passes(8, true, false), None);
    }

    #[test]
    fn validation_lists_every_problem() {
        let config = RunConfig {
            batch_size: 0,
            head: "mlp".into(),
            head_variants: 9,
            ..RunConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(
            err.contains("batch_size")
                && err.contains("head \"mlp\"")
                && err.contains("head_variants 9 must be between 1 and 8"),
            "{err}"
        );
        assert!(RunConfig::default().validate().is_ok());
    }
}

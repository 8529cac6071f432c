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

/// `augmentation` value: random flips and a random number of quarter turns (the 8 symmetries
/// of a square).
pub const SYMMETRIES: &str = "symmetries";
/// `augmentation` value: random left-right and up-down flips, then one quarter turn on every
/// image, as the Keras tutorial's code does (4 variants per image, none upright).
pub const FLIPS_ROT90: &str = "flips-rot90";
/// The recipe that sets everything the Keras EfficientNet transfer-learning tutorial does.
pub const KERAS_TUTORIAL: &str = "keras-tutorial";

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
    /// Phase 2's learning rate decays as Keras's legacy optimizers' `decay` does:
    /// `lr_finetune / (1 + lr_decay_finetune * iterations)`, iterations counted from the start
    /// of the phase. 0: constant.
    pub lr_decay_finetune: f64,
    /// Adam's epsilon (added to the root of the second moment). PyTorch's default is 1e-8,
    /// Keras's 1e-7; Burn's own default of 1e-5 damps steps whose gradients are that small,
    /// which fine-tuning's are.
    pub adam_epsilon: f64,
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
    /// Augment training images (see `augmentation`).
    pub augment: bool,
    /// How training images are augmented: [`SYMMETRIES`] or [`FLIPS_ROT90`].
    pub augmentation: String,
    /// Phase 1: each image is seen in at most this many of its 8 flip and rotation variants
    /// (a fixed random subset per image; 8: any), with the `symmetries` augmentation. With the feature cache a
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
    /// The recipe the run's settings started from (`keras-tutorial`), empty for none; for
    /// the record: what it set is in the other fields.
    pub recipe: String,
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
            lr_decay_finetune: 0.0,
            adam_epsilon: 1e-8,
            seed: 42,
            split: "official".into(),
            val_fraction: 0.1,
            limit_train: None,
            limit_val: None,
            limit_test: None,
            synthetic_train: 2000,
            synthetic_test: 500,
            augment: true,
            augmentation: SYMMETRIES.into(),
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
            recipe: String::new(),
        }
    }
}

impl RunConfig {
    /// The defaults with recipe `name` applied (empty: the defaults).
    pub fn recipe(name: &str) -> Result<Self, String> {
        match name {
            "" => Ok(Self::default()),
            KERAS_TUTORIAL => Ok(Self {
                split: "tutorial".into(),
                image_size: 224,
                // The tutorial's batch is the optimizer's: 32 images a step whatever the
                // number of workers.
                batch_size: 32,
                global_batch: 32,
                head: "tutorial".into(),
                dropout: 0.2,
                head_epochs: 10,
                lr_head: 2e-5,
                finetune_epochs: 50,
                lr_finetune: 1e-6,
                // Keras's legacy `decay` argument, set to the learning rate over the epochs
                // (the idiom such tutorials use: Adam(1e-6, decay=1e-6 / 50)).
                lr_decay_finetune: 1e-6 / 50.0,
                adam_epsilon: 1e-7,
                augment: true,
                augmentation: FLIPS_ROT90.into(),
                recipe: KERAS_TUTORIAL.into(),
                ..Self::default()
            }),
            other => Err(format!("recipe {other:?}: the only recipe is {KERAS_TUTORIAL}")),
        }
    }

    /// Whether the run starts from random weights, and so trains the whole network in phase
    /// 1 instead of a head on frozen features (a random backbone's features are noise).
    pub fn from_scratch(&self) -> bool {
        self.weights == "none"
    }

    /// Different images the training augmentation makes of one image (1 without).
    pub fn augment_variants(&self) -> u8 {
        match (self.augment, self.augmentation.as_str()) {
            (false, _) => 1,
            (true, FLIPS_ROT90) => 4,
            (true, _) => 8,
        }
    }

    /// Expected backbone passes per training image over the head phase with the feature
    /// cache (each epoch draws one of `head_variants` symmetries, and only unseen ones cost a
    /// pass); `None` when no head phase runs from the cache.
    pub fn head_passes_per_image(&self) -> Option<f64> {
        if self.job != Job::Train || !self.feature_cache || self.head_epochs == 0 || self.from_scratch() {
            return None;
        }
        let epochs = f64::from(self.head_epochs);
        let k = f64::from(self.head_variants.max(1).min(self.augment_variants()));
        if k <= 1.0 {
            return Some(1.0);
        }
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
                // What a recipe set is compared field by field.
                "recipe",
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
        if ![SYMMETRIES, FLIPS_ROT90].contains(&self.augmentation.as_str()) {
            problems.push(format!(
                "augmentation {:?}: expected {SYMMETRIES} or {FLIPS_ROT90}",
                self.augmentation
            ));
        }
        if self.augmentation == FLIPS_ROT90 && self.head_variants != 8 {
            problems.push(format!(
                "head_variants {} subsets the 8 symmetries of augmentation {SYMMETRIES}; \
                 {FLIPS_ROT90} has 4 variants per image and no subsets",
                self.head_variants
            ));
        }
        if !(self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0) {
            problems.push(format!("adam_epsilon {} must be positive", self.adam_epsilon));
        }
        if !(self.lr_decay_finetune.is_finite() && self.lr_decay_finetune >= 0.0) {
            problems.push(format!(
                "lr_decay_finetune {} must be a non-negative number",
                self.lr_decay_finetune
            ));
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
        // The Keras tutorial's augmentation: 4 variants, 4 (1 - (3/4)^10) passes.
        let keras = RunConfig {
            head_epochs: 10,
            augmentation: FLIPS_ROT90.into(),
            ..RunConfig::default()
        };
        assert!((keras.head_passes_per_image().unwrap() - 3.7747).abs() < 1e-3);
        // From scratch there is no frozen backbone to cache.
        let scratch = RunConfig {
            weights: "none".into(),
            ..RunConfig::default()
        };
        assert!(scratch.from_scratch());
        assert_eq!(scratch.head_passes_per_image(), None);
    }

    #[test]
    fn the_keras_recipe_sets_the_tutorials_protocol() {
        let keras = RunConfig::recipe(KERAS_TUTORIAL).unwrap();
        assert_eq!(
            (
                keras.split.as_str(),
                keras.image_size,
                keras.global_batch,
                keras.head.as_str()
            ),
            ("tutorial", 224, 32, "tutorial")
        );
        assert_eq!((keras.head_epochs, keras.lr_head), (10, 2e-5));
        assert_eq!((keras.finetune_epochs, keras.lr_finetune), (50, 1e-6));
        assert_eq!(
            (keras.augmentation.as_str(), keras.adam_epsilon),
            (FLIPS_ROT90, 1e-7)
        );
        assert!(keras.lr_decay_finetune > 0.0 && keras.validate().is_ok());
        assert_eq!(RunConfig::recipe("").unwrap(), RunConfig::default());
        let err = RunConfig::recipe("keras").unwrap_err();
        assert!(err.contains("keras-tutorial"), "{err}");
    }

    #[test]
    fn validation_lists_every_problem() {
        let config = RunConfig {
            batch_size: 0,
            head: "mlp".into(),
            head_variants: 9,
            augmentation: "rot180".into(),
            adam_epsilon: 0.0,
            ..RunConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(
            err.contains("batch_size")
                && err.contains("head \"mlp\"")
                && err.contains("head_variants 9 must be between 1 and 8")
                && err.contains("augmentation \"rot180\": expected symmetries or flips-rot90")
                && err.contains("adam_epsilon 0 must be positive"),
            "{err}"
        );
        let pooled_keras = RunConfig {
            augmentation: FLIPS_ROT90.into(),
            head_variants: 2,
            ..RunConfig::default()
        };
        assert!(
            pooled_keras
                .validate()
                .unwrap_err()
                .contains("has 4 variants per image")
        );
        assert!(RunConfig::default().validate().is_ok());
    }
}

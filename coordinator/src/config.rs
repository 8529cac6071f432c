//! The run configuration from a TOML file, environment variables and flags, in increasing
//! precedence: `--config run.toml`, then `CLUSTER_*` variables, then flags.

use std::path::{Path, PathBuf};

use clap::Args;
use run_config::{Job, RunConfig};

/// Run options on the command line; each also reads a `CLUSTER_<NAME>` environment variable.
#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// TOML file with run settings (field names as the flags, with underscores).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Start from a recipe's settings; the file and every flag still override them.
    /// `keras-tutorial`: the Keras EfficientNet tutorial's protocol (its split, batch 32, 224
    /// px, its head, Adam 2e-5 for 10 head epochs, then 50 epochs at 1e-6 with decay, BatchNorm
    /// frozen, random flips then a quarter turn).
    #[arg(long, env = "CLUSTER_RECIPE", value_name = "NAME")]
    pub recipe: Option<String>,
    /// What to run: `train` or `allreduce-bench`.
    #[arg(long, env = "CLUSTER_JOB", value_parser = parse_job)]
    pub job: Option<Job>,
    /// Model: efficientnet-b0..b7 or efficientnet-lite0..lite4.
    #[arg(long, env = "CLUSTER_MODEL")]
    pub model: Option<String>,
    /// Starting weights: `imagenet`, `none` or a weights file present on every worker.
    #[arg(long, env = "CLUSTER_WEIGHTS")]
    pub weights: Option<String>,
    /// Dataset: `cifar10`, `synthetic`, a directory or `s3://bucket/prefix`.
    #[arg(long, env = "CLUSTER_DATA")]
    pub data: Option<String>,
    /// Network input size in pixels.
    #[arg(long, env = "CLUSTER_IMAGE_SIZE")]
    pub image_size: Option<u32>,
    /// Images per step on each worker.
    #[arg(long, env = "CLUSTER_BATCH_SIZE")]
    pub batch_size: Option<u32>,
    /// Images per optimizer step over all workers (default: --batch-size times the worker
    /// count); kept when workers are lost or added.
    #[arg(long, env = "CLUSTER_GLOBAL_BATCH")]
    pub global_batch: Option<u32>,
    /// Head trained in phase 1: `linear` or `tutorial`.
    #[arg(long, env = "CLUSTER_HEAD")]
    pub head: Option<String>,
    /// Dropout before the head's dense layer.
    #[arg(long, env = "CLUSTER_DROPOUT")]
    pub dropout: Option<f64>,
    /// Largest stochastic-depth probability while fine-tuning (0 turns it off).
    #[arg(long, env = "CLUSTER_STOCHASTIC_DEPTH")]
    pub stochastic_depth: Option<f64>,
    /// Epochs with the backbone frozen.
    #[arg(long, env = "CLUSTER_HEAD_EPOCHS")]
    pub head_epochs: Option<u32>,
    /// Epochs fine-tuning everything but BatchNorm.
    #[arg(long, env = "CLUSTER_FINETUNE_EPOCHS")]
    pub finetune_epochs: Option<u32>,
    /// Learning rate of phase 1.
    #[arg(long, env = "CLUSTER_LR_HEAD")]
    pub lr_head: Option<f64>,
    /// Learning rate of phase 2.
    #[arg(long, env = "CLUSTER_LR_FINETUNE")]
    pub lr_finetune: Option<f64>,
    /// Phase 2's learning rate is lr / (1 + DECAY * iterations), as Keras's `decay` argument.
    #[arg(long, env = "CLUSTER_LR_DECAY_FINETUNE", value_name = "DECAY")]
    pub lr_decay_finetune: Option<f64>,
    /// Adam's epsilon (PyTorch's 1e-8 by default; Keras uses 1e-7).
    #[arg(long, env = "CLUSTER_ADAM_EPSILON")]
    pub adam_epsilon: Option<f64>,
    /// Seed for initialisation, shuffling, augmentation and splits.
    #[arg(long, env = "CLUSTER_SEED")]
    pub seed: Option<u64>,
    /// Split scheme: `official` or `tutorial`.
    #[arg(long, env = "CLUSTER_SPLIT")]
    pub split: Option<String>,
    /// Class-balanced cap on training images.
    #[arg(long, env = "CLUSTER_LIMIT_TRAIN")]
    pub limit_train: Option<usize>,
    /// Class-balanced cap on validation images.
    #[arg(long, env = "CLUSTER_LIMIT_VAL")]
    pub limit_val: Option<usize>,
    /// Class-balanced cap on test images.
    #[arg(long, env = "CLUSTER_LIMIT_TEST")]
    pub limit_test: Option<usize>,
    /// Turn off random flips and rotations.
    #[arg(long, env = "CLUSTER_NO_AUGMENT")]
    pub no_augment: bool,
    /// Training augmentation: `symmetries` (random flips and quarter turns: 8 variants) or
    /// `flips-rot90` (random flips, then one quarter turn on every image: the Keras tutorial's
    /// code, 4 variants).
    #[arg(long, env = "CLUSTER_AUGMENTATION")]
    pub augmentation: Option<String>,
    /// Phase 1: each image is seen in at most K of its 8 flip/rotation variants (8: any).
    #[arg(long, env = "CLUSTER_HEAD_VARIANTS", value_name = "K")]
    pub head_variants: Option<u8>,
    /// Checkpoint every N epochs (0: at the end of each phase only).
    #[arg(long, env = "CLUSTER_CHECKPOINT_EVERY")]
    pub checkpoint_every: Option<u32>,
    /// Compare the ranks' weights every N steps (0: after each epoch only).
    #[arg(long, env = "CLUSTER_CHECKSUM_EVERY")]
    pub checksum_every: Option<u32>,
    /// Output directory.
    #[arg(long, env = "CLUSTER_OUT")]
    pub out: Option<String>,
    /// Checkpoint root: a directory, s3://bucket/prefix (AWS_* variables or profile give the
    /// endpoint and credentials), file:// or memory:// (default: OUT/checkpoints).
    #[arg(long, env = "CLUSTER_CHECKPOINTS", value_name = "URL")]
    pub checkpoints: Option<String>,
    /// Committed checkpoints to keep, besides the best by validation accuracy.
    #[arg(long, env = "CLUSTER_KEEP_CHECKPOINTS")]
    pub keep_checkpoints: Option<u32>,
    /// Train phase 1 from the backbone every time instead of from cached features.
    #[arg(long, env = "CLUSTER_NO_FEATURE_CACHE")]
    pub no_feature_cache: bool,
    /// Feature cache: MiB of device memory per worker (beyond it, local disk).
    #[arg(long, env = "CLUSTER_FEATURE_CACHE_MEMORY_MB", value_name = "MIB")]
    pub feature_cache_memory_mb: Option<u64>,
    /// Feature cache: MiB of local disk per worker beyond the memory.
    #[arg(long, env = "CLUSTER_FEATURE_CACHE_DISK_MB", value_name = "MIB")]
    pub feature_cache_disk_mb: Option<u64>,
    /// Feature cache: directory for its disk part on each worker (default: the system's
    /// temporary directory).
    #[arg(long, env = "CLUSTER_FEATURE_CACHE_DIR", value_name = "DIR")]
    pub feature_cache_dir: Option<String>,
    /// Send gradients as bfloat16 (half the bytes, ~3 significant digits).
    #[arg(long, env = "CLUSTER_BF16_ALLREDUCE")]
    pub bf16_allreduce: bool,
    /// Seconds a worker waits for its ring neighbour before declaring it dead.
    #[arg(long, env = "CLUSTER_PEER_TIMEOUT")]
    pub peer_timeout: Option<f64>,
    /// All-reduce benchmark sizes in MiB, comma-separated.
    #[arg(long, env = "CLUSTER_SIZE_MB", value_delimiter = ',')]
    pub size_mb: Option<Vec<f64>>,
    /// All-reduce benchmark: timed iterations per size.
    #[arg(long, env = "CLUSTER_ITERATIONS")]
    pub iterations: Option<u32>,
}

fn parse_job(value: &str) -> Result<Job, String> {
    match value {
        "train" => Ok(Job::Train),
        "allreduce-bench" => Ok(Job::AllreduceBench),
        other => Err(format!("{other:?}: expected train or allreduce-bench")),
    }
}

/// Read a TOML run file over the defaults of `recipe` (or of the recipe the file names, when
/// `recipe` is `None`).
pub fn load_file(path: &Path, recipe: Option<&str>) -> Result<RunConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let recipe = recipe
        .map(str::to_string)
        .or_else(|| {
            file.get("recipe")
                .and_then(toml::Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_default();
    let mut merged = toml::Table::try_from(RunConfig::recipe(&recipe)?)
        .map_err(|e| format!("cannot represent the run configuration in TOML: {e}"))?;
    merged.extend(file);
    merged.insert("recipe".into(), toml::Value::String(recipe));
    toml::Value::Table(merged)
        .try_into()
        .map_err(|e| format!("{}: {e}", path.display()))
}

impl RunArgs {
    /// The configuration: defaults, overridden by the file, overridden by flags and env.
    pub fn resolve(&self) -> Result<RunConfig, String> {
        let mut c = match &self.config {
            Some(path) => load_file(path, self.recipe.as_deref())?,
            None => RunConfig::recipe(self.recipe.as_deref().unwrap_or_default())?,
        };
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = self.$field.clone() { c.$field = v; }
            )*};
        }
        set!(
            job,
            model,
            weights,
            data,
            image_size,
            batch_size,
            global_batch,
            head,
            dropout,
            head_epochs,
            finetune_epochs,
            lr_head,
            lr_finetune,
            lr_decay_finetune,
            adam_epsilon,
            augmentation,
            seed,
            split,
            checkpoint_every,
            checksum_every,
            out,
            checkpoints,
            keep_checkpoints,
            feature_cache_memory_mb,
            head_variants,
            feature_cache_disk_mb,
            feature_cache_dir
        );
        for (field, value) in [
            (&mut c.limit_train, self.limit_train),
            (&mut c.limit_val, self.limit_val),
            (&mut c.limit_test, self.limit_test),
        ] {
            if value.is_some() {
                *field = value;
            }
        }
        if self.stochastic_depth.is_some() {
            c.stochastic_depth = self.stochastic_depth;
        }
        if self.no_augment {
            c.augment = false;
        }
        if self.bf16_allreduce {
            c.bf16_allreduce = true;
        }
        if self.no_feature_cache {
            c.feature_cache = false;
        }
        if let Some(v) = self.peer_timeout {
            c.peer_timeout_s = v;
        }
        if let Some(v) = &self.size_mb {
            c.bench_sizes_mb = v.clone();
        }
        if let Some(v) = self.iterations {
            c.bench_iterations = v;
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(
            &path,
            "model = \"efficientnet-lite0\"\nbatch_size = 8\nhead_epochs = 3\n",
        )
        .unwrap();
        let args = RunArgs {
            config: Some(path),
            batch_size: Some(16),
            ..RunArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.model, "efficientnet-lite0");
        assert_eq!(config.batch_size, 16);
        assert_eq!(config.head_epochs, 3);
        assert_eq!(config.finetune_epochs, RunConfig::default().finetune_epochs);
    }

    #[test]
    fn a_recipe_sets_defaults_that_the_file_and_flags_override() {
        let keras = RunConfig::recipe(run_config::KERAS_TUTORIAL).unwrap();
        let flag = RunArgs {
            recipe: Some("keras-tutorial".into()),
            lr_head: Some(1e-3),
            ..RunArgs::default()
        };
        let config = flag.resolve().unwrap();
        assert_eq!(config.lr_head, 1e-3);
        assert_eq!(
            RunConfig {
                lr_head: keras.lr_head,
                ..config
            },
            keras
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "recipe = \"keras-tutorial\"\nhead = \"linear\"\n").unwrap();
        let from_file = RunArgs {
            config: Some(path.clone()),
            head_epochs: Some(3),
            ..RunArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            (from_file.head.as_str(), from_file.head_epochs, from_file.lr_head),
            ("linear", 3, 2e-5),
            "file over recipe, flag over file"
        );
        assert_eq!(from_file.recipe, "keras-tutorial");
        std::fs::write(&path, "batch_size = 8\n").unwrap();
        let plain = RunArgs {
            config: Some(path),
            ..RunArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            (plain.batch_size, plain.lr_head, plain.recipe.as_str()),
            (8, 1e-3, "")
        );
        let err = RunArgs {
            recipe: Some("fastai".into()),
            ..RunArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            err.contains("recipe \"fastai\"") && err.contains("keras-tutorial"),
            "{err}"
        );
    }

    #[test]
    fn bad_files_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "batch_sise = 8\n").unwrap();
        let args = RunArgs {
            config: Some(path.clone()),
            ..RunArgs::default()
        };
        let err = args.resolve().unwrap_err();
        assert!(err.contains("run.toml") && err.contains("batch_sise"), "{err}");
        std::fs::write(&path, "batch_size = 0\n").unwrap();
        assert!(
            args.resolve()
                .unwrap_err()
                .contains("batch_size must be at least 1")
        );
    }
}

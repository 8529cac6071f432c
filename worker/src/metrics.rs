//! A worker's Prometheus metrics (`worker join --metrics-listen`): what this rank spends its
//! time on, step by step. The training thread updates them as it goes; a scrape encodes them.

use std::sync::atomic::AtomicU64;

use cluster_metrics::prometheus_client::metrics::counter::Counter;
use cluster_metrics::prometheus_client::metrics::gauge::Gauge;
use cluster_metrics::prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use cluster_metrics::prometheus_client::registry::{Registry, Unit};
use cluster_metrics::seconds_buckets;

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

/// Live metrics of one worker. Clones of the handles share their values with the registry.
pub struct WorkerMetrics {
    registry: Registry,
    /// Rank in the current ring (-1 before the first).
    pub rank: Gauge,
    /// Ranks in the current ring.
    pub world: Gauge,
    /// Generation of the current ring.
    pub generation: Gauge,
    /// 1 head, 2 fine-tuning, 0 neither yet.
    pub phase: Gauge,
    /// Optimizer steps this worker took part in.
    pub steps: Counter,
    /// Training images this rank processed.
    pub train_images: Counter,
    /// Mean loss of this rank's last batch.
    pub train_loss: FloatGauge,
    /// This rank's training images per second over the epoch so far (data waits included).
    pub images_per_second: FloatGauge,
    /// Forward, backward, all-reduce and optimizer update of one step.
    pub step_seconds: Histogram,
    /// Time the step waited for its batch from the loader.
    pub data_wait_seconds: Histogram,
    /// Time in the gradient all-reduce of one step.
    pub allreduce_seconds: Histogram,
    /// Gradient bytes this rank sent to its ring neighbour.
    pub allreduce_bytes: Counter,
    /// Upload time of a checkpoint (rank 0).
    pub checkpoint_upload_seconds: Histogram,
    /// Checkpoint bytes uploaded (rank 0).
    pub checkpoint_upload_bytes: Counter,
    /// Times this worker restored a run's state from a checkpoint.
    pub restores: Counter,
    /// Evaluation time of the validation (and test) shard after an epoch.
    pub eval_seconds: FloatCounter,
    /// Phase-1 backbone outputs served from the feature cache.
    pub cache_hits: Counter,
    /// Phase-1 backbone outputs computed (not in the cache yet).
    pub cache_misses: Counter,
    /// Bytes the feature cache holds in device memory.
    pub cache_memory_bytes: Gauge,
    /// Bytes the feature cache holds on local disk.
    pub cache_disk_bytes: Gauge,
}

impl Default for WorkerMetrics {
    /// Every metric created and registered under its name and help text. One long list on
    /// purpose (about 140 lines): each stanza is the whole truth about one series, in the
    /// order the exposition lists them; grouping them into helpers would only move the list.
    fn default() -> Self {
        let mut registry = Registry::with_prefix("effnet_worker");
        let rank = Gauge::default();
        rank.set(-1);
        registry.register("rank", "Rank in the current ring (-1: none yet)", rank.clone());
        let world = Gauge::default();
        registry.register("world_size", "Ranks in the current ring", world.clone());
        let generation = Gauge::default();
        registry.register(
            "ring_generation",
            "Generation of the current ring",
            generation.clone(),
        );
        let phase = Gauge::default();
        registry.register(
            "phase",
            "Training phase: 0 none yet, 1 head, 2 fine-tuning",
            phase.clone(),
        );
        let steps = Counter::default();
        registry.register("steps", "Optimizer steps taken", steps.clone());
        let train_images = Counter::default();
        registry.register(
            "train_images",
            "Training images this rank processed",
            train_images.clone(),
        );
        let train_loss = FloatGauge::default();
        registry.register("train_loss", "Mean loss of the last batch", train_loss.clone());
        let images_per_second = FloatGauge::default();
        registry.register(
            "images_per_second",
            "Training images per second of this rank over the current epoch",
            images_per_second.clone(),
        );
        // 1 ms .. 8 s: a head step on a GPU to a full CPU step.
        let step_seconds = Histogram::new(seconds_buckets(0.001));
        registry.register_with_unit(
            "step_duration",
            "Forward, backward, all-reduce and update of one step",
            Unit::Seconds,
            step_seconds.clone(),
        );
        // 0.1 ms .. 0.8 s: a healthy loader keeps this near the first bucket.
        let data_wait_seconds = Histogram::new(seconds_buckets(0.0001));
        registry.register_with_unit(
            "data_wait",
            "Time a step waited for its batch",
            Unit::Seconds,
            data_wait_seconds.clone(),
        );
        let allreduce_seconds = Histogram::new(seconds_buckets(0.0001));
        registry.register_with_unit(
            "allreduce_duration",
            "Gradient all-reduce time of one step",
            Unit::Seconds,
            allreduce_seconds.clone(),
        );
        let allreduce_bytes = Counter::default();
        registry.register_with_unit(
            "allreduce_sent",
            "Gradient bytes sent to the next rank",
            Unit::Bytes,
            allreduce_bytes.clone(),
        );
        let checkpoint_upload_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        registry.register_with_unit(
            "checkpoint_upload_duration",
            "Upload time of a checkpoint",
            Unit::Seconds,
            checkpoint_upload_seconds.clone(),
        );
        let checkpoint_upload_bytes = Counter::default();
        registry.register_with_unit(
            "checkpoint_uploaded",
            "Checkpoint bytes uploaded",
            Unit::Bytes,
            checkpoint_upload_bytes.clone(),
        );
        let restores = Counter::default();
        registry.register(
            "checkpoint_restores",
            "Times this worker restored the run's state from a checkpoint",
            restores.clone(),
        );
        let eval_seconds = FloatCounter::default();
        registry.register_with_unit(
            "eval",
            "Time spent evaluating validation and test shards",
            Unit::Seconds,
            eval_seconds.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "feature_cache_hits",
            "Phase-1 backbone outputs served from the feature cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "feature_cache_misses",
            "Phase-1 backbone outputs computed because the cache did not hold them",
            cache_misses.clone(),
        );
        let cache_memory_bytes = Gauge::default();
        registry.register_with_unit(
            "feature_cache_memory",
            "Bytes the feature cache holds in device memory",
            Unit::Bytes,
            cache_memory_bytes.clone(),
        );
        let cache_disk_bytes = Gauge::default();
        registry.register_with_unit(
            "feature_cache_disk",
            "Bytes the feature cache holds on local disk",
            Unit::Bytes,
            cache_disk_bytes.clone(),
        );
        Self {
            registry,
            rank,
            world,
            generation,
            phase,
            steps,
            train_images,
            train_loss,
            images_per_second,
            step_seconds,
            data_wait_seconds,
            allreduce_seconds,
            allreduce_bytes,
            checkpoint_upload_seconds,
            checkpoint_upload_bytes,
            restores,
            eval_seconds,
            cache_hits,
            cache_misses,
            cache_memory_bytes,
            cache_disk_bytes,
        }
    }
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics")
            .field("steps", &self.steps.get())
            .finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        cluster_metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_show_in_the_next_render_under_prometheus_names() {
        let metrics = WorkerMetrics::default();
        let before = metrics.render();
        assert!(before.lines().any(|l| l == "effnet_worker_rank -1"), "{before}");
        metrics.rank.set(1);
        metrics.steps.inc_by(3);
        metrics.allreduce_bytes.inc_by(4096);
        metrics.step_seconds.observe(0.3);
        metrics.data_wait_seconds.observe(0.002);
        metrics.train_loss.set(1.25);
        metrics.cache_hits.inc_by(40);
        metrics.cache_disk_bytes.set(1 << 20);
        let text = metrics.render();
        for line in [
            "effnet_worker_rank 1",
            "effnet_worker_steps_total 3",
            "effnet_worker_allreduce_sent_bytes_total 4096",
            "effnet_worker_train_loss 1.25",
            "effnet_worker_step_duration_seconds_count 1",
            "effnet_worker_step_duration_seconds_sum 0.3",
            "effnet_worker_data_wait_seconds_count 1",
            "# TYPE effnet_worker_allreduce_duration_seconds histogram",
            "# TYPE effnet_worker_checkpoint_restores counter",
            "effnet_worker_feature_cache_hits_total 40",
            "effnet_worker_feature_cache_misses_total 0",
            "effnet_worker_feature_cache_disk_bytes 1048576",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}

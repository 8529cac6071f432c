//! One worker's share of a distributed run: data, model and optimizer state kept between
//! the coordinator's work units, and one epoch of either phase in lockstep with the other
//! ranks (gradients averaged over the ring every step).
//!
//! Every rank derives the same splits and the same sampler permutation from the run's seed,
//! takes its strided shard, and starts from rank 0's weights (broadcast through the ring),
//! so after every step all ranks hold bit-identical weights; the epoch report carries a
//! checksum of them for the coordinator to compare.

// Host-device copies go through `self.transfers`, which counts them (transfer_tests.rs).
#![deny(clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use cluster_proto::run::RunConfig;
use cluster_proto::v1::{self, EpochResult, EpochWork};
use collective::{Link, Ring, all_reduce};
use dataset::loader::{Prefetcher, batches};
use dataset::sampler::{SamplerConfig, SamplerState, StepShare, deal_by_home, home_rank};
use dataset::source::{Dataset, Sample};
use dataset::split::{Limits, SplitScheme, Splits, apply_limits, split};
use dataset::store::DataStore;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use crate::augment::{Augment, Variant, to_input};
use crate::error::{Error, Result};
use crate::features::{CacheBudget, CacheStats, FeatureCache};
use crate::grads::{flatten, unflatten};
use crate::metrics::WorkerMetrics;
use crate::optim;
use crate::resume::Parts;
use crate::source::{self, ModelSource};
use crate::transfer::{TransferCounts, Transfers};
use crate::watch::RingWatch;
use effnet::model::Classifier;
use effnet::modelfile::{ClassLabel, LoadedModel};
use effnet::phase::{self, Phase};
use effnet::weights::{ModulePath, RawTensor, WeightsFile, apply_weights, collect_tensors};

/// Batches read ahead of the training step.
const PREFETCH: usize = 4;

fn cluster(message: impl Into<String>) -> Error {
    Error::Cluster(message.into())
}

/// A rank's data and model for the whole run.
pub struct Trainer {
    config: RunConfig,
    device: Device,
    dataset: Arc<Dataset>,
    splits: Splits,
    model: Option<LoadedModel>,
    phase: Option<Phase>,
    optimizer: Option<burn::optim::ModuleOptimizer>,
    /// Global steps this trainer has completed (unknown until its first epoch).
    completed: Option<u64>,
    /// The state before the last completed step of an unfinished epoch.
    undo: Option<Undo>,
    /// Phase 1's backbone outputs (none in phase 2 or with the cache off).
    cache: Option<FeatureCache>,
    /// Every copy between the host and the device this trainer makes.
    transfers: Transfers,
    /// The last epoch's training steps, and the copies they made.
    step_transfers: (u64, TransferCounts),
}

/// A batch ready for a training step.
struct Prepared {
    batch: dataset::loader::Batch,
    /// The augmentation of each sample.
    variants: Vec<Variant>,
    /// The model input, when made ahead (without the feature cache).
    input: Option<Tensor<4>>,
    /// The batch's labels, on the training device.
    labels: Tensor<1, Int>,
}

/// Loss and accuracy summed on the device, so that a step never waits to read them back;
/// read once per epoch (and every [`METRICS_READ_STEPS`] steps for the metrics).
#[derive(Clone)]
struct DeviceTotals {
    /// Sum of per-image losses.
    loss: Tensor<1>,
    /// Correct predictions (as a float: exact to 2^24 per epoch and rank).
    correct: Tensor<1>,
    /// Images.
    count: u64,
}

impl DeviceTotals {
    /// One step's: `loss` is the batch mean of `n` images.
    fn step(loss: &Tensor<1>, logits: &Tensor<2>, labels: &Tensor<1, Int>, n: usize) -> Self {
        let predicted = logits.clone().detach().argmax(1).reshape([-1]);
        Self {
            loss: loss.clone().detach().mul_scalar(n as f32),
            correct: predicted.equal(labels.clone()).float().sum(),
            count: n as u64,
        }
    }

    fn add(self, other: &DeviceTotals) -> Self {
        Self {
            loss: self.loss + other.loss.clone(),
            correct: self.correct + other.correct.clone(),
            count: self.count + other.count,
        }
    }

    /// Read back in one copy.
    fn read(&self, transfers: &Transfers) -> Result<Totals> {
        let both = Tensor::cat(vec![self.loss.clone(), self.correct.clone()], 0);
        let values = transfers.download_f32(both)?;
        let (loss, correct) = match values[..] {
            [loss, correct] => (loss, correct),
            _ => {
                return Err(Error::Transfer(format!(
                    "expected 2 totals, the device gave {}",
                    values.len()
                )));
            }
        };
        Ok(Totals {
            loss_sum: f64::from(loss),
            correct: correct.round() as u64,
            count: self.count,
            confusion: Vec::new(),
        })
    }
}

/// Read the running loss for the metrics every this many steps: a read waits for the device,
/// so not every step, but often enough for a dashboard.
const METRICS_READ_STEPS: u64 = 50;

/// Totals of `totals`, or zero when nothing was summed.
fn read_totals(totals: Option<&DeviceTotals>, transfers: &Transfers) -> Result<Totals> {
    totals.map_or_else(|| Ok(Totals::default()), |t| t.read(transfers))
}

/// A rank's state one step back, for the ring that follows a failure.
struct Undo {
    /// Steps completed in that state.
    completed: u64,
    model: Classifier,
    optimizer: burn::optim::ModuleOptimizer,
}

/// How an epoch ended on this rank.
#[derive(Debug)]
pub enum EpochOutcome {
    /// Every step taken, evaluated.
    Done(EpochResult),
    /// The ring broke; the rank keeps its state for the next ring.
    Broken(v1::RingBroken),
}

/// The report of a ring that broke before this rank trained a step of `work` (while it
/// formed, or while weights or state were shared): how far `trainer`, if any, had got.
pub fn broken_before_steps(work: &EpochWork, trainer: Option<&Trainer>, reason: String) -> v1::RingBroken {
    v1::RingBroken {
        phase: work.phase,
        epoch: work.epoch,
        completed_steps: trainer.and_then(Trainer::completed).unwrap_or(work.first_step),
        reason,
        has_state: trainer.is_some_and(Trainer::has_state),
        ..Default::default()
    }
}

/// The ring links a rank trains over, and how to drive them from a blocking thread.
pub struct RingIo<'a, N: Link, P: Link> {
    /// Ring parameters.
    pub ring: Ring,
    /// Link to the next rank.
    pub next: &'a mut N,
    /// Link from the previous rank.
    pub prev: &'a mut P,
    /// The async runtime the links belong to.
    pub handle: Handle,
    /// Seconds spent in all-reduce, accumulated.
    pub seconds: f64,
    /// Tells the heartbeat when this thread waits in a collective; ends the collective when
    /// the coordinator aborts the ring.
    pub watch: Arc<RingWatch>,
}

impl<N: Link, P: Link> RingIo<'_, N, P> {
    fn all_reduce(&mut self, step: u64, buf: &mut [f32], average: bool) -> Result<()> {
        let started = Instant::now();
        let generation = self.ring.generation;
        let watch = &self.watch;
        watch.enter();
        let result = self.handle.block_on(async {
            tokio::select! {
                biased;
                reason = watch.aborted(generation) => Err(Error::Ring(format!(
                    "the coordinator abandoned ring generation {generation}: {reason}"
                ))),
                done = all_reduce(&self.ring, step, buf, average, self.next, self.prev) => {
                    done.map_err(|e| Error::Ring(e.to_string()))
                }
            }
        });
        watch.leave();
        self.seconds += started.elapsed().as_secs_f64();
        result
    }
}

/// A test hook's `RANK:N` value in environment variable `name`, if set and well formed.
pub(crate) fn rank_hook(name: &str) -> Option<(usize, u64)> {
    let hook = std::env::var(name).ok()?;
    let (rank, n) = hook.split_once(':')?;
    Some((rank.trim().parse().ok()?, n.trim().parse().ok()?))
}

/// Test hook: `EFFNET_TEST_STALL_LOADER=RANK:BATCHES` makes that rank's data loader stop
/// answering, once per process, after it delivered BATCHES batches: the training thread
/// blocks as on a storage read that never returns.
fn stall_loader_once(rank: usize) {
    // Counted whatever the rank: a process that becomes that rank later does not stall.
    static DELIVERED: AtomicU64 = AtomicU64::new(0);
    let delivered = DELIVERED.fetch_add(1, Ordering::Relaxed);
    let Some((stalled_rank, after)) = rank_hook("EFFNET_TEST_STALL_LOADER") else {
        return;
    };
    if stalled_rank == rank && delivered == after {
        tracing::warn!(batches = after, "test hook: the data loader stops answering");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Open the run's dataset.
pub fn open_dataset(config: &RunConfig, handle: &Handle) -> Result<(Arc<Dataset>, Splits)> {
    let store = if config.data == "synthetic" {
        handle.block_on(DataStore::synthetic(
            config.synthetic_train,
            config.synthetic_test,
            config.seed,
        ))
    } else {
        DataStore::open(&crate::data::resolve(&config.data)?)
    }
    .map_err(|e| cluster(format!("dataset {}: {e}", config.data)))?;
    let mut dataset = handle
        .block_on(Dataset::open(store))
        .map_err(|e| cluster(format!("dataset {}: {e}", config.data)))?;
    let scheme = if config.split == "tutorial" {
        SplitScheme::Tutorial
    } else {
        SplitScheme::Official {
            val_fraction: config.val_fraction,
        }
    };
    // Image folders are read sorted by class: slicing that order would make the tutorial's
    // test set one class. CIFAR's files (and the synthetic set) are mixed already.
    let official_train = match (scheme, dataset.files.is_empty()) {
        (SplitScheme::Tutorial, true) => dataset::split::mixed_order(&dataset.train, config.seed),
        _ => dataset.train.clone(),
    };
    let mut splits = split(scheme, &official_train, &dataset.test, config.seed);
    let limits = Limits {
        train: config.limit_train,
        val: config.limit_val,
        test: config.limit_test,
    };
    if limits != Limits::default() {
        let labels = handle
            .block_on(dataset.load_labels())
            .map_err(|e| cluster(format!("dataset {}: {e}", config.data)))?
            .to_vec();
        splits = apply_limits(splits, &labels, limits);
    }
    if splits.train.is_empty() {
        return Err(cluster(format!("dataset {} has no training images", config.data)));
    }
    Ok((Arc::new(dataset), splits))
}

/// Whether a tensor path names a BatchNorm running statistic.
fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// The first 8 bytes of the SHA-256 of names and value bits.
fn hash_tensors(tensors: impl Iterator<Item = (String, RawTensor)>) -> u64 {
    let mut hasher = Sha256::new();
    for (name, tensor) in tensors {
        hasher.update(name.as_bytes());
        for v in tensor.data {
            hasher.update(v.to_bits().to_le_bytes());
        }
    }
    let digest = hasher.finalize();
    u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

/// A checksum of every weight and BatchNorm statistic: equal on all ranks when they agree
/// bit for bit.
pub fn weights_checksum<M: Module>(module: &M) -> u64 {
    hash_tensors(collect_tensors(module).into_iter())
}

/// What a training thread tells the rest of the worker as it goes: the last step and the
/// weight checksums taken since the last heartbeat (for heartbeats), and its metrics (for
/// scrapes).
#[derive(Debug, Default)]
pub struct Beat {
    /// Global steps taken.
    pub step: AtomicU64,
    /// (step, checksum of the trainable weights, ring generation) not yet sent.
    pub checksums: std::sync::Mutex<Vec<(u64, u64, u64)>>,
    /// Step, data, all-reduce and checkpoint metrics.
    pub metrics: WorkerMetrics,
    /// The ring generation the coordinator asked to stop after its current step (workers
    /// are waiting to join); 0 for none.
    pub regroup: AtomicU64,
    /// Bumped when the coordinator is lost: training started under an earlier value stops
    /// at its next step.
    pub session: AtomicU64,
    /// Collective waits, step times and ring aborts (see [`RingWatch`]).
    pub watch: Arc<RingWatch>,
}

impl Beat {
    /// Take the checksums not yet sent.
    pub fn drain(&self) -> Vec<(u64, u64, u64)> {
        self.checksums
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// A checksum of the parameters only. BatchNorm statistics are left out: a BatchNorm that
/// trains has each rank's own statistics until the end of the epoch.
pub fn parameters_checksum<M: Module>(module: &M) -> u64 {
    hash_tensors(
        collect_tensors(module)
            .into_iter()
            .filter(|(name, _)| !is_running_stat(name)),
    )
}

/// Totals of one pass over a split.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    /// Sum of per-image losses.
    pub loss_sum: f64,
    /// Correct top-1 predictions.
    pub correct: u64,
    /// Images seen.
    pub count: u64,
    /// Row-major confusion matrix (rows: actual), when asked for.
    pub confusion: Vec<u64>,
}

impl Trainer {
    /// Open the data and build the model of `config` on `device`; the weights are made equal
    /// on every rank by broadcasting rank 0's through the ring.
    pub fn new<N: Link, P: Link>(
        config: &RunConfig,
        device: Device,
        io: &mut RingIo<'_, N, P>,
    ) -> Result<Self> {
        let (dataset, splits) = open_dataset(config, &io.handle)?;
        // Each backend draws other numbers from the same seed, so the new head (and, with
        // `--weights none`, the whole network) is drawn on the CPU and then moved: a run on a
        // GPU starts from the weights the same run on the CPU starts from.
        let host = match device.is_autodiff() {
            true => Device::flex().autodiff(),
            false => Device::flex(),
        };
        host.seed(config.seed);
        device.seed(config.seed);
        let Ok(weights) = config.weights.parse::<ModelSource>();
        let base = source::load(Some(&config.model), &weights, &host)?;
        let classes: Vec<ClassLabel> = dataset
            .classes
            .iter()
            .map(|c| ClassLabel {
                label: c.clone(),
                wnid: None,
            })
            .collect();
        let head: effnet::model::HeadKind = config.head.parse().map_err(cluster)?;
        let model = base.model.with_head(head, classes.len(), config.dropout, &host);
        // Burn initialises parameters lazily, on the device they are on when first read:
        // read them here, or moving them would move the initialiser, not the values.
        model.visit(&mut Materialize);
        let mut model = model.to_device(&device);
        if let Some(p) = config.stochastic_depth {
            model.backbone.set_stochastic_depth(p);
        }
        let mut loaded = LoadedModel {
            model,
            config: base.config,
            classes,
        };
        loaded.model = broadcast(loaded.model, &loaded.config, io)?;
        Ok(Self {
            config: config.clone(),
            device,
            dataset,
            splits,
            model: Some(loaded),
            phase: None,
            optimizer: None,
            completed: None,
            undo: None,
            cache: None,
            transfers: Transfers::default(),
            step_transfers: (0, TransferCounts::default()),
        })
    }

    /// Continue a run from checkpoint `name` of `store`: model, phase and optimizer state as
    /// they were after the checkpointed epoch. Every rank reads the same verified bytes, so
    /// the replicas start identical without a broadcast.
    pub fn resume(
        config: &RunConfig,
        device: Device,
        handle: &Handle,
        store: &checkpoint::CheckpointStore,
        name: &str,
    ) -> Result<Self> {
        let (manifest, restored) = handle.block_on(crate::resume::restore(store, name, &device, config))?;
        let mut trainer = Self::with_model(config, device, handle, restored.model, &store.describe(name))?;
        trainer.phase = Some(restored.phase);
        trainer.optimizer = Some(restored.optimizer);
        tracing::info!(checkpoint = %store.describe(name), phase = %manifest.phase, epoch = manifest.epoch,
            step = manifest.step, "resumed from checkpoint");
        Ok(trainer)
    }

    /// A trainer that only evaluates `loaded` (one of our model files, or a checkpoint's) on
    /// the splits of `config`: no ring, no optimizer.
    pub fn for_evaluation(
        config: &RunConfig,
        device: Device,
        handle: &Handle,
        loaded: LoadedModel,
    ) -> Result<Self> {
        Self::with_model(config, device, handle, loaded, "the model")
    }

    /// A trainer over `config`'s data around an already trained `loaded` (`source` names it
    /// in errors), with no phase or optimizer state yet.
    fn with_model(
        config: &RunConfig,
        device: Device,
        handle: &Handle,
        loaded: LoadedModel,
        source: &str,
    ) -> Result<Self> {
        let (dataset, splits) = open_dataset(config, handle)?;
        if loaded.classes.len() != dataset.classes.len() {
            return Err(cluster(format!(
                "{source} predicts {} classes, the dataset {} has {}; use a model trained on it",
                loaded.classes.len(),
                config.data,
                dataset.classes.len()
            )));
        }
        Ok(Self {
            config: config.clone(),
            device,
            dataset,
            splits,
            model: Some(loaded),
            phase: None,
            optimizer: None,
            completed: None,
            undo: None,
            cache: None,
            transfers: Transfers::default(),
            step_transfers: (0, TransferCounts::default()),
        })
    }

    /// Loss, accuracy and confusion of the model on the whole test split.
    pub fn evaluate_test(&self) -> Result<Totals> {
        let loaded = self
            .model
            .as_ref()
            .ok_or_else(|| cluster("no model to evaluate"))?;
        self.evaluate(&loaded.model.clone().valid(), &self.splits.test, true)
    }

    /// The dataset's class names, in label order.
    pub fn class_names(&self) -> &[String] {
        &self.dataset.classes
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.dataset.classes.len()
    }

    /// The splits in use.
    pub fn splits(&self) -> &Splits {
        &self.splits
    }

    /// Every host-device copy this trainer has made so far.
    pub fn transfers(&self) -> TransferCounts {
        self.transfers.snapshot()
    }

    /// The training steps of the last epoch, and the host-device copies they made (what the
    /// feature cache and the periodic checksums read included; the epoch's evaluation not).
    pub fn step_transfers(&self) -> (u64, TransferCounts) {
        self.step_transfers
    }

    /// Train the epoch of `work` (from its step on), then evaluate this rank's validation
    /// (and, when asked, test) shard. `beat` gets the step after every optimizer step and a
    /// checksum every `checksum_every` steps, for heartbeats.
    ///
    /// When the ring breaks (a peer died, or a later ring fenced this one off) the epoch
    /// stops without error: the model and optimizer stay in memory as they were after the
    /// last completed step, with the state one step before that kept, so that the next ring
    /// can start from a step every survivor has (see [`EpochOutcome::Broken`]).
    pub fn epoch<N: Link, P: Link>(
        &mut self,
        work: &EpochWork,
        io: &mut RingIo<'_, N, P>,
        beat: &Beat,
    ) -> Result<EpochOutcome> {
        let started = Instant::now();
        io.seconds = 0.0;
        let phase = match v1::Phase::try_from(work.phase) {
            Ok(v1::Phase::Head) => Phase::Head,
            Ok(v1::Phase::Finetune) => Phase::FineTune,
            _ => return Err(cluster(format!("unknown phase {} in the assignment", work.phase))),
        }
        .in_run(self.config.from_scratch());
        self.roll_back_to(work.first_step)?;
        let mut loaded = self
            .model
            .take()
            .ok_or_else(|| cluster("the model was lost by an earlier error"))?;
        if self.phase != Some(phase) {
            loaded.model = phase::prepare(loaded.model, phase);
            self.optimizer = Some(optim::adam(&self.config).init());
            self.phase = Some(phase);
        }
        // Features are valid only while the backbone is frozen.
        let cached = phase.backbone_frozen() && self.config.feature_cache;
        if !cached {
            self.cache = None;
        } else if self.cache.is_none() {
            self.cache = Some(FeatureCache::new(self.cache_budget()));
        }
        let mut cache = self.cache.take();
        let stats_before = cache.as_ref().map(FeatureCache::stats).unwrap_or_default();
        // What the metrics have been told of the cache's counters so far.
        let mut cache_seen = stats_before;
        let inner = self.device.clone().inner();
        // Phase 1 runs the frozen backbone in inference mode on the plain device, outside the
        // autodiff graph that only the head needs (phase 1 never changes the backbone, so one
        // copy serves the epoch); it computes the cache's misses, or every batch without one.
        let frozen = phase.backbone_frozen().then(|| loaded.model.valid());
        // Where a batch's input tensor is made: the frozen backbone's device in phase 1.
        let input_device = if phase.backbone_frozen() {
            inner.clone()
        } else {
            self.device.clone()
        };
        // Epochs count across phases, so shuffles and augmentations never repeat.
        let global_epoch = match phase {
            Phase::Head | Phase::Scratch => u64::from(work.epoch),
            Phase::FineTune => u64::from(self.config.head_epochs) + u64::from(work.epoch),
        };
        // Dropout and stochastic depth draw from the backend's generator: seeding it per
        // epoch and rank makes an epoch's randomness independent of what ran before, so a run
        // resumed from a checkpoint takes exactly the steps an uninterrupted one would. (A
        // ring re-formed mid-epoch draws afresh from where it starts.)
        self.device
            .seed(epoch_seed(self.config.seed, global_epoch, io.ring.rank).wrapping_add(work.consumed));
        let sampler = SamplerConfig {
            len: self.splits.train.len(),
            seed: self.config.seed,
            shuffle: true,
            drop_last: false,
        };
        let state = SamplerState {
            epoch: global_epoch,
            consumed: work.consumed as usize,
        };
        let global_batch = match work.global_batch {
            0 => self.config.batch_size as usize * io.ring.world,
            n => n as usize,
        };
        let steps_plan = if cached && io.ring.world > 1 {
            self.steps_by_home(&sampler, state, global_batch, io.ring.world, io.ring.rank)
        } else {
            sampler.global_steps(state, global_batch, io.ring.world, io.ring.rank)
        };
        let weights: Vec<(usize, usize)> = steps_plan
            .iter()
            .map(|s| (s.indices.len(), s.step_total))
            .collect();
        let batch_list: Vec<Vec<usize>> = steps_plan
            .into_iter()
            .map(|s| s.indices.into_iter().map(|i| self.splits.train[i]).collect())
            .collect();
        let augment = Augment::of_run(&self.config);
        let pool = match phase {
            Phase::Head => self.config.head_variants,
            Phase::FineTune | Phase::Scratch => 8,
        };
        // Optimizer steps of this phase before this epoch's next one (the learning rate of a
        // decaying phase depends on it): whole epochs, then what earlier rings consumed.
        let phase_iterations = u64::from(work.epoch) * self.splits.train.len().div_ceil(global_batch) as u64
            + work.consumed / global_batch as u64;
        let loss_fn = CrossEntropyLossConfig::new().init(&self.device);
        let optimizer = self
            .optimizer
            .as_mut()
            .ok_or_else(|| cluster("no optimizer for this phase"))?;
        let mut model = loaded.model;
        // This epoch's loss and accuracy, and the last step's (a broken ring takes it back).
        let mut train: Option<DeviceTotals> = None;
        let mut last: Option<DeviceTotals> = None;
        let mut steps = 0u64;
        let transfers_before = self.transfers.snapshot();
        let mut broken: Option<String> = None;
        let mut prefetch = Prefetcher::spawn(self.dataset.clone(), batch_list, PREFETCH)
            .map_err(|e| cluster(format!("data loader: {e}")))?;
        let metrics = &beat.metrics;
        metrics.phase.set(i64::from(phase.number()));
        let session = beat.session.load(Ordering::Relaxed);
        let size = self.config.image_size as usize;
        let (config, device, transfers) = (&self.config, &input_device, &self.transfers);
        let train_device = &self.device;
        // The next batch with its variants and, without the cache, its input tensor. Run on
        // a second thread while the gradients are all-reduced, so that a step does not wait
        // for loading and preprocessing after the network.
        let rank = io.ring.rank;
        beat.watch.new_epoch();
        let prepare = |prefetch: &mut Prefetcher| -> Option<Result<Prepared>> {
            stall_loader_once(rank);
            let batch = prefetch.next()?;
            Some(
                batch
                    .map_err(|e| cluster(format!("dataset {}: {e}", config.data)))
                    .map(|batch| {
                        let variants: Vec<Variant> = batch
                            .indices
                            .iter()
                            .map(|&i| Variant::draw_pooled(augment, pool, config.seed, global_epoch, i))
                            .collect();
                        let input =
                            (!cached).then(|| to_input(transfers, &batch.samples, size, &variants, device));
                        let labels = labels(transfers, &batch.samples, train_device);
                        Prepared {
                            batch,
                            variants,
                            input,
                            labels,
                        }
                    }),
            )
        };
        // Prepared during the last step's all-reduce, and how long the step then waited for it.
        let mut ahead: Option<(Option<Result<Prepared>>, f64)> = None;
        loop {
            if beat.session.load(Ordering::Relaxed) != session {
                broken = Some("the coordinator was lost".into());
                break;
            }
            let (next, waited) = match ahead.take() {
                Some(ready) => ready,
                None => {
                    let waiting = Instant::now();
                    let next = prepare(&mut prefetch);
                    (next, waiting.elapsed().as_secs_f64())
                }
            };
            let Some(next) = next else { break };
            let step_started = Instant::now();
            metrics.data_wait_seconds.observe(waited);
            let Prepared {
                batch,
                variants,
                input,
                labels,
            } = next?;
            let make_input = || to_input(transfers, &batch.samples, size, &variants, device);
            let logits = match (cache.as_mut(), &frozen) {
                (Some(cache), Some(frozen)) => {
                    let features =
                        cached_head_input(transfers, cache, frozen, &batch, &variants, size, &inner)?;
                    model.head.forward(Tensor::from_inner(features))
                }
                (None, Some(frozen)) => {
                    let x = input.unwrap_or_else(make_input);
                    model.head.forward(Tensor::from_inner(frozen.head_input(x)))
                }
                _ => model.forward(input.unwrap_or_else(make_input)),
            };
            let loss = loss_fn.forward(logits.clone(), labels.clone());
            // Phase 1 trains the head alone, so its gradients, the all-reduce buffer and the
            // update are taken over the head: the same values (the frozen backbone has no
            // gradients), without Burn walking the backbone's 200-odd frozen tensors twice a
            // step, which was half of a cached head step on LibTorch.
            let head_only = frozen.is_some();
            let grads = match head_only {
                true => GradientsParams::from_grads(loss.backward(), &model.head),
                false => GradientsParams::from_grads(loss.backward(), &model),
            };
            // One copy to the host for all the gradients; it also waits for the backward pass.
            let mut flat = match head_only {
                true => flatten(&model.head, &grads, transfers)?,
                false => flatten(&model, &grads, transfers)?,
            };
            let (share, total) = weights[steps as usize];
            if share * io.ring.world != total {
                // Unequal shares (a ring that does not divide the global batch): weigh each
                // rank's mean gradient by its share, so the average is the global batch's mean.
                let scale = (share * io.ring.world) as f32 / total as f32;
                flat.iter_mut().for_each(|v| *v *= scale);
            }
            let global_step = work.first_step + steps;
            // One more value rides on the gradients: whether any rank was asked to stop for a
            // regroup. Every rank sees the same sum, so all stop after the same step.
            let asked = beat.regroup.load(Ordering::Relaxed) == io.ring.generation;
            flat.push(if asked { 1.0 } else { 0.0 });
            let reducing = io.seconds;
            let (reduced, prepared) = std::thread::scope(|scope| {
                let preparing = scope.spawn(|| prepare(&mut prefetch));
                let reduced = io.all_reduce(global_step, &mut flat, true);
                let waiting = Instant::now();
                let prepared = preparing
                    .join()
                    .unwrap_or_else(|_| Some(Err(cluster("preparing the next batch panicked"))));
                (reduced, (prepared, waiting.elapsed().as_secs_f64()))
            });
            ahead = Some(prepared);
            if let Err(e) = reduced {
                broken = Some(format!("step {global_step}: {e}"));
                break;
            }
            let regroup = flat.pop().is_some_and(|v| v > 0.0);
            metrics.allreduce_seconds.observe(io.seconds - reducing);
            metrics
                .allreduce_bytes
                .inc_by(collective::bytes_sent(&io.ring, flat.len()));
            let grads = match head_only {
                true => unflatten(&model.head, &grads, &flat, transfers),
                false => unflatten(&model, &grads, &flat, transfers),
            };
            // Burn's tensors share storage, so keeping the previous step copies nothing here;
            // its cost is that the update below writes new buffers instead of updating the
            // weights and moments in place (memory for one more copy of them).
            self.undo = Some(Undo {
                completed: global_step,
                model: model.clone(),
                optimizer: optimizer.clone(),
            });
            let lr = optim::learning_rate(config, phase, phase_iterations + steps);
            model = match head_only {
                true => {
                    let mut model = model;
                    model.head = optimizer.step(lr, model.head, grads);
                    model
                }
                false => optimizer.step(lr, model, grads),
            };
            steps += 1;
            self.completed = Some(global_step + 1);
            beat.step.store(global_step + 1, Ordering::Relaxed);
            let every = u64::from(self.config.checksum_every);
            if every > 0 && (global_step + 1).is_multiple_of(every) {
                let checksum = parameters_checksum(&model);
                if let Ok(mut pending) = beat.checksums.lock() {
                    pending.push((global_step + 1, checksum, io.ring.generation));
                }
            }
            let n = batch.samples.len();
            let this = DeviceTotals::step(&loss, &logits, &labels, n);
            train = Some(match train.take() {
                Some(sum) => sum.add(&this),
                None => this.clone(),
            });
            if steps.is_multiple_of(METRICS_READ_STEPS) {
                let now = this.read(transfers)?;
                metrics.train_loss.set(now.loss_sum / now.count.max(1) as f64);
            }
            last = Some(this);
            // The gradient copy above waited for the device, so this is the step's real time
            // (the update's kernels are queued, and overlap the next step's input).
            metrics.step_seconds.observe(step_started.elapsed().as_secs_f64());
            beat.watch.record_step(step_started.elapsed().as_secs_f64());
            metrics.steps.inc();
            metrics.train_images.inc_by(n as u64);
            if let Some(cache) = &cache {
                cache_seen = report_cache(metrics, cache.stats(), cache_seen);
            }
            let images = train.as_ref().map_or(0, |t| t.count);
            metrics
                .images_per_second
                .set(images as f64 / started.elapsed().as_secs_f64().max(1e-9));
            if regroup {
                broken = Some(format!("stopped after step {global_step} to admit new workers"));
                break;
            }
        }
        // A BatchNorm that trains (the tutorial head's, in phase 1) has seen only this rank's
        // batches: take rank 0's statistics, as PyTorch DDP broadcasts its buffers.
        let stats = match broken {
            Some(_) => None,
            None => match running_stats_from_rank0(&model, io, u64::MAX - 1 - global_epoch) {
                Ok(stats) => Some(stats),
                Err(e) => {
                    broken = Some(format!("sharing BatchNorm statistics: {e}"));
                    None
                }
            },
        };
        let train_seconds = started.elapsed().as_secs_f64();
        self.step_transfers = (steps, self.transfers.snapshot() - transfers_before);
        let (train, last) = (
            read_totals(train.as_ref(), &self.transfers)?,
            read_totals(last.as_ref(), &self.transfers)?,
        );
        if train.count > 0 {
            metrics.train_loss.set(train.loss_sum / train.count as f64);
        }
        if let Some(reason) = broken {
            drop(prefetch);
            self.cache = cache;
            loaded.model = model;
            self.model = Some(loaded);
            let completed = self.completed.unwrap_or(work.first_step);
            tracing::warn!(generation = io.ring.generation, completed_steps = completed, reason = %reason,
                "the ring broke; keeping this rank's state for the next ring");
            return Ok(EpochOutcome::Broken(v1::RingBroken {
                phase: work.phase,
                epoch: work.epoch,
                completed_steps: completed,
                train_loss_sum: train.loss_sum,
                train_correct: train.correct,
                train_count: train.count,
                last_loss_sum: last.loss_sum,
                last_correct: last.correct,
                last_count: last.count,
                reason,
                has_state: true,
            }));
        }
        let model = match stats {
            Some(stats) => write_running_stats(model, stats, &self.transfers)?,
            None => model,
        };
        let rank_slice = |items: &[usize]| -> Vec<usize> {
            items
                .iter()
                .skip(io.ring.rank)
                .step_by(io.ring.world)
                .copied()
                .collect()
        };
        let evaluating = Instant::now();
        let eval_model = model.valid();
        let val = self.evaluate_with(&eval_model, &rank_slice(&self.splits.val), false, cache.as_mut())?;
        let cache_stats = cache.as_ref().map(FeatureCache::stats).unwrap_or_default();
        if cache.is_some() {
            report_cache(metrics, cache_stats, cache_seen);
        }
        self.cache = cache;
        let test = if work.test {
            self.evaluate(&eval_model, &rank_slice(&self.splits.test), true)?
        } else {
            Totals::default()
        };
        metrics.eval_seconds.inc_by(evaluating.elapsed().as_secs_f64());
        loaded.model = model;
        let checksum = weights_checksum(&loaded.model.valid());
        self.model = Some(loaded);
        Ok(EpochOutcome::Done(EpochResult {
            phase: work.phase,
            epoch: work.epoch,
            steps,
            train_loss_sum: train.loss_sum,
            train_correct: train.correct,
            train_count: train.count,
            val_loss_sum: val.loss_sum,
            val_correct: val.correct,
            val_count: val.count,
            test_loss_sum: test.loss_sum,
            test_correct: test.correct,
            test_count: test.count,
            test_confusion: test.confusion,
            seconds: started.elapsed().as_secs_f64(),
            allreduce_seconds: io.seconds,
            weights_checksum: checksum,
            train_seconds,
            feature_cache_hits: cache_stats.hits - stats_before.hits,
            feature_cache_misses: cache_stats.misses - stats_before.misses,
            prediction_grid_png: Vec::new(),
            classes: if work.test {
                self.dataset.classes.clone()
            } else {
                Vec::new()
            },
        }))
    }

    /// A trainer over `config`'s data that has no model yet: it takes the run's state from
    /// rank 0 of its first ring ([`sync_from_rank0`](Self::sync_from_rank0)).
    pub fn awaiting_state(config: &RunConfig, device: Device, handle: &Handle) -> Result<Self> {
        let (dataset, splits) = open_dataset(config, handle)?;
        Ok(Self {
            config: config.clone(),
            device,
            dataset,
            splits,
            model: None,
            phase: None,
            optimizer: None,
            completed: None,
            undo: None,
            cache: None,
            transfers: Transfers::default(),
            step_transfers: (0, TransferCounts::default()),
        })
    }

    /// Global steps this trainer has completed, once it has trained or taken state.
    pub fn completed(&self) -> Option<u64> {
        self.completed
    }

    /// Whether this trainer holds the run's model and optimizer state.
    pub fn has_state(&self) -> bool {
        self.model.is_some() && self.optimizer.is_some() && self.phase.is_some()
    }

    /// Make every rank's model, phase and optimizer state rank 0's, as they are after
    /// `first_step` steps (a ring that admitted new workers). Rank 0 sends them through the
    /// ring as its checkpoint would store them; the others rebuild from those bytes.
    pub fn sync_from_rank0<N: Link, P: Link>(
        &mut self,
        io: &mut RingIo<'_, N, P>,
        first_step: u64,
    ) -> Result<()> {
        if io.ring.rank == 0 {
            self.roll_back_to(first_step)?;
        }
        let packed = if io.ring.rank == 0 {
            let (Some(model), Some(optimizer), Some(phase)) = (&self.model, &self.optimizer, self.phase)
            else {
                return Err(cluster("rank 0 has no training state to send to the new workers"));
            };
            Some(Parts::of(model, optimizer, std::path::Path::new("<state for new workers>"))?.pack(phase))
        } else {
            None
        };
        let started = Instant::now();
        let tag = (1 << 63) | (first_step << 1);
        let bytes = bytes_from_rank0(io, tag, packed)?;
        if io.ring.rank != 0 {
            let (phase, parts) = Parts::unpack(&bytes)?;
            let restored = crate::resume::from_parts(&parts, phase, &self.device, &self.config, &|part| {
                format!("<{part} from rank 0>")
            })?;
            if restored.model.classes.len() != self.dataset.classes.len() {
                return Err(cluster(format!(
                    "rank 0's model predicts {} classes, this worker's dataset has {}",
                    restored.model.classes.len(),
                    self.dataset.classes.len()
                )));
            }
            self.model = Some(restored.model);
            self.phase = Some(restored.phase);
            self.optimizer = Some(restored.optimizer);
        }
        self.completed = Some(first_step);
        self.undo = None;
        tracing::info!(
            bytes = bytes.len(),
            seconds = started.elapsed().as_secs_f64(),
            step = first_step,
            "training state shared from rank 0"
        );
        Ok(())
    }

    /// Make this rank's state the one after `first_step` steps: nothing to do when it is
    /// there; one step back when it completed a step the next ring redoes (other survivors
    /// never finished it).
    fn roll_back_to(&mut self, first_step: u64) -> Result<()> {
        let Some(completed) = self.completed else {
            return Ok(());
        };
        if completed == first_step {
            return Ok(());
        }
        match self.undo.take() {
            Some(undo) if undo.completed == first_step && completed == first_step + 1 => {
                let loaded = self
                    .model
                    .as_mut()
                    .ok_or_else(|| cluster("the model was lost by an earlier error"))?;
                loaded.model = undo.model;
                self.optimizer = Some(undo.optimizer);
                self.completed = Some(first_step);
                tracing::info!(step = first_step, "rolled back one step to rejoin the ring");
                Ok(())
            }
            _ => Err(cluster(format!(
                "the ring restarts at step {first_step}, but this worker completed {completed} steps \
                 and can only go back one"
            ))),
        }
    }

    /// Loss and accuracy of `model` (inference mode) on `items`.
    pub fn evaluate(&self, model: &Classifier, items: &[usize], confusion: bool) -> Result<Totals> {
        self.evaluate_with(model, items, confusion, None)
    }

    /// Where this worker's feature cache may keep entries.
    fn cache_budget(&self) -> CacheBudget {
        let mib = 1 << 20;
        CacheBudget {
            memory_bytes: self.config.feature_cache_memory_mb.saturating_mul(mib),
            disk_bytes: self.config.feature_cache_disk_mb.saturating_mul(mib),
            dir: if self.config.feature_cache_dir.is_empty() {
                std::env::temp_dir()
            } else {
                std::path::PathBuf::from(&self.config.feature_cache_dir)
            },
        }
    }

    /// This rank's shares of the epoch's steps with each global batch dealt by home rank
    /// (see [`deal_by_home`]): the same global batches, but an image lands on the same rank
    /// epoch after epoch, so that rank's cached features serve it.
    fn steps_by_home(
        &self,
        sampler: &SamplerConfig,
        state: SamplerState,
        global_batch: usize,
        world: usize,
        rank: usize,
    ) -> Vec<StepShare> {
        let all: Vec<Vec<StepShare>> = (0..world)
            .map(|r| sampler.global_steps(state, global_batch, world, r))
            .collect();
        let train = &self.splits.train;
        (0..all[rank].len())
            .map(|step| {
                let shares: Vec<Vec<usize>> = all.iter().map(|a| a[step].indices.clone()).collect();
                let mut dealt = deal_by_home(&shares, |i| home_rank(train[i], world));
                StepShare {
                    indices: std::mem::take(&mut dealt[rank]),
                    step_total: all[rank][step].step_total,
                }
            })
            .collect()
    }

    /// [`evaluate`](Self::evaluate), taking the backbone's outputs from `cache` when given
    /// (phase 1: `model` has the frozen backbone the cache was filled with).
    fn evaluate_with(
        &self,
        model: &Classifier,
        items: &[usize],
        confusion: bool,
        mut cache: Option<&mut FeatureCache>,
    ) -> Result<Totals> {
        let classes = self.classes();
        let mut totals = Totals {
            confusion: if confusion {
                vec![0; classes * classes]
            } else {
                Vec::new()
            },
            ..Totals::default()
        };
        if items.is_empty() {
            return Ok(totals);
        }
        let device = self.device.clone().inner();
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        let prefetch = Prefetcher::spawn(
            self.dataset.clone(),
            batches(items, self.config.batch_size as usize),
            PREFETCH,
        )
        .map_err(|e| cluster(format!("data loader: {e}")))?;
        for batch in prefetch {
            let batch = batch.map_err(|e| cluster(format!("dataset {}: {e}", self.config.data)))?;
            let size = self.config.image_size as usize;
            let transfers = &self.transfers;
            let labels = labels(transfers, &batch.samples, &device);
            let logits = match cache.as_deref_mut() {
                Some(cache) => model.head.forward(cached_head_input(
                    transfers,
                    cache,
                    model,
                    &batch,
                    &[],
                    size,
                    &device,
                )?),
                None => model.forward(to_input(transfers, &batch.samples, size, &[], &device)),
            };
            let n = batch.samples.len() as u64;
            // The batch's mean loss and its predictions come back in one copy.
            let loss = loss_fn.forward(logits.clone(), labels);
            let both = Tensor::cat(vec![loss, logits.argmax(1).reshape([-1]).float()], 0);
            let values = transfers.download_f32(both)?;
            let (loss, predicted) = values
                .split_first()
                .ok_or_else(|| Error::Transfer("the device returned no loss".into()))?;
            totals.loss_sum += f64::from(*loss) * n as f64;
            let predicted: Vec<i64> = predicted.iter().map(|&p| p as i64).collect();
            for (sample, p) in batch.samples.iter().zip(predicted) {
                let actual = usize::from(sample.label);
                let p = p as usize;
                totals.correct += u64::from(actual == p);
                if confusion && actual < classes && p < classes {
                    totals.confusion[actual * classes + p] += 1;
                }
            }
            totals.count += n;
        }
        Ok(totals)
    }

    /// Predict the first 25 test images with the current model and draw them in a 5 x 5 grid,
    /// titled with the actual and predicted classes, into `path` (PNG).
    pub fn prediction_grid(&self) -> Result<Option<Vec<u8>>> {
        let loaded = self.model.as_ref().ok_or_else(|| cluster("no model"))?;
        let items: Vec<usize> = self.splits.test.iter().take(25).copied().collect();
        if items.is_empty() {
            return Ok(None);
        }
        let handle = Handle::current();
        let samples = handle
            .block_on(self.dataset.read(&items))
            .map_err(|e| cluster(format!("dataset {}: {e}", self.config.data)))?;
        let device = self.device.clone().inner();
        let model = loaded.model.valid();
        let x = to_input(
            &self.transfers,
            &samples,
            self.config.image_size as usize,
            &[],
            &device,
        );
        let predicted = self
            .transfers
            .download(model.forward(x).argmax(1))?
            .convert::<i64>()
            .try_to_vec::<i64>()
            .map_err(|e| Error::Transfer(format!("predicted classes: {e:?}")))?;
        let name = |i: usize| {
            self.dataset
                .classes
                .get(i)
                .cloned()
                .unwrap_or_else(|| i.to_string())
        };
        let predictions: Vec<plots::Prediction> = samples
            .into_iter()
            .zip(predicted)
            .map(|(s, p)| plots::Prediction {
                actual: name(usize::from(s.label)),
                predicted: name(p as usize),
                width: s.width as u32,
                height: s.height as u32,
                rgb: s.rgb,
            })
            .collect();
        plots::prediction_grid_png(&predictions)
            .map(Some)
            .map_err(|e| cluster(e.to_string()))
    }

    /// What rank 0 uploads in a checkpoint: the model and the current phase's optimizer.
    pub fn checkpoint_parts(&self) -> Result<(&LoadedModel, &burn::optim::ModuleOptimizer)> {
        let model = self
            .model
            .as_ref()
            .ok_or_else(|| cluster("no model to checkpoint"))?;
        let optimizer = self
            .optimizer
            .as_ref()
            .ok_or_else(|| cluster("no optimizer state to checkpoint (no epoch ran yet)"))?;
        Ok((model, optimizer))
    }
}

/// Replace the values of `tensors` with rank 0's: the others contribute zeros to a sum, which
/// is exact in floating point. `step` tags the collective.
fn from_rank0<N: Link, P: Link>(
    tensors: &mut [(String, RawTensor)],
    io: &mut RingIo<'_, N, P>,
    step: u64,
) -> Result<()> {
    let mut flat: Vec<f32> = if io.ring.rank == 0 {
        tensors.iter().flat_map(|(_, t)| t.data.iter().copied()).collect()
    } else {
        vec![0.0; tensors.iter().map(|(_, t)| t.data.len()).sum()]
    };
    // Rank 0's values arrive as they are, never rounded to bf16.
    let bf16 = std::mem::replace(&mut io.ring.bf16, false);
    let reduced = io.all_reduce(step, &mut flat, false);
    io.ring.bf16 = bf16;
    reduced?;
    let mut offset = 0;
    for (_, tensor) in tensors {
        let len = tensor.data.len();
        tensor.data.copy_from_slice(&flat[offset..offset + len]);
        offset += len;
    }
    Ok(())
}

/// Rank 0's `bytes` on every rank, through the ring: a length, then the bytes two to a
/// float (whole numbers below 2^16 survive the sum with the other ranks' zeros exactly).
fn bytes_from_rank0<N: Link, P: Link>(
    io: &mut RingIo<'_, N, P>,
    tag: u64,
    bytes: Option<Vec<u8>>,
) -> Result<Vec<u8>> {
    // bf16 on the wire would round the values; these must arrive exactly.
    let bf16 = std::mem::replace(&mut io.ring.bf16, false);
    let result = (|| {
        let len = bytes.as_ref().map_or(0, Vec::len) as u64;
        let mut header: Vec<f32> = (0..4).map(|i| ((len >> (16 * i)) & 0xffff) as f32).collect();
        io.all_reduce(tag, &mut header, false)?;
        let len = header
            .iter()
            .enumerate()
            .map(|(i, v)| (*v as u64) << (16 * i))
            .sum::<u64>() as usize;
        let mut values: Vec<f32> = match &bytes {
            Some(b) => b
                .chunks(2)
                .map(|c| f32::from(u16::from_le_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
                .collect(),
            None => vec![0.0; len.div_ceil(2)],
        };
        io.all_reduce(tag + 1, &mut values, false)?;
        let mut out = Vec::with_capacity(len + 1);
        for v in values {
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        out.truncate(len);
        Ok(out)
    })();
    io.ring.bf16 = bf16;
    result
}

/// Make every rank's weights equal to rank 0's.
fn broadcast<N: Link, P: Link>(
    model: Classifier,
    config: &effnet::config::EfficientNetConfig,
    io: &mut RingIo<'_, N, P>,
) -> Result<Classifier> {
    if io.ring.world == 1 {
        return Ok(model);
    }
    let mut tensors = collect_tensors(&model);
    // Step numbers below 2^63 belong to training; the broadcasts use the top of the range.
    from_rank0(&mut tensors, io, u64::MAX)?;
    let file = WeightsFile {
        tensors: tensors.into_iter().collect(),
        ..WeightsFile::default()
    };
    let (model, _) = apply_weights(
        model,
        config,
        &file,
        std::path::Path::new("<weights broadcast from rank 0>"),
    )?;
    Ok(model)
}

/// Rank 0's BatchNorm running statistics (empty on a ring of one).
fn running_stats_from_rank0<N: Link, P: Link>(
    model: &Classifier,
    io: &mut RingIo<'_, N, P>,
    step: u64,
) -> Result<Vec<(String, RawTensor)>> {
    if io.ring.world == 1 {
        return Ok(Vec::new());
    }
    // `valid()` applies the statistics updates buffered during the epoch.
    let mut stats: Vec<(String, RawTensor)> = collect_tensors(&model.valid())
        .into_iter()
        .filter(|(n, _)| is_running_stat(n))
        .collect();
    from_rank0(&mut stats, io, step)?;
    Ok(stats)
}

/// Set the BatchNorm running statistics of `model` to `stats`.
fn write_running_stats(
    model: Classifier,
    stats: Vec<(String, RawTensor)>,
    transfers: &Transfers,
) -> Result<Classifier> {
    if stats.is_empty() {
        return Ok(model);
    }
    let mut writer = StatsWriter {
        values: stats.into_iter().collect(),
        path: ModulePath::default(),
        transfers,
    };
    let model = model.map(&mut writer);
    if !writer.values.is_empty() {
        return Err(cluster(format!(
            "{} BatchNorm statistics were not found in the model to update",
            writer.values.len()
        )));
    }
    Ok(model)
}

/// Reads every parameter, which initialises those still lazy on the device they are on.
struct Materialize;

impl burn::module::ModuleVisitor for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        let _ = param.val();
    }
}

/// Writes the given running statistics into a module by path, leaving everything else.
/// (Not `apply_weights`: that replaces every tensor and is meant for fresh models.)
struct StatsWriter<'a> {
    values: std::collections::HashMap<String, RawTensor>,
    path: ModulePath,
    transfers: &'a Transfers,
}

impl burn::module::ModuleMapper for StatsWriter<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.path.exit(container_type);
    }

    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<D>>,
    ) -> burn::module::Param<Tensor<D>> {
        let Some(raw) = self.values.remove(&self.path.joined()) else {
            return param;
        };
        let device = param.lazy_device();
        let tensor: Tensor<D> = self
            .transfers
            .upload(TensorData::new(raw.data, raw.shape), &device);
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// The head's input for `batch` from `cache`, pairs not held computed by `frozen` (phase 1's
/// backbone in inference mode, on `device`). `variants` has one per sample, or is empty for
/// none (evaluation).
fn cached_head_input(
    transfers: &Transfers,
    cache: &mut FeatureCache,
    frozen: &Classifier,
    batch: &dataset::loader::Batch,
    variants: &[Variant],
    size: usize,
    device: &Device,
) -> Result<Tensor<4>> {
    let keys: Vec<(usize, u8)> = batch
        .indices
        .iter()
        .enumerate()
        .map(|(p, &i)| (i, variants.get(p).map_or(0, |v| v.id())))
        .collect();
    cache.features(transfers, &keys, device, |missing| {
        let samples: Vec<Sample> = missing.iter().map(|&p| batch.samples[p].clone()).collect();
        let variants: Vec<Variant> = missing.iter().filter_map(|&p| variants.get(p).copied()).collect();
        Ok(frozen.head_input(to_input(transfers, &samples, size, &variants, device)))
    })
}

/// Tell `metrics` what the feature cache did since `seen`; returns `now` as the new mark.
fn report_cache(metrics: &WorkerMetrics, now: CacheStats, seen: CacheStats) -> CacheStats {
    metrics.cache_hits.inc_by(now.hits - seen.hits);
    metrics.cache_misses.inc_by(now.misses - seen.misses);
    metrics.cache_memory_bytes.set(now.memory_bytes as i64);
    metrics.cache_disk_bytes.set(now.disk_bytes as i64);
    now
}

/// The backend seed of one rank's epoch: distinct per (run seed, epoch, rank).
fn epoch_seed(seed: u64, global_epoch: u64, rank: usize) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(global_epoch.to_le_bytes());
    h.update((rank as u64).to_le_bytes());
    let digest = h.finalize();
    u64::from_le_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ])
}

fn labels(transfers: &Transfers, samples: &[Sample], device: &Device) -> Tensor<1, Int> {
    let data: Vec<i64> = samples.iter().map(|s| i64::from(s.label)).collect();
    transfers.upload(TensorData::new(data, [samples.len()]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_reach_every_rank_exactly_even_with_bf16_on_the_wire() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Odd length, every byte value, and patterns that are not valid floats.
        let payload: Vec<u8> = (0..100_001u32).map(|i| (i * 7 % 256) as u8).collect();
        let threads: Vec<_> = collective::local::ring(3, 4)
            .into_iter()
            .enumerate()
            .map(|(rank, (mut next, mut prev))| {
                let handle = runtime.handle().clone();
                let payload = payload.clone();
                std::thread::spawn(move || {
                    let mut io = RingIo {
                        ring: Ring {
                            bf16: true,
                            ..Ring::new(3, rank, 1)
                        },
                        next: &mut next,
                        prev: &mut prev,
                        handle,
                        seconds: 0.0,
                        watch: Default::default(),
                    };
                    let sent = (rank == 0).then_some(payload);
                    let got = bytes_from_rank0(&mut io, 1 << 63, sent).unwrap();
                    (got, io.ring.bf16)
                })
            })
            .collect();
        for t in threads {
            let (got, bf16) = t.join().unwrap();
            assert_eq!(got, payload);
            assert!(bf16, "the ring's bf16 setting is restored");
        }
    }
}

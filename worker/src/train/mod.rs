//! One worker's share of a distributed run: data, model and optimizer state kept between
//! the coordinator's work units, and one epoch of either phase in lockstep with the other
//! ranks (gradients averaged over the ring every step).
//!
//! Every rank derives the same splits and the same sampler permutation from the run's seed,
//! takes its strided shard, and starts from rank 0's weights (broadcast through the ring),
//! so after every step all ranks hold bit-identical weights; the epoch report carries a
//! checksum of them for the coordinator to compare.
//!
//! | Where | What |
//! |---|---|
//! | here | the [`Trainer`]: building it, taking state from rank 0, rolling back a step |
//! | `epoch.rs` | one epoch, planned, stepped and reported: where a training step happens |
//! | `step.rs` | a step's parts: the batch made ready, the local pass, the gradient buffer |
//! | `trainable.rs` | what a step updates: the head alone, or the whole model |
//! | `evaluate.rs` | loss, accuracy, confusion over a split; the prediction grid |
//! | `ring.rs` | the all-reduce of each step and rank 0's broadcasts, from this blocking thread |
//! | `stats.rs` | writing BatchNorm running statistics into a model |
//! | `checksum.rs` | the weight checksums ranks report |
//! | `unit.rs` | one work unit on the training thread: the trainer had or made, then the epoch |

// Host-device copies go through `self.transfers`, which counts them (transfer_tests.rs).
#![deny(clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use cluster_proto::v1::{self, EpochResult, EpochWork};
use collective::{Link, Ring, Seq, all_reduce};
use dataset::loader::{Prefetcher, batches};
use dataset::sampler::{SamplerConfig, SamplerState, StepShare, deal_by_home, home_rank};
use dataset::source::{Dataset, Sample};
use dataset::split::Splits;
use run_config::RunConfig;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use crate::augment::{Augment, Variant, to_input};
use crate::error::{Error, Result};
use crate::features::{CacheBudget, CacheStats, FeatureCache};
use crate::grads::{flatten, unflatten};
use crate::metrics::WorkerMetrics;
use crate::optim;
use crate::source::{self, ModelSource};
use crate::state::Parts;
use crate::transfer::{TransferCounts, Transfers};
use crate::watch::RingWatch;
use effnet::model::Classifier;
use effnet::modelfile::{ClassLabel, LoadedModel};
use effnet::phase::{self, Phase};
use effnet::weights::{ModulePath, RawTensor, WeightsFile, apply_weights, collect_tensors};

// The child modules share this module's imports (`use super::*`).
mod checksum;
mod epoch;
mod evaluate;
mod ring;
mod stats;
mod step;
mod trainable;
mod unit;

use crate::data::open_dataset;
use crate::watch::Beat;
use checksum::is_running_stat;
use ring::{broadcast, bytes_from_rank0, running_stats_from_rank0};
use stats::write_running_stats;
use step::{
    Draws, Local, Prepared, RunningSums, StepKit, all_reduce_while_preparing, cached_head_input, labels,
    weigh_and_flag,
};
use trainable::Trainable;

pub use checksum::{parameters_checksum, weights_checksum};
pub use evaluate::Totals;
pub use ring::RingIo;
pub use unit::run_unit;

/// Batches read ahead of the training step.
const PREFETCH: usize = 4;

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

/// A rank's state one step back, for the ring that follows a failure.
struct Undo {
    /// Steps completed in that state.
    completed: u64,
    model: Classifier,
    optimizer: burn::optim::ModuleOptimizer,
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

    /// `sum` (if any) plus `this`.
    fn sum(sum: Option<Self>, this: &DeviceTotals) -> Self {
        match sum {
            Some(sum) => Self {
                loss: sum.loss + this.loss.clone(),
                correct: sum.correct + this.correct.clone(),
                count: sum.count + this.count,
            },
            None => this.clone(),
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
        let head: effnet::model::HeadKind = config
            .head
            .parse()
            .map_err(|e| Error::Usage(format!("--head: {e}")))?;
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
        Ok(Self::untrained(config, device, dataset, splits, Some(loaded)))
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
        let (manifest, restored) = handle.block_on(crate::state::restore(store, name, &device, config))?;
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
            return Err(Error::ClassMismatch {
                model: source.to_string(),
                model_classes: loaded.classes.len(),
                data: config.data.clone(),
                data_classes: dataset.classes.len(),
            });
        }
        Ok(Self::untrained(config, device, dataset, splits, Some(loaded)))
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

    /// A trainer over `config`'s data that has no model yet: it takes the run's state from
    /// rank 0 of its first ring ([`sync_from_rank0`](Self::sync_from_rank0)).
    pub fn awaiting_state(config: &RunConfig, device: Device, handle: &Handle) -> Result<Self> {
        let (dataset, splits) = open_dataset(config, handle)?;
        Ok(Self::untrained(config, device, dataset, splits, None))
    }

    /// A trainer over `dataset` holding `model`, before any epoch: no phase, optimizer state,
    /// step count, undo state or feature cache yet.
    fn untrained(
        config: &RunConfig,
        device: Device,
        dataset: Arc<Dataset>,
        splits: Splits,
        model: Option<LoadedModel>,
    ) -> Self {
        Self {
            config: config.clone(),
            device,
            dataset,
            splits,
            model,
            phase: None,
            optimizer: None,
            completed: None,
            undo: None,
            cache: None,
            transfers: Transfers::default(),
            step_transfers: (0, TransferCounts::default()),
        }
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
                return Err(Error::Internal(
                    "rank 0 has no training state to send to the new workers".into(),
                ));
            };
            Some(Parts::of(model, optimizer, std::path::Path::new("<state for new workers>"))?.pack(phase))
        } else {
            None
        };
        let started = Instant::now();
        let bytes = bytes_from_rank0(io, Seq::State(first_step), packed)?;
        if io.ring.rank != 0 {
            let (phase, parts) = Parts::unpack(&bytes)?;
            let restored = crate::state::from_parts(&parts, phase, &self.device, &self.config, &|part| {
                format!("<{part} from rank 0>")
            })?;
            if restored.model.classes.len() != self.dataset.classes.len() {
                return Err(Error::ClassMismatch {
                    model: "rank 0's model".into(),
                    model_classes: restored.model.classes.len(),
                    data: self.config.data.clone(),
                    data_classes: self.dataset.classes.len(),
                });
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
                    .ok_or_else(|| Error::Internal("the model was lost by an earlier error".into()))?;
                loaded.model = undo.model;
                self.optimizer = Some(undo.optimizer);
                self.completed = Some(first_step);
                tracing::info!(step = first_step, "rolled back one step to rejoin the ring");
                Ok(())
            }
            _ => Err(Error::State(format!(
                "the ring restarts at step {first_step}, but this worker completed {completed} steps \
                 and can only go back one"
            ))),
        }
    }

    /// What rank 0 uploads in a checkpoint: the model and the current phase's optimizer.
    pub fn checkpoint_parts(&self) -> Result<(&LoadedModel, &burn::optim::ModuleOptimizer)> {
        let model = self
            .model
            .as_ref()
            .ok_or_else(|| Error::Internal("no model to checkpoint".into()))?;
        let optimizer = self
            .optimizer
            .as_ref()
            .ok_or_else(|| Error::Internal("no optimizer state to checkpoint (no epoch ran yet)".into()))?;
        Ok((model, optimizer))
    }
}

/// Reads every parameter, which initialises those still lazy on the device they are on.
struct Materialize;

impl burn::module::ModuleVisitor for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        let _ = param.val();
    }
}

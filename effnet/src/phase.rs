//! The two phases of transfer learning, as trainability settings of a [`Classifier`].
//!
//! Phase 1 (head): the backbone is frozen and in inference mode (BatchNorm uses its running
//! statistics, stochastic depth off); only the head trains. Phase 2 (fine-tune): everything
//! trains except BatchNorm, whose weights are frozen and whose running statistics are neither
//! used from the batch nor updated, as in the tutorial.
//!
//! A run without pretrained weights (`--weights none`) has no features worth freezing: a
//! random backbone in inference mode passes almost nothing on, and a head trained on it stays
//! at chance. Its phase 1 is [`Phase::Scratch`] instead: the whole network trains, BatchNorm in
//! training mode (batch statistics, running statistics updated).

use burn::module::{Flag, Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::tensor::Tensor;

use crate::model::Classifier;

/// Which phase a model is set up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Backbone frozen, new head trained.
    Head,
    /// Everything but BatchNorm trained.
    FineTune,
    /// Everything trained, BatchNorm included: phase 1 of a run from random initialisation.
    Scratch,
}

impl Phase {
    /// The phase that runs where the coordinator's plan says `phase`: phase 1 of a run that
    /// trains from scratch is [`Phase::Scratch`].
    pub fn in_run(self, from_scratch: bool) -> Self {
        match self {
            Phase::Head if from_scratch => Phase::Scratch,
            other => other,
        }
    }

    /// Whether the backbone is frozen (its outputs can be cached).
    pub fn backbone_frozen(self) -> bool {
        self == Phase::Head
    }

    /// 1 or 2: where the phase sits in the coordinator's plan (scratch is phase 1).
    pub fn number(self) -> u8 {
        match self {
            Phase::Head | Phase::Scratch => 1,
            Phase::FineTune => 2,
        }
    }
}

/// Set `model` up for `phase`.
pub fn prepare(model: Classifier, phase: Phase) -> Classifier {
    // Apply buffered BatchNorm statistics before changing what is frozen.
    let mut model = model.valid().train();
    match phase {
        Phase::Head => {
            model.backbone = model.backbone.freeze();
            model.head = model.head.unfreeze();
            model
        }
        Phase::FineTune => {
            let batchnorm = batchnorm_group(&model);
            model.unfreeze().freeze_group(batchnorm)
        }
        Phase::Scratch => model.unfreeze(),
    }
}

/// Every tensor and training flag that belongs to a BatchNorm layer of `module`.
pub fn batchnorm_group<M: Module>(module: &M) -> ParamGroup {
    let mut v = BatchNormIds::default();
    module.visit(&mut v);
    ParamGroup::from_ids(v.ids)
}

#[derive(Default)]
struct BatchNormIds {
    stack: Vec<bool>,
    ids: Vec<ParamId>,
}

impl BatchNormIds {
    fn inside(&self) -> bool {
        self.stack.iter().any(|&bn| bn)
    }
}

impl ModuleVisitor for BatchNormIds {
    fn enter_module(&mut self, _name: &str, container_type: &str) {
        self.stack.push(container_type == "Struct:BatchNorm");
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.inside() {
            self.ids.push(param.id);
        }
    }

    fn visit_flag(&mut self, flag: &Param<Flag>) {
        if self.inside() {
            self.ids.push(flag.id);
        }
    }
}

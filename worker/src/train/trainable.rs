//! What a training step updates: the head alone while the backbone is frozen, or the whole
//! model. The one place for a choice a step makes four times (its gradients, their copy to
//! the host, their return from it, the optimizer's update).

use super::*;

/// The part of the classifier an epoch's steps train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trainable {
    /// The head alone (phase 1). Its gradients, the all-reduce buffer and the update are
    /// taken over the head: the same values as over the whole model (the frozen backbone has
    /// no gradients), without Burn walking the backbone's 200-odd frozen tensors twice a
    /// step, which was half of a cached head step on LibTorch.
    Head,
    /// Everything the phase left trainable (phase 2, or training from scratch).
    Whole,
}

impl Trainable {
    /// The part `phase` trains.
    pub(super) fn of(phase: Phase) -> Self {
        if phase.backbone_frozen() {
            Trainable::Head
        } else {
            Trainable::Whole
        }
    }

    /// The gradients of `loss` with respect to this part of `model`.
    pub(super) fn gradients(self, loss: &Tensor<1>, model: &Classifier) -> GradientsParams {
        match self {
            Trainable::Head => GradientsParams::from_grads(loss.backward(), &model.head),
            Trainable::Whole => GradientsParams::from_grads(loss.backward(), model),
        }
    }

    /// `grads` in one host buffer, in the order [`Trainable::unflatten`] reads back (one
    /// copy for all of them; it also waits for the backward pass).
    pub(super) fn flatten(
        self,
        model: &Classifier,
        grads: &GradientsParams,
        transfers: &Transfers,
    ) -> Result<Vec<f32>> {
        match self {
            Trainable::Head => flatten(&model.head, grads, transfers),
            Trainable::Whole => flatten(model, grads, transfers),
        }
    }

    /// Gradients like `like` holding the values of `flat` (the all-reduced buffer).
    pub(super) fn unflatten(
        self,
        model: &Classifier,
        like: &GradientsParams,
        flat: &[f32],
        transfers: &Transfers,
    ) -> GradientsParams {
        match self {
            Trainable::Head => unflatten(&model.head, like, flat, transfers),
            Trainable::Whole => unflatten(model, like, flat, transfers),
        }
    }

    /// `model` after one optimizer step of this part at learning rate `lr`.
    pub(super) fn update(
        self,
        optimizer: &mut burn::optim::ModuleOptimizer,
        lr: f64,
        model: Classifier,
        grads: GradientsParams,
    ) -> Classifier {
        match self {
            Trainable::Head => {
                let mut model = model;
                model.head = optimizer.step(lr, model.head, grads);
                model
            }
            Trainable::Whole => optimizer.step(lr, model, grads),
        }
    }
}

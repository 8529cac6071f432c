//! Gradients as one flat buffer, for the all-reduce between workers.
//!
//! The buffer follows the module's visit order, which is the same in every process (parameter
//! ids are random per process, so they cannot be used to line buffers up). The gradients are
//! joined into one tensor on their device and cross to the host in one copy; the reduced
//! buffer goes back in one copy and is cut into views there, so a step makes two transfers
//! for its gradients however many parameters the model has.

// Host-device copies go through `Transfers`, which counts them (transfer_tests.rs).
#![deny(clippy::disallowed_methods)]

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::Result;
use crate::transfer::Transfers;

/// The gradients of `module`'s parameters that have one, joined into one tensor on their
/// device, in visit order; `None` when no parameter has one. Frozen parameters take no space.
pub fn joined<M: Module>(module: &M, grads: &GradientsParams) -> Option<Tensor<1>> {
    let mut v = Join {
        grads,
        parts: Vec::new(),
    };
    module.visit(&mut v);
    (!v.parts.is_empty()).then(|| Tensor::cat(v.parts, 0))
}

struct Join<'a> {
    grads: &'a GradientsParams,
    parts: Vec<Tensor<1>>,
}

impl ModuleVisitor for Join<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            self.parts.push(g.reshape([-1]));
        }
    }
}

/// [`joined`], copied to the host in one transfer.
pub fn flatten<M: Module>(module: &M, grads: &GradientsParams, transfers: &Transfers) -> Result<Vec<f32>> {
    match joined(module, grads) {
        Some(all) => transfers.download_f32(all),
        None => Ok(Vec::new()),
    }
}

/// Gradients for `module` taken from `flat` (the layout [`flatten`] produced from `like`):
/// the same parameters, shapes and devices, new values. `flat` goes to the device in one
/// transfer.
///
/// # Panics
/// When `flat` does not match the layout (a programming error: both sides of an
/// all-reduce flatten the same module).
pub fn unflatten<M: Module>(
    module: &M,
    like: &GradientsParams,
    flat: &[f32],
    transfers: &Transfers,
) -> GradientsParams {
    let mut v = Unflatten {
        like,
        flat,
        all: None,
        transfers,
        offset: 0,
        out: GradientsParams::new(),
    };
    module.visit(&mut v);
    assert_eq!(v.offset, flat.len(), "gradient buffer does not match the module");
    v.out
}

struct Unflatten<'a> {
    like: &'a GradientsParams,
    flat: &'a [f32],
    /// `flat` on the gradients' device, uploaded at the first parameter that has one.
    all: Option<Tensor<1>>,
    transfers: &'a Transfers,
    offset: usize,
    out: GradientsParams,
}

impl Unflatten<'_> {
    fn on_device(&mut self, device: &Device) -> Tensor<1> {
        let (flat, transfers) = (self.flat, self.transfers);
        self.all
            .get_or_insert_with(|| transfers.upload(TensorData::new(flat.to_vec(), [flat.len()]), device))
            .clone()
    }
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.like.get::<D>(param.id) {
            let shape = g.dims();
            let n: usize = shape.iter().product();
            let all = self.on_device(&g.device());
            let t = all.narrow(0, self.offset, n).reshape(shape);
            self.offset += n;
            self.out.register(param.id, t);
        }
    }
}

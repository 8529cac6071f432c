//! Gradients as one flat buffer, for the all-reduce between workers.
//!
//! The buffer follows the module's visit order, which is the same in every process (parameter
//! ids are random per process, so they cannot be used to line buffers up).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

/// Copy the gradients of `module`'s parameters that have one into a single buffer, in visit
/// order. Frozen parameters (no gradient) take no space.
pub fn flatten<M: Module>(module: &M, grads: &GradientsParams) -> Vec<f32> {
    let mut v = Flatten {
        grads,
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

struct Flatten<'a> {
    grads: &'a GradientsParams,
    out: Vec<f32>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let data = g.into_data().convert::<f32>();
            // Moved out rather than copied: the buffer is copied once, into `out`.
            self.out.extend(data.try_into_vec::<f32>().unwrap_or_default());
        }
    }
}

/// Gradients for `module` taken from `flat` (the layout [`flatten`] produced from `like`):
/// the same parameters, shapes and devices, new values.
///
/// # Panics
/// When `flat` is shorter than the layout needs (a programming error: both sides of an
/// all-reduce flatten the same module).
pub fn unflatten<M: Module>(module: &M, like: &GradientsParams, flat: &[f32]) -> GradientsParams {
    let mut v = Unflatten {
        like,
        flat,
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
    offset: usize,
    out: GradientsParams,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.like.get::<D>(param.id) {
            let shape = g.dims();
            let n: usize = shape.iter().product();
            let values = self.flat[self.offset..self.offset + n].to_vec();
            self.offset += n;
            let t = Tensor::<D>::from_data(TensorData::new(values, shape), &g.device());
            self.out.register(param.id, t);
        }
    }
}

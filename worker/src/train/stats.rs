//! Writing BatchNorm running statistics into a model by module path (rank 0's, after an
//! epoch in which each rank's BatchNorm trained on its own batches).

use super::*;

/// Set the BatchNorm running statistics of `model` to `stats`.
pub(super) fn write_running_stats(
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
        return Err(Error::State(format!(
            "{} BatchNorm statistics were not found in the model to update",
            writer.values.len()
        )));
    }
    Ok(model)
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

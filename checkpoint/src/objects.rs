//! The names inside a checkpoint root, for everyone who writes or reads one: the worker
//! uploads the training objects, the coordinator adds the run state and commits.

/// The model file: architecture, class names and every tensor (BatchNorm statistics too).
pub const WEIGHTS: &str = "weights.safetensors";
/// Burn's optimizer record (burnpack), for the phase the checkpoint was taken in.
pub const OPTIMIZER: &str = "optimizer.bpk";
/// Parameter path -> the id the optimizer record refers to it by.
pub const PARAM_IDS: &str = "param-ids.json";
/// The run's state (position in the plan, history, configuration), from the coordinator.
pub const STATE: &str = "state.json";

/// How every checkpoint's name starts (see [`CheckpointStore::new_name`]).
///
/// [`CheckpointStore::new_name`]: crate::CheckpointStore::new_name
pub const NAME_PREFIX: &str = "step-";

/// Whether `name` can be a checkpoint's name: one path segment with the checkpoint prefix.
pub fn is_checkpoint_name(name: &str) -> bool {
    name.starts_with(NAME_PREFIX) && !name.is_empty() && !name.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CheckpointStore;

    #[test]
    fn fresh_names_are_checkpoint_names_and_paths_are_not() {
        assert!(is_checkpoint_name(&CheckpointStore::new_name(40, "head", 2)));
        assert!(!is_checkpoint_name(
            "step-0000000040-head-e002-1f3a9c0d/weights.safetensors"
        ));
        assert!(!is_checkpoint_name("LATEST"));
        assert!(!is_checkpoint_name("../step-1"));
    }
}

//! The worker process: its session with the coordinator, training, evaluation, the feature
//! cache, checkpoints, metrics and benchmarks. The model itself (architectures, weights,
//! devices, prediction) is the `effnet` crate.
//!
//! | Where | What |
//! |---|---|
//! | [`cluster`] | the session with the coordinator: join, heartbeats, rings, orders |
//! | [`train`] | an epoch and a training step: plan, forward/backward, all-reduce, update |
//! | [`features`] | the cache of frozen-backbone features for the head phase |
//! | [`state`] | a rank's training state: uploaded to checkpoints, restored from them, packed for joining workers |
//! | [`source`] | `--weights`: what the model crate loads, or a run's checkpoint |

pub mod augment;
pub mod bench;
pub mod cli;
pub mod cluster;
pub mod data;
pub mod error;
pub mod features;
pub mod grads;
pub mod metrics;
pub mod optim;
pub mod source;
pub mod state;
pub mod train;
pub mod transfer;
pub mod watch;

pub use error::{Error, Result};

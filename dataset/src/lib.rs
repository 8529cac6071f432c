//! Datasets for effnet-cluster, without any tensor library: what the coordinator needs to plan
//! epochs (sizes, splits, the distributed sampler) and what a worker needs to find and parse
//! its samples (CIFAR-10 binary records, image folders).

pub mod cifar;
pub mod error;
pub mod folder;
pub mod loader;
pub mod sampler;
pub mod source;
pub mod split;
pub mod store;
pub mod synthetic;

pub use error::{Error, Result};

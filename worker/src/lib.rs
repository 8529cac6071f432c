//! The worker: EfficientNet models on Burn, weight loading, prediction and training.
//!
//! Everything here is generic over the compute device: the same code runs on Burn's CPU
//! backend (flex), with the `cuda` feature on NVIDIA GPUs, and with the `wgpu` feature on any
//! GPU with a Vulkan (Metal, DirectX 12) driver.

pub mod augment;
pub mod bench;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod data;
pub mod device;
pub mod download;
pub mod error;
pub mod features;
pub mod grads;
pub mod image;
pub mod imagenet;
pub mod metrics;
pub mod model;
pub mod modelfile;
pub mod native;
pub mod optim;
pub mod phase;
pub mod predict;
pub mod resume;
pub mod summary;
pub mod train;
pub mod transfer;
pub mod watch;
pub mod weights;

pub use error::{Error, Result};

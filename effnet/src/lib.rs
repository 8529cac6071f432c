//! EfficientNet on Burn, usable without any cluster.
//!
//! | Where | What |
//! |---|---|
//! | [`config`] | the architecture of every B0-B7 and Lite0-Lite4 variant, as one config struct |
//! | [`model`] | the network: backbone, the ImageNet top, and the transfer-learning heads |
//! | [`phase`] | which parts train in each phase (head, fine-tune, from scratch) |
//! | [`weights`], [`modelfile`] | importing PyTorch/timm/TF-ported weights; our own model files |
//! | [`image`], [`predict`], [`imagenet`] | preprocessing, top-k prediction, the ImageNet labels |
//! | [`download`] | cached, checksummed downloads (weights) |
//! | [`device`], [`native`] | devices and backends: flex, LibTorch (with its C++ shim), CUDA, wgpu |
//! | [`summary`] | a Keras-style layer table with per-phase parameter counts |
//!
//! Everything is generic over the compute device: the same code runs on Burn's CPU backend
//! (flex), with the `libtorch` feature on PyTorch's CPU kernels, with `cuda` on NVIDIA GPUs,
//! and with `wgpu` on any GPU with a Vulkan (Metal, DirectX 12) driver.

pub mod config;
pub mod device;
pub mod download;
pub mod error;
pub mod image;
pub mod imagenet;
pub mod model;
pub mod modelfile;
pub mod native;
pub mod phase;
pub mod predict;
pub mod summary;
pub mod weights;

pub use error::{Error, Result};

//! Checkpoints that survive machines: objects in any store [`storage::Location`] opens (a
//! local directory by default, S3, memory), committed atomically and verified on every read.
//!
//! Layout under the checkpoint root:
//!
//! ```text
//! step-0000000040-head-e002-1f3a9c0d/    one checkpoint: a unique prefix per attempt
//!     weights.safetensors                 objects, uploaded first (multipart when large;
//!     optimizer.bpk                       their names: [`objects`])
//!     param-ids.json
//!     state.json
//!     MANIFEST.json                       size and sha256 of every object, written after them
//! LATEST                                  names the committed checkpoint, written last
//! LEASE                                   the coordinator that may commit (see [`Lease`])
//! ```
//!
//! A checkpoint exists once `LATEST` names it; a crash at any point before leaves the previous
//! one in place. Readers check every object against the manifest and fall back to the newest
//! older checkpoint that passes, with a warning.

mod error;
mod lease;
mod manifest;
pub mod objects;
mod store;

pub use error::{Error, Result};
pub use lease::{Claim, Lease, LeaseRecord, claim};
pub use manifest::{FORMAT, Latest, Manifest, ObjectEntry};
pub use store::{CheckpointStore, Good, PART_SIZE, Retention, unique_hex};

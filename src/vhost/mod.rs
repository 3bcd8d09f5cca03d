//! The vhost-user-blk device: features, config space, one worker per virtqueue,
//! requests parsed from guest memory and run on the mirror.

pub mod backend;
pub mod dirty;
pub mod inflight;
pub mod request;

pub use backend::{BlockBackend, BlockConfig};

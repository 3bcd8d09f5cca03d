//! The vhost-user-blk device: features, config space, one worker per virtqueue,
//! requests parsed from guest memory and run on the mirror.

pub mod backend;
pub mod dirty;
pub mod engine;
pub mod gate;
pub mod inflight;
pub mod request;
pub mod stats;
pub mod wire;

pub use backend::{BlockBackend, BlockConfig};

/// Largest queue the device accepts.
pub const QUEUE_SIZE: usize = 1024;
/// Data segments per request (`seg_max`), as the queue size allows.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest segment (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;

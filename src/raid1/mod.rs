//! The mirror: array metadata, assembly, fan-out writes, read balancing, leg
//! failure and resync.

pub mod aio;
pub mod array;
pub mod bufs;
pub mod manage;
pub mod metadata;
mod offload;
pub mod port;
mod settle;

pub use aio::AsyncIo;
pub use array::{Array, AssembleError, AssembleReport, LegState, Member};
pub use bufs::{BufferError, Buffers};
pub use manage::{ManageError, RecoveryKind};

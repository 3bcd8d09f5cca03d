//! The md-cluster node: messaging now; join/slots, resync windows, peer recovery
//! and metadata updates build on it.

pub mod comms;
pub mod membership;
pub mod node;
pub mod writer;

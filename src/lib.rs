//! vhost-user-md: a vhost-user-blk backend serving a clustered RAID1 whose on-disk
//! format and cluster protocol are those of Linux md-cluster.
//!
//! Layers, top to bottom: `cli` (commands), `serve` (the composition root of the
//! `serve` command), `vhost` (the device), `cluster` (an md-cluster node) beside
//! `raid1` (the mirror), `bitmap` (write intent), `dlm` (lock managers), `storage`
//! (legs), `md` (pure on-disk and wire formats); `unixsock` makes the unix sockets.
//! ARCHITECTURE.md says what each may use; `tests/layers.rs` checks it.

pub mod bitmap;
pub mod cli;
pub mod cluster;
pub mod dlm;
pub mod md;
pub mod raid1;
pub mod serve;
pub mod storage;
pub mod unixsock;
pub mod vhost;

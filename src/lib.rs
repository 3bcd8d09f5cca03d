//! vhost-user-md: a vhost-user-blk backend serving a clustered RAID1 whose on-disk
//! format and cluster protocol are those of Linux md-cluster.
//!
//! Layers, top to bottom: `cli` (commands), `raid1` (the mirror), `storage` (legs),
//! `md` (pure on-disk and wire formats). `unixsock` makes the unix sockets `serve`
//! and `lockd` listen on.

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

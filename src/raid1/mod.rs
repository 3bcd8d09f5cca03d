//! The mirror: array metadata, and (with the serving layers) fan-out writes, read
//! balancing, leg failure and resync.

pub mod metadata;

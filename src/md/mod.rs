//! Pure codecs for the Linux md on-disk formats and the md-cluster wire format.
//!
//! Nothing in this module performs I/O: every function works on byte slices and
//! returns typed errors that name the offending field and the value found, so that
//! the layers above can say "leg X: field Y is Z" without guessing.

pub mod bitmap;
pub mod bytes;
pub mod heartbeat;
pub mod human;
pub mod layout;
pub mod message;
pub mod superblock;
pub mod uuid;

pub use bitmap::{BitmapBits, BitmapError, BitmapGeometry, BitmapSuper};
pub use message::{ClusterMsg, MessageError, MsgType};
pub use superblock::{Superblock, SuperblockError};
pub use uuid::Uuid;

/// Bytes per md sector; md counts in 512-byte sectors whatever the device's block size.
pub const SECTOR_SIZE: u64 = 512;

/// md's "no sector" / "fully in sync" marker (`MaxSector`).
pub const MAX_SECTOR: u64 = u64::MAX;

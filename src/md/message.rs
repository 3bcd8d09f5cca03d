//! md-cluster messages carried in the LVB of the `message` lock.
//!
//! Two layouts exist: the kernel's 48-byte `struct cluster_msg` in a 64-byte LVB
//! ("K64"), and the 32-byte layout our nodes use because libdlm lockspaces have
//! 32-byte LVBs ("U32"). Message types and meanings are the same in both.

use super::bytes::{array, le32, le64, put32, put64};
use super::uuid::Uuid;

/// Bytes of the kernel `struct cluster_msg` (44 bytes of fields + 4 of padding).
pub const K64_LEN: usize = 48;
/// Bytes of a U32-profile message (the whole userspace LVB).
pub const U32_LEN: usize = 32;
/// The value of the `profile` field of a U32 message.
pub const U32_PROFILE: u32 = 1;

/// Message types; the numbers are fixed by the kernel (new ones only at the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// Superblocks were rewritten; re-read device `raid_slot`.
    MetadataUpdated,
    /// The sender resyncs `[low, high)`; `high == 0` means it finished.
    Resyncing,
    /// A device with `device_uuid` was added as `raid_slot`.
    NewDisk,
    /// Device `raid_slot` is being removed.
    Remove,
    /// Device `raid_slot` is being re-added.
    ReAdd,
    /// The sender leaves with dirty bits: recover its slot.
    BitmapNeedsSync,
    /// Apply the new array size.
    ChangeCapacity,
    /// Resize the bitmap to `high` sectors.
    BitmapResize,
    /// A resync is starting.
    ResyncingStart,
    /// U32 only: node `slot` joined (`low` = corosync nodeid, `high` = pid).
    NodeJoined,
    /// U32 only: node `slot` is leaving cleanly.
    NodeLeaving,
    /// A type this implementation does not know (acknowledged and ignored).
    Unknown(u32),
}

impl MsgType {
    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            MsgType::MetadataUpdated => 0,
            MsgType::Resyncing => 1,
            MsgType::NewDisk => 2,
            MsgType::Remove => 3,
            MsgType::ReAdd => 4,
            MsgType::BitmapNeedsSync => 5,
            MsgType::ChangeCapacity => 6,
            MsgType::BitmapResize => 7,
            MsgType::ResyncingStart => 8,
            MsgType::NodeJoined => 0x100,
            MsgType::NodeLeaving => 0x101,
            MsgType::Unknown(v) => v,
        }
    }

    /// From the wire value.
    pub fn from_u32(v: u32) -> MsgType {
        match v {
            0 => MsgType::MetadataUpdated,
            1 => MsgType::Resyncing,
            2 => MsgType::NewDisk,
            3 => MsgType::Remove,
            4 => MsgType::ReAdd,
            5 => MsgType::BitmapNeedsSync,
            6 => MsgType::ChangeCapacity,
            7 => MsgType::BitmapResize,
            8 => MsgType::ResyncingStart,
            0x100 => MsgType::NodeJoined,
            0x101 => MsgType::NodeLeaving,
            v => MsgType::Unknown(v),
        }
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The LVB is shorter than the layout.
    #[error("cluster message truncated: {len} bytes, {need} needed")]
    Truncated {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A U32 message with a profile we do not speak.
    #[error("cluster message field profile is {0}, expected 1")]
    Profile(u32),
}

/// One md-cluster message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterMsg {
    /// What the message means.
    pub kind: MsgType,
    /// Sender's 0-based slot.
    pub slot: u32,
    /// RESYNCING: window start (array sectors).
    pub low: u64,
    /// RESYNCING: window end (exclusive), 0 = finished; BITMAP_RESIZE: new size.
    pub high: u64,
    /// NEWDISK: the new device's `device_uuid`.
    pub uuid: Uuid,
    /// `dev_number` of the device concerned.
    pub raid_slot: u32,
}

impl ClusterMsg {
    /// A message of `kind` from `slot` with every payload field zero.
    pub fn new(kind: MsgType, slot: u32) -> Self {
        ClusterMsg {
            kind,
            slot,
            low: 0,
            high: 0,
            uuid: Uuid::default(),
            raid_slot: 0,
        }
    }

    /// The kernel layout (48 bytes; goes into a 64-byte LVB).
    pub fn encode_k64(&self) -> [u8; K64_LEN] {
        let mut b = [0u8; K64_LEN];
        put32(&mut b, 0, self.kind.to_u32());
        put32(&mut b, 4, self.slot);
        put64(&mut b, 8, self.low);
        put64(&mut b, 16, self.high);
        b[24..40].copy_from_slice(&self.uuid.0);
        put32(&mut b, 40, self.raid_slot);
        b
    }

    /// Decodes the kernel layout.
    pub fn decode_k64(b: &[u8]) -> Result<Self, MessageError> {
        if b.len() < K64_LEN {
            return Err(MessageError::Truncated {
                len: b.len(),
                need: K64_LEN,
            });
        }
        Ok(ClusterMsg {
            kind: MsgType::from_u32(le32(b, 0)),
            slot: le32(b, 4),
            low: le64(b, 8),
            high: le64(b, 16),
            uuid: Uuid(array(b, 24)),
            raid_slot: le32(b, 40),
        })
    }

    /// The U32 layout (32 bytes). NEWDISK carries the uuid in `low`/`high`, so a
    /// NEWDISK's own `low`/`high` are not sent.
    pub fn encode_u32(&self) -> [u8; U32_LEN] {
        let mut b = [0u8; U32_LEN];
        put32(&mut b, 0, self.kind.to_u32());
        put32(&mut b, 4, self.slot);
        if self.kind == MsgType::NewDisk {
            b[8..24].copy_from_slice(&self.uuid.0);
        } else {
            put64(&mut b, 8, self.low);
            put64(&mut b, 16, self.high);
        }
        put32(&mut b, 24, self.raid_slot);
        put32(&mut b, 28, U32_PROFILE);
        b
    }

    /// Decodes the U32 layout.
    pub fn decode_u32(b: &[u8]) -> Result<Self, MessageError> {
        if b.len() < U32_LEN {
            return Err(MessageError::Truncated {
                len: b.len(),
                need: U32_LEN,
            });
        }
        let profile = le32(b, 28);
        if profile != U32_PROFILE {
            return Err(MessageError::Profile(profile));
        }
        let kind = MsgType::from_u32(le32(b, 0));
        let mut m = ClusterMsg::new(kind, le32(b, 4));
        if kind == MsgType::NewDisk {
            m.uuid = Uuid(array(b, 8));
        } else {
            m.low = le64(b, 8);
            m.high = le64(b, 16);
        }
        m.raid_slot = le32(b, 24);
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k64_field_offsets() {
        let mut m = ClusterMsg::new(MsgType::Resyncing, 2);
        m.low = 0x1122;
        m.high = 0x3344;
        m.uuid = Uuid([7; 16]);
        m.raid_slot = 5;
        let b = m.encode_k64();
        assert_eq!(&b[0..8], &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&b[8..10], &[0x22, 0x11]);
        assert_eq!(&b[16..18], &[0x44, 0x33]);
        assert_eq!(b[24], 7);
        assert_eq!(&b[40..48], &[5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ClusterMsg::decode_k64(&b).unwrap(), m);
    }

    #[test]
    fn u32_newdisk_carries_uuid_in_low_high() {
        let mut m = ClusterMsg::new(MsgType::NewDisk, 1);
        m.uuid = Uuid(*b"0123456789abcdef");
        m.raid_slot = 3;
        let b = m.encode_u32();
        assert_eq!(&b[8..24], b"0123456789abcdef");
        assert_eq!(&b[28..32], &[1, 0, 0, 0]);
        assert_eq!(ClusterMsg::decode_u32(&b).unwrap(), m);
        let mut bad = b;
        bad[28] = 2;
        assert_eq!(ClusterMsg::decode_u32(&bad), Err(MessageError::Profile(2)));
    }

    #[test]
    fn unknown_types_survive() {
        let m = ClusterMsg::new(MsgType::Unknown(77), 0);
        assert_eq!(
            ClusterMsg::decode_u32(&m.encode_u32()).unwrap().kind,
            MsgType::Unknown(77)
        );
        assert_eq!(MsgType::from_u32(8), MsgType::ResyncingStart);
    }
}

//! The md v1.2 superblock (`struct mdp_superblock_1`): decode, validate, encode, checksum.

use super::bytes::{array, le16, le32, le64, put16, put32, put64};
use super::uuid::Uuid;
use super::MAX_SECTOR;

/// `MD_SB_MAGIC`.
pub const SB_MAGIC: u32 = 0xa92b_4efc;
/// v1.2: the superblock sits 4 KiB (8 sectors) from the start of the leg.
pub const SB_OFFSET_V12: u64 = 8;
/// Byte offset of the v1.2 superblock.
pub const SB_BYTE_OFFSET: u64 = SB_OFFSET_V12 * 512;
/// Size of the fixed part; `dev_roles[]` follows.
pub const SB_FIXED_LEN: usize = 256;
/// The kernel reads (and we write) one 4 KiB block.
pub const SB_BLOCK_LEN: usize = 4096;
/// Most `dev_roles[]` entries a superblock may have (`(4096 - 256) / 2`).
pub const MAX_DEVS: u32 = 1920;

/// `feature_map` bits.
pub mod feature {
    /// `bitmap_offset` is valid (internal bitmap).
    pub const BITMAP_OFFSET: u32 = 0x0001;
    /// `recovery_offset` is valid: the leg has a role but is still being rebuilt.
    pub const RECOVERY_OFFSET: u32 = 0x0002;
    /// A reshape is in progress.
    pub const RESHAPE_ACTIVE: u32 = 0x0004;
    /// The bad-block list is not empty.
    pub const BAD_BLOCKS: u32 = 0x0008;
    /// This device replaces an active device of the same role.
    pub const REPLACEMENT: u32 = 0x0010;
    /// Reshape running backwards.
    pub const RESHAPE_BACKWARDS: u32 = 0x0020;
    /// Reshape with a data-offset move.
    pub const NEW_OFFSET: u32 = 0x0040;
    /// Recovery of this leg is bitmap-guided (re-add).
    pub const RECOVERY_BITMAP: u32 = 0x0080;
    /// The array is clustered (md-cluster).
    pub const CLUSTERED: u32 = 0x0100;
    /// RAID4/5/6 write journal.
    pub const JOURNAL: u32 = 0x0200;
    /// RAID5 partial parity log.
    pub const PPL: u32 = 0x0400;
    /// Several PPLs.
    pub const MULTIPLE_PPLS: u32 = 0x0800;
    /// RAID0 layout recorded.
    pub const RAID0_LAYOUT: u32 = 0x1000;
    /// Every bit the kernel knows; anything else makes the superblock invalid.
    pub const ALL: u32 = 0x1fff;
}

/// `dev_roles[]` values.
pub mod role {
    /// Unused entry or spare.
    pub const SPARE: u16 = 0xffff;
    /// Faulty device.
    pub const FAULTY: u16 = 0xfffe;
    /// Journal device.
    pub const JOURNAL: u16 = 0xfffd;
    /// Roles at or above this are special.
    pub const MAX: u16 = 0xff00;
}

/// `devflags` bits.
pub mod devflag {
    /// Write-mostly leg (reads avoid it).
    pub const WRITE_MOSTLY: u8 = 1;
    /// Fail-fast leg.
    pub const FAIL_FAST: u8 = 2;
}

/// Why a superblock was refused. Each variant names the field and the value found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    /// Fewer bytes than the superblock needs.
    #[error("superblock truncated: {len} bytes available, {need} needed")]
    Truncated {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// No md superblock at this place.
    #[error("no md superblock: field magic is {found:#010x}, expected 0xa92b4efc")]
    Magic {
        /// The value found.
        found: u32,
    },
    /// The stored checksum does not match the contents.
    #[error("field sb_csum is {found:#010x} but the contents checksum to {computed:#010x}")]
    Checksum {
        /// Stored checksum.
        found: u32,
        /// Checksum of the contents.
        computed: u32,
    },
    /// A field holds a value that is impossible or unsupported.
    #[error("field {field} is {value}: {why}")]
    Field {
        /// The field's name as in `struct mdp_superblock_1`.
        field: &'static str,
        /// The value found, rendered.
        value: String,
        /// What was expected.
        why: &'static str,
    },
}

impl SuperblockError {
    fn field(field: &'static str, value: impl ToString, why: &'static str) -> Self {
        SuperblockError::Field {
            field,
            value: value.to_string(),
            why,
        }
    }
}

/// A decoded md v1.x superblock. `magic`, `major_version`, `pad0`, `pad3` and `max_dev`
/// are implied (validated on decode, regenerated on encode; `max_dev = dev_roles.len()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// `MD_FEATURE_*` bits.
    pub feature_map: u32,
    /// Array uuid.
    pub set_uuid: Uuid,
    /// Array name, NUL-padded ("homehost:name").
    pub set_name: [u8; 32],
    /// Creation time (low 40 bits: seconds since the epoch).
    pub ctime: u64,
    /// RAID level (1 for RAID1).
    pub level: i32,
    /// Layout (0 for RAID1).
    pub layout: u32,
    /// Used size of each component in sectors (= RAID1 array size).
    pub size: u64,
    /// RAID chunk in sectors (0 for RAID1).
    pub chunksize: u32,
    /// Number of active mirror slots.
    pub raid_disks: u32,
    /// Sectors from the superblock to the first bitmap superblock (signed).
    pub bitmap_offset: i32,
    /// Reshape: new level.
    pub new_level: u32,
    /// Reshape: position.
    pub reshape_position: u64,
    /// Reshape: change in disks.
    pub delta_disks: u32,
    /// Reshape: new layout.
    pub new_layout: u32,
    /// Reshape: new chunk (sectors).
    pub new_chunk: u32,
    /// Reshape: signed change of data offset.
    pub new_offset: i32,
    /// Sector where data starts on this leg.
    pub data_offset: u64,
    /// Sectors usable for data on this leg.
    pub data_size: u64,
    /// Sector of this superblock.
    pub super_offset: u64,
    /// Sectors of this leg already rebuilt (with `RECOVERY_OFFSET`).
    pub recovery_offset: u64,
    /// Index of this device in `dev_roles[]`.
    pub dev_number: u32,
    /// Read errors corrected by rewriting.
    pub cnt_corrected_read: u32,
    /// Per-device uuid.
    pub device_uuid: Uuid,
    /// `WriteMostly1` / `FailFast1`.
    pub devflags: u8,
    /// Bad-block log shift.
    pub bblog_shift: u8,
    /// Sectors reserved for the bad-block log (0 = none).
    pub bblog_size: u16,
    /// Sectors from superblock to bad-block log (signed).
    pub bblog_offset: i32,
    /// Last update time.
    pub utime: u64,
    /// Update counter.
    pub events: u64,
    /// Array sectors below this are in sync; `MAX_SECTOR` = clean.
    pub resync_offset: u64,
    /// Checksum as read (ignored on encode, which recomputes it).
    pub sb_csum: u32,
    /// Role of each device number; its length is `max_dev`.
    pub dev_roles: Vec<u16>,
}

/// The md v1 checksum over the first `256 + 2 * max_dev` bytes, with the stored
/// checksum field counted as zero.
pub fn checksum(buf: &[u8], max_dev: u32) -> u32 {
    let size = SB_FIXED_LEN + 2 * max_dev as usize;
    let size = size.min(buf.len());
    let mut sum: u64 = 0;
    let mut off = 0;
    while off + 4 <= size {
        if off != 216 {
            sum += u64::from(le32(buf, off));
        }
        off += 4;
    }
    if size - off == 2 {
        sum += u64::from(le16(buf, off));
    }
    (sum as u32).wrapping_add((sum >> 32) as u32)
}

impl Superblock {
    /// Number of `dev_roles[]` entries.
    pub fn max_dev(&self) -> u32 {
        self.dev_roles.len() as u32
    }

    /// Bytes covered by the checksum: `256 + 2 * max_dev`.
    pub fn sb_len(&self) -> usize {
        SB_FIXED_LEN + 2 * self.dev_roles.len()
    }

    /// Role of this device (`dev_roles[dev_number]`), or spare when out of range.
    pub fn role(&self) -> u16 {
        self.dev_roles
            .get(self.dev_number as usize)
            .copied()
            .unwrap_or(role::SPARE)
    }

    /// `set_name` up to its first NUL, lossily as text.
    pub fn name(&self) -> String {
        String::from_utf8_lossy(super::bytes::c_str(&self.set_name)).into_owned()
    }

    /// Sets `set_name` (truncated to 31 bytes, NUL-padded).
    pub fn set_name_str(&mut self, name: &str) {
        self.set_name = [0; 32];
        let n = name.len().min(31);
        self.set_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    }

    /// True when the superblock says no resync is pending.
    pub fn is_clean(&self) -> bool {
        self.resync_offset == MAX_SECTOR
    }

    /// Decodes and validates a superblock read from `super_offset` of a leg
    /// (at least `256 + 2 * max_dev` bytes; normally the whole 4 KiB block).
    ///
    /// Checks what the kernel's `super_1_load` checks that does not depend on the
    /// device: magic, version, `max_dev`, feature bits, padding, checksum and the
    /// data-area fields. [`Superblock::check_device`] adds the device-size checks.
    pub fn decode(buf: &[u8]) -> Result<Superblock, SuperblockError> {
        if buf.len() < SB_FIXED_LEN {
            return Err(SuperblockError::Truncated {
                len: buf.len(),
                need: SB_FIXED_LEN,
            });
        }
        let magic = le32(buf, 0);
        if magic != SB_MAGIC {
            return Err(SuperblockError::Magic { found: magic });
        }
        let major = le32(buf, 4);
        if major != 1 {
            return Err(SuperblockError::field(
                "major_version",
                major,
                "only md metadata 1.x is understood",
            ));
        }
        let max_dev = le32(buf, 220);
        if max_dev > MAX_DEVS {
            return Err(SuperblockError::field(
                "max_dev",
                max_dev,
                "more than 1920 device roles",
            ));
        }
        let need = SB_FIXED_LEN + 2 * max_dev as usize;
        if buf.len() < need {
            return Err(SuperblockError::Truncated {
                len: buf.len(),
                need,
            });
        }
        let found = le32(buf, 216);
        let computed = checksum(buf, max_dev);
        if found != computed {
            return Err(SuperblockError::Checksum { found, computed });
        }
        let feature_map = le32(buf, 8);
        if feature_map & !feature::ALL != 0 {
            return Err(SuperblockError::field(
                "feature_map",
                format!("{feature_map:#x}"),
                "has feature bits this implementation does not know",
            ));
        }
        if feature_map & feature::PPL != 0
            && feature_map & (feature::BITMAP_OFFSET | feature::JOURNAL) != 0
        {
            return Err(SuperblockError::field(
                "feature_map",
                format!("{feature_map:#x}"),
                "PPL together with a bitmap or journal is invalid",
            ));
        }
        let pad0 = le32(buf, 12);
        if pad0 != 0 {
            return Err(SuperblockError::field("pad0", pad0, "must be zero"));
        }
        if buf[224..256].iter().any(|&b| b != 0) {
            return Err(SuperblockError::field(
                "pad3",
                "non-zero bytes",
                "must be all zero",
            ));
        }
        let dev_roles = (0..max_dev as usize)
            .map(|i| le16(buf, SB_FIXED_LEN + 2 * i))
            .collect();
        let sb = Superblock {
            feature_map,
            set_uuid: Uuid(array(buf, 16)),
            set_name: array(buf, 32),
            ctime: le64(buf, 64),
            level: le32(buf, 72) as i32,
            layout: le32(buf, 76),
            size: le64(buf, 80),
            chunksize: le32(buf, 88),
            raid_disks: le32(buf, 92),
            bitmap_offset: le32(buf, 96) as i32,
            new_level: le32(buf, 100),
            reshape_position: le64(buf, 104),
            delta_disks: le32(buf, 112),
            new_layout: le32(buf, 116),
            new_chunk: le32(buf, 120),
            new_offset: le32(buf, 124) as i32,
            data_offset: le64(buf, 128),
            data_size: le64(buf, 136),
            super_offset: le64(buf, 144),
            recovery_offset: le64(buf, 152),
            dev_number: le32(buf, 160),
            cnt_corrected_read: le32(buf, 164),
            device_uuid: Uuid(array(buf, 168)),
            devflags: buf[184],
            bblog_shift: buf[185],
            bblog_size: le16(buf, 186),
            bblog_offset: le32(buf, 188) as i32,
            utime: le64(buf, 192),
            events: le64(buf, 200),
            resync_offset: le64(buf, 208),
            sb_csum: found,
            dev_roles,
        };
        sb.validate()?;
        Ok(sb)
    }

    /// Structural checks on the decoded fields (the kernel's, plus what a RAID1
    /// reader needs so that later arithmetic cannot overflow).
    pub fn validate(&self) -> Result<(), SuperblockError> {
        if self.data_size < 10 {
            return Err(SuperblockError::field(
                "data_size",
                self.data_size,
                "fewer than 10 sectors of data",
            ));
        }
        let sb_sectors = (self.sb_len() as u64).div_ceil(512);
        if self.data_offset < self.super_offset.saturating_add(sb_sectors)
            && self.super_offset < self.data_offset.saturating_add(self.data_size)
        {
            return Err(SuperblockError::field(
                "data_offset",
                self.data_offset,
                "the data area overlaps the superblock",
            ));
        }
        if self.data_offset.checked_add(self.data_size).is_none()
            || self.data_offset.saturating_add(self.data_size) > (u64::MAX >> 9)
        {
            return Err(SuperblockError::field(
                "data_size",
                self.data_size,
                "data_offset + data_size overflows",
            ));
        }
        if self.super_offset > (u64::MAX >> 9) - 8 {
            return Err(SuperblockError::field(
                "super_offset",
                self.super_offset,
                "beyond any device",
            ));
        }
        Ok(())
    }

    /// Checks against the device the superblock was read from: it must have been read
    /// at `super_offset`, and the data area must fit on the device.
    pub fn check_device(
        &self,
        read_at_sector: u64,
        device_sectors: u64,
    ) -> Result<(), SuperblockError> {
        if self.super_offset != read_at_sector {
            return Err(SuperblockError::field(
                "super_offset",
                self.super_offset,
                "does not match where the superblock was found",
            ));
        }
        let end = self.data_offset.saturating_add(self.data_size);
        if end > device_sectors {
            return Err(SuperblockError::Field {
                field: "data_size",
                value: self.data_size.to_string(),
                why: "the data area ends beyond the end of the device (truncated leg?)",
            });
        }
        Ok(())
    }

    /// RAID1-specific checks for serving: level, size, roles.
    pub fn check_raid1(&self) -> Result<(), SuperblockError> {
        if self.level != 1 {
            return Err(SuperblockError::field(
                "level",
                self.level,
                "only RAID1 (level 1) is served",
            ));
        }
        if self.size > self.data_size {
            return Err(SuperblockError::field(
                "size",
                self.size,
                "array size is larger than this leg's data_size",
            ));
        }
        if self.raid_disks == 0 || self.raid_disks > MAX_DEVS {
            return Err(SuperblockError::field(
                "raid_disks",
                self.raid_disks,
                "must be between 1 and 1920",
            ));
        }
        let unsupported = feature::RESHAPE_ACTIVE
            | feature::BAD_BLOCKS
            | feature::REPLACEMENT
            | feature::RESHAPE_BACKWARDS
            | feature::NEW_OFFSET
            | feature::JOURNAL
            | feature::PPL
            | feature::MULTIPLE_PPLS
            | feature::RAID0_LAYOUT;
        if self.feature_map & unsupported != 0 {
            return Err(SuperblockError::field(
                "feature_map",
                format!("{:#x}", self.feature_map),
                "reshape, bad-block list, replacement, journal and PPL are not supported",
            ));
        }
        Ok(())
    }

    /// Encodes into one 4 KiB block with a freshly computed checksum. Bytes after
    /// `dev_roles[max_dev - 1]` are zero.
    pub fn encode(&self) -> Vec<u8> {
        let len = self.sb_len().max(SB_BLOCK_LEN);
        let mut b = vec![0u8; len];
        put32(&mut b, 0, SB_MAGIC);
        put32(&mut b, 4, 1);
        put32(&mut b, 8, self.feature_map);
        b[16..32].copy_from_slice(&self.set_uuid.0);
        b[32..64].copy_from_slice(&self.set_name);
        put64(&mut b, 64, self.ctime);
        put32(&mut b, 72, self.level as u32);
        put32(&mut b, 76, self.layout);
        put64(&mut b, 80, self.size);
        put32(&mut b, 88, self.chunksize);
        put32(&mut b, 92, self.raid_disks);
        put32(&mut b, 96, self.bitmap_offset as u32);
        put32(&mut b, 100, self.new_level);
        put64(&mut b, 104, self.reshape_position);
        put32(&mut b, 112, self.delta_disks);
        put32(&mut b, 116, self.new_layout);
        put32(&mut b, 120, self.new_chunk);
        put32(&mut b, 124, self.new_offset as u32);
        put64(&mut b, 128, self.data_offset);
        put64(&mut b, 136, self.data_size);
        put64(&mut b, 144, self.super_offset);
        put64(&mut b, 152, self.recovery_offset);
        put32(&mut b, 160, self.dev_number);
        put32(&mut b, 164, self.cnt_corrected_read);
        b[168..184].copy_from_slice(&self.device_uuid.0);
        b[184] = self.devflags;
        b[185] = self.bblog_shift;
        put16(&mut b, 186, self.bblog_size);
        put32(&mut b, 188, self.bblog_offset as u32);
        put64(&mut b, 192, self.utime);
        put64(&mut b, 200, self.events);
        put64(&mut b, 208, self.resync_offset);
        put32(&mut b, 220, self.max_dev());
        for (i, r) in self.dev_roles.iter().enumerate() {
            put16(&mut b, SB_FIXED_LEN + 2 * i, *r);
        }
        let csum = checksum(&b, self.max_dev());
        put32(&mut b, 216, csum);
        b
    }

    /// Array state as `mdadm -E` prints it: one character per mirror slot,
    /// 'A' (one device has the role), '.' (none), 'R' (two: replacing), '?' (more).
    ///
    /// Roles from `role::MAX` up are special values, not slots, so at most
    /// `role::MAX` slots are shown however large `raid_disks` is.
    pub fn array_state(&self) -> String {
        let slots = self.raid_disks.min(u32::from(role::MAX)) as usize;
        let mut holders = vec![0u8; slots];
        for &r in &self.dev_roles {
            if let Some(n) = holders.get_mut(usize::from(r)) {
                *n = n.saturating_add(1);
            }
        }
        holders
            .iter()
            .map(|n| match n {
                0 => '.',
                1 => 'A',
                2 => 'R',
                _ => '?',
            })
            .collect()
    }
}

/// Low 40 bits of an md time field: seconds since the epoch.
pub fn time_seconds(t: u64) -> u64 {
    t & 0xff_ffff_ffff
}

#[cfg(test)]
mod tests;

//! Write-intent bitmaps: the 256-byte bitmap superblock (`bitmap_super_t`, versions 4
//! and clustered 5), the bit array, and where each node's bitmap lives on a leg.

use super::bytes::{array, c_str, le32, le64, put32, put64};
use super::uuid::Uuid;

/// `BITMAP_MAGIC` ("bitm").
pub const BITMAP_MAGIC: u32 = 0x6d74_6962;
/// Size of the bitmap superblock; the bits follow it.
pub const BITMAP_SB_LEN: usize = 256;
/// Version 4: little-endian bit order (`BITMAP_MAJOR_HI`).
pub const VERSION_PLAIN: u32 = 4;
/// Version 5: clustered, one bitmap per node slot (`BITMAP_MAJOR_CLUSTERED`).
pub const VERSION_CLUSTERED: u32 = 5;
/// Per-node bitmaps are laid out in units of 4 KiB, whatever the page size.
pub const SLOT_ALIGN: u64 = 4096;
/// Largest `write_behind` the kernel accepts (`COUNTER_MAX`).
pub const WRITE_BEHIND_MAX: u32 = 16383;
/// Default seconds between bitmap daemon passes.
pub const DEFAULT_DAEMON_SLEEP: u32 = 5;

/// `state` bits.
pub mod state {
    /// The bitmap is out of date: the whole array needs a resync.
    pub const STALE: u32 = 0x2;
    /// A bitmap write failed (never persisted by the kernel).
    pub const WRITE_ERROR: u32 = 0x4;
}

/// Why a bitmap superblock was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// Fewer bytes than needed.
    #[error("bitmap truncated: {len} bytes available, {need} needed")]
    Truncated {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// No bitmap superblock here.
    #[error("no bitmap superblock: field magic is {found:#010x}, expected 0x6d746962")]
    Magic {
        /// The value found.
        found: u32,
    },
    /// A field holds an impossible or unsupported value.
    #[error("bitmap field {field} is {value}: {why}")]
    Field {
        /// The field's name as in `bitmap_super_t`.
        field: &'static str,
        /// The value found.
        value: String,
        /// What was expected.
        why: &'static str,
    },
}

impl BitmapError {
    fn field(field: &'static str, value: impl ToString, why: &'static str) -> Self {
        BitmapError::Field {
            field,
            value: value.to_string(),
            why,
        }
    }
}

/// A decoded bitmap superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSuper {
    /// 4 (plain) or 5 (clustered).
    pub version: u32,
    /// Must equal the md superblock's `set_uuid`.
    pub uuid: Uuid,
    /// md `events` at the last write of this bitmap superblock.
    pub events: u64,
    /// md `events` when bits were last cleared.
    pub events_cleared: u64,
    /// Sectors covered.
    pub sync_size: u64,
    /// `state` bits.
    pub state: u32,
    /// Bytes per bit.
    pub chunksize: u32,
    /// Seconds between daemon passes.
    pub daemon_sleep: u32,
    /// Max outstanding write-behind writes.
    pub write_behind: u32,
    /// Sectors reserved (informational).
    pub sectors_reserved: u32,
    /// Number of per-node bitmaps (clustered only).
    pub nodes: u32,
    /// Corosync cluster name, NUL-padded.
    pub cluster_name: [u8; 64],
}

impl BitmapSuper {
    /// Decodes and validates the 256-byte bitmap superblock at the start of `buf`.
    pub fn decode(buf: &[u8]) -> Result<BitmapSuper, BitmapError> {
        if buf.len() < BITMAP_SB_LEN {
            return Err(BitmapError::Truncated {
                len: buf.len(),
                need: BITMAP_SB_LEN,
            });
        }
        let magic = le32(buf, 0);
        if magic != BITMAP_MAGIC {
            return Err(BitmapError::Magic { found: magic });
        }
        let version = le32(buf, 4);
        match version {
            VERSION_PLAIN | VERSION_CLUSTERED => {}
            3 => {
                return Err(BitmapError::field(
                    "version",
                    3,
                    "host-endian bitmaps (version 3) are not supported",
                ))
            }
            6 => {
                return Err(BitmapError::field(
                    "version",
                    6,
                    "lockless bitmaps (version 6) are not supported",
                ))
            }
            v => return Err(BitmapError::field("version", v, "expected 4 or 5")),
        }
        let chunksize = le32(buf, 52);
        if chunksize < 512 || !chunksize.is_power_of_two() {
            return Err(BitmapError::field(
                "chunksize",
                chunksize,
                "must be a power of two of at least 512 bytes",
            ));
        }
        let daemon_sleep = le32(buf, 56);
        if daemon_sleep == 0 || daemon_sleep > 86_400 * 365 {
            return Err(BitmapError::field(
                "daemon_sleep",
                daemon_sleep,
                "must be at least 1 second",
            ));
        }
        let write_behind = le32(buf, 60);
        if write_behind > WRITE_BEHIND_MAX {
            return Err(BitmapError::field(
                "write_behind",
                write_behind,
                "must be at most 16383",
            ));
        }
        let sync_size = le64(buf, 40);
        if sync_size > (u64::MAX >> 9) {
            return Err(BitmapError::field(
                "sync_size",
                sync_size,
                "beyond any device",
            ));
        }
        Ok(BitmapSuper {
            version,
            uuid: Uuid(array(buf, 8)),
            events: le64(buf, 24),
            events_cleared: le64(buf, 32),
            sync_size,
            state: le32(buf, 48),
            chunksize,
            daemon_sleep,
            write_behind,
            sectors_reserved: le32(buf, 64),
            nodes: le32(buf, 68),
            cluster_name: array(buf, 72),
        })
    }

    /// Encodes the 256-byte superblock.
    pub fn encode(&self) -> [u8; BITMAP_SB_LEN] {
        let mut b = [0u8; BITMAP_SB_LEN];
        put32(&mut b, 0, BITMAP_MAGIC);
        put32(&mut b, 4, self.version);
        b[8..24].copy_from_slice(&self.uuid.0);
        put64(&mut b, 24, self.events);
        put64(&mut b, 32, self.events_cleared);
        put64(&mut b, 40, self.sync_size);
        put32(&mut b, 48, self.state);
        put32(&mut b, 52, self.chunksize);
        put32(&mut b, 56, self.daemon_sleep);
        put32(&mut b, 60, self.write_behind);
        put32(&mut b, 64, self.sectors_reserved);
        put32(&mut b, 68, self.nodes);
        b[72..136].copy_from_slice(&self.cluster_name);
        b
    }

    /// The kernel's rule: version 5 with at least one node is a clustered bitmap.
    pub fn is_clustered(&self) -> bool {
        self.version == VERSION_CLUSTERED && self.nodes > 0
    }

    /// Number of per-node bitmaps on each leg (1 for a plain bitmap).
    pub fn slots(&self) -> u32 {
        if self.is_clustered() {
            self.nodes
        } else {
            1
        }
    }

    /// Cluster name up to its first NUL, lossily as text.
    pub fn cluster_name(&self) -> String {
        String::from_utf8_lossy(c_str(&self.cluster_name)).into_owned()
    }

    /// Sets the cluster name (at most 63 bytes, NUL-terminated).
    pub fn set_cluster_name(&mut self, name: &str) {
        self.cluster_name = [0; 64];
        let n = name.len().min(63);
        self.cluster_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    }

    /// The geometry this superblock describes.
    pub fn geometry(&self) -> BitmapGeometry {
        BitmapGeometry {
            sync_size: self.sync_size,
            chunksize: self.chunksize,
        }
    }
}

/// Size arithmetic of one node's bitmap: how many chunks, and how far apart the
/// per-node bitmaps are (the same formula in the kernel and mdadm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapGeometry {
    /// Sectors covered.
    pub sync_size: u64,
    /// Bytes per bit (power of two, at least 512).
    pub chunksize: u32,
}

impl BitmapGeometry {
    /// A geometry; `chunksize` must be a power of two of at least 512 bytes.
    pub fn new(sync_size: u64, chunksize: u32) -> Result<Self, BitmapError> {
        if chunksize < 512 || !chunksize.is_power_of_two() {
            return Err(BitmapError::field(
                "chunksize",
                chunksize,
                "must be a power of two of at least 512 bytes",
            ));
        }
        Ok(BitmapGeometry {
            sync_size,
            chunksize,
        })
    }

    /// Sectors per chunk.
    pub fn chunk_sectors(&self) -> u64 {
        u64::from(self.chunksize / 512).max(1)
    }

    /// Number of bits (chunks): `ceil(sync_size / chunk_sectors)`.
    pub fn chunks(&self) -> u64 {
        self.sync_size.div_ceil(self.chunk_sectors())
    }

    /// Bytes of the bit array.
    pub fn bits_len(&self) -> u64 {
        self.chunks().div_ceil(8)
    }

    /// Bytes of one node's bitmap (superblock + bits), rounded up to 4 KiB.
    pub fn slot_len(&self) -> u64 {
        (self.bits_len() + BITMAP_SB_LEN as u64).div_ceil(SLOT_ALIGN) * SLOT_ALIGN
    }

    /// The chunk that holds array sector `sector`.
    pub fn chunk_of(&self, sector: u64) -> u64 {
        sector / self.chunk_sectors()
    }

    /// First array sector of `chunk`.
    pub fn chunk_start(&self, chunk: u64) -> u64 {
        chunk.saturating_mul(self.chunk_sectors())
    }

    /// Byte offset on a leg of node `slot`'s bitmap superblock, given the md
    /// superblock's `super_offset` and `bitmap_offset` (sectors).
    pub fn slot_offset(&self, super_offset: u64, bitmap_offset: i32, slot: u32) -> Option<u64> {
        let first = super_offset.checked_add_signed(i64::from(bitmap_offset))?;
        first
            .checked_mul(512)?
            .checked_add(u64::from(slot).checked_mul(self.slot_len())?)
    }
}

/// The bit array of one node's bitmap: bit `j` is byte `j / 8`, mask `1 << (j % 8)`.
#[derive(Clone, PartialEq, Eq)]
pub struct BitmapBits {
    bytes: Vec<u8>,
    chunks: u64,
}

impl std::fmt::Debug for BitmapBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BitmapBits({} chunks, {} dirty)",
            self.chunks,
            self.count_dirty()
        )
    }
}

impl BitmapBits {
    /// All-clear bits for `chunks` chunks.
    pub fn new(chunks: u64) -> Self {
        BitmapBits {
            bytes: vec![0; chunks.div_ceil(8) as usize],
            chunks,
        }
    }

    /// Takes the bit array as stored (the bytes after the bitmap superblock); bytes
    /// beyond `ceil(chunks / 8)` are ignored, and bits past `chunks` in the last byte
    /// are kept but never counted.
    pub fn from_bytes(buf: &[u8], chunks: u64) -> Result<Self, BitmapError> {
        let need = chunks.div_ceil(8);
        if (buf.len() as u64) < need {
            return Err(BitmapError::Truncated {
                len: buf.len(),
                need: need as usize,
            });
        }
        Ok(BitmapBits {
            bytes: buf[..need as usize].to_vec(),
            chunks,
        })
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether chunk `j` is dirty. Out-of-range chunks read as clean.
    pub fn get(&self, j: u64) -> bool {
        j < self.chunks && self.bytes[(j / 8) as usize] & (1 << (j % 8)) != 0
    }

    /// Marks chunk `j` dirty (ignored when out of range).
    pub fn set(&mut self, j: u64) {
        if j < self.chunks {
            self.bytes[(j / 8) as usize] |= 1 << (j % 8);
        }
    }

    /// Marks chunk `j` clean (ignored when out of range).
    pub fn clear(&mut self, j: u64) {
        if j < self.chunks {
            self.bytes[(j / 8) as usize] &= !(1 << (j % 8));
        }
    }

    /// Sets every chunk.
    pub fn set_all(&mut self) {
        for j in 0..self.chunks {
            self.set(j);
        }
    }

    /// Number of dirty chunks among the first `chunks` bits.
    pub fn count_dirty(&self) -> u64 {
        let full = (self.chunks / 8) as usize;
        let mut n: u64 = self.bytes[..full]
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum();
        let rest = self.chunks % 8;
        if rest > 0 {
            let mask = (1u8 << rest) - 1;
            n += u64::from((self.bytes[full] & mask).count_ones());
        }
        n
    }

    /// The dirty chunks in increasing order.
    pub fn dirty(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.chunks).filter(|&j| self.get(j))
    }

    /// Keeps only the chunks dirty in `other` too (same geometry).
    pub fn keep_common(&mut self, other: &BitmapBits) {
        for (b, o) in self.bytes.iter_mut().zip(&other.bytes) {
            *b &= o;
        }
    }

    /// ORs `other` into `self` (same geometry); returns how many chunks became dirty.
    pub fn merge(&mut self, other: &BitmapBits) -> u64 {
        let before = self.count_dirty();
        for j in other.dirty() {
            self.set(j);
        }
        self.count_dirty() - before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BitmapSuper {
        let mut s = BitmapSuper {
            version: VERSION_CLUSTERED,
            uuid: "3578507b:e0cb6d4f:6322696c:d7b1b10c".parse().unwrap(),
            events: 10,
            events_cleared: 10,
            sync_size: 129_024,
            state: 0,
            chunksize: 64 << 20,
            daemon_sleep: 5,
            write_behind: 0,
            sectors_reserved: 0,
            nodes: 4,
            cluster_name: [0; 64],
        };
        s.set_cluster_name("vumdtest");
        s
    }

    #[test]
    fn appendix_a_bitmap_bytes() {
        let b = sample().encode();
        assert_eq!(&b[0..8], &[0x62, 0x69, 0x74, 0x6d, 5, 0, 0, 0]);
        assert_eq!(
            &b[0x30..0x40],
            &[0, 0, 0, 0, 0, 0, 0, 4, 5, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&b[0x40..0x50], b"\0\0\0\0\x04\0\0\0vumdtest");
        assert_eq!(BitmapSuper::decode(&b).unwrap(), sample());
    }

    #[test]
    fn slot_placement_matches_spec_examples() {
        // 10 GiB legs, 64 MiB chunk: 160 bits -> one 4 KiB block per node.
        let g = BitmapGeometry::new(10 << 21, 64 << 20).unwrap();
        assert_eq!(g.chunks(), 160);
        assert_eq!(g.slot_len(), 4096);
        assert_eq!(g.slot_offset(8, 8, 3), Some(8192 + 3 * 4096));
        // 16 TiB, 64 MiB chunk: 262144 bits = 32768 B + 256 -> 9 blocks.
        let g = BitmapGeometry::new(16 << 31, 64 << 20).unwrap();
        assert_eq!(g.slot_len(), 9 * 4096);
        // chunk 1 KiB, sync_size 129021: 64511 bits -> 8064 + 256 -> 3 blocks.
        let g = BitmapGeometry::new(129_021, 1024).unwrap();
        assert_eq!(g.chunks(), 64_511);
        assert_eq!(g.slot_len(), 3 * 4096);
        assert_eq!(g.slot_offset(8, 8, 3).unwrap() / 512, 88);
        // chunk 512 B, 129024 sectors: 16128 + 256 bytes = exactly 4 blocks.
        let g = BitmapGeometry::new(129_024, 512).unwrap();
        assert_eq!(g.slot_len(), 16384);
    }

    #[test]
    fn bit_order_is_lsb_first_and_tail_is_ignored() {
        let mut raw = vec![0u8; 8064];
        raw[1] = 0b0000_0010; // bit 9
        raw[8063] = 0b1100_0000; // bits 64510 and 64511 (beyond 64511 chunks)
        let bits = BitmapBits::from_bytes(&raw, 64_511).unwrap();
        assert!(bits.get(9));
        assert!(bits.get(64_510));
        assert!(!bits.get(64_511));
        assert_eq!(bits.count_dirty(), 2);
        assert_eq!(bits.dirty().collect::<Vec<_>>(), vec![9, 64_510]);
    }

    #[test]
    fn refusals_name_the_field() {
        let mut b = sample().encode();
        b[4] = 3;
        assert!(BitmapSuper::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("version 3"));
        let mut b = sample().encode();
        put32(&mut b, 52, 3000);
        assert!(BitmapSuper::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("chunksize"));
        let mut b = sample().encode();
        b[0] = b'x';
        assert!(matches!(
            BitmapSuper::decode(&b),
            Err(BitmapError::Magic { .. })
        ));
        assert!(matches!(
            BitmapSuper::decode(&b[..100]),
            Err(BitmapError::Truncated { .. })
        ));
    }
}

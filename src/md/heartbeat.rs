//! The multi-host heartbeat block: proof that a host serves an array alone.
//!
//! An array served with the local lock manager has no lock another host can see.
//! On shared LUNs every host sees the legs, so a node that serves such an array
//! keeps a heartbeat on each leg, as ext4's MMP and ZFS's `multihost` do: a block
//! it rewrites every interval with a growing sequence number. A node about to
//! serve reads it first; if it moves, another host serves the legs and the start is
//! refused.
//!
//! Where: the first 4 KiB of a leg with a v1.2 superblock. md 1.2 puts its
//! superblock 4 KiB into the device and leaves the space before it to other uses
//! (partition tables, boot loaders); neither the kernel nor mdadm reads or writes
//! it. One 4 KiB block keeps direct I/O aligned on 4 KiB-sector devices too.
//!
//! The block (little-endian; the rest of the 4 KiB is zero):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VUMDHB01` |
//! | 8 | 8 | sequence number |
//! | 16 | 8 | nonce: random, one per run of a node |
//! | 24 | 8 | writer's wall clock, ms since the epoch (for messages) |
//! | 32 | 4 | writer's interval, ms |
//! | 36 | 4 | state: 1 starting, 2 serving, 3 stopped |
//! | 40 | 4 | writer's pid |
//! | 44 | 4 | reserved (0) |
//! | 48 | 16 | array uuid |
//! | 64 | 64 | writer's host name, NUL padded |
//! | 128 | 16 | writer's boot id (`/proc/sys/kernel/random/boot_id`): which host and boot |
//! | 144 | 8 | writer's pid namespace (inode of `/proc/self/ns/pid`): whom its pid means something to |
//! | 508 | 4 | FNV-1a 32 of bytes 0..508 |

use super::Uuid;

/// Byte offset of the heartbeat block on a leg.
pub const OFFSET: u64 = 0;
/// Length of the heartbeat block.
pub const LEN: usize = 4096;
/// The first bytes of a heartbeat block.
pub const MAGIC: &[u8; 8] = b"VUMDHB01";
/// The superblock offset (sectors) that leaves the heartbeat block free (v1.2).
pub const FREE_BELOW_SUPER_OFFSET: u64 = 8;

const CSUM_AT: usize = 508;
const HOST_AT: usize = 64;
const HOST_LEN: usize = 64;
const BOOT_AT: usize = 128;
const PIDNS_AT: usize = 144;

/// What the writer was doing when it last wrote the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Checking that nobody else starts on the legs at the same moment.
    Starting,
    /// Serving: the block moves every interval.
    Serving,
    /// Stopped cleanly: nobody serves the legs.
    Stopped,
}

impl State {
    fn code(self) -> u32 {
        match self {
            State::Starting => 1,
            State::Serving => 2,
            State::Stopped => 3,
        }
    }
    fn from_code(c: u32) -> Option<State> {
        match c {
            1 => Some(State::Starting),
            2 => Some(State::Serving),
            3 => Some(State::Stopped),
            _ => None,
        }
    }
}

/// A decoded heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// Grows by one at every write of a run.
    pub seq: u64,
    /// Random, one per run of a node.
    pub nonce: u64,
    /// The writer's clock, ms since the epoch.
    pub time_ms: u64,
    /// The writer's interval between two writes, ms.
    pub interval_ms: u32,
    /// What the writer was doing.
    pub state: State,
    /// The writer's pid.
    pub pid: u32,
    /// The array the writer served.
    pub array: Uuid,
    /// The writer's host name.
    pub host: String,
    /// The writer's boot id: unique to one boot of one host.
    pub boot: [u8; 16],
    /// The writer's pid namespace (its pid means nothing in another one).
    pub pid_ns: u64,
}

/// What the heartbeat block of a leg holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// Zeroes: never written.
    Empty,
    /// A heartbeat.
    Heartbeat(Heartbeat),
    /// Our magic but a wrong checksum or state: a write torn or in progress.
    Torn,
    /// Something else (e.g. an old partition table): not ours to overwrite.
    Other,
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl Heartbeat {
    /// The 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.nonce.to_le_bytes());
        b[24..32].copy_from_slice(&self.time_ms.to_le_bytes());
        b[32..36].copy_from_slice(&self.interval_ms.to_le_bytes());
        b[36..40].copy_from_slice(&self.state.code().to_le_bytes());
        b[40..44].copy_from_slice(&self.pid.to_le_bytes());
        b[48..64].copy_from_slice(&self.array.0);
        let host = self.host.as_bytes();
        let n = host.len().min(HOST_LEN);
        b[HOST_AT..HOST_AT + n].copy_from_slice(&host[..n]);
        b[BOOT_AT..BOOT_AT + 16].copy_from_slice(&self.boot);
        b[PIDNS_AT..PIDNS_AT + 8].copy_from_slice(&self.pid_ns.to_le_bytes());
        let c = fnv1a(&b[..CSUM_AT]);
        b[CSUM_AT..CSUM_AT + 4].copy_from_slice(&c.to_le_bytes());
        b
    }
}

/// Reads a heartbeat block (at least [`LEN`] bytes; shorter input is `Other`).
pub fn decode(b: &[u8]) -> Block {
    if b.len() < LEN {
        return Block::Other;
    }
    let b = &b[..LEN];
    if b.iter().all(|&x| x == 0) {
        return Block::Empty;
    }
    if &b[0..8] != MAGIC {
        return Block::Other;
    }
    if fnv1a(&b[..CSUM_AT]) != u32_at(b, CSUM_AT) {
        return Block::Torn;
    }
    let Some(state) = State::from_code(u32_at(b, 36)) else {
        return Block::Torn;
    };
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[48..64]);
    let host = &b[HOST_AT..HOST_AT + HOST_LEN];
    let end = host.iter().position(|&c| c == 0).unwrap_or(HOST_LEN);
    let mut boot = [0u8; 16];
    boot.copy_from_slice(&b[BOOT_AT..BOOT_AT + 16]);
    Block::Heartbeat(Heartbeat {
        seq: u64_at(b, 8),
        nonce: u64_at(b, 16),
        time_ms: u64_at(b, 24),
        interval_ms: u32_at(b, 32),
        state,
        pid: u32_at(b, 40),
        array: Uuid(uuid),
        host: String::from_utf8_lossy(&host[..end]).into_owned(),
        boot,
        pid_ns: u64_at(b, PIDNS_AT),
    })
}

/// How long a node about to serve watches a heartbeat written with interval
/// `interval_ms` before it concludes that its writer is gone: the writer fences
/// itself when it could not write for [`SELF_FENCE_INTERVALS`] intervals, and this
/// waits longer than that.
pub fn takeover_wait_ms(interval_ms: u32) -> u64 {
    u64::from(interval_ms.max(1)) * TAKEOVER_INTERVALS + TAKEOVER_SLACK_MS
}

/// A serving node that has not written its heartbeat for this many intervals
/// stops writing data: a starting node may conclude it is gone.
pub const SELF_FENCE_INTERVALS: u64 = 3;
/// Intervals a starting node watches a live-looking heartbeat.
pub const TAKEOVER_INTERVALS: u64 = 5;
/// Added to the watch, for clocks and scheduling.
pub const TAKEOVER_SLACK_MS: u64 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    fn hb() -> Heartbeat {
        Heartbeat {
            seq: 42,
            nonce: 0x1234_5678_9abc_def0,
            time_ms: 1_796_000_000_000,
            interval_ms: 1000,
            state: State::Serving,
            pid: 4321,
            array: Uuid([7; 16]),
            host: "host-a".into(),
            boot: [9; 16],
            pid_ns: 4026531836,
        }
    }

    #[test]
    fn a_heartbeat_reads_back_as_written() {
        let b = hb().encode();
        assert_eq!(b.len(), LEN);
        assert_eq!(&b[..8], MAGIC);
        assert!(b[512..].iter().all(|&x| x == 0));
        assert_eq!(decode(&b), Block::Heartbeat(hb()));
        let long = Heartbeat {
            host: "h".repeat(100),
            ..hb()
        };
        match decode(&long.encode()) {
            Block::Heartbeat(h) => assert_eq!(h.host, "h".repeat(64)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn zeroes_others_and_torn_blocks_are_told_apart() {
        assert_eq!(decode(&vec![0u8; LEN]), Block::Empty);
        let mut mbr = vec![0u8; LEN];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(decode(&mbr), Block::Other);
        let mut torn = hb().encode();
        torn[8] ^= 1;
        assert_eq!(decode(&torn), Block::Torn);
        assert_eq!(decode(&hb().encode()[..100]), Block::Other);
        let mut bad_state = hb().encode();
        bad_state[36] = 9;
        let c = fnv1a(&bad_state[..CSUM_AT]);
        bad_state[CSUM_AT..CSUM_AT + 4].copy_from_slice(&c.to_le_bytes());
        assert_eq!(decode(&bad_state), Block::Torn);
    }

    #[test]
    fn the_takeover_wait_outlasts_the_writers_self_fence() {
        for i in [100u32, 1000, 5000] {
            assert!(takeover_wait_ms(i) > u64::from(i) * SELF_FENCE_INTERVALS + u64::from(i));
        }
        assert_eq!(takeover_wait_ms(1000), 6000);
    }
}

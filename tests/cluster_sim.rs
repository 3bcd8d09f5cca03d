//! Deterministic simulation of the md-cluster protocol.
//!
//! Each seed builds a clustered mirror on in-memory legs (in 15 % of the seeds
//! with 4 KiB logical blocks: the guests then read and write whole 4 KiB blocks,
//! as their front-end is told; see below), starts two or three cluster nodes on one
//! in-process lock manager and lets a seeded random number generator choose what
//! happens: writes, reads, flushes and bitmap daemon passes by the nodes, hosts
//! that crash (in the middle of a write, of a daemon pass, of a recovery, or idle),
//! delays in leg I/O and lock requests, writes and restarts racing a recovery,
//! nodes starting at the same moment (on the fresh array, or guests restarting
//! together; each waits for a slot as a starting node does), an operator failing
//! and re-adding legs, the lock manager dying (in 25 % of the seeds, at 1 % of the
//! steps; between operations or at a leg write of a write: every lock is gone at
//! once; each node fences itself, as a served node does, and once the lock manager
//! is back every guest's node starts over, as a served node executes itself
//! anew), and leg faults (below).
//! Operations are issued from one thread in seeded order; only what the protocol
//! makes concurrent (message receipt, watches, and the writers and joiners started
//! on purpose during a recovery) runs elsewhere, and no outcome checked here may
//! depend on its timing.
//!
//! Leg faults (in 40 % of the seeds): a leg's device (every host sees it) fails
//! writes with EIO, or with ENOSPC from some byte of the data area on (a full thin
//! pool: metadata written before is rewritten fine), or reads with EIO; or its
//! transfers are short: continued (a write or read done in two transfers at a
//! block boundary, as `FileLeg` and the io_uring path continue a short one; the
//! host may crash between the two, tearing the write), or stopped (a part, then
//! nothing: the error without an errno that `FileLeg` returns). A leg's I/O calls
//! only see complete transfers or errors, so this is where a short transfer can be
//! put under the product; the continuation loops themselves work on file
//! descriptors (`FileLeg`'s around preadv/pwritev, the ring completions of
//! `raid1::aio`, which a unit test feeds short completions).
//! A fault starts after a seeded number of the device's I/O calls of its kind. It
//! is armed at a step, while a node recovers a dead node's slot (the merge of its
//! bitmap, the take-over of its rebuilds, the resync of its dirty chunks), or while
//! a node joins (the merge of the free slots' bitmaps); one at a time, never while
//! racing work is in flight. The operator repairs the device later (at a step,
//! after a recovery or a join failed, before re-adding a leg, at the end) and
//! re-adds the legs the product failed.
//!
//! Checked for every seed:
//! - every acknowledged write reads back, through a live node and from every leg in
//!   service; a write a crash interrupted, or that failed, reads back as either its
//!   old or its new data;
//! - after the survivors recovered a dead node, all legs' data areas are identical,
//!   the dead node's bitmap slot is clean on every leg and no live node still needs
//!   a resync;
//! - between operations, every live node holds the same legs faulty, each failed by
//!   the operator or after a fault hit it, and keeps an in-sync leg (the last one is
//!   never failed); the superblocks of the legs in service mark exactly those faulty;
//! - an operation fails only while every in-sync leg has a fault that fails I/O
//!   (a continued short transfer fails nothing);
//! - a node that holds a dead node's slot recovers it (a failed recovery is retried);
//! - nodes starting at the same moment all join while slots are free, each in a
//!   slot of its own;
//! - while the lock manager is gone, the fenced nodes write nothing (the legs do not
//!   change) and still serve reads; the nodes that start over take every slot's
//!   dirty bits over;
//! - on legs with 4 KiB blocks, no I/O of the product reaches the data area that is
//!   not whole blocks (a device would refuse it, a leg would read-modify-write the
//!   block; the superblock below the data is rewritten in place). A guest request
//!   that is not whole blocks is refused before the array, by the vhost request
//!   checks (`tests/serve_4kn.rs`), which take the block size from the legs' file
//!   descriptors: an in-memory leg has none, so the array itself cannot refuse it;
//! - nothing hangs and nothing panics.
//!
//! Environment:
//! - `SIM_SEEDS=N`: how many seeds (default 2000), starting at `SIM_SEED_START`
//!   (default 0);
//! - `SIM_SEED=S`: runs seed S alone and prints its trace (the replay of a failure);
//!   `SIM_REPEAT=R` runs it up to R times, until it fails (a failure may need the
//!   same interleaving of the threads);
//!   `RUST_LOG=info` adds the product's log;
//! - `SIM_THREADS=T`: seeds run on T threads (default 8; they mostly wait on each other);
//! - `SIM_STALL_SECS=S`: a seed that makes no progress for S seconds is a hang
//!   (default 60).
//!
//! A long run is cheaper optimized, checks kept: `cargo test --profile sim --test
//! cluster_sim` (see `Cargo.toml`).
//!
//! Known product issues are left out of the leg faults unless asked for:
//! - `SIM_FAULTS_STRICT_JOIN=1`: a node must start while one leg cannot be read;
//!   assembly refuses a leg whose metadata it cannot read, so the operator repairs
//!   the leg and starts the node again.
//! - `SIM_FAULTS_OPERATOR=1`: the operator also fails or re-adds a leg while
//!   another leg has a fault: the superblock update then reaches no in-sync leg (or
//!   only the leg being re-added), and the nodes disagree about the legs.
//! - `SIM_FAULTS_REBUILT_READS=1`: read faults also on a leg being rebuilt: the
//!   other nodes learn that its rebuild ended from its own superblock, which they
//!   cannot read then, and keep it recovering.
//!
//! Long file: the simulator is one state machine (nodes, legs, lock manager, faults
//! and the checks of every step), seeded as a whole.

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, IoSlice, IoSliceMut};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
/// A cluster node serving the array.
type ClusterNode = vhost_user_md::cluster::node::ClusterNode<vhost_user_md::raid1::Array>;
use vhost_user_md::dlm::local::{LocalDlm, LocalMember};
use vhost_user_md::dlm::{DlmError, Event, LockId, LockSpace, Mode, NodeId};
use vhost_user_md::md::superblock::{feature, role};
use vhost_user_md::md::Uuid;
use vhost_user_md::raid1::metadata::{create_array, LegMetadata, NewArray};
use vhost_user_md::raid1::LegState;
use vhost_user_md::storage::{Fence, FencedLeg, Leg, MemLeg};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// Node slots of every simulated array.
const SLOTS: u32 = 4;
/// How long a survivor may take to see a death, or an operation to finish.
const WAIT: Duration = Duration::from_secs(20);
/// Percentage of the seeds that inject leg faults.
const FAULT_SEEDS_PCT: u64 = 40;
/// Percentage of the seeds whose lock manager may die (at 1 % of the steps).
const LM_DEATH_SEEDS_PCT: u64 = 25;

// ---------------------------------------------------------------------------
// Randomness

/// splitmix64: small, fast, and the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `pct` percent.
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A short pause: a yield or a sleep of up to 200 µs.
    fn pause(&mut self) {
        if self.chance(50) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(self.below(200)));
        }
    }
}

// ---------------------------------------------------------------------------
// A host: its legs stop at a crash point, its lock requests may be delayed

#[derive(Default)]
struct HostState {
    /// Leg writes left before the host crashes (`None`: no crash planned).
    crash_after: Option<u64>,
    /// The host is dead: no I/O of it reaches a leg any more.
    dead: bool,
    /// Threads stopped at the crash point may return (with an error).
    released: bool,
    /// Leg writes left before the lock manager dies, and its death.
    lm_dies: Option<(u64, LmDeath)>,
}

/// What happens when the lock manager dies.
type LmDeath = Box<dyn FnOnce() + Send>;

/// One simulated host: the crash point and delays of its I/O.
/// Pauses a thread now and then (`pct` percent of the calls), to shake up the
/// interleavings.
struct Delay {
    rng: Mutex<Rng>,
    pct: u64,
}

impl Delay {
    fn new(seed: u64, pct: u64) -> Delay {
        Delay {
            rng: Mutex::new(Rng::new(seed)),
            pct,
        }
    }

    fn maybe(&self) {
        if self.pct == 0 {
            return;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        if rng.chance(self.pct) {
            rng.pause();
        }
    }
}

struct Host {
    state: Mutex<HostState>,
    cond: Condvar,
    /// Told when a thread of this host stopped at the crash point.
    crashed: Sender<()>,
    delay: Delay,
}

fn host_is_dead() -> io::Error {
    io::Error::other("the host of this node crashed")
}

impl Host {
    fn new(seed: u64, delay_pct: u64) -> (Arc<Host>, Receiver<()>) {
        let (tx, rx) = unbounded();
        let h = Host {
            state: Mutex::new(HostState::default()),
            cond: Condvar::new(),
            crashed: tx,
            delay: Delay::new(seed, delay_pct),
        };
        (Arc::new(h), rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HostState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before a leg write: counts down to the crash point; there the calling
    /// thread stops (as the host did) until the simulation ends.
    fn before_write(&self) -> io::Result<()> {
        self.delay.maybe();
        let mut st = self.lock();
        if st.dead {
            return Err(host_is_dead());
        }
        match st.lm_dies.take() {
            Some((0, die)) => {
                // The write goes on: it was issued before the fence went up.
                drop(st);
                die();
                st = self.lock();
            }
            Some((n, die)) => st.lm_dies = Some((n - 1, die)),
            None => {}
        }
        match st.crash_after {
            Some(0) => {
                st.dead = true;
                let _ = self.crashed.send(());
                while !st.released {
                    st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                Err(host_is_dead())
            }
            Some(n) => {
                st.crash_after = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn before_other(&self) -> io::Result<()> {
        self.delay.maybe();
        if self.lock().dead {
            return Err(host_is_dead());
        }
        Ok(())
    }

    /// Plans the crash at the `n`-th leg write from now.
    fn crash_after(&self, n: u64) {
        self.lock().crash_after = Some(n);
    }

    /// No crash planned any more (the operation finished before its crash point).
    fn cancel_crash(&self) {
        self.lock().crash_after = None;
    }

    /// The host dies now, between operations.
    fn crash_now(&self) {
        self.lock().dead = true;
    }

    /// The lock manager dies (`die`) at this host's `n`-th leg write from now.
    fn lm_dies_after(&self, n: u64, die: LmDeath) {
        self.lock().lm_dies = Some((n, die));
    }

    /// The lock manager's death if it did not come yet.
    fn lm_death_pending(&self) -> Option<LmDeath> {
        self.lock().lm_dies.take().map(|(_, die)| die)
    }

    /// At the end of the simulation: threads stopped at the crash point return.
    fn release(&self) {
        self.lock().released = true;
        self.cond.notify_all();
    }
}

// ---------------------------------------------------------------------------
// A leg's device: the faults every host sees on it

/// What a faulty device does, once its fault started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    /// Every write fails with EIO (the device or the path to it died).
    WriteEio,
    /// Writes that reach byte `from` or beyond fail with ENOSPC (a thin pool or
    /// an image file's file system ran full: blocks written before still are).
    NoSpace { from: u64 },
    /// Every read fails with EIO.
    ReadEio,
    /// Writes stop short: the device takes a part and then nothing more, which
    /// the storage layer reports as an error without an errno (as `FileLeg` does
    /// when a write transfers 0 bytes).
    StoppedWrite,
    /// Reads stop short the same way (`FileLeg`: a read that transfers 0 bytes).
    StoppedRead,
    /// Writes are short: the device takes them in two transfers, the storage
    /// layer continues the first (as `FileLeg` and the io_uring path do), and the
    /// host may crash between the two (a write torn at a sector boundary).
    SplitWrite,
    /// Reads are short and continued the same way.
    SplitRead,
}

impl FaultKind {
    fn on_writes(self) -> bool {
        matches!(
            self,
            FaultKind::WriteEio
                | FaultKind::NoSpace { .. }
                | FaultKind::StoppedWrite
                | FaultKind::SplitWrite
        )
    }

    /// Whether I/O calls it hits fail (a split transfer completes).
    fn fails(self) -> bool {
        !matches!(self, FaultKind::SplitWrite | FaultKind::SplitRead)
    }

    /// Whether reads it hits fail.
    fn fails_reads(self) -> bool {
        matches!(self, FaultKind::ReadEio | FaultKind::StoppedRead)
    }
}

/// What the device does with one I/O call.
enum Transfer {
    /// All of it.
    Whole,
    /// Nothing: the call fails.
    Fails(io::Error),
    /// The first `n` bytes, then the rest in a second transfer.
    Split(usize),
    /// The first `n` bytes, then nothing: the call fails without an errno.
    Stops(usize),
}

/// A fault armed on a device.
#[derive(Debug, Clone, Copy)]
struct Fault {
    kind: FaultKind,
    /// I/O calls of the kind it hits (reads or writes) left before it starts.
    after: u64,
}

/// One leg's device, shared by every host.
struct Device {
    fault: Mutex<Option<Fault>>,
    /// I/O calls the fault failed.
    hits: AtomicU64,
    /// I/O calls the fault split in two transfers.
    splits: AtomicU64,
    /// Writes that reached it.
    written: AtomicU64,
    /// Its logical block size (512 or 4096).
    block: u64,
    /// Byte offset of the data area.
    data_from: u64,
    /// The first I/O of the data area that was not whole blocks.
    misaligned: Mutex<Option<String>>,
}

impl Device {
    fn new(block: u64, data_from: u64) -> Device {
        Device {
            fault: Mutex::new(None),
            hits: AtomicU64::new(0),
            splits: AtomicU64::new(0),
            written: AtomicU64::new(0),
            block,
            data_from,
            misaligned: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Fault>> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms `kind` after `after` I/O calls of its kind.
    fn arm(&self, kind: FaultKind, after: u64) {
        *self.lock() = Some(Fault { kind, after });
    }

    /// The device is repaired (or replaced): no more faults.
    fn repair(&self) -> Option<FaultKind> {
        self.lock().take().map(|f| f.kind)
    }

    /// Whether a fault started (or is armed): `None`, or its kind.
    fn armed(&self) -> Option<FaultKind> {
        self.lock().map(|f| f.kind)
    }

    /// Counts an I/O call against the fault: what the device does with it.
    fn transfer(&self, write: bool, off: u64, len: u64) -> Transfer {
        // Data I/O that is not whole blocks: a device with 4 KiB blocks refuses it
        // (O_DIRECT), and a leg would read-modify-write the block around it,
        // under another node's or queue's write to the rest of the block. (Metadata
        // below the data is rewritten in place that way: the superblock's block
        // holds nothing else, and it is written under the cluster's token.)
        if off + len > self.data_from && (off % self.block != 0 || len % self.block != 0) {
            let mut m = self.misaligned.lock().unwrap_or_else(|e| e.into_inner());
            if m.is_none() {
                *m = Some(format!(
                    "a {len}-byte {} at byte {off}, not whole {}-byte blocks",
                    if write { "write" } else { "read" },
                    self.block
                ));
            }
        }
        let mut g = self.lock();
        let Some(f) = g.as_mut() else {
            return Transfer::Whole;
        };
        if f.kind.on_writes() != write {
            return Transfer::Whole;
        }
        if f.after > 0 {
            f.after -= 1;
            return Transfer::Whole;
        }
        // Transfers end at block boundaries (a block is written whole or not).
        let cut = (len / self.block / 2 * self.block) as usize;
        let t = match f.kind {
            FaultKind::NoSpace { from } if off + len <= from => Transfer::Whole,
            FaultKind::NoSpace { .. } => {
                Transfer::Fails(io::Error::from_raw_os_error(libc::ENOSPC))
            }
            FaultKind::WriteEio | FaultKind::ReadEio => {
                Transfer::Fails(io::Error::from_raw_os_error(libc::EIO))
            }
            FaultKind::StoppedWrite | FaultKind::StoppedRead => Transfer::Stops(cut),
            FaultKind::SplitWrite | FaultKind::SplitRead if cut > 0 => Transfer::Split(cut),
            FaultKind::SplitWrite | FaultKind::SplitRead => Transfer::Whole,
        };
        drop(g);
        match t {
            Transfer::Fails(_) | Transfer::Stops(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            Transfer::Split(_) => self.splits.fetch_add(1, Ordering::Relaxed),
            Transfer::Whole => 0,
        };
        t
    }

    /// A write-like call that moves no data (discard, write zeroes): fails or not.
    fn check_write(&self, off: u64, len: u64) -> io::Result<()> {
        match self.transfer(true, off, len) {
            Transfer::Fails(e) => Err(e),
            Transfer::Stops(_) => Err(stopped(true)),
            Transfer::Whole | Transfer::Split(_) => Ok(()),
        }
    }
}

/// The error of a transfer that stopped short, as `FileLeg` reports it.
fn stopped(write: bool) -> io::Error {
    if write {
        io::Error::new(io::ErrorKind::WriteZero, "wrote nothing")
    } else {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short read at the end of the leg",
        )
    }
}

/// A leg as one host sees it.
struct HostLeg {
    inner: Arc<MemLeg>,
    host: Arc<Host>,
    dev: Arc<Device>,
}

impl HostLeg {
    /// Writes to the device (counted).
    fn put(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.dev.written.fetch_add(1, Ordering::Relaxed);
        self.inner.write_at(buf, off)
    }
}

impl Leg for HostLeg {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.host.before_other()?;
        match self.dev.transfer(false, off, buf.len() as u64) {
            Transfer::Whole => self.inner.read_at(buf, off),
            Transfer::Fails(e) => Err(e),
            Transfer::Split(n) => {
                let (first, rest) = buf.split_at_mut(n);
                self.inner.read_at(first, off)?;
                self.host.before_other()?;
                self.inner.read_at(rest, off + n as u64)
            }
            Transfer::Stops(n) => {
                self.inner.read_at(&mut buf[..n], off)?;
                Err(stopped(false))
            }
        }
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.host.before_write()?;
        match self.dev.transfer(true, off, buf.len() as u64) {
            Transfer::Whole => self.put(buf, off),
            Transfer::Fails(e) => Err(e),
            Transfer::Split(n) => {
                self.put(&buf[..n], off)?;
                // The host may crash before the rest: the write is torn.
                self.host.before_write()?;
                self.put(&buf[n..], off + n as u64)
            }
            Transfer::Stops(n) => {
                self.put(&buf[..n], off)?;
                Err(stopped(true))
            }
        }
    }

    fn flush(&self) -> io::Result<()> {
        self.host.before_other()?;
        self.inner.flush()
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.host.before_write()?;
        self.dev.check_write(off, len)?;
        self.dev.written.fetch_add(1, Ordering::Relaxed);
        self.inner.discard(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.host.before_write()?;
        self.dev.check_write(off, len)?;
        self.dev.written.fetch_add(1, Ordering::Relaxed);
        self.inner.write_zeroes(off, len)
    }
}

/// A lockspace member whose requests may be delayed.
struct HostLs {
    inner: LocalMember,
    delay: Delay,
}

impl LockSpace for HostLs {
    fn node(&self) -> NodeId {
        self.inner.node()
    }

    fn lvb_len(&self) -> usize {
        self.inner.lvb_len()
    }

    fn lock(
        &self,
        name: &[u8],
        mode: Mode,
        fl: u32,
        lvb: Option<&[u8]>,
    ) -> Result<LockId, DlmError> {
        self.delay.maybe();
        self.inner.lock(name, mode, fl, lvb)
    }

    fn convert(
        &self,
        lock: LockId,
        mode: Mode,
        fl: u32,
        lvb: Option<&[u8]>,
    ) -> Result<(), DlmError> {
        self.delay.maybe();
        self.inner.convert(lock, mode, fl, lvb)
    }

    fn unlock(&self, lock: LockId, fl: u32, lvb: Option<&[u8]>) -> Result<(), DlmError> {
        self.delay.maybe();
        self.inner.unlock(lock, fl, lvb)
    }

    fn events(&self) -> Receiver<Event> {
        self.inner.events()
    }
}

// ---------------------------------------------------------------------------
// What the disk must hold

/// Sector contents: write `id` (0: never written, zeroes) at `sector`.
fn sector_data(id: u32, sector: u64, out: &mut [u8]) {
    if id == 0 {
        out.fill(0);
        return;
    }
    out.fill((id as u8).wrapping_mul(31) ^ (sector as u8) | 1);
    out[..4].copy_from_slice(&id.to_le_bytes());
    out[4..12].copy_from_slice(&sector.to_le_bytes());
}

fn sector_id(data: &[u8]) -> u32 {
    u32::from_le_bytes([data[0], data[1], data[2], data[3]])
}

/// The data every sector may hold.
struct Model {
    /// Per sector: the last acknowledged write (0: none).
    acked: Vec<u32>,
    /// Sectors a crash interrupted a write to: the writes they may hold instead.
    maybe: BTreeMap<u64, Vec<u32>>,
}

impl Model {
    /// Checks one sector read from anywhere; returns the write it holds.
    fn check(&self, sector: u64, data: &[u8], scratch: &mut [u8]) -> Result<u32, String> {
        let id = sector_id(data);
        let want = self.acked[sector as usize];
        let allowed = id == want
            || self
                .maybe
                .get(&sector)
                .is_some_and(|alts| alts.contains(&id));
        if allowed {
            sector_data(id, sector, scratch);
            if data == &scratch[..] {
                return Ok(id);
            }
        }
        Err(format!(
            "sector {sector} holds {} (write {id}), want write {want}{}",
            if allowed { "damaged data" } else { "data" },
            match self.maybe.get(&sector) {
                Some(m) => format!(" or one of the interrupted writes {m:?}"),
                None => String::new(),
            }
        ))
    }

    fn acknowledge(&mut self, id: u32, sector: u64, sectors: u64) {
        for s in sector..sector + sectors {
            self.acked[s as usize] = id;
            self.maybe.remove(&s);
        }
    }

    fn interrupted(&mut self, id: u32, sector: u64, sectors: u64) {
        for s in sector..sector + sectors {
            self.maybe.entry(s).or_default().push(id);
        }
    }
}

// ---------------------------------------------------------------------------
// The simulation of one seed

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    seeds: u64,
    writes: u64,
    interrupted_writes: u64,
    reads: u64,
    daemon_passes: u64,
    crashes: u64,
    crashes_in_recovery: u64,
    recoveries: u64,
    chunks_recovered: u64,
    restarts: u64,
    racing_writes: u64,
    legs_failed: u64,
    legs_re_added: u64,
    faults: u64,
    legs_failed_by_faults: u64,
    failed_ops: u64,
    failed_recoveries: u64,
    joins_refused: u64,
    split_transfers: u64,
    joins_together: u64,
    lm_deaths: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.seeds += o.seeds;
        self.writes += o.writes;
        self.interrupted_writes += o.interrupted_writes;
        self.reads += o.reads;
        self.daemon_passes += o.daemon_passes;
        self.crashes += o.crashes;
        self.crashes_in_recovery += o.crashes_in_recovery;
        self.recoveries += o.recoveries;
        self.chunks_recovered += o.chunks_recovered;
        self.restarts += o.restarts;
        self.racing_writes += o.racing_writes;
        self.legs_failed += o.legs_failed;
        self.legs_re_added += o.legs_re_added;
        self.faults += o.faults;
        self.legs_failed_by_faults += o.legs_failed_by_faults;
        self.failed_ops += o.failed_ops;
        self.failed_recoveries += o.failed_recoveries;
        self.joins_refused += o.joins_refused;
        self.split_transfers += o.split_transfers;
        self.joins_together += o.joins_together;
        self.lm_deaths += o.lm_deaths;
    }
}

struct SimNode {
    cn: Arc<ClusterNode>,
    host: Arc<Host>,
    /// Raised when the node loses its lock manager: its legs take no writes.
    fence: Arc<Fence>,
    crashed: Receiver<()>,
    dlm_id: NodeId,
    /// The guest whose disk region this node writes.
    vm: usize,
    alive: bool,
}

/// A guest: a region of the array that one node at a time writes.
struct Vm {
    lo: u64,
    hi: u64,
    /// The node serving it (index into `nodes`), if any.
    node: Option<usize>,
}

/// An operation run on a thread of its own (it may stop at a crash point).
type OpResult = Result<u64, String>;
/// Writes racing a recovery: (node, each write's result, the writes (id, sector,
/// sectors), whether they may fail).
type RacingWrites = (
    usize,
    Receiver<Vec<Result<(), String>>>,
    Vec<(u32, u64, u64)>,
    bool,
);
/// A node joining during a recovery: (result, trace line, guest, whether the
/// join may fail).
type RacingJoin = (
    Receiver<(PendingNode, Result<ClusterNode, String>)>,
    String,
    usize,
    bool,
);

struct Sim {
    rng: Rng,
    trace: Arc<Mutex<Vec<String>>>,
    legs: Vec<Arc<MemLeg>>,
    /// Byte offset of the data area on each leg.
    data_offset: Vec<u64>,
    /// Array size in sectors.
    size: u64,
    chunk_sectors: u64,
    delay_pct: u64,
    dlm: LocalDlm,
    ls_name: String,
    nodes: Vec<SimNode>,
    vms: Vec<Vm>,
    model: Model,
    next_id: u32,
    /// Threads of dead hosts stopped at their crash point.
    stopped: Vec<Receiver<OpResult>>,
    /// Survivors that must still see a death: (node, slot).
    expected: Vec<(usize, u32)>,
    /// Writes racing a recovery: (node, result, the writes (id, sector, sectors)).
    racing_writes: Vec<RacingWrites>,
    /// Nodes joining during a recovery.
    racing_joins: Vec<RacingJoin>,
    /// Guests whose node is joining during a recovery, or is to start again after
    /// such a join failed.
    joining: BTreeSet<usize>,
    /// Nodes are joining at the same moment (see `join_together`).
    joins_in_flight: bool,
    /// Each leg's device (its faults).
    devices: Vec<Arc<Device>>,
    /// Sectors per logical block of the legs (1, or 8 for 4 KiB blocks): guests
    /// read and write whole blocks.
    block_sectors: u64,
    /// This seed injects leg faults.
    faults: bool,
    /// This seed's lock manager may die.
    lm_deaths: bool,
    /// Legs the live nodes hold faulty (failed by the operator, or by the product
    /// after a fault), not re-added yet.
    out: BTreeSet<usize>,
    /// Legs the operator failed (the others in `out` were failed after a fault).
    failed_by_operator: BTreeSet<usize>,
    /// Legs whose device failed an I/O call since they were last re-added.
    hit: BTreeSet<usize>,
    stats: Stats,
}

thread_local! {
    /// Legs of this thread's previous seeds, to be blanked and used again (a new
    /// leg costs the allocation and first touch of all of its pages).
    static LEGS: std::cell::RefCell<Vec<Arc<MemLeg>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A leg `leg{i}` of `size` bytes: a previous seed's that nothing holds any more
/// (its metadata area is all written anew when the array is created; see
/// [`blank_data`]), or a new one.
fn reused_leg(i: usize, size: u64) -> Arc<MemLeg> {
    let name = format!("leg{i}");
    let old = LEGS.with(|l| {
        let mut l = l.borrow_mut();
        let at = l
            .iter()
            .position(|m| m.name() == name && m.size() == size && Arc::strong_count(m) == 1)?;
        Some(l.swap_remove(at))
    });
    old.unwrap_or_else(|| Arc::new(MemLeg::new(&name, size)))
}

/// Zeroes the data area of a leg, from byte `from` on (the array is created:
/// what was never written reads as zeroes).
fn blank_data(leg: &MemLeg, from: u64) {
    leg.write_zeroes(from, leg.size() - from)
        .expect("blank the data area");
}

/// Keeps a finished seed's legs for the next seeds of this thread.
fn keep_legs(legs: &[Arc<MemLeg>]) {
    LEGS.with(|l| {
        let mut l = l.borrow_mut();
        l.extend(legs.iter().cloned());
        // Legs some straggling thread of an old seed still holds are dropped.
        let len = l.len();
        if len > 16 {
            l.drain(..len - 16);
        }
    });
}

static PROGRESS: AtomicU64 = AtomicU64::new(0);

fn tick() {
    PROGRESS.fetch_add(1, Ordering::Relaxed);
}

impl Sim {
    fn new(seed: u64) -> Result<Sim, String> {
        let mut rng = Rng::new(seed);
        let nlegs = if rng.chance(25) { 3 } else { 2 };
        let nnodes = if rng.chance(40) { 3 } else { 2 };
        let chunk = rng.pick(&[16 * KIB, 32 * KIB, 64 * KIB]);
        // 1 MiB of metadata (superblock, bitmap slots) and a small data area: a
        // seed's cost is mostly copying and checking the data areas.
        let leg_size = MIB + rng.pick(&[256 * KIB, 512 * KIB, MIB]);
        let delay_pct = rng.pick(&[0, 0, 2, 10]);
        let faults = rng.chance(FAULT_SEEDS_PCT);
        let block = if rng.chance(15) { 4096 } else { 512 };
        let lm_deaths = rng.chance(LM_DEATH_SEEDS_PCT);
        let legs: Vec<Arc<MemLeg>> = (0..nlegs).map(|i| reused_leg(i, leg_size)).collect();
        let mut uuid = [0u8; 16];
        uuid[..8].copy_from_slice(&rng.next().to_le_bytes());
        uuid[8..].copy_from_slice(&rng.next().to_le_bytes());
        let refs: Vec<&dyn Leg> = legs.iter().map(|l| &**l as &dyn Leg).collect();
        let (_, metas) = create_array(
            &refs,
            &NewArray {
                name: "sim".into(),
                cluster_name: Some("sim".into()),
                nodes: SLOTS,
                bitmap_chunk: Some(chunk),
                assume_clean: true,
                now: 0,
                uuid: Some(Uuid(uuid)),
            },
        )
        .map_err(|e| format!("create: {e}"))?;
        for (l, m) in legs.iter().zip(&metas) {
            blank_data(l, m.sb.data_offset * 512);
        }
        let size = metas[0].sb.size;
        let vms = (0..nnodes as u64)
            .map(|i| Vm {
                lo: size * i / nnodes as u64,
                hi: size * (i + 1) / nnodes as u64,
                node: None,
            })
            .collect();
        let mut sim = Sim {
            rng,
            trace: trace(seed),
            data_offset: metas.iter().map(|m| m.sb.data_offset * 512).collect(),
            legs,
            size,
            chunk_sectors: chunk / 512,
            delay_pct,
            dlm: LocalDlm::new(),
            ls_name: metas[0].sb.set_uuid.lockspace_name(),
            nodes: Vec::new(),
            vms,
            model: Model {
                acked: vec![0; size as usize],
                maybe: BTreeMap::new(),
            },
            next_id: 1,
            stopped: Vec::new(),
            expected: Vec::new(),
            racing_writes: Vec::new(),
            racing_joins: Vec::new(),
            joining: BTreeSet::new(),
            joins_in_flight: false,
            devices: metas
                .iter()
                .map(|m| Arc::new(Device::new(block, m.sb.data_offset * 512)))
                .collect(),
            block_sectors: block / 512,
            faults,
            lm_deaths,
            out: BTreeSet::new(),
            failed_by_operator: BTreeSet::new(),
            hit: BTreeSet::new(),
            stats: Stats {
                seeds: 1,
                ..Stats::default()
            },
        };
        sim.log(format!(
            "array: {nlegs} legs of {} KiB with {block}-byte blocks, {} sectors, {} KiB chunks, {nnodes} nodes, delays {delay_pct}%{}",
            leg_size / KIB,
            size,
            chunk / KIB,
            if faults { ", leg faults" } else { "" }
        ));
        let vms: Vec<usize> = (0..nnodes).collect();
        let nodes = if sim.rng.chance(10) {
            sim.join_together(&vms)?
        } else {
            vms.iter()
                .map(|&vm| sim.start_node(vm))
                .collect::<Result<_, _>>()?
        };
        for n in nodes {
            sim.nodes[n]
                .cn
                .array
                .mark_active()
                .map_err(|e| format!("mark active: {e}"))?;
        }
        Ok(sim)
    }

    fn log(&mut self, line: String) {
        self.trace.lock().unwrap().push(line);
    }

    /// Starts a node on a new host for guest `vm`; returns its index.
    fn start_node(&mut self, vm: usize) -> Result<usize, String> {
        let (node, line) = self.prepare_node(vm);
        let cn = node.join()?;
        Ok(self.add_node(node, cn, line))
    }

    fn prepare_node(&mut self, vm: usize) -> (PendingNode, String) {
        let (host, crashed) = Host::new(self.rng.next(), self.delay_pct);
        let fence = Fence::new();
        // As a served node's legs: fenced, then the host's path to the device.
        let legs: Vec<Arc<dyn Leg>> = self
            .legs
            .iter()
            .zip(&self.devices)
            .map(|(l, dev)| {
                let leg = Arc::new(HostLeg {
                    inner: l.clone(),
                    host: host.clone(),
                    dev: dev.clone(),
                });
                Arc::new(FencedLeg::new(leg, fence.clone())) as Arc<dyn Leg>
            })
            .collect();
        let member = self.dlm.join(&self.ls_name, 32);
        let dlm_id = member.node();
        let ls = HostLs {
            inner: member,
            delay: Delay::new(self.rng.next(), self.delay_pct),
        };
        let line = format!("vm {vm}: node (lock manager id {dlm_id}) joins");
        (
            PendingNode {
                ls: Arc::new(ls),
                legs,
                host,
                fence,
                crashed,
                dlm_id,
                vm,
                dlm: self.dlm.clone(),
                ls_name: self.ls_name.clone(),
            },
            line,
        )
    }

    fn add_node(&mut self, p: PendingNode, cn: ClusterNode, line: String) -> usize {
        let slot = cn.node.slot;
        self.log(format!("{line} as slot {slot}"));
        let idx = self.nodes.len();
        cn.array.set_fence(p.fence.clone());
        self.nodes.push(SimNode {
            cn: Arc::new(cn),
            host: p.host,
            fence: p.fence,
            crashed: p.crashed,
            dlm_id: p.dlm_id,
            vm: p.vm,
            alive: true,
        });
        self.vms[p.vm].node = Some(idx);
        idx
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive)
            .collect()
    }

    /// The state of leg `l` on node `n` (`None`: not in a mirror slot there).
    fn leg_state(&self, n: usize, l: usize) -> Option<LegState> {
        let name = format!("leg{l}");
        self.nodes[n]
            .cn
            .array
            .members()
            .iter()
            .flatten()
            .find(|m| m.name() == name)
            .map(|m| m.state())
    }

    /// Legs whose device has a fault armed or started.
    fn faulted(&self) -> BTreeSet<usize> {
        (0..self.legs.len())
            .filter(|&l| self.devices[l].armed().is_some())
            .collect()
    }

    /// Legs whose device has a fault armed or started that fails I/O calls.
    fn failing(&self) -> BTreeSet<usize> {
        (0..self.legs.len())
            .filter(|&l| self.devices[l].armed().is_some_and(FaultKind::fails))
            .collect()
    }

    /// Whether an operation may fail now: a fault hits every leg that is in
    /// sync (no in-sync leg without a fault could take a write or serve a read;
    /// the last in-sync leg is never failed, the request fails instead).
    fn errors_allowed(&self) -> bool {
        let faulted = self.failing();
        if faulted.is_empty() {
            return false;
        }
        let live = self.live();
        if live.is_empty() {
            // Every node starts over: the superblocks say which legs are in sync.
            return self.in_sync_on_disk().is_subset(&faulted);
        }
        !(0..self.legs.len()).any(|l| {
            !faulted.contains(&l)
                && live
                    .iter()
                    .all(|&n| self.leg_state(n, l) == Some(LegState::InSync))
        })
    }

    /// The legs the newest superblock gives a role and that are not being rebuilt.
    fn in_sync_on_disk(&self) -> BTreeSet<usize> {
        let metas: Vec<Option<LegMetadata>> = self
            .legs
            .iter()
            .map(|l| LegMetadata::load(&**l).ok())
            .collect();
        let Some(newest) = metas.iter().flatten().max_by_key(|m| m.sb.events) else {
            return BTreeSet::new();
        };
        (0..self.legs.len())
            .filter(|&l| {
                metas[l].as_ref().is_some_and(|m| {
                    newest.sb.dev_roles[m.sb.dev_number as usize] < role::MAX
                        && m.sb.feature_map & feature::RECOVERY_OFFSET == 0
                })
            })
            .collect()
    }

    /// An operation failed: fine while [`Sim::errors_allowed`] said so (`allowed`,
    /// asked before it started), else the seed fails.
    fn tolerate(&mut self, allowed: bool, e: String) -> Result<(), String> {
        if allowed {
            self.log(format!("  {e} (every in-sync leg has a fault)"));
            self.stats.failed_ops += 1;
            Ok(())
        } else {
            Err(e)
        }
    }

    /// A join refused because a leg's metadata cannot be read: assembly wants
    /// every leg it is given readable (see the header); a failure unless
    /// `SIM_FAULTS_STRICT_JOIN=1`.
    fn unreadable_leg_refused(&mut self, e: &str) -> bool {
        let refused = !env_on("SIM_FAULTS_STRICT_JOIN")
            && e.contains("cannot read")
            && self
                .faulted()
                .iter()
                .any(|&l| self.devices[l].armed().is_some_and(FaultKind::fails_reads));
        if refused {
            self.stats.joins_refused += 1;
        }
        refused
    }

    /// Arms a fault on a random leg that is in service (one fault at a time),
    /// to start after fewer than `within` I/O calls of the kind it hits.
    fn arm_fault(&mut self, within: u64, why: &str) {
        // Not while racing work is in flight: its outcome must stay known.
        let quiet =
            self.racing_writes.is_empty() && self.racing_joins.is_empty() && !self.joins_in_flight;
        if !self.faults || !quiet || !self.faulted().is_empty() {
            return;
        }
        let l = self.rng.below(self.legs.len() as u64) as usize;
        if self.out.contains(&l) {
            return;
        }
        let kind = match self.rng.below(20) {
            0..=4 => FaultKind::WriteEio,
            5..=7 => FaultKind::NoSpace {
                from: self.data_offset[l] + self.rng.below(self.size) * 512,
            },
            8..=11 => FaultKind::ReadEio,
            12..=13 => FaultKind::StoppedWrite,
            14 => FaultKind::StoppedRead,
            15..=17 => FaultKind::SplitWrite,
            _ => FaultKind::SplitRead,
        };
        let rebuilt = self
            .live()
            .iter()
            .any(|&n| self.leg_state(n, l) == Some(LegState::Recovering));
        if kind.fails_reads() && rebuilt && !env_on("SIM_FAULTS_REBUILT_READS") {
            // The other nodes learn that its rebuild ended from its own superblock
            // (see the header).
            return;
        }
        let after = self.rng.below(within);
        self.log(format!(
            "leg{l}: {kind:?} after {after} I/O calls of its kind ({why})"
        ));
        self.devices[l].arm(kind, after);
        self.stats.faults += 1;
    }

    /// The operator repairs (or replaces) leg `l`'s device.
    fn repair(&mut self, l: usize) {
        if self.devices[l].hits.swap(0, Ordering::Relaxed) > 0 {
            self.hit.insert(l);
        }
        self.stats.split_transfers += self.devices[l].splits.swap(0, Ordering::Relaxed);
        if let Some(kind) = self.devices[l].repair() {
            self.log(format!("leg{l}: device repaired ({kind:?} ends)"));
        }
    }

    fn repair_all(&mut self) {
        for l in 0..self.legs.len() {
            self.repair(l);
        }
    }

    /// Between operations: every live node holds the same legs faulty, each of
    /// them failed by the operator or after a fault hit it, and keeps an in-sync
    /// leg. Those legs are out until re-added.
    fn note_legs(&mut self) -> Result<(), String> {
        for (l, d) in self.devices.iter().enumerate() {
            if let Some(m) = d
                .misaligned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                return Err(format!("leg{l}: {m}"));
            }
        }
        for l in 0..self.legs.len() {
            if self.devices[l].hits.load(Ordering::Relaxed) > 0 {
                self.hit.insert(l);
            }
        }
        let live = self.live();
        let mut slots = BTreeMap::new();
        for &n in &live {
            if let Some(m) = slots.insert(self.nodes[n].cn.node.slot, n) {
                return Err(format!(
                    "nodes {m} and {n} both hold slot {}",
                    self.nodes[n].cn.node.slot
                ));
            }
        }
        let mut faulty: Option<(usize, BTreeSet<usize>)> = None;
        for &n in &live {
            let set: BTreeSet<usize> = (0..self.legs.len())
                .filter(|&l| {
                    !matches!(
                        self.leg_state(n, l),
                        Some(LegState::InSync | LegState::Recovering)
                    )
                })
                .collect();
            if self.nodes[n].cn.array.in_sync_count() == 0 {
                return Err(format!("node {n} has no in-sync leg left"));
            }
            match &faulty {
                None => faulty = Some((n, set)),
                Some((m, other)) if *other != set => {
                    return Err(format!(
                        "node {m} holds legs {other:?} faulty, node {n} legs {set:?}"
                    ))
                }
                Some(_) => {}
            }
        }
        let Some((_, set)) = faulty else {
            return Ok(());
        };
        for &l in &set {
            if !self.failed_by_operator.contains(&l) && !self.hit.contains(&l) {
                return Err(format!("leg{l} is faulty, yet nothing failed on it"));
            }
            if self.out.insert(l) {
                self.log(format!("leg{l} is faulty now (failed after a fault)"));
                self.stats.legs_failed_by_faults += 1;
            }
        }
        self.out.retain(|l| set.contains(l));
        Ok(())
    }

    /// A random write inside `vm`'s region: (sector, sectors). Half of them land
    /// near the region's edges, in chunks the neighbouring guest writes too.
    fn pick_write(&mut self, vm: usize) -> (u64, u64) {
        // In logical blocks of the legs.
        let bs = self.block_sectors;
        let (lo, hi) = (self.vms[vm].lo.div_ceil(bs), self.vms[vm].hi / bs);
        let chunk = self.chunk_sectors / bs;
        let blocks = match self.rng.below(10) {
            0..=5 => 1 + self.rng.below((16 / bs).max(1)),
            6..=8 => 1 + self.rng.below(128 / bs),
            _ => 1 + self.rng.below(chunk * 2),
        }
        .min(hi - lo);
        let window = (chunk * 3).min(hi - lo - blocks + 1);
        let block = match self.rng.below(3) {
            0 => lo + self.rng.below(window),
            1 => hi - blocks - self.rng.below(window),
            _ => lo + self.rng.below(hi - lo - blocks + 1),
        };
        (block * bs, blocks * bs)
    }

    fn data_for(&mut self, sector: u64, sectors: u64) -> (u32, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut buf = vec![0u8; (sectors * 512) as usize];
        for (i, s) in buf.chunks_exact_mut(512).enumerate() {
            sector_data(id, sector + i as u64, s);
        }
        (id, buf)
    }

    fn write(&mut self, n: usize) -> Result<(), String> {
        let vm = self.nodes[n].vm;
        let (sector, sectors) = self.pick_write(vm);
        let (id, buf) = self.data_for(sector, sectors);
        self.log(format!("node {n}: write {id} at {sector}+{sectors}"));
        let allowed = self.errors_allowed();
        match self.nodes[n].cn.array.write(sector, &[IoSlice::new(&buf)]) {
            Ok(()) => {
                self.model.acknowledge(id, sector, sectors);
                self.stats.writes += 1;
                Ok(())
            }
            Err(e) => {
                // Not acknowledged: its sectors hold the old or the new data.
                self.model.interrupted(id, sector, sectors);
                self.tolerate(allowed, format!("write {id} by node {n} failed: {e}"))
            }
        }
    }

    /// Reads `sectors` at `sector` through node `n` and checks them.
    fn read_check(&mut self, n: usize, sector: u64, sectors: u64) -> Result<(), String> {
        let mut buf = vec![0u8; (sectors * 512) as usize];
        let allowed = self.errors_allowed();
        if let Err(e) = self.nodes[n]
            .cn
            .array
            .read(sector, &mut [IoSliceMut::new(&mut buf)])
        {
            return self.tolerate(
                allowed,
                format!("read by node {n} at {sector}+{sectors} failed: {e}"),
            );
        }
        let mut scratch = [0u8; 512];
        for (i, s) in buf.chunks_exact(512).enumerate() {
            self.model
                .check(sector + i as u64, s, &mut scratch)
                .map_err(|e| format!("read through node {n}: {e}"))?;
        }
        Ok(())
    }

    fn read(&mut self, n: usize) -> Result<(), String> {
        let bs = self.block_sectors;
        let size = self.size / bs;
        let blocks = 1 + self.rng.below(self.chunk_sectors * 2 / bs).min(size - 1);
        let (sector, sectors) = (self.rng.below(size - blocks + 1) * bs, blocks * bs);
        self.log(format!("node {n}: read {sector}+{sectors}"));
        self.stats.reads += 1;
        self.read_check(n, sector, sectors)
    }

    /// Runs `op` on node `n` on a thread of its own. Returns `Ok(result)` when it
    /// finished, `Err(None)` when the host crashed in it (the thread stays stopped).
    fn run_op(
        &mut self,
        n: usize,
        op: impl FnOnce(&ClusterNode) -> OpResult + Send + 'static,
    ) -> Result<OpResult, Option<String>> {
        let cn = self.nodes[n].cn.clone();
        let (tx, rx) = bounded(1);
        std::thread::Builder::new()
            .name("sim-op".into())
            .spawn(move || {
                let _ = tx.send(op(&cn));
            })
            .map_err(|e| Some(format!("cannot start a thread: {e}")))?;
        let crashed = self.nodes[n].crashed.clone();
        select! {
            recv(rx) -> r => Ok(r.unwrap_or_else(|_| Err("the operation panicked".into()))),
            recv(crashed) -> _ => {
                self.stopped.push(rx);
                Err(None)
            }
            default(WAIT) => Err(Some(format!("node {n}: operation hung"))),
        }
    }

    /// Kills node `n`'s host: its lockspace membership ends, the survivors must see it.
    fn kill(&mut self, n: usize) {
        let slot = self.nodes[n].cn.node.slot;
        self.nodes[n].host.crash_now();
        self.nodes[n].alive = false;
        let vm = self.nodes[n].vm;
        self.vms[vm].node = None;
        for s in self.live() {
            if self.nodes[s].cn.node.watched().contains(&slot) {
                self.expected.push((s, slot));
            }
        }
        self.expected.retain(|&(s, _)| s != n);
        self.dlm.kill(&self.ls_name, self.nodes[n].dlm_id);
        self.stats.crashes += 1;
        self.log(format!(
            "node {n} (slot {slot}) is dead; survivors to see it: {:?}",
            self.expected
        ));
    }

    /// A node crashes: idle, or in the middle of a write or a daemon pass.
    fn crash(&mut self, n: usize) -> Result<(), String> {
        let legs = self.legs.len() as u64;
        match self.rng.below(4) {
            0 => self.log(format!("node {n}: crashes idle")),
            1 => {
                let at = self.rng.below(2);
                self.log(format!(
                    "node {n}: crashes at its {at}th write of a daemon pass"
                ));
                // A first pass marks idle chunks, the second clears them.
                let allowed = self.errors_allowed();
                if let Err(e) = self.nodes[n].cn.array.bitmap_daemon_pass() {
                    self.tolerate(allowed, format!("daemon pass on node {n}: {e}"))?;
                }
                self.nodes[n].host.crash_after(at);
                match self.run_op(n, |cn| {
                    cn.array.bitmap_daemon_pass().map_err(|e| e.to_string())
                }) {
                    Ok(r) => {
                        self.nodes[n].host.cancel_crash();
                        if let Err(e) = r {
                            self.tolerate(allowed, format!("daemon pass on node {n}: {e}"))?;
                        }
                    }
                    Err(None) => {}
                    Err(Some(e)) => return Err(e),
                }
            }
            _ => {
                let vm = self.nodes[n].vm;
                let (sector, sectors) = self.pick_write(vm);
                let (id, buf) = self.data_for(sector, sectors);
                let at = self.rng.below(2 * legs + 1);
                self.log(format!(
                    "node {n}: write {id} at {sector}+{sectors}, host crashes at its {at}th leg write"
                ));
                self.nodes[n].host.crash_after(at);
                let allowed = self.errors_allowed();
                match self.run_op(n, move |cn| {
                    cn.array
                        .write(sector, &[IoSlice::new(&buf)])
                        .map(|()| 0)
                        .map_err(|e| e.to_string())
                }) {
                    Ok(Ok(_)) => {
                        self.nodes[n].host.cancel_crash();
                        self.log(format!("write {id} completed before the crash"));
                        self.model.acknowledge(id, sector, sectors);
                        self.stats.writes += 1;
                    }
                    Ok(Err(e)) => {
                        self.nodes[n].host.cancel_crash();
                        self.model.interrupted(id, sector, sectors);
                        self.tolerate(allowed, format!("write {id} by node {n} failed: {e}"))?;
                    }
                    Err(None) => {
                        self.model.interrupted(id, sector, sectors);
                        self.stats.interrupted_writes += 1;
                    }
                    Err(Some(e)) => return Err(e),
                }
            }
        }
        self.kill(n);
        Ok(())
    }

    /// Waits until every survivor saw every death, recovering each dead slot on
    /// the survivor that reports it.
    fn recover_all(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            self.expected.retain(|&(s, _)| self.nodes[s].alive);
            let live = self.live();
            // Reports that are already there (including ones nobody waits for).
            let mut got = None;
            for &s in &live {
                if let Ok(slot) = self.nodes[s].cn.node.dead.try_recv() {
                    got = Some((s, slot));
                    break;
                }
            }
            let Some((s, slot)) = got else {
                if self.expected.is_empty() {
                    if !self.racing_writes.is_empty() || !self.racing_joins.is_empty() {
                        self.finish_racing()?;
                        continue;
                    }
                    // A node that still holds a dead node's slot (its recovery failed)
                    // reports it again.
                    let holding: Vec<usize> = live
                        .iter()
                        .copied()
                        .filter(|&n| self.nodes[n].cn.array.read_balancing_suspended())
                        .collect();
                    if holding.is_empty() {
                        return self.resync_all();
                    }
                    // A node can hold a slot before it reads balanced reads off: the
                    // survivor just granted a slot another one released has not yet
                    // marked it gone. Whoever reports next is handled.
                    let mut sel = crossbeam_channel::Select::new();
                    for &n in &live {
                        sel.recv(&self.nodes[n].cn.node.dead);
                    }
                    if sel.ready_timeout(WAIT).is_err() {
                        let why: Vec<String> = holding
                            .iter()
                            .map(|&n| {
                                let cn = &self.nodes[n].cn;
                                format!(
                                    "node {n}: watches slots {:?}, {} other members",
                                    cn.node.watched(),
                                    cn.node.comms.peers().count()
                                )
                            })
                            .collect();
                        return Err(format!(
                            "nodes {holding:?} hold the slot of a dead node and never recover it ({})",
                            why.join("; ")
                        ));
                    }
                    continue;
                }
                // Wait for the next report of any live node.
                let mut sel = crossbeam_channel::Select::new();
                for &s in &live {
                    sel.recv(&self.nodes[s].cn.node.dead);
                }
                let left = WAIT.saturating_sub(start.elapsed());
                if sel.ready_timeout(left).is_err() {
                    return Err(format!(
                        "survivors never saw these deaths (node, slot): {:?}",
                        self.expected
                    ));
                }
                continue;
            };
            tick();
            self.expected.retain(|&e| e != (s, slot));
            self.recover(s, slot)?;
        }
    }

    /// Node `s` recovers the slots it reported dead, while it lives (a recovery
    /// may crash it).
    fn recover_reported(&mut self, s: usize) -> Result<(), String> {
        while self.nodes[s].alive {
            let Ok(slot) = self.nodes[s].cn.node.dead.try_recv() else {
                break;
            };
            self.expected.retain(|&e| e != (s, slot));
            self.recover(s, slot)?;
        }
        Ok(())
    }

    /// Node `s` recovers `slot`; a crash, a racing writer or a racing restart may
    /// be thrown in.
    fn recover(&mut self, s: usize, slot: u32) -> Result<(), String> {
        if self.rng.chance(30) {
            self.arm_fault(6, &format!("while node {s} recovers slot {slot}"));
        }
        let live = self.live();
        // No crash while racing work is in flight: its outcome must stay known.
        let quiet = self.racing_writes.is_empty() && self.racing_joins.is_empty();
        let crash = live.len() > 1 && quiet && self.rng.chance(15);
        let writers: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&n| self.racing_writes.iter().all(|r| r.0 != n))
            .collect();
        let writer =
            (!crash && !writers.is_empty() && self.rng.chance(30)).then(|| self.rng.pick(&writers));
        let restart = (!crash && self.rng.chance(20))
            .then(|| self.restartable())
            .flatten();
        self.log(format!(
            "node {s}: recovers slot {slot}{}{}{}",
            if crash { ", crashing in it" } else { "" },
            writer
                .map(|w| format!(", node {w} writes meanwhile"))
                .unwrap_or_default(),
            restart
                .map(|v| format!(", vm {v} restarts meanwhile"))
                .unwrap_or_default(),
        ));
        self.stats.recoveries += 1;
        let chunk_bytes = self.chunk_sectors * 512;
        if crash {
            let at = self.rng.below(6);
            self.nodes[s].host.crash_after(at);
            let allowed = self.errors_allowed();
            match self.run_op(s, move |cn| cn.recover(slot).map_err(|e| e.to_string())) {
                Ok(Ok(bytes)) => {
                    self.nodes[s].host.cancel_crash();
                    self.stats.chunks_recovered += bytes / chunk_bytes;
                    self.log(format!("recovery done before the crash: {bytes} bytes"));
                }
                Ok(Err(e)) => {
                    self.nodes[s].host.cancel_crash();
                    self.tolerate(allowed, format!("recovery of slot {slot}: {e}"))?;
                }
                Err(None) => {
                    // The others that have not seen `slot` die yet still wait for it
                    // (in `expected`): they see it once our hold on it is purged.
                    self.stats.crashes_in_recovery += 1;
                }
                Err(Some(e)) => return Err(e),
            }
            self.kill(s);
            return Ok(());
        }
        // Racing work, on threads of their own.
        let allowed = self.errors_allowed();
        let racer = writer.map(|w| {
            let vm = self.nodes[w].vm;
            let writes: Vec<(u64, u64, u32, Vec<u8>)> = (0..1 + self.rng.below(6))
                .map(|_| {
                    let (sector, sectors) = self.pick_write(vm);
                    let (id, buf) = self.data_for(sector, sectors);
                    (sector, sectors, id, buf)
                })
                .collect();
            for (sector, sectors, id, _) in &writes {
                self.log(format!("node {w}: racing write {id} at {sector}+{sectors}"));
            }
            let cn = self.nodes[w].cn.clone();
            let (tx, rx) = bounded(1);
            let ids: Vec<(u32, u64, u64)> = writes.iter().map(|w| (w.2, w.0, w.1)).collect();
            std::thread::spawn(move || {
                let r = writes
                    .iter()
                    .map(|(sector, _, id, buf)| {
                        cn.array
                            .write(*sector, &[IoSlice::new(buf)])
                            .map_err(|e| format!("racing write {id}: {e}"))
                    })
                    .collect();
                let _ = tx.send(r);
            });
            (rx, ids)
        });
        let joiner = match restart {
            Some(vm) => {
                self.joining.insert(vm);
                let (p, line) = self.prepare_node(vm);
                let (tx, rx) = bounded(1);
                std::thread::spawn(move || {
                    let r = p.join();
                    let _ = tx.send((p, r));
                });
                Some((rx, line))
            }
            None => None,
        };
        if let Some((rx, ids)) = racer {
            self.racing_writes
                .push((writer.unwrap_or(s), rx, ids, allowed));
        }
        if let Some((rx, line)) = joiner {
            self.racing_joins
                .push((rx, line, restart.unwrap_or(0), allowed));
        }
        match self.nodes[s].cn.recover(slot) {
            Ok(bytes) => {
                self.stats.chunks_recovered += bytes / chunk_bytes;
                self.log(format!(
                    "node {s}: recovered slot {slot}: {bytes} bytes copied"
                ));
                Ok(())
            }
            Err(e) => {
                // A recovery that could not take the slot's bits over reports the
                // slot again (see `recover_all`); the operator repairs the legs.
                self.stats.failed_recoveries += 1;
                self.tolerate(
                    allowed,
                    format!("node {s}: recovery of slot {slot} failed: {e}"),
                )?;
                self.repair_all();
                Ok(())
            }
        }
    }

    /// Waits for the writes and joins that raced the recoveries.
    fn finish_racing(&mut self) -> Result<(), String> {
        for (n, rx, ids, allowed) in std::mem::take(&mut self.racing_writes) {
            let results = rx
                .recv_timeout(WAIT)
                .map_err(|_| format!("node {n}: racing writes hung"))?;
            for ((id, sector, sectors), r) in ids.into_iter().zip(results) {
                match r {
                    Ok(()) => {
                        self.model.acknowledge(id, sector, sectors);
                        self.stats.writes += 1;
                        self.stats.racing_writes += 1;
                    }
                    Err(e) => {
                        self.model.interrupted(id, sector, sectors);
                        self.tolerate(allowed, e)?;
                    }
                }
            }
        }
        // Every join is waited for (and a node that joined is added, so that its
        // reports are processed) before a failed one starts over.
        let mut failed = Vec::new();
        for (rx, line, vm, allowed) in std::mem::take(&mut self.racing_joins) {
            // Reports keep being processed meanwhile: they free the slots held.
            let start = Instant::now();
            let (p, r) = loop {
                if let Ok(x) = rx.recv_timeout(Duration::from_millis(5)) {
                    break x;
                }
                if start.elapsed() > WAIT {
                    return Err("a node joining during a recovery hung".to_string());
                }
                for s in self.live() {
                    self.recover_reported(s)?;
                }
            };
            match r {
                Ok(cn) => {
                    let n = self.add_node(p, cn, line);
                    self.joining.remove(&vm);
                    self.after_restart(n)?;
                }
                // Every slot may be held for a moment (see `restart`): start over
                // with a new member (a failed join's threads still use the old one).
                Err(e) if e.contains("node slots of the array are in use") => {
                    self.log(format!("vm {vm}: {e}; restarting it afresh"));
                    self.dlm.kill(&self.ls_name, p.dlm_id);
                    failed.push((vm, Ok(())));
                }
                Err(e) => {
                    self.dlm.kill(&self.ls_name, p.dlm_id);
                    let unreadable = self.unreadable_leg_refused(&e);
                    failed.push((vm, Err((e, allowed || unreadable))));
                }
            }
        }
        for (vm, r) in failed {
            if let Err((e, allowed)) = r {
                // The operator repairs the legs, and starts the guest again.
                self.tolerate(allowed, e)?;
                self.repair_all();
            }
            self.restart(vm)?;
        }
        Ok(())
    }

    /// Starts a new node for guest `vm`. A survivor that watched a slot while
    /// another survivor recovered it is granted that slot's lock when the other
    /// releases it, and holds it until it has processed that (spurious) report:
    /// a join that finds every slot taken meanwhile is retried once the reports
    /// were processed.
    fn restart(&mut self, vm: usize) -> Result<(), String> {
        // No other start of it meanwhile (a recovery may start guests).
        self.joining.insert(vm);
        let r = self.restart_joining(vm);
        self.joining.remove(&vm);
        r
    }

    fn restart_joining(&mut self, vm: usize) -> Result<(), String> {
        let start = Instant::now();
        loop {
            self.recover_all()?;
            if self.rng.chance(20) {
                self.arm_fault(6, &format!("while vm {vm} joins"));
            }
            let (p, line) = self.prepare_node(vm);
            let allowed = self.errors_allowed();
            match p.join() {
                Ok(cn) => {
                    let n = self.add_node(p, cn, line);
                    return self.after_restart(n);
                }
                Err(e)
                    if e.contains("node slots of the array are in use")
                        && start.elapsed() < WAIT =>
                {
                    self.log(format!("vm {vm}: {e}; retrying"));
                    self.dlm.kill(&self.ls_name, p.dlm_id);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if start.elapsed() < WAIT => {
                    // The operator repairs the legs, and starts the guest again.
                    self.dlm.kill(&self.ls_name, p.dlm_id);
                    let unreadable = self.unreadable_leg_refused(&e);
                    self.tolerate(allowed || unreadable, e)?;
                    self.repair_all();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A guest without a node (its node died and the death was seen by all).
    fn restartable(&self) -> Option<usize> {
        self.all_restartable().into_iter().next()
    }

    fn all_restartable(&self) -> Vec<usize> {
        (0..self.vms.len())
            .filter(|&v| {
                self.vms[v].node.is_none()
                    && !self.joining.contains(&v)
                    && !self.nodes.iter().any(|n| {
                        !n.alive && n.vm == v && self.expected.iter().any(|e| e.1 == n.cn.node.slot)
                    })
            })
            .collect()
    }

    /// Starts nodes for guests `vms` at the same moment, each waiting for a slot
    /// as a starting node does (a node that joins holds the free slots after its
    /// own until it merged their bitmaps, and a survivor holds a dead node's slot
    /// until it recovered it): every one must join, in a slot of its own. Returns
    /// the nodes that joined (a join a fault made fail starts again later).
    fn join_together(&mut self, vms: &[usize]) -> Result<Vec<usize>, String> {
        self.log(format!("vms {vms:?} start at the same moment"));
        self.stats.joins_together += 1;
        for &vm in vms {
            self.joining.insert(vm);
        }
        let allowed = self.errors_allowed();
        self.joins_in_flight = true;
        let (tx, rx) = unbounded();
        for &vm in vms {
            let (p, line) = self.prepare_node(vm);
            let tx = tx.clone();
            let (dlm, name) = (self.dlm.clone(), self.ls_name.clone());
            std::thread::spawn(move || {
                let r = p.join_waiting(vhost_user_md::cluster::membership::SLOT_WAIT);
                if r.is_err() {
                    // Its process would end: the slots it claimed are free again.
                    dlm.kill(&name, p.dlm_id);
                }
                let _ = tx.send((p, line, r));
            });
        }
        drop(tx);
        let mut done = Vec::new();
        let start = Instant::now();
        while done.len() < vms.len() {
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(x) => done.push(x),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) if start.elapsed() < WAIT => {
                    // Survivors keep processing their reports: they free the slots.
                    for s in self.live() {
                        self.recover_reported(s)?;
                    }
                    // So do the nodes that joined already, as their resync threads
                    // would: a slot a joiner merged and let go of is granted to
                    // the watch another joiner put on it, which holds it until
                    // that report is processed.
                    for (p, _, r) in &done {
                        let Ok(cn) = r else { continue };
                        while let Ok(slot) = cn.node.dead.try_recv() {
                            let line = format!("vm {}: its new node recovers slot {slot}", p.vm);
                            let r = cn.recover(slot);
                            self.log(line);
                            if let Err(e) = r {
                                self.tolerate(allowed, format!("recovery of slot {slot}: {e}"))?;
                            }
                        }
                    }
                }
                Err(_) => return Err(format!("vms {vms:?} starting together hung")),
            }
        }
        self.joins_in_flight = false;
        // In the order of the guests, as the trace is replayed.
        done.sort_by_key(|(p, _, _)| p.vm);
        let mut nodes = Vec::new();
        let mut again = Vec::new();
        for (p, line, r) in done {
            let vm = p.vm;
            match r {
                Ok(cn) => nodes.push(self.add_node(p, cn, line)),
                Err(e) => {
                    self.dlm.kill(&self.ls_name, p.dlm_id);
                    let unreadable = self.unreadable_leg_refused(&e);
                    again.push((vm, e, allowed || unreadable));
                }
            }
        }
        for &vm in vms {
            self.joining.remove(&vm);
        }
        for (vm, e, allowed) in again {
            self.tolerate(allowed, e)?;
            self.repair_all();
            self.restart(vm)?;
        }
        Ok(nodes)
    }

    fn after_restart(&mut self, n: usize) -> Result<(), String> {
        if !self.nodes[n].alive {
            // It died since it joined (nodes started together are followed up
            // after the restarts of those whose join failed, which may crash it).
            return Ok(());
        }
        self.stats.restarts += 1;
        let allowed = self.errors_allowed();
        if let Err(e) = self.nodes[n].cn.array.mark_active() {
            self.tolerate(allowed, format!("node {n}: mark active: {e}"))?;
        }
        self.resync_all()
    }

    /// What each node's resync thread does: rewrites what a leg failed to read,
    /// copies the chunks it needs.
    fn resync_all(&mut self) -> Result<(), String> {
        for n in self.live() {
            let allowed = self.errors_allowed();
            self.nodes[n].cn.array.run_repairs();
            match self.nodes[n].cn.resync() {
                Ok(0) => {}
                Ok(bytes) => self.log(format!("node {n}: resynced {bytes} bytes")),
                Err(e) => self.tolerate(allowed, format!("node {n}: resync: {e}"))?,
            }
        }
        // A rebuilt leg is declared in sync by the node that rebuilt it.
        for n in self.live() {
            let allowed = self.errors_allowed();
            if let Err(e) = self.nodes[n].cn.array.finish_recovery() {
                self.tolerate(allowed, format!("node {n}: finish recovery: {e}"))?;
            }
        }
        Ok(())
    }

    /// After every death was recovered: legs identical, bitmap slots of no live
    /// node clean, every acknowledged write on every leg.
    fn check_converged(&mut self, why: &str) -> Result<(), String> {
        self.note_legs()?;
        let live = self.live();
        for &n in &live {
            let a = &self.nodes[n].cn.array;
            let states: Vec<(String, LegState)> = a
                .members()
                .iter()
                .flatten()
                .map(|m| (m.name().to_string(), m.state()))
                .collect();
            for (name, st) in &states {
                let out = self.out.iter().any(|l| *name == format!("leg{l}"));
                if !out && *st != LegState::InSync {
                    return Err(format!("{why}: node {n}: {name} is {st:?}, not in sync"));
                }
            }
            if !self.out.is_empty() {
                // Writes while a leg is out stay needed for its re-add.
                continue;
            }
            let needed = a.bitmap.stats().needed;
            if needed > 0 {
                return Err(format!(
                    "{why}: node {n} still needs {needed} chunks resynced"
                ));
            }
        }
        let data_len = (self.size * 512) as usize;
        let areas: Vec<(usize, Vec<u8>)> = self
            .legs
            .iter()
            .zip(&self.data_offset)
            .enumerate()
            .filter(|&(i, _)| !self.out.contains(&i))
            .map(|(i, (l, &off))| {
                let mut area = vec![0u8; data_len];
                l.read_at(&mut area, off)
                    .map_err(|e| format!("leg {i}: {e}"))?;
                Ok((i, area))
            })
            .collect::<Result<_, String>>()?;
        let (first_leg, first_area) = &areas[0];
        for (i, a) in areas.iter().skip(1) {
            if a != first_area {
                let first = a
                    .chunks_exact(512)
                    .zip(first_area.chunks_exact(512))
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Err(format!(
                    "{why}: legs {first_leg} and {i} differ, first at sector {first} (write {} vs {})",
                    sector_id(&first_area[first * 512..]),
                    sector_id(&a[first * 512..])
                ));
            }
        }
        let areas: Vec<Vec<u8>> = areas.into_iter().map(|(_, a)| a).collect();
        let mut scratch = [0u8; 512];
        for (s, data) in areas[0].chunks_exact(512).enumerate() {
            let id = self
                .model
                .check(s as u64, data, &mut scratch)
                .map_err(|e| format!("{why}: on the legs: {e}"))?;
            // The legs agree now: an interrupted write is there or not, for good.
            if self.model.maybe.remove(&(s as u64)).is_some() {
                self.model.acked[s] = id;
            }
        }
        let owned: BTreeSet<u32> = live.iter().map(|&n| self.nodes[n].cn.node.slot).collect();
        let metas: Vec<LegMetadata> = self
            .legs
            .iter()
            .enumerate()
            .map(|(i, leg)| LegMetadata::load(&**leg).map_err(|e| format!("leg {i}: {e}")))
            .collect::<Result<_, _>>()?;
        for (i, m) in metas.iter().enumerate() {
            if self.out.contains(&i) {
                continue; // not written while it is out
            }
            // The superblocks say which legs are faulty.
            for (l, other) in metas.iter().enumerate() {
                let r = m.sb.dev_roles[other.sb.dev_number as usize];
                let faulty = r == role::FAULTY;
                if faulty != self.out.contains(&l) || (!faulty && r >= role::MAX) {
                    return Err(format!(
                        "{why}: leg {i}'s superblock gives leg{l} role {r:#x}, yet it is {}",
                        if self.out.contains(&l) {
                            "faulty"
                        } else {
                            "in service"
                        }
                    ));
                }
            }
            for (slot, b) in m.bitmaps.iter().enumerate() {
                let dirty = b.bits.count_dirty();
                if !owned.contains(&(slot as u32)) && dirty > 0 {
                    return Err(format!(
                        "{why}: leg {i}: bitmap slot {slot}, which no live node owns, has {dirty} dirty chunks"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads the whole array through node `n`.
    fn read_all(&mut self, n: usize) -> Result<(), String> {
        let step = self.chunk_sectors * 4;
        let mut s = 0;
        while s < self.size {
            let len = step.min(self.size - s);
            self.read_check(n, s, len)?;
            s += len;
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        tick();
        // Deaths seen by the survivors are recovered as soon as they are seen.
        let live = self.live();
        let n = self.rng.pick(&live);
        match self.rng.below(100) {
            0..=42 => self.write(n),
            43..=57 => self.read(n),
            58..=62 => {
                self.log(format!("node {n}: flush"));
                let allowed = self.errors_allowed();
                match self.nodes[n].cn.array.flush() {
                    Ok(()) => Ok(()),
                    Err(e) => self.tolerate(allowed, format!("flush: {e}")),
                }
            }
            63..=76 => {
                self.log(format!("node {n}: bitmap daemon pass"));
                self.stats.daemon_passes += 1;
                let allowed = self.errors_allowed();
                match self.nodes[n].cn.array.bitmap_daemon_pass() {
                    Ok(_) => Ok(()),
                    Err(e) => self.tolerate(allowed, format!("daemon pass: {e}")),
                }
            }
            77..=86 if live.len() > 1 => {
                self.crash(n)?;
                // Survivors notice at once, or after some more work.
                if self.rng.chance(60) {
                    self.recover_all()?;
                    if !self.faulted().is_empty() {
                        // Legs may differ until the fault is repaired.
                        return self.note_legs();
                    }
                    self.check_converged("after recovery")?;
                    let r = self.rng.pick(&self.live());
                    self.read_all(r)
                } else {
                    Ok(())
                }
            }
            87..=91 => {
                let vms = self.all_restartable();
                if !self.expected.is_empty() || vms.is_empty() {
                    return Ok(());
                }
                if vms.len() > 1 && self.rng.chance(25) {
                    self.recover_all()?;
                    let vms = self.all_restartable();
                    if vms.len() < 2 {
                        return vms.first().map_or(Ok(()), |&vm| self.restart(vm));
                    }
                    for n in self.join_together(&vms)? {
                        self.after_restart(n)?;
                    }
                    Ok(())
                } else {
                    self.restart(vms[0])
                }
            }
            92..=93 => self.leg_maintenance(n),
            94..=95 => {
                self.arm_fault(16, "at a step");
                Ok(())
            }
            96 => {
                if let Some(&l) = self.faulted().iter().next() {
                    self.repair(l);
                }
                Ok(())
            }
            97 if self.lm_deaths => self.lock_manager_dies(n),
            _ => {
                self.recover_all()?;
                let r = self.rng.pick(&self.live());
                self.read_all(r)
            }
        }
    }

    /// The lock manager dies, between operations or at a leg write of a write by
    /// node `n`: every lock is gone at once. Each node fences itself (as a served
    /// node does when it loses its lock manager) and writes nothing from then on,
    /// while it still serves reads; once the lock manager is back, every guest's
    /// node starts over (a served node executes itself anew) and takes over the
    /// dirty bits of every slot.
    fn lock_manager_dies(&mut self, n: usize) -> Result<(), String> {
        let live = self.live();
        let fences: Vec<Arc<Fence>> = live.iter().map(|&m| self.nodes[m].fence.clone()).collect();
        let (dlm, name) = (self.dlm.clone(), self.ls_name.clone());
        let die: LmDeath = Box::new(move || {
            dlm.stop(&name);
            for f in &fences {
                f.raise("lock manager lost");
            }
        });
        self.stats.lm_deaths += 1;
        if self.rng.chance(50) {
            self.log("the lock manager dies".to_string());
            die();
        } else {
            let vm = self.nodes[n].vm;
            let (sector, sectors) = self.pick_write(vm);
            let (id, buf) = self.data_for(sector, sectors);
            let at = self.rng.below(2 * self.legs.len() as u64 + 1);
            self.log(format!(
                "node {n}: write {id} at {sector}+{sectors}, the lock manager dies at its {at}th leg write"
            ));
            self.nodes[n].host.lm_dies_after(at, die);
            let r = self.run_op(n, move |cn| {
                cn.array
                    .write(sector, &[IoSlice::new(&buf)])
                    .map(|()| 0)
                    .map_err(|e| e.to_string())
            });
            if let Some(die) = self.nodes[n].host.lm_death_pending() {
                self.log(format!(
                    "write {id} completed before; the lock manager dies"
                ));
                die();
            }
            match r {
                Ok(Ok(_)) => {
                    self.model.acknowledge(id, sector, sectors);
                    self.stats.writes += 1;
                }
                Ok(Err(e)) => {
                    self.log(format!("  write {id} failed: {e}"));
                    self.model.interrupted(id, sector, sectors);
                }
                Err(e) => return Err(e.unwrap_or_else(|| "the host crashed".into())),
            }
        }
        // Fenced: the nodes read (a guest's writes are refused before the array)
        // and write nothing.
        let written = |sim: &Sim| -> Vec<u64> {
            sim.devices
                .iter()
                .map(|d| d.written.load(Ordering::Relaxed))
                .collect()
        };
        let before = written(self);
        for _ in 0..self.rng.below(4) {
            let r = self.rng.pick(&live);
            self.read(r)?;
        }
        for (i, (now, then)) in written(self).iter().zip(&before).enumerate() {
            if now != then {
                return Err(format!("leg{i} was written while every node was fenced"));
            }
        }
        // The lock manager is back: every guest's node starts over.
        self.log("the lock manager is back: the nodes start over".to_string());
        for &m in &live {
            self.nodes[m].alive = false;
            self.nodes[m].host.crash_now();
            let vm = self.nodes[m].vm;
            self.vms[vm].node = None;
        }
        // The slots of nodes that died before are taken over by the first node
        // to join, with all the others.
        self.expected.clear();
        let vms: Vec<usize> = live.iter().map(|&m| self.nodes[m].vm).collect();
        if vms.len() > 1 && self.rng.chance(30) {
            for m in self.join_together(&vms)? {
                self.after_restart(m)?;
            }
        } else {
            for vm in vms {
                self.restart(vm)?;
            }
        }
        Ok(())
    }

    /// An operator fails a leg through node `n`, or re-adds the failed one
    /// through it: every node stops (starts) writing it, and `n` rebuilds it.
    fn leg_maintenance(&mut self, n: usize) -> Result<(), String> {
        let a = self.nodes[n].cn.array.clone();
        // Unless asked for, the operator acts only on healthy devices: failing the
        // one healthy leg, or re-adding one while the other has a fault, leaves
        // the nodes disagreeing (see the header).
        let careful = !env_on("SIM_FAULTS_OPERATOR");
        match self.out.iter().next().copied() {
            None if careful && !self.faulted().is_empty() => Ok(()),
            None if !a.is_degraded() => {
                let l = self.rng.below(self.legs.len() as u64) as usize;
                self.log(format!("node {n}: operator fails leg{l}"));
                let allowed = self.errors_allowed();
                self.failed_by_operator.insert(l);
                match a.fail_leg(&format!("leg{l}")) {
                    Ok(()) => {
                        self.out.insert(l);
                        self.stats.legs_failed += 1;
                        Ok(())
                    }
                    Err(e) => self.tolerate(allowed, format!("fail leg{l} through node {n}: {e}")),
                }
            }
            Some(l) => self.re_add(n, l),
            None => Ok(()),
        }
    }

    /// The operator repairs leg `l`'s device and re-adds the leg through node `n`.
    fn re_add(&mut self, n: usize, l: usize) -> Result<(), String> {
        if env_on("SIM_FAULTS_OPERATOR") {
            self.repair(l);
        } else {
            self.repair_all();
        }
        self.log(format!("node {n}: operator re-adds leg{l}"));
        let allowed = self.errors_allowed();
        match self.nodes[n].cn.array.re_add_leg(&format!("leg{l}")) {
            Ok(kind) => {
                self.log(format!("node {n}: leg{l} re-added, {kind:?} rebuild"));
                self.out.remove(&l);
                self.failed_by_operator.remove(&l);
                self.hit.remove(&l);
                self.stats.legs_re_added += 1;
                Ok(())
            }
            Err(e) => self.tolerate(allowed, format!("re-add leg{l} through node {n}: {e}")),
        }
    }

    fn run(&mut self) -> Result<(), String> {
        let ops = 10 + self.rng.below(30);
        for _ in 0..ops {
            self.step()?;
            self.note_legs()?;
        }
        self.recover_all()?;
        // The operator repairs every device and re-adds the legs that are out.
        if !self.faulted().is_empty() {
            self.repair_all();
            self.recover_all()?;
        }
        self.note_legs()?;
        let mut tries = 0;
        while let Some(&l) = self.out.iter().next() {
            tries += 1;
            if tries > 4 {
                return Err(format!("leg{l} cannot be re-added"));
            }
            let n = self.rng.pick(&self.live());
            self.re_add(n, l)?;
            self.recover_all()?;
            self.note_legs()?;
        }
        self.check_converged("at the end")?;
        // The legs are identical now: one node's reads check the read path.
        let n = self.rng.pick(&self.live());
        self.read_all(n)
    }

    /// Ends the simulation: stopped threads return, every node leaves.
    fn teardown(&mut self) -> Result<(), String> {
        for n in &self.nodes {
            n.host.release();
        }
        let mut hung = 0;
        for rx in self.stopped.drain(..) {
            if rx.recv_timeout(WAIT).is_err() {
                hung += 1;
            }
        }
        for n in &self.nodes {
            if n.alive {
                self.dlm.kill(&self.ls_name, n.dlm_id);
            }
        }
        if hung > 0 {
            return Err(format!(
                "{hung} operations of crashed hosts never returned after their I/O failed"
            ));
        }
        Ok(())
    }
}

/// A node being started (on a thread of its own when it races a recovery).
struct PendingNode {
    ls: Arc<HostLs>,
    legs: Vec<Arc<dyn Leg>>,
    host: Arc<Host>,
    fence: Arc<Fence>,
    crashed: Receiver<()>,
    dlm_id: NodeId,
    vm: usize,
    dlm: LocalDlm,
    ls_name: String,
}

impl PendingNode {
    fn join(&self) -> Result<ClusterNode, String> {
        // No wait for a held slot: the driver retries (a survivor holding one lets
        // go only when the driver has it process its reports).
        self.join_waiting(Duration::ZERO)
    }

    /// Joins, waiting up to `wait` while every slot is held.
    fn join_waiting(&self, wait: Duration) -> Result<ClusterNode, String> {
        let ls: Arc<dyn LockSpace> = self.ls.clone();
        ClusterNode::join_waiting(ls, self.legs.clone(), wait).map_err(|e| {
            // A served node whose join failed exits, leaving the lockspace: a
            // member left behind without a slot would look like a node still
            // joining to the others (who then keep reads on one leg).
            self.dlm.kill(&self.ls_name, self.dlm_id);
            format!("vm {}: join: {e}", self.vm)
        })
    }
}

/// The traces of the seeds running now, for the hang report.
static RUNNING: Mutex<BTreeMap<u64, Arc<Mutex<Vec<String>>>>> = Mutex::new(BTreeMap::new());

/// A new trace for `seed`, listed as running.
fn trace(seed: u64) -> Arc<Mutex<Vec<String>>> {
    let t = Arc::new(Mutex::new(Vec::new()));
    RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(seed, t.clone());
    t
}

/// Runs one seed; on failure returns the error and the trace.
fn run_seed(seed: u64) -> Result<(Stats, Vec<String>), (String, Vec<String>)> {
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut sim = Sim::new(seed).map_err(|e| (e, Vec::new()))?;
        let r = sim.run();
        let t = sim.teardown();
        keep_legs(&sim.legs);
        let trace = std::mem::take(&mut *sim.trace.lock().unwrap());
        match r.and(t) {
            Ok(()) => Ok((sim.stats, trace)),
            Err(e) => Err((e, trace)),
        }
    }));
    let t = RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&seed);
    match r {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let trace = t
                .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).clone())
                .unwrap_or_default();
            Err((format!("panic: {msg}"), trace))
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Whether the environment variable `name` is 1.
fn env_on(name: &str) -> bool {
    env_u64(name) == Some(1)
}

/// Reports a seed that stops making progress, then ends the process.
fn start_watchdog(stall: Duration) {
    std::thread::spawn(move || {
        let mut last = PROGRESS.load(Ordering::Relaxed);
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = PROGRESS.load(Ordering::Relaxed);
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() > stall {
                // Straight to stderr: the test harness's capture dies with the process.
                use std::io::Write;
                let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
                let mut err = std::io::stderr();
                let _ = writeln!(err, "cluster simulation: no progress for {stall:?}");
                for (seed, trace) in running.iter() {
                    let _ = writeln!(err, "seed {seed} hangs after:");
                    let trace = trace.lock().unwrap_or_else(|e| e.into_inner());
                    for l in trace.iter().rev().take(40).rev() {
                        let _ = writeln!(err, "    {l}");
                    }
                    let _ = writeln!(
                        err,
                        "replay with: SIM_SEED={seed} cargo test --test cluster_sim"
                    );
                }
                std::process::exit(1);
            }
        }
    });
}

#[test]
fn cluster_simulation() {
    start_watchdog(Duration::from_secs(env_u64("SIM_STALL_SECS").unwrap_or(60)));
    if let Some(seed) = env_u64("SIM_SEED") {
        // The product's log with RUST_LOG (e.g. RUST_LOG=info), as the trace goes.
        let _ = env_logger::builder().is_test(true).try_init();
        // SIM_REPEAT: run it again and again (outcomes must not depend on timing).
        for _ in 0..env_u64("SIM_REPEAT").unwrap_or(1) {
            match run_seed(seed) {
                Ok((stats, trace)) => {
                    for l in trace {
                        println!("{l}");
                    }
                    println!("seed {seed} passed: {stats:?}");
                }
                Err((e, trace)) => {
                    for l in trace {
                        println!("{l}");
                    }
                    panic!("seed {seed} failed: {e}");
                }
            }
        }
        return;
    }
    let start_seed = env_u64("SIM_SEED_START").unwrap_or(0);
    let seeds = env_u64("SIM_SEEDS").unwrap_or(2000);
    let threads = env_u64("SIM_THREADS").unwrap_or(8).max(1);
    let next = Arc::new(AtomicU64::new(start_seed));
    let total = Arc::new(Mutex::new(Stats::default()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..threads {
            let (next, total, failures) = (next.clone(), total.clone(), failures.clone());
            sc.spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= start_seed + seeds {
                    return;
                }
                let r = run_seed(seed);
                match r {
                    Ok((stats, _)) => total.lock().unwrap().add(&stats),
                    Err((e, trace)) => {
                        let tail: Vec<String> =
                            trace.iter().rev().take(40).rev().cloned().collect();
                        failures.lock().unwrap().push((seed, e, tail));
                    }
                }
            });
        }
    });
    let total = *total.lock().unwrap();
    println!(
        "cluster simulation: {} seeds in {:.1?}: {} writes ({} racing a recovery, {} interrupted by a crash), {} reads, {} daemon passes, {} crashes ({} during a recovery), {} recoveries, {} chunks recovered, {} restarts ({} times several at once), {} lock manager deaths, {} legs failed, {} re-added, {} leg faults ({} legs failed after one, {} operations and {} recoveries failed, {} joins refused by an unreadable leg), {} transfers split",
        total.seeds,
        t0.elapsed(),
        total.writes,
        total.racing_writes,
        total.interrupted_writes,
        total.reads,
        total.daemon_passes,
        total.crashes,
        total.crashes_in_recovery,
        total.recoveries,
        total.chunks_recovered,
        total.restarts,
        total.joins_together,
        total.lm_deaths,
        total.legs_failed,
        total.legs_re_added,
        total.faults,
        total.legs_failed_by_faults,
        total.failed_ops,
        total.failed_recoveries,
        total.joins_refused,
        total.split_transfers
    );
    let failures = failures.lock().unwrap();
    if !failures.is_empty() {
        for (seed, e, tail) in failures.iter() {
            eprintln!("seed {seed} failed: {e}");
            for l in tail {
                eprintln!("    {l}");
            }
            eprintln!("replay with: SIM_SEED={seed} cargo test --test cluster_sim");
        }
        panic!(
            "{} of {seeds} seeds failed (first: {})",
            failures.len(),
            failures[0].0
        );
    }
}

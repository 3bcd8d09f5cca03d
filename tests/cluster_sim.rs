//! Deterministic simulation of the md-cluster protocol.
//!
//! Each seed builds a clustered mirror on in-memory legs, starts two or three
//! cluster nodes on one in-process lock manager and lets a seeded random number
//! generator choose what happens: writes, reads, flushes and bitmap daemon passes
//! by the nodes, hosts that crash (in the middle of a write, of a daemon pass, of a
//! recovery, or idle), delays in leg I/O and lock requests, writes and restarts
//! racing a recovery. Operations are issued from one thread in seeded order; only
//! what the protocol makes concurrent (message receipt, watches, and the writers
//! and joiners started on purpose during a recovery) runs elsewhere, and no
//! outcome checked here may depend on its timing.
//!
//! Checked for every seed:
//! - every acknowledged write reads back, through the live nodes and from every leg;
//!   a write a crash interrupted reads back as either its old or its new data;
//! - after the survivors recovered a dead node, all legs' data areas are identical,
//!   the dead node's bitmap slot is clean on every leg and no live node still needs
//!   a resync;
//! - nothing hangs and nothing panics.
//!
//! Environment:
//! - `SIM_SEEDS=N`: how many seeds (default 2000), starting at `SIM_SEED_START`
//!   (default 0);
//! - `SIM_SEED=S`: runs seed S alone and prints its trace (the replay of a failure);
//! - `SIM_THREADS=T`: seeds run on T threads (default 4; they mostly wait on each other);
//! - `SIM_STALL_SECS=S`: a seed that makes no progress for S seconds is a hang
//!   (default 60).

use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, IoSlice, IoSliceMut};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vhost_user_md::cluster::node::ClusterNode;
use vhost_user_md::dlm::local::{LocalDlm, LocalMember};
use vhost_user_md::dlm::{DlmError, Event, LockId, LockSpace, Mode, NodeId};
use vhost_user_md::md::Uuid;
use vhost_user_md::raid1::metadata::{create_array, LegMetadata, NewArray};
use vhost_user_md::raid1::LegState;
use vhost_user_md::storage::{Leg, MemLeg};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// Node slots of every simulated array.
const SLOTS: u32 = 4;
/// How long a survivor may take to see a death, or an operation to finish.
const WAIT: Duration = Duration::from_secs(20);

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
}

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

    /// At the end of the simulation: threads stopped at the crash point return.
    fn release(&self) {
        self.lock().released = true;
        self.cond.notify_all();
    }
}

/// A leg as one host sees it.
struct HostLeg {
    inner: Arc<MemLeg>,
    host: Arc<Host>,
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
        self.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.host.before_write()?;
        self.inner.write_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.host.before_other()?;
        self.inner.flush()
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.host.before_write()?;
        self.inner.discard(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.host.before_write()?;
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
    }
}

struct SimNode {
    cn: Arc<ClusterNode>,
    host: Arc<Host>,
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
type RacingWrites = (usize, Receiver<Result<(), String>>, Vec<(u32, u64, u64)>);
type RacingJoin = (
    Receiver<(PendingNode, Result<ClusterNode, String>)>,
    String,
    usize,
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
    /// Nodes joining during a recovery: (result, trace line, guest).
    racing_joins: Vec<RacingJoin>,
    /// A leg an operator failed and has not re-added yet.
    out_leg: Option<usize>,
    stats: Stats,
}

thread_local! {
    /// Legs of this thread's previous seeds, to be blanked and used again (a new
    /// leg costs the allocation and first touch of all of its pages).
    static LEGS: std::cell::RefCell<Vec<Arc<MemLeg>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A zeroed leg `leg{i}` of `size` bytes: a previous seed's that nothing holds
/// any more, or a new one.
fn blank_leg(i: usize, size: u64) -> Arc<MemLeg> {
    let name = format!("leg{i}");
    let old = LEGS.with(|l| {
        let mut l = l.borrow_mut();
        let at = l
            .iter()
            .position(|m| m.name() == name && m.size() == size && Arc::strong_count(m) == 1)?;
        Some(l.swap_remove(at))
    });
    match old {
        Some(m) => {
            m.write_zeroes(0, size).expect("blank a leg");
            m
        }
        None => Arc::new(MemLeg::new(&name, size)),
    }
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
        let legs: Vec<Arc<MemLeg>> = (0..nlegs).map(|i| blank_leg(i, leg_size)).collect();
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
            out_leg: None,
            stats: Stats {
                seeds: 1,
                ..Stats::default()
            },
        };
        sim.log(format!(
            "array: {nlegs} legs of {} KiB, {} sectors, {} KiB chunks, {nnodes} nodes, delays {delay_pct}%",
            leg_size / KIB,
            size,
            chunk / KIB
        ));
        for vm in 0..nnodes {
            let n = sim.start_node(vm)?;
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
        let legs: Vec<Arc<dyn Leg>> = self
            .legs
            .iter()
            .map(|l| {
                Arc::new(HostLeg {
                    inner: l.clone(),
                    host: host.clone(),
                }) as Arc<dyn Leg>
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
                crashed,
                dlm_id,
                vm,
            },
            line,
        )
    }

    fn add_node(&mut self, p: PendingNode, cn: ClusterNode, line: String) -> usize {
        let slot = cn.node.slot;
        self.log(format!("{line} as slot {slot}"));
        let idx = self.nodes.len();
        self.nodes.push(SimNode {
            cn: Arc::new(cn),
            host: p.host,
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

    /// A random write inside `vm`'s region: (sector, sectors). Half of them land
    /// near the region's edges, in chunks the neighbouring guest writes too.
    fn pick_write(&mut self, vm: usize) -> (u64, u64) {
        let (lo, hi) = (self.vms[vm].lo, self.vms[vm].hi);
        let sectors = match self.rng.below(10) {
            0..=5 => 1 + self.rng.below(16),
            6..=8 => 1 + self.rng.below(128),
            _ => 1 + self.rng.below(self.chunk_sectors * 2),
        }
        .min(hi - lo);
        let window = (self.chunk_sectors * 3).min(hi - lo - sectors + 1);
        let sector = match self.rng.below(3) {
            0 => lo + self.rng.below(window),
            1 => hi - sectors - self.rng.below(window),
            _ => lo + self.rng.below(hi - lo - sectors + 1),
        };
        (sector, sectors)
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
        self.nodes[n]
            .cn
            .array
            .write(sector, &[IoSlice::new(&buf)])
            .map_err(|e| format!("write {id} by node {n} failed: {e}"))?;
        self.model.acknowledge(id, sector, sectors);
        self.stats.writes += 1;
        Ok(())
    }

    /// Reads `sectors` at `sector` through node `n` and checks them.
    fn read_check(&mut self, n: usize, sector: u64, sectors: u64) -> Result<(), String> {
        let mut buf = vec![0u8; (sectors * 512) as usize];
        self.nodes[n]
            .cn
            .array
            .read(sector, &mut [IoSliceMut::new(&mut buf)])
            .map_err(|e| format!("read by node {n} at {sector}+{sectors} failed: {e}"))?;
        let mut scratch = [0u8; 512];
        for (i, s) in buf.chunks_exact(512).enumerate() {
            self.model
                .check(sector + i as u64, s, &mut scratch)
                .map_err(|e| format!("read through node {n}: {e}"))?;
        }
        Ok(())
    }

    fn read(&mut self, n: usize) -> Result<(), String> {
        let sectors = 1 + self.rng.below(self.chunk_sectors * 2).min(self.size - 1);
        let sector = self.rng.below(self.size - sectors + 1);
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
                self.nodes[n]
                    .cn
                    .array
                    .bitmap_daemon_pass()
                    .map_err(|e| format!("daemon pass on node {n}: {e}"))?;
                self.nodes[n].host.crash_after(at);
                match self.run_op(n, |cn| {
                    cn.array.bitmap_daemon_pass().map_err(|e| e.to_string())
                }) {
                    Ok(r) => {
                        self.nodes[n].host.cancel_crash();
                        r.map_err(|e| format!("daemon pass on node {n}: {e}"))?;
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
                match self.run_op(n, move |cn| {
                    cn.array
                        .write(sector, &[IoSlice::new(&buf)])
                        .map(|()| 0)
                        .map_err(|e| e.to_string())
                }) {
                    Ok(r) => {
                        self.nodes[n].host.cancel_crash();
                        r.map_err(|e| format!("write {id} by node {n} failed: {e}"))?;
                        self.log(format!("write {id} completed before the crash"));
                        self.model.acknowledge(id, sector, sectors);
                        self.stats.writes += 1;
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
                    if self.racing_writes.is_empty() && self.racing_joins.is_empty() {
                        return self.resync_all();
                    }
                    self.finish_racing()?;
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

    /// Node `s` recovers `slot`; a crash, a racing writer or a racing restart may
    /// be thrown in.
    fn recover(&mut self, s: usize, slot: u32) -> Result<(), String> {
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
            match self.run_op(s, move |cn| cn.recover(slot).map_err(|e| e.to_string())) {
                Ok(r) => {
                    self.nodes[s].host.cancel_crash();
                    let bytes = r.map_err(|e| format!("recovery of slot {slot}: {e}"))?;
                    self.stats.chunks_recovered += bytes / chunk_bytes;
                    self.log(format!("recovery done before the crash: {bytes} bytes"));
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
                let mut r = Ok(());
                for (sector, _, id, buf) in &writes {
                    if let Err(e) = cn.array.write(*sector, &[IoSlice::new(buf)]) {
                        r = Err(format!("racing write {id}: {e}"));
                        break;
                    }
                }
                let _ = tx.send(r);
            });
            (rx, ids)
        });
        let joiner = match restart {
            Some(vm) => {
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
        let r = self.nodes[s].cn.recover(slot);
        let bytes = r.map_err(|e| format!("node {s}: recovery of slot {slot}: {e}"))?;
        self.stats.chunks_recovered += bytes / chunk_bytes;
        self.log(format!(
            "node {s}: recovered slot {slot}: {bytes} bytes copied"
        ));
        if let Some((rx, ids)) = racer {
            self.racing_writes.push((writer.unwrap_or(s), rx, ids));
        }
        if let Some((rx, line)) = joiner {
            self.racing_joins.push((rx, line, restart.unwrap_or(0)));
        }
        Ok(())
    }

    /// Waits for the writes and joins that raced the recoveries.
    fn finish_racing(&mut self) -> Result<(), String> {
        for (n, rx, ids) in std::mem::take(&mut self.racing_writes) {
            let r = rx
                .recv_timeout(WAIT)
                .map_err(|_| format!("node {n}: racing writes hung"))?;
            r?;
            for (id, sector, sectors) in ids {
                self.model.acknowledge(id, sector, sectors);
                self.stats.writes += 1;
                self.stats.racing_writes += 1;
            }
        }
        for (rx, line, vm) in std::mem::take(&mut self.racing_joins) {
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
                    while let Ok(slot) = self.nodes[s].cn.node.dead.try_recv() {
                        self.expected.retain(|&e| e != (s, slot));
                        self.recover(s, slot)?;
                    }
                }
            };
            match r {
                Ok(cn) => {
                    let n = self.add_node(p, cn, line);
                    self.after_restart(n)?;
                }
                // Every slot may be held for a moment (see `restart`): start over
                // with a new member (a failed join's threads still use the old one).
                Err(e) if e.contains("node slots of the array are in use") => {
                    self.log(format!("vm {vm}: {e}; restarting it afresh"));
                    self.dlm.kill(&self.ls_name, p.dlm_id);
                    self.restart(vm)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Starts a new node for guest `vm`. A survivor that watched a slot while
    /// another survivor recovered it is granted that slot's lock when the other
    /// releases it, and holds it until it has processed that (spurious) report:
    /// a join that finds every slot taken meanwhile is retried once the reports
    /// were processed.
    fn restart(&mut self, vm: usize) -> Result<(), String> {
        let start = Instant::now();
        loop {
            self.recover_all()?;
            let (p, line) = self.prepare_node(vm);
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
                Err(e) => return Err(e),
            }
        }
    }

    /// A guest without a node (its node died and the death was seen by all).
    fn restartable(&self) -> Option<usize> {
        (0..self.vms.len()).find(|&v| {
            self.vms[v].node.is_none()
                && self.racing_joins.iter().all(|j| j.2 != v)
                && !self.nodes.iter().any(|n| {
                    !n.alive && n.vm == v && self.expected.iter().any(|e| e.1 == n.cn.node.slot)
                })
        })
    }

    fn after_restart(&mut self, n: usize) -> Result<(), String> {
        self.stats.restarts += 1;
        self.nodes[n]
            .cn
            .array
            .mark_active()
            .map_err(|e| format!("node {n}: mark active: {e}"))?;
        self.resync_all()
    }

    /// What each node's resync thread does: copies the chunks it needs.
    fn resync_all(&mut self) -> Result<(), String> {
        for n in self.live() {
            let bytes = self.nodes[n]
                .cn
                .resync()
                .map_err(|e| format!("node {n}: resync: {e}"))?;
            if bytes > 0 {
                self.log(format!("node {n}: resynced {bytes} bytes"));
            }
        }
        // A rebuilt leg is declared in sync by the node that rebuilt it.
        for n in self.live() {
            self.nodes[n]
                .cn
                .array
                .finish_recovery()
                .map_err(|e| format!("node {n}: finish recovery: {e}"))?;
        }
        Ok(())
    }

    /// After every death was recovered: legs identical, bitmap slots of no live
    /// node clean, every acknowledged write on every leg.
    fn check_converged(&mut self, why: &str) -> Result<(), String> {
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
                let out = self.out_leg.is_some_and(|l| *name == format!("leg{l}"));
                if !out && *st != LegState::InSync {
                    return Err(format!("{why}: node {n}: {name} is {st:?}, not in sync"));
                }
            }
            if self.out_leg.is_some() {
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
        let areas: Vec<Vec<u8>> = self
            .legs
            .iter()
            .zip(&self.data_offset)
            .enumerate()
            .filter(|&(i, _)| self.out_leg != Some(i))
            .map(|(i, (l, &off))| {
                let mut area = vec![0u8; data_len];
                l.read_at(&mut area, off)
                    .map_err(|e| format!("leg {i}: {e}"))?;
                Ok(area)
            })
            .collect::<Result<_, String>>()?;
        for (i, a) in areas.iter().enumerate().skip(1) {
            if *a != areas[0] {
                let first = a
                    .chunks_exact(512)
                    .zip(areas[0].chunks_exact(512))
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Err(format!(
                    "{why}: legs 0 and {i} differ, first at sector {first} (write {} vs {})",
                    sector_id(&areas[0][first * 512..]),
                    sector_id(&a[first * 512..])
                ));
            }
        }
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
        for (i, leg) in self.legs.iter().enumerate() {
            if self.out_leg == Some(i) {
                continue; // not written while it is out
            }
            let m = LegMetadata::load(&**leg).map_err(|e| format!("leg {i}: {e}"))?;
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
            0..=44 => self.write(n),
            45..=59 => self.read(n),
            60..=64 => {
                self.log(format!("node {n}: flush"));
                self.nodes[n]
                    .cn
                    .array
                    .flush()
                    .map_err(|e| format!("flush: {e}"))
            }
            65..=79 => {
                self.log(format!("node {n}: bitmap daemon pass"));
                self.stats.daemon_passes += 1;
                self.nodes[n]
                    .cn
                    .array
                    .bitmap_daemon_pass()
                    .map(|_| ())
                    .map_err(|e| format!("daemon pass: {e}"))
            }
            80..=89 if live.len() > 1 => {
                self.crash(n)?;
                // Survivors notice at once, or after some more work.
                if self.rng.chance(60) {
                    self.recover_all()?;
                    self.check_converged("after recovery")?;
                    let r = self.rng.pick(&self.live());
                    self.read_all(r)
                } else {
                    Ok(())
                }
            }
            90..=94 => match self.restartable() {
                Some(vm) if self.expected.is_empty() => self.restart(vm),
                _ => Ok(()),
            },
            95..=96 => self.leg_maintenance(n),
            _ => {
                self.recover_all()?;
                let r = self.rng.pick(&self.live());
                self.read_all(r)
            }
        }
    }

    /// An operator fails a leg through node `n`, or re-adds the failed one
    /// through it: every node stops (starts) writing it, and `n` rebuilds it.
    fn leg_maintenance(&mut self, n: usize) -> Result<(), String> {
        let a = self.nodes[n].cn.array.clone();
        match self.out_leg {
            None if !a.is_degraded() => {
                let l = self.rng.below(self.legs.len() as u64) as usize;
                self.log(format!("node {n}: operator fails leg{l}"));
                a.fail_leg(&format!("leg{l}"))
                    .map_err(|e| format!("fail leg{l} through node {n}: {e}"))?;
                self.out_leg = Some(l);
                self.stats.legs_failed += 1;
                Ok(())
            }
            Some(l) => self.re_add(n, l),
            None => Ok(()),
        }
    }

    fn re_add(&mut self, n: usize, l: usize) -> Result<(), String> {
        self.log(format!("node {n}: operator re-adds leg{l}"));
        let kind = self.nodes[n]
            .cn
            .array
            .re_add_leg(&format!("leg{l}"))
            .map_err(|e| format!("re-add leg{l} through node {n}: {e}"))?;
        self.log(format!("node {n}: leg{l} re-added, {kind:?} rebuild"));
        self.out_leg = None;
        self.stats.legs_re_added += 1;
        Ok(())
    }

    fn run(&mut self) -> Result<(), String> {
        let ops = 10 + self.rng.below(30);
        for _ in 0..ops {
            self.step()?;
        }
        self.recover_all()?;
        if let Some(l) = self.out_leg {
            let n = self.rng.pick(&self.live());
            self.re_add(n, l)?;
            self.recover_all()?;
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
    crashed: Receiver<()>,
    dlm_id: NodeId,
    vm: usize,
}

impl PendingNode {
    fn join(&self) -> Result<ClusterNode, String> {
        let ls: Arc<dyn LockSpace> = self.ls.clone();
        // No wait for a held slot: the driver retries (a survivor holding one lets
        // go only when the driver has it process its reports).
        ClusterNode::join_waiting(ls, self.legs.clone(), Duration::ZERO)
            .map_err(|e| format!("vm {}: join: {e}", self.vm))
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
    let threads = env_u64("SIM_THREADS").unwrap_or(4).max(1);
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
        "cluster simulation: {} seeds in {:.1?}: {} writes ({} racing a recovery, {} interrupted by a crash), {} reads, {} daemon passes, {} crashes ({} during a recovery), {} recoveries, {} chunks recovered, {} restarts, {} legs failed, {} re-added",
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
        total.legs_failed,
        total.legs_re_added
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

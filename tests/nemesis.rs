//! Nemesis: two or three `serve` nodes of one clustered mirror over `lockd`, each
//! written and read by a libblkio client, while a seeded driver kills and restarts
//! nodes (a client then follows its node or moves to a free one, as a VM whose
//! host died), fails and re-adds legs, stalls a leg under one node (the hidden
//! `--inject-fault ...,stall-until-file=` drill: writes at the leg hang until a
//! file exists again), stops node processes with SIGSTOP for a few seconds (a
//! peer that stops answering) and restarts `lockd` (the nodes fence, then rejoin).
//!
//! Every write fills each 4 KiB unit it covers with a header naming (client, write
//! sequence number, unit) and a body derived from them, so what a unit holds names
//! the write that put it there, and a torn or misdirected write is seen. Each
//! client owns a region of the disk and keeps a journal per unit: the last
//! acknowledged write, the writes whose outcome is unknown since (in flight when
//! their node died, or failed while the lock manager was away), the last write
//! acknowledged before an acknowledged FLUSH, and what reads have seen. Checks:
//! - a read returns the last acknowledged write or one of the unknown ones since,
//!   never older data and never a torn unit; only a process dies here, never a
//!   host, so an acknowledged write survives even before it was flushed;
//! - once a read saw one of several possible values, later reads see the same
//!   (until a leg is failed: then the other leg's copy of an unacknowledged
//!   write may win, as with md; and not for reads made while the lock manager
//!   was away, see `strict_fenced_reads`);
//! - writes fail only while the lock manager is away (a fenced node refuses
//!   them), reads never;
//! - at the end, once every fault is healed and both legs are in sync on every
//!   node: every unit reads back as journalled through every node, from both legs'
//!   data areas, the legs' data areas are identical and no bitmap bit is left.
//!
//! `NEMESIS_SEED=S` replays the driver's choices of a run (timing still varies),
//! `NEMESIS_SECS=N` sets how long faults are injected (default 60), and
//! `NEMESIS_KEEP=1` keeps the logs and legs of a run that passed (a failed run's
//! are always kept), `NEMESIS_RUST_LOG` sets the nodes' `RUST_LOG` (info).
//!
//! Long file: one driver, its clients and its final checks belong together; the
//! parts only make sense with the journal they share.

mod common;

use common::{bin, data_area};
use serde_json::Value;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The unit a write's content is checked in.
const UNIT: usize = 4096;
/// Largest request, in units.
const MAX_UNITS: usize = 16;
/// Requests a client keeps in flight.
const DEPTH: usize = 8;
/// Client `c` owns array bytes `[c * REGION_STRIDE, c * REGION_STRIDE + REGION_LEN)`.
const REGION_STRIDE: u64 = 16 * MIB;
const REGION_LEN: u64 = 12 * MIB;
const REGION_UNITS: usize = (REGION_LEN / UNIT as u64) as usize;
/// The first units of a region get half the writes (many overwrites).
const HOT_UNITS: usize = 256;
const CLIENTS: usize = 2;
const MAGIC: u64 = u64::from_le_bytes(*b"NEMESIS!");
/// A request in flight longer than this (its node alive) is a hang.
const HANG: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// Randomness and unit contents.

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `pct` percent.
    fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// Fills `buf` (one unit) with write `seq` of client `client` at array unit `unit`.
fn fill_unit(buf: &mut [u8], client: u64, seq: u64, unit: u64) {
    buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&client.to_le_bytes());
    buf[16..24].copy_from_slice(&seq.to_le_bytes());
    buf[24..32].copy_from_slice(&unit.to_le_bytes());
    let mut x = Rng::new(client << 56 ^ seq << 20 ^ unit).next() | 1;
    for w in buf[32..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

/// The write sequence number a unit holds (0: never written, all zero), or what
/// is wrong with it.
fn decode_unit(buf: &[u8], client: u64, unit: u64) -> Result<u64, String> {
    if buf.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let word = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
    if word(0) != MAGIC {
        return Err(format!(
            "garbage (first bytes {:02x?})",
            &buf[..16.min(buf.len())]
        ));
    }
    let (c, seq, u) = (word(1), word(2), word(3));
    if c != client || u != unit {
        return Err(format!(
            "write {seq} of client {c} for unit {u} (misdirected)"
        ));
    }
    let mut want = vec![0u8; UNIT];
    fill_unit(&mut want, c, seq, u);
    if want != buf {
        let at = want.iter().zip(buf).position(|(a, b)| a != b).unwrap();
        return Err(format!("torn write {seq}: differs from byte {at}"));
    }
    Ok(seq)
}

// ---------------------------------------------------------------------------
// What the driver and the clients share.

/// Which node a client is to use. The driver bumps `epoch` once the process the
/// client was talking to is gone (killed and reaped, or executed anew to rejoin):
/// the client then gives up what it had in flight there, and connects again when
/// `ready`.
#[derive(Clone, Copy, Debug)]
struct Assign {
    node: usize,
    epoch: u64,
    ready: bool,
}

struct Shared {
    t0: Instant,
    sockets: Vec<PathBuf>,
    assign: Vec<Mutex<Assign>>,
    /// Bumped before a leg is failed: what reads saw may change across it.
    fail_epoch: AtomicU64,
    /// Odd while the lock manager is away (writes may fail), bumped at both ends.
    outage: AtomicU64,
    /// Faults are healed: finish what is in flight, flush, check and stop.
    quiesce: AtomicBool,
    failure: Mutex<Option<String>>,
    events: Mutex<Vec<(Duration, String)>>,
}

impl Shared {
    fn event(&self, what: String) {
        let at = self.t0.elapsed();
        eprintln!("[{:8.3}] {what}", at.as_secs_f64());
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((at, what));
    }

    fn fail(&self, what: String) {
        self.event(format!("FAILURE: {what}"));
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(what);
        }
    }

    fn failed(&self) -> bool {
        self.failure().is_some()
    }

    /// The first failure, if any (the lock is not held on return: `fail` takes it).
    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn assign(&self, c: usize) -> Assign {
        *self.assign[c].lock().unwrap()
    }
}

// ---------------------------------------------------------------------------
// A libblkio connection that reports errors instead of panicking.

struct Conn {
    q: blkio::Blkioq,
    /// Dropped after the queue: the connection.
    _blkio: blkio::Blkio,
    addr: usize,
    outstanding: usize,
}

const BUF_LEN: usize = DEPTH * MAX_UNITS * UNIT;

impl Conn {
    fn open(socket: &Path) -> Result<Conn, String> {
        let e = |what: &str| {
            let what = what.to_string();
            move |e: blkio::Error| format!("{what}: {e}")
        };
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").map_err(e("new"))?;
        b.set_str("path", socket.to_str().unwrap())
            .map_err(e("path"))?;
        b.connect().map_err(e("connect"))?;
        b.set_i32("num-queues", 1).map_err(e("num-queues"))?;
        let out = b.start().map_err(e("start"))?;
        let region = b.alloc_mem_region(BUF_LEN).map_err(e("alloc"))?;
        b.map_mem_region(&region).map_err(e("map"))?;
        let q = out.queues.into_iter().next().ok_or("no queue")?;
        Ok(Conn {
            q,
            _blkio: b,
            addr: region.addr,
            outstanding: 0,
        })
    }

    fn buf(&mut self, slot: usize) -> &mut [u8] {
        let len = MAX_UNITS * UNIT;
        // SAFETY: the region is mapped for BUF_LEN bytes while `self` lives, and
        // slot `slot` (< DEPTH) is a disjoint part of it.
        unsafe { std::slice::from_raw_parts_mut((self.addr + slot * len) as *mut u8, len) }
    }

    fn ptr(&self, slot: usize) -> *mut u8 {
        (self.addr + slot * MAX_UNITS * UNIT) as *mut u8
    }

    fn submit_write(&mut self, slot: usize, off: u64, len: usize) {
        let p = self.ptr(slot);
        self.q.write(off, p, len, slot, blkio::ReqFlags::empty());
        self.outstanding += 1;
    }

    fn submit_read(&mut self, slot: usize, off: u64, len: usize, tag: usize) {
        let p = self.ptr(slot);
        self.q.read(off, p, len, tag, blkio::ReqFlags::empty());
        self.outstanding += 1;
    }

    fn submit_flush(&mut self, tag: usize) {
        self.q.flush(tag, blkio::ReqFlags::empty());
        self.outstanding += 1;
    }

    /// Submits what is queued and returns the completions that arrive within
    /// `timeout` (at least one if any is outstanding, unless the time runs out).
    fn poll(&mut self, timeout: Duration) -> Result<Vec<(usize, i32)>, String> {
        let mut comps: Vec<std::mem::MaybeUninit<blkio::Completion>> = (0..DEPTH + 1)
            .map(|_| std::mem::MaybeUninit::uninit())
            .collect();
        let min = usize::from(self.outstanding > 0);
        let mut t = timeout;
        match self.q.do_io(&mut comps, min, Some(&mut t), None) {
            Ok(k) => {
                self.outstanding -= k;
                Ok(comps[..k]
                    .iter()
                    .map(|c| {
                        // SAFETY: do_io initialised the first k completions.
                        let c = unsafe { c.as_ptr().read() };
                        (c.user_data, c.ret)
                    })
                    .collect())
            }
            Err(e) if e.errno() == blkio::Errno::TIME => Ok(Vec::new()),
            Err(e) => Err(format!("do_io: {e}")),
        }
    }

    fn wait_one(&mut self, timeout: Duration) -> Result<Option<(usize, i32)>, String> {
        Ok(self.poll(timeout)?.first().copied())
    }
}

// ---------------------------------------------------------------------------
// A client: load and journal.

/// Whether a read made while the lock manager was away pins what later reads may
/// return (`NEMESIS_STRICT_FENCED_READS=1`). Not by default: a write under way when
/// the fence went up can land on one leg only (it fails), the fenced node goes on
/// reading and may read that leg, and once it has rejoined, the resync of its old
/// slot's dirty chunks copies the first leg over the other: a later read returns
/// the older data again. Either value is allowed for a failed write; only the
/// return to the older one after a read saw the newer is not.
fn strict_fenced_reads() -> bool {
    std::env::var_os("NEMESIS_STRICT_FENCED_READS").is_some()
}

/// The journal of one unit.
#[derive(Clone, Debug)]
struct Unit {
    /// `base[0]`: the last acknowledged write (0: the initial zeros); then the
    /// writes with an unknown outcome since (in flight when their node died, or
    /// failed).
    base: Vec<u64>,
    /// The last write acknowledged before an acknowledged flush.
    durable: u64,
    /// What reads pinned the unit to (plus unknown writes since), valid while the
    /// leg-failure epoch is the one given.
    narrowed: Option<(Vec<u64>, u64)>,
    /// A request for the unit is in flight.
    busy: bool,
}

enum OpKind {
    Write(u64),
    Read,
    Flush(Vec<(usize, u64)>),
}

struct Op {
    kind: OpKind,
    first: usize,
    n: usize,
    fail_epoch: u64,
    outage: u64,
    at: Instant,
}

#[derive(Default, Debug, Clone)]
struct ClientStats {
    writes_acked: u64,
    writes_failed: u64,
    writes_unknown: u64,
    reads_checked: u64,
    units_read: u64,
    narrowed: u64,
    flushes: u64,
    flushes_failed: u64,
    reconnects: u64,
}

struct ClientReport {
    id: usize,
    units: Vec<Unit>,
    /// What each unit held at the final check.
    finals: Vec<u64>,
    stats: ClientStats,
}

struct Client {
    id: usize,
    sh: Arc<Shared>,
    rng: Rng,
    units: Vec<Unit>,
    ops: Vec<Option<Op>>,
    next_seq: u64,
    acked_since_flush: Vec<(usize, u64)>,
    flush_in_flight: bool,
    writes_since_flush: u64,
    stats: ClientStats,
    /// The node and assignment epoch of the connection in use.
    node: usize,
    conn_epoch: u64,
}

impl Client {
    fn base_off(&self) -> u64 {
        self.id as u64 * REGION_STRIDE
    }

    fn array_unit(&self, u: usize) -> u64 {
        self.base_off() / UNIT as u64 + u as u64
    }

    fn fail(&self, what: String) {
        self.sh.fail(format!("client {}: {what}", self.id));
    }

    /// Records that write `seq` to units `[first, first+n)` may or may not have
    /// landed.
    fn unknown(&mut self, first: usize, n: usize, seq: u64) {
        for u in &mut self.units[first..first + n] {
            u.base.push(seq);
            if let Some((set, _)) = &mut u.narrowed {
                set.push(seq);
            }
            u.busy = false;
        }
    }

    /// Checks what a read of local unit `u` returned; `sub` is the leg-failure
    /// epoch when the read was submitted, `None` for a read that does not pin the
    /// unit down for later reads (see `STRICT_FENCED_READS`). Returns the write it
    /// holds.
    fn check_unit(
        &mut self,
        u: usize,
        data: &[u8],
        sub: Option<u64>,
        what: &str,
    ) -> Result<u64, String> {
        let now = self.sh.fail_epoch.load(Ordering::SeqCst);
        let au = self.array_unit(u);
        let seq = decode_unit(data, self.id as u64, au).map_err(|e| {
            format!(
                "{what}: unit {au} (array byte {}) holds {e}; journal {:?}",
                au * UNIT as u64,
                self.units[u]
            )
        })?;
        let unit = &mut self.units[u];
        let (allowed, narrowed) = match &unit.narrowed {
            Some((set, e)) if *e == now => (set.clone(), true),
            _ => (unit.base.clone(), false),
        };
        if !allowed.contains(&seq) {
            let lost = if seq < unit.base[0] || !unit.base.contains(&seq) {
                if unit.durable == unit.base[0] && unit.durable != 0 {
                    "a flushed write was lost"
                } else if unit.base[0] != 0 {
                    "an acknowledged (not yet flushed) write was lost"
                } else {
                    "data from nowhere"
                }
            } else {
                "a read saw an older value than an earlier read (legs differ)"
            };
            return Err(format!(
                "{what}: unit {au} (array byte {}) holds write {seq}, expected one of {allowed:?} ({}): {lost}; journal {unit:?}",
                au * UNIT as u64,
                if narrowed { "as an earlier read saw" } else { "last acknowledged, then unknown outcomes" },
            ));
        }
        if let Some(sub) = sub {
            if allowed.len() > 1 {
                self.stats.narrowed += 1;
            }
            unit.narrowed = Some((vec![seq], sub));
        }
        Ok(seq)
    }

    fn complete(&mut self, slot: usize, ret: i32, conn: &mut Conn) -> Result<(), String> {
        let op = self.ops[slot]
            .take()
            .ok_or_else(|| format!("completion for idle slot {slot}"))?;
        // A write may fail while the lock manager is away (the node is fenced) or
        // on a connection the node has already left.
        let outage_now = self.sh.outage.load(Ordering::SeqCst);
        let excused = outage_now % 2 == 1
            || outage_now != op.outage
            || self.sh.assign(self.id).epoch != self.conn_epoch;
        match op.kind {
            OpKind::Write(seq) => {
                if ret == 0 {
                    self.stats.writes_acked += 1;
                    self.writes_since_flush += 1;
                    for u in op.first..op.first + op.n {
                        let unit = &mut self.units[u];
                        unit.base = vec![seq];
                        unit.narrowed = None;
                        unit.busy = false;
                        self.acked_since_flush.push((u, seq));
                    }
                } else {
                    if !excused {
                        return Err(format!(
                            "write {seq} of units {}..{} failed ({ret}) with the lock manager up",
                            op.first,
                            op.first + op.n
                        ));
                    }
                    self.stats.writes_failed += 1;
                    self.unknown(op.first, op.n, seq);
                }
            }
            OpKind::Read => {
                if ret != 0 {
                    return Err(format!(
                        "read of units {}..{} failed ({ret}) on node {}",
                        op.first,
                        op.first + op.n,
                        self.node
                    ));
                }
                let data = conn.buf(slot)[..op.n * UNIT].to_vec();
                // A read while the node may be fenced does not pin a unit down
                // (see STRICT_FENCED_READS).
                let fenced = op.outage % 2 == 1 || outage_now != op.outage;
                let pin = (!fenced || strict_fenced_reads()).then_some(op.fail_epoch);
                for (i, d) in data.chunks_exact(UNIT).enumerate() {
                    let what = format!("read on node {}", self.node);
                    self.check_unit(op.first + i, d, pin, &what)?;
                    self.units[op.first + i].busy = false;
                }
                self.stats.reads_checked += 1;
                self.stats.units_read += op.n as u64;
            }
            OpKind::Flush(acked) => {
                self.flush_in_flight = false;
                if ret == 0 {
                    self.stats.flushes += 1;
                    for (u, seq) in acked {
                        let d = &mut self.units[u].durable;
                        *d = (*d).max(seq);
                    }
                } else {
                    if !excused {
                        return Err(format!("flush failed ({ret}) with the lock manager up"));
                    }
                    self.stats.flushes_failed += 1;
                }
            }
        }
        Ok(())
    }

    /// Gives up every request in flight (the process that had them is gone).
    fn abandon(&mut self) {
        for slot in 0..DEPTH {
            if let Some(op) = self.ops[slot].take() {
                match op.kind {
                    OpKind::Write(seq) => {
                        self.stats.writes_unknown += 1;
                        self.unknown(op.first, op.n, seq);
                    }
                    OpKind::Read => {
                        for u in &mut self.units[op.first..op.first + op.n] {
                            u.busy = false;
                        }
                    }
                    OpKind::Flush(_) => self.flush_in_flight = false,
                }
            }
        }
    }

    /// Picks and submits one request into free slot `slot`.
    fn submit(&mut self, slot: usize, conn: &mut Conn) {
        let fail_epoch = self.sh.fail_epoch.load(Ordering::SeqCst);
        let outage = self.sh.outage.load(Ordering::SeqCst);
        if !self.flush_in_flight && self.writes_since_flush >= 24 {
            let acked = std::mem::take(&mut self.acked_since_flush);
            self.writes_since_flush = 0;
            self.flush_in_flight = true;
            conn.submit_flush(slot);
            self.ops[slot] = Some(Op {
                kind: OpKind::Flush(acked),
                first: 0,
                n: 0,
                fail_epoch,
                outage,
                at: Instant::now(),
            });
            return;
        }
        for _ in 0..8 {
            let n = if self.rng.pct(50) {
                1 + self.rng.below(4) as usize
            } else {
                1 + self.rng.below(MAX_UNITS as u64) as usize
            };
            let span = if self.rng.pct(50) {
                HOT_UNITS
            } else {
                REGION_UNITS
            };
            let first = self.rng.below((span - n + 1) as u64) as usize;
            if self.units[first..first + n].iter().any(|u| u.busy) {
                continue;
            }
            for u in &mut self.units[first..first + n] {
                u.busy = true;
            }
            let off = self.base_off() + (first * UNIT) as u64;
            let kind = if self.rng.pct(70) {
                let seq = self.next_seq;
                self.next_seq += 1;
                for i in 0..n {
                    let au = self.array_unit(first + i);
                    let id = self.id as u64;
                    fill_unit(&mut conn.buf(slot)[i * UNIT..(i + 1) * UNIT], id, seq, au);
                }
                conn.submit_write(slot, off, n * UNIT);
                OpKind::Write(seq)
            } else {
                conn.submit_read(slot, off, n * UNIT, slot);
                OpKind::Read
            };
            self.ops[slot] = Some(Op {
                kind,
                first,
                n,
                fail_epoch,
                outage,
                at: Instant::now(),
            });
            return;
        }
    }
}

fn client_main(id: usize, sh: Arc<Shared>, seed: u64) -> Option<ClientReport> {
    let mut c = Client {
        id,
        sh: sh.clone(),
        rng: Rng::new(seed ^ (0xc1 + id as u64) << 40),
        units: vec![
            Unit {
                base: vec![0],
                durable: 0,
                narrowed: None,
                busy: false,
            };
            REGION_UNITS
        ],
        ops: (0..DEPTH).map(|_| None).collect(),
        next_seq: 1,
        acked_since_flush: Vec::new(),
        flush_in_flight: false,
        writes_since_flush: 0,
        stats: ClientStats::default(),
        node: usize::MAX,
        conn_epoch: 0,
    };
    let mut conn: Option<Conn> = None;
    let mut waiting_since: Option<Instant> = None;
    loop {
        if sh.failed() {
            return None;
        }
        let a = sh.assign(id);
        if conn.is_some() && a.epoch != c.conn_epoch {
            c.abandon();
            conn = None;
            sh.event(format!(
                "client {id}: node {} is gone; requests in flight given up",
                c.node
            ));
        }
        if conn.is_none() {
            if !a.ready {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            match Conn::open(&sh.sockets[a.node]) {
                Ok(k) => {
                    conn = Some(k);
                    c.conn_epoch = a.epoch;
                    c.node = a.node;
                    c.stats.reconnects += 1;
                    waiting_since = None;
                    sh.event(format!("client {id}: connected to node {}", a.node));
                }
                Err(e) => {
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(60) && sh.assign(id).epoch == a.epoch {
                        c.fail(format!("cannot connect to node {} for 60 s: {e}", a.node));
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            continue;
        }
        let k = conn.as_mut().unwrap();
        let quiesce = sh.quiesce.load(Ordering::SeqCst);
        if quiesce && c.ops.iter().all(Option::is_none) {
            break;
        }
        if !quiesce {
            for slot in 0..DEPTH {
                if c.ops[slot].is_none() {
                    c.submit(slot, k);
                }
            }
        }
        match k.poll(Duration::from_millis(100)) {
            Ok(done) => {
                for (slot, ret) in done {
                    if let Err(e) = c.complete(slot, ret, k) {
                        c.fail(e);
                        return None;
                    }
                }
            }
            Err(e) => {
                // The node is gone; the driver will say so.
                sh.event(format!("client {id}: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let oldest = c.ops.iter().flatten().map(|o| o.at).min();
        if let Some(t) = oldest {
            if t.elapsed() > HANG && sh.assign(id).epoch == c.conn_epoch {
                c.fail(format!(
                    "a request on node {} is in flight for {:?} (hang)",
                    c.node,
                    t.elapsed()
                ));
                return None;
            }
        }
    }
    // Everything is healed: flush, then read the whole region back.
    let k = conn.as_mut().unwrap();
    k.submit_flush(0);
    match k.wait_one(Duration::from_secs(60)) {
        // (The journal's `durable` keeps what was flushed under faults.)
        Ok(Some((_, 0))) => {}
        other => {
            c.fail(format!("final flush on node {}: {other:?}", c.node));
            return None;
        }
    }
    let epoch = sh.fail_epoch.load(Ordering::SeqCst);
    let mut finals = vec![0; REGION_UNITS];
    for first in (0..REGION_UNITS).step_by(MAX_UNITS) {
        let off = c.base_off() + (first * UNIT) as u64;
        k.submit_read(0, off, MAX_UNITS * UNIT, 0);
        match k.wait_one(Duration::from_secs(60)) {
            Ok(Some((_, 0))) => {}
            other => {
                c.fail(format!("final read at {off}: {other:?}"));
                return None;
            }
        }
        let data = k.buf(0).to_vec();
        for i in 0..MAX_UNITS {
            let what = format!("final read on node {}", c.node);
            match c.check_unit(
                first + i,
                &data[i * UNIT..(i + 1) * UNIT],
                Some(epoch),
                &what,
            ) {
                Ok(seq) => finals[first + i] = seq,
                Err(e) => {
                    c.fail(e);
                    return None;
                }
            }
        }
    }
    Some(ClientReport {
        id,
        units: c.units,
        finals,
        stats: c.stats,
    })
}

// ---------------------------------------------------------------------------
// Processes: nodes and the lock daemon.

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One `serve` node. Its log is `nI.log`; the logs of its earlier processes are
/// kept as `nI.log.K`.
struct Node {
    idx: usize,
    socket: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    incarnation: u32,
    /// "serving array" lines of this process's log the driver has acted on: one
    /// more each time it executes itself anew to rejoin the cluster.
    serving: usize,
    /// How far the log was read, and the "serving array" lines found in it.
    log_read: u64,
    log_serving: usize,
    /// SIGSTOPped; a helper thread sends SIGCONT.
    stopped: Arc<AtomicBool>,
    /// The leg whose writes this node can stall, and the file that releases them.
    stall: Option<(usize, PathBuf)>,
    /// Killed; to start again then.
    restart_at: Option<Instant>,
}

impl Node {
    fn alive(&self) -> bool {
        self.child.is_some()
    }

    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// "serving array" lines in this process's log (read on from where the last
    /// call stopped: the log grows long).
    fn serving_lines(&mut self) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = File::open(&self.log).unwrap();
        f.seek(SeekFrom::Start(self.log_read)).unwrap();
        let mut text = Vec::new();
        f.read_to_end(&mut text).unwrap();
        // Whole lines only: the rest is read next time.
        let end = text.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        let text = String::from_utf8_lossy(&text[..end]);
        self.log_serving += text.matches("vhost-user-md: serving array").count();
        self.log_read += end as u64;
        self.log_serving
    }

    fn start(&mut self) -> Result<(), String> {
        if self.log.exists() {
            let old = PathBuf::from(format!("{}.{}", self.log.display(), self.incarnation));
            std::fs::rename(&self.log, old).unwrap();
        }
        self.incarnation += 1;
        self.log_read = 0;
        self.log_serving = 0;
        let out = File::create(&self.log).unwrap();
        let child = bin()
            .arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("NEMESIS_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.restart_at = None;
        let start = Instant::now();
        loop {
            if self.serving_lines() >= 1 {
                self.serving = 1;
                return Ok(());
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "node {} exited ({st}) while starting:\n{}",
                    self.idx,
                    tail(&self.log, 40)
                ));
            }
            if start.elapsed() > Duration::from_secs(90) {
                return Err(format!(
                    "node {} did not serve within 90 s:\n{}",
                    self.idx,
                    tail(&self.log, 40)
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; the exit status within 60 s.
    fn stop(&mut self) -> Result<std::process::ExitStatus, String> {
        let mut c = self.child.take().ok_or("not running")?;
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return Ok(st);
            }
            if t.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                let _ = c.wait();
                return Err(format!(
                    "node {} did not stop within 60 s of SIGTERM:\n{}",
                    self.idx,
                    tail(&self.log, 40)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `status --format json`, or None while it does not answer (or the process is
    /// stopped: it would not answer either).
    fn status(&self) -> Option<Value> {
        if !self.alive() || self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        let out = bin()
            .args(["status", "--format", "json"])
            .arg(&self.socket)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn manage(&self, op: &str, leg: &Path) -> (bool, String) {
        let out = bin()
            .arg("manage")
            .arg(&self.socket)
            .arg(op)
            .arg(leg)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text.trim().to_string())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on our child's pid (a stopped child must go on
            // to die).
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
        self.kill9();
    }
}

/// `lockd`, restarted on the same socket path.
struct Lockd {
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Lockd {
    fn start(&mut self) -> Result<(), String> {
        let _ = std::fs::remove_file(&self.socket);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = bin()
            .arg("lockd")
            .arg("--socket")
            .arg(&self.socket)
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                return Err(format!("lockd did not start:\n{}", tail(&self.log, 20)));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Lockd {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// The driver.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    LegFail,
    Stall,
    Stop,
    Lockd,
}

const FAULTS: [Fault; 5] = [
    Fault::Kill,
    Fault::LegFail,
    Fault::Stall,
    Fault::Stop,
    Fault::Lockd,
];

/// A leg failed by the driver, to be re-added.
struct FailedLeg {
    leg: usize,
    at: Instant,
    remove_first: bool,
    attempts: u32,
}

#[derive(Default, Debug)]
struct DriverStats {
    kills: u64,
    restarts: u64,
    migrations: u64,
    leg_fails: u64,
    leg_fails_refused: u64,
    removes: u64,
    re_adds: u64,
    re_adds_refused: u64,
    stalls: u64,
    sigstops: u64,
    lockd_restarts: u64,
    rejoins: u64,
}

struct Driver {
    sh: Arc<Shared>,
    rng: Rng,
    legs: Vec<PathBuf>,
    nodes: Vec<Node>,
    lockd: Lockd,
    helpers: Vec<JoinHandle<()>>,
    failed_leg: Option<FailedLeg>,
    last_lockd: Option<Instant>,
    stats: DriverStats,
}

impl Driver {
    fn event(&self, what: String) {
        self.sh.event(what);
    }

    fn clients_on(&self, node: usize) -> Vec<usize> {
        (0..self.sh.assign.len())
            .filter(|&c| self.sh.assign(c).node == node)
            .collect()
    }

    /// A live, running node no client uses.
    fn free_node(&mut self) -> Option<usize> {
        let free: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i].alive()
                    && !self.nodes[i].stopped.load(Ordering::SeqCst)
                    && self.clients_on(i).is_empty()
            })
            .collect();
        (!free.is_empty()).then(|| free[self.rng.below(free.len() as u64) as usize])
    }

    /// A live node that answers (not stopped).
    fn running_node(&mut self) -> Option<usize> {
        let ok: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive() && !self.nodes[i].stopped.load(Ordering::SeqCst))
            .collect();
        (!ok.is_empty()).then(|| ok[self.rng.below(ok.len() as u64) as usize])
    }

    /// The process of node `i` was replaced (killed, or executed anew): its
    /// clients give up what they had in flight, and connect again when `ready`.
    fn node_gone(&self, i: usize, ready: bool) {
        for c in self.clients_on(i) {
            let mut a = self.sh.assign[c].lock().unwrap();
            a.epoch += 1;
            a.ready = ready;
        }
    }

    /// Node exits (a failure) and nodes that executed themselves anew to rejoin.
    fn check(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            let Some(c) = n.child.as_mut() else { continue };
            if let Some(st) = c.try_wait().unwrap() {
                n.child = None;
                return Err(format!(
                    "node {i} exited by itself ({st}):\n{}",
                    tail(&n.log, 60)
                ));
            }
            let lines = n.serving_lines();
            if lines > n.serving {
                n.serving = lines;
                self.stats.rejoins += 1;
                self.event(format!("node {i} executed itself anew and serves again"));
                if self.sh.outage.load(Ordering::SeqCst) % 2 == 0 {
                    return Err(format!(
                        "node {i} restarted to rejoin while lockd was up:\n{}",
                        tail(&self.nodes[i].log, 60)
                    ));
                }
                self.node_gone(i, true);
            }
        }
        Ok(())
    }

    /// Restarts killed nodes and re-adds the failed leg when their time comes.
    fn scheduled(&mut self) -> Result<(), String> {
        let now = Instant::now();
        for i in 0..self.nodes.len() {
            if self.nodes[i].restart_at.is_some_and(|t| t <= now) {
                self.restart(i)?;
            }
        }
        let due = self.failed_leg.as_ref().is_some_and(|f| f.at <= now);
        if due {
            self.re_add()?;
        }
        Ok(())
    }

    fn restart(&mut self, i: usize) -> Result<(), String> {
        self.nodes[i].start()?;
        self.stats.restarts += 1;
        self.event(format!(
            "node {i} restarted (process {})",
            self.nodes[i].incarnation
        ));
        for c in self.clients_on(i) {
            let mut a = self.sh.assign[c].lock().unwrap();
            if !a.ready {
                a.ready = true;
            }
        }
        Ok(())
    }

    fn re_add(&mut self) -> Result<(), String> {
        let Some(i) = self.running_node() else {
            return Ok(());
        };
        let f = self.failed_leg.as_mut().unwrap();
        let leg = self.legs[f.leg].clone();
        f.attempts += 1;
        if f.attempts > 30 {
            return Err(format!("leg {} cannot be re-added", leg.display()));
        }
        if f.remove_first {
            let (ok, out) = self.nodes[i].manage("remove", &leg);
            if ok {
                self.stats.removes += 1;
                self.failed_leg.as_mut().unwrap().remove_first = false;
            }
            self.event(format!("node {i}: remove {}: {ok}: {out}", leg.display()));
        }
        let (ok, out) = self.nodes[i].manage("re-add", &leg);
        self.event(format!("node {i}: re-add {}: {ok}: {out}", leg.display()));
        if ok {
            self.stats.re_adds += 1;
            self.failed_leg = None;
        } else {
            self.stats.re_adds_refused += 1;
            self.failed_leg.as_mut().unwrap().at = Instant::now() + Duration::from_secs(1);
        }
        Ok(())
    }

    fn act(&mut self, fault: Fault) -> Result<(), String> {
        match fault {
            Fault::Kill => {
                let alive: Vec<usize> = (0..self.nodes.len())
                    .filter(|&i| self.nodes[i].alive())
                    .collect();
                if alive.is_empty() {
                    return Ok(());
                }
                let victims = if self.rng.pct(15) {
                    alive
                } else {
                    vec![alive[self.rng.below(alive.len() as u64) as usize]]
                };
                for &i in &victims {
                    self.nodes[i].kill9();
                    self.stats.kills += 1;
                    let delay = self.rng.millis(0, 3000);
                    self.nodes[i].restart_at = Some(Instant::now() + delay);
                    self.event(format!("node {i} killed (restart in {delay:?})"));
                    self.node_gone(i, false);
                }
                for &i in &victims {
                    for c in self.clients_on(i) {
                        if !self.rng.pct(50) {
                            continue;
                        }
                        if let Some(j) = self.free_node() {
                            self.sh.assign[c].lock().unwrap().node = j;
                            self.sh.assign[c].lock().unwrap().ready = true;
                            self.stats.migrations += 1;
                            self.event(format!("client {c} moves from node {i} to node {j}"));
                        }
                    }
                }
            }
            Fault::LegFail => {
                let leg = self.rng.below(2) as usize;
                if self.failed_leg.is_some() {
                    return Ok(());
                }
                let Some(i) = self.running_node() else {
                    return Ok(());
                };
                self.sh.fail_epoch.fetch_add(1, Ordering::SeqCst);
                let path = self.legs[leg].clone();
                let (ok, out) = self.nodes[i].manage("fail", &path);
                self.event(format!("node {i}: fail {}: {ok}: {out}", path.display()));
                if ok {
                    self.stats.leg_fails += 1;
                    let at = Instant::now() + self.rng.millis(500, 6000);
                    let remove_first = self.rng.pct(30);
                    self.failed_leg = Some(FailedLeg {
                        leg,
                        at,
                        remove_first,
                        attempts: 0,
                    });
                } else {
                    self.stats.leg_fails_refused += 1;
                }
            }
            Fault::Stall => {
                let can: Vec<usize> = (0..self.nodes.len())
                    .filter(|&i| {
                        self.nodes[i].alive()
                            && self.nodes[i]
                                .stall
                                .as_ref()
                                .is_some_and(|(_, f)| f.exists())
                    })
                    .collect();
                let d = self.rng.millis(1000, 5000);
                if can.is_empty() {
                    return Ok(());
                }
                let i = can[self.rng.below(can.len() as u64) as usize];
                let (leg, file) = self.nodes[i].stall.clone().unwrap();
                std::fs::remove_file(&file).unwrap();
                self.stats.stalls += 1;
                self.event(format!("node {i}: writes to leg {leg} stall for {d:?}"));
                let sh = self.sh.clone();
                self.helpers.push(std::thread::spawn(move || {
                    std::thread::sleep(d);
                    File::create(&file).unwrap();
                    sh.event(format!("node {i}: leg {leg} answers again"));
                }));
            }
            Fault::Stop => {
                let d = self.rng.millis(500, 4000);
                let Some(i) = self.running_node() else {
                    return Ok(());
                };
                let pid = self.nodes[i].pid().unwrap();
                let stopped = self.nodes[i].stopped.clone();
                stopped.store(true, Ordering::SeqCst);
                // SAFETY: plain kill(2) on our child's pid.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                self.stats.sigstops += 1;
                self.event(format!("node {i} stopped (SIGSTOP) for {d:?}"));
                let sh = self.sh.clone();
                self.helpers.push(std::thread::spawn(move || {
                    std::thread::sleep(d);
                    // SAFETY: plain kill(2); the node is not killed while stopped,
                    // so the pid is still our child's.
                    unsafe { libc::kill(pid, libc::SIGCONT) };
                    stopped.store(false, Ordering::SeqCst);
                    sh.event(format!("node {i} continues (SIGCONT)"));
                }));
            }
            Fault::Lockd => {
                let d = self.rng.millis(0, 2000);
                if self
                    .last_lockd
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(15))
                {
                    return Ok(());
                }
                self.lockd_outage(d)?;
            }
        }
        Ok(())
    }

    /// Kills lockd, starts it again after `d`, and waits until every live node
    /// has executed itself anew and serves again.
    fn lockd_outage(&mut self, d: Duration) -> Result<(), String> {
        self.sh.outage.fetch_add(1, Ordering::SeqCst);
        let before: Vec<Option<usize>> = self
            .nodes
            .iter()
            .map(|n| n.alive().then_some(n.serving))
            .collect();
        self.lockd.kill();
        self.event(format!("lockd killed (back in {d:?})"));
        std::thread::sleep(d);
        self.lockd.start()?;
        self.stats.lockd_restarts += 1;
        self.event("lockd started again".into());
        let start = Instant::now();
        loop {
            self.check()?;
            if let Some(e) = self.sh.failure() {
                return Err(e);
            }
            let waiting: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| before[i].is_some_and(|b| self.nodes[i].serving <= b))
                .collect();
            if waiting.is_empty() {
                break;
            }
            if start.elapsed() > Duration::from_secs(120) {
                let logs: Vec<String> = waiting
                    .iter()
                    .map(|&i| format!("node {i}:\n{}", tail(&self.nodes[i].log, 30)))
                    .collect();
                return Err(format!(
                    "nodes {waiting:?} did not rejoin within 120 s of lockd's restart:\n{}",
                    logs.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.sh.outage.fetch_add(1, Ordering::SeqCst);
        self.last_lockd = Some(Instant::now());
        self.event(format!(
            "every node rejoined {:?} after lockd came back",
            start.elapsed()
        ));
        Ok(())
    }

    /// Ends every fault: releases stalls and stopped nodes, starts killed nodes,
    /// re-adds a failed leg, and waits until every node has both legs in sync.
    fn heal(&mut self) -> Result<(), String> {
        self.event("healing".into());
        for h in self.helpers.drain(..) {
            h.join().unwrap();
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive() {
                self.restart(i)?;
            }
        }
        self.check()?;
        while self.failed_leg.is_some() {
            self.re_add()?;
            if self.failed_leg.is_some() {
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        let start = Instant::now();
        loop {
            self.check()?;
            if let Some(e) = self.sh.failure() {
                return Err(e);
            }
            let mut pending = Vec::new();
            for (i, n) in self.nodes.iter().enumerate() {
                let Some(s) = n.status() else {
                    pending.push(format!("node {i}: no status"));
                    continue;
                };
                let legs_ok = self
                    .legs
                    .iter()
                    .all(|l| common::leg_state(&s, l) == "in-sync");
                let c = &s["cluster"];
                let ok = legs_ok
                    && s["degraded"] == false
                    && s["resync"]["active"] == false
                    && s["resync"]["remaining_chunks"] == 0
                    && s["fenced"].is_null()
                    && c["suspended"].as_array().is_some_and(|a| a.is_empty())
                    && c["reads_from_one_leg"] != true;
                if !ok {
                    pending.push(format!("node {i}: {s}"));
                }
            }
            if pending.is_empty() {
                break;
            }
            if start.elapsed() > Duration::from_secs(180) {
                return Err(format!(
                    "the array did not heal within 180 s:\n{}",
                    pending.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.event(format!(
            "healed: both legs in sync on every node ({:?})",
            start.elapsed()
        ));
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The test.

/// Keeps the run's directory (logs, legs) when the test panics, and says how to
/// replay it.
struct OnPanic {
    dir: Option<tempfile::TempDir>,
    seed: u64,
    secs: u64,
}

impl Drop for OnPanic {
    fn drop(&mut self) {
        if std::env::var_os("NEMESIS_KEEP").is_some() && !std::thread::panicking() {
            let dir = self.dir.take().unwrap().keep();
            eprintln!("nemesis: logs and legs kept in {}", dir.display());
        }
        if std::thread::panicking() {
            let dir = self.dir.take().unwrap().keep();
            eprintln!(
                "nemesis failed: seed {}; logs and legs kept in {}; replay: NEMESIS_SEED={} NEMESIS_SECS={} cargo test --test nemesis",
                self.seed,
                dir.display(),
                self.seed,
                self.secs
            );
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// Panics with the failure, the driver's last events and the nodes' last lines.
fn failed(sh: &Shared, nodes: &[Node], what: &str) -> ! {
    sh.fail(what.to_string());
    let first = sh.failure().unwrap();
    let recent: Vec<String> = {
        let events = sh.events.lock().unwrap();
        events[events.len().saturating_sub(80)..]
            .iter()
            .map(|(t, e)| format!("[{:8.3}] {e}", t.as_secs_f64()))
            .collect()
    };
    let logs: Vec<String> = nodes
        .iter()
        .map(|n| {
            format!(
                "--- node {} ({}):\n{}",
                n.idx,
                n.log.display(),
                tail(&n.log, 25)
            )
        })
        .collect();
    panic!(
        "{first}\n--- last events:\n{}\n{}",
        recent.join("\n"),
        logs.join("\n")
    );
}

#[test]
fn nodes_legs_and_the_lock_manager_fail_under_load_and_no_acknowledged_write_is_lost() {
    let seed = env_u64("NEMESIS_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
    });
    let secs = env_u64("NEMESIS_SECS").unwrap_or(60);
    eprintln!("nemesis: seed {seed}, {secs} s of faults (NEMESIS_SEED={seed} to replay)");
    let dir = tempfile::Builder::new()
        .prefix("nemesis-")
        .tempdir()
        .unwrap();
    let d = dir.path().to_path_buf();
    let _keep = OnPanic {
        dir: Some(dir),
        seed,
        secs,
    };
    let mut rng = Rng::new(seed);
    let n_nodes = 2 + rng.below(2) as usize;
    let legs = common::create_array(&d, &["leg0.img", "leg1.img"], "64M", Some("nemesis"));
    let mut lockd = Lockd {
        socket: d.join("lockd.sock"),
        log: d.join("lockd.log"),
        child: None,
    };
    lockd.start().unwrap();
    let lm = format!("lockd:{}", lockd.socket.display());
    let mut nodes = Vec::new();
    for i in 0..n_nodes {
        let mut args: Vec<String> = ["--heartbeat-interval", "100ms", "--lock-manager", &lm]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push("--shared-writes".into());
        // Node 0 can always stall a leg, the others now and then; a node that
        // cannot keeps its writes on io_uring (a stalling leg writes off it).
        let stall = (i == 0 || rng.pct(50)).then(|| {
            let leg = rng.below(2) as usize;
            let file = d.join(format!("release-n{i}"));
            File::create(&file).unwrap();
            args.push("--inject-fault".into());
            args.push(format!(
                "{leg}:stall-writes-from=4096,stall-until-file={}",
                file.display()
            ));
            (leg, file)
        });
        args.extend(legs.iter().map(|l| l.to_str().unwrap().to_string()));
        let mut n = Node {
            idx: i,
            socket: d.join(format!("n{i}.sock")),
            log: d.join(format!("n{i}.log")),
            args,
            child: None,
            incarnation: 0,
            serving: 0,
            log_read: 0,
            log_serving: 0,
            stopped: Arc::new(AtomicBool::new(false)),
            stall,
            restart_at: None,
        };
        n.start().unwrap();
        nodes.push(n);
    }
    let sh = Arc::new(Shared {
        t0: Instant::now(),
        sockets: nodes.iter().map(|n| n.socket.clone()).collect(),
        assign: (0..CLIENTS)
            .map(|c| {
                Mutex::new(Assign {
                    node: c % n_nodes,
                    epoch: 0,
                    ready: true,
                })
            })
            .collect(),
        fail_epoch: AtomicU64::new(0),
        outage: AtomicU64::new(0),
        quiesce: AtomicBool::new(false),
        failure: Mutex::new(None),
        events: Mutex::new(Vec::new()),
    });
    sh.event(format!(
        "{n_nodes} nodes (stalling legs: {:?}), {CLIENTS} clients",
        nodes
            .iter()
            .map(|n| n.stall.as_ref().map(|s| s.0))
            .collect::<Vec<_>>()
    ));
    let clients: Vec<JoinHandle<Option<ClientReport>>> = (0..CLIENTS)
        .map(|c| {
            let (sh, s) = (sh.clone(), rng.next());
            std::thread::spawn(move || client_main(c, sh, s))
        })
        .collect();

    let mut drv = Driver {
        sh: sh.clone(),
        rng: Rng::new(rng.next()),
        legs: legs.clone(),
        nodes,
        lockd,
        helpers: Vec::new(),
        failed_leg: None,
        last_lockd: None,
        stats: DriverStats::default(),
    };
    // Every kind of fault once, in a random order, then random ones.
    let mut forced: Vec<Fault> = FAULTS.to_vec();
    for i in (1..forced.len()).rev() {
        forced.swap(i, drv.rng.below(i as u64 + 1) as usize);
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let mut next = Instant::now() + drv.rng.millis(1000, 2000);
    while Instant::now() < end && !sh.failed() {
        if let Err(e) = drv.check().and_then(|()| drv.scheduled()) {
            failed(&sh, &drv.nodes, &e);
        }
        if Instant::now() >= next {
            let f = forced.pop().unwrap_or_else(|| {
                let w = [30, 20, 15, 15, 10];
                let mut x = drv.rng.below(w.iter().sum());
                let mut k = 0;
                while x >= w[k] {
                    x -= w[k];
                    k += 1;
                }
                FAULTS[k]
            });
            if let Err(e) = drv.act(f) {
                failed(&sh, &drv.nodes, &e);
            }
            next = Instant::now() + drv.rng.millis(300, 2500);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(e) = sh.failure() {
        failed(&sh, &drv.nodes, &e);
    }
    if let Err(e) = drv.heal() {
        failed(&sh, &drv.nodes, &e);
    }
    sh.quiesce.store(true, Ordering::SeqCst);
    let start = Instant::now();
    while !clients.iter().all(|c| c.is_finished()) {
        if sh.failed() {
            failed(&sh, &drv.nodes, "");
        }
        if start.elapsed() > Duration::from_secs(180) {
            failed(&sh, &drv.nodes, "the clients did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reports: Vec<ClientReport> = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .collect::<Option<Vec<_>>>()
        .unwrap_or_else(|| failed(&sh, &drv.nodes, "a client failed"));
    if let Err(e) = drv.check() {
        failed(&sh, &drv.nodes, &e);
    }

    // Every node reads every region as the clients last saw it.
    for i in 0..drv.nodes.len() {
        let mut k = Conn::open(&drv.nodes[i].socket)
            .unwrap_or_else(|e| failed(&sh, &drv.nodes, &format!("node {i}: {e}")));
        for r in &reports {
            for first in (0..REGION_UNITS).step_by(MAX_UNITS) {
                let off = r.id as u64 * REGION_STRIDE + (first * UNIT) as u64;
                k.submit_read(0, off, MAX_UNITS * UNIT, 0);
                let got = k.wait_one(Duration::from_secs(60));
                if !matches!(got, Ok(Some((_, 0)))) {
                    failed(
                        &sh,
                        &drv.nodes,
                        &format!("node {i}: read at {off}: {got:?}"),
                    );
                }
                let data = k.buf(0).to_vec();
                for (j, unit) in data.chunks_exact(UNIT).enumerate() {
                    let au = off / UNIT as u64 + j as u64;
                    let got = decode_unit(unit, r.id as u64, au);
                    if got != Ok(r.finals[first + j]) {
                        failed(
                            &sh,
                            &drv.nodes,
                            &format!(
                                "node {i} reads unit {au} as {got:?}, client {} read write {}",
                                r.id,
                                r.finals[first + j]
                            ),
                        );
                    }
                }
            }
        }
    }
    for i in 0..drv.nodes.len() {
        match drv.nodes[i].stop() {
            Ok(st) if st.success() => {}
            other => failed(&sh, &drv.nodes, &format!("node {i} stop: {other:?}")),
        }
    }
    drv.lockd.kill();

    // Both legs hold what was read, and the same bytes everywhere.
    let areas: Vec<Vec<u8>> = legs.iter().map(|l| data_area(l)).collect();
    let (mut written, mut flushed, mut acked, mut unknown) = (0u64, 0u64, 0u64, 0u64);
    for r in &reports {
        for u in 0..REGION_UNITS {
            let au = r.id as u64 * REGION_STRIDE / UNIT as u64 + u as u64;
            let at = au as usize * UNIT;
            for (l, area) in areas.iter().enumerate() {
                let got = decode_unit(&area[at..at + UNIT], r.id as u64, au);
                assert_eq!(
                    got,
                    Ok(r.finals[u]),
                    "leg {l} unit {au}: journal {:?}",
                    r.units[u]
                );
            }
            let (unit, fin) = (&r.units[u], r.finals[u]);
            if unit.base != [0] || fin != 0 {
                written += 1;
                if fin != unit.base[0] {
                    unknown += 1;
                } else if unit.durable == fin {
                    flushed += 1;
                } else {
                    acked += 1;
                }
            }
        }
    }
    if let Some(at) = areas[0].iter().zip(&areas[1]).position(|(a, b)| a != b) {
        panic!(
            "the legs' data areas differ from byte {at} (unit {}) on",
            at / UNIT
        );
    }
    let ex = bin()
        .args(["examine", "--json"])
        .args(&legs)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&ex.stdout).unwrap();
    assert_eq!(v["array"]["consistent"], true, "{v}");
    for leg in v["legs"].as_array().unwrap() {
        for slot in leg["bitmap"]["slots"].as_array().unwrap() {
            assert_eq!(slot["dirty"], 0, "bits left after a clean stop: {v}");
        }
    }

    let mut total = ClientStats::default();
    for r in &reports {
        let s = &r.stats;
        total.writes_acked += s.writes_acked;
        total.writes_failed += s.writes_failed;
        total.writes_unknown += s.writes_unknown;
        total.reads_checked += s.reads_checked;
        total.units_read += s.units_read;
        total.narrowed += s.narrowed;
        total.flushes += s.flushes;
        total.flushes_failed += s.flushes_failed;
        total.reconnects += s.reconnects;
    }
    eprintln!(
        "nemesis: seed {seed}: {} nodes, {:?} under load; faults {:?}; clients {total:?}; \
         {written} units written, all checked through every node and on both legs: \
         {flushed} hold a write acknowledged and flushed under faults, {acked} one acknowledged \
         but not flushed then, {unknown} one whose outcome was unknown",
        drv.nodes.len(),
        sh.t0.elapsed(),
        drv.stats
    );
    assert!(total.writes_acked > 100, "too little load: {total:?}");
    assert!(
        drv.stats.kills
            + drv.stats.leg_fails
            + drv.stats.stalls
            + drv.stats.sigstops
            + drv.stats.lockd_restarts
            > 0,
        "no fault was injected"
    );
}

//! Multi-host protection of an array served with the local lock manager.
//!
//! Locks on legs (see `storage::claim`) only reach the processes of one host. On
//! shared LUNs another host can start a second owner of the same legs, so a node
//! that serves an array alone also keeps a heartbeat on every leg (the block of
//! `md::heartbeat`), as ext4's MMP and ZFS's `multihost` do:
//!
//! - **Start.** Read every leg's heartbeat. One written during this boot of this host
//!   and pid namespace by a process that is gone needs no watch. One that says
//!   another node serves (or
//!   starts) is watched for [`heartbeat::takeover_wait_ms`] of *its writer's*
//!   interval: if it moves, the start is refused, naming that host and pid; if it
//!   does not, its writer is gone (it would have fenced itself by then, below) and
//!   the start goes on. Then write our own heartbeat, wait two of our intervals and
//!   read it back: a host that started at the same moment has overwritten it, and
//!   the later of the two wins.
//! - **Run.** Every interval, read each leg's block: still ours, write the next
//!   sequence number; another node's (someone started with `--force`, or a start
//!   raced ours) fences this node: it writes nothing more. A node that could not
//!   write its heartbeat on any leg for [`heartbeat::SELF_FENCE_INTERVALS`]
//!   intervals fences itself too: a starting host may be about to conclude that
//!   it is gone.
//! - **Stop.** After the array is marked clean, the block says "stopped": the next
//!   start needs no wait.
//!
//! The block is read and written through a descriptor of its own with direct I/O,
//! so another host's writes are seen, not a cached copy.

use crate::md::heartbeat::{self, Block, Heartbeat, State};
use crate::md::Uuid;
use crate::storage::{AlignedBuf, Fence};
use log::{info, warn};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The default interval between two heartbeat writes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// One leg's heartbeat block.
struct HbLeg {
    name: String,
    file: File,
    /// What we wrote last (the block must still hold it).
    ours: Option<Vec<u8>>,
}

impl HbLeg {
    fn open(path: &Path) -> std::io::Result<HbLeg> {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true);
        let file = {
            let mut d = o.clone();
            d.custom_flags(libc::O_DIRECT);
            match d.open(path) {
                Ok(f) => f,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => o.open(path)?,
                Err(e) => return Err(e),
            }
        };
        Ok(HbLeg {
            name: path.display().to_string(),
            file,
            ours: None,
        })
    }

    fn read(&self) -> std::io::Result<Vec<u8>> {
        let mut b = AlignedBuf::zeroed(heartbeat::LEN);
        self.file
            .read_exact_at(b.as_mut_slice(), heartbeat::OFFSET)?;
        Ok(b.as_slice().to_vec())
    }

    fn write(&mut self, block: Vec<u8>) -> std::io::Result<()> {
        let mut b = AlignedBuf::zeroed(heartbeat::LEN);
        b.as_mut_slice().copy_from_slice(&block);
        self.file.write_all_at(b.as_slice(), heartbeat::OFFSET)?;
        self.ours = Some(block);
        Ok(())
    }
}

/// The heartbeat of this node on the legs of the array it serves alone.
pub struct Multihost {
    legs: Vec<HbLeg>,
    me: Heartbeat,
    interval: Duration,
    fence: Arc<Fence>,
}

/// Whether a leg's first 4 KiB are free for the heartbeat: a v1.2 superblock
/// (4 KiB in) that says so, and no other data there.
fn usable(leg: &HbLeg) -> Result<Block, String> {
    let mut sb = AlignedBuf::zeroed(crate::md::superblock::SB_BLOCK_LEN.max(4096));
    leg.file
        .read_exact_at(sb.as_mut_slice(), 4096)
        .map_err(|e| format!("cannot read its superblock: {e}"))?;
    let sb = crate::md::Superblock::decode(&sb.as_slice()[..crate::md::superblock::SB_BLOCK_LEN])
        .map_err(|e| e.to_string())?;
    if sb.super_offset != heartbeat::FREE_BELOW_SUPER_OFFSET {
        return Err(format!(
            "its superblock sits at sector {}, not 8 (md 1.2)",
            sb.super_offset
        ));
    }
    let block = leg
        .read()
        .map_err(|e| format!("cannot read its first 4 KiB: {e}"))?;
    match heartbeat::decode(&block) {
        Block::Other => Err("its first 4 KiB hold other data".into()),
        b => Ok(b),
    }
}

/// This boot of this host (zero when the kernel does not tell).
fn boot_id() -> [u8; 16] {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| s.trim().parse::<Uuid>().ok())
        .map(|u| u.0)
        .unwrap_or([0; 16])
}

/// This process's pid namespace (0 when it cannot be told).
fn pid_ns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// Whether `h` was written during this boot of this host, in this pid namespace,
/// by a process that is gone: its writer is known dead, no need to watch it. (A
/// pid in use again by another process only makes the start wait, as for another
/// host; a writer in another pid namespace, e.g. another container, is watched.)
fn written_here_by_a_dead_process(h: &Heartbeat, me: &Heartbeat) -> bool {
    if me.boot == [0; 16]
        || h.boot != me.boot
        || me.pid_ns == 0
        || h.pid_ns != me.pid_ns
        || h.pid == 0
        || h.pid == me.pid
    {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks that the pid exists.
    let rc = unsafe { libc::kill(h.pid as libc::pid_t, 0) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn describe(h: &Heartbeat) -> String {
    format!(
        "host {} (pid {}, array {})",
        if h.host.is_empty() { "?" } else { &h.host },
        h.pid,
        h.array
    )
}

impl Multihost {
    /// Opens the heartbeat blocks of `paths` (legs without room for one are left
    /// out with a warning) for a node of array `array` on host `host`.
    pub fn open(
        paths: &[PathBuf],
        array: Uuid,
        host: &str,
        interval: Duration,
        fence: Arc<Fence>,
    ) -> Result<Multihost, String> {
        let mut legs = Vec::new();
        for p in paths {
            let leg =
                HbLeg::open(p).map_err(|e| format!("leg {}: cannot open: {e}", p.display()))?;
            match usable(&leg) {
                Ok(_) => legs.push(leg),
                Err(why) => warn!(
                    "leg {}: no multi-host heartbeat on this leg: {why}",
                    p.display()
                ),
            }
        }
        let mut nonce = [0u8; 8];
        let _ = getrandom::fill(&mut nonce);
        Ok(Multihost {
            legs,
            me: Heartbeat {
                seq: 0,
                nonce: u64::from_le_bytes(nonce) | 1,
                time_ms: 0,
                interval_ms: interval.as_millis().clamp(1, u128::from(u32::MAX)) as u32,
                state: State::Starting,
                pid: std::process::id(),
                array,
                host: host.to_string(),
                boot: boot_id(),
                pid_ns: pid_ns(),
            },
            interval,
            fence,
        })
    }

    /// Whether any leg carries the heartbeat.
    pub fn is_empty(&self) -> bool {
        self.legs.is_empty()
    }

    fn next(&mut self, state: State) -> Vec<u8> {
        self.me.seq += 1;
        self.me.time_ms = now_ms();
        self.me.state = state;
        self.me.encode()
    }

    /// The start: refuses while another host's heartbeat moves; `force` skips the
    /// watch (and the check for a host starting at the same moment).
    pub fn claim(&mut self, force: bool) -> Result<(), String> {
        let first: Vec<Option<Vec<u8>>> = self.legs.iter().map(|l| l.read().ok()).collect();
        let mut wait_ms = 0u64;
        for (leg, b) in self.legs.iter().zip(&first) {
            let Some(b) = b else { continue };
            match heartbeat::decode(b) {
                Block::Heartbeat(h) if written_here_by_a_dead_process(&h, &self.me) => {
                    info!(
                        "leg {}: the heartbeat is of pid {} of this host, which is gone",
                        leg.name, h.pid
                    );
                }
                Block::Heartbeat(h) if h.state != State::Stopped => {
                    info!(
                        "leg {}: heartbeat of {} says {:?} (seq {}); watching it",
                        leg.name,
                        describe(&h),
                        h.state,
                        h.seq
                    );
                    wait_ms = wait_ms.max(heartbeat::takeover_wait_ms(h.interval_ms));
                }
                Block::Torn => {
                    wait_ms = wait_ms.max(heartbeat::takeover_wait_ms(self.me.interval_ms))
                }
                _ => {}
            }
        }
        if wait_ms > 0 && force {
            warn!("--force: not waiting to see whether another host serves these legs");
        } else if wait_ms > 0 {
            self.watch(&first, Duration::from_millis(wait_ms))?;
        }
        let block = self.next(State::Starting);
        let mut written = 0;
        for leg in &mut self.legs {
            match leg.write(block.clone()) {
                Ok(()) => written += 1,
                Err(e) => warn!("leg {}: cannot write the heartbeat: {e}", leg.name),
            }
        }
        if written == 0 && !self.legs.is_empty() {
            return Err("cannot write the multi-host heartbeat on any leg".into());
        }
        if force {
            return Ok(());
        }
        std::thread::sleep(self.interval * 2);
        for leg in &self.legs {
            let (Ok(now), Some(ours)) = (leg.read(), &leg.ours) else {
                continue;
            };
            if &now != ours {
                let who = match heartbeat::decode(&now) {
                    Block::Heartbeat(h) => describe(&h),
                    _ => "another host".into(),
                };
                return Err(format!(
                    "leg {}: {who} started on these legs at the same moment; only one host may serve them",
                    leg.name
                ));
            }
        }
        Ok(())
    }

    fn watch(&self, first: &[Option<Vec<u8>>], wait: Duration) -> Result<(), String> {
        info!(
            "another node's heartbeat is on the legs: watching it for {:.1} s",
            wait.as_secs_f64()
        );
        let start = Instant::now();
        let step = (self.interval / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
        while start.elapsed() < wait {
            std::thread::sleep(step);
            for (leg, before) in self.legs.iter().zip(first) {
                let (Ok(now), Some(before)) = (leg.read(), before) else {
                    continue;
                };
                if &now == before {
                    continue;
                }
                let who = match heartbeat::decode(&now) {
                    Block::Heartbeat(h) if h.state == State::Stopped => {
                        // It stopped cleanly while we watched: free now.
                        info!("leg {}: {} stopped serving", leg.name, describe(&h));
                        continue;
                    }
                    Block::Heartbeat(h) => describe(&h),
                    _ => "another host".into(),
                };
                return Err(format!(
                    "leg {} is served by {who}: its heartbeat moved {:.1} s into a {:.0} s watch; stop it there first (if that host is down, a start succeeds once its heartbeat has stood still for {:.0} s; --force skips this check, and two hosts writing one array destroy it)",
                    leg.name,
                    start.elapsed().as_secs_f64(),
                    wait.as_secs_f64(),
                    wait.as_secs_f64()
                ));
            }
        }
        info!(
            "the other node's heartbeat stood still for {:.1} s: it is gone; taking the legs over",
            wait.as_secs_f64()
        );
        Ok(())
    }

    /// Beats every interval on a thread until `stopping`; then, unless fenced,
    /// `finish` (called after the array is clean) writes "stopped".
    pub fn spawn(mut self) -> std::io::Result<Running> {
        let done = Arc::new(AtomicBool::new(false));
        let d2 = done.clone();
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                let mut last_ok = Instant::now();
                let limit = self.interval * heartbeat::SELF_FENCE_INTERVALS as u32;
                while !d2.load(Ordering::SeqCst) {
                    std::thread::sleep(self.interval);
                    if self.fence.is_fenced() {
                        continue;
                    }
                    if self.beat() {
                        last_ok = Instant::now();
                    } else if last_ok.elapsed() > limit && !self.legs.is_empty() {
                        self.fence.raise(&format!(
                            "the multi-host heartbeat could not be written for {:.1} s: another host may take the legs over",
                            last_ok.elapsed().as_secs_f64()
                        ));
                    }
                }
                self
            })?;
        Ok(Running {
            thread: Some(thread),
            done,
        })
    }

    /// One beat: checks that every block is still ours and writes the next one.
    /// Returns whether any leg was written.
    fn beat(&mut self) -> bool {
        for leg in &self.legs {
            let Ok(now) = leg.read() else { continue };
            if leg.ours.as_ref().is_some_and(|o| *o != now) {
                let who = match heartbeat::decode(&now) {
                    Block::Heartbeat(h) => describe(&h),
                    _ => "something else".into(),
                };
                self.fence.raise(&format!(
                    "leg {}: {who} overwrote this node's multi-host heartbeat: another host serves these legs",
                    leg.name
                ));
                return false;
            }
        }
        let block = self.next(State::Serving);
        let mut ok = false;
        for leg in &mut self.legs {
            match leg.write(block.clone()) {
                Ok(()) => ok = true,
                Err(e) => log::debug!("leg {}: heartbeat write: {e}", leg.name),
            }
        }
        ok
    }

    fn stop(&mut self) {
        if self.fence.is_fenced() {
            return;
        }
        let block = self.next(State::Stopped);
        for leg in &mut self.legs {
            if let Err(e) = leg.write(block.clone()) {
                warn!("leg {}: cannot mark the heartbeat stopped: {e}", leg.name);
            }
        }
    }
}

/// A heartbeat that beats on its thread; dropping it stops the beats and marks
/// the heartbeat "stopped" (not when fenced: the legs may be another host's now).
/// Drop it once the array is clean, or when the start fails.
pub struct Running {
    thread: Option<std::thread::JoinHandle<Multihost>>,
    done: Arc<AtomicBool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(mut m)) => m.stop(),
            Some(Err(_)) => warn!("the heartbeat thread panicked"),
            None => {}
        }
    }
}

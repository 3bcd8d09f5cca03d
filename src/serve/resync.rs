//! The resync thread: copies every chunk that needs it from the first in-sync leg to
//! the others, then promotes recovering legs.

use crate::raid1::Array;
use log::{info, warn};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Progress of the current resync or recovery.
#[derive(Debug, Default)]
pub struct ResyncProgress {
    active: AtomicBool,
    done_chunks: AtomicU64,
    started: Mutex<Option<(Instant, u64)>>,
}

/// A snapshot for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncStatus {
    /// A pass is running.
    pub active: bool,
    /// "resync" or "recovery".
    pub kind: &'static str,
    /// Chunks copied in this pass.
    pub done_chunks: u64,
    /// Chunks still to copy.
    pub remaining_chunks: u64,
    /// Bytes copied since start-up.
    pub bytes_copied: u64,
    /// Copy rate in this pass.
    pub rate_bytes_per_sec: u64,
    /// Estimated seconds to go.
    pub eta_seconds: Option<u64>,
}

impl ResyncProgress {
    /// A snapshot.
    pub fn status(&self, array: &Array) -> ResyncStatus {
        let remaining = array.bitmap.stats().needed;
        let bytes = array.counters.resync_bytes.load(Ordering::Relaxed);
        let active = self.active.load(Ordering::Relaxed);
        let (rate, eta) = match *self.started.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((t, b0)) if active => {
                let secs = t.elapsed().as_secs_f64().max(0.001);
                let rate = ((bytes - b0.min(bytes)) as f64 / secs) as u64;
                let chunk = u64::from(array.bitmap.geometry().chunksize);
                let eta = (rate > 0).then(|| remaining * chunk / rate.max(1));
                (rate, eta)
            }
            _ => (0, None),
        };
        ResyncStatus {
            active,
            kind: if array.recovering() {
                "recovery"
            } else {
                "resync"
            },
            done_chunks: self.done_chunks.load(Ordering::Relaxed),
            remaining_chunks: remaining,
            bytes_copied: bytes,
            rate_bytes_per_sec: rate,
            eta_seconds: eta,
        }
    }
}

/// Starts the resync thread.
pub fn spawn(
    array: Arc<Array>,
    progress: Arc<ResyncProgress>,
    stopping: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("resync".into())
        .spawn(move || run(&array, &progress, &stopping))
}

/// How long the resync thread, idle, sleeps before it looks again unasked: it is
/// woken (the bitmap's resync doorbell) when chunks become needed, a leg changes
/// state, a read repair is queued or the process stops.
const IDLE_BACKSTOP: Duration = Duration::from_secs(30);

/// How soon a cluster node's resync thread looks again after work (what the
/// earlier polling did every time).
const RETRY: Duration = Duration::from_millis(100);

/// Waits for the resync thread's doorbell.
fn idle(array: &Array) {
    array.bitmap.resync_bell().wait(IDLE_BACKSTOP);
}

fn run(array: &Array, progress: &ResyncProgress, stopping: &AtomicBool) {
    let mut cursor = 0;
    let mut last_log = Instant::now();
    while !stopping.load(Ordering::SeqCst) {
        if array.is_fenced() {
            idle(array);
            continue;
        }
        array.run_repairs();
        if array.copy_targets() == 0 {
            // Degraded to one leg: nothing to copy to until a leg is re-added.
            idle(array);
            continue;
        }
        let Some(c) = array.bitmap.next_needed(cursor) else {
            if progress.active.swap(false, Ordering::Relaxed) {
                let bytes = array.counters.resync_bytes.load(Ordering::Relaxed);
                info!(
                    "{} pass complete: {} chunks, {bytes} bytes copied in total",
                    if array.recovering() {
                        "recovery"
                    } else {
                        "resync"
                    },
                    progress.done_chunks.load(Ordering::Relaxed)
                );
            }
            if cursor > 0 {
                cursor = 0;
                continue;
            }
            if array.recovering() {
                if let Err(e) = array.finish_recovery() {
                    warn!("cannot record the end of recovery: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
            idle(array);
            continue;
        };
        if !progress.active.swap(true, Ordering::Relaxed) {
            progress.done_chunks.store(0, Ordering::Relaxed);
            *progress.started.lock().unwrap_or_else(|e| e.into_inner()) = Some((
                Instant::now(),
                array.counters.resync_bytes.load(Ordering::Relaxed),
            ));
            info!(
                "{} of {} chunks starts",
                if array.recovering() {
                    "recovery"
                } else {
                    "resync"
                },
                array.bitmap.stats().needed
            );
        }
        if array.in_sync_count() == 0 {
            idle(array);
            continue;
        }
        match array.resync_chunk(c) {
            Ok(_) => {
                progress.done_chunks.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                warn!("resync of chunk {c} failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        cursor = c + 1;
        if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
            let s = progress.status(array);
            info!(
                "{}: {} chunks to go, {} MiB/s{}",
                s.kind,
                s.remaining_chunks,
                s.rate_bytes_per_sec >> 20,
                s.eta_seconds
                    .map(|e| format!(", about {e} s left"))
                    .unwrap_or_default()
            );
        }
    }
}

/// Starts the resync thread of a cluster node: resyncs under the cluster's resync
/// lock and recovers the slots of nodes that die.
pub fn spawn_cluster(
    node: Arc<crate::cluster::node::ClusterNode<crate::raid1::Array>>,
    progress: Arc<ResyncProgress>,
    stopping: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cluster-resync".into())
        .spawn(move || {
            // After work that may have left some undone (a resync that failed or
            // was cut short), look again soon; idle, wait for the doorbell.
            let mut wait = Duration::ZERO;
            while !stopping.load(Ordering::SeqCst) {
                let bell = node.array.bitmap.resync_bell().receiver();
                if node.array.is_fenced() {
                    // Writes nothing; the node restarts when the lock manager is back.
                    let _ = bell.recv_timeout(IDLE_BACKSTOP);
                    continue;
                }
                node.array.run_repairs();
                let dead = crossbeam_channel::select! {
                    recv(node.node.dead) -> slot => slot.ok(),
                    recv(bell) -> _ => None,
                    default(wait) => None,
                };
                wait = IDLE_BACKSTOP;
                if let Some(slot) = dead {
                    progress.active.store(true, Ordering::Relaxed);
                    match node.recover(slot) {
                        Ok(n) => info!("recovered node slot {slot}: {n} bytes resynced"),
                        Err(e) => warn!("recovery of node slot {slot} failed: {e}"),
                    }
                    progress.active.store(false, Ordering::Relaxed);
                    wait = RETRY;
                    continue;
                }
                let a = &node.array;
                if a.copy_targets() == 0 {
                    continue;
                }
                if a.bitmap.next_needed(0).is_some() {
                    progress.active.store(true, Ordering::Relaxed);
                    if let Err(e) = node.resync() {
                        warn!("resync failed: {e}");
                    }
                    progress.active.store(false, Ordering::Relaxed);
                    wait = RETRY;
                } else if a.recovering() {
                    if let Err(e) = a.finish_recovery() {
                        warn!("cannot record the end of recovery: {e}");
                    }
                    wait = RETRY;
                }
            }
        })
}

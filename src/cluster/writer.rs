//! The writer role: which node may write the array's data.
//!
//! Every node of a clustered array stays joined (bitmaps, messages, resync), but a
//! disk attached to one VM has one writer: the node whose front-end runs the VM.
//! During a live migration the source's front-end stops its vrings (GET_VRING_BASE)
//! and the destination's starts them; the role moves with that. The role is a lock
//! on [`WRITER`] in the array's lockspace, taken with NOQUEUE when the vrings start
//! and given back when they stop or the front-end leaves; the lock manager drops it
//! when its node dies. A node refused the role keeps serving reads but fails writes
//! until its front-end starts the vrings again: a source VM resumed after its
//! migration completed must never write into the disk the destination now owns
//! (there is nobody else to fence a stale writer on shared storage).
//!
//! Exclusive mode takes the lock in EX (one writer). Shared mode takes it in CW:
//! nodes in shared mode write together (guests that coordinate their writes, e.g. a
//! cluster file system) and keep exclusive writers out, as an exclusive writer
//! keeps them out.

use super::comms::{new_nl_lock, Comms, CommsError, Router, STEP_TIMEOUT};
use crate::dlm::{flags, LockId, LockSpace, Mode, Status};
use log::{info, warn};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The lock resource of the writer role.
pub const WRITER: &[u8] = b"vumd-writer";

/// How long a node retries when another node holds the role.
pub const ACQUIRE_RETRY: Duration = Duration::from_secs(1);

/// Pause between two attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Where the role stands on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleState {
    /// Not taken: no front-end runs the vrings.
    Idle,
    /// This node writes.
    Held,
    /// Another node holds the role: guest writes fail until the vrings restart.
    Refused,
    /// Being given back in the background ([`WriterRole::release_in_background`]):
    /// no guest write goes out; the next take waits for the release to end.
    Releasing,
}

impl RoleState {
    /// The name `status` shows.
    pub fn name(self) -> &'static str {
        match self {
            RoleState::Idle => "idle",
            RoleState::Held => "held",
            RoleState::Refused => "refused",
            RoleState::Releasing => "releasing",
        }
    }
}

struct RoleLock {
    ls: Arc<dyn LockSpace>,
    router: Arc<Router>,
    id: LockId,
}

/// This node's writer role.
pub struct WriterRole {
    /// `None`: the array's only node; the role is always granted.
    lock: Option<Arc<RoleLock>>,
    mode: Mode,
    state: Arc<RoleShared>,
}

/// The role's state, shared with a release that runs in the background.
struct RoleShared {
    state: Mutex<RoleState>,
    /// Signalled when a background release ends.
    released: Condvar,
}

impl RoleShared {
    fn new() -> Arc<RoleShared> {
        Arc::new(RoleShared {
            state: Mutex::new(RoleState::Idle),
            released: Condvar::new(),
        })
    }

    /// The state, once no background release runs.
    fn settled(&self) -> MutexGuard<'_, RoleState> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while *st == RoleState::Releasing {
            st = self.released.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st
    }
}

impl WriterRole {
    /// The role of the only node of an array (`--lock-manager local`).
    pub fn local() -> WriterRole {
        WriterRole {
            lock: None,
            mode: Mode::Ex,
            state: RoleShared::new(),
        }
    }

    /// The role of a cluster node: an NL lock on [`WRITER`] in the lockspace of
    /// `comms`, converted when the role is taken. `shared`: several writers.
    pub fn cluster(comms: &Comms, shared: bool) -> Result<WriterRole, CommsError> {
        let id = new_nl_lock(&**comms.ls(), comms.router(), WRITER, 0)?;
        Ok(WriterRole {
            lock: Some(Arc::new(RoleLock {
                ls: comms.ls().clone(),
                router: comms.router().clone(),
                id,
            })),
            mode: if shared { Mode::Cw } else { Mode::Ex },
            state: RoleShared::new(),
        })
    }

    /// Whether writers share the role.
    pub fn shared(&self) -> bool {
        self.mode == Mode::Cw
    }

    /// The current state.
    pub fn state(&self) -> RoleState {
        *self.state.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the role unless it is held or was refused since the last release;
    /// retries for `retry` while another node holds it (after a release of ours
    /// still running in the background). Returns the new state.
    pub fn acquire(&self, retry: Duration) -> RoleState {
        let mut st = self.state.settled();
        if *st != RoleState::Idle {
            return *st;
        }
        let Some(l) = &self.lock else {
            *st = RoleState::Held;
            return *st;
        };
        let start = Instant::now();
        let mut attempts = 0u32;
        *st = loop {
            attempts += 1;
            let rx = l.router.expect(l.id);
            if let Err(e) =
                l.ls.convert(l.id, self.mode, flags::CONVERT | flags::NOQUEUE, None)
            {
                warn!("writer role: the lock manager refused the request: {e}");
                break RoleState::Refused;
            }
            match rx.recv_timeout(STEP_TIMEOUT) {
                Ok((Status::Granted, _)) => break RoleState::Held,
                Ok((Status::Again, _)) if start.elapsed() < retry => {
                    std::thread::sleep(RETRY_PAUSE)
                }
                Ok((Status::Again, _)) => break RoleState::Refused,
                Ok((s, _)) => {
                    warn!("writer role: request ended with {s:?}");
                    break RoleState::Refused;
                }
                Err(_) => {
                    warn!("writer role: no answer from the lock manager in {STEP_TIMEOUT:?}");
                    break RoleState::Refused;
                }
            }
        };
        match *st {
            RoleState::Held => info!(
                "writer role taken ({}, attempt {attempts})",
                if self.shared() { "shared" } else { "exclusive" }
            ),
            _ => warn!(
                "writer role refused after {attempts} attempts in {:?}: another node writes \
                 this array; guest writes fail until the front-end restarts the vrings",
                start.elapsed()
            ),
        }
        *st
    }

    /// Gives the role back (or forgets a refusal): the next start tries again.
    pub fn release(&self) {
        let mut st = self.state.settled();
        let was = std::mem::replace(&mut *st, RoleState::Idle);
        if was != RoleState::Held {
            return;
        }
        if let Some(l) = &self.lock {
            l.give_back();
        }
    }

    /// As [`WriterRole::release`], but the lock manager round trip runs on a thread
    /// of its own: a front-end stopping its vrings (a migration's source, whose VM
    /// stands still until it is answered) does not wait for it. Nothing of ours
    /// writes meanwhile (the vrings are stopped and drained first), and the next
    /// [`WriterRole::acquire`] waits for the release to end. Another node asking
    /// for the role meanwhile retries until it ends.
    pub fn release_in_background(&self) {
        let mut st = self.state.settled();
        if *st != RoleState::Held {
            *st = RoleState::Idle;
            return;
        }
        let Some(l) = self.lock.clone() else {
            *st = RoleState::Idle;
            return;
        };
        *st = RoleState::Releasing;
        drop(st);
        let shared = self.state.clone();
        let end = move |l: &RoleLock| {
            l.give_back();
            *shared.state.lock().unwrap_or_else(|e| e.into_inner()) = RoleState::Idle;
            shared.released.notify_all();
        };
        let spawned = std::thread::Builder::new()
            .name("writer-release".into())
            .spawn({
                let (l, end) = (l.clone(), end.clone());
                move || end(&l)
            });
        if spawned.is_err() {
            // No thread to be had: released here.
            end(&l);
        }
    }
}

impl RoleLock {
    /// Converts the role's lock back to NL and waits for the lock manager.
    fn give_back(&self) {
        let rx = self.router.expect(self.id);
        let done = self
            .ls
            .convert(self.id, Mode::Nl, flags::CONVERT, None)
            .map_err(|e| e.to_string())
            .and_then(|()| match rx.recv_timeout(STEP_TIMEOUT) {
                Ok((Status::Granted, _)) => Ok(()),
                Ok((s, _)) => Err(format!("ended with {s:?}")),
                Err(_) => Err(format!("no answer in {STEP_TIMEOUT:?}")),
            });
        match done {
            Ok(()) => info!("writer role released"),
            Err(e) => warn!("writer role release: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlm::local::LocalDlm;

    const LS: &str = "3578507b-e0cb-6d4f-6322-696cd7b1b10c";

    fn role(dlm: &LocalDlm, shared: bool) -> (WriterRole, Arc<Comms>) {
        let ls: Arc<dyn LockSpace> = Arc::new(dlm.join(LS, 32));
        let comms = Comms::join(ls, 1, Box::new(|_| {})).unwrap();
        (WriterRole::cluster(&comms, shared).unwrap(), comms)
    }

    #[test]
    fn one_exclusive_writer_at_a_time_and_a_refusal_lasts_until_released() {
        let dlm = LocalDlm::new();
        let (a, _ca) = role(&dlm, false);
        let (b, _cb) = role(&dlm, false);
        assert_eq!(a.acquire(ACQUIRE_RETRY), RoleState::Held);
        let t = Instant::now();
        assert_eq!(b.acquire(Duration::from_millis(200)), RoleState::Refused);
        assert!(t.elapsed() >= Duration::from_millis(200), "retried");
        a.release();
        assert_eq!(a.state(), RoleState::Idle);
        // Still refused: only a new start (release, then acquire) tries again.
        assert_eq!(b.acquire(ACQUIRE_RETRY), RoleState::Refused);
        b.release();
        assert_eq!(b.acquire(ACQUIRE_RETRY), RoleState::Held);
        assert_eq!(a.acquire(Duration::ZERO), RoleState::Refused);
    }

    #[test]
    fn shared_writers_write_together_and_keep_an_exclusive_one_out() {
        let dlm = LocalDlm::new();
        let (a, _ca) = role(&dlm, true);
        let (b, _cb) = role(&dlm, true);
        let (c, _cc) = role(&dlm, false);
        assert_eq!(a.acquire(Duration::ZERO), RoleState::Held);
        assert_eq!(b.acquire(Duration::ZERO), RoleState::Held);
        assert_eq!(c.acquire(Duration::ZERO), RoleState::Refused);
        a.release();
        b.release();
        c.release();
        assert_eq!(c.acquire(Duration::ZERO), RoleState::Held);
        assert_eq!(a.acquire(Duration::ZERO), RoleState::Refused);
    }

    #[test]
    fn the_role_of_a_node_that_dies_is_free() {
        let dlm = LocalDlm::new();
        let m = dlm.join(LS, 32);
        let id = m.node();
        let ls: Arc<dyn LockSpace> = Arc::new(m);
        let comms = Comms::join(ls, 0, Box::new(|_| {})).unwrap();
        let a = WriterRole::cluster(&comms, false).unwrap();
        let (b, _cb) = role(&dlm, false);
        assert_eq!(a.acquire(Duration::ZERO), RoleState::Held);
        dlm.kill(LS, id);
        assert_eq!(b.acquire(ACQUIRE_RETRY), RoleState::Held);
    }

    #[test]
    fn a_release_in_the_background_ends_before_the_next_take_and_frees_the_role() {
        let dlm = LocalDlm::new();
        let (a, _ca) = role(&dlm, false);
        let (b, _cb) = role(&dlm, false);
        for _ in 0..50 {
            assert_eq!(a.acquire(ACQUIRE_RETRY), RoleState::Held);
            a.release_in_background();
            // Taken again at once: the take waits for the release first.
            assert_eq!(a.acquire(Duration::ZERO), RoleState::Held);
            assert_eq!(b.acquire(Duration::ZERO), RoleState::Refused);
            b.release();
            a.release_in_background();
            // The other node gets it once the release ended (it retries).
            assert_eq!(b.acquire(ACQUIRE_RETRY), RoleState::Held);
            // (Its thread may not have noted the grant yet: release waits for it.)
            a.release();
            assert_eq!(a.state(), RoleState::Idle);
            b.release();
        }
        // A refusal is forgotten as by release().
        assert_eq!(b.acquire(ACQUIRE_RETRY), RoleState::Held);
        assert_eq!(a.acquire(Duration::ZERO), RoleState::Refused);
        a.release_in_background();
        assert_eq!(a.state(), RoleState::Idle);
    }

    #[test]
    fn the_only_node_always_gets_the_role() {
        let r = WriterRole::local();
        assert_eq!(r.state(), RoleState::Idle);
        assert_eq!(r.acquire(Duration::ZERO), RoleState::Held);
        r.release();
        assert_eq!(r.acquire(Duration::ZERO), RoleState::Held);
    }
}

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

/// How long a node retries when another node holds the role, counted in its own
/// pauses between attempts: the time the lock manager takes to answer does not
/// count (while it is slow, as in a recovery, a release of the role by the other
/// node, a migration's source, is slowed as much), up to [`STEP_TIMEOUT`] in all.
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
    /// How long a release waits for the lock manager ([`STEP_TIMEOUT`]).
    step_timeout: Duration,
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
                step_timeout: STEP_TIMEOUT,
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
        // Time spent waiting for the lock manager's answers (not counted in `retry`).
        let mut answering = Duration::ZERO;
        *st = loop {
            attempts += 1;
            let asked = Instant::now();
            let rx = l.router.expect(l.id);
            if let Err(e) =
                l.ls.convert(l.id, self.mode, flags::CONVERT | flags::NOQUEUE, None)
            {
                warn!("writer role: the lock manager refused the request: {e}");
                break RoleState::Refused;
            }
            let answer = rx.recv_timeout(STEP_TIMEOUT);
            answering += asked.elapsed();
            let retrying = start.elapsed().saturating_sub(answering);
            match answer {
                Ok((Status::Granted, _)) => break RoleState::Held,
                Ok((Status::Again, _)) if retrying < retry && start.elapsed() < STEP_TIMEOUT => {
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
    /// Where the lock manager does not take it back, the role stays held.
    pub fn release(&self) {
        let mut st = self.state.settled();
        let was = std::mem::replace(&mut *st, RoleState::Idle);
        if was != RoleState::Held {
            return;
        }
        if let Some(l) = &self.lock {
            if !l.give_back() {
                *st = RoleState::Held;
            }
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
            let now = if l.give_back() {
                RoleState::Idle
            } else {
                RoleState::Held
            };
            *shared.state.lock().unwrap_or_else(|e| e.into_inner()) = now;
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
    /// Returns whether the role was given back; if not, the lock is as it was
    /// (held): a conversion left unanswered is cancelled, so that its answer
    /// cannot come later and be taken for the grant of the next take.
    fn give_back(&self) -> bool {
        let rx = self.router.expect(self.id);
        let done = match self.ls.convert(self.id, Mode::Nl, flags::CONVERT, None) {
            Err(e) => Err(e.to_string()),
            Ok(()) => match rx.recv_timeout(self.step_timeout) {
                Ok((Status::Granted, _)) => Ok(()),
                Ok((s, _)) => Err(format!("ended with {s:?}")),
                Err(_) => {
                    // From here the conversion's answer, if it comes, comes to
                    // `cancel`; one that came just before is in `rx`.
                    let cancel = self.router.expect(self.id);
                    let answer = rx.try_recv().ok().or_else(|| {
                        // Refused when nothing is queued any more: the conversion
                        // was granted meanwhile, and its answer is on its way.
                        let _ = self.ls.unlock(self.id, flags::CANCEL, None);
                        cancel.recv_timeout(Duration::from_secs(5)).ok()
                    });
                    match answer {
                        // The release went through before the cancel.
                        Some((Status::Granted, _)) => Ok(()),
                        _ => Err(format!("no answer in {:?}", self.step_timeout)),
                    }
                }
            },
        };
        match done {
            Ok(()) => {
                info!("writer role released");
                true
            }
            Err(e) => {
                warn!("writer role release: {e}; the role stays with this node");
                false
            }
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

    /// A lockspace member whose lock manager is slow or failing on demand.
    #[derive(Default)]
    struct Moody {
        inner: Option<Arc<dyn LockSpace>>,
        /// Delay before a conversion to NL (a release) reaches the lock manager.
        nl_delay: Mutex<Duration>,
        /// Delay of the answer to the next conversion to another mode.
        next_answer_delay: Mutex<Duration>,
        /// Conversions to NL: refused (`Some(true)`) or never answered (`Some(false)`).
        nl_fails: Mutex<Option<bool>>,
        /// Conversions to NL reach the lock manager this late, after the call.
        nl_late: Mutex<Option<Duration>>,
    }

    impl Moody {
        fn inner(&self) -> &dyn LockSpace {
            &**self.inner.as_ref().expect("joined")
        }
    }

    impl LockSpace for Moody {
        fn node(&self) -> crate::dlm::NodeId {
            self.inner().node()
        }
        fn lvb_len(&self) -> usize {
            self.inner().lvb_len()
        }
        fn lock(
            &self,
            name: &[u8],
            mode: Mode,
            fl: u32,
            lvb: Option<&[u8]>,
        ) -> Result<LockId, crate::dlm::DlmError> {
            self.inner().lock(name, mode, fl, lvb)
        }
        fn convert(
            &self,
            lock: LockId,
            mode: Mode,
            fl: u32,
            lvb: Option<&[u8]>,
        ) -> Result<(), crate::dlm::DlmError> {
            if mode == Mode::Nl {
                match *self.nl_fails.lock().unwrap() {
                    Some(true) => return Err(crate::dlm::DlmError::Rejected("refused".into())),
                    Some(false) => return Ok(()),
                    None => {}
                }
                if let Some(late) = *self.nl_late.lock().unwrap() {
                    let inner = self.inner.clone().expect("joined");
                    std::thread::spawn(move || {
                        std::thread::sleep(late);
                        let _ = inner.convert(lock, mode, fl, None);
                    });
                    return Ok(());
                }
                std::thread::sleep(*self.nl_delay.lock().unwrap());
                return self.inner().convert(lock, mode, fl, lvb);
            }
            let r = self.inner().convert(lock, mode, fl, lvb);
            let delay = std::mem::take(&mut *self.next_answer_delay.lock().unwrap());
            std::thread::sleep(delay);
            r
        }
        fn unlock(
            &self,
            lock: LockId,
            fl: u32,
            lvb: Option<&[u8]>,
        ) -> Result<(), crate::dlm::DlmError> {
            self.inner().unlock(lock, fl, lvb)
        }
        fn events(&self) -> crossbeam_channel::Receiver<crate::dlm::Event> {
            self.inner().events()
        }
    }

    fn moody_role(dlm: &LocalDlm) -> (WriterRole, Arc<Comms>, Arc<Moody>) {
        let m = Arc::new(Moody {
            inner: Some(Arc::new(dlm.join(LS, 32))),
            ..Moody::default()
        });
        let ls: Arc<dyn LockSpace> = m.clone();
        let comms = Comms::join(ls, 1, Box::new(|_| {})).unwrap();
        (WriterRole::cluster(&comms, false).unwrap(), comms, m)
    }

    /// A migration's destination asks for the role while the source's release,
    /// answered in the background, is held up by a slow lock manager (a
    /// recovery), which answers the destination as slowly: the time the lock
    /// manager takes does not count against the retries, and the destination
    /// gets the role once the release is through.
    #[test]
    fn a_take_waits_out_a_release_the_lock_manager_is_slow_to_do() {
        let dlm = LocalDlm::new();
        let (a, _ca, ma) = moody_role(&dlm);
        let (b, _cb, mb) = moody_role(&dlm);
        assert_eq!(a.acquire(ACQUIRE_RETRY), RoleState::Held);
        *ma.nl_delay.lock().unwrap() = Duration::from_millis(1500);
        a.release_in_background();
        *mb.next_answer_delay.lock().unwrap() = Duration::from_millis(1200);
        assert_eq!(b.acquire(ACQUIRE_RETRY), RoleState::Held);
        assert_eq!(a.acquire(Duration::ZERO), RoleState::Refused);
    }

    /// A release the lock manager refuses leaves the lock held: the role is
    /// still this node's, and its state says so (not "idle" while every other
    /// node is refused).
    #[test]
    fn a_release_the_lock_manager_refuses_leaves_the_role_held() {
        let dlm = LocalDlm::new();
        let (a, _ca, ma) = moody_role(&dlm);
        let (b, _cb, _mb) = moody_role(&dlm);
        assert_eq!(a.acquire(ACQUIRE_RETRY), RoleState::Held);
        *ma.nl_fails.lock().unwrap() = Some(true);
        a.release_in_background();
        assert_eq!(*a.state.settled(), RoleState::Held);
        a.release();
        assert_eq!(a.state(), RoleState::Held);
        assert_eq!(b.acquire(Duration::ZERO), RoleState::Refused);
        // Once the lock manager takes it, the role goes back.
        *ma.nl_fails.lock().unwrap() = None;
        a.release();
        assert_eq!(a.state(), RoleState::Idle);
        b.release();
        assert_eq!(b.acquire(Duration::ZERO), RoleState::Held);
    }

    /// A release the lock manager never answers is cancelled: the role stays
    /// held (an answer coming later must not pass for the next take's grant).
    #[test]
    fn an_unanswered_release_is_cancelled_and_the_role_stays_held() {
        let dlm = LocalDlm::new();
        let (mut a, _ca, ma) = moody_role(&dlm);
        let (b, _cb, _mb) = moody_role(&dlm);
        if let Some(l) = a.lock.as_mut().and_then(Arc::get_mut) {
            l.step_timeout = Duration::from_millis(200);
        }
        assert_eq!(a.acquire(ACQUIRE_RETRY), RoleState::Held);
        *ma.nl_fails.lock().unwrap() = Some(false);
        a.release_in_background();
        assert_eq!(*a.state.settled(), RoleState::Held);
        assert_eq!(b.acquire(Duration::ZERO), RoleState::Refused);
    }

    /// A release answered only after the wait for it gave up, too late to be
    /// cancelled: it went through, so the role is given back. Taken for held,
    /// this node would write on a lock another node can now take.
    #[test]
    fn a_release_answered_after_its_wait_gave_up_is_given_back() {
        let dlm = LocalDlm::new();
        let (mut a, _ca, ma) = moody_role(&dlm);
        let (b, _cb, _mb) = moody_role(&dlm);
        if let Some(l) = a.lock.as_mut().and_then(Arc::get_mut) {
            l.step_timeout = Duration::from_millis(200);
        }
        assert_eq!(a.acquire(ACQUIRE_RETRY), RoleState::Held);
        *ma.nl_late.lock().unwrap() = Some(Duration::from_millis(500));
        a.release_in_background();
        assert_eq!(*a.state.settled(), RoleState::Idle);
        assert_eq!(b.acquire(ACQUIRE_RETRY), RoleState::Held);
        assert_eq!(a.acquire(Duration::ZERO), RoleState::Refused);
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

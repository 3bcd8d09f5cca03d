//! md-cluster messaging over any [`LockSpace`]: the token / message / ack lock
//! dance of spec §4.3. A send completes only when every other member processed
//! the message; receivers are woken by the BAST on `ack`.

use crate::dlm::{flags, DlmError, Event, LockId, LockSpace, Mode, NodeId, Status};
use crate::md::message::{ClusterMsg, MessageError};
use crossbeam_channel::{bounded, Receiver, Sender};
use log::{debug, warn};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Lock resource names (spec §3.2).
pub const TOKEN: &[u8] = b"token";
/// Carries the message in its LVB.
pub const MESSAGE: &[u8] = b"message";
/// Receivers hold CR; a sender's EX request wakes them.
pub const ACK: &[u8] = b"ack";
/// Held in CR by every node; a node adding a device can take it in EX (NOQUEUE)
/// only when every other node found the device and released it (spec §5.6).
pub const NO_NEW_DEV: &[u8] = b"no-new-dev";

/// How long one lock step may take before the operation is abandoned.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Messaging errors.
#[derive(Debug, thiserror::Error)]
pub enum CommsError {
    /// The lock manager refused or is gone.
    #[error("lock manager: {0}")]
    Dlm(#[from] DlmError),
    /// A lock step did not complete in time (a member is not acknowledging).
    #[error("{0} did not complete within {1:?}: a member is not acknowledging")]
    Timeout(&'static str, Duration),
    /// A lock step ended with an unexpected status.
    #[error("{0} ended with {1:?}")]
    Status(&'static str, Status),
    /// The LVB did not hold a message.
    #[error("bad message: {0}")]
    Message(#[from] MessageError),
    /// Some node did not find the device being added.
    #[error("another node did not find the new device (it must see the same leg)")]
    NotFound,
}

/// Routes completion events to the thread waiting for them, and BASTs on `ack` to
/// the receive loop.
pub(crate) struct Router {
    /// Waiting callers; `None` once the member's events ended (killed, or its lock
    /// manager went away): no completion can come any more.
    waiters: Mutex<Option<HashMap<LockId, Sender<Completion>>>>,
    /// Completions nobody waited for yet (e.g. the grant of a new lock that raced
    /// ahead of its caller); the next `expect` of that lock takes it.
    early: Mutex<HashMap<LockId, Completion>>,
}

/// A completion: status and the LVB read.
type Completion = (Status, Option<Vec<u8>>);

impl Router {
    /// A receiver for the next completion of `lock`.
    pub(crate) fn expect(&self, lock: LockId) -> Receiver<Completion> {
        let (tx, rx) = bounded(1);
        let mut guard = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let Some(waiters) = guard.as_mut() else {
            // Closed: the receiver reports a disconnect at once.
            return rx;
        };
        let early = self
            .early
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&lock);
        match early {
            Some(c) => {
                let _ = tx.send(c);
            }
            None => {
                waiters.insert(lock, tx);
            }
        }
        rx
    }

    /// The member's events ended: every waiter, and every later one, sees a
    /// disconnect.
    fn close(&self) {
        *self.waiters.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn deliver(&self, lock: LockId, status: Status, lvb: Option<Vec<u8>>) {
        let mut guard = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let Some(waiters) = guard.as_mut() else {
            return;
        };
        match waiters.remove(&lock) {
            Some(tx) => {
                let _ = tx.send((status, lvb));
            }
            None => {
                debug!("completion {status:?} for lock {lock} arrived before its waiter");
                self.early
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(lock, (status, lvb));
            }
        }
    }
}

/// Creates a new lock on `name` in NL (EXPEDITE, so it is granted at once) and
/// waits for that grant, so no stale completion of it can be mistaken later.
pub(crate) fn new_nl_lock(
    ls: &dyn LockSpace,
    router: &Router,
    name: &[u8],
    fl: u32,
) -> Result<LockId, CommsError> {
    let lvb = (fl & flags::VALBLK != 0).then(|| vec![0u8; ls.lvb_len()]);
    let id = ls.lock(name, Mode::Nl, fl | flags::EXPEDITE, lvb.as_deref())?;
    match router.expect(id).recv_timeout(STEP_TIMEOUT) {
        Ok((Status::Granted, _)) => Ok(id),
        Ok((st, _)) => Err(CommsError::Status("new NL lock", st)),
        Err(_) => Err(CommsError::Timeout("new NL lock", STEP_TIMEOUT)),
    }
}

/// One member's messaging endpoint.
pub struct Comms {
    ls: Arc<dyn LockSpace>,
    router: Arc<Router>,
    token: LockId,
    message: LockId,
    ack: LockId,
    no_new_dev: LockId,
    /// Whether we released `no-new-dev` to confirm a new device.
    confirmed_new_dev: AtomicBool,
    /// Our 0-based md slot (put into every message we send).
    slot: AtomicU32,
    /// Serialises our own sends with our receive processing (spec: a node does not
    /// process an incoming message while it sends). Taken after `token`.
    busy: Mutex<()>,
    /// Serialises this node's own senders.
    sending: Mutex<()>,
    /// The other members, when the lock manager reports them.
    peers: Arc<Peers>,
}

/// The other members of the lockspace, as the lock manager reports them (the
/// embedded ones do, node up and down; libdlm does not: there corosync's group
/// counts them).
#[derive(Default)]
pub struct Peers {
    set: Mutex<HashSet<NodeId>>,
    /// Told the count whenever it changes (under its lock: in order).
    sink: Mutex<Option<PeerSink>>,
    /// Told every member that goes down, after the count.
    down: Mutex<Option<DownSink>>,
}

/// Receives the node id of a member that went down.
pub type DownSink = Box<dyn Fn(NodeId) + Send + Sync>;

/// Receives how many other members the lockspace has.
pub type PeerSink = Box<dyn Fn(usize) + Send + Sync>;

impl Peers {
    fn changed(&self, node: NodeId, up: bool) {
        let n = {
            let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
            let changed = if up {
                set.insert(node)
            } else {
                set.remove(&node)
            };
            if !changed {
                return;
            }
            set.len()
        };
        let sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = sink.as_ref() {
            f(n);
        }
        if !up {
            if let Some(f) = self.down.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                f(node);
            }
        }
    }

    /// Has `f` told every member that goes down from now on.
    pub fn on_down(&self, f: DownSink) {
        *self.down.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// The other members reported alive now.
    pub fn count(&self) -> usize {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Has `f` told the count at every change, and now if any member was reported.
    pub fn on_change(&self, f: PeerSink) {
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.set.lock().unwrap_or_else(|e| e.into_inner()).len();
        if n > 0 {
            f(n);
        }
        *sink = Some(f);
    }
}

/// What the receive loop calls for every message another member sent.
pub type Handler = Box<dyn FnMut(ClusterMsg) + Send>;

impl Comms {
    /// Joins messaging (spec §5.1 steps 4–7): creates the locks, takes `token` EX
    /// so no message is in flight, arms `ack` CR, releases `token`. Returns the
    /// endpoint and starts the receive loop, which calls `handler` for each message.
    pub fn join(
        ls: Arc<dyn LockSpace>,
        slot: u32,
        handler: Handler,
    ) -> Result<Arc<Comms>, CommsError> {
        let (c, basts) = Comms::create(ls)?;
        c.set_slot(slot);
        c.step("token NL->EX", c.token, Mode::Ex, 0, None)?;
        c.step("ack NL->CR", c.ack, Mode::Cr, 0, None)?;
        c.step("no-new-dev NL->CR", c.no_new_dev, Mode::Cr, 0, None)?;
        c.step("token EX->NL", c.token, Mode::Nl, 0, None)?;
        c.start_receiving(basts, handler)?;
        Ok(c)
    }

    /// Creates the messaging locks (NL) and the event thread. Nothing is received
    /// until `ack` is armed and [`Comms::start_receiving`] runs; the returned
    /// channel carries the BASTs on `ack`.
    pub(crate) fn create(ls: Arc<dyn LockSpace>) -> Result<(Arc<Comms>, Receiver<()>), CommsError> {
        let router = Arc::new(Router {
            waiters: Mutex::new(Some(HashMap::new())),
            early: Mutex::new(HashMap::new()),
        });
        let events = ls.events();
        let (bast_tx, bast_rx) = crossbeam_channel::unbounded::<()>();
        let r2 = router.clone();
        let ack_id = Arc::new(Mutex::new(None::<LockId>));
        let ack2 = ack_id.clone();
        let peers = Arc::new(Peers::default());
        let peers2 = peers.clone();
        std::thread::Builder::new()
            .name("dlm-events".into())
            .spawn(move || {
                for ev in events.iter() {
                    match ev {
                        // A value block marked not valid (its writer died) counts as
                        // none: no message, no resync window (spec §3.5).
                        Event::Ast {
                            lock,
                            status,
                            lvb,
                            lvb_invalid,
                        } => r2.deliver(lock, status, if lvb_invalid { None } else { lvb }),
                        Event::Bast { lock, .. } => {
                            let is_ack =
                                *ack2.lock().unwrap_or_else(|e| e.into_inner()) == Some(lock);
                            if is_ack && bast_tx.send(()).is_err() {
                                break;
                            }
                        }
                        Event::NodeUp(n) => peers2.changed(n, true),
                        Event::NodeDown(n) => peers2.changed(n, false),
                    }
                }
                // No event can come any more: whoever waits for one (a watch on a
                // slot, a step of the protocol) learns it now instead of never.
                r2.close();
            })
            .map_err(|e| DlmError::Unavailable(e.to_string()))?;
        let message = new_nl_lock(&*ls, &router, MESSAGE, flags::VALBLK)?;
        let token = new_nl_lock(&*ls, &router, TOKEN, 0)?;
        let ack = new_nl_lock(&*ls, &router, ACK, 0)?;
        let no_new_dev = new_nl_lock(&*ls, &router, NO_NEW_DEV, 0)?;
        *ack_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(ack);
        let c = Arc::new(Comms {
            ls,
            router,
            token,
            message,
            ack,
            no_new_dev,
            confirmed_new_dev: AtomicBool::new(false),
            slot: AtomicU32::new(0),
            busy: Mutex::new(()),
            sending: Mutex::new(()),
            peers,
        });
        Ok((c, bast_rx))
    }

    /// Starts the receive loop.
    pub(crate) fn start_receiving(
        self: &Arc<Self>,
        basts: Receiver<()>,
        handler: Handler,
    ) -> Result<(), CommsError> {
        let c2 = self.clone();
        std::thread::Builder::new()
            .name("cluster-recv".into())
            .spawn(move || c2.receive_loop(basts, handler))
            .map_err(|e| DlmError::Unavailable(e.to_string()))?;
        Ok(())
    }

    /// The other members of the lockspace, as the lock manager reports them.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Sets the slot our messages carry.
    pub(crate) fn set_slot(&self, slot: u32) {
        self.slot.store(slot, Ordering::Relaxed);
    }

    /// Our slot.
    pub fn slot(&self) -> u32 {
        self.slot.load(Ordering::Relaxed)
    }

    /// The lock manager.
    pub(crate) fn ls(&self) -> &Arc<dyn LockSpace> {
        &self.ls
    }

    /// The completion router.
    pub(crate) fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// The `token` lock.
    pub(crate) fn token(&self) -> LockId {
        self.token
    }

    /// The `ack` lock.
    pub(crate) fn ack(&self) -> LockId {
        self.ack
    }

    /// The `no-new-dev` lock.
    pub(crate) fn no_new_dev(&self) -> LockId {
        self.no_new_dev
    }

    /// Confirms a NEWDISK: we found the device (`no-new-dev` CR→NL).
    pub fn confirm_new_device(&self) -> Result<(), CommsError> {
        self.step("no-new-dev CR->NL", self.no_new_dev, Mode::Nl, 0, None)?;
        self.confirmed_new_dev.store(true, Ordering::Release);
        Ok(())
    }

    /// Takes `no-new-dev` back in CR after a confirmation, once the add it
    /// confirmed is over (any later message means that).
    pub fn rearm_new_device(&self) -> Result<(), CommsError> {
        if self.confirmed_new_dev.swap(false, Ordering::AcqRel) {
            self.step("no-new-dev NL->CR", self.no_new_dev, Mode::Cr, 0, None)?;
        }
        Ok(())
    }

    /// Adds a device cluster-wide (spec §5.6): under the token, sends `newdisk`;
    /// when every other node found the device (`no-new-dev` EX with NOQUEUE is
    /// granted), runs `f` (writes the superblocks) and sends the message it
    /// returns. Fails with [`CommsError::NotFound`] when some node did not find it.
    pub fn add_device<T>(
        &self,
        mut newdisk: ClusterMsg,
        f: impl FnOnce() -> (T, Option<ClusterMsg>),
    ) -> Result<T, CommsError> {
        let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        self.step("token NL->EX", self.token, Mode::Ex, 0, None)?;
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        newdisk.slot = self.slot();
        let r = self.send_locked(&newdisk).and_then(|()| {
            let rx = self.router.expect(self.no_new_dev);
            self.ls.convert(
                self.no_new_dev,
                Mode::Ex,
                flags::CONVERT | flags::NOQUEUE,
                None,
            )?;
            match rx.recv_timeout(STEP_TIMEOUT) {
                Ok((Status::Granted, _)) => {
                    self.step("no-new-dev EX->CR", self.no_new_dev, Mode::Cr, 0, None)?;
                    let (value, msg) = f();
                    if let Some(mut m) = msg {
                        m.slot = self.slot();
                        self.send_locked(&m)?;
                    }
                    Ok(value)
                }
                Ok((Status::Again, _)) => Err(CommsError::NotFound),
                Ok((st, _)) => Err(CommsError::Status("no-new-dev CR->EX", st)),
                Err(_) => Err(CommsError::Timeout("no-new-dev CR->EX", STEP_TIMEOUT)),
            }
        });
        drop(busy);
        let back = self.step("token EX->NL", self.token, Mode::Nl, 0, None);
        let value = r?;
        back?;
        Ok(value)
    }

    /// Converts `lock` to `mode` and waits for the grant.
    pub(crate) fn step(
        &self,
        what: &'static str,
        lock: LockId,
        mode: Mode,
        fl: u32,
        lvb: Option<&[u8]>,
    ) -> Result<Option<Vec<u8>>, CommsError> {
        let rx = self.router.expect(lock);
        self.ls.convert(lock, mode, fl | flags::CONVERT, lvb)?;
        match rx.recv_timeout(STEP_TIMEOUT) {
            Ok((Status::Granted, lvb)) => Ok(lvb),
            Ok((st, _)) => Err(CommsError::Status(what, st)),
            Err(_) => {
                // Give up: cancel the queued conversion so the lock returns to its
                // granted mode (spec §4.4).
                let cancel = self.router.expect(lock);
                if self.ls.unlock(lock, flags::CANCEL, None).is_ok() {
                    let _ = cancel.recv_timeout(Duration::from_secs(5));
                }
                Err(CommsError::Timeout(what, STEP_TIMEOUT))
            }
        }
    }

    /// Sends `msg` to every other member and returns once all of them processed it.
    pub fn send(&self, mut msg: ClusterMsg) -> Result<(), CommsError> {
        // One send at a time from this node (each lock has one request in flight).
        let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        msg.slot = self.slot();
        // Token first, then our receive lock: while we wait for the token, messages
        // of the current holder must still be processed here (spec §4.3 step 1).
        self.step("token NL->EX", self.token, Mode::Ex, 0, None)?;
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let r = self.send_locked(&msg);
        drop(busy);
        let t = self.step("token EX->NL", self.token, Mode::Nl, 0, None);
        r.and(t.map(|_| ()))
    }

    /// Runs `f` while holding the token (no other node sends or writes
    /// superblocks meanwhile), then sends the message `f` returns, if any.
    pub fn under_token<T>(
        &self,
        f: impl FnOnce() -> (T, Option<ClusterMsg>),
    ) -> Result<T, CommsError> {
        let _sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        self.step("token NL->EX", self.token, Mode::Ex, 0, None)?;
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let (value, msg) = f();
        let sent = match msg {
            Some(mut m) => {
                m.slot = self.slot();
                self.send_locked(&m)
            }
            None => Ok(()),
        };
        drop(busy);
        let back = self.step("token EX->NL", self.token, Mode::Nl, 0, None);
        sent?;
        back?;
        Ok(value)
    }

    fn send_locked(&self, msg: &ClusterMsg) -> Result<(), CommsError> {
        let v = flags::VALBLK;
        self.step("message NL->EX", self.message, Mode::Ex, v, None)?;
        let mut lvb = vec![0u8; self.ls.lvb_len()];
        let bytes = msg.encode_u32();
        let n = bytes.len().min(lvb.len());
        lvb[..n].copy_from_slice(&bytes[..n]);
        let r = self
            .step("message EX->CW", self.message, Mode::Cw, v, Some(&lvb))
            .and_then(|_| self.step("ack CR->EX", self.ack, Mode::Ex, 0, None))
            .and_then(|_| self.step("ack EX->CR", self.ack, Mode::Cr, 0, None));
        // Always let receivers finish: message back to NL (retried, spec step 6).
        let mut back = self.step("message ->NL", self.message, Mode::Nl, v, None);
        for _ in 0..3 {
            if back.is_ok() {
                break;
            }
            back = self.step("message ->NL", self.message, Mode::Nl, v, None);
        }
        r.map(|_| ()).and(back.map(|_| ()))
    }

    fn receive_loop(&self, basts: Receiver<()>, mut handler: Handler) {
        for () in basts.iter() {
            let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = self.receive_one(&mut handler) {
                warn!("cluster message receive failed: {e}");
            }
        }
    }

    fn receive_one(&self, handler: &mut Handler) -> Result<(), CommsError> {
        let v = flags::VALBLK;
        let lvb = self.step("message NL->CR", self.message, Mode::Cr, v, None)?;
        match lvb.as_deref().map(ClusterMsg::decode_u32) {
            Some(Ok(m)) if m.slot == self.slot() => {
                warn!("ignoring a message carrying our own slot {}", m.slot)
            }
            Some(Ok(m)) => handler(m),
            Some(Err(e)) => warn!("unreadable cluster message ({e}); acknowledging it"),
            None => warn!("cluster message without an LVB; acknowledging it"),
        }
        // Acknowledge even unknown or unreadable messages (spec §4.4).
        self.step("ack CR->NL", self.ack, Mode::Nl, 0, None)?;
        self.step("message CR->PR", self.message, Mode::Pr, v, None)?;
        self.step("ack NL->CR", self.ack, Mode::Cr, 0, None)?;
        self.step("message PR->NL", self.message, Mode::Nl, v, None)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;

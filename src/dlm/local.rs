//! The in-process lock manager: several members (nodes) of named lockspaces in one
//! process, for tests and for a single node.

use super::engine::{Effect, Engine, NodeId};
use super::{DlmError, Event, LockId, LockSpace, Mode};
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

struct Space {
    engine: Engine,
    members: HashMap<NodeId, Sender<Event>>,
}

#[derive(Default)]
struct Inner {
    spaces: HashMap<String, Space>,
    next_node: NodeId,
}

/// An in-process lock manager.
#[derive(Clone, Default)]
pub struct LocalDlm {
    inner: Arc<Mutex<Inner>>,
}

/// One member of a lockspace of a [`LocalDlm`]; leaving (drop) releases its locks.
pub struct LocalMember {
    dlm: LocalDlm,
    space: String,
    node: NodeId,
    lvb_len: usize,
    events: Receiver<Event>,
}

fn deliver(space: &Space, effects: Vec<Effect>) {
    for e in effects {
        let (node, ev) = match e {
            Effect::Ast {
                node,
                lock,
                status,
                lvb,
                lvb_invalid,
            } => (
                node,
                Event::Ast {
                    lock,
                    status,
                    lvb,
                    lvb_invalid,
                },
            ),
            Effect::Bast { node, lock, mode } => (
                node,
                Event::Bast {
                    lock,
                    mode: Some(mode),
                },
            ),
        };
        if let Some(tx) = space.members.get(&node) {
            let _ = tx.send(ev);
        }
    }
}

impl LocalDlm {
    /// A new, empty lock manager.
    pub fn new() -> LocalDlm {
        LocalDlm::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins lockspace `name` (created with `lvb_len`-byte LVBs by its first member)
    /// as a new node.
    pub fn join(&self, name: &str, lvb_len: usize) -> LocalMember {
        let mut g = self.lock();
        g.next_node += 1;
        let node = g.next_node;
        let (tx, rx) = unbounded();
        let space = g.spaces.entry(name.to_string()).or_insert_with(|| Space {
            engine: Engine::new(lvb_len),
            members: HashMap::new(),
        });
        for (&id, other) in &space.members {
            let _ = other.send(Event::NodeUp(node));
            // The newcomer learns who is there already, as a CPG join shows.
            let _ = tx.send(Event::NodeUp(id));
        }
        space.members.insert(node, tx);
        let lvb_len = space.engine.lvb_len();
        LocalMember {
            dlm: self.clone(),
            space: name.to_string(),
            node,
            lvb_len,
            events: rx,
        }
    }

    /// Kills `node` of lockspace `space`, as if its host died: its locks are
    /// released and the others are told. Its handle gets errors from then on.
    pub fn kill(&self, space: &str, node: NodeId) {
        self.leave(space, node)
    }

    /// Lockspace `space` dies with its lock manager: every lock in it is gone at
    /// once (no member is granted what another held), every member's events end
    /// and its requests fail from then on. A member joining afterwards starts the
    /// lockspace afresh, as on a restarted lock manager.
    pub fn stop(&self, space: &str) {
        self.lock().spaces.remove(space);
    }

    fn leave(&self, space_name: &str, node: NodeId) {
        let mut g = self.lock();
        let Some(space) = g.spaces.get_mut(space_name) else {
            return;
        };
        if space.members.remove(&node).is_none() {
            return;
        }
        let mut out = Vec::new();
        space.engine.purge_node(node, &mut out);
        deliver(space, out);
        for other in space.members.values() {
            let _ = other.send(Event::NodeDown(node));
        }
        if space.members.is_empty() {
            g.spaces.remove(space_name);
        }
    }

    fn with_space<T>(
        &self,
        name: &str,
        node: NodeId,
        f: impl FnOnce(&mut Engine, &mut Vec<Effect>) -> Result<T, super::engine::EngineError>,
    ) -> Result<T, DlmError> {
        let mut g = self.lock();
        let space = g
            .spaces
            .get_mut(name)
            .filter(|s| s.members.contains_key(&node))
            .ok_or_else(|| DlmError::Unavailable(format!("not a member of lockspace {name}")))?;
        let mut out = Vec::new();
        let r = f(&mut space.engine, &mut out);
        deliver(space, out);
        Ok(r?)
    }
}

impl LocalMember {
    /// Leaves the lockspace now (as a crash would): locks are released, others told.
    pub fn kill(self) {
        drop(self)
    }
}

impl Drop for LocalMember {
    fn drop(&mut self) {
        self.dlm.leave(&self.space, self.node);
    }
}

impl LockSpace for LocalMember {
    fn node(&self) -> NodeId {
        self.node
    }

    fn lvb_len(&self) -> usize {
        self.lvb_len
    }

    fn lock(
        &self,
        name: &[u8],
        mode: Mode,
        fl: u32,
        lvb: Option<&[u8]>,
    ) -> Result<LockId, DlmError> {
        let node = self.node;
        self.dlm.with_space(&self.space, node, |e, out| {
            e.request(node, name, mode, fl, lvb, out)
        })
    }

    fn convert(
        &self,
        lock: LockId,
        mode: Mode,
        fl: u32,
        lvb: Option<&[u8]>,
    ) -> Result<(), DlmError> {
        let node = self.node;
        self.dlm.with_space(&self.space, node, |e, out| {
            e.convert(node, lock, mode, fl, lvb, out)
        })
    }

    fn unlock(&self, lock: LockId, fl: u32, lvb: Option<&[u8]>) -> Result<(), DlmError> {
        let node = self.node;
        self.dlm.with_space(&self.space, node, |e, out| {
            e.unlock(node, lock, fl, lvb, out)
        })
    }

    fn events(&self) -> Receiver<Event> {
        self.events.clone()
    }
}

/// Which conversions (by lock name and mode) a [`HoldingMember`] stops at.
#[cfg(test)]
type HoldWhen = Box<dyn Fn(&[u8], Mode) -> bool + Send + Sync>;

/// A member that stops at one conversion (the `nth`, from 0, of those `when`
/// accepts by lock name and mode) until the test lets it go: to put another
/// node's actions at an exact point of this one's protocol.
#[cfg(test)]
pub(crate) struct HoldingMember {
    inner: LocalMember,
    names: Mutex<HashMap<LockId, Vec<u8>>>,
    when: HoldWhen,
    nth: usize,
    seen: std::sync::atomic::AtomicUsize,
    reached: Sender<()>,
    go: Receiver<()>,
}

#[cfg(test)]
impl HoldingMember {
    /// Wraps `inner`; returns the member, a channel told when it stopped, and
    /// the sender that lets it go on.
    pub(crate) fn new(
        inner: LocalMember,
        when: impl Fn(&[u8], Mode) -> bool + Send + Sync + 'static,
        nth: usize,
    ) -> (HoldingMember, Receiver<()>, Sender<()>) {
        let (reached_tx, reached) = unbounded();
        let (go, go_rx) = unbounded();
        let m = HoldingMember {
            inner,
            names: Mutex::new(HashMap::new()),
            when: Box::new(when),
            nth,
            seen: std::sync::atomic::AtomicUsize::new(0),
            reached: reached_tx,
            go: go_rx,
        };
        (m, reached, go)
    }
}

#[cfg(test)]
impl LockSpace for HoldingMember {
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
        let id = self.inner.lock(name, mode, fl, lvb)?;
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, name.to_vec());
        Ok(id)
    }

    fn convert(
        &self,
        lock: LockId,
        mode: Mode,
        fl: u32,
        lvb: Option<&[u8]>,
    ) -> Result<(), DlmError> {
        let name = self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&lock)
            .cloned()
            .unwrap_or_default();
        if (self.when)(&name, mode)
            && self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == self.nth
        {
            let _ = self.reached.send(());
            let _ = self.go.recv();
        }
        self.inner.convert(lock, mode, fl, lvb)
    }

    fn unlock(&self, lock: LockId, fl: u32, lvb: Option<&[u8]>) -> Result<(), DlmError> {
        self.inner.unlock(lock, fl, lvb)
    }

    fn events(&self) -> Receiver<Event> {
        self.inner.events()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlm::{flags, Event, Status};

    const LS: &str = "ls";

    /// The next completion of `lock` among `m`'s events.
    fn completion(m: &LocalMember, lock: LockId) -> Option<Status> {
        m.events().iter().find_map(|e| match e {
            Event::Ast {
                lock: l, status, ..
            } if l == lock => Some(status),
            _ => None,
        })
    }

    #[test]
    fn a_stopped_lockspace_loses_every_lock_at_once_and_starts_afresh() {
        let dlm = LocalDlm::new();
        let a = dlm.join(LS, 32);
        let b = dlm.join(LS, 32);
        let held = a.lock(b"r", Mode::Ex, 0, None).unwrap();
        assert_eq!(completion(&a, held), Some(Status::Granted));
        // b waits for the lock a holds.
        let waiting = b.lock(b"r", Mode::Ex, 0, None).unwrap();
        dlm.stop(LS);
        // Nobody is granted anything: every member's events end.
        assert_eq!(completion(&b, waiting), None);
        assert_eq!(completion(&a, held), None);
        assert!(a.lock(b"s", Mode::Ex, 0, None).is_err());
        assert!(b.unlock(waiting, 0, None).is_err());
        // A new member finds the lock free.
        let c = dlm.join(LS, 32);
        let l = c.lock(b"r", Mode::Ex, flags::NOQUEUE, None).unwrap();
        assert_eq!(completion(&c, l), Some(Status::Granted));
        // The old members leave without touching the new lockspace.
        drop((a, b));
        let d = dlm.join(LS, 32);
        let l = d.lock(b"r", Mode::Ex, flags::NOQUEUE, None).unwrap();
        assert_eq!(completion(&d, l), Some(Status::Again));
    }
}

//! The lock manager's semantics as a pure state machine (no threads, no I/O):
//! the Linux DLM's modes, queues, conversions, LVB rules, blocking callbacks and
//! release of a dead node's locks. The in-process and daemon lock managers drive it
//! and deliver its [`Effect`]s.

use super::{flags, Mode, Status};
use std::collections::{HashMap, VecDeque};

/// A node (a member of the lockspace).
pub type NodeId = u32;
/// A lock, unique in the engine.
pub type LockId = u32;

/// Something a node must be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Completion of a request, conversion, unlock or cancel.
    Ast {
        /// Owner of the lock.
        node: NodeId,
        /// The lock.
        lock: LockId,
        /// Outcome.
        status: Status,
        /// The LVB read on grant (when requested with VALBLK and read).
        lvb: Option<Vec<u8>>,
        /// The resource's LVB is not valid (its last PW/EX holder died).
        lvb_invalid: bool,
    },
    /// Another request is blocked by this lock.
    Bast {
        /// Owner of the blocking lock.
        node: NodeId,
        /// The blocking lock.
        lock: LockId,
        /// The mode requested by the blocked request.
        mode: Mode,
    },
}

impl Effect {
    /// A completion without an LVB.
    fn done(node: NodeId, lock: LockId, status: Status) -> Effect {
        Effect::Ast {
            node,
            lock,
            status,
            lvb: None,
            lvb_invalid: false,
        }
    }
}

/// Why a call was refused at once (no AST follows).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No such lock (or it belongs to another node).
    #[error("no such lock {0}")]
    NoLock(LockId),
    /// The lock already has a request in progress.
    #[error("lock {0} already has a request in progress")]
    Busy(LockId),
    /// The resource name is empty or longer than 64 bytes.
    #[error("resource name must be 1 to 64 bytes")]
    BadName,
    /// Conversion asked on a lock that was never granted, or bad flags.
    #[error("invalid request: {0}")]
    Invalid(&'static str),
}

#[derive(Debug, Clone)]
struct Lock {
    node: NodeId,
    resource: Vec<u8>,
    /// Granted mode (`None` while a new request waits).
    grmode: Option<Mode>,
    /// Requested mode while queued.
    rqmode: Option<Mode>,
    flags: u32,
    /// The LVB the owner supplied with its last request (written on down-conversion).
    lvb: Option<Vec<u8>>,
    /// Highest mode a BAST was sent for since the last grant.
    highbast: Option<Mode>,
}

#[derive(Debug, Default)]
struct Resource {
    /// Empty until a holder first writes it (as the DLM allocates a resource's LVB).
    lvb: Vec<u8>,
    lvb_invalid: bool,
    granted: Vec<LockId>,
    converting: VecDeque<LockId>,
    waiting: VecDeque<LockId>,
}

/// One lockspace's locks.
#[derive(Debug)]
pub struct Engine {
    lvb_len: usize,
    next_id: LockId,
    locks: HashMap<LockId, Lock>,
    resources: HashMap<Vec<u8>, Resource>,
}

impl Engine {
    /// An empty lockspace whose LVBs are `lvb_len` bytes.
    pub fn new(lvb_len: usize) -> Engine {
        Engine {
            lvb_len,
            next_id: 1,
            locks: HashMap::new(),
            resources: HashMap::new(),
        }
    }

    /// LVB size.
    pub fn lvb_len(&self) -> usize {
        self.lvb_len
    }

    /// Number of live locks (for tests).
    pub fn lock_count(&self) -> usize {
        self.locks.len()
    }

    /// Granted mode of a lock.
    pub fn granted_mode(&self, lock: LockId) -> Option<Mode> {
        self.locks.get(&lock).and_then(|l| l.grmode)
    }

    fn fit_lvb(&self, lvb: Option<&[u8]>) -> Option<Vec<u8>> {
        lvb.map(|b| {
            let mut v = vec![0u8; self.lvb_len];
            let n = b.len().min(self.lvb_len);
            v[..n].copy_from_slice(&b[..n]);
            v
        })
    }

    /// A new lock on `name` in `mode`.
    pub fn request(
        &mut self,
        node: NodeId,
        name: &[u8],
        mode: Mode,
        fl: u32,
        lvb: Option<&[u8]>,
        out: &mut Vec<Effect>,
    ) -> Result<LockId, EngineError> {
        if name.is_empty() || name.len() > 64 {
            return Err(EngineError::BadName);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let lvb = self.fit_lvb(lvb);
        self.locks.insert(
            id,
            Lock {
                node,
                resource: name.to_vec(),
                grmode: None,
                rqmode: Some(mode),
                flags: fl,
                lvb,
                highbast: None,
            },
        );
        let res = self.resources.entry(name.to_vec()).or_default();
        let queues_empty = res.converting.is_empty() && res.waiting.is_empty();
        let expedite = fl & flags::EXPEDITE != 0 && mode == Mode::Nl;
        if (queues_empty || expedite) && self.compatible_with_all(name, id, mode) {
            self.grant(id, out);
        } else if fl & flags::NOQUEUE != 0 {
            self.locks.remove(&id);
            self.drop_if_unused(name);
            out.push(Effect::done(node, id, Status::Again));
        } else {
            if let Some(r) = self.resources.get_mut(name) {
                r.waiting.push_back(id);
            }
            self.send_basts(name, id, mode, out);
        }
        Ok(id)
    }

    /// Converts a granted lock to `mode`.
    pub fn convert(
        &mut self,
        node: NodeId,
        id: LockId,
        mode: Mode,
        fl: u32,
        lvb: Option<&[u8]>,
        out: &mut Vec<Effect>,
    ) -> Result<(), EngineError> {
        let lvb = self.fit_lvb(lvb);
        let l = self
            .locks
            .get_mut(&id)
            .filter(|l| l.node == node)
            .ok_or(EngineError::NoLock(id))?;
        if l.rqmode.is_some() {
            return Err(EngineError::Busy(id));
        }
        let Some(gr) = l.grmode else {
            return Err(EngineError::Invalid(
                "conversion of a lock that is not granted",
            ));
        };
        l.rqmode = Some(mode);
        l.flags = fl;
        if lvb.is_some() {
            l.lvb = lvb;
        }
        let name = l.resource.clone();
        if self.compatible_with_all(&name, id, mode) {
            self.grant(id, out);
            self.grant_pending(&name, out);
            return Ok(());
        }
        if fl & flags::NOQUEUE != 0 {
            if let Some(l) = self.locks.get_mut(&id) {
                l.rqmode = None;
            }
            out.push(Effect::done(node, id, Status::Again));
            return Ok(());
        }
        // Conversion deadlock: a queued conversion waits for our granted mode while we
        // would wait for its granted mode.
        let deadlock = self.resources.get(&name).is_some_and(|r| {
            r.converting.iter().any(|&o| {
                let ol = &self.locks[&o];
                match (ol.grmode, ol.rqmode) {
                    (Some(ogr), Some(orq)) => !orq.compatible(gr) && !mode.compatible(ogr),
                    _ => false,
                }
            })
        });
        if deadlock {
            if let Some(l) = self.locks.get_mut(&id) {
                l.rqmode = None;
            }
            out.push(Effect::done(node, id, Status::Deadlock));
            return Ok(());
        }
        if let Some(r) = self.resources.get_mut(&name) {
            r.converting.push_back(id);
        }
        self.send_basts(&name, id, mode, out);
        Ok(())
    }

    /// Unlocks (`flags::FORCEUNLOCK`: whatever its state) or cancels a queued request
    /// (`flags::CANCEL`).
    pub fn unlock(
        &mut self,
        node: NodeId,
        id: LockId,
        fl: u32,
        lvb: Option<&[u8]>,
        out: &mut Vec<Effect>,
    ) -> Result<(), EngineError> {
        let lvb = self.fit_lvb(lvb);
        let l = self
            .locks
            .get(&id)
            .filter(|l| l.node == node)
            .ok_or(EngineError::NoLock(id))?
            .clone();
        let name = l.resource.clone();
        if fl & flags::CANCEL != 0 {
            if l.rqmode.is_none() {
                return Err(EngineError::Invalid("cancel of a lock with nothing queued"));
            }
            if l.grmode.is_some() {
                // A queued conversion goes back to its granted mode.
                if let Some(r) = self.resources.get_mut(&name) {
                    r.converting.retain(|&x| x != id);
                }
                if let Some(lk) = self.locks.get_mut(&id) {
                    lk.rqmode = None;
                }
            } else {
                self.dequeue(&name, id);
                self.locks.remove(&id);
            }
            out.push(Effect::done(node, id, Status::Cancelled));
            self.grant_pending(&name, out);
            self.drop_if_unused(&name);
            return Ok(());
        }
        if l.rqmode.is_some() && fl & flags::FORCEUNLOCK == 0 {
            return Err(EngineError::Busy(id));
        }
        if matches!(l.grmode, Some(Mode::Pw) | Some(Mode::Ex)) && fl & flags::VALBLK != 0 {
            if let (Some(r), Some(v)) = (self.resources.get_mut(&name), lvb.or(l.lvb)) {
                r.lvb = v;
                r.lvb_invalid = false;
            }
        }
        self.dequeue(&name, id);
        self.locks.remove(&id);
        out.push(Effect::done(node, id, Status::Unlocked));
        self.grant_pending(&name, out);
        self.drop_if_unused(&name);
        Ok(())
    }

    /// A node died (or its process exited): every lock it had is removed as DLM
    /// recovery does, LVBs it may have been changing (held in PW or EX) are flagged
    /// not valid (their contents stay, as in the DLM), and queued requests are granted.
    pub fn purge_node(&mut self, node: NodeId, out: &mut Vec<Effect>) {
        let ids: Vec<LockId> = self
            .locks
            .iter()
            .filter(|(_, l)| l.node == node)
            .map(|(&id, _)| id)
            .collect();
        let mut touched = Vec::new();
        for id in ids {
            let Some(l) = self.locks.remove(&id) else {
                continue;
            };
            if matches!(l.grmode, Some(Mode::Pw) | Some(Mode::Ex)) {
                if let Some(r) = self.resources.get_mut(&l.resource) {
                    r.lvb_invalid = true;
                }
            }
            self.dequeue(&l.resource, id);
            touched.push(l.resource);
        }
        touched.sort();
        touched.dedup();
        for name in touched {
            self.grant_pending(&name, out);
            self.drop_if_unused(&name);
        }
    }

    fn dequeue(&mut self, name: &[u8], id: LockId) {
        if let Some(r) = self.resources.get_mut(name) {
            r.granted.retain(|&x| x != id);
            r.converting.retain(|&x| x != id);
            r.waiting.retain(|&x| x != id);
        }
    }

    fn drop_if_unused(&mut self, name: &[u8]) {
        let unused = self.resources.get(name).is_some_and(|r| {
            r.granted.is_empty() && r.converting.is_empty() && r.waiting.is_empty()
        });
        if unused {
            self.resources.remove(name);
        }
    }

    /// Whether `mode` for lock `id` is compatible with the granted mode of every
    /// other lock on the resource (granted or converting).
    fn compatible_with_all(&self, name: &[u8], id: LockId, mode: Mode) -> bool {
        let Some(r) = self.resources.get(name) else {
            return true;
        };
        r.granted
            .iter()
            .chain(r.converting.iter())
            .filter(|&&o| o != id)
            .all(|o| self.locks[o].grmode.is_none_or(|g| mode.compatible(g)))
    }

    fn grant(&mut self, id: LockId, out: &mut Vec<Effect>) {
        let Some(l) = self.locks.get(&id) else { return };
        let name = l.resource.clone();
        let (gr, rq, fl, node) = (l.grmode, l.rqmode, l.flags, l.node);
        let Some(rq) = rq else { return };
        let lvb_len = self.lvb_len;
        let res = self.resources.entry(name.clone()).or_default();
        let mut read = None;
        let mut invalid = false;
        if fl & flags::VALBLK != 0 && lvb_len > 0 {
            let write = matches!(gr, Some(Mode::Ex)) || (gr == Some(Mode::Pw) && rq != Mode::Ex);
            if write {
                if let Some(v) = &self.locks[&id].lvb {
                    res.lvb = v.clone();
                    res.lvb_invalid = false;
                }
            } else if gr.is_none_or(|g| rq >= g) {
                // An LVB never written reads as zeros and is never flagged: the DLM
                // only reports VALNOTVALID for a resource that has an LVB.
                if res.lvb.len() == lvb_len {
                    read = Some(res.lvb.clone());
                    invalid = res.lvb_invalid;
                } else {
                    read = Some(vec![0; lvb_len]);
                }
            }
        }
        res.converting.retain(|&x| x != id);
        res.waiting.retain(|&x| x != id);
        if !res.granted.contains(&id) {
            res.granted.push(id);
        }
        if let Some(l) = self.locks.get_mut(&id) {
            l.grmode = Some(rq);
            l.rqmode = None;
            l.highbast = None;
            if let Some(v) = &read {
                l.lvb = Some(v.clone());
            }
        }
        out.push(Effect::Ast {
            node,
            lock: id,
            status: Status::Granted,
            lvb: read,
            lvb_invalid: invalid,
        });
    }

    /// Grants what became grantable: conversions first (repeatedly), then waiting
    /// requests in order, stopping at the first that cannot be granted.
    fn grant_pending(&mut self, name: &[u8], out: &mut Vec<Effect>) {
        loop {
            let Some(r) = self.resources.get(name) else {
                return;
            };
            let next = r.converting.iter().copied().find(|&id| {
                self.locks[&id]
                    .rqmode
                    .is_some_and(|m| self.compatible_with_all(name, id, m))
            });
            match next {
                Some(id) => self.grant(id, out),
                None => break,
            }
        }
        loop {
            let Some(r) = self.resources.get(name) else {
                return;
            };
            if !r.converting.is_empty() {
                return;
            }
            let Some(&id) = r.waiting.front() else { return };
            let Some(m) = self.locks[&id].rqmode else {
                return;
            };
            if !self.compatible_with_all(name, id, m) {
                return;
            }
            self.grant(id, out);
        }
    }

    /// Tells every holder that blocks `mode` for lock `id`, once per mode.
    fn send_basts(&mut self, name: &[u8], id: LockId, mode: Mode, out: &mut Vec<Effect>) {
        let Some(r) = self.resources.get(name) else {
            return;
        };
        let holders: Vec<LockId> = r
            .granted
            .iter()
            .chain(r.converting.iter())
            .copied()
            .filter(|&o| o != id)
            .collect();
        for o in holders {
            let Some(l) = self.locks.get_mut(&o) else {
                continue;
            };
            let Some(g) = l.grmode else { continue };
            if mode.compatible(g) || l.highbast.is_some_and(|h| h >= mode) {
                continue;
            }
            l.highbast = Some(mode);
            out.push(Effect::Bast {
                node: l.node,
                lock: o,
                mode,
            });
        }
    }
}

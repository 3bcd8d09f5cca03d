//! `lockd`: the lock manager of one host, shared by several processes over a unix
//! socket. Each connection is one node of the lockspace it names; a connection that
//! drops (the process died) is a dead node: its locks are released as DLM recovery
//! releases them and the other members are told.
//!
//! Wire format: frames of a little-endian u32 length followed by that many bytes of
//! JSON. A frame longer than [`MAX_FRAME`], or one that does not parse, ends that
//! client's connection and nothing else.

use super::local::LocalDlm;
use super::{DlmError, Event, LockId, LockSpace, Mode, NodeId, Status};
use crate::unixsock::{peer_pid, Bound, Perms, SocketError};
use crossbeam_channel::{unbounded, Receiver, Sender};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest frame accepted.
pub const MAX_FRAME: usize = 64 * 1024;
/// How long a client waits for an answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Client to daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Join a lockspace (first frame of a connection).
    Hello {
        /// Lockspace name.
        lockspace: String,
        /// LVB size wanted (the first member decides).
        lvb_len: usize,
    },
    /// New lock.
    Lock {
        /// Call number.
        seq: u64,
        /// Resource name.
        name: Vec<u8>,
        /// Mode (0..=5).
        mode: u32,
        /// Flags.
        flags: u32,
        /// LVB.
        lvb: Option<Vec<u8>>,
    },
    /// Conversion.
    Convert {
        /// Call number.
        seq: u64,
        /// The lock.
        lock: LockId,
        /// Mode.
        mode: u32,
        /// Flags.
        flags: u32,
        /// LVB.
        lvb: Option<Vec<u8>>,
    },
    /// Unlock or cancel.
    Unlock {
        /// Call number.
        seq: u64,
        /// The lock.
        lock: LockId,
        /// Flags.
        flags: u32,
        /// LVB.
        lvb: Option<Vec<u8>>,
    },
}

/// Daemon to client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Message {
    /// Answer to `Hello`.
    Welcome {
        /// Our node id.
        node: NodeId,
        /// The lockspace's LVB size.
        lvb_len: usize,
    },
    /// Answer to a call.
    Reply {
        /// Call number.
        seq: u64,
        /// The new lock (for `Lock`).
        lock: Option<LockId>,
        /// Why it was refused.
        error: Option<String>,
    },
    /// Completion.
    Ast {
        /// The lock.
        lock: LockId,
        /// 0 granted, 1 again, 2 deadlock, 3 unlocked, 4 cancelled.
        status: u32,
        /// LVB read.
        lvb: Option<Vec<u8>>,
        /// LVB not valid.
        lvb_invalid: bool,
    },
    /// Blocking callback.
    Bast {
        /// The lock.
        lock: LockId,
        /// Blocked mode.
        mode: Option<u32>,
    },
    /// A member joined.
    NodeUp {
        /// Its id.
        node: NodeId,
    },
    /// A member died or left.
    NodeDown {
        /// Its id.
        node: NodeId,
    },
}

fn status_code(s: Status) -> u32 {
    match s {
        Status::Granted => 0,
        Status::Again => 1,
        Status::Deadlock => 2,
        Status::Unlocked => 3,
        Status::Cancelled => 4,
    }
}

fn status_of(c: u32) -> Option<Status> {
    Some(match c {
        0 => Status::Granted,
        1 => Status::Again,
        2 => Status::Deadlock,
        3 => Status::Unlocked,
        4 => Status::Cancelled,
        _ => return None,
    })
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {n} bytes is larger than {MAX_FRAME}"),
        ));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The daemon.
pub struct Daemon {
    listener: UnixListener,
    dlm: LocalDlm,
}

impl Daemon {
    /// Listens on `path` with mode 0600, or 0660 and the given group; replaces only
    /// a stale socket, never another daemon's. The path is removed when the
    /// returned [`Bound`] is dropped.
    pub fn bind(path: &Path, group: Option<u32>) -> Result<(Daemon, Bound), SocketError> {
        let perms = Perms {
            mode: if group.is_some() { 0o660 } else { 0o600 },
            uid: None,
            gid: group,
        };
        let (listener, bound) = crate::unixsock::listen(path, perms)?;
        Ok((
            Daemon {
                listener,
                dlm: LocalDlm::new(),
            },
            bound,
        ))
    }

    /// Serves clients until the process ends.
    pub fn run(self) {
        for conn in self.listener.incoming() {
            match conn {
                Ok(c) => {
                    let dlm = self.dlm.clone();
                    let spawned = std::thread::Builder::new()
                        .name("lockd-client".into())
                        .spawn(move || serve_client(dlm, c));
                    if let Err(e) = spawned {
                        warn!("cannot start a client thread: {e}");
                    }
                }
                Err(e) => warn!("accept: {e}"),
            }
        }
    }
}

fn to_message(e: Event) -> Message {
    match e {
        Event::Ast {
            lock,
            status,
            lvb,
            lvb_invalid,
        } => Message::Ast {
            lock,
            status: status_code(status),
            lvb,
            lvb_invalid,
        },
        Event::Bast { lock, mode } => Message::Bast {
            lock,
            mode: mode.map(|m| m as u32),
        },
        Event::NodeUp(node) => Message::NodeUp { node },
        Event::NodeDown(node) => Message::NodeDown { node },
    }
}

fn serve_client(dlm: LocalDlm, conn: UnixStream) {
    let peer = peer_pid(&conn)
        .map(|p| format!("pid {p}"))
        .unwrap_or_else(|| "unknown peer".into());
    let mut reader = match conn.try_clone() {
        Ok(r) => r,
        Err(e) => {
            warn!("{peer}: {e}");
            return;
        }
    };
    let writer = Arc::new(Mutex::new(conn));
    // The first frame must say which lockspace.
    let hello: Option<Request> = match read_frame(&mut reader) {
        Ok(h) => h,
        Err(e) => {
            warn!("{peer}: dropped: {e}");
            return;
        }
    };
    let Some(Request::Hello { lockspace, lvb_len }) = hello else {
        warn!("{peer}: dropped: the first frame must be hello");
        return;
    };
    if lockspace.is_empty() || lockspace.len() > 64 || lvb_len == 0 || lvb_len > 64 {
        warn!("{peer}: dropped: bad lockspace name or LVB size");
        return;
    }
    let member = dlm.join(&lockspace, lvb_len);
    let node = member.node();
    info!("{peer} joined lockspace {lockspace} as node {node}");
    let send = |w: &Arc<Mutex<UnixStream>>, m: &Message| -> io::Result<()> {
        let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *g, m)
    };
    if send(
        &writer,
        &Message::Welcome {
            node,
            lvb_len: member.lvb_len(),
        },
    )
    .is_err()
    {
        return;
    }
    let events = member.events();
    let w2 = writer.clone();
    let forward = std::thread::Builder::new()
        .name("lockd-events".into())
        .spawn(move || {
            for e in events.iter() {
                let mut g = w2.lock().unwrap_or_else(|e| e.into_inner());
                if write_frame(&mut *g, &to_message(e)).is_err() {
                    break;
                }
            }
        });
    if forward.is_err() {
        return;
    }
    loop {
        let req: Request = match read_frame(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                warn!("{peer} (node {node}): dropped: {e}");
                break;
            }
        };
        let (seq, r) = match req {
            Request::Hello { .. } => {
                warn!("{peer} (node {node}): dropped: second hello");
                break;
            }
            Request::Lock {
                seq,
                name,
                mode,
                flags,
                lvb,
            } => (
                seq,
                Mode::from_u32(mode)
                    .ok_or(DlmError::Rejected(format!("bad mode {mode}")))
                    .and_then(|m| member.lock(&name, m, flags, lvb.as_deref()).map(Some)),
            ),
            Request::Convert {
                seq,
                lock,
                mode,
                flags,
                lvb,
            } => (
                seq,
                Mode::from_u32(mode)
                    .ok_or(DlmError::Rejected(format!("bad mode {mode}")))
                    .and_then(|m| {
                        member
                            .convert(lock, m, flags, lvb.as_deref())
                            .map(|()| None)
                    }),
            ),
            Request::Unlock {
                seq,
                lock,
                flags,
                lvb,
            } => (
                seq,
                member.unlock(lock, flags, lvb.as_deref()).map(|()| None),
            ),
        };
        let reply = match r {
            Ok(lock) => Message::Reply {
                seq,
                lock,
                error: None,
            },
            Err(e) => Message::Reply {
                seq,
                lock: None,
                error: Some(e.to_string()),
            },
        };
        if send(&writer, &reply).is_err() {
            break;
        }
    }
    info!("node {node} ({peer}) left lockspace {lockspace}");
    drop(member);
    let w = writer.lock().unwrap_or_else(|e| e.into_inner());
    let _ = w.shutdown(std::net::Shutdown::Both);
}

/// A member of a lockspace on a `lockd` daemon.
pub struct LockdMember {
    node: NodeId,
    lvb_len: usize,
    writer: Mutex<UnixStream>,
    seq: Mutex<u64>,
    calls: Arc<Mutex<HashMap<u64, Sender<Message>>>>,
    events: Receiver<Event>,
    loss: Arc<Loss>,
    daemon_pid: Option<i32>,
    /// Disconnected once the reader thread has seen the connection end.
    reader_done: Receiver<()>,
}

/// Called once when the connection to the daemon is lost (with the reason).
pub type OnLost = Box<dyn FnOnce(String) + Send>;

/// What happens when the daemon goes away: every lock of the member is gone with
/// it (a restarted daemon knows none of them).
#[derive(Default)]
struct Loss {
    /// We closed the connection ourselves: not a loss.
    closing: std::sync::atomic::AtomicBool,
    /// The reason once the connection is gone, and who to tell (until told).
    state: Mutex<(Option<String>, Option<OnLost>)>,
}

impl Loss {
    fn lost(&self, why: String) {
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let f = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.0 = Some(why.clone());
            st.1.take()
        };
        if let Some(f) = f {
            f(why);
        }
    }

    fn on_lost(&self, f: OnLost) {
        let why = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match &st.0 {
                Some(why) => why.clone(),
                None => {
                    st.1 = Some(f);
                    return;
                }
            }
        };
        f(why);
    }
}

impl LockdMember {
    /// Connects to the daemon at `path` and joins `lockspace`.
    pub fn connect(path: &Path, lockspace: &str, lvb_len: usize) -> Result<LockdMember, DlmError> {
        let unavailable =
            |e: io::Error| DlmError::Unavailable(format!("lockd at {}: {e}", path.display()));
        let mut conn = UnixStream::connect(path).map_err(unavailable)?;
        write_frame(
            &mut conn,
            &Request::Hello {
                lockspace: lockspace.to_string(),
                lvb_len,
            },
        )
        .map_err(unavailable)?;
        conn.set_read_timeout(Some(CALL_TIMEOUT))
            .map_err(unavailable)?;
        let welcome: Option<Message> = read_frame(&mut conn).map_err(unavailable)?;
        let Some(Message::Welcome { node, lvb_len }) = welcome else {
            return Err(DlmError::Unavailable("lockd did not welcome us".into()));
        };
        conn.set_read_timeout(None).map_err(unavailable)?;
        let daemon_pid = peer_pid(&conn);
        let mut reader = conn.try_clone().map_err(unavailable)?;
        let calls: Arc<Mutex<HashMap<u64, Sender<Message>>>> = Arc::default();
        let (tx, rx) = unbounded();
        let calls2 = calls.clone();
        let loss = Arc::new(Loss::default());
        let loss2 = loss.clone();
        let daemon = path.display().to_string();
        let (done_tx, reader_done) = crossbeam_channel::bounded::<()>(0);
        std::thread::Builder::new()
            .name("lockd-client".into())
            .spawn(move || {
                let _done = done_tx;
                let why = loop {
                    let m = match read_frame::<Message>(&mut reader) {
                        Ok(Some(m)) => m,
                        Ok(None) => break format!("lockd at {daemon} closed the connection"),
                        Err(e) => break format!("connection to lockd at {daemon}: {e}"),
                    };
                    let ev = match m {
                        Message::Reply { seq, .. } => {
                            let waiter = calls2.lock().ok().and_then(|mut c| c.remove(&seq));
                            if let Some(w) = waiter {
                                let _ = w.send(m);
                            }
                            continue;
                        }
                        Message::Ast {
                            lock,
                            status,
                            lvb,
                            lvb_invalid,
                        } => match status_of(status) {
                            Some(status) => Event::Ast {
                                lock,
                                status,
                                lvb,
                                lvb_invalid,
                            },
                            None => continue,
                        },
                        Message::Bast { lock, mode } => Event::Bast {
                            lock,
                            mode: mode.and_then(Mode::from_u32),
                        },
                        Message::NodeUp { node } => Event::NodeUp(node),
                        Message::NodeDown { node } => Event::NodeDown(node),
                        Message::Welcome { .. } => continue,
                    };
                    if tx.send(ev).is_err() {
                        break "the member was dropped".to_string();
                    }
                };
                // Nobody waits for an answer that cannot come any more.
                calls2.lock().unwrap_or_else(|e| e.into_inner()).clear();
                loss2.lost(why);
            })
            .map_err(unavailable)?;
        debug!("joined lockspace {lockspace} on lockd as node {node}");
        Ok(LockdMember {
            node,
            lvb_len,
            writer: Mutex::new(conn),
            seq: Mutex::new(0),
            calls,
            events: rx,
            loss,
            daemon_pid,
            reader_done,
        })
    }

    /// The daemon's process id, as the kernel told it at connect time.
    pub fn daemon_pid(&self) -> Option<i32> {
        self.daemon_pid
    }

    /// Calls `f` once if the connection to the daemon is lost (at once if it is
    /// already): every lock of this member is gone then, and a node that goes on
    /// writing as if it held them may write beside a node that was granted them.
    pub fn on_lost(&self, f: OnLost) {
        self.loss.on_lost(f);
    }

    fn call(&self, make: impl FnOnce(u64) -> Request) -> Result<Option<LockId>, DlmError> {
        let seq = {
            let mut s = self.seq.lock().unwrap_or_else(|e| e.into_inner());
            *s += 1;
            *s
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seq, tx);
        {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            write_frame(&mut *w, &make(seq))
                .map_err(|e| DlmError::Unavailable(format!("lockd: {e}")))?;
        }
        match rx.recv_timeout(CALL_TIMEOUT) {
            Ok(Message::Reply {
                error: None, lock, ..
            }) => Ok(lock),
            Ok(Message::Reply { error: Some(e), .. }) => Err(DlmError::Rejected(e)),
            _ => Err(DlmError::Unavailable("lockd did not answer".into())),
        }
    }

    /// Closes the connection now, as a dying process would: the daemon releases
    /// the member's locks when it notices, a moment later.
    pub fn disconnect(&self) {
        self.loss
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let _ = w.shutdown(std::net::Shutdown::Both);
    }

    /// Leaves the lockspace and waits (up to [`LEAVE_WAIT`]) until the daemon has
    /// released the member's locks and closed its end, so that a lock this process
    /// held is free when `drop` returns — as closing the kernel DLM's device is.
    fn leave(&self) {
        self.loss
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        {
            let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            if w.shutdown(std::net::Shutdown::Write).is_err() {
                return;
            }
        }
        // Nothing is ever sent: the reader thread's end disconnects the channel.
        let _ = self.reader_done.recv_timeout(LEAVE_WAIT);
        self.disconnect();
    }
}

/// How long dropping a member waits for the daemon to release its locks.
pub const LEAVE_WAIT: Duration = Duration::from_secs(2);

impl Drop for LockdMember {
    fn drop(&mut self) {
        self.leave();
    }
}

impl LockSpace for LockdMember {
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
        flags: u32,
        lvb: Option<&[u8]>,
    ) -> Result<LockId, DlmError> {
        self.call(|seq| Request::Lock {
            seq,
            name: name.to_vec(),
            mode: mode as u32,
            flags,
            lvb: lvb.map(<[u8]>::to_vec),
        })?
        .ok_or_else(|| DlmError::Unavailable("lockd returned no lock id".into()))
    }

    fn convert(
        &self,
        lock: LockId,
        mode: Mode,
        flags: u32,
        lvb: Option<&[u8]>,
    ) -> Result<(), DlmError> {
        self.call(|seq| Request::Convert {
            seq,
            lock,
            mode: mode as u32,
            flags,
            lvb: lvb.map(<[u8]>::to_vec),
        })
        .map(|_| ())
    }

    fn unlock(&self, lock: LockId, flags: u32, lvb: Option<&[u8]>) -> Result<(), DlmError> {
        self.call(|seq| Request::Unlock {
            seq,
            lock,
            flags,
            lvb: lvb.map(<[u8]>::to_vec),
        })
        .map(|_| ())
    }

    fn events(&self) -> Receiver<Event> {
        self.events.clone()
    }
}

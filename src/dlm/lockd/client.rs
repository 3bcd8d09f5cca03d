//! A process's connection to `lockd`: one member of one lockspace.

use super::wire::*;
use crate::dlm::{DlmError, Event, LockId, LockSpace, Mode, NodeId};
use crate::unixsock::peer_pid;
use crossbeam_channel::{unbounded, Receiver, Sender};
use log::debug;
use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        let (node, lvb_len) = match welcome {
            Some(Message::Welcome { node, lvb_len }) => (node, lvb_len),
            Some(Message::Refused { why }) => {
                return Err(DlmError::Recovering(format!(
                    "lockd at {}: {why}",
                    path.display()
                )))
            }
            _ => return Err(DlmError::Unavailable("lockd did not welcome us".into())),
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
                        Message::Welcome { .. } | Message::Refused { .. } => continue,
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

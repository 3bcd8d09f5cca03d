//! The daemon: one thread per client connection, each a node of its lockspace.

use super::recovery::{Process, Recovery};
use super::wire::*;
use crate::dlm::local::LocalDlm;
use crate::dlm::{DlmError, Event, LockSpace, Mode};
use crate::unixsock::{peer_pid, Bound, Perms, SocketError};
use log::{info, warn};
use std::io::{self};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The daemon.
pub struct Daemon {
    listener: UnixListener,
    dlm: LocalDlm,
    recovery: Arc<Recovery>,
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
                recovery: Arc::new(Recovery::load(path)),
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
                    let recovery = self.recovery.clone();
                    let spawned = std::thread::Builder::new()
                        .name("lockd-client".into())
                        .spawn(move || serve_client(dlm, &recovery, c));
                    if let Err(e) = spawned {
                        warn!("cannot start a client thread: {e}");
                    }
                }
                Err(e) => {
                    warn!("accept: {e}");
                    // Out of file descriptors (or another lasting error): the
                    // client waits in the backlog instead of this thread spinning.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
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

fn serve_client(dlm: LocalDlm, recovery: &Recovery, conn: UnixStream) {
    let pid = peer_pid(&conn);
    let peer = pid
        .map(|p| format!("pid {p}"))
        .unwrap_or_else(|| "unknown peer".into());
    let who = pid.and_then(Process::of);
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
    let send = |w: &Arc<Mutex<UnixStream>>, m: &Message| -> io::Result<()> {
        let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
        write_frame(&mut *g, m)
    };
    if let Err(why) = recovery.admit(&lockspace, who) {
        warn!("{peer}: not admitted: {why}");
        let _ = send(&writer, &Message::Refused { why });
        return;
    }
    let member = dlm.join(&lockspace, lvb_len);
    let node = member.node();
    info!("{peer} joined lockspace {lockspace} as node {node}");
    if let Some(p) = who {
        recovery.joined(&lockspace, p);
    }
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
    if let Some(p) = who {
        recovery.left(&lockspace, p);
    }
    let w = writer.lock().unwrap_or_else(|e| e.into_inner());
    let _ = w.shutdown(std::net::Shutdown::Both);
}

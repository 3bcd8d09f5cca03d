//! The frames between `lockd` and its clients: requests, answers and events.

use crate::dlm::{LockId, NodeId, Status};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::time::Duration;

/// Largest frame accepted.
pub const MAX_FRAME: usize = 64 * 1024;
/// How long a client waits for an answer.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Answer to `Hello`: not admitted into the lockspace now (the connection
    /// closes).
    Refused {
        /// Why.
        why: String,
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

pub(super) fn status_code(s: Status) -> u32 {
    match s {
        Status::Granted => 0,
        Status::Again => 1,
        Status::Deadlock => 2,
        Status::Unlocked => 3,
        Status::Cancelled => 4,
    }
}

pub(super) fn status_of(c: u32) -> Option<Status> {
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

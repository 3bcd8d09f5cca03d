//! The lock manager layer: the Linux DLM's semantics behind one trait, so the
//! cluster protocol runs the same on the in-process lock manager (one host) and on
//! the real DLM.

pub mod cpg;
pub mod engine;
pub mod libdlm;
pub mod local;
pub mod lockd;
pub mod stack;

pub use engine::{LockId, NodeId};

/// Lock modes, weakest first (values as in the DLM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Null.
    Nl = 0,
    /// Concurrent read.
    Cr = 1,
    /// Concurrent write.
    Cw = 2,
    /// Protected read.
    Pr = 3,
    /// Protected write.
    Pw = 4,
    /// Exclusive.
    Ex = 5,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 6] = [Mode::Nl, Mode::Cr, Mode::Cw, Mode::Pr, Mode::Pw, Mode::Ex];

    /// Whether a lock in `self` can be granted while another holds `granted`.
    pub fn compatible(self, granted: Mode) -> bool {
        const M: [[bool; 6]; 6] = [
            [true, true, true, true, true, true],
            [true, true, true, true, true, false],
            [true, true, true, false, false, false],
            [true, true, false, true, false, false],
            [true, true, false, false, false, false],
            [true, false, false, false, false, false],
        ];
        M[granted as usize][self as usize]
    }

    /// Whether a grant of `to` to a lock granted in `from` (`None`: a new request)
    /// reads the resource's LVB into the caller's buffer (with VALBLK; spec §8.2).
    /// The other transitions write it (down from PW/EX) or leave it alone.
    pub fn lvb_read(from: Option<Mode>, to: Mode) -> bool {
        match from {
            None => true,
            Some(Mode::Pw) => to == Mode::Ex,
            Some(Mode::Ex) => false,
            Some(g) => to >= g,
        }
    }

    /// From the DLM value.
    pub fn from_u32(v: u32) -> Option<Mode> {
        Mode::ALL.get(v as usize).copied()
    }
}

/// Request flags (values as in the DLM).
pub mod flags {
    /// Fail with `Again` instead of queueing.
    pub const NOQUEUE: u32 = 0x1;
    /// Cancel a queued request (unlock).
    pub const CANCEL: u32 = 0x2;
    /// Convert an existing lock.
    pub const CONVERT: u32 = 0x4;
    /// Read/write the lock value block.
    pub const VALBLK: u32 = 0x8;
    /// Grant NL at once, ignoring the queues.
    pub const EXPEDITE: u32 = 0x400;
    /// Unlock whatever the lock's state.
    pub const FORCEUNLOCK: u32 = 0x20000;
}

/// Outcome of a request, delivered in its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Granted.
    Granted,
    /// Not grantable now and NOQUEUE was given (EAGAIN).
    Again,
    /// Conversion deadlock (EDEADLK).
    Deadlock,
    /// Unlocked (EUNLOCK).
    Unlocked,
    /// Cancelled (ECANCEL).
    Cancelled,
}

/// What a lockspace member is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A request, conversion, unlock or cancel completed.
    Ast {
        /// The lock.
        lock: LockId,
        /// Outcome.
        status: Status,
        /// The lock value block read on grant (with VALBLK).
        lvb: Option<Vec<u8>>,
        /// The LVB is not valid (its last PW/EX holder died).
        lvb_invalid: bool,
    },
    /// A lock of ours blocks another request.
    Bast {
        /// Our lock.
        lock: LockId,
        /// The blocked mode, when the lock manager says it.
        mode: Option<Mode>,
    },
    /// Another member joined.
    NodeUp(NodeId),
    /// Another member died or left; its locks are gone.
    NodeDown(NodeId),
}

/// Errors of the lock manager layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DlmError {
    /// Refused at once by the lock manager.
    #[error(transparent)]
    Refused(#[from] engine::EngineError),
    /// Refused by a remote lock manager.
    #[error("refused: {0}")]
    Rejected(String),
    /// The lock manager is gone.
    #[error("the lock manager is not available: {0}")]
    Unavailable(String),
    /// The lockspace waits for members its lock manager had before it died to
    /// come back or be gone (see `lockd`); joining later works.
    #[error("not admitted yet: {0}")]
    Recovering(String),
}

/// One member's view of a lockspace. Completions and callbacks arrive as [`Event`]s.
pub trait LockSpace: Send + Sync {
    /// This member's node id.
    fn node(&self) -> NodeId;
    /// Bytes of a lock value block in this lockspace.
    fn lvb_len(&self) -> usize;
    /// Requests a new lock on `name`; the outcome arrives as an `Ast` event.
    fn lock(
        &self,
        name: &[u8],
        mode: Mode,
        flags: u32,
        lvb: Option<&[u8]>,
    ) -> Result<LockId, DlmError>;
    /// Converts a granted lock; the outcome arrives as an `Ast` event.
    fn convert(
        &self,
        lock: LockId,
        mode: Mode,
        flags: u32,
        lvb: Option<&[u8]>,
    ) -> Result<(), DlmError>;
    /// Unlocks or cancels (`flags::CANCEL`, `flags::FORCEUNLOCK`); an `Ast` follows.
    fn unlock(&self, lock: LockId, flags: u32, lvb: Option<&[u8]>) -> Result<(), DlmError>;
    /// The stream of events for this member.
    fn events(&self) -> crossbeam_channel::Receiver<Event>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvb_read_follows_the_dlm_table() {
        // dlm_lvb_operations[granted + 1][requested + 1] == 1 (fs/dlm/lvb_table.c):
        // rows none (new request), NL, CR, CW, PR, PW, EX; columns NL .. EX.
        const READ: [[bool; 6]; 7] = [
            [true; 6],
            [true; 6],
            [false, true, true, true, true, true],
            [false, false, true, true, true, true],
            [false, false, false, true, true, true],
            [false, false, false, false, false, true],
            [false; 6],
        ];
        let froms = std::iter::once(None).chain(Mode::ALL.map(Some));
        for (row, from) in froms.enumerate() {
            for to in Mode::ALL {
                assert_eq!(
                    Mode::lvb_read(from, to),
                    READ[row][to as usize],
                    "{from:?} -> {to:?}"
                );
            }
        }
    }
}

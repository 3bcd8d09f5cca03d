//! `lockd`: the lock manager of one host, shared by several processes over a unix
//! socket. Each connection is one node of the lockspace it names; a connection that
//! drops (the process died) is a dead node: its locks are released as DLM recovery
//! releases them and the other members are told.
//!
//! Wire format: frames of a little-endian u32 length followed by that many bytes of
//! JSON. A frame longer than [`MAX_FRAME`], or one that does not parse, ends that
//! client's connection and nothing else.

mod client;
mod daemon;
mod recovery;
mod wire;

pub use client::{LockdMember, OnLost, LEAVE_WAIT};
pub use daemon::Daemon;
pub use wire::{read_frame, write_frame, Message, Request, MAX_FRAME};

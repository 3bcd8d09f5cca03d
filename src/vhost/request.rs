//! virtio-blk requests: parse a descriptor chain from guest memory, run it on the
//! mirror, write the status byte. Every malformed chain ends in a status
//! (IOERR/UNSUPP) when there is a place to write one, never in a panic.

use crate::raid1::Array;
use log::{debug, warn};
use std::io::{IoSlice, IoSliceMut};
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Request types (virtio 1.2, 5.2.6).
pub mod kind {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device id (serial).
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error (also: malformed request).
    pub const IOERR: u8 = 1;
    /// Unsupported request.
    pub const UNSUPP: u8 = 2;
}

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
const WZ_FLAG_UNMAP: u32 = 1;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;

/// Limits the device advertises and enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Most segments in one discard.
    pub max_discard_seg: u32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one write-zeroes.
    pub max_write_zeroes_seg: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_discard_sectors: 1 << 22,
            max_discard_seg: 32,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 32,
        }
    }
}

/// What a request needs besides guest memory.
pub struct Context<'a> {
    /// The mirror.
    pub array: &'a Array,
    /// Writes are refused.
    pub read_only: bool,
    /// The guest disabled the write cache: make every write durable before completing.
    pub writethrough: bool,
    /// GET_ID answer.
    pub serial: [u8; ID_LEN],
    /// Discard/write-zeroes limits.
    pub limits: Limits,
}

/// Why a request failed, mapped to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain's shape is wrong.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Guest memory could not be accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The request type is not supported.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Unsupported flags.
    #[error("unsupported flags {0:#x}")]
    Flags(u32),
    /// A write to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The mirror failed it.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl RequestError {
    /// The virtio status for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::Flags(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: usize,
    writable: bool,
}

/// The result of one chain: bytes the device wrote into guest memory (used length).
pub type UsedLen = u32;

/// Runs one descriptor chain and writes its status; returns the used length.
pub fn process<M>(ctx: &Context<'_>, mem: &M, descs: &[Descriptor]) -> UsedLen
where
    M: GuestMemoryBackend,
{
    let Some(last) = descs.last() else {
        warn!("empty descriptor chain");
        return 0;
    };
    if !last.is_write_only() || last.len() == 0 {
        warn!("descriptor chain without a writable status byte; dropping it");
        return 0;
    }
    let status_addr = match last.addr().0.checked_add(u64::from(last.len()) - 1) {
        Some(a) => GuestAddress(a),
        None => return 0,
    };
    let mut segs: Vec<Seg> = descs
        .iter()
        .map(|d| Seg {
            addr: d.addr(),
            len: d.len() as usize,
            writable: d.is_write_only(),
        })
        .collect();
    // The status byte is the last byte of the last descriptor.
    if let Some(s) = segs.last_mut() {
        s.len -= 1;
    }
    let (st, used) = match execute(ctx, mem, &segs) {
        Ok(used) => (status::OK, used),
        Err(e) => {
            debug!("request failed: {e}");
            if matches!(e, RequestError::Io(_)) {
                warn!("request failed: {e}");
            }
            (e.status(), 0)
        }
    };
    if mem.write_obj(st, status_addr).is_err() {
        warn!("cannot write the status byte at {:#x}", status_addr.0);
        return 0;
    }
    used.saturating_add(1)
}

/// Splits off the first `n` bytes of `segs`.
fn take(segs: &[Seg], n: usize) -> Option<(Vec<Seg>, Vec<Seg>)> {
    let mut head = Vec::new();
    let mut rest = Vec::new();
    let mut need = n;
    for s in segs {
        if need == 0 {
            rest.push(*s);
        } else if s.len <= need {
            head.push(*s);
            need -= s.len;
        } else {
            head.push(Seg { len: need, ..*s });
            rest.push(Seg {
                addr: GuestAddress(s.addr.0.checked_add(need as u64)?),
                len: s.len - need,
                writable: s.writable,
            });
            need = 0;
        }
    }
    (need == 0).then_some((head, rest))
}

fn read_bytes<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    out: &mut [u8],
) -> Result<(), RequestError> {
    let mut off = 0;
    for s in segs {
        mem.read_slice(&mut out[off..off + s.len], s.addr)
            .map_err(|e| RequestError::Memory(e.to_string()))?;
        off += s.len;
    }
    Ok(())
}

/// Resolves guest segments to host memory slices (several when a segment spans
/// memory regions).
macro_rules! guest_slices {
    ($mem:expr, $segs:expr) => {{
        let mut slices = Vec::new();
        for s in $segs {
            for v in GuestMemoryBackend::get_slices($mem, s.addr, s.len) {
                slices.push(v.map_err(|e| RequestError::Memory(e.to_string()))?);
            }
        }
        slices
    }};
}

fn execute<M: GuestMemoryBackend>(
    ctx: &Context<'_>,
    mem: &M,
    segs: &[Seg],
) -> Result<UsedLen, RequestError> {
    let (hdr_segs, data) =
        take(segs, 16).ok_or(RequestError::Malformed("shorter than the header"))?;
    if hdr_segs.iter().any(|s| s.writable) {
        return Err(RequestError::Malformed("header is device-writable"));
    }
    let mut hdr = [0u8; 16];
    read_bytes(mem, &hdr_segs, &mut hdr)?;
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let data: Vec<Seg> = data.into_iter().filter(|s| s.len > 0).collect();
    let data_len: usize = data.iter().map(|s| s.len).sum();
    let all = |w: bool| data.iter().all(|s| s.writable == w);
    match ty {
        kind::IN => {
            if !all(true) {
                return Err(RequestError::Malformed(
                    "read buffer is not device-writable",
                ));
            }
            let slices = guest_slices!(mem, &data);
            {
                let mut bufs: Vec<IoSliceMut<'_>> = slices
                    .iter()
                    .map(|v| {
                        // SAFETY: the slice covers `v.len()` bytes of mapped guest memory
                        // that stays mapped while `mem` is borrowed; the guest does not
                        // touch a buffer it handed to the device until completion.
                        IoSliceMut::new(unsafe {
                            std::slice::from_raw_parts_mut(v.ptr_guard_mut().as_ptr(), v.len())
                        })
                    })
                    .collect();
                ctx.array.read(sector, &mut bufs)?;
                for v in &slices {
                    v.bitmap().mark_dirty(0, v.len());
                }
            }
            Ok(data_len as u32)
        }
        kind::OUT => {
            if ctx.read_only {
                return Err(RequestError::ReadOnly);
            }
            if !all(false) {
                return Err(RequestError::Malformed("write buffer is device-writable"));
            }
            let slices = guest_slices!(mem, &data);
            {
                let bufs: Vec<IoSlice<'_>> = slices
                    .iter()
                    .map(|v| {
                        // SAFETY: as above; the bytes are only read.
                        IoSlice::new(unsafe {
                            std::slice::from_raw_parts(v.ptr_guard().as_ptr(), v.len())
                        })
                    })
                    .collect();
                ctx.array.write(sector, &bufs)?;
                if ctx.writethrough {
                    ctx.array.flush()?;
                }
            }
            Ok(0)
        }
        kind::FLUSH => {
            ctx.array.flush()?;
            Ok(0)
        }
        kind::GET_ID => {
            if !all(true) {
                return Err(RequestError::Malformed("id buffer is not device-writable"));
            }
            let n = data_len.min(ID_LEN);
            let (dst, _) = take(&data, n).ok_or(RequestError::Malformed("id buffer"))?;
            let mut off = 0;
            for s in dst {
                mem.write_slice(&ctx.serial[off..off + s.len], s.addr)
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                off += s.len;
            }
            Ok(n as u32)
        }
        kind::DISCARD | kind::WRITE_ZEROES => {
            if ctx.read_only {
                return Err(RequestError::ReadOnly);
            }
            if !all(false) || data_len == 0 || data_len % 16 != 0 {
                return Err(RequestError::Malformed("bad discard/write-zeroes segments"));
            }
            let (max_seg, max_sectors) = if ty == kind::DISCARD {
                (ctx.limits.max_discard_seg, ctx.limits.max_discard_sectors)
            } else {
                (
                    ctx.limits.max_write_zeroes_seg,
                    ctx.limits.max_write_zeroes_sectors,
                )
            };
            if data_len / 16 > max_seg as usize {
                return Err(RequestError::Malformed("too many segments"));
            }
            let mut raw = vec![0u8; data_len];
            read_bytes(mem, &data, &mut raw)?;
            let mut ranges = Vec::new();
            for r in raw.chunks_exact(16) {
                let s = u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
                let n = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
                let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
                let allowed = if ty == kind::DISCARD {
                    0
                } else {
                    WZ_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(RequestError::Flags(flags));
                }
                if n > max_sectors {
                    return Err(RequestError::Malformed("segment larger than the limit"));
                }
                ranges.push((s, u64::from(n)));
            }
            for (s, n) in ranges {
                if ty == kind::DISCARD {
                    ctx.array.discard(s, n)?;
                } else {
                    ctx.array.write_zeroes(s, n)?;
                }
            }
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

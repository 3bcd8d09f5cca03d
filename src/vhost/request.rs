//! virtio-blk requests: parse a descriptor chain from guest memory, run it on the
//! mirror, write the status byte. Every malformed chain ends in a status
//! (IOERR/UNSUPP) when there is a place to write one, never in a panic.

use crate::raid1::Array;
use log::{debug, warn};
use std::sync::Arc;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

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

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// Anything else, and chains too malformed to say.
    Other,
}

impl Kind {
    /// Every kind, in label order.
    pub const ALL: [Kind; 7] = [
        Kind::Read,
        Kind::Write,
        Kind::Flush,
        Kind::Discard,
        Kind::WriteZeroes,
        Kind::GetId,
        Kind::Other,
    ];

    /// The kind of a request type (virtio 1.2, 5.2.6).
    pub fn of(ty: u32) -> Kind {
        match ty {
            kind::IN => Kind::Read,
            kind::OUT => Kind::Write,
            kind::FLUSH => Kind::Flush,
            kind::DISCARD => Kind::Discard,
            kind::WRITE_ZEROES => Kind::WriteZeroes,
            kind::GET_ID => Kind::GetId,
            _ => Kind::Other,
        }
    }

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Flush => "flush",
            Kind::Discard => "discard",
            Kind::WriteZeroes => "write_zeroes",
            Kind::GetId => "get_id",
            Kind::Other => "other",
        }
    }

    /// Its place in [`Kind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
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
    /// Largest data segment of a read or write (`size_max`).
    pub size_max: u32,
    /// Most data segments in a read or write (`seg_max`).
    pub seg_max: u32,
    /// The logical block size the guest is told (`blk_size`): reads and writes
    /// start and end on it. Legs with 4 KiB logical blocks would otherwise turn a
    /// 512-byte write into an unlocked read-modify-write of the whole block, and
    /// two writes to different sectors of one block could lose one.
    pub block_size: u32,
}

impl Limits {
    /// The largest read or write: every segment at its largest, and no more than
    /// one leg operation can move at once.
    pub fn max_transfer(&self) -> usize {
        let segs = (self.seg_max as usize).saturating_mul(self.size_max as usize);
        segs.min(crate::raid1::aio::MAX_TRANSFER)
    }

    /// Refuses the data segments of a read or write beyond the advertised limits
    /// (segments may alias one guest buffer: their sum is checked too).
    fn check_transfer(&self, sector: u64, data: &[Seg]) -> Result<(), RequestError> {
        let bs = u64::from(self.block_size.max(512));
        let bytes = data
            .iter()
            .fold(0u64, |t, s| t.saturating_add(s.len as u64));
        if sector.saturating_mul(512) % bs != 0 || bytes % bs != 0 {
            return Err(RequestError::Limits(format!(
                "{bytes} bytes at sector {sector}: not whole {bs}-byte logical blocks"
            )));
        }
        if data.len() > self.seg_max as usize {
            return Err(RequestError::Limits(format!(
                "{} data segments, at most {}",
                data.len(),
                self.seg_max
            )));
        }
        if let Some(s) = data.iter().find(|s| s.len > self.size_max as usize) {
            return Err(RequestError::Limits(format!(
                "a {}-byte segment, at most {}",
                s.len, self.size_max
            )));
        }
        let total = data.iter().fold(0usize, |t, s| t.saturating_add(s.len));
        if total > self.max_transfer() {
            return Err(RequestError::Limits(format!(
                "{total} bytes, at most {}",
                self.max_transfer()
            )));
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_discard_sectors: 1 << 22,
            max_discard_seg: 32,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 32,
            size_max: super::SIZE_MAX,
            seg_max: super::SEG_MAX,
            block_size: 512,
        }
    }
}

/// What a request needs besides guest memory.
pub struct Context<'a> {
    /// The mirror.
    pub array: &'a Arc<Array>,
    /// Writes are refused.
    pub read_only: bool,
    /// Another node holds the writer role: writes fail (IOERR), reads are served.
    pub not_writer: bool,
    /// Counts the writes refused for the writer role.
    pub refused: Option<&'a std::sync::atomic::AtomicU64>,
    /// The guest disabled the write cache: make every write durable before completing.
    pub writethrough: bool,
    /// GET_ID answer.
    pub serial: [u8; ID_LEN],
    /// Discard/write-zeroes limits.
    pub limits: Limits,
}

impl Context<'_> {
    /// Whether a request that changes the disk may run (counts refusals).
    fn may_write(&self) -> Result<(), RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        if self.not_writer {
            if let Some(c) = self.refused {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            return Err(RequestError::NotWriter);
        }
        Ok(())
    }
}

/// Why a request failed, mapped to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain's shape is wrong.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A read or write beyond the advertised `size_max`/`seg_max`.
    #[error("request beyond the device's limits: {0}")]
    Limits(String),
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
    /// A write while another node holds the writer role.
    #[error("another node holds the writer role")]
    NotWriter,
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

/// The chain's segments without the status byte, and the status byte's address;
/// `None` when there is no writable status byte to report anything in.
fn split_status(descs: &[Descriptor]) -> Option<(Vec<Seg>, GuestAddress)> {
    let Some(last) = descs.last() else {
        warn!("empty descriptor chain");
        return None;
    };
    if !last.is_write_only() || last.len() == 0 {
        warn!("descriptor chain without a writable status byte; dropping it");
        return None;
    }
    let status_addr = GuestAddress(last.addr().0.checked_add(u64::from(last.len()) - 1)?);
    let mut segs: Vec<Seg> = descs
        .iter()
        .map(|d| Seg {
            addr: d.addr(),
            len: d.len() as usize,
            writable: d.is_write_only(),
        })
        .collect();
    if let Some(s) = segs.last_mut() {
        s.len -= 1;
    }
    Some((segs, status_addr))
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

/// The header fields and the data segments of a chain (status byte excluded).
struct Parsed {
    ty: u32,
    sector: u64,
    data: Vec<Seg>,
}

fn parse<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    limits: &Limits,
) -> Result<Parsed, RequestError> {
    let (hdr_segs, data) =
        take(segs, 16).ok_or(RequestError::Malformed("shorter than the header"))?;
    if hdr_segs.iter().any(|s| s.writable) {
        return Err(RequestError::Malformed("header is device-writable"));
    }
    let mut hdr = super::wire::OutHdr::default();
    read_bytes(mem, &hdr_segs, hdr.as_mut_slice())?;
    let (ty, sector) = (hdr.kind(), hdr.sector());
    let data: Vec<Seg> = data.into_iter().filter(|s| s.len > 0).collect();
    let p = Parsed { ty, sector, data };
    let all = |w: bool| p.data.iter().all(|s| s.writable == w);
    match ty {
        kind::IN if !all(true) => Err(RequestError::Malformed(
            "read buffer is not device-writable",
        )),
        kind::OUT if !all(false) => Err(RequestError::Malformed("write buffer is device-writable")),
        kind::IN | kind::OUT => limits.check_transfer(p.sector, &p.data).map(|()| p),
        _ => Ok(p),
    }
}

/// A request as the worker sees it.
pub enum Prepared {
    /// Finished (status written).
    Done(Ended),
    /// A read or write to run asynchronously.
    Transfer(Transfer),
    /// A flush to run asynchronously.
    Flush {
        /// Where the status byte goes.
        status: GuestAddress,
    },
    /// Discards (or zeroes) validated sector ranges: run off the worker, as
    /// they have no asynchronous path and may wait for other nodes.
    Ranges {
        /// Zero the ranges (write-zeroes) rather than discard them.
        zeroes: bool,
        /// (first sector, sectors).
        ranges: Vec<(u64, u64)>,
        /// Where the status byte goes.
        status: GuestAddress,
    },
}

/// A request that ended while it was prepared.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    /// The used length.
    pub used: UsedLen,
    /// The status written (IOERR also when there was no place to write one).
    pub status: u8,
    /// What it was.
    pub kind: Kind,
}

/// A validated read (`write == false`) or write of guest memory.
pub struct Transfer {
    /// Direction.
    pub write: bool,
    /// First sector.
    pub sector: u64,
    /// Guest buffers: (address, length).
    pub segs: Vec<(GuestAddress, usize)>,
    /// Total bytes.
    pub len: usize,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Validates a chain; reads, writes, flushes, discards and write-zeroes are
/// returned for the mirror, everything else (and every malformed chain) is
/// finished here.
pub fn prepare<M>(ctx: &Context<'_>, mem: &M, descs: &[Descriptor]) -> Prepared
where
    M: GuestMemoryBackend,
{
    let Some((segs, status_addr)) = split_status(descs) else {
        return Prepared::Done(Ended {
            used: 0,
            status: status::IOERR,
            kind: Kind::Other,
        });
    };
    let done = |kind, result| {
        let (status, used) = finish(mem, status_addr, result);
        Prepared::Done(Ended { used, status, kind })
    };
    match parse(mem, &segs, &ctx.limits) {
        Ok(p) if p.ty == kind::FLUSH => Prepared::Flush {
            status: status_addr,
        },
        Ok(p) if p.ty == kind::IN || p.ty == kind::OUT => {
            if p.ty == kind::OUT {
                if let Err(e) = ctx.may_write() {
                    return done(Kind::Write, Err(e));
                }
            }
            let len: usize = p.data.iter().map(|s| s.len).sum();
            Prepared::Transfer(Transfer {
                write: p.ty == kind::OUT,
                sector: p.sector,
                segs: p.data.iter().map(|s| (s.addr, s.len)).collect(),
                len,
                status: status_addr,
            })
        }
        Ok(p) if p.ty == kind::DISCARD || p.ty == kind::WRITE_ZEROES => {
            match ctx.may_write().and_then(|()| ranges(ctx, mem, &p)) {
                Ok(ranges) => Prepared::Ranges {
                    zeroes: p.ty == kind::WRITE_ZEROES,
                    ranges,
                    status: status_addr,
                },
                Err(e) => done(Kind::of(p.ty), Err(e)),
            }
        }
        Ok(p) => {
            let k = Kind::of(p.ty);
            let result = execute(ctx, mem, p);
            done(k, result)
        }
        Err(e) => done(Kind::Other, Err(e)),
    }
}

/// The sector ranges of a discard or write-zeroes request, checked against the
/// advertised limits.
fn ranges<M: GuestMemoryBackend>(
    ctx: &Context<'_>,
    mem: &M,
    p: &Parsed,
) -> Result<Vec<(u64, u64)>, RequestError> {
    let Parsed { ty, data, .. } = p;
    let ty = *ty;
    let data_len: usize = data.iter().map(|s| s.len).sum();
    if !data.iter().all(|s| !s.writable) || data_len == 0 || data_len % 16 != 0 {
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
    read_bytes(mem, data, &mut raw)?;
    let mut ranges = Vec::new();
    for r in raw.chunks_exact(std::mem::size_of::<super::wire::RangeSeg>()) {
        let seg: super::wire::RangeSeg = super::wire::copy_from(r)
            .ok_or(RequestError::Malformed("bad discard/write-zeroes segments"))?;
        let (s, n, flags) = (seg.sector(), seg.num_sectors(), seg.flags());
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
    Ok(ranges)
}

/// Runs the ranges of a discard (or, with `zeroes`, write-zeroes) request.
pub fn apply_ranges(array: &Array, zeroes: bool, ranges: &[(u64, u64)]) -> std::io::Result<()> {
    for &(s, n) in ranges {
        if zeroes {
            array.write_zeroes(s, n)?;
        } else {
            array.discard(s, n)?;
        }
    }
    Ok(())
}

/// Writes the status for `result`; returns it and the used length (0 if the
/// status byte cannot be written).
pub fn finish<M: GuestMemoryBackend>(
    mem: &M,
    status_addr: GuestAddress,
    result: Result<UsedLen, RequestError>,
) -> (u8, UsedLen) {
    let (st, used) = match result {
        Ok(used) => (status::OK, used),
        Err(e) => {
            if matches!(e, RequestError::Io(_) | RequestError::Limits(_)) {
                warn!("request failed: {e}");
            } else {
                debug!("request failed: {e}");
            }
            (e.status(), 0)
        }
    };
    if mem.write_obj(st, status_addr).is_err() {
        warn!("cannot write the status byte at {:#x}", status_addr.0);
        return (st, 0);
    }
    (st, used.saturating_add(1))
}

/// Answers a request that does not touch the disk (GET_ID), or refuses it.
fn execute<M: GuestMemoryBackend>(
    ctx: &Context<'_>,
    mem: &M,
    p: Parsed,
) -> Result<UsedLen, RequestError> {
    let Parsed { ty, ref data, .. } = p;
    let data_len: usize = data.iter().map(|s| s.len).sum();
    let all = |w: bool| data.iter().all(|s| s.writable == w);
    match ty {
        kind::GET_ID => {
            if !all(true) {
                return Err(RequestError::Malformed("id buffer is not device-writable"));
            }
            let n = data_len.min(ID_LEN);
            let (dst, _) = take(data, n).ok_or(RequestError::Malformed("id buffer"))?;
            let mut off = 0;
            for s in dst {
                mem.write_slice(&ctx.serial[off..off + s.len], s.addr)
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                off += s.len;
            }
            Ok(n as u32)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

#[cfg(test)]
mod tests;

//! virtio-blk requests: parse a descriptor chain from guest memory, run it on the
//! mirror, write the status byte. Every malformed chain ends in a status
//! (IOERR/UNSUPP) when there is a place to write one, never in a panic.

use crate::raid1::Array;
use log::{debug, warn};
use std::io::{IoSlice, IoSliceMut};
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
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
    pub array: &'a Array,
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

/// Runs one descriptor chain synchronously and writes its status; returns the used
/// length.
pub fn process<M>(ctx: &Context<'_>, mem: &M, descs: &[Descriptor]) -> UsedLen
where
    M: GuestMemoryBackend,
{
    let Some((segs, status_addr)) = split_status(descs) else {
        return 0;
    };
    let result = parse(mem, &segs, &ctx.limits).and_then(|p| execute(ctx, mem, p));
    finish(mem, status_addr, result)
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
    /// Finished (status written); the used length.
    Done(UsedLen),
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

/// Validates a chain; reads, writes and flushes are returned for asynchronous
/// execution, everything else (and every malformed chain) is finished here.
pub fn prepare<M>(ctx: &Context<'_>, mem: &M, descs: &[Descriptor]) -> Prepared
where
    M: GuestMemoryBackend,
{
    let Some((segs, status_addr)) = split_status(descs) else {
        return Prepared::Done(0);
    };
    match parse(mem, &segs, &ctx.limits) {
        Ok(p) if p.ty == kind::FLUSH => Prepared::Flush {
            status: status_addr,
        },
        Ok(p) if p.ty == kind::IN || (p.ty == kind::OUT && ctx.may_write().is_ok()) => {
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
                Err(e) => Prepared::Done(finish(mem, status_addr, Err(e))),
            }
        }
        Ok(p) => Prepared::Done(finish(mem, status_addr, execute(ctx, mem, p))),
        Err(e) => Prepared::Done(finish(mem, status_addr, Err(e))),
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

/// Writes the status for `result`; returns the used length (0 if the status byte
/// cannot be written).
pub fn finish<M: GuestMemoryBackend>(
    mem: &M,
    status_addr: GuestAddress,
    result: Result<UsedLen, RequestError>,
) -> UsedLen {
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
        return 0;
    }
    used.saturating_add(1)
}

fn execute<M: GuestMemoryBackend>(
    ctx: &Context<'_>,
    mem: &M,
    p: Parsed,
) -> Result<UsedLen, RequestError> {
    let Parsed {
        ty,
        sector,
        ref data,
    } = p;
    let data_len: usize = data.iter().map(|s| s.len).sum();
    let all = |w: bool| data.iter().all(|s| s.writable == w);
    match ty {
        kind::IN => {
            let slices = guest_slices!(mem, data);
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
                let read = ctx.array.read(sector, &mut bufs);
                // Written through raw pointers, so not logged by vm-memory: mark the
                // pages for migration (also after a failure, which may have written
                // part of them).
                for v in &slices {
                    v.bitmap().mark_dirty(0, v.len());
                }
                read?;
            }
            Ok(data_len as u32)
        }
        kind::OUT => {
            ctx.may_write()?;
            let slices = guest_slices!(mem, data);
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
            let (dst, _) = take(data, n).ok_or(RequestError::Malformed("id buffer"))?;
            let mut off = 0;
            for s in dst {
                mem.write_slice(&ctx.serial[off..off + s.len], s.addr)
                    .map_err(|e| RequestError::Memory(e.to_string()))?;
                off += s.len;
            }
            Ok(n as u32)
        }
        kind::DISCARD | kind::WRITE_ZEROES => {
            ctx.may_write()?;
            let ranges = ranges(ctx, mem, &p)?;
            apply_ranges(ctx.array, ty == kind::WRITE_ZEROES, &ranges)?;
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raid1::metadata::{create_array, NewArray};
    use crate::storage::{Leg, MemLeg};
    use std::sync::Arc;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    struct Rig {
        mem: GuestMemoryMmap<()>,
        array: Array,
    }

    fn rig() -> Rig {
        let a: Arc<dyn Leg> = Arc::new(MemLeg::new("a", 8 << 20));
        let b: Arc<dyn Leg> = Arc::new(MemLeg::new("b", 8 << 20));
        create_array(
            &[&*a, &*b],
            &NewArray {
                name: "t".into(),
                cluster_name: None,
                nodes: 4,
                bitmap_chunk: Some(1 << 20),
                assume_clean: true,
                now: 0,
                uuid: None,
            },
        )
        .unwrap();
        let (array, _) = Array::assemble(vec![a, b]).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        Rig { mem, array }
    }

    fn ctx(r: &Rig) -> Context<'_> {
        Context {
            array: &r.array,
            read_only: false,
            not_writer: false,
            refused: None,
            writethrough: false,
            serial: *b"0123456789abcdefghij",
            limits: Limits::default(),
        }
    }

    fn header(r: &Rig, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        r.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Runs a chain through a real split queue; returns (used length, status byte).
    fn run(r: &Rig, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        run_q(r, 16, descs)
    }

    /// As [`run`], on a queue of `size` descriptors.
    fn run_q(r: &Rig, size: u16, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        r.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let q = MockSplitQueue::new(&r.mem, size);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(Descriptor::new(a, l, f, 0)))
            .collect();
        let chain = q.build_desc_chain(&raw).unwrap();
        let descs: Vec<Descriptor> = chain.collect();
        let used = process(&ctx(r), &r.mem, &descs);
        (used, r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    /// A discard (or write-zeroes) has no asynchronous path and may wait for
    /// another node's resync window: the worker never runs it itself (while it
    /// waited, the worker's other writes in that node's next window would never
    /// end, and that node never move on).
    #[test]
    fn a_discard_is_left_to_run_off_the_worker() {
        let r = rig();
        // Another node resyncs chunk 0.
        r.array.bitmap.set_remote_window(1, 0, 2048);
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        let q = MockSplitQueue::new(&r.mem, 16);
        let raw: Vec<RawDescriptor> = [(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)]
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(Descriptor::new(a, l, f, 0)))
            .collect();
        for ty in [kind::DISCARD, kind::WRITE_ZEROES] {
            header(&r, ty, 0);
            let descs: Vec<Descriptor> = q.build_desc_chain(&raw).unwrap().collect();
            std::thread::scope(|sc| {
                let (tx, rx) = std::sync::mpsc::channel();
                let (r, descs) = (&r, &descs);
                sc.spawn(move || {
                    let p = prepare(&ctx(r), &r.mem, descs);
                    let _ = tx.send(match p {
                        Prepared::Ranges { zeroes, ranges, .. } => Some((zeroes, ranges)),
                        _ => None,
                    });
                });
                let got = rx.recv_timeout(std::time::Duration::from_secs(2));
                if got.is_err() {
                    // Lets the blocked request end, so that the test can.
                    r.array.bitmap.set_remote_window(1, 0, 0);
                }
                assert_eq!(
                    got.expect("the worker ran the request itself: it waited for the window"),
                    Some((ty == kind::WRITE_ZEROES, vec![(0, 8)]))
                );
            });
        }
    }

    fn ok_write_read(r: &Rig) {
        header(r, kind::OUT, 8);
        r.mem
            .write_slice(&[0x5a; 4096], GuestAddress(DATA))
            .unwrap();
        assert_eq!(
            run(r, &[(HDR, 16, 0), (DATA, 4096, 0), (STATUS, 1, W)]),
            (1, status::OK)
        );
        r.mem.write_slice(&[0; 4096], GuestAddress(DATA)).unwrap();
        header(r, kind::IN, 8);
        assert_eq!(
            run(r, &[(HDR, 16, 0), (DATA, 4096, W), (STATUS, 1, W)]),
            (4097, status::OK)
        );
        let mut back = [0u8; 4096];
        r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert!(back.iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn well_formed_requests_work() {
        let r = rig();
        ok_write_read(&r);
        // Header split over two descriptors, data over three.
        header(&r, kind::IN, 8);
        let got = run(
            &r,
            &[
                (HDR, 6, 0),
                (HDR + 6, 10, 0),
                (DATA, 512, W),
                (DATA + 512, 1024, W),
                (DATA + 1536, 2560, W),
                (STATUS, 1, W),
            ],
        );
        assert_eq!(got, (4097, status::OK));
        header(&r, kind::GET_ID, 0);
        assert_eq!(
            run(&r, &[(HDR, 16, 0), (DATA, 20, W), (STATUS, 1, W)]),
            (21, status::OK)
        );
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"0123456789abcdefghij");
        header(&r, kind::GET_ID, 0);
        assert_eq!(
            run(&r, &[(HDR, 16, 0), (DATA, 8, W), (STATUS, 1, W)]),
            (9, status::OK)
        );
        header(&r, kind::FLUSH, 0);
        assert_eq!(run(&r, &[(HDR, 16, 0), (STATUS, 1, W)]), (1, status::OK));
    }

    /// Descriptors: (address, length, flags).
    type Chain = Vec<(u64, u32, u16)>;

    /// A chain: header, `n` data descriptors of `len` bytes all on the same guest
    /// buffer (aliasing it), status.
    fn aliased(n: usize, len: u32, flags: u16) -> Chain {
        let mut d = vec![(HDR, 16, 0)];
        d.extend(std::iter::repeat_n((DATA, len, flags), n));
        d.push((STATUS, 1, W));
        d
    }

    #[test]
    fn reads_and_writes_beyond_size_max_and_seg_max_fail_without_touching_the_disk() {
        let r = rig();
        ok_write_read(&r); // 0x5a at sector 8
                           // What the device advertises.
        let size_max = crate::vhost::SIZE_MAX;
        let seg_max = crate::vhost::SEG_MAX as usize;
        r.mem
            .write_slice(&vec![0xa5; 2 * size_max as usize], GuestAddress(DATA))
            .unwrap();
        let cases: Vec<(&str, u32, Chain)> = vec![
            (
                "write of one segment above size_max",
                kind::OUT,
                aliased(1, 2 * size_max, 0),
            ),
            (
                "read of one segment above size_max",
                kind::IN,
                aliased(1, size_max + 512, W),
            ),
            (
                "write of seg_max + 1 aliased segments",
                kind::OUT,
                aliased(seg_max + 1, 512, 0),
            ),
            (
                "read of seg_max + 1 aliased segments",
                kind::IN,
                aliased(seg_max + 1, 512, W),
            ),
        ];
        for (what, ty, descs) in cases {
            header(&r, ty, 8);
            assert_eq!(run_q(&r, 2048, &descs), (1, status::IOERR), "{what}");
        }
        // At the limits: served.
        header(&r, kind::IN, 8);
        let (used, st) = run_q(&r, 2048, &aliased(seg_max, 512, W));
        assert_eq!((used, st), (seg_max as u32 * 512 + 1, status::OK));
        header(&r, kind::IN, 8);
        assert_eq!(
            run(&r, &aliased(1, size_max, W)),
            (size_max + 1, status::OK)
        );
        // The refused writes left the data as it was; the device still serves.
        ok_write_read(&r);
        assert!(!r.array.is_degraded());
    }

    #[test]
    fn a_transfer_larger_than_one_leg_operation_is_refused_when_parsed() {
        // Segments alias one buffer: three 1 GiB descriptors make a 3 GiB write.
        let r = rig();
        let limits = Limits {
            size_max: 1 << 30,
            seg_max: 8,
            ..Limits::default()
        };
        assert_eq!(limits.max_transfer(), crate::raid1::aio::MAX_TRANSFER);
        let seg = Seg {
            addr: GuestAddress(DATA),
            len: 1 << 30,
            writable: false,
        };
        let segs = [
            Seg {
                addr: GuestAddress(HDR),
                len: 16,
                writable: false,
            },
            seg,
            seg,
            seg,
        ];
        header(&r, kind::OUT, 0);
        assert!(matches!(
            parse(&r.mem, &segs, &limits),
            Err(RequestError::Limits(_))
        ));
        assert!(
            parse(&r.mem, &segs[..2], &limits).is_ok(),
            "one 1 GiB segment is fine"
        );
        // The default limits stay below it.
        assert!(Limits::default().max_transfer() <= crate::raid1::aio::MAX_TRANSFER);
        assert!(i32::try_from(Limits::default().max_transfer()).is_ok());
    }

    #[test]
    fn synchronous_reads_mark_their_buffers_in_the_dirty_log() {
        use vm_memory::bitmap::AtomicBitmap;
        use vm_memory::GuestMemoryRegion;
        let r = rig();
        let mem =
            GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dirty = |gpa: u64| {
            mem.iter()
                .next()
                .is_some_and(|reg| reg.bitmap().dirty_at(gpa as usize))
        };
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind::IN.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        // Read 8 KiB into two pages the test never touches; the leg I/O writes them
        // through raw pointers, so only the explicit marking logs them.
        let descs = [
            Descriptor::new(HDR, 16, 0, 0),
            Descriptor::new(DATA, 8192, W, 0),
            Descriptor::new(STATUS, 1, W, 0),
        ];
        assert!(!dirty(DATA) && !dirty(DATA + 4096) && !dirty(STATUS));
        assert_eq!(process(&ctx(&r), &mem, &descs), 8193);
        assert!(dirty(DATA) && dirty(DATA + 4096) && dirty(STATUS));
        assert!(!dirty(DATA + 8192));
    }

    #[test]
    fn malformed_chains_get_a_status_and_the_device_keeps_working() {
        let r = rig();
        let cap = r.array.size;
        type Case = (&'static str, u32, u64, Vec<(u64, u32, u16)>, u8);
        let cases: Vec<Case> = vec![
            (
                "short header",
                kind::IN,
                0,
                vec![(HDR, 8, 0), (STATUS, 1, W)],
                status::IOERR,
            ),
            (
                "writable header",
                kind::IN,
                0,
                vec![(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)],
                status::IOERR,
            ),
            (
                "read into read-only buffer",
                kind::IN,
                0,
                vec![(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)],
                status::IOERR,
            ),
            (
                "write from writable buffer",
                kind::OUT,
                0,
                vec![(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)],
                status::IOERR,
            ),
            (
                "mixed directions",
                kind::IN,
                0,
                vec![
                    (HDR, 16, 0),
                    (DATA, 512, W),
                    (DATA + 512, 512, 0),
                    (STATUS, 1, W),
                ],
                status::IOERR,
            ),
            (
                "beyond capacity",
                kind::IN,
                cap - 1,
                vec![(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)],
                status::IOERR,
            ),
            (
                "sector overflow",
                kind::OUT,
                u64::MAX - 1,
                vec![(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)],
                status::IOERR,
            ),
            (
                "not a sector multiple",
                kind::OUT,
                0,
                vec![(HDR, 16, 0), (DATA, 100, 0), (STATUS, 1, W)],
                status::IOERR,
            ),
            (
                "outside guest memory",
                kind::IN,
                0,
                vec![(HDR, 16, 0), (0xf000_0000, 4096, W), (STATUS, 1, W)],
                status::IOERR,
            ),
            (
                "header outside guest memory",
                kind::IN,
                0,
                vec![(0xf000_0000, 16, 0), (STATUS, 1, W)],
                status::IOERR,
            ),
            (
                "unknown type",
                99,
                0,
                vec![(HDR, 16, 0), (STATUS, 1, W)],
                status::UNSUPP,
            ),
            (
                "discard with flags",
                kind::DISCARD,
                0,
                vec![(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)],
                status::UNSUPP,
            ),
            (
                "discard of 10 bytes",
                kind::DISCARD,
                0,
                vec![(HDR, 16, 0), (DATA, 10, 0), (STATUS, 1, W)],
                status::IOERR,
            ),
            (
                "discard beyond capacity",
                kind::WRITE_ZEROES,
                0,
                vec![(HDR, 16, 0), (DATA + 64, 16, 0), (STATUS, 1, W)],
                status::IOERR,
            ),
            (
                "get_id into read-only buffer",
                kind::GET_ID,
                0,
                vec![(HDR, 16, 0), (DATA, 20, 0), (STATUS, 1, W)],
                status::IOERR,
            ),
        ];
        // Segment for "discard with flags": sector 0, 8 sectors, flags 1.
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        seg[12..16].copy_from_slice(&1u32.to_le_bytes());
        r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        // Segment at DATA+64: beyond the end.
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&(cap - 4).to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        r.mem.write_slice(&seg, GuestAddress(DATA + 64)).unwrap();
        for (what, ty, sector, descs, want) in cases {
            header(&r, ty, sector);
            let (used, st) = run(&r, &descs);
            assert_eq!((used, st), (1, want), "{what}");
        }
        // No writable status byte: nothing can be reported, nothing is written.
        header(&r, kind::IN, 0);
        assert_eq!(run(&r, &[(HDR, 16, 0), (DATA, 512, 0)]), (0, 0xee));
        assert_eq!(run(&r, &[(HDR, 16, 0), (STATUS, 0, W)]), (0, 0xee));
        // Status byte outside guest memory: dropped, no panic.
        let q = MockSplitQueue::new(&r.mem, 16);
        let raw = [
            RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0)),
            RawDescriptor::from(Descriptor::new(0xf000_0000, 1, W, 0)),
        ];
        let descs: Vec<Descriptor> = q.build_desc_chain(&raw).unwrap().collect();
        assert_eq!(process(&ctx(&r), &r.mem, &descs), 0);
        assert_eq!(process(&ctx(&r), &r.mem, &[]), 0);
        // Read-only disk refuses writes.
        header(&r, kind::OUT, 0);
        let mut c = ctx(&r);
        c.read_only = true;
        r.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let descs = [
            Descriptor::new(HDR, 16, 0, 0),
            Descriptor::new(DATA, 512, 0, 0),
            Descriptor::new(STATUS, 1, W, 0),
        ];
        assert_eq!(process(&c, &r.mem, &descs), 1);
        assert_eq!(
            r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            status::IOERR
        );
        // So does a node without the writer role; it still reads.
        static REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut c = ctx(&r);
        c.not_writer = true;
        c.refused = Some(&REFUSED);
        for ty in [kind::OUT, kind::WRITE_ZEROES, kind::DISCARD] {
            header(&r, ty, 0);
            r.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
            let data = if ty == kind::OUT { 512 } else { 16 };
            let descs = [
                Descriptor::new(HDR, 16, 0, 0),
                Descriptor::new(DATA, data, 0, 0),
                Descriptor::new(STATUS, 1, W, 0),
            ];
            assert_eq!(process(&c, &r.mem, &descs), 1);
            assert_eq!(
                r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
                status::IOERR,
                "type {ty}"
            );
        }
        assert_eq!(REFUSED.load(std::sync::atomic::Ordering::Relaxed), 3);
        header(&r, kind::IN, 0);
        let descs = [
            Descriptor::new(HDR, 16, 0, 0),
            Descriptor::new(DATA, 512, W, 0),
            Descriptor::new(STATUS, 1, W, 0),
        ];
        assert_eq!(process(&c, &r.mem, &descs), 513);
        assert_eq!(
            r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            status::OK
        );
        // After all of that the device still serves.
        ok_write_read(&r);
    }
}

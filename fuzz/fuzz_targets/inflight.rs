//! The inflight buffer of `SET_INFLIGHT_FD` from arbitrary bytes: the front-end owns
//! it, so whatever it holds, mapping it and starting rings on it must not panic, hang
//! or touch memory outside the queue in use.
//!
//! Input, read in order (missing bytes are zero):
//! * flags: bits 0-1, queues - 1 (1 to 4); bit 2, wild geometry;
//! * geometry: the queue size (u16; without wild geometry 1 to `QUEUE_SIZE`); with
//!   wild geometry also the queue count (u16), the device's queue count (u8), a byte
//!   choosing offset, length and file size among likely and arbitrary values, and
//!   the raw values these choices use;
//! * per queue (up to 4): the ring's size (u8: a power of two, or with bit 7 an
//!   arbitrary u16 the ring refuses unless valid), its descriptor table, avail and
//!   used ring addresses (u16 each, scaled to their alignment; up to 4 KiB beyond the
//!   64 KiB guest) and the front-end's next available index (u16);
//! * the buffer's bytes (u16 count, then the bytes, at the buffer's offset);
//! * guest memory (u16 count, then the bytes, from address 0);
//! * per queue, descriptors written over its table: a u8 count, then 4 bytes each
//!   (first byte: flags in bits 0-2, wild lengths or addresses in bits 3-4, an
//!   indirect length that is not a whole number of descriptors in bit 5, the next
//!   index in the high byte in bit 6; then the next index, the length and the
//!   address, in units that keep most of them inside the guest; an indirect
//!   descriptor points into the same table, so nested tables and loops through them
//!   are easy to reach);
//! * per queue, a u8 count of two-byte operations for the crash model below.
//!
//! Checked:
//! * mapping succeeds only for a geometry `check_geometry` accepts in a file that
//!   holds it;
//! * starting each ring (`start_vring`, as on `SET_INFLIGHT_FD` then ring start)
//!   agrees with a reading of the raw bytes: version 0 is fresh; otherwise
//!   `last_batch_head` is cleared exactly when `used_idx` differs from the ring's used
//!   index and it is a valid head; the heads to resubmit are exactly the marked
//!   ones, each once, below both sizes, in counter order; an error only when a marked
//!   head is beyond the ring; the ring's next available index is used + inuse;
//! * `take_resubmit` gives those heads once;
//! * `read_chain` on each of them (the first 128 per queue) (descriptor table from guest memory) returns exactly
//!   the chain `virtio_queue`'s own walk yields when that walk ends at a descriptor
//!   without NEXT, and an error otherwise (loops, indexes beyond the table, nested
//!   indirect tables, memory beyond the guest);
//! * `add_used` clears the head and records the ring's used index;
//! * a run of takes and completions, then a crash (possibly between a completion's
//!   used-index update and its post-put), then a new mapping of the same file:
//!   recovery resubmits exactly the heads marked before the run or taken in it and
//!   not completed, those taken in the run in the order they were taken;
//! * nothing outside a queue's part of the buffer changes while that queue runs.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use vhost_user_backend::{VringMutex, VringT};
use vhost_user_md::vhost::inflight::{
    self, check_geometry, new_memfd, queue_region_size, InflightQueue, InflightRegion, VERSION,
};
use vhost_user_md::vhost::QUEUE_SIZE;
use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

const GUEST: u64 = 64 << 10;
/// Ring addresses reach this far beyond the guest.
const BEYOND: u64 = 4 << 10;
/// Largest file a wild geometry makes.
const MAX_FILE: u64 = 1 << 20;
/// Queues looked at (the region may cover more).
const MAX_QUEUES: usize = 4;
/// Resubmitted heads walked per queue (the rest stay marked; the crash model
/// accounts for them).
const MAX_WALKS: usize = 128;
/// Avail ring of the queue used to walk chains the way `virtio_queue` does.
const SCRATCH_AVAIL: u64 = GUEST - 8;

type Mem = GuestMemoryMmap<()>;
type Vring = VringMutex<GuestMemoryAtomic<Mem>>;

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u16()) | u64::from(self.u16()) << 16 | u64::from(self.u32()) << 32
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

/// How the front-end describes its buffer.
struct Geometry {
    num_queues: u16,
    queue_size: u16,
    max_queues: usize,
    offset: u64,
    len: u64,
    file_len: u64,
}

fn geometry(inp: &mut Input, flags: u8) -> Geometry {
    if flags & 4 == 0 {
        let num_queues = 1 + u16::from(flags & 3);
        let queue_size = 1 + inp.u16() % QUEUE_SIZE as u16;
        let len = queue_region_size(queue_size) * u64::from(num_queues);
        return Geometry {
            num_queues,
            queue_size,
            max_queues: MAX_QUEUES,
            offset: 0,
            len,
            file_len: len,
        };
    }
    let queue_size = inp.u16();
    let num_queues = inp.u16();
    let max_queues = usize::from(inp.u8());
    let sel = inp.u8();
    let need = queue_region_size(queue_size) * u64::from(num_queues);
    let offset = match sel & 3 {
        0 => 0,
        1 => 4096,
        2 => u64::from(inp.u16()),
        _ => inp.u64(),
    };
    let len = match (sel >> 2) & 3 {
        0 => need,
        1 => need + u64::from(inp.u16()),
        2 => need.saturating_sub(1 + u64::from(inp.u8())),
        _ => inp.u64(),
    };
    let end = offset.saturating_add(len);
    let file_len = match (sel >> 4) & 3 {
        0 => end,
        1 => end.saturating_sub(1),
        2 => u64::from(inp.u16()) * 64,
        _ => u64::from(inp.u32()),
    };
    Geometry {
        num_queues,
        queue_size,
        max_queues,
        offset,
        len,
        file_len: file_len.min(MAX_FILE),
    }
}

/// What the front-end set up for one ring.
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    base: u16,
}

fn ring(inp: &mut Input) -> Ring {
    let s = inp.u8();
    let size = if s & 0x80 == 0 {
        1 << (s % 11)
    } else {
        u16::from_le_bytes([s, inp.u8()])
    };
    Ring {
        size,
        desc: u64::from(inp.u16()) * 16 % (GUEST + BEYOND),
        avail: u64::from(inp.u16()) * 2 % (GUEST + BEYOND),
        used: u64::from(inp.u16()) * 4 % (GUEST + BEYOND),
        base: inp.u16(),
    }
}

fn snapshot(file: &File, len: u64) -> Vec<u8> {
    let mut v = vec![0; len as usize];
    file.read_exact_at(&mut v, 0).expect("read the buffer");
    v
}

/// Nothing but bytes `[from, to)` changed.
fn only_changed(before: &[u8], after: &[u8], from: u64, to: u64, what: &str) {
    let (from, to) = (from as usize, to as usize);
    assert!(
        before[..from] == after[..from] && before[to..] == after[to..],
        "{what} wrote outside its queue's bytes {from}..{to}"
    );
}

fn le16(b: &[u8], at: u64) -> u16 {
    u16::from_le_bytes([b[at as usize], b[at as usize + 1]])
}

fn le64(b: &[u8], at: u64) -> u64 {
    u64::from_le_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

fn fields(d: &Descriptor) -> (u64, u32, u16, u16) {
    (d.addr().0, d.len(), d.flags(), d.next())
}

/// Writes descriptors built from `recs` (4 bytes each) over the table at `table`.
fn write_table(mem: &Mem, table: u64, recs: &[u8]) {
    for (i, r) in recs.chunks_exact(4).enumerate() {
        let flags = u16::from(r[0] & 7);
        let wild = (r[0] >> 3) & 3;
        let (addr, len) = if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
            let addr = match wild {
                0 | 1 => table + u64::from(r[3]) * 16,
                2 => GUEST.saturating_sub(u64::from(r[3]) * 16),
                _ => u64::MAX - u64::from(r[3]),
            };
            // Sometimes not a whole number of descriptors.
            let len = u32::from(r[2]) * 16 + u32::from((r[0] >> 5) & 1) * 8;
            (addr, len)
        } else {
            let len = match wild {
                3 => u32::MAX - u32::from(r[2]),
                _ => u32::from(r[2]) * 512,
            };
            (u64::from(r[3]) * 256, len)
        };
        let next = if r[0] & 0x40 != 0 {
            u16::from(r[1]) << 8
        } else {
            u16::from(r[1])
        };
        // A table partly beyond the guest keeps what fits.
        let _ = mem.write_obj(
            Descriptor::new(addr, len, flags, next),
            GuestAddress(table + i as u64 * 16),
        );
    }
}

/// The chain at `head` as `virtio_queue` walks it (popped from a scratch avail ring).
fn virtio_walk(mem: &Mem, desc: u64, size: u16, head: u16) -> Vec<Descriptor> {
    let mut q = Queue::new(QUEUE_SIZE as u16).expect("queue");
    q.try_set_size(size).expect("ring size");
    q.try_set_desc_table_address(GuestAddress(desc))
        .expect("aligned");
    q.try_set_avail_ring_address(GuestAddress(SCRATCH_AVAIL))
        .expect("aligned");
    q.set_ready(true);
    mem.write_obj(1u16, GuestAddress(SCRATCH_AVAIL + 2))
        .expect("scratch avail index");
    mem.write_obj(head, GuestAddress(SCRATCH_AVAIL + 4))
        .expect("scratch avail entry");
    q.pop_descriptor_chain(mem)
        .map(|c| c.collect())
        .unwrap_or_default()
}

/// Checks `read_chain` against `virtio_queue`'s walk; returns the length to report.
fn check_chain(mem: &Mem, desc: u64, size: u16, head: u16) -> u32 {
    let walked = virtio_walk(mem, desc, size, head);
    let complete = walked.last().is_some_and(|d| !d.has_next());
    match inflight::read_chain(mem, GuestAddress(desc), size, head) {
        Ok(chain) => {
            assert!(
                complete,
                "read_chain accepted a chain virtio_queue cut short"
            );
            let a: Vec<_> = chain.iter().map(fields).collect();
            let b: Vec<_> = walked.iter().map(fields).collect();
            assert_eq!(a, b, "read_chain and virtio_queue differ");
            assert!(chain.iter().all(|d| !d.refers_to_indirect_table()));
            chain
                .iter()
                .filter(|d| d.is_write_only())
                .fold(0u32, |n, d| n.saturating_add(d.len()))
        }
        Err(e) => {
            assert!(!complete, "read_chain refused a valid chain: {e}");
            0
        }
    }
}

/// The heads marked in queue `q`'s raw bytes, in counter order.
fn marked(b: &[u8], qbase: u64, queue_size: u16) -> Vec<u16> {
    let mut v: Vec<(u64, u16)> = (0..queue_size)
        .filter(|&h| b[(qbase + 16 + 16 * u64::from(h)) as usize] != 0)
        .map(|h| (le64(b, qbase + 24 + 16 * u64::from(h)), h))
        .collect();
    v.sort_unstable();
    v.into_iter().map(|(_, h)| h).collect()
}

fn marked_now(iq: &InflightQueue<'_>, queue_size: u16) -> Vec<u16> {
    let mut v: Vec<(u64, u16)> = (0..queue_size)
        .filter(|&h| iq.is_inflight(h))
        .map(|h| (iq.counter(h).expect("counter"), h))
        .collect();
    v.sort_unstable();
    v.into_iter().map(|(_, h)| h).collect()
}

/// Starts queue `q` and walks what it resubmits; returns the ring size if the queue
/// started (and so can go on to the crash model).
fn start_queue(
    g: &Geometry,
    file: &File,
    region: &InflightRegion,
    q: usize,
    r: &Ring,
    atomic: &GuestMemoryAtomic<Mem>,
) -> Option<u16> {
    let mem = atomic.memory();
    let vring = Vring::new(atomic.clone(), QUEUE_SIZE as u16).expect("vring");
    vring.set_queue_size(r.size);
    vring
        .set_queue_info(r.desc, r.avail, r.used)
        .expect("aligned ring addresses");
    vring.set_queue_next_avail(r.base);
    // As SET_VRING_ADDR: the used index the guest has.
    let ring_used = vring.queue_used_idx().ok();
    if let Some(u) = ring_used {
        vring.set_queue_next_used(u);
    }
    vring.set_queue_ready(true);
    let mut state = vring.get_mut();
    let size = state.get_queue().size();

    let qrs = queue_region_size(g.queue_size);
    let qbase = g.offset + qrs * q as u64;
    let before = snapshot(file, g.file_len);
    let started = inflight::start_vring(region, q, &mut state, &*mem);
    let after = snapshot(file, g.file_len);
    let Some(iq) = region.queue(q) else {
        assert!(matches!(started, Ok(ref rec) if *rec == Default::default()));
        assert!(before == after, "start_vring of an uncovered queue wrote");
        return None;
    };
    only_changed(&before, &after, qbase, qbase + qrs, "start_vring");

    // What the raw bytes say.
    let version = le16(&before, qbase + 8);
    let last_batch = le16(&before, qbase + 12);
    let old_used = le16(&before, qbase + 14);
    let Some(ring_used) = ring_used else {
        assert!(started.is_err(), "started without a used index");
        return None;
    };
    if version == 0 {
        let rec = started.expect("a fresh queue starts");
        assert!(rec.fresh && rec.resubmit.is_empty() && rec.inuse == 0);
        assert!(!rec.fixed_last_batch);
        assert_eq!(iq.version(), VERSION);
        assert_eq!(state.get_queue().next_avail(), r.base);
        assert!(iq.take_resubmit().is_empty());
        return Some(size);
    }
    let fix = old_used != ring_used && last_batch < g.queue_size;
    let expected: Vec<u16> = marked(&before, qbase, g.queue_size)
        .into_iter()
        .filter(|&h| !(fix && h == last_batch))
        .collect();
    let fits = expected.iter().all(|&h| h < size);
    let rec = match started {
        Ok(rec) => rec,
        Err(e) => {
            assert!(!fits, "refused a buffer whose heads fit the ring: {e}");
            return None;
        }
    };
    assert!(fits, "accepted head beyond the ring: {:?}", rec.resubmit);
    assert!(!rec.fresh);
    assert_eq!(rec.fixed_last_batch, fix);
    assert_eq!(rec.resubmit, expected, "heads to resubmit");
    let distinct: BTreeSet<u16> = rec.resubmit.iter().copied().collect();
    assert_eq!(distinct.len(), rec.resubmit.len(), "a head twice");
    assert!(rec.resubmit.iter().all(|&h| h < g.queue_size && h < size));
    assert_eq!(usize::from(rec.inuse), rec.resubmit.len());
    assert_eq!(marked_now(&iq, g.queue_size), rec.resubmit);
    assert_eq!(iq.used_idx(), ring_used);
    assert_eq!(
        state.get_queue().next_avail(),
        ring_used.wrapping_add(rec.inuse)
    );
    let resubmit = iq.take_resubmit();
    assert_eq!(resubmit, rec.resubmit);
    assert!(iq.take_resubmit().is_empty(), "resubmitted twice");

    // As the queue worker: each head's chain, then the used ring.
    let before = snapshot(file, g.file_len);
    let table = state.get_queue().desc_table();
    for &head in resubmit.iter().take(MAX_WALKS) {
        let len = check_chain(&mem, table, size, head);
        if inflight::add_used(&mut state, Some(&iq), head, len).is_err() {
            // The worker stops there; the head stays marked.
            break;
        }
        assert!(!iq.is_inflight(head), "completed head {head} still marked");
        let next_used = state.get_queue().next_used();
        assert_eq!(iq.used_idx(), next_used);
        let guest_used = state
            .get_queue()
            .used_idx(&*mem, std::sync::atomic::Ordering::Acquire);
        assert_eq!(guest_used.map(|u| u.0).ok(), Some(next_used));
    }
    let after = snapshot(file, g.file_len);
    only_changed(&before, &after, qbase, qbase + qrs, "add_used");
    Some(size)
}

/// Takes and completes heads of queue `q` from `ops`, crashes, maps the file again
/// and checks what recovery resubmits. Returns the new mapping.
fn crash_model(
    g: &Geometry,
    file: &File,
    region: InflightRegion,
    q: usize,
    size: u16,
    ops: &[u8],
) -> InflightRegion {
    let iq = region.queue(q).expect("queue");
    let limit = size.min(g.queue_size);
    let mut outstanding = marked_now(&iq, g.queue_size);
    let mut taken = Vec::new();
    let mut ring_used = iq.used_idx();
    let qrs = queue_region_size(g.queue_size);
    let qbase = g.offset + qrs * q as u64;
    let before = snapshot(file, g.file_len);
    for op in ops.chunks_exact(2) {
        let arg = op[1];
        match op[0] % 4 {
            0 | 1 => {
                let h = u16::from(arg) * 8 + u16::from(op[0] >> 2) % 8;
                let h = h % limit;
                if !outstanding.contains(&h) {
                    iq.get(h);
                    assert!(iq.is_inflight(h));
                    outstanding.push(h);
                    taken.push(h);
                }
            }
            2 if !outstanding.is_empty() => {
                let h = outstanding.remove(usize::from(arg) % outstanding.len());
                iq.pre_put(h);
                ring_used = ring_used.wrapping_add(1);
                iq.post_put(h, ring_used);
                assert!(!iq.is_inflight(h));
            }
            3 if !outstanding.is_empty() => {
                // Crash in the middle of a completion.
                let i = usize::from(arg >> 1) % outstanding.len();
                let h = outstanding[i];
                iq.pre_put(h);
                if arg & 1 != 0 {
                    // The used index reached the ring, the post-put did not happen.
                    ring_used = ring_used.wrapping_add(1);
                    outstanding.remove(i);
                }
                break;
            }
            _ => {}
        }
    }
    let after = snapshot(file, g.file_len);
    only_changed(&before, &after, qbase, qbase + qrs, "get/pre_put/post_put");
    drop(region);

    let region = InflightRegion::map(
        file,
        g.offset,
        g.len,
        g.num_queues,
        g.queue_size,
        g.max_queues,
    )
    .expect("the same buffer maps again");
    let iq = region.queue(q).expect("queue");
    let fits = outstanding.iter().all(|&h| h < size);
    match iq.recover(ring_used, size) {
        Ok(rec) => {
            assert!(fits, "recovered a head beyond the ring");
            assert!(!rec.fresh);
            let got: BTreeSet<u16> = rec.resubmit.iter().copied().collect();
            let want: BTreeSet<u16> = outstanding.iter().copied().collect();
            assert_eq!(got, want, "resubmitted heads after the crash");
            assert_eq!(got.len(), rec.resubmit.len());
            assert_eq!(usize::from(rec.inuse), rec.resubmit.len());
            assert_eq!(iq.take_resubmit(), rec.resubmit);
            // Heads taken in this run come back in the order they were taken, unless
            // the front-end's counters made ours wrap around.
            let counters: Vec<u64> = taken
                .iter()
                .filter(|h| got.contains(h))
                .map(|&h| iq.counter(h).expect("counter"))
                .collect();
            if counters.windows(2).all(|w| w[0] < w[1]) {
                let order: Vec<u16> = rec
                    .resubmit
                    .iter()
                    .copied()
                    .filter(|h| taken.contains(h))
                    .collect();
                let want: Vec<u16> = taken.iter().copied().filter(|h| got.contains(h)).collect();
                assert_eq!(order, want, "resubmission order");
            }
        }
        Err(e) => assert!(!fits, "refused to recover heads that fit: {e}"),
    }
    region
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let flags = inp.u8();
    let g = geometry(&mut inp, flags);
    let queues = usize::from(g.num_queues).min(MAX_QUEUES);
    let rings: Vec<Ring> = (0..queues).map(|_| ring(&mut inp)).collect();

    let file = new_memfd(g.file_len).expect("memfd");
    let n = usize::from(inp.u16());
    let bytes = inp.bytes(n);
    if g.offset < g.file_len {
        let room = (g.file_len - g.offset) as usize;
        file.write_all_at(&bytes[..bytes.len().min(room)], g.offset)
            .expect("fill the buffer");
    }
    let mem = Mem::from_ranges(&[(GuestAddress(0), GUEST as usize)]).expect("guest memory");
    let n = usize::from(inp.u16());
    let init = inp.bytes(n.min(GUEST as usize));
    mem.write_slice(init, GuestAddress(0))
        .expect("fill guest memory");
    for r in &rings {
        let n = usize::from(inp.u8()) * 4;
        write_table(&mem, r.desc, inp.bytes(n));
    }
    let atomic = GuestMemoryAtomic::new(mem);

    let mapped = InflightRegion::map(
        &file,
        g.offset,
        g.len,
        g.num_queues,
        g.queue_size,
        g.max_queues,
    );
    let geometry_ok = check_geometry(g.num_queues, g.queue_size, g.max_queues).is_ok();
    let Ok(mut region) = mapped else {
        return;
    };
    assert!(geometry_ok, "mapped a geometry check_geometry refuses");
    let need = queue_region_size(g.queue_size) * u64::from(g.num_queues);
    assert!(g.len >= need && g.offset + g.len <= g.file_len);
    assert_eq!(region.num_queues(), g.num_queues);
    assert_eq!(region.queue_size(), g.queue_size);

    let mut started = Vec::new();
    for (q, r) in rings.iter().enumerate() {
        started.push(start_queue(&g, &file, &region, q, r, &atomic));
    }
    // A queue the buffer does not cover.
    let beyond = Ring {
        size: 1,
        desc: 0,
        avail: 0,
        used: 0,
        base: 0,
    };
    if queues < MAX_QUEUES {
        start_queue(
            &g,
            &file,
            &region,
            usize::from(g.num_queues),
            &beyond,
            &atomic,
        );
    }
    for (q, size) in started.into_iter().enumerate() {
        let n = usize::from(inp.u8()) * 2;
        let ops = inp.bytes(n);
        if let Some(size) = size {
            region = crash_model(&g, &file, region, q, size, ops);
        }
    }
});

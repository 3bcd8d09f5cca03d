//! Dirty-page logging for live migration.
//!
//! The front-end shares a log with `SET_LOG_BASE` (one bit per 4 KiB guest page) and
//! switches logging on and off with `VHOST_F_LOG_ALL` in `SET_FEATURES`. Every guest
//! region's memory carries a [`DirtyLog`]: writes made through vm-memory (status bytes,
//! used-ring entries, GET_ID answers) mark it by themselves; writes that bypass
//! vm-memory (reads done in place by io_uring or through raw pointers) are marked by
//! the worker with [`vm_memory::bitmap::Bitmap::mark_dirty`] before their used-ring
//! entry is written.
//!
//! vhost-user-backend maps the log and installs it in every region on `SET_LOG_BASE`,
//! and would mark it from then on, whatever `VHOST_F_LOG_ALL` says. A [`DirtyLog`]
//! also has a switch, which the device sets from the acked features (and on every new
//! memory table): a page is marked only while the region has a log **and** the
//! front-end has `VHOST_F_LOG_ALL` acked, as the vhost-user specification says (and as
//! libvhost-user does).
//!
//! The crate also leaves regions that arrive after `SET_LOG_BASE` (`SET_MEM_TABLE`,
//! `ADD_MEM_REG` while migrating: QEMU keeps its log across memory-table changes)
//! without a log. [`LogCarrier`] gives them the log the previous regions had.

use log::warn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vhost_user_backend::bitmap::{
    AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace, MemRegionBitmap, MmapLogReg,
};
use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest memory whose regions carry a [`DirtyLog`].
pub type LoggedMemory = GuestMemoryMmap<DirtyLog>;

/// The dirty log of one guest memory region (and of every slice taken from it).
#[derive(Default, Debug, Clone)]
pub struct DirtyLog {
    log: BitmapMmapRegion,
    /// Shared by the region and its slices: VHOST_F_LOG_ALL is acked.
    on: Arc<AtomicBool>,
    /// The whole shared log this region marks into, if any.
    mapped: Arc<Mutex<Option<Arc<MmapLogReg>>>>,
}

impl DirtyLog {
    /// Switches marking on or off for this region (a region without a log marks
    /// nothing either way).
    pub fn set_logging(&self, on: bool) {
        self.on.store(on, Ordering::Release);
    }

    /// Whether marking is switched on.
    pub fn logging(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// The shared log this region marks into.
    fn mapped(&self) -> Option<Arc<MmapLogReg>> {
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.logging() {
            self.log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> DirtySlice<'_> {
        DirtySlice {
            region: self,
            offset,
        }
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = DirtySlice<'a>;
}

/// The dirty log of a slice of guest memory: its region's log and where the slice
/// starts. Taken for every guest memory access (each request's header, buffers
/// and status), so it borrows the region's log rather than holding references of
/// its own (which every queue's accesses would count up and down on shared cache
/// lines).
#[derive(Debug, Clone, Copy)]
pub struct DirtySlice<'a> {
    region: &'a DirtyLog,
    offset: usize,
}

impl<'a> DirtySlice<'a> {
    /// The log of the slice's whole region.
    pub fn log(&self) -> &'a DirtyLog {
        self.region
    }
}

impl Bitmap for DirtySlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(at) = self.offset.checked_add(offset) {
            self.region.mark_dirty(at, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.region.dirty_at(self.offset.saturating_add(offset))
    }

    fn slice_at(&self, offset: usize) -> Self {
        DirtySlice {
            region: self.region,
            offset: self.offset.saturating_add(offset),
        }
    }
}

impl BitmapSlice for DirtySlice<'_> {}

impl<'a> WithBitmapSlice<'a> for DirtySlice<'_> {
    type S = Self;
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

/// One region's view of the shared log, and the log itself.
#[derive(Debug)]
pub struct RegionLog {
    view: AtomicBitmapMmap,
    mapped: Arc<MmapLogReg>,
}

impl MemRegionBitmap for RegionLog {
    fn new<R: GuestMemoryRegion>(region: &R, logmem: Arc<MmapLogReg>) -> std::io::Result<Self> {
        Ok(RegionLog {
            view: AtomicBitmapMmap::new(region, logmem.clone())?,
            mapped: logmem,
        })
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = RegionLog;

    /// `SET_LOG_BASE`: the region's log from now on (marked while logging is on).
    fn replace(&self, bitmap: RegionLog) {
        self.log.replace(bitmap.view);
        *self.mapped.lock().unwrap_or_else(|e| e.into_inner()) = Some(bitmap.mapped);
    }
}

/// Switches logging on or off in every region of `mem`.
pub fn set_logging(mem: &LoggedMemory, on: bool) {
    for region in mem.iter() {
        region.bitmap().log().set_logging(on);
    }
}

/// Carries the shared log from one memory table to the next.
#[derive(Default)]
pub struct LogCarrier {
    /// The memory table last seen (its regions get the log in place on SET_LOG_BASE).
    current: Option<Arc<LoggedMemory>>,
    /// The last shared log seen in a region.
    log: Option<Arc<MmapLogReg>>,
}

impl LogCarrier {
    /// A new memory table: its regions without a log get the one the previous regions
    /// had (when it covers them).
    pub fn carry(&mut self, new: Arc<LoggedMemory>) {
        let previous = self.current.take();
        for region in previous.iter().flat_map(|m| m.iter()).chain(new.iter()) {
            if let Some(l) = region.bitmap().log().mapped() {
                self.log = Some(l);
                break;
            }
        }
        if let Some(log) = &self.log {
            for region in new.iter() {
                if region.bitmap().log().mapped().is_some() {
                    continue;
                }
                match RegionLog::new(region, log.clone()) {
                    Ok(l) => region.bitmap().log().replace(l),
                    Err(e) => warn!(
                        "guest memory at {:#x}: outside the dirty log ({e}); not logged until \
                         the next SET_LOG_BASE",
                        region.start_addr().0
                    ),
                }
            }
        }
        self.current = Some(new);
    }

    /// The front-end left: forget its memory and its log.
    pub fn clear(&mut self) {
        *self = LogCarrier::default();
    }
}

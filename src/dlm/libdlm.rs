//! The real Linux DLM through libdlm (`libdlm_lt.so.3`, loaded at run time: no
//! build-time C dependency). Completions and blocking callbacks are read from the
//! lockspace's file descriptor by a dispatch thread and turned into [`Event`]s.
//!
//! What libdlm does not give (spec §6.5): membership events and the blocked mode
//! of a BAST. Userspace lockspaces have 32-byte LVBs.

use super::stack::{self, Loss, OnLost, Probe};
use super::{DlmError, Event, LockId, LockSpace, Mode, NodeId, Status};
use crossbeam_channel::{unbounded, Receiver, Sender};
use libloading::{Library, Symbol};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// LVB size of userspace lockspaces (`DLM_USER_LVB_LEN`).
pub const LVB_LEN: usize = 32;
/// libdlm's positive status values.
const EUNLOCK: c_int = 0x10002;
const ECANCEL: c_int = 0x10001;
/// `DLM_SBF_VALNOTVALID`.
const SBF_VALNOTVALID: c_char = 0x2;

/// `struct dlm_lksb`.
#[repr(C)]
struct Lksb {
    sb_status: c_int,
    sb_lkid: u32,
    sb_flags: c_char,
    sb_lvbptr: *mut c_char,
}

type LsHandle = *mut c_void;
type Callback = extern "C" fn(*mut c_void);
type CreateFn = unsafe extern "C" fn(*const c_char, libc::mode_t) -> LsHandle;
type ReleaseFn = unsafe extern "C" fn(*const c_char, LsHandle, c_int) -> c_int;
type GetFdFn = unsafe extern "C" fn(LsHandle) -> c_int;
type DispatchFn = unsafe extern "C" fn(c_int) -> c_int;
type LockFn = unsafe extern "C" fn(
    LsHandle,
    u32,
    *mut Lksb,
    u32,
    *const c_void,
    c_uint,
    u32,
    Option<Callback>,
    *mut c_void,
    Option<Callback>,
    *mut c_void,
) -> c_int;
type UnlockFn = unsafe extern "C" fn(LsHandle, u32, u32, *mut Lksb, *mut c_void) -> c_int;

/// Per-lock state the library writes into; boxed so its address is stable.
struct LockState {
    lksb: Lksb,
    lvb: [u8; LVB_LEN],
    id: LockId,
    tx: Sender<Event>,
    /// Granted mode (`None` until the first grant).
    granted: Option<Mode>,
    /// Mode of the request in progress.
    requested: Mode,
    /// The request in progress has VALBLK.
    valblk: bool,
}

extern "C" fn ast(arg: *mut c_void) {
    // SAFETY: `arg` is the LockState box registered with this lock; boxes live as
    // long as the member, which outlives its dispatch thread. libdlm calls this from
    // `dlm_dispatch`, which runs under the `call` mutex, as does every other access.
    let st = unsafe { &mut *(arg as *mut LockState) };
    let status = match st.lksb.sb_status {
        0 => Status::Granted,
        libc::EAGAIN => Status::Again,
        libc::EDEADLK => Status::Deadlock,
        EUNLOCK => Status::Unlocked,
        ECANCEL => Status::Cancelled,
        other => {
            log::warn!("lock {}: unexpected DLM status {other}", st.id);
            return;
        }
    };
    // The buffer holds what the DLM read only when the grant reads the LVB; on other
    // transitions it still holds what this lock last wrote or read.
    let read = status == Status::Granted && st.valblk && Mode::lvb_read(st.granted, st.requested);
    match status {
        Status::Granted => st.granted = Some(st.requested),
        Status::Unlocked => st.granted = None,
        _ => {}
    }
    let _ = st.tx.send(Event::Ast {
        lock: st.id,
        status,
        lvb: read.then(|| st.lvb.to_vec()),
        lvb_invalid: st.lksb.sb_flags & SBF_VALNOTVALID != 0,
    });
}

extern "C" fn bast(arg: *mut c_void) {
    // SAFETY: as in `ast`.
    let st = unsafe { &*(arg as *const LockState) };
    let _ = st.tx.send(Event::Bast {
        lock: st.id,
        mode: None,
    });
}

/// Whether the lockspace device tells that the lockspace is gone: poll reports it
/// hung up or failed, or `dlm_dispatch` failed (`(rc, errno)`) other than for
/// want of completions (errno EAGAIN or EINTR; 0 means end of file).
fn device_lost(revents: libc::c_short, rc: Option<(c_int, Option<i32>)>) -> Option<String> {
    if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        return Some("the lockspace device hung up".into());
    }
    match rc {
        None => None,
        Some((rc, _)) if rc >= 0 => None,
        Some((_, Some(libc::EAGAIN) | Some(libc::EINTR))) => None,
        Some((_, Some(0) | None)) => Some("the lockspace device reached its end".into()),
        Some((_, Some(e))) => Some(format!(
            "reading the lockspace device failed: {}",
            std::io::Error::from_raw_os_error(e)
        )),
    }
}

struct Api {
    _lib: Library,
    create: CreateFn,
    release: ReleaseFn,
    get_fd: GetFdFn,
    dispatch: DispatchFn,
    lock: LockFn,
    unlock: UnlockFn,
}

/// Refuses when a kernel md-cluster node on this host has the array's lockspace:
/// the DLM would hand our 32-byte value blocks a 64-byte-LVB kernel lockspace
/// (spec §6.7). A lockspace that userspace created has a `dlm_NAME` misc device; a
/// kernel one has none.
pub fn refuse_kernel_lockspace(lockspace: &str, array: &str) -> Result<(), String> {
    let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
    kernel_lockspace_check(
        lockspace,
        array,
        std::path::Path::new("/sys/kernel/dlm")
            .join(lockspace)
            .exists(),
        &misc,
    )
}

fn kernel_lockspace_check(
    lockspace: &str,
    array: &str,
    in_sysfs: bool,
    proc_misc: &str,
) -> Result<(), String> {
    let device = format!("dlm_{lockspace}");
    let userspace = proc_misc
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(device.as_str()));
    if in_sysfs && !userspace {
        return Err(format!(
            "array {array} is active on a kernel md-cluster node on this host (DLM lockspace \
             {lockspace} belongs to the kernel); stop it there (mdadm --stop) before serving it"
        ));
    }
    Ok(())
}

fn load(path: &str) -> Result<Api, DlmError> {
    let missing = |e: libloading::Error| {
        DlmError::Unavailable(format!(
            "cannot load {path} ({e}); install libdlm3 (apt-get install libdlm3)"
        ))
    };
    // SAFETY: loading libdlm runs no initialisers with preconditions.
    let lib = unsafe { Library::new(path) }.map_err(missing)?;
    // SAFETY: the symbol types match libdlm.h (checked against libdlm 4.x).
    unsafe {
        let create: Symbol<CreateFn> = lib.get(b"dlm_create_lockspace\0").map_err(missing)?;
        let release: Symbol<ReleaseFn> = lib.get(b"dlm_release_lockspace\0").map_err(missing)?;
        let get_fd: Symbol<GetFdFn> = lib.get(b"dlm_ls_get_fd\0").map_err(missing)?;
        let dispatch: Symbol<DispatchFn> = lib.get(b"dlm_dispatch\0").map_err(missing)?;
        let lock: Symbol<LockFn> = lib.get(b"dlm_ls_lock\0").map_err(missing)?;
        let unlock: Symbol<UnlockFn> = lib.get(b"dlm_ls_unlock\0").map_err(missing)?;
        Ok(Api {
            create: *create,
            release: *release,
            get_fd: *get_fd,
            dispatch: *dispatch,
            lock: *lock,
            unlock: *unlock,
            _lib: lib,
        })
    }
}

struct Shared {
    api: Api,
    ls: LsHandle,
    name: CString,
    /// Every libdlm call happens under this lock (libdlm_lt is not thread-safe).
    call: Mutex<HashMap<LockId, Box<LockState>>>,
    stop: AtomicBool,
    /// The lockspace was released: the handle is gone.
    released: AtomicBool,
    /// Told when the lockspace or the stack under it fails.
    loss: Arc<Loss>,
}

// SAFETY: the raw handle is only used under `call`'s mutex.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// A member of a DLM lockspace through libdlm.
pub struct LibDlmMember {
    /// This host's corosync node id, when known (libdlm does not tell it).
    node_id: std::sync::atomic::AtomicU32,
    shared: Arc<Shared>,
    tx: Sender<Event>,
    events: Receiver<Event>,
    dispatcher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl LibDlmMember {
    /// Creates or joins lockspace `name` through `libdlm_lt.so.3`.
    pub fn join(name: &str) -> Result<LibDlmMember, DlmError> {
        Self::join_with("libdlm_lt.so.3", name)
    }

    /// Sets the node id [`LockSpace::node`] reports (this host's corosync node id).
    pub fn set_node_id(&self, id: NodeId) {
        self.node_id.store(id, std::sync::atomic::Ordering::Relaxed);
    }

    /// As [`LibDlmMember::join`] with the library at `lib`.
    pub fn join_with(lib: &str, name: &str) -> Result<LibDlmMember, DlmError> {
        let api = load(lib)?;
        let cname = CString::new(name)
            .map_err(|_| DlmError::Unavailable(format!("bad lockspace name {name:?}")))?;
        // SAFETY: a valid NUL-terminated name; the handle is checked for NULL.
        let ls = unsafe { (api.create)(cname.as_ptr(), 0o600) };
        if ls.is_null() {
            let e = std::io::Error::last_os_error();
            let why = if !std::fs::read_to_string("/proc/misc")
                .unwrap_or_default()
                .contains("dlm-control")
            {
                "the dlm kernel module is not loaded (modprobe dlm; corosync and dlm_controld must run)".to_string()
            } else if e.raw_os_error().unwrap_or(0) != 0 {
                format!("{e} (needs root, and corosync + dlm_controld running)")
            } else {
                "needs root, and corosync + dlm_controld running".to_string()
            };
            return Err(DlmError::Unavailable(format!(
                "cannot create DLM lockspace {name}: {why}"
            )));
        }
        // SAFETY: `ls` is a valid handle.
        let fd = unsafe { (api.get_fd)(ls) };
        let shared = Arc::new(Shared {
            api,
            ls,
            name: cname,
            call: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            released: AtomicBool::new(false),
            loss: Loss::new(),
        });
        let (tx, rx) = unbounded();
        let s2 = shared.clone();
        let dispatcher = std::thread::Builder::new()
            .name("dlm-dispatch".into())
            .spawn(move || {
                while !s2.stop.load(Ordering::Relaxed) {
                    let mut p = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    let n = unsafe { libc::poll(&mut p, 1, 200) };
                    if n <= 0 {
                        continue;
                    }
                    let rc = if p.revents & libc::POLLIN != 0 {
                        let _g = s2.call.lock().unwrap_or_else(|e| e.into_inner());
                        // dlm_dispatch fails on a read error and on end of file alike,
                        // leaving errno as it was on the latter.
                        // SAFETY: errno is this thread's.
                        unsafe { *libc::__errno_location() = 0 };
                        // SAFETY: the fd belongs to the open lockspace; callbacks get
                        // LockState boxes that `call` keeps alive.
                        let rc = unsafe { (s2.api.dispatch)(fd) };
                        Some((rc, std::io::Error::last_os_error().raw_os_error()))
                    } else {
                        None
                    };
                    if let Some(why) = device_lost(p.revents, rc) {
                        if !s2.stop.load(Ordering::Relaxed) {
                            log::warn!("DLM lockspace device: {why}");
                            s2.loss.report(&why);
                        }
                        return;
                    }
                }
            })
            .map_err(|e| DlmError::Unavailable(e.to_string()))?;
        Ok(LibDlmMember {
            node_id: std::sync::atomic::AtomicU32::new(0),
            shared,
            tx,
            events: rx,
            dispatcher: Mutex::new(Some(dispatcher)),
        })
    }

    /// Leaves the lockspace (releasing our locks) now, even while other parts of the
    /// process still hold this member; later requests fail. A process that exits
    /// without this leaves the lockspace joined on its host, where a kernel md-cluster
    /// join of the same array would then hang (spec §6.7).
    pub fn release(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if self.shared.loss.lost().is_none() {
            self.shared.loss.close();
        }
        let t = self
            .dispatcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = t {
            let _ = t.join();
        }
        let _g = self.shared.call.lock().unwrap_or_else(|e| e.into_inner());
        if self.shared.released.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: the handle is valid (not released yet, checked under `call`) and the
        // dispatcher has stopped; force=1 releases our remaining locks.
        let rc = unsafe { (self.shared.api.release)(self.shared.name.as_ptr(), self.shared.ls, 1) };
        if rc != 0 {
            log::warn!(
                "dlm_release_lockspace {:?}: {}",
                self.shared.name,
                std::io::Error::last_os_error()
            );
        }
    }

    /// Calls `f` once if the lockspace is lost: its device fails, or a request
    /// finds dlm_controld gone. Every lock is gone then (the other nodes recover
    /// this one as dead), and requests fail from then on.
    pub fn on_lost(&self, f: OnLost) {
        self.shared.loss.on_lost(f);
    }

    /// Where a loss seen elsewhere is reported (corosync, the watch of
    /// dlm_controld): requests fail from then on, and the listener of
    /// [`LibDlmMember::on_lost`] is told.
    pub fn loss(&self) -> Arc<Loss> {
        self.shared.loss.clone()
    }

    fn check_joined(&self) -> Result<(), DlmError> {
        if self.shared.released.load(Ordering::SeqCst) {
            return Err(DlmError::Rejected("the lockspace was released".into()));
        }
        if let Some(why) = self.shared.loss.lost() {
            return Err(DlmError::Unavailable(why));
        }
        // Without dlm_controld the kernel has stopped the lockspace, and a request
        // would block in the kernel for good: look first (a connect, no more).
        if let Probe::Gone(why) = stack::controld_probe() {
            self.shared.loss.report(&why);
            return Err(DlmError::Unavailable(why));
        }
        Ok(())
    }

    fn err(what: &str, rc: c_int) -> DlmError {
        let e = std::io::Error::last_os_error();
        DlmError::Rejected(format!("{what} failed ({rc}): {e}"))
    }

    /// `dlm_ls_lock` for the lock whose state is at `p` (a conversion when `flags`
    /// has CONVERT; then `name` is ignored).
    ///
    /// # Safety
    /// `p` must point to a live LockState that stays alive (and in place) until the
    /// member is dropped; the `call` mutex must be held.
    unsafe fn request(&self, p: *mut LockState, mode: Mode, flags: u32, name: &[u8]) -> c_int {
        // SAFETY: guaranteed by the caller; `name` is valid for the call.
        unsafe {
            (self.shared.api.lock)(
                self.shared.ls,
                mode as u32,
                &mut (*p).lksb,
                flags,
                if name.is_empty() {
                    std::ptr::null()
                } else {
                    name.as_ptr() as *const c_void
                },
                name.len() as c_uint,
                0,
                Some(ast),
                p as *mut c_void,
                Some(bast),
                std::ptr::null_mut(),
            )
        }
    }

    fn fill_lvb(st: &mut LockState, lvb: Option<&[u8]>) {
        if let Some(b) = lvb {
            let n = b.len().min(LVB_LEN);
            st.lvb[..n].copy_from_slice(&b[..n]);
        }
    }
}

impl Drop for LibDlmMember {
    fn drop(&mut self) {
        self.release();
    }
}

impl LockSpace for LibDlmMember {
    fn node(&self) -> NodeId {
        self.node_id.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lvb_len(&self) -> usize {
        LVB_LEN
    }

    fn lock(
        &self,
        name: &[u8],
        mode: Mode,
        flags: u32,
        lvb: Option<&[u8]>,
    ) -> Result<LockId, DlmError> {
        let mut locks = self.shared.call.lock().unwrap_or_else(|e| e.into_inner());
        self.check_joined()?;
        let mut st = Box::new(LockState {
            lksb: Lksb {
                sb_status: 0,
                sb_lkid: 0,
                sb_flags: 0,
                sb_lvbptr: std::ptr::null_mut(),
            },
            lvb: [0; LVB_LEN],
            id: 0,
            tx: self.tx.clone(),
            granted: None,
            requested: mode,
            valblk: flags & super::flags::VALBLK != 0,
        });
        Self::fill_lvb(&mut st, lvb);
        st.lksb.sb_lvbptr = st.lvb.as_mut_ptr() as *mut c_char;
        let p: *mut LockState = &mut *st;
        // SAFETY: the box is kept in `locks` until the member is dropped.
        let rc = unsafe { self.request(p, mode, flags, name) };
        if rc != 0 {
            return Err(Self::err("dlm_ls_lock", rc));
        }
        let id = st.lksb.sb_lkid;
        st.id = id;
        locks.insert(id, st);
        Ok(id)
    }

    fn convert(
        &self,
        lock: LockId,
        mode: Mode,
        flags: u32,
        lvb: Option<&[u8]>,
    ) -> Result<(), DlmError> {
        let mut locks = self.shared.call.lock().unwrap_or_else(|e| e.into_inner());
        self.check_joined()?;
        let st = locks
            .get_mut(&lock)
            .ok_or_else(|| DlmError::Rejected(format!("no such lock {lock}")))?;
        Self::fill_lvb(st, lvb);
        st.requested = mode;
        st.valblk = flags & super::flags::VALBLK != 0;
        let p: *mut LockState = &mut **st;
        // SAFETY: the box is kept in `locks` until the member is dropped.
        let rc = unsafe { self.request(p, mode, flags | super::flags::CONVERT, &[]) };
        if rc != 0 {
            return Err(Self::err("dlm_ls_lock (convert)", rc));
        }
        Ok(())
    }

    fn unlock(&self, lock: LockId, flags: u32, lvb: Option<&[u8]>) -> Result<(), DlmError> {
        let mut locks = self.shared.call.lock().unwrap_or_else(|e| e.into_inner());
        self.check_joined()?;
        let st = locks
            .get_mut(&lock)
            .ok_or_else(|| DlmError::Rejected(format!("no such lock {lock}")))?;
        Self::fill_lvb(st, lvb);
        let p: *mut LockState = &mut **st;
        // SAFETY: as in `lock`.
        let rc = unsafe {
            (self.shared.api.unlock)(
                self.shared.ls,
                lock,
                flags,
                &mut (*p).lksb,
                p as *mut c_void,
            )
        };
        if rc != 0 {
            return Err(Self::err("dlm_ls_unlock", rc));
        }
        Ok(())
    }

    fn events(&self) -> Receiver<Event> {
        self.events.clone()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_kernel_lockspace_on_this_host_is_refused() {
        let ls = "0a1b2c3d-0000-0000-0000-000000000001";
        let misc_ours = format!(" 58 dlm_{ls}\n 59 dlm-control\n");
        let misc_none = " 59 dlm-control\n 60 dlm_plock\n";
        assert!(kernel_lockspace_check(ls, "u", false, misc_none).is_ok());
        assert!(kernel_lockspace_check(ls, "u", true, &misc_ours).is_ok());
        let e = kernel_lockspace_check(ls, "u", true, misc_none).unwrap_err();
        assert!(e.contains("kernel md-cluster node on this host"), "{e}");
    }
    use super::*;

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let e = LibDlmMember::join_with("libdlm-not-here.so.3", "x")
            .err()
            .unwrap();
        let s = e.to_string();
        assert!(
            s.contains("libdlm-not-here.so.3") && s.contains("install libdlm3"),
            "{s}"
        );
    }

    #[test]
    fn without_a_running_dlm_joining_is_a_clear_error() {
        // Here there is no DLM (no kernel module, no dlm_controld): whether libdlm is
        // installed or not, joining fails with a message that says what is missing.
        let e = LibDlmMember::join("vumd-no-dlm-here")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("install libdlm3") || e.contains("dlm_controld"),
            "{e}"
        );
    }

    #[test]
    fn a_failing_or_closed_lockspace_device_is_a_loss() {
        assert!(device_lost(libc::POLLIN, Some((0, Some(0)))).is_none());
        assert!(device_lost(libc::POLLIN, Some((-1, Some(libc::EAGAIN)))).is_none());
        assert!(device_lost(libc::POLLIN, Some((-1, Some(libc::EINTR)))).is_none());
        assert!(device_lost(0, None).is_none());
        let eof = device_lost(libc::POLLIN, Some((-1, Some(0)))).unwrap();
        assert!(eof.contains("end"), "{eof}");
        let e = device_lost(libc::POLLIN, Some((-1, Some(libc::ENODEV)))).unwrap();
        assert!(e.contains("failed"), "{e}");
        assert!(device_lost(libc::POLLHUP, None)
            .unwrap()
            .contains("hung up"));
    }

    #[test]
    fn lksb_layout_matches_libdlm() {
        assert_eq!(std::mem::offset_of!(Lksb, sb_lkid), 4);
        assert_eq!(std::mem::offset_of!(Lksb, sb_flags), 8);
        assert_eq!(std::mem::offset_of!(Lksb, sb_lvbptr), 16);
        assert_eq!(std::mem::size_of::<Lksb>(), 24);
    }
}

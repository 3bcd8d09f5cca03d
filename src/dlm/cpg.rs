//! Corosync process groups (libcpg, `libcpg.so.4`, loaded at run time) for the
//! kernel exclusion check of spec §7.1 item 2: every node of ours joins the CPG
//! group `vumd:<lockspace>` before it creates the array's lockspace, and refuses to
//! join when `dlm:ls:<lockspace>` (the group dlm_controld joins for each node that
//! has the lockspace) has a member node that is not in ours — a kernel md-cluster
//! node. The DLM would refuse such a join as well (LVB length mismatch) but only
//! after disturbing the kernel members with a recovery cycle (spec §6.7).
//!
//! The group's membership changes are also passed on (see [`OurGroup::on_members`]):
//! a member that leaves is the first sign of a node's death, before the DLM has
//! recovered and released its locks.

use super::stack::{Loss, OnLost};
use libloading::{Library, Symbol};
use log::{info, warn};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Told how many other members our group has, and the corosync node ids of the
/// members that left, at every membership change.
type MembersListener = Box<dyn Fn(usize, &[u32]) + Send>;

/// The listener of the one group a process joins.
static LISTENER: Mutex<Option<MembersListener>> = Mutex::new(None);

const CS_OK: c_int = 1;
const CS_ERR_TRY_AGAIN: c_int = 6;
const CS_DISPATCH_ALL: c_int = 2;
const CPG_ITERATION_ALL: c_int = 3;
const CPG_MAX_NAME_LENGTH: usize = 128;

/// `struct cpg_name`.
#[repr(C)]
#[derive(Clone, Copy)]
struct CpgName {
    length: u32,
    value: [u8; CPG_MAX_NAME_LENGTH],
}

impl CpgName {
    fn new(s: &str) -> Result<CpgName, String> {
        if s.len() > CPG_MAX_NAME_LENGTH {
            return Err(format!("CPG group name {s} is too long"));
        }
        let mut v = [0u8; CPG_MAX_NAME_LENGTH];
        v[..s.len()].copy_from_slice(s.as_bytes());
        Ok(CpgName {
            length: s.len() as u32,
            value: v,
        })
    }
}

/// `struct cpg_address`.
#[repr(C)]
struct CpgAddress {
    nodeid: u32,
    pid: u32,
    reason: u32,
}

/// `struct cpg_iteration_description_t`.
#[repr(C)]
struct IterDesc {
    group: CpgName,
    nodeid: u32,
    pid: u32,
}

type Handle = u64;
type DeliverFn = extern "C" fn(Handle, *const CpgName, u32, u32, *mut c_void, usize);
type ConfchgFn = extern "C" fn(
    Handle,
    *const CpgName,
    *const CpgAddress,
    usize,
    *const CpgAddress,
    usize,
    *const CpgAddress,
    usize,
);

/// `cpg_callbacks_t`.
#[repr(C)]
struct Callbacks {
    deliver: Option<DeliverFn>,
    confchg: Option<ConfchgFn>,
}

type InitializeFn = unsafe extern "C" fn(*mut Handle, *const Callbacks) -> c_int;
type FinalizeFn = unsafe extern "C" fn(Handle) -> c_int;
type JoinFn = unsafe extern "C" fn(Handle, *const CpgName) -> c_int;
type LocalGetFn = unsafe extern "C" fn(Handle, *mut u32) -> c_int;
type FdGetFn = unsafe extern "C" fn(Handle, *mut c_int) -> c_int;
type DispatchFn = unsafe extern "C" fn(Handle, c_int) -> c_int;
type IterInitFn = unsafe extern "C" fn(Handle, c_int, *const CpgName, *mut u64) -> c_int;
type IterNextFn = unsafe extern "C" fn(u64, *mut IterDesc) -> c_int;
type IterFinalizeFn = unsafe extern "C" fn(u64) -> c_int;

extern "C" fn deliver(_: Handle, _: *const CpgName, _: u32, _: u32, _: *mut c_void, _: usize) {}

extern "C" fn confchg(
    _: Handle,
    group: *const CpgName,
    _: *const CpgAddress,
    n_members: usize,
    left: *const CpgAddress,
    n_left: usize,
    joined: *const CpgAddress,
    n_joined: usize,
) {
    // SAFETY: libcpg passes valid arrays of the given lengths and a valid group name
    // for the duration of the callback.
    let (group, left, joined) = unsafe {
        let g = &*group;
        let len = (g.length as usize).min(CPG_MAX_NAME_LENGTH);
        (
            String::from_utf8_lossy(&g.value[..len]).into_owned(),
            slice(left, n_left),
            slice(joined, n_joined),
        )
    };
    for a in joined {
        info!("{group}: node {} (pid {}) joined", a.nodeid, a.pid);
    }
    for a in left {
        info!(
            "{group}: node {} (pid {}) left (reason {})",
            a.nodeid, a.pid, a.reason
        );
    }
    // The member list includes this process.
    if let Some(f) = LISTENER.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        let gone: Vec<u32> = left.iter().map(|a| a.nodeid).collect();
        f(n_members.saturating_sub(1), &gone);
    }
}

/// # Safety
/// `p` must be valid for `n` elements (or `n` is 0).
unsafe fn slice<'a>(p: *const CpgAddress, n: usize) -> &'a [CpgAddress] {
    if p.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(p, n) }
    }
}

struct Api {
    _lib: Library,
    initialize: InitializeFn,
    finalize: FinalizeFn,
    join: JoinFn,
    local_get: LocalGetFn,
    fd_get: FdGetFn,
    dispatch: DispatchFn,
    iter_init: IterInitFn,
    iter_next: IterNextFn,
    iter_finalize: IterFinalizeFn,
}

fn load(path: &str) -> Result<Api, String> {
    let missing = |e: libloading::Error| format!("cannot load {path} ({e})");
    // SAFETY: loading libcpg runs no initialisers with preconditions.
    let lib = unsafe { Library::new(path) }.map_err(missing)?;
    // SAFETY: the symbol types match corosync's cpg.h (corosync 2.x and 3.x).
    unsafe {
        let initialize: Symbol<InitializeFn> = lib.get(b"cpg_initialize\0").map_err(missing)?;
        let finalize: Symbol<FinalizeFn> = lib.get(b"cpg_finalize\0").map_err(missing)?;
        let join: Symbol<JoinFn> = lib.get(b"cpg_join\0").map_err(missing)?;
        let local_get: Symbol<LocalGetFn> = lib.get(b"cpg_local_get\0").map_err(missing)?;
        let fd_get: Symbol<FdGetFn> = lib.get(b"cpg_fd_get\0").map_err(missing)?;
        let dispatch: Symbol<DispatchFn> = lib.get(b"cpg_dispatch\0").map_err(missing)?;
        let iter_init: Symbol<IterInitFn> =
            lib.get(b"cpg_iteration_initialize\0").map_err(missing)?;
        let iter_next: Symbol<IterNextFn> = lib.get(b"cpg_iteration_next\0").map_err(missing)?;
        let iter_finalize: Symbol<IterFinalizeFn> =
            lib.get(b"cpg_iteration_finalize\0").map_err(missing)?;
        Ok(Api {
            initialize: *initialize,
            finalize: *finalize,
            join: *join,
            local_get: *local_get,
            fd_get: *fd_get,
            dispatch: *dispatch,
            iter_init: *iter_init,
            iter_next: *iter_next,
            iter_finalize: *iter_finalize,
            _lib: lib,
        })
    }
}

/// The CPG group every node of ours joins for `lockspace`.
pub fn our_group(lockspace: &str) -> String {
    format!("vumd:{lockspace}")
}

/// The CPG group dlm_controld joins on every node that has `lockspace`.
pub fn dlm_group(lockspace: &str) -> String {
    format!("dlm:ls:{lockspace}")
}

/// Node ids that have the lockspace (members of `dlm:ls:<ls>`, as `(nodeid, pid)`)
/// without being nodes of ours (members of `vumd:<ls>`): sorted, each once.
pub fn foreign_nodes(dlm_members: &[(u32, u32)], ours: &[(u32, u32)]) -> Vec<u32> {
    let mut v: Vec<u32> = dlm_members
        .iter()
        .map(|&(n, _)| n)
        .filter(|n| !ours.iter().any(|&(o, _)| o == *n))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The refusal for `foreign` nodes (none: no refusal).
pub fn refusal(array: &str, lockspace: &str, foreign: &[u32]) -> Option<String> {
    if foreign.is_empty() {
        return None;
    }
    let ids: Vec<String> = foreign.iter().map(u32::to_string).collect();
    Some(format!(
        "array {array} is active on kernel md-cluster node(s) {} (corosync node id; they have \
         DLM lockspace {lockspace} but are not nodes of ours): stop it there (mdadm --stop) \
         before serving it. (A node where a killed vhost-user-md left the lockspace behind \
         looks the same: release it there with `dlm_tool leave {lockspace}`.)",
        ids.join(", ")
    ))
}

struct Shared {
    api: Api,
    handle: Handle,
    stop: AtomicBool,
    /// Told when the connection to corosync fails.
    loss: Arc<Loss>,
}

// SAFETY: libcpg handles may be used from any thread (the library locks internally).
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// Membership of this process in our CPG group; leaves it when dropped.
pub struct OurGroup {
    shared: Arc<Shared>,
    dispatcher: Option<std::thread::JoinHandle<()>>,
    /// This host's corosync node id.
    pub nodeid: u32,
    name: String,
}

impl OurGroup {
    /// Calls `f` with the number of other members of the group now and at every
    /// membership change (with the node ids of the members that left), until the
    /// group is left.
    pub fn on_members(&self, f: impl Fn(usize, &[u32]) + Send + 'static) -> Result<(), String> {
        let mut l = LISTENER.lock().unwrap_or_else(|e| e.into_inner());
        let now = members(&self.shared.api, self.shared.handle, &self.name)?;
        f(now.len().saturating_sub(1), &[]);
        *l = Some(Box::new(f));
        Ok(())
    }

    /// Calls `f` once if the connection to corosync fails (corosync stopped or
    /// died; dlm_controld exits with it, and the DLM's locks go).
    pub fn on_lost(&self, f: OnLost) {
        self.shared.loss.on_lost(f);
    }
}

/// Whether the dispatch of a CPG connection tells that corosync is gone: poll
/// reports the connection hung up or failed, or `cpg_dispatch` fails with anything
/// but "try again".
fn dispatch_lost(revents: libc::c_short, rc: Option<c_int>) -> Option<String> {
    if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        return Some("the corosync connection hung up".into());
    }
    match rc {
        None | Some(CS_OK) | Some(CS_ERR_TRY_AGAIN) => None,
        Some(e) => Some(format!("cpg_dispatch failed (corosync error {e})")),
    }
}

/// Whether corosync answers on this host: a CPG connection can be made (true
/// when libcpg is not installed: there is nothing to ask).
pub fn corosync_answers() -> bool {
    let Ok(api) = load("libcpg.so.4") else {
        return true;
    };
    let callbacks = Callbacks {
        deliver: Some(deliver),
        confchg: Some(confchg),
    };
    let mut handle: Handle = 0;
    // SAFETY: valid out pointer; libcpg copies the callbacks.
    if unsafe { (api.initialize)(&mut handle, &callbacks) } != CS_OK {
        return false;
    }
    // SAFETY: a valid handle, finalized once; it never joined a group.
    unsafe { (api.finalize)(handle) };
    true
}

impl Drop for OurGroup {
    fn drop(&mut self) {
        *LISTENER.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.shared.loss.close();
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.dispatcher.take() {
            let _ = t.join();
        }
        // SAFETY: a valid handle, no other user left. Finalizing leaves the group.
        unsafe { (self.shared.api.finalize)(self.shared.handle) };
    }
}

/// Retries a libcpg call while corosync asks to try again.
fn retry(what: &str, mut f: impl FnMut() -> c_int) -> Result<(), String> {
    let start = Instant::now();
    loop {
        match f() {
            CS_OK => return Ok(()),
            CS_ERR_TRY_AGAIN if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            e => return Err(format!("{what} failed (corosync error {e})")),
        }
    }
}

/// Whether a CPG group name is `group`: dlm_controld counts the terminating NUL in
/// the name's length, so trailing NULs are ignored.
fn same_group(name: &CpgName, group: &str) -> bool {
    let len = (name.length as usize).min(CPG_MAX_NAME_LENGTH);
    let mut v = &name.value[..len];
    while let [rest @ .., 0] = v {
        v = rest;
    }
    v == group.as_bytes()
}

fn members(api: &Api, handle: Handle, group: &str) -> Result<Vec<(u32, u32)>, String> {
    let mut iter = 0u64;
    // All groups, filtered here: an exact-name lookup would miss dlm_controld's groups,
    // whose names include their terminating NUL.
    // SAFETY: valid handle and out pointer; the name is unused for ALL.
    retry("cpg_iteration_initialize", || unsafe {
        (api.iter_init)(handle, CPG_ITERATION_ALL, std::ptr::null(), &mut iter)
    })?;
    let mut out = Vec::new();
    loop {
        // SAFETY: an all-zero description is a valid out buffer.
        let mut d: IterDesc = unsafe { std::mem::zeroed() };
        // SAFETY: valid iteration handle and out pointer.
        if unsafe { (api.iter_next)(iter, &mut d) } != CS_OK {
            break;
        }
        if same_group(&d.group, group) {
            out.push((d.nodeid, d.pid));
        }
    }
    // SAFETY: the iteration handle is valid and finalized once.
    unsafe { (api.iter_finalize)(iter) };
    Ok(out)
}

/// Joins our CPG group for `lockspace`, then refuses when a node that is not ours
/// has the lockspace (spec §7.1 item 2). Joining first makes the check safe among
/// our own nodes: corosync delivers our join before dlm_controld's lockspace join of
/// the same node, so a node that sees one of ours in `dlm:ls:` sees it in ours too.
/// Returns `Ok(None)` (with a warning) when libcpg is not installed: the DLM itself
/// still refuses a cross-host join, and the same-host check does not need corosync.
pub fn join_and_check(lockspace: &str, array: &str) -> Result<Option<OurGroup>, String> {
    join_and_check_with("libcpg.so.4", lockspace, array)
}

/// As [`join_and_check`] with the library at `lib`.
pub fn join_and_check_with(
    lib: &str,
    lockspace: &str,
    array: &str,
) -> Result<Option<OurGroup>, String> {
    let api = match load(lib) {
        Ok(a) => a,
        Err(e) => {
            warn!("{e}: cannot check for kernel md-cluster nodes on other hosts before joining (install libcpg4)");
            return Ok(None);
        }
    };
    let callbacks = Callbacks {
        deliver: Some(deliver),
        confchg: Some(confchg),
    };
    let mut handle: Handle = 0;
    // SAFETY: valid out pointer; libcpg copies the callbacks.
    retry("cpg_initialize", || unsafe {
        (api.initialize)(&mut handle, &callbacks)
    })
    .map_err(|e| format!("cannot reach corosync: {e} (corosync must run on this host)"))?;
    let mut nodeid = 0u32;
    let mut fd: c_int = -1;
    // SAFETY: valid handle and out pointers.
    let got = retry("cpg_local_get", || unsafe {
        (api.local_get)(handle, &mut nodeid)
    })
    .and_then(|()| retry("cpg_fd_get", || unsafe { (api.fd_get)(handle, &mut fd) }));
    let shared = Arc::new(Shared {
        api,
        handle,
        stop: AtomicBool::new(false),
        loss: Loss::new(),
    });
    let ours = our_group(lockspace);
    let mut group = OurGroup {
        shared: shared.clone(),
        dispatcher: None,
        nodeid,
        name: ours.clone(),
    };
    got?;
    let name = CpgName::new(&ours)?;
    // SAFETY: valid handle and name.
    retry("cpg_join", || unsafe { (shared.api.join)(handle, &name) })?;
    let s2 = shared.clone();
    group.dispatcher = Some(
        std::thread::Builder::new()
            .name("cpg".into())
            .spawn(move || {
                while !s2.stop.load(Ordering::Relaxed) {
                    let mut p = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut p, 1, 200) } <= 0 {
                        continue;
                    }
                    let rc = if p.revents & libc::POLLIN != 0 {
                        // SAFETY: valid handle; callbacks only log.
                        Some(unsafe { (s2.api.dispatch)(s2.handle, CS_DISPATCH_ALL) })
                    } else {
                        None
                    };
                    if let Some(why) = dispatch_lost(p.revents, rc) {
                        if !s2.stop.load(Ordering::Relaxed) {
                            warn!("CPG: {why}");
                            s2.loss.report(&why);
                        }
                        return;
                    }
                    if rc == Some(CS_ERR_TRY_AGAIN) {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            })
            .map_err(|e| e.to_string())?,
    );
    // Our join is in once we see ourselves in the group.
    let me = std::process::id();
    let start = Instant::now();
    let our_members = loop {
        let m = members(&shared.api, handle, &ours)?;
        if m.contains(&(nodeid, me)) {
            break m;
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "joined CPG group {ours} but never saw ourselves in it"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dlm_members = members(&shared.api, handle, &dlm_group(lockspace))?;
    info!(
        "CPG: {} has nodes {:?}, {ours} has {:?} (we are node {nodeid})",
        dlm_group(lockspace),
        dlm_members,
        our_members
    );
    if let Some(why) = refusal(array, lockspace, &foreign_nodes(&dlm_members, &our_members)) {
        return Err(why);
    }
    Ok(Some(group))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_with_the_lockspace_that_are_not_ours_are_refused_by_id() {
        // Nodes 1 and 3 run kernel md-cluster; node 2 is ours (its dlm_controld is in
        // dlm:ls: with another pid than our process).
        let dlm = [(1, 400), (2, 401), (3, 402), (3, 402)];
        let ours = [(2, 900)];
        assert_eq!(foreign_nodes(&dlm, &ours), vec![1, 3]);
        let e = refusal("a-uuid", "ls", &foreign_nodes(&dlm, &ours)).unwrap();
        assert!(
            e.contains("array a-uuid is active on kernel md-cluster node(s) 1, 3"),
            "{e}"
        );
        assert!(e.contains("mdadm --stop"), "{e}");
    }

    #[test]
    fn our_own_nodes_and_an_unused_lockspace_are_not_refused() {
        // Nobody has the lockspace yet.
        assert_eq!(foreign_nodes(&[], &[(1, 10)]), Vec::<u32>::new());
        assert!(refusal("a", "ls", &[]).is_none());
        // Two of ours (several processes on node 1) have it.
        let dlm = [(1, 400), (2, 401)];
        let ours = [(1, 10), (1, 11), (2, 12)];
        assert!(foreign_nodes(&dlm, &ours).is_empty());
    }

    #[test]
    fn a_hung_up_or_failing_dispatch_is_a_loss_and_try_again_is_not() {
        assert!(dispatch_lost(libc::POLLIN, Some(CS_OK)).is_none());
        assert!(dispatch_lost(libc::POLLIN, Some(CS_ERR_TRY_AGAIN)).is_none());
        assert!(dispatch_lost(0, None).is_none());
        // CS_ERR_LIBRARY: the IPC connection to corosync is gone.
        let e = dispatch_lost(libc::POLLIN, Some(2)).unwrap();
        assert!(e.contains("corosync error 2"), "{e}");
        assert!(dispatch_lost(libc::POLLHUP, None)
            .unwrap()
            .contains("hung up"));
        assert!(dispatch_lost(libc::POLLIN | libc::POLLERR, Some(CS_OK)).is_some());
    }

    #[test]
    fn group_names_match_with_or_without_a_terminating_nul() {
        let mut n = CpgName::new("dlm:ls:abc").unwrap();
        assert!(same_group(&n, "dlm:ls:abc"));
        n.length += 1; // as dlm_controld names its groups
        assert!(same_group(&n, "dlm:ls:abc"));
        assert!(!same_group(&n, "dlm:ls:ab"));
        assert!(!same_group(
            &CpgName::new("dlm:ls:abcd").unwrap(),
            "dlm:ls:abc"
        ));
    }

    #[test]
    fn without_libcpg_the_check_is_skipped_not_failed() {
        assert!(join_and_check_with("libcpg-not-here.so.4", "ls", "a")
            .unwrap()
            .is_none());
    }

    #[test]
    fn layouts_match_cpg_h() {
        assert_eq!(std::mem::size_of::<CpgName>(), 132);
        assert_eq!(std::mem::size_of::<IterDesc>(), 140);
        assert_eq!(std::mem::size_of::<CpgAddress>(), 12);
        assert_eq!(std::mem::size_of::<Callbacks>(), 16);
    }
}

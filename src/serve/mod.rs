//! `serve`: assemble the mirror, serve it over a vhost-user socket until SIGINT or
//! SIGTERM, run the bitmap daemon and resync, answer the control socket.
//!
//! Both sockets are made before the legs are touched: a path that is not a socket,
//! or a socket another process serves, stops the start with the array untouched.
//! The phases of a run are in `root`; this module has the configuration, the
//! sockets, the legs, the lock managers' set-up and the threads they start.

pub mod control;
mod line;
pub mod metrics;
pub mod multihost;
pub mod notify;
pub mod rejoin;
mod resync;
mod root;

use crate::dlm::cpg::OurGroup;
use crate::dlm::libdlm::LibDlmMember;
use crate::raid1::Array;
use crate::storage::{Claim, Faults, FaultyLeg, Fence, FencedLeg, FileLeg, Leg, OpenMode};
use crate::unixsock::{self, Perms};
use crate::vhost::BlockBackend;
use log::{error, info, warn};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

pub use resync::ResyncProgress;
pub use root::{run, ServeError};

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Owner and mode of the vhost-user socket (the control socket is always 0600,
    /// owned by this process's user).
    pub socket_perms: Perms,
    /// Control socket path.
    pub control: PathBuf,
    /// Virtqueues.
    pub queues: usize,
    /// Refuse guest writes.
    pub read_only: bool,
    /// Use the page cache instead of direct I/O.
    pub buffered: bool,
    /// Legs.
    pub legs: Vec<PathBuf>,
    /// Fault drills: (leg index, knobs).
    pub faults: Vec<(usize, FaultSpec)>,
    /// Fault drill: the thread of this name fails to start.
    pub thread_failure: Option<String>,
    /// Which lock manager coordinates this node with others.
    pub lock_manager: LockManager,
    /// Resync/recovery bytes per second at most (0: no limit).
    pub resync_max_rate: u64,
    /// Several nodes may write at once (writer role in CW instead of EX).
    pub shared_writes: bool,
    /// Interval of the multi-host heartbeat (an array served alone).
    pub heartbeat_interval: Duration,
    /// Start even when another host's heartbeat is on the legs.
    pub force: bool,
    /// Where to serve the metrics, if anywhere.
    pub metrics: Option<metrics::MetricsAddr>,
}

/// The lock manager `serve` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockManager {
    /// This process alone: the only node of the array.
    Local,
    /// A node among the `lockd` clients on this host.
    Lockd(PathBuf),
    /// A node of the Linux DLM cluster (libdlm; corosync and dlm_controld running).
    Dlm,
}

impl LockManager {
    /// How a node with this lock manager holds its legs on this host: the only node
    /// alone, cluster nodes shared with the other nodes here.
    pub fn leg_claim(&self) -> Claim {
        match self {
            LockManager::Local => Claim::Exclusive,
            LockManager::Lockd(_) | LockManager::Dlm => Claim::Shared,
        }
    }
}

/// A fault to inject into one leg (for drills and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultSpec {
    /// Fail every write after this many.
    pub writes_after: Option<i64>,
    /// Fail every read.
    pub fail_reads: bool,
    /// Writes at or beyond this byte offset of the leg block until the process ends.
    pub stall_writes_from: Option<u64>,
    /// Stalled writes wait until this file exists instead, off the worker thread
    /// (the leg then acts as a device that stopped answering its io_uring).
    pub stall_until_file: Option<PathBuf>,
}

/// The control path that goes with a vhost-user socket path.
pub fn control_path(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

/// The two sockets of a `serve`, listening; their paths are removed when dropped
/// (while they still name these sockets).
pub struct Sockets {
    vhost: UnixListener,
    control: UnixListener,
    _paths: [unixsock::Bound; 2],
    /// The vhost-user socket was handed over by this node's previous process,
    /// which restarted to rejoin the cluster (see [`rejoin`]).
    inherited: bool,
    /// The metrics endpoint, when asked for.
    metrics: Option<metrics::Endpoint>,
}

/// Makes the vhost-user socket and the control socket of `config` (and their
/// directories): refuses a path that is not a socket or a socket in use.
pub fn bind_sockets(config: &ServeConfig) -> Result<Sockets, String> {
    for path in [&config.socket, &config.control] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("socket directory {}: {e}", dir.display()))?;
        }
    }
    let inherited = rejoin::inherited_listener(&config.socket);
    let was_inherited = inherited.is_some();
    let (vhost, vhost_path) = match inherited {
        Some(l) => (
            l,
            unixsock::Bound::adopt(&config.socket).map_err(|e| e.to_string())?,
        ),
        None => unixsock::listen(&config.socket, config.socket_perms).map_err(|e| e.to_string())?,
    };
    let (control, control_path) =
        unixsock::listen(&config.control, Perms::PRIVATE).map_err(|e| e.to_string())?;
    let metrics = match config.metrics.as_ref().map(metrics::bind).transpose() {
        Ok(m) => m,
        // A restart to rejoin keeps serving the guest without its metrics rather
        // than give up the socket it was handed.
        Err(e) if was_inherited => {
            warn!("{e}: serving without metrics");
            None
        }
        Err(e) => return Err(e),
    };
    Ok(Sockets {
        vhost,
        control,
        _paths: [vhost_path, control_path],
        inherited: was_inherited,
        metrics,
    })
}

/// Shared state of a running `serve`.
pub struct Service {
    /// The mirror.
    pub array: Arc<Array>,
    /// The device.
    pub backend: Arc<BlockBackend>,
    /// Resync progress.
    pub progress: Arc<ResyncProgress>,
    /// Set when shutting down.
    pub stopping: Arc<AtomicBool>,
    /// How the service was started.
    pub config: ServeConfig,
    /// This node of the cluster, unless the array is served alone.
    pub cluster: Option<Arc<crate::cluster::node::ClusterNode<crate::raid1::Array>>>,
    /// Raised when this node may no longer write.
    pub fence: Arc<Fence>,
}

/// Opens the legs for serving: claimed on this host for the whole run (see
/// [`LockManager::leg_claim`]) and writing nothing once `fence` is raised.
pub fn open_legs(config: &ServeConfig, fence: &Arc<Fence>) -> Result<Vec<Arc<dyn Leg>>, String> {
    let mut legs: Vec<Arc<dyn Leg>> = Vec::new();
    for (i, p) in config.legs.iter().enumerate() {
        let leg = FileLeg::open_with(
            p,
            OpenMode::ReadWrite,
            !config.buffered,
            config.lock_manager.leg_claim(),
        )
        .map_err(|e| format!("leg {}: cannot open: {e}", p.display()))?;
        let leg: Arc<dyn Leg> = Arc::new(leg);
        let leg = match config.faults.iter().find(|(n, _)| *n == i) {
            Some((_, spec)) => {
                let f = Faults::none();
                if let Some(n) = spec.writes_after {
                    f.writes_until_failure.store(n, Ordering::Relaxed);
                }
                f.fail_reads.store(spec.fail_reads, Ordering::Relaxed);
                if let Some(off) = spec.stall_writes_from {
                    f.stall_writes_from.store(off.max(1), Ordering::Relaxed);
                }
                if let Some(p) = &spec.stall_until_file {
                    let _ = f.stall_until.set(p.clone());
                }
                warn!("leg {}: fault drill active: {spec:?}", p.display());
                Arc::new(FaultyLeg::new(leg, f)) as Arc<dyn Leg>
            }
            None => leg,
        };
        legs.push(Arc::new(FencedLeg::new(leg, fence.clone())));
    }
    Ok(legs)
}

/// Fault drill (`--inject-thread-failure`): starting the thread `what` fails as
/// `pthread_create` does when the system has no threads left.
fn thread_drill(config: &ServeConfig, what: &str) -> std::io::Result<()> {
    if config.thread_failure.as_deref() == Some(what) {
        warn!("fault drill: the {what} thread cannot start");
        return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
    }
    Ok(())
}

/// Joins the lockspace `name` on the lockd at `path`. Losing lockd loses every
/// lock: the node is fenced at once, and once another lockd answers on `path` it
/// asks the main thread (`rejoin`, SIGUSR2) to start over. A node that is
/// `rejoining` waits for lockd to answer (5 minutes at most) instead of failing;
/// every node waits while the lockspace recovers (a restarted lockd admits
/// nobody until the members of the one that died are back or gone), as long.
fn connect_lockd(
    path: &Path,
    name: &str,
    fence: &Arc<Fence>,
    rejoin: &Arc<AtomicBool>,
    rejoining: bool,
) -> Result<crate::dlm::lockd::LockdMember, String> {
    use crate::dlm::lockd::LockdMember;
    use crate::dlm::DlmError;
    let connect = || LockdMember::connect(path, name, crate::dlm::libdlm::LVB_LEN);
    let first = connect();
    let recovering = matches!(first, Err(DlmError::Recovering(_)));
    let mut first = Some(first);
    let m =
        rejoin::retry_while_rejoining(rejoining || recovering, Duration::from_millis(200), || {
            first
                .take()
                .unwrap_or_else(connect)
                .map_err(|e| e.to_string())
        })?;
    let (fence, rejoin) = (fence.clone(), rejoin.clone());
    let lm = LockManager::Lockd(path.to_path_buf());
    let gone = m.daemon_pid();
    m.on_lost(Box::new(move |why| {
        if fence.raise(&format!("lock manager lost ({why})")) {
            rejoin::rejoin_when_back(lm, gone, rejoin);
        }
    }));
    Ok(m)
}

/// Joins DLM lockspace `name` of array `uuid` (lock manager `dlm`): our CPG group
/// first, refusing a kernel md-cluster node that has the array (spec §7.1), then
/// the lockspace. A node that is `rejoining` waits for the cluster stack (5
/// minutes at most) instead of failing, and for its previous process's lockspace
/// to be gone from this host: joining that one would join a dead lockspace.
fn join_dlm(
    name: &str,
    uuid: &str,
    rejoining: bool,
) -> Result<(Option<OurGroup>, Arc<LibDlmMember>), String> {
    let attempt = || -> Result<(Option<OurGroup>, Arc<LibDlmMember>), String> {
        if rejoining && Path::new("/sys/kernel/dlm").join(name).exists() {
            return Err(format!(
                "the lost lockspace {name} is still on this host (release it with `dlm_tool leave {name}`)"
            ));
        }
        // Both checks come before the DLM is touched: on this host the DLM
        // would not refuse, it would break (spec §6.7).
        crate::dlm::libdlm::refuse_kernel_lockspace(name, uuid)?;
        let group = crate::dlm::cpg::join_and_check(name, uuid)?;
        let m = Arc::new(LibDlmMember::join(name).map_err(|e| e.to_string())?);
        if let Some(g) = &group {
            m.set_node_id(g.nodeid);
        }
        Ok((group, m))
    };
    rejoin::retry_while_rejoining(rejoining, Duration::from_secs(1), attempt)
}

/// Watches the cluster stack under the DLM lockspace `m`: corosync (our CPG
/// `group`'s connection), dlm_controld (its query socket, once a second) and the
/// lockspace device. Losing any of them loses every lock: the node is fenced at
/// once. When dlm_controld still runs the lockspace, the node releases it and,
/// once the stack answers, asks the main thread (`rejoin`, SIGUSR2) to start
/// over. When dlm_controld is gone (corosync takes it along), the kernel has
/// stopped the lockspace for good: the node stays fenced and says that the host
/// must be rebooted (see [`crate::dlm::stack`]).
fn watch_dlm(
    m: &Arc<LibDlmMember>,
    group: Option<&OurGroup>,
    fence: &Arc<Fence>,
    rejoin: &Arc<AtomicBool>,
) -> Result<(), String> {
    let loss = m.loss();
    if let Some(g) = group {
        let l = loss.clone();
        g.on_lost(Box::new(move |why| l.report(&format!("corosync: {why}"))));
    }
    crate::dlm::stack::watch_controld(loss)
        .map_err(|e| format!("cannot watch dlm_controld: {e}"))?;
    let weak = Arc::downgrade(m);
    let (fence, rejoin) = (fence.clone(), rejoin.clone());
    let has_cpg = group.is_some();
    m.on_lost(Box::new(move |why| {
        if !fence.raise(&format!("DLM lost ({why})")) {
            return;
        }
        let reason = format!("DLM lost ({why})");
        let releasing = std::thread::Builder::new()
            .name("dlm-lost".into())
            .spawn(move || {
                let released = crate::dlm::stack::release_if_controlled(
                    || {
                        if let Some(m) = weak.upgrade() {
                            m.release();
                            info!("released the lost DLM lockspace");
                        }
                    },
                    || !has_cpg || crate::dlm::cpg::corosync_answers(),
                );
                if let crate::dlm::stack::Released::Abandoned(gone) = released {
                    fence.amend(&format!(
                        "{reason}; {gone}: the kernel stopped this host's DLM lockspace, which \
                         can be neither released nor run again, and a restarted dlm_controld \
                         refuses to run beside it: reboot this host, then start this node again"
                    ));
                    return;
                }
                rejoin::rejoin_when_back(LockManager::Dlm, None, rejoin);
            });
        if let Err(e) = releasing {
            error!("cannot release the lost DLM lockspace: {e}");
        }
    }));
    Ok(())
}

/// Looks in `dirs` (image files, block devices) for the leg whose md superblock
/// carries `device_uuid`, and opens it: how a node finds a leg another node adds.
fn find_device(
    dirs: &[PathBuf],
    device_uuid: &crate::md::Uuid,
    direct: bool,
    fence: &Arc<Fence>,
) -> Option<Arc<dyn Leg>> {
    use std::os::unix::fs::{FileExt, FileTypeExt};
    let mut seen = std::collections::HashSet::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !(meta.is_file() || meta.file_type().is_block_device()) {
                continue;
            }
            let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if !seen.insert(key) {
                continue;
            }
            let Ok(f) = std::fs::File::open(&path) else {
                continue;
            };
            let mut buf = vec![0u8; crate::md::superblock::SB_BLOCK_LEN];
            if f.read_exact_at(&mut buf, 4096).is_err() {
                continue;
            }
            match crate::md::Superblock::decode(&buf) {
                Ok(sb) if sb.device_uuid == *device_uuid => {
                    info!("found the new leg at {}", path.display());
                    return FileLeg::open_with(&path, OpenMode::ReadWrite, direct, Claim::Shared)
                        .map_err(|e| warn!("leg {}: cannot open: {e}", path.display()))
                        .ok()
                        .map(|l| {
                            Arc::new(FencedLeg::new(Arc::new(l), fence.clone())) as Arc<dyn Leg>
                        });
                }
                _ => {}
            }
        }
    }
    None
}

/// What a started `serve` tells whoever started it.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The array's uuid (mdadm's form).
    pub uuid: String,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// Queues offered to the front-end.
    pub queues: usize,
}

/// This host's name (for the heartbeat's messages).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Flushes, clears idle bitmap bits and marks the array clean when it is (as the
/// only node; md-cluster nodes leave it active for the others).
fn shutdown_array(array: &Array, clustered_node: bool) {
    if let Err(e) = array.flush() {
        error!("final flush failed: {e}");
    }
    match array.bitmap.clear_idle_now(array.events(), array) {
        Ok(n) => info!("cleared {n} bitmap chunks"),
        Err(e) => error!("bitmap clear failed: {e}"),
    }
    if clustered_node {
        return;
    }
    match array.mark_clean_if_possible() {
        Ok(true) => info!("array marked clean"),
        Ok(false) => warn!("array left active: resync or recovery still needed"),
        Err(e) => error!("cannot write the superblocks: {e}"),
    }
}

fn serve_connections(
    backend: Arc<BlockBackend>,
    mut listener: Listener,
    stopping: Arc<AtomicBool>,
) {
    while !stopping.load(Ordering::SeqCst) {
        let mut daemon = match VhostUserDaemon::new(
            "vhost-user-md".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        ) {
            Ok(d) => d,
            Err(e) => {
                error!("cannot create the vhost-user daemon: {e}");
                return;
            }
        };
        for (i, h) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = backend.completion_fd(i) {
                if let Err(e) = h.register_listener(fd, EventSet::IN, backend.completion_event()) {
                    error!("cannot watch the completions of queue {i}: {e}");
                    return;
                }
            }
        }
        if let Err(e) = daemon.start(&mut listener) {
            error!("vhost-user connection failed: {e}");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        info!("front-end connected");
        match daemon.wait() {
            // A front-end closing its socket (a VM shut down, a migration's
            // source) ends the connection with this error: an ordinary end.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => info!("front-end disconnected"),
            Err(e) => warn!("front-end connection ended: {e}"),
        }
        daemon.request_shutdown();
        backend.abandon_in_flight();
        // The daemon's vrings map the departed front-end's memory too.
        drop(daemon);
    }
}

fn spawn_bitmap_daemon(
    array: Arc<Array>,
    stopping: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let period = Duration::from_secs(u64::from(array.bitmap.superblock().daemon_sleep.max(1)));
    std::thread::Builder::new()
        .name("bitmap".into())
        .spawn(move || {
            while !array.resync_halted() && !stopping.load(Ordering::SeqCst) {
                if array.bitmap.is_clean() {
                    // Nothing to clear until a bit is set: no timer while idle.
                    array.bitmap.daemon_bell().wait(Duration::from_secs(30));
                    continue;
                }
                // Woken early only by the stop (`Array::halt_resync`).
                if array.wait_halt(period) {
                    break;
                }
                if array.is_fenced() {
                    continue;
                }
                match array.bitmap_daemon_pass() {
                    Ok(0) => {}
                    Ok(n) => log::debug!("bitmap: cleared {n} chunks"),
                    Err(e) => warn!("bitmap daemon: {e}"),
                }
            }
        })
}

/// The cluster's writer role is the device's writer gate.
struct RoleGate(crate::cluster::writer::WriterRole);

impl crate::vhost::gate::WriterGate for RoleGate {
    fn take(&self) {
        self.0.acquire(crate::cluster::writer::ACQUIRE_RETRY);
    }

    fn give_back(&self) {
        self.0.release();
    }

    fn give_back_soon(&self) {
        self.0.release_in_background();
    }

    fn held(&self) -> bool {
        self.0.state() == crate::cluster::writer::RoleState::Held
    }

    fn idle(&self) -> bool {
        // A release still on its way ends before the next take.
        matches!(
            self.0.state(),
            crate::cluster::writer::RoleState::Idle | crate::cluster::writer::RoleState::Releasing
        )
    }

    fn state_name(&self) -> &'static str {
        self.0.state().name()
    }

    fn shared(&self) -> bool {
        self.0.shared()
    }
}

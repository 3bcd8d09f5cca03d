//! The composition root of `serve`: the phases of a node's life, each a function —
//! assemble (alone) or join (a cluster node), start the device and its threads,
//! wait for a stop, then shut down cleanly or start over to rejoin the cluster.

use super::{
    connect_lockd, control, find_device, hostname, join_dlm, metrics, multihost, notify, open_legs,
    rejoin, resync, serve_connections, shutdown_array, spawn_bitmap_daemon, thread_drill,
    watch_dlm, LockManager, Ready, ResyncProgress, RoleGate, ServeConfig, Service, Sockets,
};
use crate::dlm::cpg::OurGroup;
use crate::dlm::libdlm::LibDlmMember;
use crate::raid1::Array;
use crate::storage::{Fence, Leg};
use crate::unixsock;
use crate::vhost::{BlockBackend, BlockConfig};
use log::{info, warn};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vhost::vhost_user::Listener;

/// Why `serve` could not start, or could not restart to rejoin the cluster. Each
/// says what failed; the command line prints it as one line.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A socket, a leg, the lock manager, the cluster stack or the heartbeat
    /// refused the start; the message says what to do.
    #[error("{0}")]
    Refused(String),
    /// The legs do not assemble into the array.
    #[error(transparent)]
    Assemble(#[from] crate::raid1::AssembleError),
    /// Joining the cluster failed.
    #[error("cannot join the cluster: {0}")]
    Join(#[from] crate::cluster::node::NodeError),
    /// Writing the array failed before it could be served.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The process could not restart itself to rejoin the cluster.
    #[error("cannot restart to rejoin the cluster: {0}")]
    Rejoin(std::io::Error),
}

impl From<String> for ServeError {
    fn from(why: String) -> ServeError {
        ServeError::Refused(why)
    }
}

impl From<&str> for ServeError {
    fn from(why: &str) -> ServeError {
        ServeError::Refused(why.to_string())
    }
}

/// What the node holds of the cluster stack and of other hosts besides its array,
/// given back in order when it stops.
#[derive(Default)]
struct Held {
    /// The multi-host heartbeat of an array served alone: marked stopped when
    /// dropped (after the array is clean, or when the start fails).
    heartbeat: Option<multihost::Running>,
    /// Membership in our corosync group (lock manager `dlm`): kept until the
    /// lockspace is released.
    group: Option<OurGroup>,
    /// Our DLM lockspace (lock manager `dlm`), released explicitly when stopping.
    libdlm: Option<Arc<LibDlmMember>>,
}

/// The mirror, assembled or joined, before it is served.
struct Assembled {
    array: Arc<Array>,
    /// Legs left out at assembly (kept for `manage re-add`).
    left_out: Vec<Arc<crate::raid1::Member>>,
    /// This node of the cluster, unless the array is served alone.
    cluster: Option<Arc<crate::cluster::node::ClusterNode<crate::raid1::Array>>>,
}

/// A serving node: what stopping it needs.
struct Running {
    array: Arc<Array>,
    backend: Arc<BlockBackend>,
    cluster: Option<Arc<crate::cluster::node::ClusterNode<crate::raid1::Array>>>,
    stopping: Arc<AtomicBool>,
    threads: Threads,
    signals: signal_hook::iterator::Signals,
    /// A copy of the vhost-user listener, kept for the process that rejoins.
    _kept_listener: UnixListener,
    /// Its descriptor.
    listen_fd: std::os::fd::RawFd,
}

/// Runs `serve` on `sockets` (from [`bind_sockets`]) until a signal, calling
/// `ready` once the vhost-user socket serves: assemble (alone) or join (a cluster
/// node), start the device and its threads, wait for SIGINT/SIGTERM (or for the
/// lock manager to come back after it was lost), then shut down cleanly — or start
/// over as a new process that rejoins.
pub fn run(
    config: ServeConfig,
    sockets: Sockets,
    ready: impl FnOnce(&Ready),
) -> Result<(), ServeError> {
    let Sockets {
        vhost,
        control,
        _paths: [vhost_bound, control_bound],
        inherited: rejoining,
        metrics,
    } = sockets;
    let fence = Fence::new();
    let legs = open_legs(&config, &fence)?;
    // Set by the thread that saw the lock manager come back: restart to rejoin.
    let rejoin = Arc::new(AtomicBool::new(false));
    let mut held = Held::default();
    let assembled = match &config.lock_manager {
        LockManager::Local => assemble_alone(&config, legs, &fence, &mut held)?,
        LockManager::Lockd(_) | LockManager::Dlm => {
            join_cluster(&config, legs, &fence, &rejoin, rejoining, &mut held)?
        }
    };
    let listeners = Listeners {
        control,
        vhost,
        metrics,
    };
    let mut running = match start(&config, assembled, &fence, listeners, ready) {
        Ok(r) => r,
        Err(e) => {
            give_back(held);
            return Err(e);
        }
    };
    if wait_for_stop(&mut running, &rejoin) {
        return Err(restart_to_rejoin(running, held, control_bound));
    }
    shut_down(running, held);
    drop(control_bound);
    drop(vhost_bound);
    Ok(())
}

/// Assembles an array served by this node alone (`--lock-manager local`): a
/// clustered array is refused, the heartbeat keeps other hosts out, and every
/// other node slot's dirty bits are taken over.
fn assemble_alone(
    config: &ServeConfig,
    legs: Vec<Arc<dyn Leg>>,
    fence: &Arc<Fence>,
    held: &mut Held,
) -> Result<Assembled, ServeError> {
    if let Some(first) = legs.first() {
        // Before anything is written: the other nodes of a clustered array
        // cannot see this process's locks.
        if let Ok(m) = crate::raid1::metadata::LegMetadata::load(&**first) {
            if m.bitmap().is_clustered() {
                return Err(ServeError::Refused(format!(
                    "array {} is clustered ({} node slots): its other nodes cannot see a local lock manager; serve it with --lock-manager dlm (hosts sharing the legs) or --lock-manager lockd:PATH (nodes on this host)",
                    m.sb.set_uuid,
                    m.bitmap().nodes
                )));
            }
            // Other hosts cannot see our locks either: a heartbeat on the
            // legs keeps them out (and us, while another host serves).
            let mut mh = multihost::Multihost::open(
                &config.legs,
                m.sb.set_uuid,
                &hostname(),
                config.heartbeat_interval,
                fence.clone(),
            )?;
            mh.claim(config.force)?;
            if !mh.is_empty() {
                held.heartbeat = Some(mh.spawn().map_err(|source| ServeError::Thread {
                    what: "heartbeat",
                    source,
                })?);
            }
        }
    }
    let (array, report) = Array::assemble(legs)?;
    let array = Arc::new(array);
    // The only node: every other node slot's dirty bits are ours to resync.
    let taken = array.merge_other_slots().map_err(|source| ServeError::Io {
        what: "take over the other node slots' bitmaps",
        source,
    })?;
    if taken > 0 {
        info!("took over {taken} dirty chunks from other node slots");
    }
    Ok(Assembled {
        array,
        left_out: report.left_out_legs,
        cluster: None,
    })
}

/// Joins the array's cluster as a new node over `lockd` or the DLM (with our
/// corosync group), and sets how it finds legs other nodes add.
fn join_cluster(
    config: &ServeConfig,
    legs: Vec<Arc<dyn Leg>>,
    fence: &Arc<Fence>,
    rejoin: &Arc<AtomicBool>,
    rejoining: bool,
    held: &mut Held,
) -> Result<Assembled, ServeError> {
    let first = legs.first().ok_or("no legs")?;
    let sb = crate::raid1::metadata::read_superblock(&**first)
        .map_err(|e| ServeError::Refused(format!("leg {}: {e}", first.name())))?;
    let name = sb.set_uuid.lockspace_name();
    let ls: Arc<dyn crate::dlm::LockSpace> = match &config.lock_manager {
        LockManager::Lockd(path) => Arc::new(connect_lockd(path, &name, fence, rejoin, rejoining)?),
        _ => {
            let (group, m) = join_dlm(&name, &sb.set_uuid.to_string(), rejoining)?;
            watch_dlm(&m, group.as_ref(), fence, rejoin)?;
            held.group = group;
            held.libdlm = Some(m.clone());
            m
        }
    };
    let node = crate::cluster::node::ClusterNode::<crate::raid1::Array>::join(ls, legs)?;
    info!(
        "joined array {} as node slot {}",
        sb.set_uuid, node.node.slot
    );
    let dirs: Vec<PathBuf> = config
        .legs
        .iter()
        .filter(|p| p.is_file())
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .chain(std::iter::once(PathBuf::from("/dev/disk/by-id")))
        .collect();
    let direct = !config.buffered;
    let f = fence.clone();
    node.set_device_finder(Box::new(move |uuid| find_device(&dirs, uuid, direct, &f)));
    let node = Arc::new(node);
    if let Some(g) = &held.group {
        let weak = Arc::downgrade(&node);
        g.on_members(move |n, left| {
            if let Some(node) = weak.upgrade() {
                node.peers_alive(n);
                for &id in left {
                    node.peer_left(id);
                }
            }
        })?;
    }
    Ok(Assembled {
        array: node.array.clone(),
        left_out: Vec::new(),
        cluster: Some(node),
    })
}

/// Starts serving the assembled array: prepares the device, marks the array
/// active, starts the resync, bitmap, control and vhost-user threads, then tells
/// `ready`. Every step that can fail without writing comes before the mark; should
/// a thread fail to start after it, the array is left as a stop leaves it.
fn start(
    config: &ServeConfig,
    assembled: Assembled,
    fence: &Arc<Fence>,
    listeners: Listeners,
    ready: impl FnOnce(&Ready),
) -> Result<Running, ServeError> {
    let Listeners {
        control,
        vhost,
        metrics,
    } = listeners;
    let Assembled {
        array,
        left_out,
        cluster,
    } = assembled;
    array.set_fence(fence.clone());
    array
        .counters
        .resync_max_rate
        .store(config.resync_max_rate, Ordering::Relaxed);
    let (signals, backend, kept_listener) =
        match prepare(config, &array, cluster.as_deref(), &vhost) {
            Ok(p) => p,
            Err(e) => {
                leave_cluster(cluster.as_deref());
                return Err(e);
            }
        };
    let listen_fd = std::os::fd::AsRawFd::as_raw_fd(&kept_listener);
    if let Err(source) = array.mark_active() {
        leave_cluster(cluster.as_deref());
        return Err(ServeError::Io {
            what: "mark the array active",
            source,
        });
    }
    log_assembled(&array);
    let stopping = Arc::new(AtomicBool::new(false));
    let service = Arc::new(Service {
        array: array.clone(),
        backend: backend.clone(),
        progress: Arc::new(ResyncProgress::default()),
        stopping: stopping.clone(),
        config: config.clone(),
        cluster: cluster.clone(),
        fence: fence.clone(),
    });
    array.set_detached(left_out);
    let mut threads = Threads::default();
    let listeners = (control, Listener::from(vhost), metrics);
    if let Err(e) = spawn_threads(&service, listeners, &mut threads) {
        abandon_start(&service, threads);
        return Err(e);
    }
    info!(
        "serving on {} (control {})",
        config.socket.display(),
        config.control.display()
    );
    notify::ready(&notify::status_line(&control::status(&service)));
    ready(&Ready {
        uuid: array.uuid.to_string(),
        socket: config.socket.clone(),
        queues: config.queues,
    });
    Ok(Running {
        array,
        backend,
        cluster,
        stopping,
        threads,
        signals,
        _kept_listener: kept_listener,
        listen_fd,
    })
}

/// What a start needs before the array is marked active, none of which writes: the
/// signal handlers, the device, and a copy of the vhost-user listener.
fn prepare(
    config: &ServeConfig,
    array: &Arc<Array>,
    cluster: Option<&crate::cluster::node::ClusterNode<crate::raid1::Array>>,
    vhost: &UnixListener,
) -> Result<
    (
        signal_hook::iterator::Signals,
        Arc<BlockBackend>,
        UnixListener,
    ),
    ServeError,
> {
    // From here on a signal stops us through the clean shutdown (SIGHUP and
    // SIGUSR1 are ignored from the start of the process on: `cli::ignore_hangups`).
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGUSR2,
    ])
    .map_err(|source| ServeError::Io {
        what: "install signal handlers",
        source,
    })?;
    let backend = device(config, array, cluster)?;
    // The connection thread owns the listener and drops it when it ends, which a
    // front-end leaving during the drain before a rejoin lets it do before the new
    // process is started: this copy keeps the socket listening for that process.
    let kept_listener = vhost.try_clone().map_err(|source| ServeError::Io {
        what: "keep the vhost-user socket",
        source,
    })?;
    Ok((signals, backend, kept_listener))
}

/// The device of `array`: its guest's logical block is the largest of the legs'
/// (a leg with 4 KiB logical blocks under direct I/O cannot write less; see
/// `Limits::block_size`), its writer gate the cluster's writer role.
fn device(
    config: &ServeConfig,
    array: &Arc<Array>,
    cluster: Option<&crate::cluster::node::ClusterNode<crate::raid1::Array>>,
) -> Result<Arc<BlockBackend>, ServeError> {
    let block_size = array
        .members()
        .iter()
        .flatten()
        .filter_map(|m| m.leg.raw_fd().map(|(_, align)| align as u32))
        .chain(std::iter::once(512))
        .max()
        .unwrap_or(512);
    let role = match cluster {
        None => crate::cluster::writer::WriterRole::local(),
        Some(node) => {
            crate::cluster::writer::WriterRole::cluster(&node.node.comms, config.shared_writes)
                .map_err(|e| format!("cannot create the writer role lock: {e}"))?
        }
    };
    let mut backend = BlockBackend::new(
        array.clone(),
        BlockConfig {
            queues: config.queues,
            read_only: config.read_only,
            block_size,
        },
    )
    .map_err(|e| format!("cannot set up the queues' I/O: {e}"))?
    .with_writer_gate(Arc::new(RoleGate(role)));
    if config.metrics.is_some() {
        backend = backend.with_stats(&crate::vhost::stats::DeviceStats::default());
    }
    Ok(Arc::new(backend))
}

fn log_assembled(array: &Array) {
    info!(
        "array {} assembled: {} sectors, {} of {} legs in sync{}, {} chunks to resync",
        array.uuid,
        array.size,
        array
            .members()
            .iter()
            .flatten()
            .filter(|m| m.state() == crate::raid1::LegState::InSync)
            .count(),
        array.members().len(),
        if array.clustered {
            format!(
                " (clustered bitmap, this node writes slot {})",
                array.own_slot
            )
        } else {
            String::new()
        },
        array.bitmap.stats().needed
    );
}

/// What a node listens on besides the cluster: the guest's front-end, the
/// operator's control socket and metrics.
struct Listeners {
    control: UnixListener,
    vhost: UnixListener,
    metrics: Option<metrics::Endpoint>,
}

/// The threads of a serving node that stopping it waits for.
#[derive(Default)]
struct Threads {
    resync: Option<std::thread::JoinHandle<()>>,
    bitmap: Option<std::thread::JoinHandle<()>>,
    /// The metrics' unix socket path, removed once the threads stopped.
    metrics_socket: Option<unixsock::Bound>,
}

impl Threads {
    /// Waits for the threads (told to stop beforehand).
    fn join(self) {
        drop(self.metrics_socket);
        for t in [self.resync, self.bitmap].into_iter().flatten() {
            if t.join().is_err() {
                warn!("a serve thread panicked");
            }
        }
    }
}

/// Starts the resync, bitmap, control and vhost-user threads of `service`; those
/// that stopping waits for go into `threads`, also when a later one fails.
fn spawn_threads(
    service: &Arc<Service>,
    (control, listener, metrics): (UnixListener, Listener, Option<metrics::Endpoint>),
    threads: &mut Threads,
) -> Result<(), ServeError> {
    let config = &service.config;
    let thread = |what: &'static str| move |source| ServeError::Thread { what, source };
    let (array, stopping, progress) = (&service.array, &service.stopping, &service.progress);
    let resync = thread_drill(config, "resync")
        .and_then(|()| match &service.cluster {
            None => resync::spawn(array.clone(), progress.clone(), stopping.clone()),
            Some(node) => resync::spawn_cluster(node.clone(), progress.clone(), stopping.clone()),
        })
        .map_err(thread("resync"))?;
    threads.resync = Some(resync);
    let bitmap = thread_drill(config, "bitmap")
        .and_then(|()| array.flush_bitmap_in_background())
        .and_then(|()| spawn_bitmap_daemon(array.clone(), stopping.clone()))
        .map_err(thread("bitmap"))?;
    threads.bitmap = Some(bitmap);
    let control = control::Server::new(control, service.clone());
    thread_drill(config, "control")
        .and_then(|()| {
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || control.run())
        })
        .map_err(thread("control"))?;
    if let Some(endpoint) = metrics {
        threads.metrics_socket =
            metrics::spawn(endpoint, service.clone()).map_err(thread("metrics"))?;
    }
    notify::spawn_keepalive(service.clone()).map_err(thread("sd-notify"))?;
    let (be, stop) = (service.backend.clone(), stopping.clone());
    thread_drill(config, "vhost-user")
        .and_then(|()| {
            std::thread::Builder::new()
                .name("vhost-user".into())
                .spawn(move || serve_connections(be, listener, stop))
        })
        .map_err(thread("vhost-user"))?;
    Ok(())
}

/// A start that failed after the array was marked active: stops the threads
/// started so far, then leaves the array as a stop does (clean when served alone;
/// a cluster node tells the others it leaves).
fn abandon_start(service: &Service, threads: Threads) {
    warn!("the start failed after the array was marked active: stopping cleanly");
    service.stopping.store(true, Ordering::SeqCst);
    service.array.halt_resync();
    threads.join();
    shutdown_array(&service.array, service.cluster.is_some());
    leave_cluster(service.cluster.as_deref());
}

/// Tells the other nodes of the cluster, if any, that this one leaves.
fn leave_cluster(cluster: Option<&crate::cluster::node::ClusterNode<crate::raid1::Array>>) {
    if let Some(node) = cluster {
        if let Err(e) = node.leave() {
            warn!("cannot tell the other nodes we leave: {e}");
        }
    }
}

/// Waits for SIGINT or SIGTERM, or for the thread that saw the lock manager come
/// back (SIGUSR2 with `rejoin` set); then stops the threads' work. True: restart
/// to rejoin.
fn wait_for_stop(running: &mut Running, rejoin: &AtomicBool) -> bool {
    let sig = running.signals.forever().find(|&s| match s {
        // Sent by this process when it is to restart and rejoin.
        signal_hook::consts::SIGUSR2 => rejoin.load(Ordering::SeqCst),
        _ => true,
    });
    running.stopping.store(true, Ordering::SeqCst);
    // A resync in progress ends after its current chunk.
    running.array.halt_resync();
    let rejoining = rejoin.load(Ordering::SeqCst);
    if !rejoining {
        info!("signal {sig:?}: shutting down");
        notify::stopping("stopping: draining, then marking the array clean");
    }
    rejoining
}

/// Shuts a node down cleanly: drains the device, stops the threads, flushes and
/// marks the array clean (alone) or leaves the cluster, gives back the lockspace,
/// the corosync group and the heartbeat.
fn shut_down(running: Running, held: Held) {
    let Running {
        array,
        backend,
        cluster,
        threads,
        ..
    } = running;
    backend.drain();
    threads.join();
    shutdown_array(&array, cluster.is_some());
    leave_cluster(cluster.as_deref());
    drop(cluster);
    give_back(held);
}

/// Gives back what a node holds besides its array, once the array is left as a
/// stop leaves it: the DLM lockspace, the corosync group, the heartbeat.
fn give_back(mut held: Held) {
    // Threads of the cluster node (watches) keep the member alive: leave explicitly, so
    // that no lockspace stays joined on this host once we are gone.
    if let Some(m) = held.libdlm.take() {
        m.release();
        info!("left the DLM lockspace");
    }
    drop(held.group.take());
    drop(held.heartbeat.take());
}

/// Fenced, and the lock manager is back: finishes what is in flight (nothing new
/// is written), then starts over as a new process, keeping the vhost-user socket.
/// Returns only when that fails.
fn restart_to_rejoin(running: Running, mut held: Held, control: unixsock::Bound) -> ServeError {
    info!("restarting to rejoin: draining the requests in flight");
    running.backend.drain();
    running.threads.join();
    // The new process joins afresh: no lockspace of ours may be left on this host
    // (released when the loss was seen; this is at most a no-op), nor our
    // membership of the CPG group, which corosync would keep for this pid.
    if let Some(m) = &held.libdlm {
        m.release();
    }
    drop(held.group.take());
    drop(control);
    ServeError::Rejoin(rejoin::reexec(running.listen_fd))
}

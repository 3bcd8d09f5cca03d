//! Rejoining after the lock manager came back.
//!
//! A cluster node whose lock manager went away is fenced at once (it writes
//! nothing). Its slot, its writer role and every other lock it held are gone: a
//! restarted lock manager knows none of them, and the other nodes may have taken
//! its slot over and resynced its dirty chunks. So the node does not patch its old
//! state up: once the lock manager answers again it starts over, by executing
//! itself anew with the same arguments — the same assembly, join and slot claim as
//! any start — and hands the new process the vhost-user listening socket, so the
//! socket path never disappears: a front-end that reconnects (QEMU's
//! `reconnect-ms`) finds the new process and resubmits the requests it had in
//! flight (inflight tracking), and the guest sees its writes of the fenced period
//! complete once the node has rejoined.

use super::LockManager;
use log::{info, warn};
use std::ffi::OsString;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The environment variable that hands the listening socket to the new process.
pub const LISTEN_FD_ENV: &str = "VHOST_USER_MD_LISTEN_FD";

/// How often a fenced node looks for its lock manager.
const POLL: Duration = Duration::from_millis(200);

/// Whether `lm` answers again after the daemon with pid `gone` was lost: a lockd
/// process other than that one accepts a connection (the lost one may still be
/// closing its listening socket); for the DLM, dlm_controld takes a connection on
/// its query socket and corosync a CPG connection (the new process waits for the
/// rest, see `serve`). The local lock manager cannot be lost.
pub fn lock_manager_answers(lm: &LockManager, gone: Option<i32>) -> bool {
    match lm {
        LockManager::Lockd(path) => std::os::unix::net::UnixStream::connect(path)
            .ok()
            .and_then(|c| crate::unixsock::peer_pid(&c))
            .is_some_and(|pid| Some(pid) != gone),
        LockManager::Dlm => {
            crate::dlm::stack::controld_probe() == crate::dlm::stack::Probe::Up
                && crate::dlm::cpg::corosync_answers()
        }
        LockManager::Local => true,
    }
}

/// Waits (on a thread) until `lm` answers again with another daemon than `gone`,
/// then sets `rejoin` and signals the main thread (SIGUSR2), which starts over.
pub fn rejoin_when_back(lm: LockManager, gone: Option<i32>, rejoin: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("rejoin".into())
        .spawn(move || loop {
            if lock_manager_answers(&lm, gone) {
                info!("the lock manager answers again: rejoining");
                rejoin.store(true, Ordering::SeqCst);
                // SAFETY: kill(2) of our own pid with a signal the main thread handles.
                unsafe { libc::kill(libc::getpid(), libc::SIGUSR2) };
                return;
            }
            std::thread::sleep(POLL);
        });
    if let Err(e) = spawned {
        log::error!("cannot watch for the lock manager: {e}");
    }
}

/// Runs `attempt` until it succeeds; while `rejoining` (the lock manager may not
/// be back yet) a failure is tried again every `pause`, for 5 minutes at most.
pub fn retry_while_rejoining<T>(
    rejoining: bool,
    pause: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = std::time::Instant::now();
    let mut said: Option<std::time::Instant> = None;
    loop {
        match attempt() {
            Ok(x) => return Ok(x),
            Err(e) if rejoining && start.elapsed() < Duration::from_secs(300) => {
                if said.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warn!("rejoining: {e}; trying again");
                    said = Some(std::time::Instant::now());
                }
                std::thread::sleep(pause);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The listening socket a previous process of this node handed over for `path`,
/// if it is a listening unix socket.
pub fn inherited_listener(path: &Path) -> Option<UnixListener> {
    let fd: RawFd = std::env::var(LISTEN_FD_ENV).ok()?.parse().ok()?;
    // Whatever happens, children of ours must not see it.
    std::env::remove_var(LISTEN_FD_ENV);
    if !is_listening_unix_socket(fd) {
        warn!(
            "{LISTEN_FD_ENV}={fd} is not a socket listening on {}: ignored",
            path.display()
        );
        return None;
    }
    // SAFETY: the fd was checked to be an open unix socket; the previous process
    // image handed it to this one, and nothing else in this process owns it.
    let l = unsafe { UnixListener::from_raw_fd(fd) };
    set_cloexec(fd, true);
    info!(
        "listening on {} (socket kept across the rejoin)",
        path.display()
    );
    Some(l)
}

fn is_listening_unix_socket(fd: RawFd) -> bool {
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`, a live sockaddr_un.
    let rc = unsafe {
        libc::getsockname(
            fd,
            &mut addr as *mut libc::sockaddr_un as *mut libc::sockaddr,
            &mut len,
        )
    };
    if rc != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return false;
    }
    let mut listening: libc::c_int = 0;
    let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_ACCEPTCONN writes one int into `listening`, a live c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut listening as *mut libc::c_int as *mut libc::c_void,
            &mut l,
        )
    };
    if rc != 0 || listening == 0 {
        return false;
    }
    // Its bound name is the temporary one it was made under (see `unixsock`), so
    // the path cannot be compared: the variable is only ever set by this program's
    // own restart, with the socket of the same `--socket`.
    true
}

fn set_cloexec(fd: RawFd, on: bool) -> bool {
    // SAFETY: F_GETFD/F_SETFD on an fd number pass no memory.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return false;
        }
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        libc::fcntl(fd, libc::F_SETFD, flags) == 0
    }
}

/// The arguments a restart executes the program with, when they differ from the
/// process's own (a `--config` file's options, read once: the restart gets what
/// this run got, whatever the file says by then).
static ARGS: std::sync::OnceLock<Vec<OsString>> = std::sync::OnceLock::new();

/// Sets the arguments [`reexec`] uses (program name first).
pub fn set_args(args: Vec<OsString>) {
    let _ = ARGS.set(args);
}

/// Executes this program anew with the arguments it was started with (or those
/// of [`set_args`]), handing it `listen_fd`. Returns only if that fails.
pub fn reexec(listen_fd: RawFd) -> std::io::Error {
    let args: Vec<OsString> = ARGS
        .get()
        .cloned()
        .unwrap_or_else(|| std::env::args_os().collect());
    // The new process feeds systemd's watchdog only once it serves again, and its
    // join may wait for the lock manager's recovery.
    super::notify::watchdog_for_restart();
    if !set_cloexec(listen_fd, false) {
        return std::io::Error::last_os_error();
    }
    info!("restarting to rejoin the cluster: {:?}", args);
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(
            args.first()
                .cloned()
                .unwrap_or_else(|| "vhost-user-md".into()),
        )
        .args(args.iter().skip(1))
        .env(LISTEN_FD_ENV, listen_fd.to_string())
        .exec();
    set_cloexec(listen_fd, true);
    err
}

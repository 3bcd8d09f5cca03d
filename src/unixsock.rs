//! Unix sockets our daemons listen on (`serve`'s vhost-user and control sockets,
//! `lockd`'s socket), with one owner at a time:
//!
//! - nothing but a stale socket is ever replaced: a path that is not a socket is
//!   refused, and so is a socket some process listens on;
//! - a socket appears at its path with its final owner and mode (it is bound in a
//!   private directory, given its owner and mode there, then hard-linked to its
//!   path: `link(2)` never replaces an existing name);
//! - checking, replacing and linking happen under an exclusive `flock` of the
//!   directory, so that two of our processes never both decide a path is free;
//! - at exit the path is removed only while it still names the socket we bound.

use log::{info, warn};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Owner and mode a socket gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    /// Permission bits, e.g. 0o600.
    pub mode: u32,
    /// Owner (default: this process's user).
    pub uid: Option<u32>,
    /// Group (default: this process's group).
    pub gid: Option<u32>,
}

impl Perms {
    /// Owner only (0600).
    pub const PRIVATE: Perms = Perms {
        mode: 0o600,
        uid: None,
        gid: None,
    };
}

impl Default for Perms {
    fn default() -> Self {
        Perms::PRIVATE
    }
}

/// Why a socket could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Something other than a socket is at the path.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    /// A process listens on the socket.
    #[error("socket {} is in use by {}", .path.display(), .pid.map_or_else(|| "another process".to_string(), |p| format!("pid {p}")))]
    InUse {
        /// The socket.
        path: PathBuf,
        /// The listening process, when it can be told.
        pid: Option<i32>,
    },
    /// A system call failed.
    #[error("socket {}: {what}: {source}", .path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// A socket path this process bound; removed on drop while it still names our
/// socket (not a socket somebody put there since).
#[derive(Debug)]
pub struct Bound {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Bound {
    /// Takes over the socket at `path` as bound by this process (it was handed
    /// over by the previous process image of this node).
    pub fn adopt(path: &Path) -> io::Result<Bound> {
        let m = std::fs::symlink_metadata(path)?;
        Ok(Bound {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        let _lock = DirLock::take(&self.path).map_err(|e| warn!("{e}")).ok();
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            Ok(_) => info!(
                "{} is no longer the socket this process bound: left in place",
                self.path.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!("{}: {e}", self.path.display()),
        }
    }
}

/// Listens on a new socket at `path` with owner and mode `perms`, replacing only a
/// stale socket (one nobody listens on).
pub fn listen(path: &Path, perms: Perms) -> Result<(UnixListener, Bound), SocketError> {
    let io_err = |what: &'static str| {
        move |source: io::Error| SocketError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let _lock = DirLock::take(path)?;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot look at the path")(e)),
        Ok(m) if !m.file_type().is_socket() => return Err(SocketError::NotASocket(path.into())),
        Ok(_) => match probe(path).map_err(io_err("cannot tell whether it is in use"))? {
            Probe::Listening(pid) => {
                return Err(SocketError::InUse {
                    path: path.into(),
                    pid,
                })
            }
            Probe::Stale => {
                info!("replacing the stale socket {}", path.display());
                std::fs::remove_file(path).map_err(io_err("cannot remove the stale socket"))?;
            }
            Probe::Gone => {}
        },
    }
    let staging = Staging::new(path).map_err(io_err("cannot make a private directory"))?;
    let tmp = staging.dir.join("s");
    let listener = UnixListener::bind(&tmp).map_err(io_err("cannot bind"))?;
    if perms.uid.is_some() || perms.gid.is_some() {
        std::os::unix::fs::chown(&tmp, perms.uid, perms.gid)
            .map_err(io_err("cannot set the owner"))?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(perms.mode))
        .map_err(io_err("cannot set the mode"))?;
    let meta = std::fs::symlink_metadata(&tmp).map_err(io_err("cannot look at the socket"))?;
    std::fs::hard_link(&tmp, path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            SocketError::InUse {
                path: path.into(),
                pid: None,
            }
        } else {
            io_err("cannot link the socket to its path")(e)
        }
    })?;
    Ok((
        listener,
        Bound {
            path: path.into(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// What a connection attempt says about a socket.
enum Probe {
    /// A process listens (its pid, when the kernel tells).
    Listening(Option<i32>),
    /// Nobody listens.
    Stale,
    /// The path vanished meanwhile.
    Gone,
}

/// Connects to `path` without blocking.
fn probe(path: &Path) -> io::Result<Probe> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a unix socket",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a live, initialised sockaddr_un and the length is its size.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(Probe::Listening(peer_pid(&sock)));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // A full backlog: somebody listens but does not accept.
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(Probe::Listening(None)),
        Some(libc::ECONNREFUSED) => Ok(Probe::Stale),
        Some(libc::ENOENT) => Ok(Probe::Gone),
        _ => Err(e),
    }
}

/// The process id of the peer of a connected unix socket (for a connection to a
/// listening socket: the process that listens).
pub fn peer_pid(conn: &impl AsRawFd) -> Option<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a live ucred.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

/// The directory a socket path is in.
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// An exclusive `flock` of a socket's directory, held while it lives.
struct DirLock {
    _dir: File,
}

impl DirLock {
    fn take(path: &Path) -> Result<DirLock, SocketError> {
        let dir = dir_of(path);
        let err = |what: &'static str| {
            move |source: io::Error| SocketError::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .map_err(err("cannot open its directory"))?;
        loop {
            // SAFETY: flock(2) on a descriptor we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(DirLock { _dir: f });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(err("cannot lock its directory")(e));
            }
        }
    }
}

/// A private (0700) directory next to a socket path, where the socket is bound
/// and given its owner and mode before it is linked to its path; removed on drop.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn new(path: &Path) -> io::Result<Staging> {
        let dir = dir_of(path).join(format!(".vumd{}", std::process::id()));
        // Left by a process of ours that had this pid and was killed at this step
        // (we hold the directory lock, so no live one uses it).
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            let _ = std::fs::remove_file(dir.join("s"));
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Staging { dir })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("s"));
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            warn!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// A user id from a name (or a number).
pub fn user_id(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let c = CString::new(name).map_err(|_| format!("bad user name {name:?}"))?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: passwd is plain data; all zeroes is a valid value to be filled in.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is live for the call; buf.len() is the buffer's size.
        let rc = unsafe {
            libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found)
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(format!(
                "cannot look up user {name:?}: {}",
                io::Error::from_raw_os_error(rc)
            ));
        }
        if found.is_null() {
            return Err(format!("no user named {name:?}"));
        }
        return Ok(pw.pw_uid);
    }
}

/// A group id from a name (or a number).
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let c = CString::new(name).map_err(|_| format!("bad group name {name:?}"))?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: group is plain data; all zeroes is a valid value to be filled in.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is live for the call; buf.len() is the buffer's size.
        let rc = unsafe {
            libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut found)
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(format!(
                "cannot look up group {name:?}: {}",
                io::Error::from_raw_os_error(rc)
            ));
        }
        if found.is_null() {
            return Err(format!("no group named {name:?}"));
        }
        return Ok(gr.gr_gid);
    }
}

/// A permission mode in octal (e.g. `0660`), at most 0777.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode such as 0600 or 0660")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("4755").is_err());
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.sock");
        drop(UnixListener::bind(&p).unwrap());
        let (l, b) = listen(&p, Perms::PRIVATE).unwrap();
        match listen(&p, Perms::PRIVATE) {
            Err(SocketError::InUse { pid, .. }) => {
                assert_eq!(pid, Some(std::process::id() as i32))
            }
            other => panic!("{other:?}"),
        }
        drop(l);
        drop(b);
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}

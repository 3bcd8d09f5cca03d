//! Losing the cluster stack under a libdlm lockspace.
//!
//! A node of the Linux DLM holds its locks only while the stack beneath it runs:
//! corosync (membership) and dlm_controld (which drives the kernel's lockspaces).
//! When dlm_controld goes, the kernel stops every lockspace of the host ("no
//! userland control daemon"): nothing is granted any more, the other nodes recover
//! ours as a dead node, and a request sent into the stopped lockspace blocks in the
//! kernel until the lockspace runs again, which it never does. A restarted
//! dlm_controld refuses to run beside a lockspace it did not create (it asks
//! corosync to remove the node from the cluster), and the stopped lockspace cannot
//! be released (closing its device blocks in the kernel): only a reboot of the host
//! clears it. corosync going takes dlm_controld with it. A node can rejoin without
//! a reboot only when the lockspace failed while dlm_controld still ran it.
//!
//! [`Loss`] gathers the signs of a loss from the parts that see them (the CPG
//! connection, the lockspace device, the watch of dlm_controld's query socket) and
//! tells one listener, once.

use log::info;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Called once when the stack is lost (with the reason).
pub type OnLost = Box<dyn FnOnce(String) + Send>;

/// The abstract unix socket dlm_controld answers queries on (`DLMC_QUERY_SOCK_PATH`
/// of dlm's `dlm_controld/dlm_controld.h`; `dlm_tool` connects to it).
pub const CONTROLD_QUERY_SOCK: &str = "dlmc_query_sock";

/// How often the watch looks for dlm_controld.
const WATCH: Duration = Duration::from_secs(1);

/// The loss of the stack, reported by whoever sees it first.
#[derive(Default)]
pub struct Loss {
    /// The member is leaving on purpose: nothing is a loss any more.
    closing: AtomicBool,
    /// The first reason reported.
    lost: Mutex<Option<String>>,
    /// Who to tell.
    on_lost: Mutex<Option<OnLost>>,
}

impl Loss {
    /// A loss not reported yet.
    pub fn new() -> Arc<Loss> {
        Arc::new(Loss::default())
    }

    /// Reports a loss: the first one (unless closing) is told to the listener.
    pub fn report(&self, why: &str) {
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut l = self.lost.lock().unwrap_or_else(|e| e.into_inner());
            if l.is_some() {
                return;
            }
            *l = Some(why.to_string());
        }
        let f = self
            .on_lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = f {
            f(why.to_string());
        }
    }

    /// The reason, once lost.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// From now on nothing is a loss (a clean leave stops what it watches).
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Whether [`Loss::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Calls `f` once when the stack is lost (at once if it already is).
    pub fn on_lost(&self, f: OnLost) {
        // Registered under `lost`'s lock, so that a report either sees `f` or came
        // first and is answered here.
        let l = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        match l.clone() {
            Some(why) => {
                drop(l);
                f(why)
            }
            None => *self.on_lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(f),
        }
    }
}

/// What a connect to dlm_controld's query socket says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// It accepts, or is there but busy.
    Up,
    /// Nobody listens: dlm_controld is not running.
    Gone(String),
}

/// Reads the outcome of a connect to the query socket.
pub fn classify_connect(r: &io::Result<()>) -> Probe {
    match r {
        Ok(()) => Probe::Up,
        Err(e) => match e.raw_os_error() {
            // A full backlog (EAGAIN on a non-blocking connect) or a slow accept:
            // someone listens.
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS) | Some(libc::EINTR) => Probe::Up,
            _ if e.kind() == io::ErrorKind::ConnectionRefused
                || e.kind() == io::ErrorKind::NotFound =>
            {
                Probe::Gone(format!(
                    "dlm_controld is not running (its query socket @{CONTROLD_QUERY_SOCK}: {e})"
                ))
            }
            _ => Probe::Gone(format!(
                "dlm_controld does not answer (its query socket @{CONTROLD_QUERY_SOCK}: {e})"
            )),
        },
    }
}

/// Connects (only) to an abstract unix stream socket, without blocking.
fn connect_abstract(name: &str) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
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
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = name.as_bytes();
    let n = bytes.len().min(addr.sun_path.len() - 1);
    // An abstract name: a leading NUL, then the name (no terminating NUL).
    for (d, s) in addr.sun_path[1..=n].iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + n;
    // SAFETY: `addr` is a live sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    let r = if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    r
}

/// Whether dlm_controld runs on this host: its query socket takes a connection.
pub fn controld_probe() -> Probe {
    classify_connect(&connect_abstract(CONTROLD_QUERY_SOCK))
}

/// Watches dlm_controld (a connect to its query socket once a second) on a thread
/// and reports to `loss` when it is gone; ends when `loss` is lost or closed.
pub fn watch_controld(loss: Arc<Loss>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("dlm-controld".into())
        .spawn(move || {
            while !loss.is_closed() && loss.lost().is_none() {
                if let Probe::Gone(why) = controld_probe() {
                    loss.report(&why);
                    return;
                }
                std::thread::sleep(WATCH);
            }
        })
        .map(|_| ())
}

/// What became of a lost lockspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// dlm_controld still runs it: released, the node may join again.
    Yes,
    /// dlm_controld is gone and the kernel stopped it: it cannot be released
    /// (closing its device blocks in the kernel until it runs again, which it never
    /// does) and a restarted dlm_controld refuses to run beside it. Only a reboot of
    /// the host clears it (dlm_controld's own rule for "uncontrolled lockspaces").
    Abandoned(String),
}

/// Releases a lost lockspace when that can finish: while dlm_controld runs it
/// (the lockspace device failed on its own). While corosync is gone, dlm_controld
/// is on its way out: waits for it to go or for corosync to answer again.
pub fn release_if_controlled(release: impl FnOnce(), corosync_up: impl Fn() -> bool) -> Released {
    let mut said = false;
    loop {
        match controld_probe() {
            Probe::Gone(why) => return Released::Abandoned(why),
            Probe::Up if corosync_up() => break,
            Probe::Up => {
                if !said {
                    info!(
                        "corosync is gone: waiting for dlm_controld to exit or corosync to answer"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    release();
    Released::Yes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_loss_is_told_once() {
        let loss = Loss::new();
        let (tx, rx) = std::sync::mpsc::channel();
        loss.on_lost(Box::new(move |why| tx.send(why).unwrap()));
        loss.report("corosync gone");
        loss.report("dlm_controld gone");
        assert_eq!(rx.try_recv().unwrap(), "corosync gone");
        assert!(rx.try_recv().is_err());
        assert_eq!(loss.lost().as_deref(), Some("corosync gone"));
    }

    #[test]
    fn a_loss_before_the_listener_is_told_at_registration() {
        let loss = Loss::new();
        loss.report("gone");
        let (tx, rx) = std::sync::mpsc::channel();
        loss.on_lost(Box::new(move |why| tx.send(why).unwrap()));
        assert_eq!(rx.try_recv().unwrap(), "gone");
    }

    #[test]
    fn nothing_is_a_loss_once_closed() {
        let loss = Loss::new();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        loss.on_lost(Box::new(move |why| tx.send(why).unwrap()));
        loss.close();
        loss.report("leaving");
        assert!(rx.try_recv().is_err());
        assert!(loss.lost().is_none());
    }

    #[test]
    fn a_refused_connect_means_dlm_controld_is_gone() {
        let refused = Err(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(matches!(classify_connect(&refused), Probe::Gone(w) if w.contains("not running")));
        let busy = Err(io::Error::from_raw_os_error(libc::EAGAIN));
        assert_eq!(classify_connect(&busy), Probe::Up);
        assert_eq!(classify_connect(&Ok(())), Probe::Up);
        let other = Err(io::Error::from_raw_os_error(libc::EACCES));
        assert!(
            matches!(classify_connect(&other), Probe::Gone(w) if w.contains("does not answer"))
        );
    }

    #[test]
    fn the_probe_connects_to_the_abstract_name() {
        // A listener on an abstract name of our own is found; once closed, refused.
        use std::os::linux::net::SocketAddrExt;
        let name = format!("vumd-test-probe-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let l = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        assert_eq!(classify_connect(&connect_abstract(&name)), Probe::Up);
        drop(l);
        assert!(matches!(
            classify_connect(&connect_abstract(&name)),
            Probe::Gone(_)
        ));
    }
}

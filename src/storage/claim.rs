//! Claims on legs: one owner of a leg per host, or several that share it knowingly.
//!
//! A `serve` that is the array's only node claims its legs exclusively for its whole
//! run, as the kernel's md and mdadm claim theirs: a `flock(LOCK_EX)` on the image
//! file or device node, and on a block device an `O_EXCL` open too (which the kernel
//! also refuses while the device is mounted or a member of a kernel md array). Nodes
//! of one clustered array on one host share their legs: they take the flock shared.
//! So a second owner is refused, whichever of them comes second, and the refusal
//! names the process that holds the leg (from `/proc/locks`, which records the pid
//! that placed a flock, unlike an OFD lock's).
//!
//! The flock lives on the open file description: it is held as long as the leg's
//! file is open, and no other open or close of the same file by this process drops it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// How a process holds a leg it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// No claim (reading metadata, e.g. `examine`).
    None,
    /// Shared with the other nodes of a clustered array on this host.
    Shared,
    /// This process alone (the array's only node, `create`, a blank leg being added).
    Exclusive,
}

impl Claim {
    /// The extra `open(2)` flags of this claim on a block device.
    pub(crate) fn open_flags(self, block_device: bool) -> libc::c_int {
        if block_device && self == Claim::Exclusive {
            libc::O_EXCL
        } else {
            0
        }
    }
}

/// Takes `claim` on `file` (opened from `path`) without waiting. A refusal is an
/// error of kind `ResourceBusy` that names the holder.
pub(crate) fn take(file: &File, claim: Claim) -> io::Result<()> {
    let op = match claim {
        Claim::None => return Ok(()),
        Claim::Shared => libc::LOCK_SH,
        Claim::Exclusive => libc::LOCK_EX,
    };
    let deadline = std::time::Instant::now() + UDEV_WAIT;
    loop {
        // SAFETY: flock(2) on a file descriptor this `File` keeps open; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err);
        }
        if std::time::Instant::now() >= deadline || !held_for_a_moment(file) {
            return Err(busy(file));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How long a claim waits for udev: after a program closes a block device it
/// wrote (`create`, a stopped `serve`), udev probes it again under a shared
/// flock, for a moment.
const UDEV_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether the flocks on `file` are held for a moment only: by udev probing it,
/// or by a process on its way out (its lock goes with it), or released since.
fn held_for_a_moment(file: &File) -> bool {
    let Ok(m) = file.metadata() else { return false };
    worth_waiting_for(&holders(m.dev(), m.ino()))
}

/// See [`held_for_a_moment`].
fn worth_waiting_for(holders: &[Holder]) -> bool {
    holders
        .iter()
        .all(|h| h.is_exiting() || (!h.exclusive && h.is_udev()))
}

/// The refusal of an `O_EXCL` open of a block device (`EBUSY`): names our holder if
/// it is one of ours, else says what else holds a device exclusively.
pub(crate) fn exclusive_open_refused(path: &Path) -> io::Error {
    match std::fs::metadata(path)
        .ok()
        .and_then(|m| holders(m.dev(), m.ino()).into_iter().next())
    {
        Some(h) => in_use(&h.describe()),
        None => in_use(
            "another program holds it open exclusively (mounted, a kernel md or device-mapper member, or another exclusive opener)",
        ),
    }
}

fn busy(file: &File) -> io::Error {
    let holder = file
        .metadata()
        .ok()
        .and_then(|m| {
            holders(m.dev(), m.ino())
                .into_iter()
                .find(|h| h.pid != std::process::id() as i32)
        })
        .map(|h| {
            let mut d = h.describe();
            if !h.exclusive {
                d.push_str(" and maybe other cluster nodes on this host");
            }
            d
        })
        .unwrap_or_else(|| "another process".to_string());
    in_use(&holder)
}

fn in_use(holder: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!("in use by {holder}; stop it first (nodes of one clustered array share legs through --lock-manager lockd:PATH or dlm)"),
    )
}

/// A process that holds a flock on a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pid: i32,
    exclusive: bool,
}

impl Holder {
    /// Whether the holder is udev (its daemon or a worker probing a device).
    fn is_udev(&self) -> bool {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let name = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
        matches!(name, b"(udev-worker)" | b"systemd-udevd" | b"udevd")
    }

    /// Whether the holder is gone or exiting: its command line is empty or
    /// unreadable (a process that ended, or is ending and closing its files).
    fn is_exiting(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.pid)).map_or(true, |c| c.is_empty())
    }

    /// "pid N (vhost-user-md serve --socket PATH)" as far as `/proc` tells.
    fn describe(&self) -> String {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let prog = args
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a).to_string());
        let sub = args.get(1).filter(|a| !a.starts_with('-'));
        let socket = args
            .iter()
            .position(|a| a == "--socket")
            .and_then(|i| args.get(i + 1))
            .cloned()
            .or_else(|| {
                args.iter()
                    .find_map(|a| a.strip_prefix("--socket=").map(str::to_string))
            });
        let mut d = format!("pid {}", self.pid);
        if let Some(p) = prog {
            d.push_str(&format!(" ({p}"));
            if let Some(s) = sub {
                d.push_str(&format!(" {s}"));
            }
            if let Some(s) = socket {
                d.push_str(&format!(" --socket {s}"));
            }
            d.push(')');
        }
        d
    }
}

/// The holders of flocks on the file `(dev, ino)`, from `/proc/locks`.
fn holders(dev: u64, ino: u64) -> Vec<Holder> {
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    parse_locks(&text, libc::major(dev), libc::minor(dev), ino)
}

/// Parses `/proc/locks` lines (`1: FLOCK  ADVISORY  WRITE 1234 08:01:131 0 EOF`, the
/// device numbers in hex) for granted flocks on `major:minor:ino`.
pub(crate) fn parse_locks(text: &str, major: u32, minor: u32, ino: u64) -> Vec<Holder> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let _id = f.next();
        let Some(kind) = f.next() else { continue };
        if kind != "FLOCK" {
            // Other lock kinds, and "->" lines of requests still waiting.
            continue;
        }
        let (_, Some(rw), Some(pid), Some(file)) = (f.next(), f.next(), f.next(), f.next()) else {
            continue;
        };
        let mut parts = file.split(':');
        let (Some(ma), Some(mi), Some(i)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let same = u32::from_str_radix(ma, 16).ok() == Some(major)
            && u32::from_str_radix(mi, 16).ok() == Some(minor)
            && i.parse::<u64>().ok() == Some(ino);
        if let (true, Ok(pid)) = (same, pid.parse::<i32>()) {
            if pid > 0 {
                out.push(Holder {
                    pid,
                    exclusive: rw == "WRITE",
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_are_read_for_the_file_asked() {
        let text = "\
1: POSIX  ADVISORY  WRITE 99 08:01:131 0 EOF
2: FLOCK  ADVISORY  WRITE 1234 08:01:131 0 EOF
3: -> FLOCK  ADVISORY  WRITE 555 08:01:131 0 EOF
4: FLOCK  ADVISORY  READ 77 00:1a:131 0 EOF
5: FLOCK  ADVISORY  READ 78 fd:0a:4242 0 EOF
6: OFDLCK ADVISORY  WRITE -1 08:01:131 0 EOF
";
        assert_eq!(
            parse_locks(text, 8, 1, 131),
            vec![Holder {
                pid: 1234,
                exclusive: true
            }]
        );
        assert_eq!(
            parse_locks(text, 0xfd, 0x0a, 4242),
            vec![Holder {
                pid: 78,
                exclusive: false
            }]
        );
        assert!(parse_locks(text, 8, 1, 132).is_empty());
        assert!(parse_locks("garbage\n\n1:\n", 8, 1, 131).is_empty());
    }

    #[test]
    fn a_second_exclusive_claim_is_refused_and_names_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("leg.img");
        std::fs::write(&p, b"x").unwrap();
        let a = File::open(&p).unwrap();
        let b = File::open(&p).unwrap();
        take(&a, Claim::Exclusive).unwrap();
        let e = take(&b, Claim::Shared).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        // Our own process is skipped when naming the holder: a claim refused inside
        // one process has no other pid to name.
        assert!(e.to_string().contains("in use by another process"), "{e}");
        drop(a);
        take(&b, Claim::Shared).unwrap();
        let c = File::open(&p).unwrap();
        take(&c, Claim::Shared).unwrap();
        assert!(take(&File::open(&p).unwrap(), Claim::Exclusive).is_err());
    }

    /// Holds a shared flock on `p` from a process whose name is `argv0`, for
    /// `secs`; returns once the lock is held.
    fn hold_shared(p: &Path, argv0: &str, secs: &str) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("flock")
            .arg0(argv0)
            .args(["--shared", "--nonblock"])
            .arg(p)
            .args(["sleep", secs])
            .spawn()
            .unwrap();
        let f = File::open(p).unwrap();
        let start = std::time::Instant::now();
        // SAFETY: flock(2) on a file descriptor `f` keeps open.
        while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // SAFETY: as above.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
            assert!(
                start.elapsed().as_secs() < 5,
                "flock(1) did not take the lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child
    }

    /// A holder that is ending (udev's worker done with its probe) is waited for,
    /// not named in a refusal as "pid N" with nothing else known: the claim
    /// raced with its exit.
    #[test]
    fn a_holder_on_its_way_out_is_waited_for() {
        let gone = Holder {
            pid: i32::MAX,
            exclusive: false,
        };
        assert!(worth_waiting_for(std::slice::from_ref(&gone)));
        let ours = Holder {
            pid: std::process::id() as i32,
            exclusive: false,
        };
        assert!(
            !worth_waiting_for(&[gone, ours]),
            "a live holder is no udev"
        );
    }

    #[test]
    fn a_claim_waits_for_udev_probing_the_leg_and_for_nobody_else() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("leg.img");
        std::fs::write(&p, b"x").unwrap();
        // udev's worker probes the device after its writer closed it: the claim
        // goes through once the probe ends.
        let mut udev = hold_shared(&p, "(udev-worker)", "0.3");
        let f = File::open(&p).unwrap();
        let start = std::time::Instant::now();
        take(&f, Claim::Exclusive).unwrap();
        assert!(start.elapsed() >= std::time::Duration::from_millis(100));
        udev.wait().unwrap();
        drop(f);
        // Anybody else is refused at once, naming it.
        let mut other = hold_shared(&p, "some-tool", "2");
        let start = std::time::Instant::now();
        let e = take(&File::open(&p).unwrap(), Claim::Exclusive).unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(1), "{e}");
        assert!(e.to_string().contains("some-tool"), "{e}");
        let _ = other.kill();
        let _ = other.wait();
    }
}

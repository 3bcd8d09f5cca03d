//! `lockd` (the host's lock daemon) and `lock` (take a lock and hold it: a probe for
//! operators and tests).

use crate::dlm::libdlm::LibDlmMember;
use crate::dlm::lockd::{Daemon, LockdMember};
use crate::dlm::{flags, Event, LockSpace, Mode, Status};
use clap::Args;
use std::path::PathBuf;

/// Flags of `lockd`.
#[derive(Debug, Args)]
pub struct LockdArgs {
    /// Unix socket to listen on (mode 0600; 0660 with --group).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Let this group use the socket too (name or number).
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
}

/// Flags of `lock`.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The socket of the lockd to use (its --socket); not with --dlm.
    #[arg(long, value_name = "PATH", required_unless_present = "dlm")]
    pub socket: Option<PathBuf>,
    /// Use the host's real DLM (libdlm; corosync + dlm_controld) instead of lockd.
    #[arg(long, conflicts_with = "socket")]
    pub dlm: bool,
    /// Lockspace to join.
    #[arg(long, value_name = "NAME")]
    pub lockspace: String,
    /// After the lock is granted, convert it to this mode (and wait for that).
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub convert: Option<Mode>,
    /// Fail at once (print `Again`, exit 1) instead of waiting when the lock is not grantable.
    #[arg(long)]
    pub noqueue: bool,
    /// Read the lock value block: print `lvb TEXT` (or `lvb-invalid` when the DLM flags it
    /// as not valid) after each grant.
    #[arg(long)]
    pub valblk: bool,
    /// Write this text as the lock value block at the --convert conversion (a down-conversion
    /// from PW or EX writes it). Implies --valblk.
    #[arg(long, value_name = "TEXT", requires = "convert")]
    pub lvb: Option<String>,
    /// Name of the resource to lock.
    pub resource: String,
    /// Mode to request: NL, CR, CW, PR, PW or EX.
    #[arg(value_parser = parse_mode)]
    pub mode: Mode,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    match s.to_ascii_uppercase().as_str() {
        "NL" => Ok(Mode::Nl),
        "CR" => Ok(Mode::Cr),
        "CW" => Ok(Mode::Cw),
        "PR" => Ok(Mode::Pr),
        "PW" => Ok(Mode::Pw),
        "EX" => Ok(Mode::Ex),
        _ => Err(format!("{s:?} is not a lock mode (NL, CR, CW, PR, PW, EX)")),
    }
}

/// An LVB as text: trailing NULs dropped, other bytes outside printable ASCII as `\xNN`.
fn lvb_text(v: &[u8]) -> String {
    let end = v.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    v[..end]
        .iter()
        .map(|&b| match b {
            b' '..=b'~' if b != b'\\' => (b as char).to_string(),
            _ => format!("\\x{b:02x}"),
        })
        .collect()
}

/// Runs `lockd` until SIGINT or SIGTERM (SIGHUP and SIGUSR1 are ignored); removes
/// its socket at exit.
pub fn run_lockd(args: &LockdArgs) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    super::ignore_hangups("lockd")?;
    let gid = args
        .group
        .as_deref()
        .map(crate::unixsock::group_id)
        .transpose()?;
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    raise_open_files_limit();
    let (d, bound) = Daemon::bind(&args.socket, gid).map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("lockd".into())
        .spawn(move || d.run())
        .map_err(|e| format!("cannot start the lockd thread: {e}"))?;
    log::info!("lockd listening on {}", args.socket.display());
    crate::serve::notify::ready(&format!("listening on {}", args.socket.display()));
    let sig = signals.forever().next();
    log::info!("signal {sig:?}: lockd stopping");
    crate::serve::notify::stopping("stopping");
    drop(bound);
    Ok(())
}

/// Raises the soft limit of open files to the hard one: every member holds two
/// (its connection and a clone for its reader), so the usual soft limit of 1024
/// would turn away the 500th or so `serve` of the host.
fn raise_open_files_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 || r.rlim_cur >= r.rlim_max {
        return;
    }
    let soft = r.rlim_cur;
    r.rlim_cur = r.rlim_max;
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } == 0 {
        log::debug!("open files limit raised from {soft} to {}", r.rlim_max);
    } else {
        log::warn!(
            "cannot raise the open files limit from {soft}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs `lock`: prints each state change, holds the lock until killed.
pub fn run_lock(args: &LockArgs) -> Result<(), String> {
    let m: Box<dyn LockSpace> = match &args.socket {
        Some(sock) => {
            Box::new(LockdMember::connect(sock, &args.lockspace, 32).map_err(|e| e.to_string())?)
        }
        None => Box::new(LibDlmMember::join(&args.lockspace).map_err(|e| e.to_string())?),
    };
    if let Some(t) = &args.lvb {
        if t.len() > m.lvb_len() {
            return Err(format!(
                "--lvb: {} bytes do not fit the {}-byte lock value block",
                t.len(),
                m.lvb_len()
            ));
        }
    }
    let rx = m.events();
    let valblk = if args.valblk || args.lvb.is_some() {
        flags::VALBLK
    } else {
        0
    };
    let noqueue = if args.noqueue { flags::NOQUEUE } else { 0 };
    let id = m
        .lock(args.resource.as_bytes(), args.mode, valblk | noqueue, None)
        .map_err(|e| e.to_string())?;
    let mut converting = false;
    for ev in rx.iter() {
        match ev {
            Event::Ast {
                lock,
                status,
                lvb,
                lvb_invalid,
            } if lock == id => {
                super::out(&format!("{status:?}\n"));
                if status != Status::Granted {
                    return Err(format!("{status:?}"));
                }
                if let (Some(v), true) = (lvb, valblk != 0) {
                    if lvb_invalid {
                        super::out("lvb-invalid\n");
                    } else {
                        super::out(&format!("lvb {}\n", lvb_text(&v)));
                    }
                }
                if let (Some(to), false) = (args.convert, converting) {
                    converting = true;
                    let lvb = args.lvb.as_ref().map(|t| t.as_bytes());
                    m.convert(id, to, flags::CONVERT | valblk | noqueue, lvb)
                        .map_err(|e| e.to_string())?;
                    super::out("converting\n");
                }
            }
            Event::Bast { mode, .. } => super::out(&format!("blocking {mode:?}\n")),
            _ => {}
        }
    }
    Ok(())
}

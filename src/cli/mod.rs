//! Command line: parse flags, run a command, turn errors into one line that says
//! what to do.

pub mod config;
pub mod create;
pub mod docs;
pub mod examine;
pub mod lockd;
pub mod serve;
pub mod size;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// vhost-user-blk backend serving a clustered RAID1 in the Linux md-cluster format.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-md", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a new RAID1 on two or more legs (like mdadm --create --level=1 --metadata=1.2).
    Create(create::CreateArgs),
    /// Serve the mirror to a VM over a vhost-user-blk socket.
    #[command(long_about = docs::SERVE_LONG_ABOUT)]
    Serve(Box<serve::ServeArgs>),
    /// Show a running array: legs, degraded, resync progress, bitmap (like /proc/mdstat).
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: serve::Format,
        /// The vhost-user socket of the `serve` (or its .ctl control socket).
        #[arg(value_name = "SOCKET")]
        socket: PathBuf,
    },
    /// Change a running array: fail, remove, add or re-add a leg.
    Manage {
        /// The vhost-user socket of the `serve` (or its .ctl control socket).
        #[arg(value_name = "SOCKET")]
        socket: PathBuf,
        /// What to do.
        #[arg(value_enum)]
        op: serve::ManageOp,
        /// The leg, as named when `serve` started (a new path for add).
        #[arg(value_name = "LEG")]
        leg: PathBuf,
    },
    /// Run the host's lock manager for several `serve` processes (nodes) on this host.
    Lockd(lockd::LockdArgs),
    /// Take a lock from lockd or the host's DLM and hold it until killed, printing each state change.
    Lock(lockd::LockArgs),
    /// Show the md superblock and bitmaps of legs (like mdadm --examine and --examine-bitmap).
    Examine {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Legs to examine (block devices or image files).
        #[arg(required = true, value_name = "LEG")]
        legs: Vec<PathBuf>,
    },
    /// Print a shell completion script to standard output.
    Completions(docs::CompletionsArgs),
    /// Write the manual pages and completion scripts into a directory.
    #[command(hide = true)]
    GenerateDocs(docs::GenerateDocsArgs),
}

/// Writes to standard output; a closed pipe (e.g. `| head`) is not an error.
pub fn out(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|()| o.flush());
}

/// Ignores SIGHUP and SIGUSR1 for the rest of the process's life, saying so in the
/// log: a terminal hanging up, or a signal meant to make a daemon reopen its logs,
/// must not end `daemon` without its clean shutdown, during its start as later on.
/// SIGINT and SIGTERM stop it.
pub(crate) fn ignore_hangups(daemon: &'static str) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGUSR1])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("hangups".into())
        .spawn(move || {
            for sig in signals.forever() {
                let name = if sig == SIGHUP { "SIGHUP" } else { "SIGUSR1" };
                log::info!("{name} ignored (SIGINT or SIGTERM stop {daemon})");
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    use clap::CommandFactory;
    let args = match config::expand(std::env::args_os().collect(), &Cli::command()) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("vhost-user-md: {msg}");
            return ExitCode::from(2);
        }
    };
    crate::serve::rejoin::set_args(args.clone());
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match run(cli) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("vhost-user-md: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go out as clap renders them; a mistake becomes one line.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
        || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let text = e.to_string();
    let line = text
        .lines()
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!(
        "vhost-user-md: {} (see vhost-user-md --help)",
        line.trim_start_matches("error: ")
    );
    ExitCode::from(2)
}

/// Runs a parsed command; `Err` is the one-line message for the operator.
pub fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Create(args) => create::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Lockd(args) => lockd::run_lockd(&args).map(|()| ExitCode::SUCCESS),
        Command::Lock(args) => lockd::run_lock(&args).map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => serve::run(*args).map(|()| ExitCode::SUCCESS),
        Command::Status { format, socket } => {
            serve::status(&socket, format).map(|()| ExitCode::SUCCESS)
        }
        Command::Manage { socket, op, leg } => {
            serve::manage(&socket, op, &leg).map(|()| ExitCode::SUCCESS)
        }
        Command::Examine { json, legs } => {
            let report = examine::examine(&legs);
            if json {
                let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
                out(&format!("{text}\n"));
            } else {
                out(&examine::render(&report));
            }
            if report.legs.iter().any(|l| l.error.is_some()) {
                Ok(ExitCode::FAILURE)
            } else {
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Completions(args) => {
            docs::completions(&args);
            Ok(ExitCode::SUCCESS)
        }
        Command::GenerateDocs(args) => docs::generate(&args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| e.to_string()),
    }
}

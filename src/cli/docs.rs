//! `completions` and `generate-docs`: shell completion scripts and manual pages,
//! generated from the command line's own definition so that they cannot drift
//! from it. Hidden commands and flags (fault drills, `generate-docs` itself) are
//! left out of both.

use clap::{Args, CommandFactory};
use clap_complete::Shell;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;
use std::path::{Path, PathBuf};

/// The program's name, as installed.
pub const BIN: &str = "vhost-user-md";

/// `serve --help`: what it does, its signals and its configuration file.
pub const SERVE_LONG_ABOUT: &str = "\
Serve the mirror to a VM over a vhost-user-blk socket.

serve assembles the array from the md superblocks of its legs (like mdadm
--assemble), marks it active, resyncs whatever the write-intent bitmaps mark
dirty, and serves it as a virtio-blk disk on the vhost-user socket given with
--socket, for QEMU's vhost-user-blk-pci device (-chardev socket,path=SOCKET).
A leg of another array is refused; a stale or faulty leg is left out and the
array runs degraded until the leg is re-added with vhost-user-md manage. Next to
the vhost-user socket, serve listens on a control socket (SOCKET.ctl unless
--control says otherwise) that vhost-user-md status and vhost-user-md manage
use. Both sockets are made before any leg is touched, and removed at exit.

Signals: SIGINT or SIGTERM stops serve cleanly: it drains the guest's requests,
flushes the legs, clears the bitmap and marks the array clean (a cluster node
leaves the cluster instead). SIGHUP and SIGUSR1 are logged and ignored.

Configuration file: with --config FILE the options are read from FILE, a TOML
file whose keys are the long options below without their dashes, legs the list
of legs and a flag true or false (queues = 4, legs = [\"/dev/sdb\", \"/dev/sdc\"],
read-only = true); the command line may add options the file does not set. A
mistake is one line naming the file, the line and the key. The unit
vhost-user-md@NAME.service runs serve --config /etc/vhost-user-md/NAME.conf; an
example is installed as /usr/share/doc/vhost-user-md/examples/disk.conf.

systemd: under a Type=notify unit, serve sends READY once the vhost-user socket
serves, a STATUS line on the array every 5 seconds, STOPPING when it stops, and
feeds the watchdog (WatchdogSec=) while the array answers.

Metrics: with --metrics IP:PORT (or unix:PATH) the metrics are served in the
Prometheus text format at http://IP:PORT/metrics.

Log messages go to standard error; RUST_LOG sets their level (default: info).";

/// The top-level manual page's description (`--help` keeps the one-line about).
const MAIN_DESCRIPTION: &str = "\
vhost-user-md serves a RAID1 mirror of two or more legs (block devices or image
files) to virtual machines as a virtio-blk disk over the vhost-user protocol.
The legs carry the Linux md on-disk format: version 1.2 superblocks and
write-intent bitmaps, with one bitmap per node for a clustered (md-cluster)
array, so mdadm and the kernel's md driver read them too.

create makes a new array. serve assembles one and serves it on a vhost-user
socket until SIGINT or SIGTERM. status and manage talk to a running serve
through its control socket. examine reads the superblocks and bitmaps of legs.
lockd coordinates the serve processes of a clustered array on one host; lock
takes a lock by hand, to look at a lock manager. completions prints a shell
completion script.

Each command has its own page: vhost-user-md-COMMAND(1).";

/// Flags of `generate-docs`.
#[derive(Debug, Args)]
pub struct GenerateDocsArgs {
    /// Directory to write man/*.1 and completions/* into (made if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Date in the pages' footer, YYYY-MM-DD. Default: the day of
    /// SOURCE_DATE_EPOCH when set, else today.
    #[arg(long, value_name = "DATE")]
    pub date: Option<String>,
}

/// Flags of `completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: Shell,
}

/// Why `generate-docs` failed.
#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    /// A directory could not be made.
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A page or script could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The shells whose scripts `generate-docs` writes, with their file names (the
/// names each shell's completion directory expects).
const SCRIPTS: [(Shell, &str); 3] = [
    (Shell::Bash, "vhost-user-md.bash"),
    (Shell::Zsh, "_vhost-user-md"),
    (Shell::Fish, "vhost-user-md.fish"),
];

/// Runs `completions`: prints the script for one shell.
pub fn completions(args: &CompletionsArgs) {
    super::out(&completion_script(args.shell));
}

/// Runs `generate-docs`: writes `OUT/man/vhost-user-md.1`, one
/// `OUT/man/vhost-user-md-COMMAND.1` per visible command, and the bash, zsh and
/// fish completion scripts into `OUT/completions/`.
pub fn generate(args: &GenerateDocsArgs) -> Result<(), DocsError> {
    let man_dir = args.out.join("man");
    let completions_dir = args.out.join("completions");
    for dir in [&man_dir, &completions_dir] {
        std::fs::create_dir_all(dir).map_err(|source| DocsError::CreateDir {
            path: dir.clone(),
            source,
        })?;
    }
    let date = args.date.clone().unwrap_or_else(default_date);
    for (name, page) in man_pages(&date) {
        write(&man_dir.join(format!("{name}.1")), page.as_bytes())?;
    }
    for (shell, file) in SCRIPTS {
        write(
            &completions_dir.join(file),
            completion_script(shell).as_bytes(),
        )?;
    }
    Ok(())
}

/// The day of SOURCE_DATE_EPOCH (reproducible builds) when it is set and valid,
/// else today, as YYYY-MM-DD (UTC).
fn default_date() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
    let (y, m, d) = crate::md::human::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), DocsError> {
    std::fs::write(path, bytes).map_err(|source| DocsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The completion script for `shell`.
pub fn completion_script(shell: Shell) -> String {
    let mut cmd = visible(&super::Cli::command());
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, BIN, &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A copy of `cmd` without its hidden flags and commands, recursively: the
/// completion generators offer everything they are given.
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut copy = clap::Command::new(cmd.get_name().to_owned());
    if let Some(about) = cmd.get_about() {
        copy = copy.about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        copy = copy.version(version.to_owned());
    }
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        copy = copy.arg(arg.clone());
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        copy = copy.subcommand(visible(sub));
    }
    copy
}

/// Every manual page, as (name, roff text): the program's, then one per visible
/// command, each under the name `man` finds it by (`vhost-user-md-serve`).
pub fn man_pages(date: &str) -> Vec<(String, String)> {
    let mut cmd = super::Cli::command()
        .long_about(MAIN_DESCRIPTION)
        .disable_help_subcommand(true);
    // Names the commands `vhost-user-md-serve` (their pages) and
    // `vhost-user-md serve` (their synopsis).
    cmd.build();
    let version = cmd.get_version().unwrap_or_default().to_owned();
    let mut pages = vec![(BIN.to_owned(), render(&cmd, date, &version, &main_extra()))];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub
            .get_display_name()
            .unwrap_or_else(|| sub.get_name())
            .to_owned();
        pages.push((
            name,
            render(sub, date, &version, &command_extra(sub.get_name())),
        ));
    }
    pages
}

/// One part of a section after the generated ones.
enum Part {
    /// A paragraph.
    Para(&'static str),
    /// A command, indented, one line each as given.
    Example(&'static [&'static str]),
    /// A tagged paragraph: a term in bold, then its text.
    Item(&'static str, &'static str),
}

/// A section after the generated ones.
struct Section {
    title: &'static str,
    parts: Vec<Part>,
}

/// Renders one page: clap_mangen's title, NAME, SYNOPSIS, DESCRIPTION, OPTIONS
/// and COMMANDS sections, then `extra`, then VERSION.
fn render(cmd: &clap::Command, date: &str, version: &str, extra: &[Section]) -> String {
    type Renderer = fn(&Man, &mut dyn std::io::Write) -> std::io::Result<()>;
    let man = Man::new(cmd.clone())
        .date(date)
        .source(format!("{BIN} {version}"))
        .manual(format!("{BIN} manual"));
    let mut renderers: Vec<Renderer> = vec![
        Man::render_title,
        Man::render_name_section,
        Man::render_synopsis_section,
        Man::render_description_section,
        Man::render_options_section,
    ];
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        renderers.push(Man::render_subcommands_section);
    }
    let mut texts: Vec<String> = renderers
        .into_iter()
        .map(|r| {
            let mut buf = Vec::new();
            // Writing into a Vec cannot fail.
            let _ = r(&man, &mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
        .collect();
    texts.push(render_extra(extra));
    if cmd.get_version().is_some() {
        let mut buf = Vec::new();
        let _ = man.render_version_section(&mut buf);
        texts.push(String::from_utf8_lossy(&buf).into_owned());
    }
    // Each part starts with the same preamble: keep only the first one.
    let preamble = Roff::new().render();
    let mut page = String::new();
    for text in &texts {
        match text.strip_prefix(&preamble) {
            Some(rest) if !page.is_empty() => page.push_str(rest),
            _ => page.push_str(text),
        }
    }
    page
}

fn render_extra(extra: &[Section]) -> String {
    let mut roff = Roff::new();
    for s in extra {
        roff.control("SH", [s.title]);
        for (i, part) in s.parts.iter().enumerate() {
            match part {
                Part::Para(text) => {
                    if i > 0 {
                        roff.control("PP", []);
                    }
                    roff.text([roman(*text)]);
                }
                Part::Example(lines) => {
                    roff.control("PP", []);
                    roff.control("RS", ["4"]);
                    roff.control("nf", []);
                    for line in *lines {
                        roff.text([roman(*line)]);
                    }
                    roff.control("fi", []);
                    roff.control("RE", []);
                }
                Part::Item(term, text) => {
                    roff.control("TP", []);
                    roff.text([bold(*term)]);
                    roff.text([roman(*text)]);
                }
            }
        }
    }
    roff.render()
}

fn exit_status(failure: &'static str) -> Section {
    Section {
        title: "EXIT STATUS",
        parts: vec![
            Part::Item("0", "Success."),
            Part::Item("1", failure),
            Part::Item(
                "2",
                "The command line is wrong (one line on standard error says why).",
            ),
        ],
    }
}

const FAILURE: &str = "Failure; one line on standard error says what failed and what to do.";

fn environment() -> Section {
    Section {
        title: "ENVIRONMENT",
        parts: vec![Part::Item(
            "RUST_LOG",
            "Level of the log messages written to standard error: error, warn, info \
             (the default), debug or trace.",
        )],
    }
}

fn see_also(text: &'static str) -> Section {
    Section {
        title: "SEE ALSO",
        parts: vec![Part::Para(text)],
    }
}

/// The top-level page's sections after the generated ones.
fn main_extra() -> Vec<Section> {
    vec![
        exit_status(FAILURE),
        environment(),
        Section {
            title: "EXAMPLES",
            parts: vec![
                Part::Para("Make a mirror of two new 10 GiB image files:"),
                Part::Example(&[
                    "vhost-user-md create --size 10G \\",
                    "    /var/lib/vhost-user-md/vm1-a.img /var/lib/vhost-user-md/vm1-b.img",
                ]),
                Part::Para("Serve it with four queues, then look at it:"),
                Part::Example(&[
                    "vhost-user-md serve --socket /run/vhost-user-md/vm1.sock --queues 4 \\",
                    "    /var/lib/vhost-user-md/vm1-a.img /var/lib/vhost-user-md/vm1-b.img",
                ]),
                Part::Example(&["vhost-user-md status /run/vhost-user-md/vm1.sock"]),
            ],
        },
        see_also(
            "vhost-user-md-create(1), vhost-user-md-serve(1), vhost-user-md-status(1), \
             vhost-user-md-manage(1), vhost-user-md-examine(1), vhost-user-md-lockd(1), \
             mdadm(8), md(4), qemu-system-x86_64(1), corosync(8), dlm_controld(8)",
        ),
    ]
}

/// A command's page's sections after the generated ones.
fn command_extra(command: &str) -> Vec<Section> {
    match command {
        "serve" => vec![
            exit_status(
                "serve could not start (one line on standard error says why), or failed \
                 while serving.",
            ),
            environment(),
            Section {
                title: "EXAMPLES",
                parts: vec![
                    Part::Example(&[
                        "vhost-user-md serve --socket /run/vhost-user-md/vm1.sock --queues 4 \\",
                        "    /dev/mapper/lunA /dev/mapper/lunB",
                    ]),
                    Part::Para(
                        "Then attach it to a VM whose RAM is shared memory of the size given \
                         with -m:",
                    ),
                    Part::Example(&[
                        "qemu-system-x86_64 -m 2G \\",
                        "    -object memory-backend-memfd,id=mem,size=2G,share=on \\",
                        "    -machine q35,memory-backend=mem \\",
                        "    -chardev socket,id=vumd0,path=/run/vhost-user-md/vm1.sock \\",
                        "    -device vhost-user-blk-pci,chardev=vumd0,num-queues=4 ...",
                    ]),
                ],
            },
            see_also(
                "vhost-user-md(1), vhost-user-md-status(1), vhost-user-md-manage(1), \
                 vhost-user-md-lockd(1), qemu-system-x86_64(1)",
            ),
        ],
        "examine" => vec![
            exit_status("A leg could not be read or carries no valid md superblock."),
            see_also("vhost-user-md(1), mdadm(8)"),
        ],
        "create" => vec![
            exit_status(FAILURE),
            see_also("vhost-user-md(1), vhost-user-md-serve(1), mdadm(8)"),
        ],
        "status" | "manage" => vec![
            exit_status(FAILURE),
            see_also("vhost-user-md(1), vhost-user-md-serve(1)"),
        ],
        "lockd" | "lock" => vec![
            exit_status(FAILURE),
            environment(),
            see_also("vhost-user-md(1), vhost-user-md-serve(1), dlm_controld(8)"),
        ],
        _ => vec![exit_status(FAILURE), see_also("vhost-user-md(1)")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_leave_hidden_commands_and_flags_out() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = completion_script(shell);
            assert!(script.contains("lock-manager"), "{shell}: {script}");
            assert!(!script.contains("generate-docs"), "{shell}");
            assert!(!script.contains("inject-fault"), "{shell}");
        }
    }

    #[test]
    fn one_page_per_visible_command() {
        let pages = man_pages("2025-01-31");
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "vhost-user-md");
        assert!(names.contains(&"vhost-user-md-serve"), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("generate-docs")));
        assert!(!names.iter().any(|n| n.ends_with("-help")));
        for (name, page) in &pages {
            // One preamble per page, one title.
            assert_eq!(page.matches(".TH ").count(), 1, "{name}");
            assert_eq!(page.matches(".ds Aq").count(), 2, "{name}");
            assert!(page.contains(".SH \"EXIT STATUS\""), "{name}: {page}");
            assert!(
                page.contains(" 1 2025-01-31 \"vhost-user-md "),
                "{name}: {page}"
            );
        }
    }
}

//! `serve`, `status` and `manage`.

use super::size::parse_size;
use crate::md::human::human_size;
use crate::raid1::metadata::{create_array, NewArray};
use crate::serve::control::{self, Request, Status};
use crate::serve::{control_path, FaultSpec, LockManager, ServeConfig};
use crate::storage::{Claim, FileLeg, Leg, OpenMode};
use crate::unixsock::{group_id, user_id, Perms};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Read options from this TOML file: the keys are these long options without
    /// their dashes, `legs` the list of legs, a flag takes true or false (e.g.
    /// `queues = 4`, `legs = ["/dev/sdb", "/dev/sdc"]`). The command line may add
    /// options the file does not set.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// vhost-user socket to listen on (QEMU's `-chardev socket,path=...`). An
    /// existing path is replaced only if it is a socket nobody listens on.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Permission bits of the vhost-user socket (e.g. 0660 with --socket-group, to
    /// let a hypervisor running as another user connect).
    #[arg(long, value_name = "OCTAL", default_value = "0600", value_parser = crate::unixsock::parse_mode)]
    pub socket_mode: u32,
    /// Owner of the vhost-user socket (user name or number), e.g. libvirt-qemu.
    #[arg(long, value_name = "NAME")]
    pub socket_owner: Option<String>,
    /// Group of the vhost-user socket (group name or number), e.g. kvm.
    #[arg(long, value_name = "NAME")]
    pub socket_group: Option<String>,
    /// Number of virtqueues (one worker thread each).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// Present the disk read-only to the guest.
    #[arg(long)]
    pub read_only: bool,
    /// Lock manager: `local` (this process is the array's only node),
    /// `lockd:PATH` (one node among the serve processes using that lockd on this host)
    /// or `dlm` (one node of the Linux DLM cluster: corosync + dlm_controld). The
    /// last two need a clustered bitmap.
    #[arg(long, value_name = "KIND", default_value = "local", value_parser = parse_lock_manager)]
    pub lock_manager: LockManager,
    /// Create missing image files of this size (e.g. 10G) with a new array on them.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub create_size: Option<u64>,
    /// Cluster name for an array made by --create-size (clustered bitmap).
    #[arg(long, value_name = "NAME", requires = "create_size")]
    pub cluster_name: Option<String>,
    /// Control socket (default: SOCKET.ctl), always 0600 and owned by this user.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Use the page cache instead of direct I/O on the legs.
    #[arg(long)]
    pub buffered: bool,
    /// Limit resync and recovery to this many bytes per second (e.g. 50M), leaving
    /// the legs' bandwidth to the guests (md's speed_limit_max). Default: no limit.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub resync_max_rate: Option<u64>,
    /// Let several nodes write the array at once (guests that coordinate their
    /// writes, e.g. a cluster file system on a disk shared by several VMs). By
    /// default one node writes: the one whose front-end started its vrings while
    /// no other node's did; the others serve reads and fail writes. All nodes of an
    /// array should agree on this.
    #[arg(long)]
    pub shared_writes: bool,
    /// Serve metrics in the Prometheus text format at http://ADDR/metrics
    /// (ADDR is IP:PORT, e.g. 127.0.0.1:9710) or on a unix socket (unix:PATH).
    #[arg(long, value_name = "ADDR", value_parser = crate::serve::metrics::parse_addr)]
    pub metrics: Option<crate::serve::metrics::MetricsAddr>,
    /// Fault drill: make leg INDEX fail, e.g. `1:writes-after=500` or `0:reads`, or
    /// stall its writes at or beyond a byte offset (`1:stall-writes-from=33554432`),
    /// until a file exists (`1:stall-writes-from=33554432,stall-until-file=PATH`).
    #[arg(long, value_name = "INDEX:FAULT", value_parser = parse_fault, hide = true)]
    pub inject_fault: Vec<(usize, FaultSpec)>,
    /// Fault drill: starting the thread NAME (resync, bitmap, control or
    /// vhost-user) fails, as when the system has no threads left.
    #[arg(long, value_name = "NAME", value_parser = ["resync", "bitmap", "control", "vhost-user"], hide = true)]
    pub inject_thread_failure: Option<String>,
    /// Interval of the multi-host heartbeat that an array served with the local
    /// lock manager keeps on its legs (e.g. 1s, 200ms): a start watches another
    /// host's heartbeat for 5 of its intervals plus 1 s before taking over.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration, overrides_with = "heartbeat_interval")]
    pub heartbeat_interval: std::time::Duration,
    /// Start even though another host's heartbeat moves on the legs. Two hosts
    /// writing one array destroy it: only for a host known to be down whose
    /// heartbeat is stuck.
    #[arg(long)]
    pub force: bool,
    /// Legs: block devices or image files.
    #[arg(required = true, num_args = 2.., value_name = "LEG")]
    pub legs: Vec<PathBuf>,
}

fn parse_lock_manager(s: &str) -> Result<LockManager, String> {
    match s {
        "local" => Ok(LockManager::Local),
        "dlm" => Ok(LockManager::Dlm),
        _ => match s.strip_prefix("lockd:") {
            Some(p) if !p.is_empty() => Ok(LockManager::Lockd(PathBuf::from(p))),
            _ => Err(format!(
                "unknown lock manager {s:?}; use local, dlm or lockd:PATH"
            )),
        },
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use e.g. 1s or 200ms"))?;
    let d = match unit {
        "ms" => std::time::Duration::from_millis(n),
        "s" => std::time::Duration::from_secs(n),
        _ => return Err(format!("{s:?} is not a duration: use e.g. 1s or 200ms")),
    };
    if d < std::time::Duration::from_millis(10) || d > std::time::Duration::from_secs(60) {
        return Err(format!("{s:?}: give 10ms to 60s"));
    }
    Ok(d)
}

fn parse_fault(s: &str) -> Result<(usize, FaultSpec), String> {
    let (idx, what) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected INDEX:FAULT"))?;
    let idx: usize = idx
        .parse()
        .map_err(|_| format!("{idx:?} is not a leg index"))?;
    let mut spec = FaultSpec::default();
    for part in what.split(',') {
        if part == "reads" {
            spec.fail_reads = true;
        } else if let Some(n) = part.strip_prefix("writes-after=") {
            spec.writes_after = Some(n.parse().map_err(|_| format!("{n:?} is not a number"))?);
        } else if let Some(n) = part.strip_prefix("stall-writes-from=") {
            spec.stall_writes_from = Some(n.parse().map_err(|_| format!("{n:?} is not a number"))?);
        } else if let Some(p) = part.strip_prefix("stall-until-file=") {
            spec.stall_until_file = Some(PathBuf::from(p));
        } else {
            return Err(format!(
                "unknown fault {part:?}: use reads, writes-after=N, stall-writes-from=BYTE or stall-until-file=PATH"
            ));
        }
    }
    Ok((idx, spec))
}

/// Runs `serve`.
pub fn run(args: ServeArgs) -> Result<(), String> {
    // Before anything that can wait: the heartbeat watch, the cluster's join.
    super::ignore_hangups("serve")?;
    if args.cluster_name.is_some() && args.lock_manager == LockManager::Local {
        return Err(
            "--cluster-name makes a clustered array, which a local lock manager cannot serve: add --lock-manager lockd:PATH (nodes on this host) or --lock-manager dlm".into(),
        );
    }
    let socket_perms = Perms {
        mode: args.socket_mode,
        uid: args.socket_owner.as_deref().map(user_id).transpose()?,
        gid: args.socket_group.as_deref().map(group_id).transpose()?,
    };
    if args.create_size.is_none() {
        if let Some(missing) = args.legs.iter().find(|p| !p.exists()) {
            return Err(format!(
                "leg {} does not exist; give --create-size to create image files",
                missing.display()
            ));
        }
    }
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| control_path(&args.socket));
    let config = ServeConfig {
        socket: args.socket,
        socket_perms,
        control,
        queues: usize::from(args.queues),
        read_only: args.read_only,
        buffered: args.buffered,
        legs: args.legs,
        faults: args.inject_fault,
        thread_failure: args.inject_thread_failure,
        lock_manager: args.lock_manager,
        resync_max_rate: args.resync_max_rate.unwrap_or(0),
        shared_writes: args.shared_writes,
        heartbeat_interval: args.heartbeat_interval,
        force: args.force,
        metrics: args.metrics,
    };
    // The sockets first: a start refused there touches no leg.
    let sockets = crate::serve::bind_sockets(&config)?;
    if let Some(size) = args.create_size {
        create_missing(&config.legs, size, args.cluster_name.as_deref())?;
    }
    crate::serve::run(config, sockets, |r| {
        super::out(&format!(
            "vhost-user-md: serving array {} on {}\nattach a VM with (guest RAM must be shared memory of the same size as -m):\n  qemu-system-x86_64 -m 2G -object memory-backend-memfd,id=mem,size=2G,share=on -machine q35,memory-backend=mem -chardev socket,id=vumd0,path={} -device vhost-user-blk-pci,chardev=vumd0,num-queues={} ...\n",
            r.uuid,
            r.socket.display(),
            r.socket.display(),
            r.queues
        ))
    })
    .map_err(|e| e.to_string())
}

/// With --create-size: when every leg is missing, create the images and a new
/// (already clean: all zero) array on them. Existing legs are used as they are.
fn create_missing(legs: &[PathBuf], size: u64, cluster: Option<&str>) -> Result<(), String> {
    let missing: Vec<&PathBuf> = legs.iter().filter(|p| !p.exists()).collect();
    if missing.len() == legs.len() && size < 4 << 20 {
        return Err(format!(
            "--create-size {size} is too small; give at least 4M"
        ));
    }
    if missing.is_empty() {
        return Ok(());
    }
    if missing.len() != legs.len() {
        return Err(format!(
            "leg {} is missing but others exist; --create-size only creates a whole new array (use `manage add` for a new leg)",
            missing[0].display()
        ));
    }
    let mut created = Created(Vec::new());
    let mut opened = Vec::new();
    for p in legs {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        // Removed again if anything fails from here on: sizing, claiming, the array.
        created
            .0
            .push(create_image(p).map_err(|e| format!("leg {}: cannot create: {e}", p.display()))?);
        let leg = FileLeg::open_with(p, OpenMode::CreateSize(size), false, Claim::Exclusive)
            .map_err(|e| format!("leg {}: cannot create: {e}", p.display()))?;
        opened.push(leg);
    }
    let refs: Vec<&dyn Leg> = opened.iter().map(|l| l as &dyn Leg).collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (g, metas) = create_array(
        &refs,
        &NewArray {
            name: super::create::stored_name("vumd", &super::create::hostname()),
            cluster_name: cluster.map(str::to_string),
            nodes: crate::md::layout::DEFAULT_NODES,
            bitmap_chunk: None,
            assume_clean: true,
            now,
            uuid: None,
        },
    )
    .map_err(|e| e.to_string())?;
    created.0.clear();
    log::info!(
        "created array {} on {} new image files: {} sectors{}",
        metas[0].sb.set_uuid,
        legs.len(),
        g.size,
        human_size(g.size * 512)
    );
    Ok(())
}

/// Creates the empty image file `path` names (0600: it holds a guest's disk),
/// refusing one that exists, even one made since the legs were looked at: only a
/// file this run made is ever removed. Returns the file's own path, `path` with its
/// symbolic links followed.
fn create_image(path: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let target = link_target(path)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)?;
    Ok(std::fs::canonicalize(&target).unwrap_or(target))
}

/// The file `path` names: its last component's symbolic links followed, a dangling
/// one to the file it would name (which `O_CREAT | O_EXCL` does not follow).
fn link_target(path: &Path) -> std::io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    // As many links as the kernel follows (MAXSYMLINKS).
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&p)?;
                p = match p.parent() {
                    Some(dir) => dir.join(to),
                    None => to,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::ELOOP))
}

/// Image files made by this run; removed on drop unless forgotten (cleared) once
/// the new array is on them.
struct Created(Vec<PathBuf>);

impl Drop for Created {
    fn drop(&mut self) {
        for p in &self.0 {
            match std::fs::remove_file(p) {
                Ok(()) => log::info!("removed the new image file {}", p.display()),
                Err(e) => log::warn!("cannot remove the new image file {}: {e}", p.display()),
            }
        }
    }
}

/// Output format of `status`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// Human-readable.
    Text,
    /// JSON.
    Json,
}

/// Renders a status like /proc/mdstat.
pub fn render_status(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let in_sync = s.legs.iter().filter(|l| l.state == "in-sync").count();
    let _ = writeln!(
        o,
        "array {} raid1{}: {} sectors{}, events {}",
        s.uuid,
        if s.clustered { " (clustered)" } else { "" },
        s.size_sectors,
        human_size(s.size_sectors * 512),
        s.events
    );
    let mut map = vec!['_'; s.raid_disks];
    for l in &s.legs {
        if let (Some(slot), "in-sync") = (l.slot, l.state.as_str()) {
            if slot < map.len() {
                map[slot] = 'U';
            }
        }
    }
    let _ = writeln!(
        o,
        "  [{}/{}] [{}]{}",
        s.raid_disks,
        in_sync,
        map.iter().collect::<String>(),
        if s.degraded { " degraded" } else { "" }
    );
    for l in &s.legs {
        let _ = writeln!(
            o,
            "  leg {} dev {} slot {}: {}",
            l.name,
            l.dev_number,
            l.slot.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
            l.state
        );
    }
    let _ = writeln!(
        o,
        "  bitmap: {}/{} chunks dirty, chunk {}",
        s.bitmap_dirty,
        s.bitmap_chunks,
        crate::md::human::human_chunksize(s.bitmap_chunk)
    );
    let r = &s.resync;
    if r.active || r.remaining_chunks > 0 {
        let total = r.done_chunks + r.remaining_chunks;
        let pct = if total > 0 {
            100.0 * r.done_chunks as f64 / total as f64
        } else {
            0.0
        };
        let _ = writeln!(
            o,
            "  {} = {pct:.1}% ({}/{} chunks) speed={}K/sec finish={}",
            r.kind,
            r.done_chunks,
            total,
            r.rate_bytes_per_sec / 1024,
            r.eta_seconds
                .map(|e| format!("{}.{}min", e / 60, (e % 60) / 6))
                .unwrap_or_else(|| "?".into())
        );
    }
    if let Some(c) = &s.cluster {
        let list = |v: &[u32]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            }
        };
        let _ = writeln!(
            o,
            "  cluster: this node slot {}, peers alive: {}, resync held by: {}",
            c.slot,
            list(&c.peers),
            c.resync_holder
                .map(|h| format!("slot {h}"))
                .unwrap_or_else(|| "nobody".into())
        );
        if c.reads_from_one_leg {
            let _ = writeln!(
                o,
                "  reads from one leg: a node left before its dirty chunks were taken over"
            );
        }
        for [lo, hi] in &c.suspended {
            let _ = writeln!(o, "  suspended: sectors {lo}..{hi} (writes wait there)");
        }
    }
    if let Some(why) = &s.fenced {
        let _ = writeln!(o, "  FENCED: {why}: guest writes fail, nothing is written");
    }
    let _ = writeln!(
        o,
        "  writer role: {}{}{}",
        s.writer_role,
        if s.shared_writes {
            " (shared writes)"
        } else {
            ""
        },
        if s.writes_refused > 0 {
            format!(", {} guest writes refused", s.writes_refused)
        } else {
            String::new()
        }
    );
    let _ = writeln!(o, "  requests completed: {}", s.requests_completed);
    o
}

/// The control socket for a path given on the command line: the vhost-user socket
/// (its `.ctl` companion is used) or the control socket itself.
pub fn resolve_control(path: &Path) -> PathBuf {
    if path.extension().is_some_and(|e| e == "ctl") {
        path.to_path_buf()
    } else {
        control_path(path)
    }
}

/// Runs `status`.
pub fn status(socket: &Path, format: Format) -> Result<(), String> {
    let resp = control::request(&resolve_control(socket), &Request::Status)?;
    let s = resp.status.ok_or_else(|| {
        resp.error
            .unwrap_or_else(|| "no status in the answer".into())
    })?;
    match format {
        Format::Json => super::out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?
        )),
        Format::Text => super::out(&render_status(&s)),
    }
    Ok(())
}

/// Manage operations.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ManageOp {
    /// Mark a leg faulty.
    Fail,
    /// Take a faulty leg out of the array.
    Remove,
    /// Add a blank leg (full recovery).
    Add,
    /// Put a former leg back (resyncs only chunks dirty in the bitmap).
    ReAdd,
}

/// Runs `manage`.
pub fn manage(socket: &Path, op: ManageOp, leg: &Path) -> Result<(), String> {
    let mut name = leg.display().to_string();
    if op == ManageOp::Add {
        name = std::fs::canonicalize(leg)
            .map_err(|e| format!("{}: {e}", leg.display()))?
            .display()
            .to_string();
    }
    let req = match op {
        ManageOp::Fail => Request::Fail { leg: name },
        ManageOp::Remove => Request::Remove { leg: name },
        ManageOp::Add => Request::Add { leg: name },
        ManageOp::ReAdd => Request::ReAdd { leg: name },
    };
    let resp = control::request(&resolve_control(socket), &req)?;
    if resp.ok {
        super::out(&format!("{}\n", resp.message.unwrap_or_default()));
        Ok(())
    } else {
        Err(resp.error.unwrap_or_else(|| "refused".into()))
    }
}

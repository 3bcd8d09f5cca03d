//! The control socket of a running `serve`: one JSON request per line, one JSON
//! answer per line. Used by `vhost-user-md status` and `vhost-user-md manage`.

use super::line::{self, LineError};
use super::resync::ResyncStatus;
use super::Service;
use crate::raid1::{LegState, RecoveryKind};
use crate::storage::{FencedLeg, FileLeg, Leg, OpenMode};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Array state.
    Status,
    /// Fail a leg.
    Fail {
        /// The leg, as named at start-up.
        leg: String,
    },
    /// Remove a faulty leg.
    Remove {
        /// The leg.
        leg: String,
    },
    /// Put a leg of this array back.
    ReAdd {
        /// The leg.
        leg: String,
    },
    /// Add a blank leg.
    Add {
        /// Path of the new leg.
        leg: String,
    },
}

/// One leg in the status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LegStatus {
    /// Name (path).
    pub name: String,
    /// Mirror slot, if in one.
    pub slot: Option<usize>,
    /// `dev_number`.
    pub dev_number: u32,
    /// "in-sync", "recovering", "faulty" or "removed".
    pub state: String,
}

/// What `status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Array uuid.
    pub uuid: String,
    /// Array size in sectors.
    pub size_sectors: u64,
    /// Superblock events.
    pub events: u64,
    /// Clustered bitmap.
    pub clustered: bool,
    /// The node slot whose bitmap this node writes.
    pub node_slot: u32,
    /// Mirror slots.
    pub raid_disks: usize,
    /// Some slot lacks an in-sync leg.
    pub degraded: bool,
    /// Legs.
    pub legs: Vec<LegStatus>,
    /// Bitmap chunk size in bytes.
    pub bitmap_chunk: u32,
    /// Bitmap chunks.
    pub bitmap_chunks: u64,
    /// Chunks with the bit set.
    pub bitmap_dirty: u64,
    /// Resync / recovery.
    pub resync: ResyncStatusWire,
    /// Guest requests completed.
    pub requests_completed: u64,
    /// The writer role on this node: "held", "refused", "releasing" (being given
    /// back) or "idle" (no front-end runs the vrings).
    #[serde(default)]
    pub writer_role: String,
    /// Writers share the role (`--shared-writes`).
    #[serde(default)]
    pub shared_writes: bool,
    /// Guest writes refused because another node holds the writer role.
    #[serde(default)]
    pub writes_refused: u64,
    /// The cluster, on a cluster node.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cluster: Option<crate::cluster::node::ClusterView>,
    /// Why this node is fenced (writes nothing), if it is.
    #[serde(default)]
    pub fenced: Option<String>,
}

/// Resync progress as sent over the socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResyncStatusWire {
    /// A pass is running.
    pub active: bool,
    /// "resync" or "recovery".
    pub kind: String,
    /// Chunks done in this pass.
    pub done_chunks: u64,
    /// Chunks to go.
    pub remaining_chunks: u64,
    /// Bytes copied since start-up.
    pub bytes_copied: u64,
    /// Bytes per second.
    pub rate_bytes_per_sec: u64,
    /// Seconds to go.
    pub eta_seconds: Option<u64>,
}

impl From<ResyncStatus> for ResyncStatusWire {
    fn from(s: ResyncStatus) -> Self {
        ResyncStatusWire {
            active: s.active,
            kind: s.kind.to_string(),
            done_chunks: s.done_chunks,
            remaining_chunks: s.remaining_chunks,
            bytes_copied: s.bytes_copied,
            rate_bytes_per_sec: s.rate_bytes_per_sec,
            eta_seconds: s.eta_seconds,
        }
    }
}

/// An answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// What was done.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    /// The status.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<Status>,
}

impl Response {
    fn ok(message: String) -> Self {
        Response {
            ok: true,
            error: None,
            message: Some(message),
            status: None,
        }
    }

    fn err(e: impl ToString) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            message: None,
            status: None,
        }
    }
}

/// The control server.
pub struct Server {
    listener: UnixListener,
    service: Arc<Service>,
}

fn state_name(s: LegState) -> &'static str {
    match s {
        LegState::InSync => "in-sync",
        LegState::Recovering => "recovering",
        LegState::Faulty => "faulty",
    }
}

/// The current status of a service.
pub fn status(service: &Service) -> Status {
    let a = &service.array;
    let mut legs: Vec<LegStatus> = a
        .members()
        .iter()
        .enumerate()
        .filter_map(|(slot, m)| {
            m.as_ref().map(|m| LegStatus {
                name: m.name().to_string(),
                slot: Some(slot),
                dev_number: m.dev_number,
                state: state_name(m.state()).into(),
            })
        })
        .collect();
    legs.extend(a.detached().iter().map(|m| LegStatus {
        name: m.name().to_string(),
        slot: None,
        dev_number: m.dev_number,
        state: "removed".into(),
    }));
    let stats = a.bitmap.stats();
    Status {
        uuid: a.uuid.mdadm(),
        size_sectors: a.size,
        events: a.events(),
        clustered: a.clustered,
        node_slot: a.own_slot,
        raid_disks: a.members().len(),
        degraded: a.is_degraded(),
        legs,
        bitmap_chunk: a.bitmap.geometry().chunksize,
        bitmap_chunks: stats.chunks,
        bitmap_dirty: stats.dirty,
        resync: service.progress.status(a).into(),
        requests_completed: service.backend.completed.load(Ordering::Relaxed),
        writer_role: if a.is_fenced() {
            "fenced".into()
        } else {
            service.backend.writer_gate().state_name().into()
        },
        shared_writes: service.backend.writer_gate().shared(),
        writes_refused: service.backend.writes_refused.load(Ordering::Relaxed),
        cluster: service.cluster.as_ref().map(|c| c.view()),
        fenced: a.fence_reason(),
    }
}

impl Server {
    /// A control server answering on `listener`.
    pub fn new(listener: UnixListener, service: Arc<Service>) -> Server {
        Server { listener, service }
    }

    /// Answers requests until the process ends, each connection on a thread of its
    /// own (at most [`MAX_CONNECTIONS`] at once; beyond, a connection gets an error
    /// answer and is closed).
    pub fn run(self) {
        let server = Arc::new(self);
        let open = Arc::new(AtomicUsize::new(0));
        for conn in server.listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    warn!("control socket: {e}");
                    continue;
                }
            };
            let Some(slot) = ConnectionSlot::take(&open) else {
                warn!("control socket: {MAX_CONNECTIONS} connections open, one refused");
                refuse(&conn, "busy: too many control connections open; try again");
                continue;
            };
            let s = server.clone();
            let spawned = std::thread::Builder::new()
                .name("control-conn".into())
                .spawn(move || {
                    let _slot = slot;
                    if let Err(e) = s.handle(&conn) {
                        warn!("control connection: {e}");
                    }
                });
            if let Err(e) = spawned {
                warn!("control socket: cannot start a connection thread: {e}");
            }
        }
    }

    fn handle(&self, conn: &UnixStream) -> std::io::Result<()> {
        conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let resp = match line::read_line(conn, MAX_LINE, REQUEST_TIMEOUT) {
            Ok(line) => match serde_json::from_slice::<Request>(line.trim_ascii()) {
                Ok(req) => self.execute(req),
                Err(e) => Response::err(format!("bad request: {e}")),
            },
            Err(LineError::Closed) => return Ok(()),
            Err(LineError::Io(e)) => return Err(e),
            Err(e) => {
                debug!("control connection: {e}");
                Response::err(format!("bad request: {e}"))
            }
        };
        answer(conn, &resp)
    }

    fn execute(&self, req: Request) -> Response {
        let a = &self.service.array;
        if req != Request::Status {
            info!("control: {req:?}");
        }
        match req {
            Request::Status => Response {
                ok: true,
                error: None,
                message: None,
                status: Some(status(&self.service)),
            },
            Request::Fail { leg } => match a.fail_leg(&leg) {
                Ok(()) => Response::ok(format!("leg {leg} failed; the array is degraded")),
                Err(e) => Response::err(e),
            },
            Request::Remove { leg } => match a.remove_leg(&leg) {
                Ok(()) => Response::ok(format!("leg {leg} removed")),
                Err(e) => Response::err(e),
            },
            Request::ReAdd { leg } => match a.re_add_leg(&leg) {
                Ok(RecoveryKind::Bitmap) => Response::ok(format!(
                    "leg {leg} re-added: copying the chunks dirty in the bitmap"
                )),
                Ok(RecoveryKind::Full) => Response::ok(format!(
                    "leg {leg} re-added: too old for the bitmap, full recovery"
                )),
                Err(e) => Response::err(e),
            },
            Request::Add { leg } => {
                let opened = FileLeg::open_with(
                    Path::new(&leg),
                    OpenMode::ReadWrite,
                    !self.service.config.buffered,
                    self.service.config.lock_manager.leg_claim(),
                );
                match opened {
                    Ok(l) => match a.add_leg(Arc::new(FencedLeg::new(
                        Arc::new(l),
                        self.service.fence.clone(),
                    )) as Arc<dyn Leg>)
                    {
                        Ok(slot) => Response::ok(format!(
                            "leg {leg} added to slot {slot}: full recovery started"
                        )),
                        Err(e) => Response::err(e),
                    },
                    Err(e) => Response::err(format!("leg {leg}: cannot open: {e}")),
                }
            }
        }
    }
}

/// Connections answered at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send its whole request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line.
pub const MAX_LINE: usize = 64 * 1024;

/// One of the [`MAX_CONNECTIONS`] places, given back when dropped.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(open: &Arc<AtomicUsize>) -> Option<ConnectionSlot> {
        open.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < MAX_CONNECTIONS).then_some(n + 1)
        })
        .ok()
        .map(|_| ConnectionSlot(open.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Writes `resp` as one line.
fn answer(conn: &UnixStream, resp: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_string(resp).map_err(std::io::Error::other)?;
    out.push('\n');
    let mut w = conn;
    w.write_all(out.as_bytes())
}

/// Answers `why` without reading the request (the connection is then closed).
fn refuse(conn: &UnixStream, why: &str) {
    // The answer fits the socket buffer; the timeout only guards the accept loop.
    let sent = conn
        .set_write_timeout(Some(Duration::from_secs(1)))
        .and_then(|()| answer(conn, &Response::err(why)));
    if let Err(e) = sent {
        debug!("control connection refused: {e}");
    }
}

/// Sends one request to the control socket at `path`.
pub fn request(path: &Path, req: &Request) -> Result<Response, String> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach {}: {e} (is `vhost-user-md serve` running with that socket?)",
            path.display()
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    conn.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .map_err(|e| format!("no answer from {}: {e}", path.display()))?;
    serde_json::from_str(answer.trim()).map_err(|e| format!("bad answer: {e}"))
}

//! `serve --metrics ADDR`: the node's metrics in the Prometheus text format
//! (version 0.0.4) at `http://ADDR/metrics`, or over a unix socket.
//!
//! Two sources: the device's request statistics (counted by the queue workers,
//! see [`crate::vhost::stats`]), and everything `status` reports (legs, bitmap,
//! resync, cluster, writer role), gathered from the same status at each scrape so
//! that the two never disagree.
//!
//! The endpoint answers one connection at a time, each given [`IO_TIMEOUT`] in
//! all to send its request and take the answer: a client that trickles or stalls
//! delays the next scrape at most that long, and holds no memory beyond
//! [`MAX_REQUEST`] bytes. It answers while the node stops, too.

use super::control::{self, Status};
use super::Service;
use log::{info, warn};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time a client has to send its request, and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request head read.
pub const MAX_REQUEST: usize = 8192;
/// Prefix of every metric name.
pub const PREFIX: &str = "vhost_user_md";

/// Where the metrics are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// HOST:PORT (TCP).
    Tcp(SocketAddr),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "http://{a}/metrics"),
            MetricsAddr::Unix(p) => write!(f, "unix:{} (GET /metrics)", p.display()),
        }
    }
}

/// Parses `HOST:PORT` (an address, e.g. 127.0.0.1:9710 or [::1]:9710) or `unix:PATH`.
pub fn parse_addr(s: &str) -> Result<MetricsAddr, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err("unix: needs a path, e.g. unix:/run/vhost-user-md/disk1.metrics".into());
        }
        return Ok(MetricsAddr::Unix(PathBuf::from(p)));
    }
    s.parse::<SocketAddr>().map(MetricsAddr::Tcp).map_err(|_| {
        format!("{s:?} is not an address: use IP:PORT (e.g. 127.0.0.1:9710) or unix:PATH")
    })
}

/// The listening endpoint, bound before the legs are touched.
pub enum Endpoint {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket (its path removed when dropped).
    Unix(UnixListener, crate::unixsock::Bound),
}

/// Binds `addr`: a port in use or a path that is not a stale socket is refused.
pub fn bind(addr: &MetricsAddr) -> Result<Endpoint, String> {
    match addr {
        MetricsAddr::Tcp(a) => TcpListener::bind(a)
            .map(Endpoint::Tcp)
            .map_err(|e| format!("metrics address {a}: {e}")),
        MetricsAddr::Unix(p) => {
            let perms = crate::unixsock::Perms {
                mode: 0o600,
                uid: None,
                gid: None,
            };
            crate::unixsock::listen(p, perms)
                .map(|(l, b)| Endpoint::Unix(l, b))
                .map_err(|e| format!("metrics socket {}: {e}", p.display()))
        }
    }
}

/// The metrics of a serving node.
struct Exporter {
    registry: Registry,
}

impl Exporter {
    fn new(service: &Arc<Service>) -> Exporter {
        let mut registry = Registry::with_prefix(PREFIX);
        if let Some(stats) = service.backend.stats() {
            stats.register(&mut registry);
        }
        registry.register_collector(Box::new(StatusCollector(service.clone())));
        Exporter { registry }
    }

    fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Starts the thread serving the metrics on `endpoint`. Returns the unix socket's
/// path guard, if any: the path is removed when it is dropped.
pub fn spawn(
    endpoint: Endpoint,
    service: Arc<Service>,
) -> std::io::Result<Option<crate::unixsock::Bound>> {
    let exporter = Exporter::new(&service);
    let (endpoint, path) = match endpoint {
        Endpoint::Unix(l, bound) => (Listening::Unix(l), Some(bound)),
        Endpoint::Tcp(l) => (Listening::Tcp(l), None),
    };
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || match endpoint {
            Listening::Tcp(l) => {
                if let Ok(a) = l.local_addr() {
                    info!("metrics on http://{a}/metrics");
                }
                for conn in l.incoming() {
                    match conn {
                        Ok(c) => answer(c, &exporter),
                        Err(e) => warn!("metrics: {e}"),
                    }
                }
            }
            Listening::Unix(l) => {
                for conn in l.incoming() {
                    match conn {
                        Ok(c) => answer(c, &exporter),
                        Err(e) => warn!("metrics: {e}"),
                    }
                }
            }
        })
        .map(|_| path)
}

/// A listener the metrics thread owns.
enum Listening {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A connection's stream.
trait Conn: Read + Write {
    fn set_read_deadline(&self, left: Duration) -> std::io::Result<()>;
    fn set_write_deadline(&self, left: Duration) -> std::io::Result<()>;
}

impl Conn for std::net::TcpStream {
    fn set_read_deadline(&self, left: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(left))
    }
    fn set_write_deadline(&self, left: Duration) -> std::io::Result<()> {
        self.set_write_timeout(Some(left))
    }
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_read_deadline(&self, left: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(left))
    }
    fn set_write_deadline(&self, left: Duration) -> std::io::Result<()> {
        self.set_write_timeout(Some(left))
    }
}

/// A connection with [`IO_TIMEOUT`] for all of it: every read and write waits
/// at most what is left of it.
struct Deadline<C> {
    conn: C,
    end: Instant,
}

impl<C: Conn> Deadline<C> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl<C: Conn> Read for Deadline<C> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.conn.set_read_deadline(left)?;
        self.conn.read(buf)
    }
}

impl<C: Conn> Write for Deadline<C> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.conn.set_write_deadline(left)?;
        self.conn.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

/// Reads one HTTP request head and answers it; closes the connection. The whole
/// exchange gets [`IO_TIMEOUT`]; the node's state is answered while it stops too.
fn answer(conn: impl Conn, exporter: &Exporter) {
    let mut conn = Deadline {
        conn,
        end: Instant::now() + IO_TIMEOUT,
    };
    let Some(head) = read_head(&mut conn) else {
        let _ = respond(
            &mut conn,
            "400 Bad Request",
            "text/plain",
            "bad request\n",
            true,
        );
        return;
    };
    let mut parts = head.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let body = method != "HEAD";
    let result = match (method, path) {
        ("GET" | "HEAD", "/metrics") => match exporter.render() {
            Ok(text) => respond(
                &mut conn,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &text,
                body,
            ),
            Err(_) => respond(
                &mut conn,
                "500 Internal Server Error",
                "text/plain",
                "encoding failed\n",
                body,
            ),
        },
        ("GET" | "HEAD", "/") => respond(
            &mut conn,
            "200 OK",
            "text/plain; charset=utf-8",
            "vhost-user-md: metrics at /metrics\n",
            body,
        ),
        ("GET" | "HEAD", _) => respond(
            &mut conn,
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n",
            body,
        ),
        _ => respond(
            &mut conn,
            "405 Method Not Allowed",
            "text/plain",
            "use GET\n",
            true,
        ),
    };
    if let Err(e) = result {
        log::debug!("metrics: answer not delivered: {e}");
    }
}

/// The request line of an HTTP request whose head ends within [`MAX_REQUEST`]
/// bytes; `None` for anything else.
fn read_head(conn: &mut impl Read) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = std::str::from_utf8(&buf).ok()?;
    Some(text.lines().next()?.trim_end().to_string())
}

/// Writes an answer; `body` false (HEAD) sends the head alone, with the length
/// the body would have.
fn respond(
    conn: &mut impl Write,
    status: &str,
    ctype: &str,
    text: &str,
    body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    conn.write_all(head.as_bytes())?;
    if body {
        conn.write_all(text.as_bytes())?;
    }
    conn.flush()
}

/// What `status` reports, as metrics, gathered at each scrape.
struct StatusCollector(Arc<Service>);

impl std::fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusCollector")
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_status(&control::status(&self.0), &mut enc)
    }
}

type Labels = Vec<(&'static str, String)>;

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, unit, g.metric_type())?;
    g.encode(m)
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let m = enc.encode_descriptor(name, help, unit, c.metric_type())?;
    c.encode(m)
}

fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// Encodes a status: one metric per field an operator alerts or graphs on.
fn encode_status(s: &Status, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let b = |v: bool| i64::from(v);
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let info = vec![
        ("uuid", s.uuid.clone()),
        ("clustered", s.clustered.to_string()),
    ];
    gauges(
        enc,
        "array_info",
        "The array served (always 1)",
        &[(info, 1)],
    )?;
    gauge(
        enc,
        "array_size",
        "Size of the array",
        Some(&Unit::Bytes),
        n(s.size_sectors.saturating_mul(512)),
    )?;
    gauge(
        enc,
        "array_events",
        "The superblocks' event count",
        None,
        n(s.events),
    )?;
    gauge(
        enc,
        "array_raid_disks",
        "Mirror slots",
        None,
        n(s.raid_disks as u64),
    )?;
    let in_sync = s.legs.iter().filter(|l| l.state == "in-sync").count();
    gauge(
        enc,
        "array_legs_in_sync",
        "Legs in sync",
        None,
        n(in_sync as u64),
    )?;
    gauge(
        enc,
        "array_degraded",
        "1 when some mirror slot lacks an in-sync leg",
        None,
        b(s.degraded),
    )?;
    let legs: Vec<_> = s
        .legs
        .iter()
        .map(|l| {
            let slot = l.slot.map_or_else(|| "-".to_string(), |x| x.to_string());
            (
                vec![
                    ("leg", l.name.clone()),
                    ("slot", slot),
                    ("state", l.state.clone()),
                ],
                1,
            )
        })
        .collect();
    gauges(
        enc,
        "leg_state",
        "Each leg with its state (in-sync, recovering, faulty, removed) as a label; always 1",
        &legs,
    )?;
    gauge(
        enc,
        "bitmap_chunk_size",
        "Bitmap chunk size",
        Some(&Unit::Bytes),
        i64::from(s.bitmap_chunk),
    )?;
    gauge(
        enc,
        "bitmap_chunks",
        "Bitmap chunks",
        None,
        n(s.bitmap_chunks),
    )?;
    gauge(
        enc,
        "bitmap_dirty_chunks",
        "Chunks whose write-intent bit is set in this node's bitmap",
        None,
        n(s.bitmap_dirty),
    )?;
    let r = &s.resync;
    let kind = || vec![("kind", r.kind.clone())];
    gauges(
        enc,
        "resync_active",
        "1 while a resync or recovery pass runs",
        &[(kind(), b(r.active))],
    )?;
    gauge(
        enc,
        "resync_done_chunks",
        "Chunks done in the current pass",
        None,
        n(r.done_chunks),
    )?;
    gauge(
        enc,
        "resync_remaining_chunks",
        "Chunks left in the current pass",
        None,
        n(r.remaining_chunks),
    )?;
    counter(
        enc,
        "resync_copied",
        "Bytes copied by resync and recovery since start",
        Some(&Unit::Bytes),
        r.bytes_copied,
    )?;
    gauge(
        enc,
        "resync_rate_bytes_per_second",
        "Resync/recovery rate averaged over the current pass (rate(resync_copied_bytes_total) for the current one)",
        None,
        n(r.rate_bytes_per_sec),
    )?;
    let role = vec![
        ("state", s.writer_role.clone()),
        ("shared", s.shared_writes.to_string()),
    ];
    gauges(
        enc,
        "writer_role",
        "This node's writer role (held, refused, releasing, idle, fenced) as a label; always 1",
        &[(role, 1)],
    )?;
    counter(
        enc,
        "writes_refused",
        "Guest writes refused because another node holds the writer role",
        None,
        s.writes_refused,
    )?;
    counter(
        enc,
        "requests_completed",
        "Guest requests completed, all queues",
        None,
        s.requests_completed,
    )?;
    gauge(
        enc,
        "fenced",
        "1 when this node may not write (lost its lock manager)",
        None,
        b(s.fenced.is_some()),
    )?;
    if let Some(c) = &s.cluster {
        gauge(
            enc,
            "cluster_slot",
            "This node's bitmap slot",
            None,
            i64::from(c.slot),
        )?;
        gauge(
            enc,
            "cluster_peers_alive",
            "Other live nodes of the array",
            None,
            n(c.peers.len() as u64),
        )?;
        let holder = c.resync_holder.map_or(-1, i64::from);
        gauge(
            enc,
            "cluster_resync_holder",
            "Slot of the node holding the resync lock (-1: none)",
            None,
            holder,
        )?;
        gauge(
            enc,
            "cluster_suspended_ranges",
            "Ranges where writes wait for another node's resync",
            None,
            n(c.suspended.len() as u64),
        )?;
        gauge(
            enc,
            "cluster_reads_from_one_leg",
            "1 while reads go to one leg (a dead node's chunks not yet taken over)",
            None,
            b(c.reads_from_one_leg),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_mistakes_say_what_to_give() {
        assert_eq!(
            parse_addr("127.0.0.1:9710").unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9710".parse().unwrap())
        );
        assert_eq!(
            parse_addr("[::1]:9710").unwrap(),
            MetricsAddr::Tcp("[::1]:9710".parse().unwrap())
        );
        assert_eq!(
            parse_addr("unix:/run/x.metrics").unwrap(),
            MetricsAddr::Unix("/run/x.metrics".into())
        );
        assert!(parse_addr("localhost").unwrap_err().contains("IP:PORT"));
        assert!(parse_addr("unix:").is_err());
    }

    #[test]
    fn a_request_head_is_read_up_to_its_end_and_no_further() {
        let mut ok: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(read_head(&mut ok).as_deref(), Some("GET /metrics HTTP/1.1"));
        let endless = vec![b'a'; MAX_REQUEST + 10];
        assert_eq!(read_head(&mut endless.as_slice()), None);
        let mut cut: &[u8] = b"GET /metrics HTTP/1.1\r\n";
        assert_eq!(read_head(&mut cut), None);
    }
}

//! The device's request statistics: per queue and kind of request, how many, how
//! many bytes, how long they took, and errors by status; per front-end stop of a
//! vring (GET_VRING_BASE, as a migration's source does), how long its drain took.
//!
//! Every queue's worker records into handles of its own (no cache line shared
//! between queues); the Prometheus families they belong to are registered once
//! with [`DeviceStats::register`] and encoded when scraped.

use super::request::{status, Kind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QueueKind {
    queue: u16,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QueueKindStatus {
    queue: u16,
    kind: &'static str,
    status: &'static str,
}

fn latency_histogram() -> Histogram {
    // 25 µs to 3.3 s.
    Histogram::new(exponential_buckets(25e-6, 2.0, 18))
}

/// The kinds whose latency is kept: those that go to the legs (GET_ID and
/// malformed requests end at once; their histograms would only add series).
const TIMED: [Kind; 5] = [
    Kind::Read,
    Kind::Write,
    Kind::Flush,
    Kind::Discard,
    Kind::WriteZeroes,
];

/// The metric families of the device.
#[derive(Debug, Clone)]
pub struct DeviceStats {
    requests: Family<QueueKind, Counter>,
    bytes: Family<QueueKind, Counter>,
    latency: Family<QueueKind, Histogram, fn() -> Histogram>,
    errors: Family<QueueKindStatus, Counter>,
    vring_stops: Counter,
    drain: Histogram,
}

impl Default for DeviceStats {
    fn default() -> DeviceStats {
        DeviceStats {
            requests: Family::default(),
            bytes: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            errors: Family::default(),
            vring_stops: Counter::default(),
            drain: Histogram::new(exponential_buckets(1e-4, 4.0, 10)),
        }
    }
}

impl DeviceStats {
    /// Adds the families to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "requests",
            "Guest requests completed, by queue and kind",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "request",
            "Bytes of guest data read or written, by queue and kind",
            Unit::Bytes,
            self.bytes.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from taking a request off the ring to writing its status, by queue and kind",
            Unit::Seconds,
            self.latency.clone(),
        );
        registry.register(
            "request_errors",
            "Guest requests that ended with an error status (ioerr, unsupp), by queue and kind",
            self.errors.clone(),
        );
        registry.register(
            "vring_stops",
            "Vrings stopped by the front-end (GET_VRING_BASE, one per queue: a migration's source, a VM stop or reset)",
            self.vring_stops.clone(),
        );
        registry.register_with_unit(
            "vring_stop_drain",
            "Time a vring stop waited for the requests in flight to end",
            Unit::Seconds,
            self.drain.clone(),
        );
    }

    /// The handles queue `queue`'s worker records into.
    pub fn queue(&self, queue: u16) -> QueueStats {
        let at = |kind: Kind| QueueKind {
            queue,
            kind: kind.name(),
        };
        QueueStats {
            requests: Kind::ALL.map(|k| self.requests.get_or_create(&at(k)).clone()),
            bytes: [Kind::Read, Kind::Write].map(|k| self.bytes.get_or_create(&at(k)).clone()),
            latency: TIMED.map(|k| self.latency.get_or_create(&at(k)).clone()),
            errors: self.errors.clone(),
            queue,
        }
    }

    /// A vring stop that waited `drain` for its requests in flight.
    pub fn vring_stopped(&self, drain: Duration) {
        self.vring_stops.inc();
        self.drain.observe(drain.as_secs_f64());
    }
}

/// One queue's handles.
#[derive(Debug, Clone)]
pub struct QueueStats {
    requests: [Counter; Kind::ALL.len()],
    /// Reads, writes.
    bytes: [Counter; 2],
    latency: [Histogram; TIMED.len()],
    errors: Family<QueueKindStatus, Counter>,
    queue: u16,
}

impl QueueStats {
    /// A request of `kind` moving `bytes` of guest data, taken off the ring at
    /// `started`, ended with status `st`.
    pub fn record(&self, kind: Kind, bytes: usize, started: Instant, st: u8) {
        self.requests[kind.index()].inc();
        if let Some(i) = TIMED.iter().position(|&k| k == kind) {
            self.latency[i].observe(started.elapsed().as_secs_f64());
        }
        if st != status::OK {
            let status = if st == status::UNSUPP {
                "unsupp"
            } else {
                "ioerr"
            };
            self.errors
                .get_or_create(&QueueKindStatus {
                    queue: self.queue,
                    kind: kind.name(),
                    status,
                })
                .inc();
        } else if let Some(c) = match kind {
            Kind::Read => Some(&self.bytes[0]),
            Kind::Write => Some(&self.bytes[1]),
            _ => None,
        } {
            c.inc_by(bytes as u64);
        }
    }
}

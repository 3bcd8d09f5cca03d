//! The device's request statistics: per queue and kind of request, how many, how
//! many bytes, how long they took, and errors by status; per front-end stop of a
//! vring (GET_VRING_BASE, as a migration's source does), how long its drain took.
//!
//! Every queue's worker records into handles of its own (no cache line shared
//! between queues); the Prometheus families they belong to are registered once
//! with [`DeviceStats::register`] and encoded when scraped.

use super::request::{status, Kind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// Upper bound of the first latency bucket, in nanoseconds; each next bucket's
/// bound is twice the one before (25 µs to 3.3 s), then +Inf.
const FIRST_BUCKET_NS: u64 = 25_000;
/// Finite latency buckets.
const BUCKETS: usize = 18;

/// A latency histogram recorded with a few uncontended atomic additions (the
/// bucket found by a bit scan), cheap enough for every request; encoded as a
/// Prometheus histogram.
#[derive(Debug, Clone, Default)]
pub struct Latency(Arc<LatencyCells>);

#[derive(Debug, Default)]
struct LatencyCells {
    /// Per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; BUCKETS + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Latency {
    /// The bucket of a duration: the first whose bound is at least `ns`.
    fn bucket(ns: u64) -> usize {
        let q = ns.div_ceil(FIRST_BUCKET_NS);
        if q <= 1 {
            return 0;
        }
        // ceil(log2(q)) for q >= 2.
        ((u64::BITS - (q - 1).leading_zeros()) as usize).min(BUCKETS)
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let c = &self.0;
        c.buckets[Self::bucket(ns)].fetch_add(1, Ordering::Relaxed);
        c.sum_ns.fetch_add(ns, Ordering::Relaxed);
        c.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let buckets: Vec<(f64, u64)> = (0..=BUCKETS)
            .map(|i| {
                let bound = if i == BUCKETS {
                    f64::INFINITY
                } else {
                    (FIRST_BUCKET_NS << i) as f64 * 1e-9
                };
                (bound, c.buckets[i].load(Ordering::Relaxed))
            })
            .collect();
        // The count is the buckets' sum: a scrape between a bucket's and the
        // count's addition sees the two agree.
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = c.sum_ns.load(Ordering::Relaxed) as f64 * 1e-9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
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
    latency: Family<QueueKind, Latency>,
    errors: Family<QueueKindStatus, Counter>,
    vring_stops: Counter,
    drain: Histogram,
}

impl Default for DeviceStats {
    fn default() -> DeviceStats {
        DeviceStats {
            requests: Family::default(),
            bytes: Family::default(),
            latency: Family::default(),
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
    latency: [Latency; TIMED.len()],
    errors: Family<QueueKindStatus, Counter>,
    queue: u16,
}

impl QueueStats {
    /// A request of `kind` moving `bytes` of guest data, taken off the ring at
    /// `started`, ended with status `st`.
    pub fn record(&self, kind: Kind, bytes: usize, started: Instant, st: u8) {
        self.requests[kind.index()].inc();
        if let Some(i) = TIMED.iter().position(|&k| k == kind) {
            self.latency[i].observe(started.elapsed());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_goes_to_the_first_bucket_whose_bound_holds_it() {
        let us = |n: u64| n * 1000;
        assert_eq!(Latency::bucket(0), 0);
        assert_eq!(Latency::bucket(us(25)), 0);
        assert_eq!(Latency::bucket(us(25) + 1), 1);
        assert_eq!(Latency::bucket(us(50)), 1);
        assert_eq!(Latency::bucket(us(50) + 1), 2);
        assert_eq!(Latency::bucket(us(100)), 2);
        assert_eq!(Latency::bucket(us(101)), 3);
        // The last finite bound, 25 µs * 2^17 = 3.2768 s, then +Inf.
        assert_eq!(Latency::bucket(FIRST_BUCKET_NS << 17), 17);
        assert_eq!(Latency::bucket((FIRST_BUCKET_NS << 17) + 1), BUCKETS);
        assert_eq!(Latency::bucket(u64::MAX), BUCKETS);
    }

    #[test]
    fn the_histogram_encodes_cumulative_buckets_sum_and_count() {
        let mut registry = Registry::default();
        let h = Latency::default();
        registry.register("lat", "help", h.clone());
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_secs(10));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("lat_bucket{le=\"2.5e-05\"} 1\n"), "{out}");
        assert!(out.contains("lat_bucket{le=\"5e-05\"} 2\n"), "{out}");
        assert!(out.contains("lat_bucket{le=\"3.2768\"} 2\n"), "{out}");
        assert!(out.contains("lat_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("lat_count 3\n"), "{out}");
        assert!(out.contains("lat_sum 10.00005"), "{out}");
    }
}

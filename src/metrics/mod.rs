//! Every metric ghmd exports, in one place: what the registry reports through [`StepObserver`],
//! what the gRPC layer measures per request, what the snapshot task records, and (optionally)
//! each job's density. Nothing outside this module knows of Prometheus.
//!
//! The handles are `Arc`-backed clones of prometheus-client metrics, so [`Metrics`] is cheap to
//! clone and every clone updates the same series; [`Metrics::exposition`] assembles the scrape
//! registry once, after the job registry exists, because the density collector needs it.

mod density;
mod failover;
mod grpc_layer;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry as PromRegistry, Unit};

pub use density::JobDensity;
pub use grpc_layer::{GrpcMetricsLayer, code_name};

use crate::jobs::{ReseedOutcome, StepObserver};
use crate::method::MethodKind;
use failover::FailoverMetrics;

/// Request latencies: from 100 µs (a histogram input) to minutes (a step-synchronous step
/// waiting for a slow rank, or a long-lived stream).
const REQUEST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Waits for the last rank of a step: bounded by `--max-step-timeout` (10 minutes by default).
const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Snapshot writes: milliseconds for a few jobs, seconds for hundreds of thousands.
const SNAPSHOT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LossLabels {
    pub loss: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// The label keeps its name `loss` and GHM's values `ghm_c` and `ghm_r`, so that dashboards
/// written before Seesaw and EQLv2 keep working.
fn loss_labels(method: MethodKind) -> LossLabels {
    LossLabels {
        loss: method.name(),
    }
}

fn histogram_family<S>(buckets: &'static [f64]) -> Family<S, Histogram, HistogramOf>
where
    S: Clone + std::hash::Hash + Eq,
{
    Family::new_with_constructor(HistogramOf(buckets))
}

/// Builds each histogram of a family with the family's buckets.
#[derive(Clone, Copy, Debug)]
pub struct HistogramOf(&'static [f64]);

impl prometheus_client::metrics::family::MetricConstructor<Histogram> for HistogramOf {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// The metric handles. Clones share their series.
#[derive(Clone, Debug)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<MethodLabels, Histogram, HistogramOf>,
    elements_weighed: Family<LossLabels, Counter>,
    jobs: Family<LossLabels, Gauge>,
    steps: Family<LossLabels, Counter>,
    partial_steps: Family<LossLabels, Counter>,
    step_timeouts: Counter,
    jobs_reaped: Counter,
    last_rank_wait: Histogram,
    snapshot_duration: Histogram,
    snapshot_failures: Counter,
    snapshots_written: Counter,
    snapshot_last_success: Gauge<f64, AtomicU64>,
    snapshot_failures_in_a_row: Gauge,
    accept_errors: Counter,
    connections_closed_early: Family<ReasonLabels, Counter>,
    connections_open: Gauge,
    failover: FailoverMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Self {
            requests: Family::default(),
            request_duration: histogram_family(REQUEST_BUCKETS),
            elements_weighed: Family::default(),
            jobs: Family::default(),
            steps: Family::default(),
            partial_steps: Family::default(),
            step_timeouts: Counter::default(),
            jobs_reaped: Counter::default(),
            last_rank_wait: Histogram::new(WAIT_BUCKETS.iter().copied()),
            snapshot_duration: Histogram::new(SNAPSHOT_BUCKETS.iter().copied()),
            snapshot_failures: Counter::default(),
            snapshots_written: Counter::default(),
            snapshot_last_success: Gauge::default(),
            snapshot_failures_in_a_row: Gauge::default(),
            accept_errors: Counter::default(),
            connections_closed_early: Family::default(),
            connections_open: Gauge::default(),
            failover: FailoverMetrics::new(),
        };
        // Series of every method exist from the start, so that a dashboard shows 0 rather than
        // "no data" and rate() sees the first increment.
        for method in MethodKind::ALL {
            let labels = loss_labels(method);
            drop(metrics.elements_weighed.get_or_create(&labels));
            drop(metrics.jobs.get_or_create(&labels));
            drop(metrics.steps.get_or_create(&labels));
            drop(metrics.partial_steps.get_or_create(&labels));
        }
        metrics
    }

    /// The registry a scrape encodes. `density` adds each job's EMA density (`--job-metrics`).
    pub fn exposition(&self, density: Option<JobDensity>) -> Exposition {
        let mut registry = PromRegistry::with_prefix("ghmd");
        registry.register(
            "build",
            "The running ghmd's version (always 1)",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "requests",
            "gRPC requests finished, by full method name and gRPC status code",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "gRPC request latency, from the request's headers to the response's last frame",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        registry.register(
            "elements_weighed",
            "Elements given a weight (gradient norms or residuals), by loss",
            self.elements_weighed.clone(),
        );
        registry.register("jobs", "Jobs in the registry, by loss", self.jobs.clone());
        registry.register(
            "jobs_reaped",
            "Jobs deleted for being idle longer than --job-ttl",
            self.jobs_reaped.clone(),
        );
        registry.register(
            "steps_applied",
            "Steps applied to a job's statistic, by loss (the method: ghm_c, ghm_r, seesaw, eqlv2)",
            self.steps.clone(),
        );
        registry.register(
            "partial_steps",
            "Step-synchronous steps applied without every rank, by loss",
            self.partial_steps.clone(),
        );
        registry.register(
            "step_timeouts",
            "Step-synchronous steps aborted because a rank did not send in time",
            self.step_timeouts.clone(),
        );
        registry.register_with_unit(
            "last_rank_wait",
            "Step-synchronous steps: time from a step's first request to its last rank's",
            Unit::Seconds,
            self.last_rank_wait.clone(),
        );
        registry.register_with_unit(
            "snapshot_duration",
            "Time to write one snapshot of every job to the data dir",
            Unit::Seconds,
            self.snapshot_duration.clone(),
        );
        registry.register(
            "snapshot_failures",
            "Snapshot writes that failed (the previous snapshot stays in place)",
            self.snapshot_failures.clone(),
        );
        registry.register(
            "snapshots_written",
            "Snapshots written to the data dir",
            self.snapshots_written.clone(),
        );
        registry.register(
            "snapshot_last_success_timestamp_seconds",
            "Unix time of the last snapshot written (0: none yet)",
            self.snapshot_last_success.clone(),
        );
        registry.register(
            "snapshot_consecutive_failures",
            "Snapshots that failed since the last one written; at --max-snapshot-failures the \
             server reports not ready",
            self.snapshot_failures_in_a_row.clone(),
        );
        registry.register(
            "accept_errors",
            "Accepts on the gRPC port that failed for want of descriptors or memory (each one \
             backs off)",
            self.accept_errors.clone(),
        );
        registry.register(
            "connections_closed_early",
            "gRPC connections closed before serving: at_limit (--max-connections), \
             handshake_timeout, evicted_in_handshake (its slot went to a newer connection)",
            self.connections_closed_early.clone(),
        );
        registry.register(
            "connections_open",
            "gRPC connections open, handshaking ones included",
            self.connections_open.clone(),
        );
        self.failover.register(&mut registry);
        if let Some(density) = density {
            registry.register_collector(Box::new(density));
        }
        Exposition {
            registry: Arc::new(registry),
        }
    }

    /// The request series of one method, resolved once so that a request records itself
    /// without building labels, hashing them or cloning every handle. `method` is one of the
    /// known methods or "unknown", so that a client cannot create series at will.
    pub fn method_series(&self, method: &str) -> MethodSeries {
        MethodSeries {
            method: method.to_owned(),
            requests: self.requests.clone(),
            request_duration: self.request_duration.clone(),
            by_code: std::array::from_fn(|_| OnceLock::new()),
            duration: OnceLock::new(),
        }
    }

    pub fn snapshot_written(&self, elapsed: Duration, at: SystemTime) {
        self.snapshot_duration.observe(elapsed.as_secs_f64());
        self.snapshots_written.inc();
        let unix = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.snapshot_last_success.set(unix);
    }

    pub fn snapshot_failed(&self) {
        self.snapshot_failures.inc();
    }

    pub fn snapshot_failures_in_a_row(&self, failures: u64) {
        self.snapshot_failures_in_a_row
            .set(i64::try_from(failures).unwrap_or(i64::MAX));
    }

    pub fn accept_error(&self) {
        self.accept_errors.inc();
    }

    /// `reason` is one of a fixed few, so that no client can create series.
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_closed_early
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn connection_opened(&self) {
        self.connections_open.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_open.dec();
    }
}

/// One method's request series. A series is created on its first request, as a label lookup
/// would, so that a scrape shows only the codes a method has answered with.
#[derive(Debug)]
pub struct MethodSeries {
    method: String,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<MethodLabels, Histogram, HistogramOf>,
    /// Indexed by the gRPC code's number (0 to 16).
    by_code: [OnceLock<Counter>; 17],
    duration: OnceLock<Histogram>,
}

impl MethodSeries {
    pub fn request_finished(&self, code: tonic::Code, elapsed: Duration) {
        let counter = self.by_code[code as usize].get_or_init(|| {
            self.requests
                .get_or_create(&RequestLabels {
                    method: self.method.clone(),
                    code: code_name(code),
                })
                .clone()
        });
        counter.inc();
        let duration = self.duration.get_or_init(|| {
            self.request_duration
                .get_or_create(&MethodLabels {
                    method: self.method.clone(),
                })
                .clone()
        });
        duration.observe(elapsed.as_secs_f64());
    }
}

impl StepObserver for Metrics {
    fn step_applied(&self, method: MethodKind, _samples: u64, _ranks: usize, missing_ranks: usize) {
        let labels = loss_labels(method);
        self.steps.get_or_create(&labels).inc();
        if missing_ranks > 0 {
            self.partial_steps.get_or_create(&labels).inc();
        }
    }

    fn elements_weighed(&self, method: MethodKind, elements: u64) {
        self.elements_weighed
            .get_or_create(&loss_labels(method))
            .inc_by(elements);
    }

    fn last_rank_wait(&self, wait: Duration) {
        self.last_rank_wait.observe(wait.as_secs_f64());
    }

    fn step_timed_out(&self) {
        self.step_timeouts.inc();
    }

    fn jobs_changed(&self, method: MethodKind, delta: i64) {
        self.jobs.get_or_create(&loss_labels(method)).inc_by(delta);
    }

    fn jobs_reaped(&self, count: u64) {
        self.jobs_reaped.inc_by(count);
    }

    fn job_reseeded(&self, outcome: ReseedOutcome) {
        self.failover.reseeded(outcome);
    }

    fn fenced_refusal(&self, not_here: bool) {
        self.failover.fenced_refusal(not_here);
    }

    fn run_taken_over(&self) {
        self.failover.run_taken_over();
    }
}

/// The scrape side: encodes every metric in the format the scraper asked for.
#[derive(Clone, Debug)]
pub struct Exposition {
    registry: Arc<PromRegistry>,
}

/// What `/metrics` answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text: what Prometheus asks for.
    OpenMetrics,
    /// The Prometheus text format 0.0.4: for everything that does not ask for OpenMetrics
    /// (curl, `promtool check metrics`, older scrapers).
    PrometheusText,
}

impl Format {
    /// Picks the format from an HTTP `Accept` header, as Prometheus's own clients do.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::PrometheusText,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::PrometheusText => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

impl Exposition {
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        match format {
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)?
            }
            Format::PrometheusText => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|value| value.parse().expect("a number"))
    }

    #[test]
    fn observer_calls_move_the_series_they_name() {
        let metrics = Metrics::new();
        let exposition = metrics.exposition(None);
        metrics.jobs_changed(MethodKind::GhmC, 1);
        metrics.jobs_changed(MethodKind::GhmC, 1);
        metrics.jobs_changed(MethodKind::GhmR, 1);
        metrics.jobs_changed(MethodKind::GhmC, -1);
        metrics.step_applied(MethodKind::GhmR, 10, 4, 1);
        metrics.step_applied(MethodKind::GhmR, 10, 4, 0);
        metrics.elements_weighed(MethodKind::GhmC, 1000);
        metrics.step_timed_out();
        metrics.last_rank_wait(Duration::from_millis(30));
        metrics
            .method_series("ghm.v1.Harmonizer/CreateJob")
            .request_finished(tonic::Code::InvalidArgument, Duration::from_millis(2));
        let text = exposition.encode(Format::OpenMetrics).expect("encodes");
        assert_eq!(sample(&text, "ghmd_jobs{loss=\"ghm_c\"}"), Some(1.0));
        assert_eq!(sample(&text, "ghmd_jobs{loss=\"ghm_r\"}"), Some(1.0));
        assert_eq!(
            sample(&text, "ghmd_steps_applied_total{loss=\"ghm_r\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "ghmd_partial_steps_total{loss=\"ghm_r\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "ghmd_partial_steps_total{loss=\"ghm_c\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "ghmd_elements_weighed_total{loss=\"ghm_c\"}"),
            Some(1000.0)
        );
        assert_eq!(sample(&text, "ghmd_step_timeouts_total"), Some(1.0));
        assert_eq!(
            sample(&text, "ghmd_last_rank_wait_seconds_count"),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "ghmd_requests_total{method=\"ghm.v1.Harmonizer/CreateJob\",code=\"INVALID_ARGUMENT\"}"
            ),
            Some(1.0)
        );
        assert!(text.contains("ghmd_build_info{version=\""), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn accept_header_picks_the_format() {
        let metrics = Metrics::new();
        metrics.snapshot_written(Duration::from_millis(5), SystemTime::UNIX_EPOCH);
        let exposition = metrics.exposition(None);
        let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(
            Format::negotiate(Some(prometheus_accept)),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(Some("*/*")), Format::PrometheusText);
        assert_eq!(Format::negotiate(None), Format::PrometheusText);

        let text = exposition.encode(Format::PrometheusText).expect("encodes");
        assert!(!text.contains("# EOF"));
        // The 0.0.4 format names a counter's family with its _total suffix.
        assert!(
            text.contains("# TYPE ghmd_snapshots_written_total counter"),
            "{text}"
        );
        assert_eq!(sample(&text, "ghmd_snapshots_written_total"), Some(1.0));
    }
}

//! `--job-metrics`: each job's EMA gradient density, bin by bin, read from the registry at
//! scrape time (the paper's Figure 1, live). A job of B bins is B series, so the export stops
//! at a series budget and says how many jobs it left out.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::jobs::Registry;

/// The collector. Jobs are exported in id order until the next job's bins would exceed
/// `max_series`; jobs with momentum 0 keep no density and are skipped.
pub struct JobDensity {
    registry: Registry,
    max_series: usize,
}

impl std::fmt::Debug for JobDensity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobDensity")
            .field("max_series", &self.max_series)
            .finish_non_exhaustive()
    }
}

impl JobDensity {
    pub fn new(registry: Registry, max_series: usize) -> Self {
        Self {
            registry,
            max_series,
        }
    }
}

/// `job_id` and not `job`: Prometheus's own `job` label names the scrape target.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BinLabels {
    job_id: String,
    bin: usize,
    /// The bin's lower edge i/M, for a heatmap's y axis.
    lower: String,
}

impl Collector for JobDensity {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut series = 0usize;
        let mut omitted = 0u64;
        {
            let mut density = encoder.encode_descriptor(
                "job_density",
                "A job's EMA of valid elements per gradient-norm bin (--job-metrics)",
                None,
                MetricType::Gauge,
            )?;
            // One pass over a copy of every job, sorted once: ListJobs-style paging would sort
            // the whole id set again for every page.
            let mut jobs = self.registry.snapshots();
            jobs.sort_unstable_by(|a, b| a.id.cmp(&b.id));
            for job in &jobs {
                // Seesaw's and EQLv2's statistics are per class, not a density; the responses
                // and GetJob show them.
                let acc_sum = job.spec.method.reported_acc_sum(&job.state);
                if acc_sum.is_empty() {
                    continue;
                }
                let bins = acc_sum.len();
                if series + bins > self.max_series {
                    omitted += 1;
                    continue;
                }
                series += bins;
                for (bin, value) in acc_sum.iter().enumerate() {
                    let labels = BinLabels {
                        job_id: job.id.clone(),
                        bin,
                        lower: format!("{}", bin as f64 / bins as f64),
                    };
                    ConstGauge::new(f64::from(*value)).encode(density.encode_family(&labels)?)?;
                }
            }
        }
        let omitted_gauge = ConstGauge::new(omitted);
        let metric = encoder.encode_descriptor(
            "job_density_omitted_jobs",
            "Jobs with a density left out of ghmd_job_density by --job-metrics-max-series",
            None,
            omitted_gauge.metric_type(),
        )?;
        omitted_gauge.encode(metric)
    }
}

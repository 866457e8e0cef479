//! What an operator watches during a failover: reseeds by outcome, refusals of stale or absent
//! copies, refusals for the routing header, and runs that took a job over.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry as PromRegistry;

use super::Metrics;
use crate::api::RoutingObserver;
use crate::jobs::ReseedOutcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct FailoverMetrics {
    reseeds: Family<OutcomeLabels, Counter>,
    fenced_refusals: Family<ReasonLabels, Counter>,
    job_header_refusals: Family<ReasonLabels, Counter>,
    run_takeovers: Counter,
}

impl FailoverMetrics {
    pub fn new() -> Self {
        let metrics = Self::default();
        // Every series exists from the start, so that a dashboard shows 0 and rate() sees the
        // first failover.
        for outcome in [
            ReseedOutcome::Created,
            ReseedOutcome::Replaced,
            ReseedOutcome::Unchanged,
            ReseedOutcome::Refused,
        ] {
            drop(metrics.reseeds.get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            }));
        }
        for reason in ["stale_copy", "job_not_here"] {
            drop(
                metrics
                    .fenced_refusals
                    .get_or_create(&ReasonLabels { reason }),
            );
        }
        for reason in ["mismatch", "missing"] {
            drop(
                metrics
                    .job_header_refusals
                    .get_or_create(&ReasonLabels { reason }),
            );
        }
        metrics
    }

    pub fn register(&self, registry: &mut PromRegistry) {
        registry.register(
            "reseeds",
            "ReseedJob calls, by outcome: created (no copy), replaced (a stale copy), unchanged \
             (the copy held what the caller saw), refused",
            self.reseeds.clone(),
        );
        registry.register(
            "fenced_refusals",
            "Fenced Harmonize requests refused, by reason: stale_copy (this copy holds less \
             than the client saw) or job_not_here",
            self.fenced_refusals.clone(),
        );
        registry.register(
            "job_header_refusals",
            "Calls refused for their x-ghmd-job header, by reason: mismatch or missing",
            self.job_header_refusals.clone(),
        );
        registry.register(
            "run_takeovers",
            "Jobs taken over by a new run (CreateJob with another run_id after \
             --run-takeover-after)",
            self.run_takeovers.clone(),
        );
    }

    pub(super) fn reseeded(&self, outcome: ReseedOutcome) {
        self.reseeds
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .inc();
    }

    pub(super) fn fenced_refusal(&self, not_here: bool) {
        let reason = if not_here {
            "job_not_here"
        } else {
            "stale_copy"
        };
        self.fenced_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(super) fn run_taken_over(&self) {
        self.run_takeovers.inc();
    }
}

impl RoutingObserver for Metrics {
    fn job_header_refused(&self, missing: bool) {
        let reason = if missing { "missing" } else { "mismatch" };
        self.failover
            .job_header_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

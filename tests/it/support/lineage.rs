//! Shared by the fencing and failover topics: one job spec and histograms that differ by
//! step and rank, so that a lost, doubled or mixed-up step shows in the weights.
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{self, HarmonizeRequest, Histogram, JobSpec};

pub const BINS: u32 = 10;

pub fn spec(world_size: u32) -> JobSpec {
    JobSpec {
        loss: proto::Loss::GhmC.into(),
        bins: BINS,
        momentum: 0.75,
        world_size,
        ..Default::default()
    }
}

/// `spec` with a step timeout in milliseconds and, optionally, partial steps.
pub fn spec_with_timeout(world_size: u32, timeout_ms: i32, allow_partial: bool) -> JobSpec {
    JobSpec {
        allow_partial_steps: allow_partial,
        step_timeout: Some(prost_types::Duration {
            seconds: i64::from(timeout_ms / 1000),
            nanos: (timeout_ms % 1000) * 1_000_000,
        }),
        ..spec(world_size)
    }
}

pub fn counts(step: u64, rank: u32) -> (Vec<u64>, f64) {
    let counts: Vec<u64> = (0..u64::from(BINS))
        .map(|bin| (bin * 13 + step * 7 + u64::from(rank) * 3) % 17)
        .collect();
    let tot = counts.iter().sum::<u64>() as f64;
    (counts, tot)
}

pub fn histogram_request(job_id: &str, step: u64, rank: u32) -> HarmonizeRequest {
    let (counts, tot) = counts(step, rank);
    HarmonizeRequest {
        job_id: job_id.to_owned(),
        step,
        rank,
        input: Some(Input::Histogram(Histogram { counts, tot })),
        ..Default::default()
    }
}

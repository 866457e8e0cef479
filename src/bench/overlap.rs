//! `eqlv2-overlap`: what EQLv2's round trip costs a training step. The weights of step t come
//! from the state after step t - 1, so step t - 1's contribution may travel while step t's
//! forward pass runs; only step t's loss waits for the answer.
//!
//! A forward pass is simulated by a thread that spins for `--forward` (a trainer's thread is
//! busy for that long launching kernels and waiting on them); the round trip is a real
//! Harmonize of two vectors of C = 1203 float32 to an EQLv2 job. Three loops of the same number
//! of steps:
//! - forward alone: the baseline, what the step takes without ghmd;
//! - sequential: forward, then the round trip, awaited;
//! - overlapped: forward while the previous step's round trip is in flight, then its answer
//!   awaited, then this step's contribution sent.
//!
//! A step's overhead is its time minus the baseline's; the ratio is overlapped over sequential.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::methods::{CLASSES, Method};
use super::stats::Latency;
use super::target::Target;
use super::{BenchError, JobNames, create_job_with, rpc};
use ghmd::client::Transport;
use ghmd::proto::HarmonizeRequest;
use ghmd::proto::harmonizer_client::HarmonizerClient;

/// Steps each loop runs at least and at most, whatever `--duration` and `--forward` say.
const MIN_STEPS: u64 = 20;
const MAX_STEPS: u64 = 10_000;

#[derive(Clone, Debug, Serialize)]
pub struct OverlapReport {
    pub num_classes: u32,
    pub forward_ms: f64,
    pub steps: u64,
    /// Each loop's time per step.
    pub forward_alone_ms_per_step: f64,
    pub sequential_ms_per_step: f64,
    pub overlapped_ms_per_step: f64,
    /// The round trips of the sequential loop, each on its own.
    pub round_trip: Latency,
    /// Time per step beyond the forward pass alone.
    pub sequential_overhead_ms: f64,
    pub overlapped_overhead_ms: f64,
    /// Overlapped overhead over sequential overhead: 0 means the round trip is hidden entirely.
    pub overhead_ratio: f64,
    /// Overlapped step time over sequential step time.
    pub step_time_ratio: f64,
}

/// A forward pass: a thread of the blocking pool busy for `forward`, so that the runtime's own
/// threads stay free to carry a round trip meanwhile.
async fn forward_pass(forward: Duration) -> Result<(), BenchError> {
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        while start.elapsed() < forward {
            std::hint::spin_loop();
        }
    })
    .await
    .map_err(|e| BenchError::Task(e.to_string()))
}

#[derive(Clone)]
struct Trainer {
    client: HarmonizerClient<Transport>,
    job_id: String,
}

impl Trainer {
    async fn round_trip(mut self, step: u64) -> Result<Duration, BenchError> {
        let request = HarmonizeRequest {
            job_id: self.job_id.clone(),
            step,
            input: Some(Method::Eqlv2.input(step)),
            ..Default::default()
        };
        let sent = Instant::now();
        let response = rpc("Harmonize", self.client.harmonize(request).await)?;
        Method::Eqlv2.check(&response).map_err(BenchError::Answer)?;
        Ok(sent.elapsed())
    }
}

pub async fn run(
    target: &Target,
    names: &JobNames,
    forward: Duration,
    duration: Duration,
) -> Result<OverlapReport, BenchError> {
    let steps = u64::try_from(duration.as_nanos() / forward.as_nanos().max(1))
        .unwrap_or(MAX_STEPS)
        .clamp(MIN_STEPS, MAX_STEPS);
    let mut client = target.harmonizer(target.connect().await?);
    let mut trainers = Vec::new();
    for name in ["overlap-sequential", "overlap-overlapped"] {
        let job_id = names.job(name);
        create_job_with(&mut client, &job_id, Method::Eqlv2.spec(0)).await?;
        trainers.push(Trainer {
            client: client.clone(),
            job_id,
        });
    }
    // One round trip each first, so that neither loop pays for a connection or a first call.
    for trainer in &trainers {
        trainer.clone().round_trip(0).await?;
    }

    let start = Instant::now();
    for _ in 0..steps {
        forward_pass(forward).await?;
    }
    let alone = start.elapsed();

    let sequential = &trainers[0];
    let mut round_trips = Vec::with_capacity(steps as usize);
    let start = Instant::now();
    for step in 1..=steps {
        forward_pass(forward).await?;
        round_trips.push(sequential.clone().round_trip(step).await?);
    }
    let sequential_time = start.elapsed();

    let overlapped = &trainers[1];
    let start = Instant::now();
    let mut in_flight: Option<tokio::task::JoinHandle<Result<Duration, BenchError>>> = None;
    for step in 1..=steps {
        forward_pass(forward).await?;
        // This step's loss needs the previous step's answer.
        if let Some(previous) = in_flight.take() {
            previous
                .await
                .map_err(|e| BenchError::Task(e.to_string()))??;
        }
        in_flight = Some(tokio::spawn(overlapped.clone().round_trip(step)));
    }
    if let Some(last) = in_flight {
        last.await.map_err(|e| BenchError::Task(e.to_string()))??;
    }
    let overlapped_time = start.elapsed();

    let per_step = |time: Duration| time.as_secs_f64() * 1e3 / steps as f64;
    let alone_ms = per_step(alone);
    let (sequential_ms, overlapped_ms) = (per_step(sequential_time), per_step(overlapped_time));
    let (sequential_overhead, overlapped_overhead) =
        (sequential_ms - alone_ms, overlapped_ms - alone_ms);
    Ok(OverlapReport {
        num_classes: CLASSES,
        forward_ms: forward.as_secs_f64() * 1e3,
        steps,
        forward_alone_ms_per_step: alone_ms,
        sequential_ms_per_step: sequential_ms,
        overlapped_ms_per_step: overlapped_ms,
        round_trip: Latency::of(&mut round_trips),
        sequential_overhead_ms: sequential_overhead,
        overlapped_overhead_ms: overlapped_overhead,
        overhead_ratio: overlapped_overhead / sequential_overhead,
        step_time_ratio: overlapped_ms / sequential_ms,
    })
}

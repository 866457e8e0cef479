//! `eqlv2-overlap`: what EQLv2's round trip costs a training step. The weights of step t come
//! from the state after step t - 1, so step t - 1's contribution may travel while step t's
//! forward pass runs; only step t's loss waits for the answer.
//!
//! A forward pass is simulated by a thread that spins for `--forward` (a trainer's thread is
//! busy for that long launching kernels and waiting on them); the round trip is a real
//! Harmonize of two vectors of C = 1203 float32 to an EQLv2 job. Three loops of the same number
//! of steps, interleaved in blocks so that a shared machine's load falls on all three alike:
//! - forward alone: the baseline, what the step takes without ghmd;
//! - sequential: forward, then the round trip, awaited;
//! - overlapped: forward while the previous step's round trip is in flight, then its answer
//!   awaited, then this step's contribution sent.
//!
//! The figure that matters is the wait: how long the training step stood still for ghmd after
//! its forward pass (sequential: the whole round trip; overlapped: what was left of it). Its
//! ratio, overlapped over sequential, is 0 when the round trip is hidden entirely. The loops'
//! times per step are given beside it, though a loaded machine's scheduling blurs them by more
//! than a round trip.

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
/// Steps of one loop before the next loop's turn.
const BLOCK: u64 = 10;

#[derive(Clone, Debug, Serialize)]
pub struct OverlapReport {
    pub num_classes: u32,
    pub forward_ms: f64,
    pub steps: u64,
    /// How long each step of the sequential loop waited for ghmd after its forward pass: the
    /// round trip.
    pub sequential_wait: Latency,
    pub sequential_wait_mean_ms: f64,
    /// The same in the overlapped loop: what was left of the previous step's round trip.
    pub overlapped_wait: Latency,
    pub overlapped_wait_mean_ms: f64,
    /// Overlapped mean wait over sequential mean wait: 0 means the round trip is hidden.
    pub wait_ratio: f64,
    /// Each loop's time per step.
    pub forward_alone_ms_per_step: f64,
    pub sequential_ms_per_step: f64,
    pub overlapped_ms_per_step: f64,
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

/// What the loops measured so far.
#[derive(Default)]
struct Loops {
    alone: Duration,
    sequential: Duration,
    overlapped: Duration,
    sequential_waits: Vec<Duration>,
    overlapped_waits: Vec<Duration>,
}

type InFlight = tokio::task::JoinHandle<Result<Duration, BenchError>>;

async fn landed(in_flight: InFlight) -> Result<(), BenchError> {
    in_flight
        .await
        .map_err(|e| BenchError::Task(e.to_string()))?
        .map(|_| ())
}

impl Loops {
    async fn block(
        &mut self,
        trainers: &[Trainer],
        steps: std::ops::Range<u64>,
        forward: Duration,
    ) -> Result<(), BenchError> {
        let start = Instant::now();
        for _ in steps.clone() {
            forward_pass(forward).await?;
        }
        self.alone += start.elapsed();

        let start = Instant::now();
        for step in steps.clone() {
            forward_pass(forward).await?;
            self.sequential_waits
                .push(trainers[0].clone().round_trip(step).await?);
        }
        self.sequential += start.elapsed();

        let start = Instant::now();
        let mut in_flight: Option<InFlight> = None;
        for step in steps {
            forward_pass(forward).await?;
            // This step's loss needs the previous step's answer.
            let waiting = Instant::now();
            if let Some(previous) = in_flight.take() {
                landed(previous).await?;
            }
            self.overlapped_waits.push(waiting.elapsed());
            in_flight = Some(tokio::spawn(trainers[1].clone().round_trip(step)));
        }
        // The block's last answer lands before the next loop's turn, as the first step of the
        // next block needs it.
        if let Some(last) = in_flight {
            landed(last).await?;
        }
        self.overlapped += start.elapsed();
        Ok(())
    }
}

fn mean_ms(waits: &[Duration]) -> f64 {
    waits.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / waits.len().max(1) as f64
}

pub async fn run(
    target: &Target,
    names: &JobNames,
    forward: Duration,
    duration: Duration,
) -> Result<OverlapReport, BenchError> {
    let steps = u64::try_from(duration.as_nanos() / forward.as_nanos().max(1))
        .unwrap_or(MAX_STEPS)
        .clamp(MIN_STEPS, MAX_STEPS)
        .next_multiple_of(BLOCK);
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
    let mut loops = Loops::default();
    for first in (1..=steps).step_by(BLOCK as usize) {
        loops
            .block(&trainers, first..first + BLOCK, forward)
            .await?;
    }

    let per_step = |time: Duration| time.as_secs_f64() * 1e3 / steps as f64;
    let (sequential_ms, overlapped_ms) = (per_step(loops.sequential), per_step(loops.overlapped));
    let (sequential_mean, overlapped_mean) = (
        mean_ms(&loops.sequential_waits),
        mean_ms(&loops.overlapped_waits),
    );
    Ok(OverlapReport {
        num_classes: CLASSES,
        forward_ms: forward.as_secs_f64() * 1e3,
        steps,
        sequential_wait: Latency::of(&mut loops.sequential_waits),
        sequential_wait_mean_ms: sequential_mean,
        overlapped_wait: Latency::of(&mut loops.overlapped_waits),
        overlapped_wait_mean_ms: overlapped_mean,
        wait_ratio: overlapped_mean / sequential_mean,
        forward_alone_ms_per_step: per_step(loops.alone),
        sequential_ms_per_step: sequential_ms,
        overlapped_ms_per_step: overlapped_ms,
        step_time_ratio: overlapped_ms / sequential_ms,
    })
}

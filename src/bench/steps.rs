//! `steps`: full rounds of a step-synchronous job. In each round every one of W ranks sends
//! its histogram for the same step, each over its own connection as separate processes would;
//! the round's latency runs from the first send to the last answer.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use super::stats::Latency;
use super::target::Target;
use super::{BenchError, JobNames, create_job, rpc};
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{HarmonizeRequest, Histogram, Loss};

pub const WORLD_SIZES: [u32; 3] = [2, 4, 8];
const BINS: u32 = 30;
/// Rounds one world size runs at most.
const MAX_ROUNDS: u64 = 100_000;

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StepsReport {
    Measured {
        points: Vec<StepsPoint>,
    },
    /// The server refused a job with world_size > 1.
    UnsupportedByServer {
        message: String,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct StepsPoint {
    pub world_size: u32,
    pub rounds: u64,
    pub rounds_per_second: f64,
    pub round_latency: Latency,
}

pub async fn run(
    target: &Target,
    names: &JobNames,
    duration: Duration,
) -> Result<StepsReport, BenchError> {
    let histogram = super::data::realistic_histogram(BINS as usize, 10_000, 3);
    let histogram = Histogram {
        counts: histogram.counts,
        tot: histogram.tot,
    };
    let mut points = Vec::new();
    for world_size in WORLD_SIZES {
        let mut ranks = Vec::new();
        for _ in 0..world_size {
            ranks.push(target.harmonizer(target.connect().await?));
        }
        let job_id = names.job(&format!("steps-{world_size}"));
        match create_job(&mut ranks[0], &job_id, Loss::GhmC, BINS, world_size).await {
            Ok(()) => {}
            Err(BenchError::Rpc {
                code: tonic::Code::InvalidArgument | tonic::Code::Unimplemented,
                message,
                ..
            }) => {
                return Ok(StepsReport::UnsupportedByServer { message });
            }
            Err(error) => return Err(error),
        }
        let mut latencies = Vec::new();
        let start = Instant::now();
        let mut step = 0u64;
        while step < MAX_ROUNDS && (step == 0 || start.elapsed() < duration) {
            let round = Instant::now();
            let mut sends = JoinSet::new();
            for (rank, client) in ranks.iter().enumerate() {
                let mut client = client.clone();
                let request = HarmonizeRequest {
                    job_id: job_id.clone(),
                    step,
                    rank: rank as u32,
                    input: Some(Input::Histogram(histogram.clone())),
                    ..Default::default()
                };
                sends.spawn(async move { rpc("Harmonize", client.harmonize(request).await) });
            }
            while let Some(sent) = sends.join_next().await {
                let response = sent.map_err(|e| BenchError::Task(e.to_string()))??;
                if response.step != step || !response.missing_ranks.is_empty() {
                    return Err(BenchError::Answer(format!(
                        "step {step} of a world of {world_size} came back as step {} missing \
                         ranks {:?}",
                        response.step, response.missing_ranks
                    )));
                }
            }
            // The first round also opens the streams; it is not a steady-state round.
            if step > 0 {
                latencies.push(round.elapsed());
            }
            step += 1;
        }
        let elapsed = start.elapsed();
        points.push(StepsPoint {
            world_size,
            rounds: latencies.len() as u64,
            rounds_per_second: step as f64 / elapsed.as_secs_f64(),
            round_latency: Latency::of(&mut latencies),
        });
    }
    Ok(StepsReport::Measured { points })
}

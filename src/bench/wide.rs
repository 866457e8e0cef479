//! `wide-steps`: one full step of a step-synchronous job of thousands of ranks (W = 2,048 to
//! 65,536 by default), each rank one request with its histogram, the ranks multiplexed 256 to a
//! connection. It times the step from the first send to the last answer, and the latency of
//! another job's requests meanwhile against the same job's latency with no step running: a step
//! must cost O(1) per rank (its time grows linearly with W) and leave other jobs served.
//!
//! The server must admit W requests at once, all from one caller: the server the bench starts
//! gets `--max-concurrent-requests` and `--caller-max-concurrent-requests` above the largest W;
//! a `--target` must have them set as well, or the refused ranks are counted in the report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use super::stats::Latency;
use super::target::{Target, harmonizer_with};
use super::{BenchError, JobNames, create_job, rpc};
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{CreateJobRequest, DeleteJobRequest, HarmonizeRequest, Histogram, JobSpec, Loss};

pub const WORLD_SIZES: [u32; 4] = [2048, 8192, 32768, 65536];
/// Ranks per HTTP/2 connection: the server's default `--max-streams-per-connection`.
pub const RANKS_PER_CONNECTION: usize = 256;
const BINS: u32 = 30;
/// The step timeout of the measured jobs: generous, so that a slow machine measures a slow step
/// instead of an aborted one.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the other job's latency is measured before the steps, as the baseline.
const BASELINE: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, Serialize)]
pub struct WideReport {
    /// The other job's latency with no step running.
    pub baseline_probe: Latency,
    pub points: Vec<WidePoint>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WidePoint {
    pub world_size: u32,
    pub connections: usize,
    /// From the first rank's send to the last rank's answer.
    pub step_ms: f64,
    pub us_per_rank: f64,
    /// Ranks answered OK with the step applied and no rank missing.
    pub answered_ok: usize,
    /// Every other answer, by gRPC code.
    pub failures: BTreeMap<String, usize>,
    /// The other job's latency while the step ran.
    pub probe: Latency,
    /// `probe.p99_ms / baseline_probe.p99_ms`.
    pub probe_p99_ratio: f64,
}

/// The other job: an asynchronous one, asked one request after another until `stop` or
/// `at_most`; only its answered requests are timed. On a thread and runtime of its own, so
/// that what it measures is the server's delay, not the bench's own runtime busy with the W
/// ranks' tasks.
fn probe(
    target: &Target,
    job_id: String,
    stop: Arc<AtomicBool>,
    at_most: Duration,
) -> std::thread::JoinHandle<Result<Latency, BenchError>> {
    let (uri, credentials) = target.detached();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BenchError::Task(format!("probe runtime: {e}")))?;
        runtime.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(uri.clone())
                .map_err(|e| BenchError::Target(format!("{uri}: {e}")))?
                .connect()
                .await
                .map_err(|e| BenchError::Connect(format!("{uri}: {e}")))?;
            let mut client = harmonizer_with(channel, credentials);
            let histogram = histogram();
            let mut latencies = Vec::new();
            let start = Instant::now();
            let mut step = 0u64;
            while !stop.load(Ordering::SeqCst) && start.elapsed() < at_most {
                let request = HarmonizeRequest {
                    job_id: job_id.clone(),
                    step,
                    input: Some(Input::Histogram(histogram.clone())),
                    ..Default::default()
                };
                let sent = Instant::now();
                if client.harmonize(request).await.is_ok() {
                    latencies.push(sent.elapsed());
                }
                step += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(Latency::of(&mut latencies))
        })
    })
}

/// The probe's figures once its thread ends.
async fn probe_result(
    handle: std::thread::JoinHandle<Result<Latency, BenchError>>,
) -> Result<Latency, BenchError> {
    tokio::task::spawn_blocking(move || handle.join())
        .await
        .map_err(|e| BenchError::Task(e.to_string()))?
        .map_err(|_| BenchError::Task("the probe thread panicked".to_owned()))?
}

fn histogram() -> Histogram {
    let counts = super::data::realistic_histogram(BINS as usize, 1000, 5);
    Histogram {
        counts: counts.counts,
        tot: counts.tot,
    }
}

pub async fn run(
    target: &Target,
    names: &JobNames,
    world_sizes: &[u32],
) -> Result<WideReport, BenchError> {
    let probe_job = names.job("wide-probe");
    let mut client = target.harmonizer(target.connect().await?);
    create_job(&mut client, &probe_job, Loss::GhmC, BINS, 1).await?;
    let baseline_probe = probe_result(probe(
        target,
        probe_job.clone(),
        Arc::new(AtomicBool::new(false)),
        BASELINE,
    ))
    .await?;
    let mut points = Vec::new();
    for &world_size in world_sizes {
        points.push(one_step(target, names, &probe_job, world_size, &baseline_probe).await?);
    }
    Ok(WideReport {
        baseline_probe,
        points,
    })
}

async fn one_step(
    target: &Target,
    names: &JobNames,
    probe_job: &str,
    world_size: u32,
    baseline: &Latency,
) -> Result<WidePoint, BenchError> {
    let job_id = names.job(&format!("wide-{world_size}"));
    let connections = (world_size as usize).div_ceil(RANKS_PER_CONNECTION);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(target.harmonizer(target.connect().await?));
    }
    let request = CreateJobRequest {
        job_id: job_id.clone(),
        spec: Some(JobSpec {
            loss: Loss::GhmC.into(),
            bins: BINS,
            momentum: 0.75,
            world_size,
            step_timeout: Some(prost_types::Duration {
                seconds: STEP_TIMEOUT.as_secs() as i64,
                nanos: 0,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    rpc("CreateJob", clients[0].create_job(request).await)?;

    let stop = Arc::new(AtomicBool::new(false));
    let probing = probe(
        target,
        probe_job.to_owned(),
        Arc::clone(&stop),
        STEP_TIMEOUT,
    );

    let histogram = histogram();
    let start = Instant::now();
    let mut sends = JoinSet::new();
    for rank in 0..world_size {
        let mut client = clients[rank as usize % connections].clone();
        let request = HarmonizeRequest {
            job_id: job_id.clone(),
            step: 0,
            rank,
            input: Some(Input::Histogram(histogram.clone())),
            ..Default::default()
        };
        sends.spawn(async move { client.harmonize(request).await });
    }
    let mut answered_ok = 0;
    let mut failures = BTreeMap::new();
    while let Some(sent) = sends.join_next().await {
        match sent.map_err(|e| BenchError::Task(e.to_string()))? {
            Ok(response) if response.get_ref().missing_ranks.is_empty() => answered_ok += 1,
            Ok(_) => *failures.entry("OK, ranks missing".to_owned()).or_insert(0) += 1,
            Err(status) => {
                // A refused rank never comes: end the step at once rather than at its timeout.
                if failures.is_empty() {
                    let request = DeleteJobRequest {
                        job_id: job_id.clone(),
                    };
                    let _ = clients[0].delete_job(request).await;
                }
                *failures.entry(format!("{:?}", status.code())).or_insert(0) += 1;
            }
        }
    }
    let step_time = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    let probe = probe_result(probing).await?;
    Ok(WidePoint {
        world_size,
        connections,
        step_ms: step_time.as_secs_f64() * 1e3,
        us_per_rank: step_time.as_secs_f64() * 1e6 / f64::from(world_size),
        answered_ok,
        failures,
        probe_p99_ratio: probe.p99_ms / baseline.p99_ms,
        probe,
    })
}

//! `small`: histogram requests (bins 30) at rising concurrency until the rate stops growing,
//! each level against `grpc.health.v1.Health/Check` on the same server over the same
//! connections; then the latency at half the saturating rate, sent at a steady pace. The same
//! climb serves `small-methods` (`methods.rs`), with another job spec and input: a [`Workload`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::raw::cpu_used;
use super::stats::{Call, Latency, Run, closed_loop};
use super::target::{Target, runqueue_wait};
use super::{BenchError, JobNames, create_job_with, ghm_spec, rpc};
use ghmd::client::Transport;
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::harmonizer_client::HarmonizerClient;
use ghmd::proto::{HarmonizeRequest, HarmonizeResponse, Histogram, JobSpec, Loss};

/// HTTP/2 connections the requests are spread over, for both services.
pub const CONNECTIONS: usize = 4;
pub const BINS: u32 = 30;
/// A level that does not beat the best rate so far by this much counts as saturated; two in a
/// row end the climb.
const GAIN: f64 = 1.05;
/// Requests the steady-pace run sends at most.
const MAX_PACED_REQUESTS: usize = 1_000_000;

#[derive(Clone, Debug, Serialize)]
pub struct SmallPoint {
    pub concurrency: usize,
    pub histogram: Rate,
    pub health: Rate,
    /// Histogram requests per second over health checks per second.
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Rate {
    pub requests_per_second: f64,
    pub latency: Latency,
    /// CPU time the server spent per request, in microseconds (a server the bench started).
    pub server_cpu_us_per_request: Option<f64>,
}

impl Rate {
    fn of(run: &Run, server_cpu: Option<Duration>) -> Self {
        Self {
            requests_per_second: run.per_second(),
            latency: run.latency.clone(),
            server_cpu_us_per_request: server_cpu
                .map(|cpu| cpu.as_secs_f64() * 1e6 / run.requests.max(1) as f64),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SmallReport {
    pub points: Vec<SmallPoint>,
    /// The level with the highest histogram rate.
    pub saturating_concurrency: usize,
    pub saturating_rate: f64,
    pub half_rate: HalfRate,
}

/// Requests sent at a steady pace, each timed from when it was sent.
#[derive(Clone, Debug, Serialize)]
pub struct Paced {
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub latency: Latency,
    /// How late the generator started each request against its schedule: a tail here is the
    /// client's (its pacing thread or runtime waiting for a core), not the server's.
    pub send_lateness: Latency,
    /// Time the server's threads spent runnable but waiting for a core during the run, per
    /// request, in microseconds (a server the bench started; `/proc/<pid>/task/*/schedstat`).
    pub server_runqueue_wait_us_per_request: Option<f64>,
    /// The same for the bench's own threads.
    pub client_runqueue_wait_us_per_request: Option<f64>,
}

/// The histogram requests at half the saturating rate, and health checks at the same rate on
/// the same connections: the tail a bare gRPC call has on this machine at that moment.
#[derive(Clone, Debug, Serialize)]
pub struct HalfRate {
    pub histogram: Paced,
    pub health: Paced,
}

/// What a small request is: the job it goes to, the input it carries, and what a well-formed
/// answer to it looks like (a server that answers something else is not measured).
#[derive(Clone)]
pub struct Workload {
    /// The job ids' infix, so that the jobs of two workloads never collide.
    pub name: &'static str,
    pub spec: JobSpec,
    pub input: Input,
    pub check: fn(&HarmonizeResponse) -> Result<(), String>,
}

fn ghm_bin_weights(response: &HarmonizeResponse) -> Result<(), String> {
    if response.bin_weights.len() == BINS as usize {
        Ok(())
    } else {
        Err(format!(
            "Harmonize returned {} bin weights for {BINS} bins",
            response.bin_weights.len()
        ))
    }
}

/// The GHM-C histogram of the `small` mode.
pub fn histogram_workload() -> Workload {
    let histogram = super::data::realistic_histogram(BINS as usize, 100_000, 2);
    Workload {
        name: "small",
        spec: ghm_spec(Loss::GhmC, BINS, 0),
        input: Input::Histogram(Histogram {
            counts: histogram.counts,
            tot: histogram.tot,
        }),
        check: ghm_bin_weights,
    }
}

pub async fn run(
    target: &Target,
    names: &JobNames,
    max_concurrency: usize,
    duration: Duration,
) -> Result<SmallReport, BenchError> {
    run_workload(
        target,
        names,
        &histogram_workload(),
        max_concurrency,
        duration,
    )
    .await
}

pub async fn run_workload(
    target: &Target,
    names: &JobNames,
    workload: &Workload,
    max_concurrency: usize,
    duration: Duration,
) -> Result<SmallReport, BenchError> {
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(target.connect().await?);
    }
    // One job per concurrent caller, as separate training jobs would be: callers do not queue
    // on one job's lock.
    let mut jobs: Vec<String> = Vec::new();
    let mut points: Vec<SmallPoint> = Vec::new();
    let mut best = (0usize, 0.0f64);
    let mut flat_levels = 0;
    let mut concurrency = 1;
    while concurrency <= max_concurrency.max(1) {
        while jobs.len() < concurrency {
            let job_id = names.job(&format!("{}-{}", workload.name, jobs.len()));
            let channel = channels[jobs.len() % CONNECTIONS].clone();
            create_job_with(&mut target.harmonizer(channel), &job_id, workload.spec).await?;
            jobs.push(job_id);
        }
        let histogram_workers: Vec<StepWorker> = (0..concurrency)
            .map(|i| StepWorker {
                client: target.harmonizer(channels[i % CONNECTIONS].clone()),
                job_id: jobs[i].clone(),
                workload: workload.clone(),
            })
            .collect();
        let health_workers: Vec<HealthWorker> = (0..concurrency)
            .map(|i| HealthWorker {
                client: target.health(channels[i % CONNECTIONS].clone()),
            })
            .collect();
        let cpu_start = target.server_cpu()?;
        let histograms = closed_loop(histogram_workers, duration).await?;
        let cpu_between = target.server_cpu()?;
        let health = closed_loop(health_workers, duration).await?;
        let cpu_end = target.server_cpu()?;
        let histogram_rate = Rate::of(&histograms, cpu_used(cpu_start, cpu_between));
        let health_rate = Rate::of(&health, cpu_used(cpu_between, cpu_end));
        let rate = histogram_rate.requests_per_second;
        points.push(SmallPoint {
            concurrency,
            ratio: rate / health_rate.requests_per_second,
            histogram: histogram_rate,
            health: health_rate,
        });
        if rate > best.1 * GAIN {
            flat_levels = 0;
        } else {
            flat_levels += 1;
        }
        if rate > best.1 {
            best = (concurrency, rate);
        }
        if flat_levels >= 2 {
            break;
        }
        concurrency *= 2;
    }

    let clients: Vec<StepWorker> = (0..best.0.max(1))
        .map(|i| StepWorker {
            client: target.harmonizer(channels[i % CONNECTIONS].clone()),
            job_id: jobs[i % jobs.len().max(1)].clone(),
            workload: workload.clone(),
        })
        .collect();
    let health_clients: Vec<HealthWorker> = (0..best.0.max(1))
        .map(|i| HealthWorker {
            client: target.health(channels[i % CONNECTIONS].clone()),
        })
        .collect();
    let half_rate = HalfRate {
        histogram: paced(target, clients, best.1 / 2.0, duration).await?,
        health: paced(target, health_clients, best.1 / 2.0, duration).await?,
    };
    Ok(SmallReport {
        points,
        saturating_concurrency: best.0,
        saturating_rate: best.1,
        half_rate,
    })
}

/// Sends requests at `rate` per second for `duration`, whether or not earlier ones have been
/// answered (an open loop, as independent clients behave). A plain thread keeps the pace,
/// since the runtime's timers tick in milliseconds; each request runs on the runtime.
async fn paced<W: Call + Clone + Sync>(
    target: &Target,
    workers: Vec<W>,
    rate: f64,
    duration: Duration,
) -> Result<Paced, BenchError> {
    if workers.is_empty() || rate.is_nan() || rate <= 0.0 {
        return Err(BenchError::Answer("no rate to pace at".to_owned()));
    }
    let count = ((rate * duration.as_secs_f64()) as usize).clamp(1, MAX_PACED_REQUESTS);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let workers = Arc::new(workers);
    let runtime = tokio::runtime::Handle::current();
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let server_wait_start = target.server_runqueue_wait()?;
    let client_wait_start = runqueue_wait(std::process::id());
    let start = Instant::now();
    let pacer = std::thread::spawn(move || {
        for index in 0..count {
            let due = start + interval.mul_f64(index as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let mut worker = workers[index % workers.len()].clone();
            let answer = runtime.spawn(async move {
                let sent = Instant::now();
                worker
                    .call()
                    .await
                    .map(|()| (sent.elapsed(), sent.saturating_duration_since(due)))
            });
            if sender.send(answer).is_err() {
                break;
            }
        }
    });
    let mut answers = tokio_stream::wrappers::UnboundedReceiverStream::new(receiver);
    let mut latencies = Vec::with_capacity(count);
    let mut lateness = Vec::with_capacity(count);
    while let Some(answer) = answers.next().await {
        let (latency, late) = answer
            .await
            .map_err(|e| BenchError::Task(e.to_string()))??;
        latencies.push(latency);
        lateness.push(late);
    }
    let elapsed = start.elapsed();
    let per_request = |start: Option<Duration>, end: Option<Duration>| {
        cpu_used(start, end).map(|wait| wait.as_secs_f64() * 1e6 / latencies.len().max(1) as f64)
    };
    let server_wait = per_request(server_wait_start, target.server_runqueue_wait()?);
    let client_wait = per_request(client_wait_start, runqueue_wait(std::process::id()));
    pacer
        .join()
        .map_err(|_| BenchError::Task("the pacing thread panicked".to_owned()))?;
    Ok(Paced {
        target_rate: rate,
        achieved_rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        latency: Latency::of(&mut latencies),
        send_lateness: Latency::of(&mut lateness),
        server_runqueue_wait_us_per_request: server_wait,
        client_runqueue_wait_us_per_request: client_wait,
    })
}

#[derive(Clone)]
struct StepWorker {
    client: HarmonizerClient<Transport>,
    job_id: String,
    workload: Workload,
}

impl Call for StepWorker {
    async fn call(&mut self) -> Result<(), BenchError> {
        let request = HarmonizeRequest {
            job_id: self.job_id.clone(),
            input: Some(self.workload.input.clone()),
            ..Default::default()
        };
        let response = rpc("Harmonize", self.client.harmonize(request).await)?;
        (self.workload.check)(&response).map_err(BenchError::Answer)
    }
}

#[derive(Clone)]
struct HealthWorker {
    client: HealthClient<Transport>,
}

impl Call for HealthWorker {
    async fn call(&mut self) -> Result<(), BenchError> {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        rpc("Health/Check", self.client.check(request).await)?;
        Ok(())
    }
}

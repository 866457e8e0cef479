//! A soak test of the real binary on loopback: hundreds of concurrent HarmonizeStream calls over
//! many jobs (asynchronous ones, and step-synchronous ones of 4 ranks), for a bounded time. It
//! reports the server's RSS at the start and the end, and the latency percentiles; it fails on
//! any error other than those it provokes (a bad message now and then, which ends its stream),
//! on memory that does not stay flat, and on a job whose step count is not exactly the number
//! of steps acknowledged to its workers.
//!
//! CI runs the short version. The long one, with figures in the README:
//!
//! ```sh
//! GHMD_SOAK_SECS=300 cargo test --release --test it soak -- --ignored --nocapture
//! ```
//! (`GHMD_SOAK_STREAMS` and `GHMD_SOAK_JOBS` change the load.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ghmd::client::{Client, norms_request};
use ghmd::proto::{HarmonizeRequest, HarmonizeResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::support::binary::{Ghmd, Launch};
use crate::support::spec::with_world;
use crate::support::{Draw, SplitMix, ghm_c};

const RANKS: u32 = 4;

struct Load {
    duration: Duration,
    streams: usize,
    jobs: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// The real binary, with room for every stream and some to spare; every stream is one caller
/// (this machine's address), so its share is as large.
fn start_ghmd(streams: usize) -> Ghmd {
    let limit = (streams * 2 + 64).to_string();
    Launch::in_memory()
        .args(&[
            "--max-concurrent-requests",
            &limit,
            "--caller-max-concurrent-requests",
            &limit,
        ])
        .start()
}

/// What every stream task reports back.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    provoked: u64,
    unexpected: Vec<String>,
}

/// One HarmonizeStream: a request is sent once the previous one is answered.
struct Stream {
    requests: mpsc::Sender<HarmonizeRequest>,
    responses: tonic::Streaming<HarmonizeResponse>,
}

impl Stream {
    async fn open(channel: &Channel) -> Result<Self, tonic::Status> {
        let (requests, inbound) = mpsc::channel(1);
        let mut client = Client::from_channel(channel.clone());
        let responses = client
            .raw()
            .harmonize_stream(ReceiverStream::new(inbound))
            .await?
            .into_inner();
        Ok(Self {
            requests,
            responses,
        })
    }

    async fn call(
        &mut self,
        request: HarmonizeRequest,
    ) -> Result<HarmonizeResponse, tonic::Status> {
        self.requests
            .send(request)
            .await
            .map_err(|_| tonic::Status::unknown("the stream closed"))?;
        match self.responses.message().await? {
            Some(response) => Ok(response),
            None => Err(tonic::Status::unknown("the stream ended without a status")),
        }
    }
}

fn batch(rng: &mut SplitMix) -> Vec<f32> {
    let len = rng.range(1..2048);
    (0..len).map(|_| rng.detector_norm()).collect()
}

/// An asynchronous job's stream: steps until the deadline; one in `provoke_every` messages is
/// bad on purpose, which must end the stream with INVALID_ARGUMENT and change nothing.
async fn async_worker(
    channel: Channel,
    job_id: String,
    seed: u64,
    deadline: Instant,
    provoke_every: Option<u64>,
    acked: Arc<AtomicU64>,
) -> Tally {
    let mut rng = SplitMix(seed);
    let mut tally = Tally::default();
    let mut stream = match Stream::open(&channel).await {
        Ok(stream) => stream,
        Err(status) => {
            tally.unexpected.push(format!("{job_id}: open: {status}"));
            return tally;
        }
    };
    let mut sent = 0u64;
    while Instant::now() < deadline {
        sent += 1;
        if provoke_every.is_some_and(|every| sent.is_multiple_of(every)) {
            let bad = norms_request(&job_id, sent, 0, &[0.5, f32::NAN], None);
            match stream.call(bad).await {
                Err(status) if status.code() == Code::InvalidArgument => tally.provoked += 1,
                other => tally
                    .unexpected
                    .push(format!("{job_id}: a NaN norm gave {other:?}")),
            }
            stream = match Stream::open(&channel).await {
                Ok(stream) => stream,
                Err(status) => {
                    tally.unexpected.push(format!("{job_id}: reopen: {status}"));
                    return tally;
                }
            };
            continue;
        }
        let norms = batch(&mut rng);
        let started = Instant::now();
        match stream
            .call(norms_request(&job_id, sent, 0, &norms, None))
            .await
        {
            Ok(response) if response.weights.len() == norms.len() * 4 => {
                tally
                    .latencies_us
                    .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(response) => tally.unexpected.push(format!(
                "{job_id}: {} weight bytes for {} norms",
                response.weights.len(),
                norms.len()
            )),
            Err(status) => {
                tally.unexpected.push(format!("{job_id}: {status}"));
                return tally;
            }
        }
    }
    tally
}

/// One rank of a step-synchronous job. All ranks stop after the same step: the first rank to
/// see the deadline after completing step t lets everyone finish step t + 1 (the furthest any
/// rank can have sent) and no more.
async fn sync_worker(
    channel: Channel,
    job_id: String,
    rank: u32,
    seed: u64,
    deadline: Instant,
    last_step: Arc<AtomicU64>,
    completed: Arc<AtomicU64>,
) -> Tally {
    let mut rng = SplitMix(seed);
    let mut tally = Tally::default();
    let mut stream = match Stream::open(&channel).await {
        Ok(stream) => stream,
        Err(status) => {
            tally
                .unexpected
                .push(format!("{job_id}/{rank}: open: {status}"));
            return tally;
        }
    };
    let mut step = 0u64;
    while step < last_step.load(Ordering::SeqCst) {
        let norms = batch(&mut rng);
        let started = Instant::now();
        match stream
            .call(norms_request(&job_id, step, rank, &norms, None))
            .await
        {
            Ok(response) if response.step == step && response.weights.len() == norms.len() * 4 => {
                tally
                    .latencies_us
                    .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                if rank == 0 {
                    completed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(response) => {
                tally.unexpected.push(format!(
                    "{job_id}/{rank}: step {step} answered as {}",
                    response.step
                ));
                return tally;
            }
            Err(status) => {
                tally
                    .unexpected
                    .push(format!("{job_id}/{rank} step {step}: {status}"));
                return tally;
            }
        }
        if Instant::now() >= deadline {
            let _ =
                last_step.compare_exchange(u64::MAX, step + 2, Ordering::SeqCst, Ordering::SeqCst);
        }
        step += 1;
    }
    tally
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[index]) / 1000.0
}

async fn soak(load: Load) {
    let daemon = start_ghmd(load.streams);
    let uri = daemon.uri();
    let mut admin = Client::connect(uri.clone()).await.expect("connect");

    // A quarter of the jobs are step-synchronous with 4 ranks, one stream per rank; the other
    // streams spread over the asynchronous jobs.
    let sync_jobs = (load.jobs / 4).min(load.streams / (RANKS as usize * 2));
    let async_jobs = load.jobs - sync_jobs;
    let async_streams = load.streams - sync_jobs * RANKS as usize;
    assert!(
        async_jobs > 0 && async_streams >= async_jobs,
        "too few streams for the jobs"
    );
    let connections: Vec<Channel> = {
        let mut channels = Vec::new();
        for _ in 0..load.streams.div_ceil(25) {
            let channel = Endpoint::from_shared(uri.clone())
                .expect("uri")
                .connect()
                .await
                .expect("connect");
            channels.push(channel);
        }
        channels
    };

    let mut acked: HashMap<String, Arc<AtomicU64>> = HashMap::new();
    for job in 0..async_jobs {
        let id = format!("soak/async-{job}");
        admin
            .create_job(&id, with_world(ghm_c(30, 0.75), 1))
            .await
            .expect("create");
        acked.insert(id, Arc::new(AtomicU64::new(0)));
    }
    for job in 0..sync_jobs {
        let id = format!("soak/sync-{job}");
        admin
            .create_job(&id, with_world(ghm_c(30, 0.75), RANKS))
            .await
            .expect("create");
        acked.insert(id, Arc::new(AtomicU64::new(0)));
    }

    let started = Instant::now();
    let deadline = started + load.duration;
    let mut tasks = Vec::new();
    let mut n = 0usize;
    let mut next_channel = || {
        n += 1;
        connections[n % connections.len()].clone()
    };
    for stream in 0..async_streams {
        let id = format!("soak/async-{}", stream % async_jobs);
        let provoke = (stream % 10 == 0).then_some(25);
        tasks.push(tokio::spawn(async_worker(
            next_channel(),
            id.clone(),
            stream as u64,
            deadline,
            provoke,
            Arc::clone(&acked[&id]),
        )));
    }
    for job in 0..sync_jobs {
        let id = format!("soak/sync-{job}");
        let last_step = Arc::new(AtomicU64::new(u64::MAX));
        for rank in 0..RANKS {
            tasks.push(tokio::spawn(sync_worker(
                next_channel(),
                id.clone(),
                rank,
                (job as u64) << 8 | u64::from(rank),
                deadline,
                Arc::clone(&last_step),
                Arc::clone(&acked[&id]),
            )));
        }
    }

    // RSS every tenth of the run: the first sample is after warm-up, the trend tells a leak
    // (growing with the run) from buffers reaching the load's working set.
    let mut rss_series = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(load.duration / 10).await;
        rss_series.push(daemon.rss_kib().0);
    }
    // Buffers grow to the largest batch each stream has seen, so RSS climbs for a while before
    // it levels off; a leak keeps climbing. The bound below is taken from the third tenth.
    let rss_start = rss_series[0];
    let rss_settled = rss_series[2];
    let mut tally = Tally::default();
    for task in tasks {
        let done = tokio::time::timeout(load.duration + Duration::from_secs(120), task)
            .await
            .expect("a worker hung past the deadline")
            .expect("worker task");
        tally.latencies_us.extend(done.latencies_us);
        tally.provoked += done.provoked;
        tally.unexpected.extend(done.unexpected);
    }
    let elapsed = started.elapsed();
    let (rss_end, rss_peak) = daemon.rss_kib();

    // Every acknowledged step was applied exactly once.
    let mut mismatched = Vec::new();
    for (id, count) in &acked {
        let state = admin.get_job(id).await.expect("get").state.expect("state");
        let acked = count.load(Ordering::Relaxed);
        if state.steps != acked {
            mismatched.push(format!(
                "{id}: {} steps applied, {acked} acknowledged",
                state.steps
            ));
        }
    }
    tally.latencies_us.sort_unstable();
    let requests = tally.latencies_us.len();
    println!(
        "soak: {} s, {} streams ({} async over {} jobs, {} ranks of {} step-synchronous jobs) on \
         {} connections",
        elapsed.as_secs(),
        load.streams,
        async_streams,
        async_jobs,
        sync_jobs * RANKS as usize,
        sync_jobs,
        connections.len()
    );
    println!(
        "soak: {requests} requests answered ({:.0}/s), {} provoked errors, {} unexpected",
        requests as f64 / elapsed.as_secs_f64(),
        tally.provoked,
        tally.unexpected.len()
    );
    println!(
        "soak: latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&tally.latencies_us, 0.50),
        percentile(&tally.latencies_us, 0.99),
        percentile(&tally.latencies_us, 1.0)
    );
    println!(
        "soak: server RSS {:.1} MiB after warm-up, {:.1} MiB at the end, peak {:.1} MiB; by \
         tenths of the run: {:?} MiB",
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        rss_peak as f64 / 1024.0,
        rss_series
            .iter()
            .map(|kib| (*kib as f64 / 1024.0).round() as u64)
            .collect::<Vec<_>>()
    );

    assert!(
        tally.unexpected.is_empty(),
        "unexpected errors: {:?}",
        &tally.unexpected[..tally.unexpected.len().min(10)]
    );
    assert!(mismatched.is_empty(), "{mismatched:?}");
    assert!(
        tally.provoked > 0,
        "the soak provoked nothing; it proves less than it says"
    );
    assert!(
        requests > load.streams,
        "too little traffic: {requests} requests"
    );
    // Flat memory: buffers grow to the load's working set during warm-up; a leak grows with
    // the run. A generous bound that still catches a per-request leak over the run.
    assert!(
        rss_end <= rss_settled + rss_settled / 2 + 16 * 1024,
        "server RSS grew from {rss_settled} KiB (a third into the run) to {rss_end} KiB"
    );
    let log = daemon.log();
    assert!(
        !log.contains("ERROR") && !log.contains("panicked"),
        "server log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_short() {
    soak(Load {
        duration: Duration::from_secs(env_or("GHMD_SOAK_SHORT_SECS", 20)),
        streams: 200,
        jobs: 40,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: GHMD_SOAK_SECS=300 cargo test --release --test it soak -- --ignored --nocapture"]
async fn soak_long() {
    soak(Load {
        duration: Duration::from_secs(env_or("GHMD_SOAK_SECS", 300)),
        streams: env_or("GHMD_SOAK_STREAMS", 400),
        jobs: env_or("GHMD_SOAK_JOBS", 100),
    })
    .await;
}

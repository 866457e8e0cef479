//! `ghmd bench`: a load generator that says how far a ghmd is from what a user would do
//! instead, in ratios to baselines measured in the same run on the same machine (see
//! BENCHMARKS.md). Every measurement is bounded in time and count.
//!
//! - `raw`: 1M-element requests on 1 and 4 connections, against a TCP echo of the same bytes;
//! - `small`: histogram requests at rising concurrency until saturation, against the health
//!   check; then the latency at half the saturating rate;
//! - `steps`: rounds of a step-synchronous job of W = 2, 4, 8 ranks;
//! - `jobs`: the resident memory of an idle job, on a server of its own;
//! - `wide-steps` (not a default): one full step of W = 2,048 to 65,536 ranks, on a server of
//!   its own that admits them all, and another job's latency meanwhile;
//! - `small-methods`, `jobs-methods`, `eqlv2-overlap` (not defaults): Seesaw and EQLv2 at
//!   C = 1203, see `methods.rs` and `overlap.rs`.
//!
//! Without `--target` the bench starts `ghmd serve` itself on a free loopback port.

mod args;
mod data;
mod jobs;
mod methods;
mod overlap;
mod raw;
mod small;
mod stats;
mod steps;
mod target;
mod wide;

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;

pub use args::{BenchArgs, BenchMode};
use ghmd::client::{Credentials, Transport};
use ghmd::proto::harmonizer_client::HarmonizerClient;
use ghmd::proto::{CreateJobRequest, DeleteJobRequest, JobSpec, Loss};
pub use jobs::JobsReport;
pub use methods::{MethodJobs, MethodSmall};
pub use overlap::OverlapReport;
pub use raw::RawPoint;
pub use small::SmallReport;
pub use steps::StepsReport;
use target::Target;
pub use wide::WideReport;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Target(String),
    #[error("cannot connect to {0}")]
    Connect(String),
    #[error("{call} failed with {code:?}: {message}")]
    Rpc {
        call: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("unexpected answer: {0}")]
    Answer(String),
    #[error("echo baseline: {0}")]
    Echo(#[from] std::io::Error),
    #[error("memory: {0}")]
    Memory(String),
    #[error("a bench task failed: {0}")]
    Task(String),
    #[error("--token: {0}")]
    Token(#[from] ghmd::client::ClientError),
    #[error("cannot write the report: {0}")]
    Output(String),
}

/// A call's answer, or the error naming the call.
fn rpc<T>(
    call: &'static str,
    result: Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, BenchError> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|status| BenchError::Rpc {
            call,
            code: status.code(),
            message: status.message().to_owned(),
        })
}

/// Job ids unique to this run, remembered so that the jobs made on a `--target` can be deleted
/// at the end.
struct JobNames {
    prefix: String,
    created: Mutex<Vec<String>>,
}

impl JobNames {
    fn new() -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Self {
            prefix: format!("ghmd-bench/{}-{since_epoch}", std::process::id()),
            created: Mutex::new(Vec::new()),
        }
    }

    fn job(&self, name: &str) -> String {
        let id = format!("{}/{name}", self.prefix);
        self.created.lock().push(id.clone());
        id
    }
}

/// The GHM spec every GHM mode measures: momentum 0.75, as a detector's config has it.
fn ghm_spec(loss: Loss, bins: u32, world_size: u32) -> JobSpec {
    JobSpec {
        loss: loss.into(),
        bins,
        momentum: 0.75,
        world_size,
        ..Default::default()
    }
}

async fn create_job(
    client: &mut HarmonizerClient<Transport>,
    job_id: &str,
    loss: Loss,
    bins: u32,
    world_size: u32,
) -> Result<(), BenchError> {
    create_job_with(client, job_id, ghm_spec(loss, bins, world_size)).await
}

async fn create_job_with(
    client: &mut HarmonizerClient<Transport>,
    job_id: &str,
    spec: JobSpec,
) -> Result<(), BenchError> {
    let request = CreateJobRequest {
        job_id: job_id.to_owned(),
        spec: Some(spec),
        ..Default::default()
    };
    rpc("CreateJob", client.create_job(request).await)?;
    Ok(())
}

/// Whether a figure meets the target.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub what: String,
    pub value: f64,
    pub target: String,
    pub met: bool,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum JobsOutcome {
    Measured(JobsReport),
    Skipped { reason: String },
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum MethodJobsOutcome {
    Measured { methods: Vec<MethodJobs> },
    Skipped { reason: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub started_by_bench: bool,
    pub cores: usize,
    pub seconds_per_point: f64,
    pub raw: Option<Vec<RawPoint>>,
    pub small: Option<SmallReport>,
    pub steps: Option<StepsReport>,
    pub jobs: Option<JobsOutcome>,
    pub wide_steps: Option<WideReport>,
    pub small_methods: Option<Vec<MethodSmall>>,
    pub jobs_methods: Option<MethodJobsOutcome>,
    pub eqlv2_overlap: Option<OverlapReport>,
    pub checks: Vec<Check>,
}

/// Why the memory modes need a server of their own.
const MEMORY_NEEDS_OWN_SERVER: &str =
    "memory is read from /proc of a server the bench starts: run without --target";

/// Runs the modes `args` asks for and prints the report, as a table or as JSON.
pub async fn main(args: BenchArgs) -> Result<(), BenchError> {
    let report = run(&args).await?;
    let text = if args.json {
        serde_json::to_string_pretty(&report).map_err(|e| BenchError::Output(e.to_string()))?
    } else {
        table(&report)
    };
    println!("{text}");
    Ok(())
}

pub async fn run(args: &BenchArgs) -> Result<Report, BenchError> {
    let credentials = match &args.token {
        Some(token) => Credentials::bearer(token)?,
        None => Credentials::default(),
    };
    let target = match &args.target {
        Some(uri) => Target::given(uri, credentials.clone(), args.allow_remote).await?,
        None => {
            Target::start(
                credentials.clone(),
                args.server_binary.as_deref(),
                &args.server_args,
                args.server_cpus.as_deref(),
            )
            .await?
        }
    };
    let names = JobNames::new();
    let wants = |mode| args.modes.contains(&mode);
    let mut report = Report {
        target: target.uri.clone(),
        started_by_bench: target.started_by_bench(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        seconds_per_point: args.duration.as_secs_f64(),
        raw: None,
        small: None,
        steps: None,
        jobs: None,
        wide_steps: None,
        small_methods: None,
        jobs_methods: None,
        eqlv2_overlap: None,
        checks: Vec::new(),
    };
    let measured = async {
        if wants(BenchMode::Raw) {
            report.raw = Some(raw::run(&target, &names, args.raw_elements, args.duration).await?);
        }
        if wants(BenchMode::Small) {
            report.small =
                Some(small::run(&target, &names, args.max_concurrency, args.duration).await?);
        }
        if wants(BenchMode::Steps) {
            report.steps = Some(steps::run(&target, &names, args.duration).await?);
        }
        if wants(BenchMode::SmallMethods) {
            let mut reports = Vec::new();
            for method in methods::Method::ALL {
                let report = small::run_workload(
                    &target,
                    &names,
                    &method.workload(),
                    args.max_concurrency,
                    args.duration,
                )
                .await?;
                reports.push(MethodSmall {
                    method,
                    num_classes: methods::CLASSES,
                    report,
                });
            }
            report.small_methods = Some(reports);
        }
        if wants(BenchMode::Eqlv2Overlap) {
            report.eqlv2_overlap =
                Some(overlap::run(&target, &names, args.forward, args.duration).await?);
        }
        if wants(BenchMode::WideSteps) && args.target.is_some() {
            report.wide_steps = Some(wide::run(&target, &names, &args.wide_world_sizes).await?);
        }
        Ok::<_, BenchError>(())
    }
    .await;
    if !target.started_by_bench() {
        delete_jobs(&target, &names).await;
    }
    measured?;
    drop(target);
    if wants(BenchMode::WideSteps) && args.target.is_none() {
        // A server of its own that admits every rank of the widest step at once.
        let most = args.wide_world_sizes.iter().max().copied().unwrap_or(0);
        let mut server_args = args.server_args.clone();
        // The bench is one caller (one peer address): its share must admit every rank too.
        server_args.push(format!("--max-concurrent-requests={}", most + 1024));
        server_args.push(format!("--caller-max-concurrent-requests={}", most + 1024));
        let wide = Target::start(
            credentials.clone(),
            args.server_binary.as_deref(),
            &server_args,
            args.server_cpus.as_deref(),
        )
        .await?;
        report.wide_steps = Some(wide::run(&wide, &names, &args.wide_world_sizes).await?);
    }
    if wants(BenchMode::Jobs) {
        report.jobs = Some(if args.target.is_some() {
            JobsOutcome::Skipped {
                reason: MEMORY_NEEDS_OWN_SERVER.to_owned(),
            }
        } else {
            // A server of its own, so that nothing served before blurs the reading.
            let fresh = Target::start(
                credentials.clone(),
                args.server_binary.as_deref(),
                &args.server_args,
                args.server_cpus.as_deref(),
            )
            .await?;
            JobsOutcome::Measured(jobs::run(&fresh, &names, args.jobs).await?)
        });
    }
    if wants(BenchMode::JobsMethods) {
        report.jobs_methods = Some(if args.target.is_some() {
            MethodJobsOutcome::Skipped {
                reason: MEMORY_NEEDS_OWN_SERVER.to_owned(),
            }
        } else {
            let mut measured = Vec::new();
            for method in methods::Method::ALL {
                // A server of its own per method, whose byte limits admit every job: a job at
                // C = 1203 holds kilobytes where GHM's holds a hundred bytes.
                let mut server_args = args.server_args.clone();
                server_args.push("--max-jobs-bytes=1099511627776".to_owned());
                server_args.push("--caller-max-jobs-bytes=1099511627776".to_owned());
                let fresh = Target::start(
                    credentials.clone(),
                    args.server_binary.as_deref(),
                    &server_args,
                    args.server_cpus.as_deref(),
                )
                .await?;
                let (before, after) = jobs::rss_around(
                    &fresh,
                    &names,
                    method.name(),
                    method.spec(0),
                    args.method_jobs,
                )
                .await?;
                measured.push(MethodJobs {
                    method,
                    num_classes: methods::CLASSES,
                    jobs: args.method_jobs,
                    rss_before_bytes: before,
                    rss_after_bytes: after,
                    bytes_per_job: jobs::per_job(before, after, args.method_jobs),
                });
            }
            MethodJobsOutcome::Measured { methods: measured }
        });
    }
    report.checks = checks(&report);
    Ok(report)
}

/// Best effort: a failed delete only leaves a job behind on the target.
async fn delete_jobs(target: &Target, names: &JobNames) {
    let Ok(channel) = target.connect().await else {
        return;
    };
    let mut client = target.harmonizer(channel);
    let created = std::mem::take(&mut *names.created.lock());
    for job_id in created {
        let _ = client.delete_job(DeleteJobRequest { job_id }).await;
    }
}

fn checks(report: &Report) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut check = |what: String, value: f64, target: &str, met: bool| {
        checks.push(Check {
            what,
            value,
            target: target.to_owned(),
            met,
        });
    };
    // Issue 14's goals: 0.6 of the echo on one connection, 0.5 on four.
    for point in report.raw.iter().flatten() {
        let (goal, text) = if point.connections == 1 {
            (0.6, ">= 0.6")
        } else {
            (0.5, ">= 0.5")
        };
        check(
            format!("raw, {} connection(s): ghmd / echo", point.connections),
            point.ratio,
            text,
            point.ratio >= goal,
        );
    }
    if let Some(small) = &report.small {
        if let Some(point) = small
            .points
            .iter()
            .find(|p| p.concurrency == small.saturating_concurrency)
        {
            check(
                format!(
                    "small, concurrency {}: histogram / health check",
                    point.concurrency
                ),
                point.ratio,
                ">= 0.9",
                point.ratio >= 0.9,
            );
        }
        let p99 = small.half_rate.histogram.latency.p99_ms;
        check(
            format!(
                "small, p99 at half the saturating rate ({:.0}/s), ms",
                small.half_rate.histogram.target_rate
            ),
            p99,
            "< 2",
            p99 < 2.0,
        );
    }
    if let Some(steps::StepsReport::Measured { points }) = &report.steps {
        for point in points.iter().filter(|p| p.world_size == 8) {
            let p50 = point.round_latency.p50_ms;
            check(
                "steps, W = 8: round p50, ms".to_owned(),
                p50,
                "< 1",
                p50 < 1.0,
            );
        }
    }
    if let Some(wide) = &report.wide_steps {
        for point in &wide.points {
            check(
                format!("wide steps, W = {}: ranks answered OK", point.world_size),
                point.answered_ok as f64,
                "= W",
                point.answered_ok == point.world_size as usize,
            );
        }
        if let (Some(first), Some(last)) = (wide.points.first(), wide.points.last()) {
            let growth = last.us_per_rank / first.us_per_rank;
            check(
                format!(
                    "wide steps: time per rank at W = {} / at W = {}",
                    last.world_size, first.world_size
                ),
                growth,
                "<= 4 (x32 if quadratic)",
                growth <= 4.0,
            );
        }
    }
    if let Some(JobsOutcome::Measured(jobs)) = &report.jobs {
        check(
            format!("jobs: bytes per idle job (bins {})", jobs.bins),
            jobs.bytes_per_job,
            "<= 2048",
            jobs.bytes_per_job <= 2048.0,
        );
    }
    checks
}

fn optional(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn ms(latency: &stats::Latency) -> String {
    format!("{:.3} / {:.3}", latency.p50_ms, latency.p99_ms)
}

/// One small report: `heading` says what was sent, `name` and `short` label its rows and
/// columns (the health check's are the same in every report).
fn small_table(out: &mut String, heading: &str, name: &str, short: &str, small: &SmallReport) {
    let _ = writeln!(
        out,
        "\n{heading} vs grpc.health.v1.Health/Check; p50 / p99 in ms; server CPU per request, \
         {name} / health"
    );
    let _ = writeln!(
        out,
        "{:>5} {:>12} {:>17} {:>12} {:>17} {:>7} {:>15}",
        "conc",
        format!("{short} req/s"),
        format!("{short} p50/p99"),
        "health req/s",
        "health p50/p99",
        "ratio",
        "srv cpu us/req"
    );
    for p in &small.points {
        let cpu = match (
            p.histogram.server_cpu_us_per_request,
            p.health.server_cpu_us_per_request,
        ) {
            (Some(histogram), Some(health)) => format!("{histogram:.0} / {health:.0}"),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:>5} {:>12.0} {:>17} {:>12.0} {:>17} {:>7.3} {:>15}",
            p.concurrency,
            p.histogram.requests_per_second,
            ms(&p.histogram.latency),
            p.health.requests_per_second,
            ms(&p.health.latency),
            p.ratio,
            cpu
        );
    }
    let half = &small.half_rate;
    let _ = writeln!(
        out,
        "saturation: {:.0} req/s at concurrency {}; then an open loop at half that rate, \
         p50 / p99 in ms; late: the generator's own delay against its schedule; run-queue \
         wait: time the threads were runnable without a core, per request",
        small.saturating_rate, small.saturating_concurrency
    );
    let _ = writeln!(
        out,
        "{:>9} {:>10} {:>10} {:>17} {:>17} {:>20}",
        "", "sent/s", "answered/s", "p50/p99", "late p50/p99", "wait us srv / client"
    );
    for (name, paced) in [(name, &half.histogram), ("health", &half.health)] {
        let _ = writeln!(
            out,
            "{:>9} {:>10.0} {:>10.0} {:>17} {:>17} {:>20}",
            name,
            paced.target_rate,
            paced.achieved_rate,
            ms(&paced.latency),
            ms(&paced.send_lateness),
            format!(
                "{} / {}",
                optional(paced.server_runqueue_wait_us_per_request, 1),
                optional(paced.client_runqueue_wait_us_per_request, 1)
            )
        );
    }
}

fn memory_line(out: &mut String, what: &str, before: u64, after: u64, bytes_per_job: f64) {
    let _ = writeln!(
        out,
        "\n{what}: RSS {:.1} MiB -> {:.1} MiB, {bytes_per_job:.0} bytes per job",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
    );
}

/// The report for a person: one section per mode, then the targets.
fn table(report: &Report) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "ghmd bench: {} ({}), {} cores, {:.1} s per point",
        report.target,
        if report.started_by_bench {
            "started by the bench"
        } else {
            "--target"
        },
        report.cores,
        report.seconds_per_point
    );
    if let Some(points) = &report.raw {
        let _ = writeln!(
            out,
            "\nraw: {} elements per request; p50 / p99 in ms",
            points.first().map_or(0, |p| p.elements_per_request)
        );
        let _ = writeln!(
            out,
            "{:>5} {:>14} {:>17} {:>14} {:>17} {:>7} {:>13}",
            "conns",
            "ghmd elem/s",
            "ghmd p50/p99",
            "echo elem/s",
            "echo p50/p99",
            "ratio",
            "srv cpu ms/req"
        );
        for p in points {
            let _ = writeln!(
                out,
                "{:>5} {:>14.3e} {:>17} {:>14.3e} {:>17} {:>7.3} {:>13}",
                p.connections,
                p.ghmd.elements_per_second,
                ms(&p.ghmd.latency),
                p.echo.elements_per_second,
                ms(&p.echo.latency),
                p.ratio,
                optional(p.ghmd.server_cpu_ms_per_request, 2)
            );
        }
    }
    if let Some(small) = &report.small {
        let heading = format!("small: histogram requests (bins {})", small::BINS);
        small_table(&mut out, &heading, "histogram", "hist", small);
    }
    for method in report.small_methods.iter().flatten() {
        let heading = format!(
            "small, {} (C = {}): its steps",
            method.method.name(),
            method.num_classes
        );
        small_table(&mut out, &heading, "step", "step", &method.report);
    }
    match &report.steps {
        Some(steps::StepsReport::Measured { points }) => {
            let _ = writeln!(out, "\nsteps: rounds of W ranks, one histogram each");
            let _ = writeln!(
                out,
                "{:>5} {:>8} {:>10} {:>17}",
                "W", "rounds", "rounds/s", "round p50/p99 ms"
            );
            for p in points {
                let _ = writeln!(
                    out,
                    "{:>5} {:>8} {:>10.0} {:>17}",
                    p.world_size,
                    p.rounds,
                    p.rounds_per_second,
                    ms(&p.round_latency)
                );
            }
        }
        Some(steps::StepsReport::UnsupportedByServer { message }) => {
            let _ = writeln!(out, "\nsteps: unsupported by server ({message})");
        }
        None => {}
    }
    if let Some(wide) = &report.wide_steps {
        let _ = writeln!(
            out,
            "\nwide steps: one step of W ranks, {} ranks per connection; another job's p50/p99 \
             {} ms with no step running",
            wide::RANKS_PER_CONNECTION,
            ms(&wide.baseline_probe)
        );
        let _ = writeln!(
            out,
            "{:>6} {:>10} {:>8} {:>8} {:>18} {:>9}  failures",
            "W", "step ms", "us/rank", "OK", "other p50/p99 ms", "p99 x"
        );
        for p in &wide.points {
            let _ = writeln!(
                out,
                "{:>6} {:>10.1} {:>8.2} {:>8} {:>18} {:>9.2}  {:?}",
                p.world_size,
                p.step_ms,
                p.us_per_rank,
                p.answered_ok,
                ms(&p.probe),
                p.probe_p99_ratio,
                p.failures
            );
        }
    }
    match &report.jobs {
        Some(JobsOutcome::Measured(jobs)) => {
            let what = format!("jobs: {} idle jobs (bins {})", jobs.jobs, jobs.bins);
            memory_line(
                &mut out,
                &what,
                jobs.rss_before_bytes,
                jobs.rss_after_bytes,
                jobs.bytes_per_job,
            );
        }
        Some(JobsOutcome::Skipped { reason }) => {
            let _ = writeln!(out, "\njobs: skipped ({reason})");
        }
        None => {}
    }
    match &report.jobs_methods {
        Some(MethodJobsOutcome::Measured { methods }) => {
            for jobs in methods {
                let what = format!(
                    "jobs, {} (C = {}): {} idle jobs",
                    jobs.method.name(),
                    jobs.num_classes,
                    jobs.jobs
                );
                memory_line(
                    &mut out,
                    &what,
                    jobs.rss_before_bytes,
                    jobs.rss_after_bytes,
                    jobs.bytes_per_job,
                );
            }
        }
        Some(MethodJobsOutcome::Skipped { reason }) => {
            let _ = writeln!(out, "\njobs-methods: skipped ({reason})");
        }
        None => {}
    }
    if let Some(overlap) = &report.eqlv2_overlap {
        let _ = writeln!(
            out,
            "\neqlv2 overlap (C = {}): {} steps of a {:.1} ms forward pass; the step's wait for \
             ghmd after its forward pass, p50 / p99 and mean in ms",
            overlap.num_classes, overlap.steps, overlap.forward_ms
        );
        for (name, wait, mean) in [
            (
                "sequential",
                &overlap.sequential_wait,
                overlap.sequential_wait_mean_ms,
            ),
            (
                "overlapped",
                &overlap.overlapped_wait,
                overlap.overlapped_wait_mean_ms,
            ),
        ] {
            let _ = writeln!(out, "{name:>11} {:>17} {mean:>8.3}", ms(wait));
        }
        let _ = writeln!(
            out,
            "wait overlapped / sequential {:.3}; ms per step: forward alone {:.3}, sequential \
             {:.3}, overlapped {:.3} (ratio {:.3})",
            overlap.wait_ratio,
            overlap.forward_alone_ms_per_step,
            overlap.sequential_ms_per_step,
            overlap.overlapped_ms_per_step,
            overlap.step_time_ratio
        );
    }
    if !report.checks.is_empty() {
        let _ = writeln!(out, "\ntargets:");
        for c in &report.checks {
            let _ = writeln!(
                out,
                "  {:<58} {:>10.4}  {:<8} {}",
                c.what,
                c.value,
                c.target,
                if c.met { "met" } else { "NOT met" }
            );
        }
    }
    out
}

//! `jobs`: the memory an idle job costs: the server's resident set before and after creating
//! many jobs (bins 30, never stepped), divided by their number. Only for a server the bench
//! started, whose `/proc/<pid>/status` it can read, and that has served nothing else before.
//! `jobs-methods` (`methods.rs`) measures Seesaw's and EQLv2's jobs the same way.

use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinSet;

use super::target::Target;
use super::{BenchError, JobNames, create_job_with, ghm_spec};
use ghmd::proto::{JobSpec, Loss};

const BINS: u32 = 30;
const CONNECTIONS: usize = 4;
/// CreateJob calls in flight.
const CREATORS: usize = 32;
/// How long the server gets to settle (its allocator to return what it will) before a reading.
const SETTLE: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, Serialize)]
pub struct JobsReport {
    pub jobs: usize,
    pub bins: u32,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_job: f64,
}

pub async fn run(target: &Target, names: &JobNames, jobs: usize) -> Result<JobsReport, BenchError> {
    let (before, after) =
        rss_around(target, names, "jobs", ghm_spec(Loss::GhmC, BINS, 0), jobs).await?;
    Ok(JobsReport {
        jobs,
        bins: BINS,
        rss_before_bytes: before,
        rss_after_bytes: after,
        bytes_per_job: per_job(before, after, jobs),
    })
}

pub fn per_job(before: u64, after: u64, jobs: usize) -> f64 {
    after.saturating_sub(before) as f64 / jobs.max(1) as f64
}

/// The server's resident set before and after `jobs` idle jobs of `spec` were created, named
/// `{name}-NNNNNNN`.
pub async fn rss_around(
    target: &Target,
    names: &JobNames,
    name: &str,
    spec: JobSpec,
    jobs: usize,
) -> Result<(u64, u64), BenchError> {
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(target.connect().await?);
    }
    tokio::time::sleep(SETTLE).await;
    let before = rss(target)?;
    let mut creators = JoinSet::new();
    for creator in 0..CREATORS {
        let mut client = target.harmonizer(channels[creator % CONNECTIONS].clone());
        let ids: Vec<String> = (creator..jobs)
            .step_by(CREATORS)
            .map(|index| names.job(&format!("{name}-{index:07}")))
            .collect();
        creators.spawn(async move {
            for id in ids {
                create_job_with(&mut client, &id, spec).await?;
            }
            Ok::<_, BenchError>(())
        });
    }
    while let Some(created) = creators.join_next().await {
        created.map_err(|e| BenchError::Task(e.to_string()))??;
    }
    tokio::time::sleep(SETTLE).await;
    let after = rss(target)?;
    Ok((before, after))
}

fn rss(target: &Target) -> Result<u64, BenchError> {
    target.server_rss()?.ok_or_else(|| {
        BenchError::Memory("only a server the bench started can be measured".to_owned())
    })
}

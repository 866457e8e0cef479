//! Fair sharing and memory bounds: per-caller quotas of jobs and job memory (a token's, or a
//! peer address's on an open server), the bytes one job and every job may hold, and a flood of
//! large jobs against the real binary staying under the bound the README states.

use std::time::Duration;

use ghmd::client::Client;
use ghmd::proto::{HarmonizeRequest, JobSpec};
use tonic::Code;

use crate::support::binary::Launch;
use crate::support::request::histogram;
use crate::support::{TempDir, TestServer, assert_status, ghm_c, step_synchronous};

const TEAM_A: &str = "team-a-quota-secret-0123456789";
const TEAM_B: &str = "team-b-quota-secret-0123456789";
const MIB: u64 = 1024 * 1024;

/// A server with the tokens of team-a, whose entry ends with `team_a_quota`, and team-b, which
/// has the server's default quotas.
async fn with_tokens(dir: &TempDir, team_a_quota: &str) -> TestServer {
    let tokens = dir.write(
        "tokens.toml",
        &format!(
            "[[token]]\nname = \"team-a\"\ntoken = \"{TEAM_A}\"\nprefixes = [\"team-a/\"]\n\
             {team_a_quota}\n\n\
             [[token]]\nname = \"team-b\"\ntoken = \"{TEAM_B}\"\nprefixes = [\"team-b/\"]\n"
        ),
    );
    TestServer::start_with(|config| config.tokens_file = Some(tokens)).await
}

fn large_job() -> JobSpec {
    ghm_c(4096, 0.75)
}

#[tokio::test]
async fn a_token_that_filled_its_job_quota_leaves_other_tokens_served() {
    let dir = TempDir::new("quota-jobs");
    let server = with_tokens(&dir, "max_jobs = 3").await;
    let mut team_a = server.client_with_token(Some(TEAM_A)).await;
    let mut team_b = server.client_with_token(Some(TEAM_B)).await;
    for n in 0..3 {
        team_a
            .create_job(&format!("team-a/{n}"), ghm_c(10, 0.75))
            .await
            .expect("within team-a's quota");
    }
    assert_status(
        team_a.create_job("team-a/3", ghm_c(10, 0.75)).await,
        Code::ResourceExhausted,
        &["caller \"token team-a\"", "holds 3 jobs", "max_jobs 3"],
        "team-a's fourth job",
    );
    assert!(
        server.registry.get("team-a/3").is_err(),
        "nothing was created"
    );
    // team-b has the default quota, untouched by team-a's burst.
    for n in 0..10 {
        team_b
            .create_job(&format!("team-b/{n}"), ghm_c(10, 0.75))
            .await
            .expect("team-b is served");
    }
    // An existing job is still answered idempotently, and a deleted one frees its place.
    team_a
        .create_job("team-a/0", ghm_c(10, 0.75))
        .await
        .expect("the same job again");
    team_a.delete_job("team-a/0").await.expect("delete");
    team_a
        .create_job("team-a/3", ghm_c(10, 0.75))
        .await
        .expect("a place was freed");
    server.stop().await;
}

fn rank_zero(job_id: &str, step: u64) -> HarmonizeRequest {
    HarmonizeRequest {
        job_id: job_id.to_owned(),
        step,
        input: histogram(vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1.0),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_at_its_share_of_concurrent_requests_leaves_other_tokens_served() {
    let dir = TempDir::new("quota-share");
    let server = with_tokens(&dir, "max_concurrent_requests = 2").await;
    let mut team_a = server.client_with_token(Some(TEAM_A)).await;
    let mut team_b = server.client_with_token(Some(TEAM_B)).await;
    let spec = step_synchronous(ghm_c(10, 0.75), 2, Duration::from_secs(60));
    team_a
        .create_job("team-a/wait", spec)
        .await
        .expect("create");
    team_b
        .create_job("team-b/free", ghm_c(10, 0.75))
        .await
        .expect("create");
    // Two requests of team-a wait for a rank 1 that never comes: its whole share.
    let mut waiting = Vec::new();
    for step in 0..2 {
        let mut client = server.client_with_token(Some(TEAM_A)).await;
        waiting.push(tokio::spawn(async move {
            client.harmonize(rank_zero("team-a/wait", step)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_status(
        team_a.get_job("team-a/wait").await,
        Code::ResourceExhausted,
        &["caller \"token team-a\"", "2 requests in flight"],
        "team-a past its share",
    );
    for step in 0..20 {
        team_b
            .harmonize(rank_zero("team-b/free", step))
            .await
            .expect("team-b is served meanwhile");
    }
    assert!(waiting.iter().all(|task| !task.is_finished()));
    // Once team-a's requests end, its share is free again.
    for task in &waiting {
        task.abort();
    }
    drop(waiting);
    tokio::time::sleep(Duration::from_millis(300)).await;
    team_a
        .get_job("team-a/wait")
        .await
        .expect("the share came back when the requests ended");
    server.stop().await;
}

#[tokio::test]
async fn on_an_open_server_the_peer_address_is_the_caller() {
    let server = TestServer::start_with(|config| config.caller_max_jobs = 2).await;
    let mut client = server.client().await;
    for n in 0..2 {
        client
            .create_job(&format!("open/{n}"), ghm_c(10, 0.75))
            .await
            .expect("within the peer's quota");
    }
    assert_status(
        client.create_job("open/2", ghm_c(10, 0.75)).await,
        Code::ResourceExhausted,
        &["caller \"peer 127.0.0.1\"", "max_jobs 2"],
        "the peer's third job",
    );
    server.stop().await;
}

#[tokio::test]
async fn the_memory_bounds_refuse_a_job_past_them_saying_which() {
    let server = TestServer::start_with(|config| {
        config.max_job_bytes = 50_000;
        config.max_jobs_bytes = 1_000_000;
    })
    .await;
    let mut client = server.client().await;
    assert_status(
        client.create_job("too-big", large_job()).await,
        Code::ResourceExhausted,
        &[
            "the job needs",
            "above the 50000 one job may hold (--max-job-bytes)",
        ],
        "a 4096-bin job past --max-job-bytes",
    );
    // Growing a job's world grows what its kept steps may list: charged, or refused.
    client
        .create_job(
            "elastic",
            crate::support::spec::with_world(ghm_c(10, 0.75), 2),
        )
        .await
        .expect("a small step-synchronous job");
    let grow = ghmd::proto::UpdateJobRequest {
        job_id: "elastic".to_owned(),
        world_size: 65_536,
        ..Default::default()
    };
    assert_status(
        client.raw().update_job(grow).await,
        Code::ResourceExhausted,
        &["world_size = 65536", "one job may hold (--max-job-bytes)"],
        "a world too large for --max-job-bytes",
    );
    let job = client.get_job("elastic").await.expect("get");
    assert_eq!(job.spec.expect("spec").world_size, 2, "nothing changed");
    client.delete_job("elastic").await.expect("delete");

    let mut created = 0;
    let refusal = loop {
        match client
            .create_job(&format!("mid/{created}"), ghm_c(1024, 0.75))
            .await
        {
            Ok(_) => created += 1,
            Err(status) => break status,
        }
        assert!(created < 100, "never refused");
    };
    assert_status(
        Err::<(), _>(refusal),
        Code::ResourceExhausted,
        &[
            "the server's jobs hold",
            "past the limit (--max-jobs-bytes 1000000)",
        ],
        "the job past --max-jobs-bytes",
    );
    assert!(created > 0);
    assert!(server.registry.jobs_bytes() <= 1_000_000);
    assert_eq!(server.registry.len(), created);
    // Deleting a job gives its bytes back.
    client.delete_job("mid/0").await.expect("delete");
    client
        .create_job("mid/again", ghm_c(1024, 0.75))
        .await
        .expect("room again");
    server.stop().await;
}

/// The flood: 30,000 jobs of 4,096 bins, as fast as one client can make them, against
/// the real binary with a data dir and its default memory bounds (caller quotas lifted, so that
/// the server-wide bound is the one tested). The resident memory must stay under what the
/// README states: --max-jobs-bytes plus the server's own 128 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_jobs_stays_under_the_stated_memory_bound() {
    let dir = TempDir::new("quota-flood");
    let server = Launch::with_data_dir(dir.path())
        .args(&[
            "--caller-max-jobs=1000000",
            "--caller-max-jobs-bytes=100000000000",
            "--snapshot-interval=1s",
        ])
        .start();
    let mut client = Client::connect(server.uri()).await.expect("connect");
    let (mut created, mut refused) = (0u32, 0u32);
    let mut first_refusal = None;
    for n in 0..30_000 {
        match client.create_job(&format!("flood/{n}"), large_job()).await {
            Ok(_) => created += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                first_refusal.get_or_insert(status.message().to_owned());
                refused += 1;
            }
        }
    }
    // Let a snapshot of everything be written, the state file's copies included.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (rss_kib, peak_kib) = server.rss_kib();
    let bound = 1024 * MIB + 128 * MIB;
    println!(
        "flood: {created} created, {refused} refused; RSS {} MiB, peak {} MiB, bound {} MiB",
        rss_kib / 1024,
        peak_kib / 1024,
        bound / MIB
    );
    assert!(refused > 0, "the bound never refused a job");
    assert!(
        first_refusal
            .as_deref()
            .is_some_and(|m| m.contains("--max-jobs-bytes")),
        "{first_refusal:?}"
    );
    assert!(
        peak_kib * 1024 < bound,
        "peak RSS {peak_kib} KiB past the stated bound of {bound} bytes"
    );
    // Other callers are refused too, but the server still serves what exists.
    client
        .get_job("flood/0")
        .await
        .expect("the server still answers");
    server.sigterm().await;
}

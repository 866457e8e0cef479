//! The step barrier's edges over gRPC: a retry from a rank outside the world, and a complete
//! step behind a head step that keeps being retried.

use std::time::{Duration, Instant};

use ghmd::client::Client;
use ghmd::proto::HarmonizeRequest;
use tonic::Code;

use crate::support::request::{histogram, job_state};
use crate::support::{TestServer, assert_status, ghm_c, step_synchronous};

fn rank_request(job_id: &str, step: u64, rank: u32) -> HarmonizeRequest {
    HarmonizeRequest {
        job_id: job_id.to_owned(),
        step,
        rank,
        input: histogram(vec![1, 0, 2, 0, 0, 0, 0, 0, 0, 1], 4.0),
        ..Default::default()
    }
}

async fn send(
    server: &TestServer,
    request: HarmonizeRequest,
) -> tokio::task::JoinHandle<Result<ghmd::proto::HarmonizeResponse, tonic::Status>> {
    let mut client: Client = server.client().await;
    tokio::spawn(async move { client.harmonize(request).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_an_applied_step_from_a_rank_outside_the_world_is_invalid() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let spec = step_synchronous(ghm_c(10, 0.75), 4, Duration::from_secs(30));
    client.create_job("w4", spec).await.expect("create");
    let mut ranks = Vec::new();
    for rank in 0..4 {
        ranks.push(send(&server, rank_request("w4", 0, rank)).await);
    }
    for rank in ranks {
        rank.await.expect("task").expect("step 0 applies");
    }
    assert_status(
        client.harmonize(rank_request("w4", 0, 7)).await,
        Code::InvalidArgument,
        &["rank = 7", "world_size 4", "ranks are 0 to 3"],
        "a retry of step 0 from rank 7 of 4",
    );
    // A rank of the world still gets its kept answer.
    let retry = client
        .harmonize(rank_request("w4", 0, 3))
        .await
        .expect("retry");
    assert_eq!(retry.step, 0);
    assert_eq!(job_state(&mut client, "w4").await.steps, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_step_behind_a_retried_head_ends_at_its_own_timeout() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let timeout = Duration::from_millis(800);
    let spec = step_synchronous(ghm_c(10, 0.75), 2, timeout);
    client.create_job("stuck", spec).await.expect("create");

    // Rank 0 keeps retrying step 0, whose rank 1 never comes: the head is pending again and
    // again, for far longer than step 1's timeout.
    let retrying = {
        let mut client = server.client().await;
        tokio::spawn(async move {
            let mut attempts = 0;
            let start = Instant::now();
            while start.elapsed() < 10 * timeout {
                let status = client
                    .harmonize(rank_request("stuck", 0, 0))
                    .await
                    .expect_err("rank 1 never sends step 0");
                assert_eq!(status.code(), Code::Aborted, "{status:?}");
                attempts += 1;
            }
            attempts
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let later = [
        send(&server, rank_request("stuck", 1, 0)).await,
        send(&server, rank_request("stuck", 1, 1)).await,
    ];
    for rank in later {
        let result = rank.await.expect("task");
        let waited = started.elapsed();
        assert_status(
            result,
            Code::Aborted,
            &[
                "step 1 aborted",
                "step 0 (the job's next step) did not complete",
            ],
            "the complete step 1",
        );
        assert!(
            !retrying.is_finished(),
            "step 1 ended only once the head stopped being retried"
        );
        assert!(
            waited < 3 * timeout,
            "step 1 waited {waited:?}, more than its own step timeout of {timeout:?} allows"
        );
    }
    let attempts = retrying.await.expect("retrying task");
    assert!(attempts >= 5, "{attempts} attempts at the head");
    let state = job_state(&mut client, "stuck").await;
    assert_eq!(
        (state.steps, state.next_step),
        (0, 0),
        "nothing was applied"
    );
    server.stop().await;
}

/// The wide step: 45,000 ranks of a 65,536-rank job of 4,096 bins each send a
/// one-element histogram while the step waits for the rest (the issue measured ~36 KiB per
/// rank: a copy of its bins). What a waiting rank costs the real binary now is mostly its
/// in-flight request (its HTTP/2 stream, tonic's buffers, its task: measured at about 10 KiB),
/// which a rank that vanishes gives back; the step itself keeps 160 bytes and the packed bins
/// (a few bytes: `jobs::step_sum`'s and `jobs::sync`'s unit tests). The ranks wait rather than
/// cancel: 45,000 cancellations are a rapid-reset flood the server answers with GOAWAY, and
/// glibc keeps freed memory (`src/allocator.rs`), so RSS would not show what they gave back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_waiting_on_a_wide_step_hold_no_copy_of_their_bins() {
    const RANKS: u32 = 45_000;
    const PER_CONNECTION: u32 = 250;
    let server = crate::support::binary::Launch::in_memory()
        .args(&[
            "--max-concurrent-requests=70000",
            "--caller-max-concurrent-requests=70000",
        ])
        .start();
    let mut client = Client::connect(server.uri()).await.expect("connect");
    let spec = step_synchronous(ghm_c(4096, 0.75), 65_536, Duration::from_secs(600));
    client.create_job("wide", spec).await.expect("create");
    let mut counts = vec![0u64; 4096];
    counts[4000] = 1;
    let (before_kib, _) = server.rss_kib();

    let mut channels = Vec::new();
    for _ in 0..RANKS.div_ceil(PER_CONNECTION) {
        channels.push(
            tonic::transport::Endpoint::from_shared(server.uri())
                .expect("uri")
                .connect()
                .await
                .expect("connect"),
        );
    }
    let mut ranks = tokio::task::JoinSet::new();
    for rank in 0..RANKS {
        let mut client = Client::from_channel(channels[(rank / PER_CONNECTION) as usize].clone());
        let request = HarmonizeRequest {
            input: histogram(counts.clone(), 1.0),
            ..rank_request("wide", 0, rank)
        };
        ranks.spawn(async move { client.harmonize(request).await });
    }
    // Until the server's memory stops growing for three seconds in a row (one second is not
    // enough on a loaded machine, where the ranks trickle in): every rank has arrived (the
    // deletion below proves it: a rank that had not would get NOT_FOUND, not ABORTED).
    let started = Instant::now();
    let mut last_kib = server.rss_kib().0;
    let mut still = 0;
    while still < 3 && started.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now_kib = server.rss_kib().0;
        still = if now_kib < last_kib + 256 {
            still + 1
        } else {
            0
        };
        last_kib = now_kib;
    }
    let (after_kib, peak_kib) = server.rss_kib();
    let per_rank = (after_kib.saturating_sub(before_kib) * 1024) / u64::from(RANKS);
    println!(
        "waiting ranks: RSS {before_kib} KiB -> {after_kib} KiB (peak {peak_kib} KiB), \
         {per_rank} bytes per rank"
    );
    assert!(
        per_rank < 16 * 1024,
        "{per_rank} bytes per waiting rank of a 4,096-bin job"
    );
    client.delete_job("wide").await.expect("delete");
    while let Some(rank) = ranks.join_next().await {
        assert_eq!(
            rank.expect("task").expect_err("deleted").code(),
            Code::Aborted
        );
    }
    server.sigterm().await;
}

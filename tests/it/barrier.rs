//! The step barrier's edges over gRPC: a retry from a rank outside the world, and a complete
//! step behind a head step that keeps being retried.

use std::time::{Duration, Instant};

use ghmd::client::Client;
use ghmd::proto::HarmonizeRequest;
use tonic::Code;

use crate::support::request::histogram;
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

async fn job_state(client: &mut Client, job_id: &str) -> ghmd::proto::JobState {
    client
        .get_job(job_id)
        .await
        .expect("get")
        .state
        .expect("state")
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

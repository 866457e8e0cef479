//! Every limit an operator sets, through a real server: each refusal names the limit (its flag)
//! and its value, and leaves the server and its jobs as they were.

mod common;
mod ops_support;

use std::time::{Duration, Instant, SystemTime};

use common::TestServer;
use ghmd::client::norms_request;
use ghmd::proto::{self, JobSpec};
use ops_support::{sample, scrape_until};
use tonic::Code;

fn ghm_c(bins: u32) -> JobSpec {
    JobSpec {
        loss: proto::Loss::GhmC.into(),
        bins,
        momentum: 0.75,
        ..Default::default()
    }
}

fn assert_names_limit(status: &tonic::Status, code: Code, flag: &str, value: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(flag) && status.message().contains(value),
        "the refusal does not name {flag} and {value}: {}",
        status.message()
    );
}

#[tokio::test]
async fn max_jobs_refuses_one_more_job_until_one_is_deleted() {
    let server = TestServer::start_with(|config| config.max_jobs = 2).await;
    let mut client = server.client().await;
    client.create_job("a", ghm_c(10)).await.expect("first");
    client.create_job("b", ghm_c(10)).await.expect("second");
    let refused = client.create_job("c", ghm_c(10)).await.expect_err("third");
    assert_names_limit(&refused, Code::ResourceExhausted, "--max-jobs", "2");
    // Creating an existing job again is no new job: every rank may still call it.
    client.create_job("a", ghm_c(10)).await.expect("idempotent");
    client.delete_job("a").await.expect("delete");
    client.create_job("c", ghm_c(10)).await.expect("room again");
    let error = client.get_job("a").await.expect_err("deleted");
    assert_eq!(error.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn max_jobs_holds_under_concurrent_creates() {
    const LIMIT: u64 = 20;
    let server = TestServer::start_with(|config| config.max_jobs = LIMIT).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            client
                .create_job(&format!("job-{i}"), ghm_c(4))
                .await
                .is_ok()
        }));
    }
    let mut created = 0;
    for task in tasks {
        created += u64::from(task.await.expect("task"));
    }
    assert_eq!(created, LIMIT);
    assert_eq!(server.registry.len() as u64, LIMIT);
    server.stop().await;
}

#[tokio::test]
async fn max_elements_per_request_refuses_a_larger_batch_before_its_step() {
    let server = TestServer::start_with(|config| config.max_elements_per_request = 100).await;
    let mut client = server.client().await;
    client.create_job("c", ghm_c(10)).await.expect("create");
    let refused = client
        .harmonize_norms("c", 0, 0, &[0.5; 101], None)
        .await
        .expect_err("101 elements");
    assert_names_limit(
        &refused,
        Code::ResourceExhausted,
        "--max-elements-per-request",
        "100",
    );
    assert!(
        refused
            .message()
            .contains("gradient_norms has 101 elements")
    );
    let state = client
        .get_job("c")
        .await
        .expect("get")
        .state
        .expect("state");
    assert_eq!(state.steps, 0, "the refused batch was not applied");

    // Residuals of a GHM-R job, and a message on a stream, meet the same limit.
    let ghm_r = JobSpec {
        loss: proto::Loss::GhmR.into(),
        ..ghm_c(10)
    };
    client.create_job("r", ghm_r).await.expect("create");
    let residuals = proto::HarmonizeRequest {
        job_id: "r".into(),
        input: Some(proto::harmonize_request::Input::Residuals(
            ghmd::client::f32s_to_bytes(&[0.1; 150]),
        )),
        ..Default::default()
    };
    let refused = client
        .harmonize(residuals)
        .await
        .expect_err("150 residuals");
    assert_names_limit(
        &refused,
        Code::ResourceExhausted,
        "--max-elements-per-request",
        "100",
    );
    assert!(refused.message().contains("residuals has 150 elements"));
    let stream = tokio_stream::iter(vec![norms_request("c", 0, 0, &[0.5; 200], None)]);
    let mut responses = client
        .raw()
        .harmonize_stream(stream)
        .await
        .expect("stream")
        .into_inner();
    let refused = responses.message().await.expect_err("200 on a stream");
    assert_names_limit(
        &refused,
        Code::ResourceExhausted,
        "--max-elements-per-request",
        "100",
    );
    // Exactly the limit passes.
    let (_, weights) = client
        .harmonize_norms("c", 0, 0, &[0.5; 100], None)
        .await
        .expect("100 elements");
    assert_eq!(weights.len(), 100);
    server.stop().await;
}

#[tokio::test]
async fn max_pending_steps_refuses_a_step_beyond_the_cap() {
    let server = TestServer::start_with(|config| config.max_pending_steps = 2).await;
    let mut client = server.client().await;
    let spec = JobSpec {
        world_size: 2,
        step_timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        ..ghm_c(10)
    };
    client.create_job("s", spec).await.expect("create");
    // Rank 0 sends steps 0 and 1; both wait for rank 1.
    let mut waiting = Vec::new();
    for step in 0..2 {
        let mut rank0 = server.client().await;
        waiting.push(tokio::spawn(async move {
            rank0.harmonize_norms("s", step, 0, &[0.5], None).await
        }));
    }
    // Give both requests time to arrive (loopback: well under a millisecond each).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = client
        .harmonize_norms("s", 2, 0, &[0.5], None)
        .await
        .expect_err("a third pending step");
    assert_names_limit(
        &refused,
        Code::ResourceExhausted,
        "--max-pending-steps",
        "2",
    );
    // Rank 1 completes both steps; the waiting requests are answered.
    for step in 0..2 {
        client
            .harmonize_norms("s", step, 1, &[0.25], None)
            .await
            .expect("rank 1");
    }
    for task in waiting {
        task.await.expect("task").expect("rank 0 answered");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_message_above_the_receive_limit_names_the_limit() {
    const LIMIT: usize = 1 << 16;
    let server = TestServer::start_with(|config| config.max_recv_message_bytes = LIMIT).await;
    let mut client = server.client().await;
    client.create_job("m", ghm_c(10)).await.expect("create");
    let refused = client
        .harmonize_norms("m", 0, 0, &vec![0.5; LIMIT / 4 + 16], None)
        .await
        .expect_err("too large");
    // tonic's own refusal: it gives the limit in bytes.
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().contains(&LIMIT.to_string()),
        "{refused:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn jobs_idle_longer_than_the_ttl_are_reaped_and_busy_ones_kept() {
    let server = TestServer::start_with(|config| config.job_ttl = Duration::from_millis(400)).await;
    let mut client = server.client().await;
    client.create_job("idle", ghm_c(10)).await.expect("create");
    client.create_job("busy", ghm_c(10)).await.expect("create");
    let started = Instant::now();
    let mut step = 0;
    loop {
        // "busy" gets a step every 100 ms: never idle for 400 ms.
        client
            .harmonize_norms("busy", step, 0, &[0.5], None)
            .await
            .expect("busy stays");
        step += 1;
        if client.get_job("idle").await.is_err() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the idle job was never reaped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not before its TTL.
    assert!(started.elapsed() >= Duration::from_millis(400));
    client.get_job("busy").await.expect("the busy job is kept");
    let text = scrape_until(server.metrics_addr, |text| {
        sample(text, "ghmd_jobs_reaped_total", &[]) == Some(1.0)
    })
    .await;
    assert_eq!(sample(&text, "ghmd_jobs_reaped_total", &[]), Some(1.0));
    assert_eq!(sample(&text, "ghmd_jobs", &[("loss", "ghm_c")]), Some(1.0));
    server.stop().await;
}

#[tokio::test]
async fn a_step_synchronous_job_waiting_for_ranks_is_not_idle() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let spec = JobSpec {
        world_size: 2,
        step_timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        ..ghm_c(10)
    };
    client.create_job("waiting", spec).await.expect("create");
    client.create_job("idle", ghm_c(10)).await.expect("create");
    let mut rank0 = server.client().await;
    let pending =
        tokio::spawn(async move { rank0.harmonize_norms("waiting", 0, 0, &[0.5], None).await });
    // Give rank 0's request time to arrive (loopback: well under a millisecond), then look a
    // day into the future: only the job nobody is using goes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = SystemTime::now() + Duration::from_secs(86_400);
    let reaped = server.registry.reap_idle(Duration::from_secs(3600), later);
    assert_eq!(reaped, vec!["idle".to_owned()]);
    client.get_job("waiting").await.expect("kept");
    client
        .harmonize_norms("waiting", 0, 1, &[0.5], None)
        .await
        .expect("rank 1");
    pending.await.expect("task").expect("rank 0");
    server.stop().await;
}

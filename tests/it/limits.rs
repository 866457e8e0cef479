//! Every limit an operator sets, through a real server: each refusal names the limit (its flag)
//! and its value, and leaves the server and its jobs as they were.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ghmd::client::norms_request;
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{self, GetJobRequest, Job};
use tonic::Code;

use crate::support::fixture::{JOBS, fingerprint, snapshot, still_serving, three_jobs};
use crate::support::http::{sample, scrape_until};
use crate::support::request::{norms, request, residuals};
use crate::support::{TestServer, assert_status, ghm_c, ghm_r, step_synchronous};

/// The refusal names the limit by its flag and its value.
fn assert_names_limit(status: &tonic::Status, code: Code, flag: &str, value: &str) {
    assert_status(
        Err::<(), _>(status.clone()),
        code,
        &[flag, value],
        "the refusal names its limit",
    );
}

#[tokio::test]
async fn max_jobs_refuses_one_more_job_until_one_is_deleted() {
    let server = TestServer::start_with(|config| config.max_jobs = 2).await;
    let mut client = server.client().await;
    client
        .create_job("a", ghm_c(10, 0.75))
        .await
        .expect("first");
    client
        .create_job("b", ghm_c(10, 0.75))
        .await
        .expect("second");
    let refused = client
        .create_job("c", ghm_c(10, 0.75))
        .await
        .expect_err("third");
    assert_names_limit(&refused, Code::ResourceExhausted, "--max-jobs", "2");
    // Creating an existing job again is no new job: every rank may still call it.
    client
        .create_job("a", ghm_c(10, 0.75))
        .await
        .expect("idempotent");
    client.delete_job("a").await.expect("delete");
    client
        .create_job("c", ghm_c(10, 0.75))
        .await
        .expect("room again");
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
                .create_job(&format!("job-{i}"), ghm_c(4, 0.75))
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
    client
        .create_job("c", ghm_c(10, 0.75))
        .await
        .expect("create");
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
    client
        .create_job("r", ghm_r(10, 0.75))
        .await
        .expect("create");
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
    let spec = step_synchronous(ghm_c(10, 0.75), 2, Duration::from_secs(30));
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

/// One test of the receive limit, in each place a message meets it: a unary call, a stream
/// message, and the headers. Each refusal leaves every job as it was, and just under the limit
/// still passes on the same connection.
#[tokio::test]
async fn a_message_above_the_receive_limit_is_refused_naming_the_limit_and_the_server_carries_on() {
    const LIMIT: usize = 1 << 20;
    let server = TestServer::start_with(|config| config.max_recv_message_bytes = LIMIT).await;
    let mut client = server.client().await;
    three_jobs(&mut client).await;
    let before = snapshot(&mut client).await;

    // A unary call: tonic's own refusal, which gives the limit in bytes.
    let too_many = vec![0.5f32; LIMIT / 4 + 1];
    let refused = client
        .harmonize_norms(JOBS[0], 0, 0, &too_many, None)
        .await
        .expect_err("a message above the limit");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().contains(&LIMIT.to_string()),
        "{refused:?}"
    );
    assert_eq!(
        snapshot(&mut client).await,
        before,
        "the refusal changed a job"
    );

    // Just under the limit still passes, on the same connection.
    let fits = vec![0.5f32; (LIMIT - 64) / 4];
    let (response, weights) = client
        .harmonize_norms(JOBS[0], 1, 0, &fits, None)
        .await
        .expect("a message under the limit");
    assert_eq!(weights.len(), fits.len());
    assert_eq!(response.nonempty_bins, 1);
    let state = |jobs: &[Job]| {
        let state = jobs[0].state.clone().expect("state");
        (state.steps, state.elements)
    };
    let (steps, elements) = state(&before);
    assert_eq!(
        state(&snapshot(&mut client).await),
        (steps + 1, elements + fits.len() as u64),
        "only the message that fit was applied"
    );
    let before = snapshot(&mut client).await;

    // On a stream: the big message ends the stream; the one before it was applied, the one
    // after it never is.
    let mut responses = client
        .raw()
        .harmonize_stream(tokio_stream::iter(vec![
            norms_request(JOBS[0], 2, 0, &[0.5], None),
            norms_request(JOBS[0], 3, 0, &too_many, None),
            norms_request(JOBS[0], 4, 0, &[0.5], None),
        ]))
        .await
        .expect("stream")
        .into_inner();
    let first = responses
        .message()
        .await
        .expect("first")
        .expect("a response");
    assert_eq!(first.step, 2);
    let status = responses
        .message()
        .await
        .expect_err("the big message ends the stream");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    let after = snapshot(&mut client).await;
    assert_eq!(after[1..], before[1..]);
    assert_eq!(
        after[0].state.as_ref().map(|s| s.steps),
        before[0].state.as_ref().map(|s| s.steps + 1),
        "only the first message"
    );

    // Metadata far past HTTP/2's header limit: refused, and the server carries on.
    let mut request = tonic::Request::new(GetJobRequest {
        job_id: JOBS[0].to_owned(),
    });
    let big_value: tonic::metadata::MetadataValue<_> = "v".repeat(1 << 20).parse().expect("value");
    request.metadata_mut().insert("x-padding", big_value);
    let mut fresh = server.client().await;
    assert!(
        fresh.raw().get_job(request).await.is_err(),
        "1 MiB of headers was accepted"
    );
    still_serving(&server).await;
    server.stop().await;
}

/// A request that fits the receive limit but whose weights would not fit the send limit used to
/// be applied and then fail in the encoder, leaving the job changed behind an error. It must be
/// refused before the step, and the element count the refusal advises must go through.
#[tokio::test]
async fn a_request_whose_response_cannot_fit_is_refused_before_its_step() {
    const SEND_LIMIT: usize = 2 << 20;
    let server = TestServer::start_with(|config| {
        config.max_recv_message_bytes = 4 << 20;
        config.max_send_message_bytes = SEND_LIMIT;
    })
    .await;
    let mut client = server.client().await;
    client
        .create_job("send-limit", ghm_r(10, 0.75))
        .await
        .expect("create");
    client
        .harmonize_norms("send-limit", 0, 0, &[0.5, 5.0], None)
        .await
        .expect("a first step");
    let before = fingerprint(&mut client, "send-limit").await;

    let too_many = vec![0.25f32; SEND_LIMIT / 4];
    for input in [norms(&too_many), residuals(&too_many)] {
        let field = match &input {
            Some(Input::Residuals(_)) => "residuals",
            _ => "gradient_norms",
        };
        let result = client
            .harmonize(request("send-limit", input, Bytes::new()))
            .await;
        assert_status(
            result,
            Code::ResourceExhausted,
            &[field, "--max-send-message-bytes"],
            "weights above the send limit",
        );
        assert_eq!(fingerprint(&mut client, "send-limit").await, before);
    }

    // The refusal says how many elements fit; that many do, and the response is complete.
    let status = client
        .harmonize_norms("send-limit", 1, 0, &too_many, None)
        .await
        .expect_err("refused");
    let advised: usize = status
        .message()
        .split("send at most ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no advice in {:?}", status.message()));
    assert!(advised > SEND_LIMIT / 8, "advises only {advised} elements");
    let fits = vec![0.25f32; advised];
    let (response, weights) = client
        .harmonize_norms("send-limit", 1, 0, &fits, None)
        .await
        .expect("the advised element count");
    assert_eq!(weights.len(), advised);
    assert_eq!(response.acc_sum.len(), 10);
    let refused = client
        .harmonize_norms("send-limit", 2, 0, &vec![0.25f32; advised + 1], None)
        .await;
    assert_status(
        refused,
        Code::ResourceExhausted,
        &["gradient_norms"],
        "one more",
    );
    let after = fingerprint(&mut client, "send-limit").await;
    assert_eq!(after.steps, before.steps + 1);
    server.stop().await;
}

#[tokio::test]
async fn jobs_idle_longer_than_the_ttl_are_reaped_and_busy_ones_kept() {
    let server = TestServer::start_with(|config| config.job_ttl = Duration::from_millis(400)).await;
    let mut client = server.client().await;
    client
        .create_job("idle", ghm_c(10, 0.75))
        .await
        .expect("create");
    client
        .create_job("busy", ghm_c(10, 0.75))
        .await
        .expect("create");
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
    let spec = step_synchronous(ghm_c(10, 0.75), 2, Duration::from_secs(30));
    client.create_job("waiting", spec).await.expect("create");
    client
        .create_job("idle", ghm_c(10, 0.75))
        .await
        .expect("create");
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

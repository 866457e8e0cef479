//! Faults under load: back-pressure past the concurrency limit, a worker killed in the middle of
//! sending its step, a worker that disconnects while it waits. The other workers get the
//! documented status, never a hang, and no acknowledged step is lost or applied twice.

mod common;

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::{TestServer, bits};
use ghmd::client::{Client, norms_request};
use ghmd::proto::{HarmonizeResponse, JobSpec, Loss};
use tonic::Code;

/// Every wait in this file is bounded: a hang is a failure, not a stuck CI run.
const NO_HANG: Duration = Duration::from_secs(60);

fn spec(world_size: u32, step_timeout: Duration) -> JobSpec {
    JobSpec {
        loss: Loss::GhmC.into(),
        bins: 10,
        momentum: 0.75,
        world_size,
        step_timeout: Some(prost_types::Duration {
            seconds: step_timeout.as_secs() as i64,
            nanos: step_timeout.subsec_nanos() as i32,
        }),
        ..Default::default()
    }
}

fn shard(rank: u32) -> Vec<f32> {
    (0..50 + rank * 7)
        .map(|i| ((i * 37 + rank * 11) % 100) as f32 / 100.0)
        .collect()
}

async fn bounded<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(NO_HANG, future)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// The state one process would have after weighing the concatenation of `shards` once: an
/// asynchronous job fed the global batch.
async fn reference(client: &mut Client, job_id: &str, shards: &[Vec<f32>]) -> HarmonizeResponse {
    client
        .create_job(job_id, spec(1, Duration::from_secs(60)))
        .await
        .expect("reference job");
    let global: Vec<f32> = shards.concat();
    client
        .harmonize_norms(job_id, 0, 0, &global, None)
        .await
        .expect("reference step")
        .0
}

// ---------------------------------------------------------------------------------------------
// Back-pressure.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_concurrency_limit_requests_are_refused_at_once_not_queued() {
    const LIMIT: u32 = 4;
    const TIMEOUT: Duration = Duration::from_secs(3);
    let server = TestServer::start_with(|config| config.max_concurrent_requests = LIMIT).await;
    let mut client = server.client().await;
    client
        .create_job("bp/job", spec(2, TIMEOUT))
        .await
        .expect("create");

    // LIMIT requests of rank 0 wait for a rank 1 that never comes: every permit is taken.
    let started = Instant::now();
    let mut blocked = Vec::new();
    for step in 0..u64::from(LIMIT) {
        let mut rank0 = server.client().await;
        blocked.push(tokio::spawn(async move {
            rank0.harmonize_norms("bp/job", step, 0, &[0.5], None).await
        }));
    }
    // Wait until the server holds all of them (the last spawned may still be on its way).
    let refusal = loop {
        match client.get_job("bp/job").await {
            Err(status) if status.code() == Code::ResourceExhausted => break status,
            Ok(_) => {
                assert!(
                    started.elapsed() < TIMEOUT,
                    "the blocked requests never filled the limit"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(status) => panic!("unexpected {status:?}"),
        }
    };
    assert!(
        refusal.message().contains("--max-concurrent-requests"),
        "{refusal:?}"
    );
    // Refused while the blocked requests still wait: the refusal did not queue behind them.
    assert!(blocked.iter().all(|task| !task.is_finished()));
    let refused_at = Instant::now();
    for _ in 0..20 {
        let status = client
            .harmonize_norms("bp/job", 9, 1, &[0.5], None)
            .await
            .expect_err("past the limit");
        assert_eq!(status.code(), Code::ResourceExhausted);
        let stream = client
            .raw()
            .harmonize_stream(tokio_stream::iter(vec![norms_request(
                "bp/job",
                9,
                1,
                &[0.5],
                None,
            )]))
            .await;
        match stream {
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
            Ok(response) => {
                let mut inner = response.into_inner();
                let status = inner.message().await.expect_err("a stream past the limit");
                assert_eq!(status.code(), Code::ResourceExhausted);
            }
        }
    }
    assert!(
        blocked.iter().all(|task| !task.is_finished()),
        "the refusals waited for the blocked requests to end ({:?})",
        refused_at.elapsed()
    );

    // Health is not counted: a probe sees the busy server as alive.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health past the limit");

    // The blocked requests end with the documented ABORTED, their permits come back, and the
    // job took no step.
    for task in blocked {
        let status = bounded("a blocked request", task)
            .await
            .expect("task")
            .expect_err("no rank 1");
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
    }
    let job = bounded("GetJob", async {
        loop {
            match client.get_job("bp/job").await {
                Ok(job) => break job,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    let state = job.state.expect("state");
    assert_eq!((state.steps, state.next_step), (0, 0));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Workers that die.

/// A worker process killed halfway through sending its request: the headers and part of one
/// gRPC frame go out, then the connection dies.
async fn killed_mid_request(server: &TestServer, job_id: &str, step: u64, rank: u32) {
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (send, connection) = h2::client::handshake(tcp).await.expect("h2");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await.expect("ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/ghm.v1.Harmonizer/Harmonize",
            server.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (_response, mut body) = send.send_request(request, false).expect("send");
    let message =
        prost::Message::encode_to_vec(&norms_request(job_id, step, rank, &shard(rank), None));
    let mut frame = BytesMut::new();
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.put_slice(&message[..message.len() / 2]);
    body.send_data(Bytes::from(frame), false)
        .expect("half a request");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The process dies: its connection goes with it.
    driver.abort();
    drop((send, body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_step_costs_the_others_one_timeout_and_the_step_applies_once_on_retry()
{
    const TIMEOUT: Duration = Duration::from_secs(2);
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("kill/job", spec(3, TIMEOUT))
        .await
        .expect("create");
    let shards: Vec<Vec<f32>> = (0..3).map(shard).collect();

    let survivors: Vec<_> = (0..2u32)
        .map(|rank| {
            let uri = server.uri();
            let norms = shards[rank as usize].clone();
            tokio::spawn(async move {
                let mut worker = Client::connect(uri).await.expect("connect");
                let started = Instant::now();
                let result = worker
                    .harmonize_norms("kill/job", 0, rank, &norms, None)
                    .await;
                (result, started.elapsed())
            })
        })
        .collect();
    killed_mid_request(&server, "kill/job", 0, 2).await;

    for task in survivors {
        let (result, waited) = bounded("a surviving rank", task).await.expect("task");
        let status = result.expect_err("rank 2 never sent step 0");
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        assert!(status.message().contains("rank(s) 2"), "{status:?}");
        assert!(
            waited >= TIMEOUT - Duration::from_millis(100),
            "aborted after {waited:?}"
        );
    }
    let state = client
        .get_job("kill/job")
        .await
        .expect("get")
        .state
        .expect("state");
    assert_eq!((state.steps, state.next_step), (0, 0), "nothing applied");

    // The restarted worker and the others send step 0 again: it applies once, as one process
    // would have weighed the global batch.
    let mut tasks = Vec::new();
    for rank in 0..3u32 {
        let uri = server.uri();
        let norms = shards[rank as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut worker = Client::connect(uri).await.expect("connect");
            worker
                .harmonize_norms("kill/job", 0, rank, &norms, None)
                .await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(
            bounded("the retried step", task)
                .await
                .expect("task")
                .expect("applied")
                .0,
        );
    }
    let expected = reference(&mut client, "kill/reference", &shards).await;
    for answer in &answers {
        assert_eq!(bits(&answer.bin_weights), bits(&expected.bin_weights));
        assert_eq!(bits(&answer.acc_sum), bits(&expected.acc_sum));
    }
    let state = client
        .get_job("kill/job")
        .await
        .expect("get")
        .state
        .expect("state");
    assert_eq!((state.steps, state.next_step), (1, 1));
    assert_eq!(bits(&state.acc_sum), bits(&expected.acc_sum));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_disconnects_while_waiting_keeps_its_contribution_and_its_retry_is_not_applied_twice()
 {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("gone/job", spec(3, Duration::from_secs(30)))
        .await
        .expect("create");
    let shards: Vec<Vec<f32>> = (0..3).map(shard).collect();

    // Rank 0 sends step 0 and waits; its connection then dies (the client drops the call and
    // its channel).
    {
        let mut rank0 = Client::connect(server.uri()).await.expect("connect");
        let call = rank0.harmonize_norms("gone/job", 0, 0, &shards[0], None);
        let waited = tokio::time::timeout(Duration::from_millis(500), call).await;
        assert!(
            waited.is_err(),
            "step 0 cannot complete without ranks 1 and 2"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The others arrive: the step completes with rank 0's contribution, and they are answered.
    let mut tasks = Vec::new();
    for rank in 1..3u32 {
        let uri = server.uri();
        let norms = shards[rank as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut worker = Client::connect(uri).await.expect("connect");
            worker
                .harmonize_norms("gone/job", 0, rank, &norms, None)
                .await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(
            bounded("ranks 1 and 2", task)
                .await
                .expect("task")
                .expect("applied")
                .0,
        );
    }
    let expected = reference(&mut client, "gone/reference", &shards).await;
    for answer in &answers {
        assert_eq!(
            bits(&answer.acc_sum),
            bits(&expected.acc_sum),
            "rank 0's batch counted"
        );
    }

    // Rank 0 reconnects and retries step 0: the stored answer, not a second application.
    let mut rank0 = Client::connect(server.uri()).await.expect("reconnect");
    let (retry, weights) = bounded(
        "the retry",
        rank0.harmonize_norms("gone/job", 0, 0, &shards[0], None),
    )
    .await
    .expect("the retry is answered");
    assert_eq!(bits(&retry.bin_weights), bits(&answers[0].bin_weights));
    assert_eq!(bits(&retry.acc_sum), bits(&expected.acc_sum));
    assert_eq!(weights.len(), shards[0].len());
    let state = client
        .get_job("gone/job")
        .await
        .expect("get")
        .state
        .expect("state");
    assert_eq!(
        (state.steps, state.next_step),
        (1, 1),
        "applied exactly once"
    );
    assert_eq!(
        state.elements,
        shards.iter().map(|s| s.len() as u64).sum::<u64>()
    );

    // A stream that dies while waiting behaves the same: the next step goes through.
    {
        let mut rank0 = Client::connect(server.uri()).await.expect("connect");
        let (requests, inbound) = tokio::sync::mpsc::channel(1);
        let mut responses = rank0
            .raw()
            .harmonize_stream(tokio_stream::wrappers::ReceiverStream::new(inbound))
            .await
            .expect("stream")
            .into_inner();
        requests
            .send(norms_request("gone/job", 1, 0, &shards[0], None))
            .await
            .expect("send");
        let waited = tokio::time::timeout(Duration::from_millis(300), responses.message()).await;
        assert!(waited.is_err(), "step 1 cannot complete yet");
    }
    let mut tasks = Vec::new();
    for rank in 1..3u32 {
        let uri = server.uri();
        let norms = shards[rank as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut worker = Client::connect(uri).await.expect("connect");
            worker
                .harmonize_norms("gone/job", 1, rank, &norms, None)
                .await
        }));
    }
    for task in tasks {
        bounded("step 1", task)
            .await
            .expect("task")
            .expect("applied");
    }
    let state = client
        .get_job("gone/job")
        .await
        .expect("get")
        .state
        .expect("state");
    assert_eq!((state.steps, state.next_step), (2, 2));
    server.stop().await;
}

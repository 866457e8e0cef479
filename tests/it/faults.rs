//! Faults under load: back-pressure past the concurrency limit, a worker killed in the middle of
//! sending its step, a worker that disconnects while it waits, a server restarted in the middle
//! of a job. The other workers get the documented status, never a hang, and no acknowledged
//! step is lost or applied twice.

use std::time::{Duration, Instant};

use ghmd::client::{Client, norms_request};
use ghmd::proto::HarmonizeResponse;
use tonic::Code;

use crate::support::wire::{frame, grpc_request, h2_connect};
use crate::support::{Ghmd, TempDir, TestServer, bits, ghm_c, step_synchronous};

/// Every wait in this file is bounded: a hang is a failure, not a stuck CI run.
const NO_HANG: Duration = Duration::from_secs(60);

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

/// The ranks of `ranks` send their shard of `step` at once, each on its own connection, as
/// separate worker processes would: their answers, each bounded in time and applied.
async fn ranks_apply(
    uri: &str,
    job_id: &str,
    step: u64,
    shards: &[Vec<f32>],
    ranks: std::ops::Range<u32>,
    what: &str,
) -> Vec<HarmonizeResponse> {
    let mut tasks = Vec::new();
    for rank in ranks {
        let (uri, job_id) = (uri.to_owned(), job_id.to_owned());
        let norms = shards[rank as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut worker = Client::connect(uri).await.expect("connect");
            worker
                .harmonize_norms(&job_id, step, rank, &norms, None)
                .await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(bounded(what, task).await.expect("task").expect("applied").0);
    }
    answers
}

/// The state one process would have after weighing the concatenation of `shards` once: an
/// asynchronous job fed the global batch.
async fn reference(client: &mut Client, job_id: &str, shards: &[Vec<f32>]) -> HarmonizeResponse {
    client
        .create_job(
            job_id,
            step_synchronous(ghm_c(10, 0.75), 1, Duration::from_secs(60)),
        )
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
    // Long enough that the blocked requests are still waiting on a loaded machine when the
    // refusals are checked.
    const TIMEOUT: Duration = Duration::from_secs(10);
    let server = TestServer::start_with(|config| config.max_concurrent_requests = LIMIT).await;
    let mut client = server.client().await;
    client
        .create_job("bp/job", step_synchronous(ghm_c(10, 0.75), 2, TIMEOUT))
        .await
        .expect("create");

    // LIMIT requests of rank 0 wait for a rank 1 that never comes: every permit is taken.
    let mut blocked = Vec::new();
    for step in 0..u64::from(LIMIT) {
        let mut rank0 = server.client().await;
        // The probe below may hold a permit for a moment as a blocker arrives: a refused
        // blocker tries again, as a real client backing off would.
        blocked.push(tokio::spawn(async move {
            loop {
                match rank0.harmonize_norms("bp/job", step, 0, &[0.5], None).await {
                    Err(status) if status.code() == Code::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    result => return result,
                }
            }
        }));
    }
    // Wait until the server holds all of them (the last spawned may still be on its way).
    let started = Instant::now();
    let refusal = loop {
        match client.get_job("bp/job").await {
            Err(status) if status.code() == Code::ResourceExhausted => break status,
            Ok(_) => {
                if let Some(done) = blocked.iter().position(|task| task.is_finished()) {
                    let result = blocked.swap_remove(done).await;
                    panic!("a blocked request ended before the limit filled: {result:?}");
                }
                assert!(started.elapsed() < NO_HANG, "the limit never filled");
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
    let (send, driver) = h2_connect(server.addr, None).await;
    let mut send = send.ready().await.expect("ready");
    let request = grpc_request(
        server.addr,
        "/ghm.v1.Harmonizer/Harmonize",
        "application/grpc",
    );
    let (_response, mut body) = send.send_request(request, false).expect("send");
    let message =
        prost::Message::encode_to_vec(&norms_request(job_id, step, rank, &shard(rank), None));
    let half = frame(false, message.len() as u32, &message[..message.len() / 2]);
    body.send_data(half.freeze(), false)
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
        .create_job("kill/job", step_synchronous(ghm_c(10, 0.75), 3, TIMEOUT))
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
    let answers = ranks_apply(
        &server.uri(),
        "kill/job",
        0,
        &shards,
        0..3,
        "the retried step",
    )
    .await;
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
        .create_job(
            "gone/job",
            step_synchronous(ghm_c(10, 0.75), 3, Duration::from_secs(30)),
        )
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
    let answers = ranks_apply(&server.uri(), "gone/job", 0, &shards, 1..3, "ranks 1 and 2").await;
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
    ranks_apply(&server.uri(), "gone/job", 1, &shards, 1..3, "step 1").await;
    let state = client
        .get_job("gone/job")
        .await
        .expect("get")
        .state
        .expect("state");
    assert_eq!((state.steps, state.next_step), (2, 2));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// A server restart in the middle of a job (the real binary, with its data dir).

/// `ghmd serve` with a data dir where only the snapshot at shutdown counts: a restart must
/// not need a lucky timer.
fn start_ghmd(data_dir: &TempDir) -> Ghmd {
    Ghmd::start(
        data_dir.path(),
        &["--snapshot-interval", "1h", "--shutdown-grace", "20s"],
    )
}

/// SIGTERM, then a clean exit.
async fn stop_ghmd(ghmd: Ghmd) {
    let (status, log) = bounded("ghmd's exit after SIGTERM", ghmd.sigterm()).await;
    assert!(status.success(), "ghmd exited with {status}:\n{log}");
}

fn step_shards(step: u64) -> Vec<Vec<f32>> {
    (0..2).map(|rank| shard(rank + 10 * step as u32)).collect()
}

async fn both_ranks(uri: &str, job_id: &str, step: u64) -> Vec<HarmonizeResponse> {
    ranks_apply(uri, job_id, step, &step_shards(step), 0..2, "a step").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_a_job_loses_no_acknowledged_step_and_applies_none_twice() {
    let data_dir = TempDir::new("faults-restart");
    let first = start_ghmd(&data_dir);
    let mut client = Client::connect(first.uri()).await.expect("connect");
    client
        .create_job(
            "restart/sync",
            step_synchronous(ghm_c(10, 0.75), 2, Duration::from_secs(3)),
        )
        .await
        .expect("create");
    client
        .create_job(
            "restart/async",
            step_synchronous(ghm_c(10, 0.75), 1, Duration::from_secs(3)),
        )
        .await
        .expect("create");
    for step in 0..3 {
        both_ranks(&first.uri(), "restart/sync", step).await;
        client
            .harmonize_norms("restart/async", step, 0, &shard(step as u32), None)
            .await
            .expect("async step");
    }
    // Rank 0 sends step 3 and waits for rank 1, which has not sent it when the server stops.
    let waiting = {
        let (uri, norms) = (first.uri(), step_shards(3).swap_remove(0));
        tokio::spawn(async move {
            let mut worker = Client::connect(uri).await.expect("connect");
            worker
                .harmonize_norms("restart/sync", 3, 0, &norms, None)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_ghmd(first).await;
    let status = bounded("the request waiting across the stop", waiting)
        .await
        .expect("task")
        .expect_err("step 3 never completed");
    assert!(
        matches!(status.code(), Code::Aborted | Code::Unavailable),
        "{status:?}"
    );

    let second = start_ghmd(&data_dir);
    let mut client = Client::connect(second.uri()).await.expect("connect");
    // Every acknowledged step is there, bit for bit what one process would hold.
    let mut reference = Client::connect(second.uri()).await.expect("connect");
    reference
        .create_job(
            "restart/reference",
            step_synchronous(ghm_c(10, 0.75), 1, Duration::from_secs(3)),
        )
        .await
        .expect("reference");
    let mut expected = Vec::new();
    for step in 0..3 {
        expected = reference
            .harmonize_norms(
                "restart/reference",
                step,
                0,
                &step_shards(step).concat(),
                None,
            )
            .await
            .expect("reference step")
            .0
            .acc_sum;
    }
    let state = client
        .get_job("restart/sync")
        .await
        .expect("get")
        .state
        .expect("state");
    assert_eq!((state.steps, state.next_step), (3, 3));
    assert_eq!(bits(&state.acc_sum), bits(&expected));
    let state = client
        .get_job("restart/async")
        .await
        .expect("get")
        .state
        .expect("state");
    assert_eq!(state.steps, 3);

    // A late retry of an applied step is refused, not applied again.
    let status = client
        .harmonize_norms("restart/sync", 2, 1, &step_shards(2)[1], None)
        .await
        .expect_err("step 2 was applied before the restart");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // The interrupted step, sent again by both ranks, applies once.
    let answers = both_ranks(&second.uri(), "restart/sync", 3).await;
    let expected = reference
        .harmonize_norms("restart/reference", 3, 0, &step_shards(3).concat(), None)
        .await
        .expect("reference step")
        .0;
    for answer in &answers {
        assert_eq!(bits(&answer.acc_sum), bits(&expected.acc_sum));
        assert_eq!(bits(&answer.bin_weights), bits(&expected.bin_weights));
    }
    let state = client
        .get_job("restart/sync")
        .await
        .expect("get")
        .state
        .expect("state");
    assert_eq!((state.steps, state.next_step), (4, 4));
    stop_ghmd(second).await;
}

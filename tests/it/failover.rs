//! The real ghmd binary killed with real signals: a SIGTERM with open streams (they end at a
//! message boundary with UNAVAILABLE, and the replica exits without waiting out its grace), and
//! a single server killed with -9 and restarted behind its clients, whose HealingSessions go on
//! with no acknowledged step lost and every weight equal to a never-failing server's.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::binary::Launch;
use crate::support::lineage::{counts, histogram_request, spec_with_timeout};
use crate::support::{TempDir, TestServer, bits};
use ghmd::client::{HealingOptions, HealingSession, job_request};
use ghmd::proto::{HarmonizeRequest, HarmonizeResponse};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// A HarmonizeStream fed by hand: requests go in when the test says.
struct OpenStream {
    requests: mpsc::Sender<HarmonizeRequest>,
    responses: tonic::Streaming<HarmonizeResponse>,
}

async fn open_stream(uri: &str, job_id: &str) -> OpenStream {
    let mut client = ghmd::client::Client::connect(uri.to_owned())
        .await
        .expect("connect");
    let (requests, inbound) = mpsc::channel(4);
    let responses = client
        .raw()
        .harmonize_stream(job_request(job_id, ReceiverStream::new(inbound)))
        .await
        .expect("stream opens")
        .into_inner();
    OpenStream {
        requests,
        responses,
    }
}

#[tokio::test]
async fn sigterm_ends_open_streams_at_a_message_boundary_and_exits_without_the_grace() {
    let dir = TempDir::new("sigterm-streams");
    let replica = Launch::with_data_dir(dir.path())
        .port(0)
        .args(&["--shutdown-grace", "20s"])
        .start();
    let uri = replica.uri();
    let mut client = ghmd::client::Client::connect(uri.clone())
        .await
        .expect("connect");
    client
        .create_job("drain/idle", spec_with_timeout(1, 60_000, false))
        .await
        .expect("create");
    // A step-synchronous job whose rank 1 has not sent step 0 yet: once the replica drains, no
    // rank can reach it, so the step would wait its whole step timeout (60 s) for nothing.
    client
        .create_job("drain/busy", spec_with_timeout(2, 60_000, false))
        .await
        .expect("create");

    // Three streams that each had an answer and now wait for their next request.
    let mut idle = Vec::new();
    for step in 0..3 {
        let mut stream = open_stream(&uri, "drain/idle").await;
        stream
            .requests
            .send(histogram_request("drain/idle", step, 0))
            .await
            .expect("send");
        stream
            .responses
            .next()
            .await
            .expect("an answer")
            .expect("weighed");
        idle.push(stream);
    }
    // One stream in the middle of a step.
    let mut busy = open_stream(&uri, "drain/busy").await;
    busy.requests
        .send(histogram_request("drain/busy", 0, 0))
        .await
        .expect("send");
    let (status, _, _) =
        crate::support::http::http_get(replica.metrics_addr, "/readyz", None).await;
    assert_eq!(status, 200);

    let signalled = Instant::now();
    replica.signal("TERM");
    for (index, stream) in idle.iter_mut().enumerate() {
        let ended = stream.responses.next().await.expect("a final status");
        let status = ended.expect_err("the stream ends");
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "idle stream {index}: {status:?}"
        );
        assert!(status.message().contains("shutting down"), "{status:?}");
    }
    let idle_ended = signalled.elapsed();
    // The rank waiting in step 0 hears at once that the step cannot complete here, and that
    // nothing was applied: it sends the step again where the job goes on.
    let ended = busy
        .responses
        .next()
        .await
        .expect("a final status")
        .expect_err("the waiting step ends");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("nothing was applied"), "{ended:?}");

    let (exit, log) = replica.exited().await;
    let exited = signalled.elapsed();
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(
        !log.contains("outlived the shutdown grace"),
        "open streams held the exit:\n{log}"
    );
    println!(
        "SIGTERM with 3 idle streams and one waiting in a step: the idle ones ended after \
         {idle_ended:?}; exited after {exited:?} (grace 20 s, step timeout 60 s)"
    );

    // Only idle streams: the exit follows the signal at once.
    let replica = Launch::with_data_dir(dir.path())
        .port(0)
        .args(&["--shutdown-grace", "20s"])
        .start();
    let uri = replica.uri();
    let mut streams = Vec::new();
    for step in 0..4 {
        let mut stream = open_stream(&uri, "drain/idle").await;
        stream
            .requests
            .send(histogram_request("drain/idle", 10 + step, 0))
            .await
            .expect("send");
        stream
            .responses
            .next()
            .await
            .expect("answer")
            .expect("weighed");
        streams.push(stream);
    }
    let signalled = Instant::now();
    replica.signal("TERM");
    for stream in &mut streams {
        let status = stream
            .responses
            .next()
            .await
            .expect("a final status")
            .expect_err("ends");
        assert_eq!(status.code(), Code::Unavailable);
    }
    let (exit, log) = replica.exited().await;
    let exited = signalled.elapsed();
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(!log.contains("outlived the shutdown grace"), "{log}");
    assert!(exited < Duration::from_secs(20), "exited within the grace");
    println!("SIGTERM with 4 idle open streams: exited after {exited:?} (goal: under 1 s)");
}

/// One rank's session through the whole run: every response it acknowledged, by step.
type Acknowledged = Arc<Mutex<Vec<(u64, u32, HarmonizeResponse)>>>;

async fn run_rank(
    session: &mut HealingSession,
    rank: u32,
    steps: std::ops::Range<u64>,
    acknowledged: &Acknowledged,
    progress: &tokio::sync::watch::Sender<u64>,
) {
    for step in steps {
        let (counts, tot) = counts(step, rank);
        let response = session
            .harmonize_histogram(step, rank, counts, tot)
            .await
            .unwrap_or_else(|error| panic!("rank {rank}, step {step}: {error}"));
        acknowledged
            .lock()
            .expect("lock")
            .push((step, rank, response));
        if rank == 0 {
            let _ = progress.send(step);
        }
    }
}

#[tokio::test]
async fn a_server_killed_and_back_behind_its_clients_is_healed_without_losing_a_step() {
    const JOB: &str = "heal/job";
    const RANKS: u32 = 3;
    const STEPS: u64 = 60;
    let dir = TempDir::new("kill9-heal");
    // Snapshots only at a clean stop: a kill -9 loses every step after it.
    let flags = ["--snapshot-interval", "1h", "--shutdown-grace", "5s"];
    let replica = Launch::with_data_dir(dir.path())
        .port(0)
        .args(&flags)
        .start();
    let port = replica.addr.port();
    let uri = replica.uri();
    let spec = spec_with_timeout(RANKS, 30_000, false);
    let options = HealingOptions {
        deadline: Duration::from_secs(60),
        ..HealingOptions::default()
    };
    // Even ranks send one Harmonize call per step, odd ones keep one HarmonizeStream open
    // (which the SIGTERM ends at a message boundary and each kill cuts).
    let mut sessions = Vec::new();
    for rank in 0..RANKS {
        let options = HealingOptions {
            stream: rank % 2 == 1,
            ..options.clone()
        };
        sessions.push(
            HealingSession::create(uri.clone(), JOB, spec, "run-1", options)
                .await
                .expect("session"),
        );
    }
    let acknowledged: Acknowledged = Arc::default();
    let (progress, watched) = tokio::sync::watch::channel(0u64);

    // Runs every rank over `steps` at once.
    async fn phase(
        sessions: Vec<HealingSession>,
        steps: std::ops::Range<u64>,
        acknowledged: &Acknowledged,
        progress: &tokio::sync::watch::Sender<u64>,
    ) -> Vec<HealingSession> {
        let tasks: Vec<_> = sessions
            .into_iter()
            .enumerate()
            .map(|(rank, mut session)| {
                let acknowledged = Arc::clone(acknowledged);
                let progress = progress.clone();
                let steps = steps.clone();
                tokio::spawn(async move {
                    run_rank(&mut session, rank as u32, steps, &acknowledged, &progress).await;
                    session
                })
            })
            .collect();
        let mut sessions = Vec::new();
        for task in tasks {
            sessions.push(task.await.expect("rank task"));
        }
        sessions
    }

    // Steps 0-9, then a clean stop: the state file holds 10 steps.
    let sessions = phase(sessions, 0..10, &acknowledged, &progress).await;
    assert!(replica.sigterm().await.0.success());
    // Back on its port with all of them; steps 10-24 on it, then kill -9: those are lost there.
    let replica = Launch::with_data_dir(dir.path())
        .port(port)
        .args(&flags)
        .start();
    let sessions = phase(sessions, 10..25, &acknowledged, &progress).await;
    replica.kill9().await;
    // Back behind its clients (10 steps where they saw 25): fenced, reseeded, healed. Then
    // restarted once with SIGTERM and killed three times more while the ranks run.
    let replica = Launch::with_data_dir(dir.path())
        .port(port)
        .args(&flags)
        .start();
    let fault = {
        let dir = dir.path().to_owned();
        let mut watched = watched.clone();
        tokio::spawn(async move {
            let mut replica = replica;
            // Each time rank 0 has an answer, the others may be anywhere in that step: a
            // rolling restart (SIGTERM: streams drained, the waiting step ended, the state
            // written), then two crashes.
            for (at, crash) in [(30, false), (38, true), (46, true), (53, true)] {
                let _ = watched.wait_for(|step| *step >= at).await;
                if crash {
                    replica.kill9().await;
                } else {
                    assert!(replica.sigterm().await.0.success());
                }
                replica = Launch::with_data_dir(&dir).port(port).args(&flags).start();
            }
            replica
        })
    };
    let sessions = phase(sessions, 25..STEPS, &acknowledged, &progress).await;
    let replica = fault.await.expect("fault task");
    let reseeds: u64 = sessions.iter().map(HealingSession::reseeds).sum();
    assert!(reseeds > 0, "the copy that came back behind was reseeded");

    // The same run against a server that never failed.
    let reference = TestServer::start().await;
    let client = reference.client().await;
    client.clone().create_job(JOB, spec).await.expect("create");
    let mut expected = std::collections::BTreeMap::new();
    for step in 0..STEPS {
        let tasks: Vec<_> = (0..RANKS)
            .map(|rank| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let response = client
                        .harmonize(histogram_request(JOB, step, rank))
                        .await
                        .expect("reference step");
                    (rank, response)
                })
            })
            .collect();
        for task in tasks {
            let (rank, response) = task.await.expect("reference rank");
            expected.insert((step, rank), response);
        }
    }

    let acknowledged = std::mem::take(&mut *acknowledged.lock().expect("lock"));
    assert_eq!(
        acknowledged.len() as u64,
        STEPS * u64::from(RANKS),
        "one answer per step"
    );
    for (step, rank, got) in acknowledged.iter() {
        let want = &expected[&(*step, *rank)];
        assert_eq!(got.step, *step);
        assert_eq!(
            bits(&got.bin_weights),
            bits(&want.bin_weights),
            "step {step} rank {rank}: weights differ from a never-failing server's"
        );
        assert_eq!(bits(&got.acc_sum), bits(&want.acc_sum));
        assert_eq!(
            got.steps, want.steps,
            "step {step}: no step lost or doubled"
        );
        assert_eq!(got.tot.to_bits(), want.tot.to_bits());
    }
    let mut healed = ghmd::client::Client::connect(replica.uri())
        .await
        .expect("connect");
    let end = healed.get_job(JOB).await.expect("the job is there");
    let want = client.clone().get_job(JOB).await.expect("reference");
    let (end, want) = (end.state.expect("state"), want.state.expect("state"));
    assert_eq!((end.steps, end.next_step), (want.steps, want.next_step));
    assert_eq!(end.steps, STEPS);
    assert_eq!(bits(&end.acc_sum), bits(&want.acc_sum));
    let (_, _, metrics) =
        crate::support::http::http_get(replica.metrics_addr, "/metrics", None).await;
    println!(
        "two SIGTERM restarts and four kill -9, {STEPS} steps of {RANKS} ranks: {reseeds} reseeds by the sessions; \
         final generation {}; the last replica's reseed counters: {}",
        end.generation,
        metrics
            .lines()
            .filter(|line| line.starts_with("ghmd_reseeds_total"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

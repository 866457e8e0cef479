//! Routing, fencing, reseeding and run identity against a real in-process server: each branch
//! of the rules written in the proto (above HarmonizeRequest, at ReseedJobRequest and at
//! CreateJobRequest.run_id), with the ErrorInfo reasons clients act on, and the proof that a
//! refused request changes nothing.

use std::time::Duration;

use crate::support::lineage::{BINS, counts, histogram_request, spec};
use crate::support::{TempDir, TestServer, bits};
use ghmd::api::error_info::{metadata_of, reason_of};
use ghmd::client::{
    Client, HealingError, HealingOptions, HealingSession, acknowledged_state, applied_step,
    job_request,
};
use ghmd::proto::{
    AppliedStep, GetJobRequest, HarmonizeRequest, HarmonizeResponse, Job, JobSpec, JobState,
    ReseedJobRequest, RestoreJobRequest,
};
use tokio_stream::StreamExt;
use tonic::Code;

fn fenced(mut request: HarmonizeRequest, generation: u64, steps: u64) -> HarmonizeRequest {
    request.expected_generation = generation;
    request.expected_steps = steps;
    request
}

fn state_of(job: &Job) -> JobState {
    job.state.clone().expect("a job has a state")
}

/// A status with its code, its ErrorInfo reason and words of its message.
fn expect_refusal<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    reason: Option<&str>,
    words: &[&str],
) -> tonic::Status {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), reason, "{status:?}");
    for word in words {
        assert!(status.message().contains(word), "{word:?} in {status:?}");
    }
    status
}

fn reseed_request(job_id: &str, spec: JobSpec, run_id: &str, state: JobState) -> ReseedJobRequest {
    ReseedJobRequest {
        job_id: job_id.to_owned(),
        spec: Some(spec),
        run_id: run_id.to_owned(),
        state: Some(state),
        last_step: None,
    }
}

async fn metric(server: &TestServer, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, _, body) = crate::support::http::http_get(server.metrics_addr, "/metrics", None).await;
    crate::support::http::sample(&body, name, labels).unwrap_or(0.0)
}

/// Runs one step of a step-synchronous job: every rank at once, each response in rank order.
async fn sync_step(client: &Client, job_id: &str, step: u64, ranks: u32) -> Vec<HarmonizeResponse> {
    let tasks: Vec<_> = (0..ranks)
        .map(|rank| {
            let mut client = client.clone();
            let request = histogram_request(job_id, step, rank);
            tokio::spawn(async move { client.harmonize(request).await.expect("step applied") })
        })
        .collect();
    let mut responses = Vec::new();
    for task in tasks {
        responses.push(task.await.expect("rank task"));
    }
    responses
}

#[tokio::test]
async fn the_job_header_must_name_the_requests_job_and_is_mandatory_only_with_the_flag() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client.create_job("route/a", spec(1)).await.expect("create");
    client.create_job("route/b", spec(1)).await.expect("create");
    let before = client.get_job("route/a").await.expect("get");

    // No header: a plain server serves grpcurl-style callers.
    let raw = client.raw();
    raw.get_job(GetJobRequest {
        job_id: "route/a".into(),
    })
    .await
    .expect("no header is fine without --require-job-header");
    // A header naming another job: refused, and the step is not applied.
    let misrouted = job_request("route/b", histogram_request("route/a", 0, 0));
    expect_refusal(
        raw.harmonize(misrouted).await,
        Code::InvalidArgument,
        Some("JOB_HEADER_MISMATCH"),
        &["x-ghmd-job", "route/b", "route/a"],
    );
    let misrouted_get = job_request(
        "route/b",
        GetJobRequest {
            job_id: "route/a".into(),
        },
    );
    expect_refusal(
        raw.get_job(misrouted_get).await,
        Code::InvalidArgument,
        Some("JOB_HEADER_MISMATCH"),
        &["route/b"],
    );
    assert_eq!(
        client.get_job("route/a").await.expect("get").state,
        before.state
    );

    // A stream with a header carries the header's job only.
    let requests = vec![
        histogram_request("route/a", 0, 0),
        histogram_request("route/b", 0, 0),
    ];
    let mut responses = client
        .raw()
        .harmonize_stream(job_request("route/a", tokio_stream::iter(requests)))
        .await
        .expect("stream opens")
        .into_inner();
    let first = responses
        .next()
        .await
        .expect("first")
        .expect("route/a weighed");
    assert_eq!(first.job_id, "route/a");
    let second = responses.next().await.expect("second");
    expect_refusal(
        second,
        Code::InvalidArgument,
        Some("JOB_HEADER_MISMATCH"),
        &["route/a", "route/b", "one job"],
    );
    // Without a header, the first message fixes the stream's job.
    let requests = vec![
        histogram_request("route/b", 0, 0),
        histogram_request("route/a", 1, 0),
    ];
    let mut responses = client
        .raw()
        .harmonize_stream(tokio_stream::iter(requests))
        .await
        .expect("stream opens")
        .into_inner();
    responses
        .next()
        .await
        .expect("first")
        .expect("route/b weighed");
    expect_refusal(
        responses.next().await.expect("second"),
        Code::InvalidArgument,
        Some("JOB_HEADER_MISMATCH"),
        &["first message", "route/b", "route/a"],
    );
    let a = client.get_job("route/a").await.expect("get");
    assert_eq!(
        state_of(&a).steps,
        1,
        "only the stream's own route/a step was applied"
    );
    assert_eq!(
        metric(
            &server,
            "ghmd_job_header_refusals_total",
            &[("reason", "mismatch")]
        )
        .await,
        4.0
    );

    // With --require-job-header, a call without it is refused; the typed client sends it.
    let strict = TestServer::start_with(|config| config.require_job_header = true).await;
    let mut client = strict.client().await;
    client
        .create_job("route/a", spec(1))
        .await
        .expect("the typed client sends the header");
    expect_refusal(
        client
            .raw()
            .get_job(GetJobRequest {
                job_id: "route/a".into(),
            })
            .await,
        Code::InvalidArgument,
        Some("JOB_HEADER_MISSING"),
        &["x-ghmd-job", "--require-job-header"],
    );
    expect_refusal(
        client
            .raw()
            .harmonize_stream(tokio_stream::iter(vec![histogram_request("route/a", 0, 0)]))
            .await,
        Code::InvalidArgument,
        Some("JOB_HEADER_MISSING"),
        &[],
    );
    client
        .harmonize(histogram_request("route/a", 0, 0))
        .await
        .expect("with the header");
    assert_eq!(
        state_of(&client.get_job("route/a").await.expect("get")).steps,
        1
    );
    assert_eq!(
        metric(
            &strict,
            "ghmd_job_header_refusals_total",
            &[("reason", "missing")]
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn fencing_refuses_a_copy_that_holds_less_than_the_caller_saw_and_nothing_else() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let created = client.create_job("fence/a", spec(1)).await.expect("create");
    assert_eq!(
        state_of(&created).generation,
        1,
        "creation starts the lineage at 1"
    );
    let mut last = None;
    for step in 0..3 {
        let response = client
            .harmonize(fenced(histogram_request("fence/a", step, 0), 1, step))
            .await
            .expect("the copy holds what the caller saw");
        // Every response carries the counters GetJob reports right after it.
        let job = state_of(&client.get_job("fence/a").await.expect("get"));
        assert_eq!(
            (
                response.steps,
                response.elements,
                response.next_step,
                response.generation
            ),
            (job.steps, job.elements, job.next_step, job.generation)
        );
        last = Some(response);
    }
    let last = last.expect("three steps");
    let before = client.get_job("fence/a").await.expect("get");
    let (generation, steps) = (last.generation, last.steps);

    // The caller saw more steps than this copy has: STALE_COPY, with the copy's lineage.
    for (g, s, what) in [
        (generation, steps + 5, "more steps"),
        (generation + 1, 0, "a newer generation"),
    ] {
        let status = expect_refusal(
            client
                .harmonize(fenced(histogram_request("fence/a", 9, 0), g, s))
                .await,
            Code::FailedPrecondition,
            Some("STALE_COPY"),
            &["stale", "ReseedJob"],
        );
        assert_eq!(
            metadata_of(&status, "generation"),
            Some(generation.to_string()),
            "{what}"
        );
        assert_eq!(
            metadata_of(&status, "steps"),
            Some(steps.to_string()),
            "{what}"
        );
    }
    assert_eq!(
        client.get_job("fence/a").await.expect("get"),
        before,
        "refusals change nothing"
    );

    // Expected 0 asks for no fencing, whatever expected_steps says.
    client
        .harmonize(fenced(histogram_request("fence/a", 3, 0), 0, 1000))
        .await
        .expect("no fencing");
    // A copy newer than the caller (a restore advanced it) holds everything the caller saw.
    let current = state_of(&client.get_job("fence/a").await.expect("get"));
    let restored = client
        .restore_job(RestoreJobRequest {
            job_id: "fence/a".into(),
            state: Some(current),
        })
        .await
        .expect("restore");
    assert_eq!(
        state_of(&restored).generation,
        generation + 1,
        "RestoreJob advances it"
    );
    client
        .harmonize(fenced(
            histogram_request("fence/a", 4, 0),
            generation,
            steps,
        ))
        .await
        .expect("an older generation with fewer steps is accepted");

    // No copy at all: JOB_NOT_HERE.
    expect_refusal(
        client
            .harmonize(fenced(histogram_request("fence/absent", 0, 0), 1, 0))
            .await,
        Code::NotFound,
        Some("JOB_NOT_HERE"),
        &["fence/absent"],
    );
    assert_eq!(
        metric(
            &server,
            "ghmd_fenced_refusals_total",
            &[("reason", "stale_copy")]
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(
            &server,
            "ghmd_fenced_refusals_total",
            &[("reason", "job_not_here")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_fenced_out_rank_never_joins_its_step() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let short = crate::support::lineage::spec_with_timeout(2, 300, false);
    client
        .create_job("fence/sync", short)
        .await
        .expect("create");
    expect_refusal(
        client
            .harmonize(fenced(histogram_request("fence/sync", 0, 0), 1, 7))
            .await,
        Code::FailedPrecondition,
        Some("STALE_COPY"),
        &[],
    );
    // Had rank 0's refused request joined step 0, rank 1 would complete it; it times out
    // naming rank 0 instead.
    let status = client
        .harmonize(histogram_request("fence/sync", 0, 1))
        .await
        .expect_err("step 0 lacks rank 0");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("rank(s) 0 did not send"),
        "{status:?}"
    );
    let job = state_of(&client.get_job("fence/sync").await.expect("get"));
    assert_eq!((job.steps, job.next_step), (0, 0));

    // Fenced with what they saw, both ranks apply the step, and both responses carry the
    // counters GetJob then reports.
    let responses = sync_step(&client, "fence/sync", 0, 2).await;
    let job = state_of(&client.get_job("fence/sync").await.expect("get"));
    for response in responses {
        assert_eq!(
            (
                response.steps,
                response.elements,
                response.next_step,
                response.generation
            ),
            (job.steps, job.elements, job.next_step, job.generation)
        );
    }
    assert_eq!((job.steps, job.next_step, job.generation), (1, 1, 1));
}

#[tokio::test]
async fn reseeding_creates_replaces_or_keeps_a_copy_by_the_rule() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // The lineage to reseed from: a job stepped elsewhere (here: another job id, then read).
    client
        .create_job("seed/source", spec(1))
        .await
        .expect("create");
    let mut seen = None;
    for step in 0..4 {
        seen = Some(
            client
                .harmonize(histogram_request("seed/source", step, 0))
                .await
                .expect("step"),
        );
    }
    let seen = acknowledged_state(&seen.expect("steps"));

    // Absent: W ranks race to reseed and converge on one copy, at generation seen + 1.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let mut client = client.clone();
            let request = reseed_request("seed/a", spec(1), "", seen.clone());
            tokio::spawn(async move { client.reseed_job(request).await.expect("reseed") })
        })
        .collect();
    let mut copies = Vec::new();
    for task in tasks {
        copies.push(task.await.expect("reseed task"));
    }
    let job = client.get_job("seed/a").await.expect("one copy");
    for copy in &copies {
        assert_eq!(copy.state, job.state, "every rank got the one copy");
    }
    let state = state_of(&job);
    assert_eq!(state.generation, seen.generation + 1);
    assert_eq!(
        (state.steps, state.elements, &state.acc_sum),
        (seen.steps, seen.elements, &seen.acc_sum)
    );
    assert_eq!(
        metric(&server, "ghmd_reseeds_total", &[("outcome", "created")]).await,
        1.0
    );
    assert_eq!(
        metric(&server, "ghmd_reseeds_total", &[("outcome", "unchanged")]).await,
        3.0
    );

    // The copy already holds what the caller saw (the same, or one step fewer): unchanged.
    let fewer = JobState {
        steps: seen.steps - 1,
        ..seen.clone()
    };
    for older in [seen.clone(), fewer] {
        let kept = client
            .reseed_job(reseed_request("seed/a", spec(1), "", older))
            .await
            .expect("unchanged");
        assert_eq!(kept, job, "nothing changes");
    }

    // The copy is stale (the caller saw more steps): replaced at the next generation.
    let ahead = JobState {
        steps: state.steps + 3,
        elements: state.elements + 300,
        acc_sum: vec![0.25; BINS as usize],
        generation: state.generation,
        next_step: 0,
        method_state: None,
    };
    let replaced = client
        .reseed_job(reseed_request("seed/a", spec(1), "", ahead.clone()))
        .await
        .expect("replaced");
    let replaced_state = state_of(&replaced);
    assert_eq!(replaced_state.generation, state.generation + 1);
    assert_eq!(
        (
            replaced_state.steps,
            replaced_state.elements,
            &replaced_state.acc_sum
        ),
        (ahead.steps, ahead.elements, &ahead.acc_sum)
    );
    assert_eq!(
        metric(&server, "ghmd_reseeds_total", &[("outcome", "replaced")]).await,
        1.0
    );

    // Refusals, each leaving the copy as it is.
    let before = client.get_job("seed/a").await.expect("get");
    expect_refusal(
        client
            .reseed_job(reseed_request("seed/a", spec(2), "", seen.clone()))
            .await,
        Code::AlreadyExists,
        None,
        &["another spec"],
    );
    let mut nan = seen.clone();
    nan.acc_sum[3] = f32::NAN;
    nan.steps += 100;
    expect_refusal(
        client
            .reseed_job(reseed_request("seed/a", spec(1), "", nan))
            .await,
        Code::InvalidArgument,
        None,
        &["state.acc_sum[3]"],
    );
    let mut no_state = reseed_request("seed/a", spec(1), "", seen.clone());
    no_state.state = None;
    expect_refusal(
        client.reseed_job(no_state).await,
        Code::InvalidArgument,
        None,
        &["state is required"],
    );
    let mut async_last_step = reseed_request("seed/a", spec(1), "", seen.clone());
    async_last_step.last_step = Some(AppliedStep::default());
    expect_refusal(
        client.reseed_job(async_last_step).await,
        Code::InvalidArgument,
        None,
        &["last_step", "step-synchronous"],
    );
    expect_refusal(
        client
            .reseed_job(reseed_request("seed/a", spec(1), "bad run!", seen.clone()))
            .await,
        Code::InvalidArgument,
        None,
        &["run_id[3]"],
    );
    assert_eq!(client.get_job("seed/a").await.expect("get"), before);
    assert_eq!(
        metric(&server, "ghmd_reseeds_total", &[("outcome", "refused")]).await,
        4.0
    );
}

#[tokio::test]
async fn a_reseeded_copy_answers_a_retry_of_the_last_step_bit_for_bit() {
    // The replica that applied step 3 for both ranks; rank 1's answer is "lost".
    let first = TestServer::start().await;
    let client = first.client().await;
    client
        .clone()
        .create_job("seed/sync", spec(2))
        .await
        .expect("create");
    let mut last = Vec::new();
    for step in 0..4 {
        last = sync_step(&client, "seed/sync", step, 2).await;
    }
    let (rank0, lost) = (&last[0], &last[1]);

    // Another replica with no copy: rank 0 reseeds from its last response, with last_step.
    let second = TestServer::start().await;
    let mut other = second.client().await;
    let mut request = reseed_request("seed/sync", spec(2), "", acknowledged_state(rank0));
    request.last_step = Some(applied_step(rank0));
    let copy = other.reseed_job(request.clone()).await.expect("created");
    assert_eq!(state_of(&copy).generation, rank0.generation + 1);
    // Rank 1 acknowledged only step 2, so its reseed keeps rank 0's copy.
    let mut behind = request.clone();
    behind.state = Some(JobState {
        steps: rank0.steps - 1,
        next_step: rank0.next_step - 1,
        ..acknowledged_state(rank0)
    });
    behind.last_step = None;
    assert_eq!(other.reseed_job(behind).await.expect("unchanged"), copy);

    // Rank 1 retries step 3, fenced with what it saw: the kept table answers it.
    let retry = other
        .harmonize(fenced(
            histogram_request("seed/sync", 3, 1),
            rank0.generation,
            rank0.steps - 1,
        ))
        .await
        .expect("the retry is answered from the kept table");
    assert_eq!(bits(&retry.bin_weights), bits(&lost.bin_weights));
    assert_eq!(bits(&retry.acc_sum), bits(&lost.acc_sum));
    assert_eq!(retry.tot.to_bits(), lost.tot.to_bits());
    assert_eq!(retry.nonempty_bins, lost.nonempty_bins);
    assert_eq!(retry.weights, lost.weights);
    assert_eq!(
        (retry.steps, retry.elements, retry.next_step),
        (lost.steps, lost.elements, lost.next_step),
        "the counters as they were when step 3 was applied"
    );
    assert_eq!(retry.generation, state_of(&copy).generation);

    // And the job goes on from there exactly as the first replica does.
    let expected = sync_step(&client, "seed/sync", 4, 2).await;
    let got = sync_step(&other, "seed/sync", 4, 2).await;
    for (expected, got) in expected.iter().zip(&got) {
        assert_eq!(bits(&got.bin_weights), bits(&expected.bin_weights));
        assert_eq!(bits(&got.acc_sum), bits(&expected.acc_sum));
        assert_eq!(got.steps, expected.steps);
    }

    // A last step that is not the one before next_step is refused with its field.
    let mut wrong = request;
    if let Some(last) = wrong.last_step.as_mut() {
        last.step = 1;
    }
    wrong.job_id = "seed/other".into();
    expect_refusal(
        other.reseed_job(wrong).await,
        Code::InvalidArgument,
        None,
        &["last_step.step = 1", "state.next_step"],
    );
}

#[tokio::test]
async fn a_new_run_takes_over_an_idle_job_and_is_refused_an_active_one() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let first = client
        .create_job_for_run("run/a", spec(1), "run-1")
        .await
        .expect("create");
    assert_eq!(first.run_id, "run-1");
    // The same run again (another rank, or a resume): idempotent.
    assert_eq!(
        client
            .create_job_for_run("run/a", spec(1), "run-1")
            .await
            .expect("same run"),
        first
    );
    client
        .harmonize(histogram_request("run/a", 0, 0))
        .await
        .expect("step");
    let before = client.get_job("run/a").await.expect("get");
    // Another run while this one is live (default --run-takeover-after 120 s): RUN_ACTIVE.
    for other in ["run-2", ""] {
        expect_refusal(
            client.create_job_for_run("run/a", spec(1), other).await,
            Code::FailedPrecondition,
            Some("RUN_ACTIVE"),
            &["run-1", "--run-takeover-after"],
        );
    }
    assert_eq!(client.get_job("run/a").await.expect("get"), before);
    // A session of another run fails at once, saying why.
    let error = HealingSession::create(
        server.uri(),
        "run/a",
        spec(1),
        "run-2",
        HealingOptions::default(),
    )
    .await
    .err()
    .expect("RUN_ACTIVE");
    match &error {
        HealingError::RunLost { reason, .. } => assert_eq!(reason, "RUN_ACTIVE"),
        other => panic!("expected RunLost, got {other:?}"),
    }
    assert!(error.to_string().contains("run-1"), "{error}");

    // A server with a short takeover time: once the job is idle that long, a new run takes
    // it over, empty, at the next generation.
    let quick = TestServer::start_with(|config| {
        config.run_takeover_after = Duration::from_millis(50);
    })
    .await;
    let target = quick.uri();
    let mut client = quick.client().await;
    let mut old_run = HealingSession::create(
        target.clone(),
        "run/b",
        spec(1),
        "run-1",
        HealingOptions::default(),
    )
    .await
    .expect("session");
    let (counts0, tot0) = counts(0, 0);
    old_run
        .harmonize_histogram(0, 0, counts0.clone(), tot0)
        .await
        .expect("step");
    let old = state_of(&client.get_job("run/b").await.expect("get"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let taken = client
        .create_job_for_run("run/b", spec(1), "run-2")
        .await
        .expect("taken over");
    let taken_state = state_of(&taken);
    assert_eq!(taken.run_id, "run-2");
    assert_eq!(taken_state.generation, old.generation + 1);
    assert_eq!((taken_state.steps, taken_state.elements), (0, 0));
    assert!(
        taken_state.acc_sum.iter().all(|v| *v == 0.0),
        "a fresh density"
    );
    assert_eq!(metric(&quick, "ghmd_run_takeovers_total", &[]).await, 1.0);

    // The old run's next step is fenced out, and its reseed is RUN_REPLACED: it fails at once.
    let error = old_run
        .harmonize_histogram(1, 0, counts0, tot0)
        .await
        .expect_err("the old run is replaced");
    match &error {
        HealingError::RunLost { reason, .. } => assert_eq!(reason, "RUN_REPLACED"),
        other => panic!("expected RunLost, got {other:?}"),
    }
    assert!(error.to_string().contains("run-2"), "{error}");
    for old_run_id in ["run-1", ""] {
        expect_refusal(
            client
                .reseed_job(reseed_request("run/b", spec(1), old_run_id, old.clone()))
                .await,
            Code::FailedPrecondition,
            Some("RUN_REPLACED"),
            &["run-2"],
        );
    }
    assert_eq!(
        state_of(&client.get_job("run/b").await.expect("get")),
        taken_state
    );
}

#[tokio::test]
async fn a_state_file_of_the_previous_format_loads_at_generation_1() {
    let dir = TempDir::new("state-v1");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/state-v1.ghmd"),
        dir.path().join("state.ghmd"),
    )
    .expect("copy the fixture");
    let data_dir = dir.path().to_owned();
    let server = TestServer::start_with(move |config| {
        config.in_memory = false;
        config.data_dir = data_dir;
    })
    .await;
    let client = server.client().await;
    let job = client
        .clone()
        .get_job("fixture/sync")
        .await
        .expect("loaded");
    let state = state_of(&job);
    assert_eq!((state.generation, state.steps, state.next_step), (1, 3, 3));
    assert_eq!(job.run_id, "");
    // It steps on, fenced by the lineage it loaded with.
    let responses = sync_step(&client, "fixture/sync", 3, 2).await;
    assert_eq!((responses[0].generation, responses[0].steps), (1, 4));
    server.stop().await;
}

#[tokio::test]
async fn reseeding_needs_the_same_rights_as_creating() {
    const TEAM: &str = "team-a-secret-0123456789abcdef";
    let dir = TempDir::new("reseed-tokens");
    let path = dir.path().join("tokens.toml");
    std::fs::write(
        &path,
        format!("[[token]]\nname = \"team-a\"\ntoken = {TEAM:?}\nprefixes = [\"team-a/\"]\n"),
    )
    .expect("write tokens");
    let server = TestServer::start_with(|config| config.tokens_file = Some(path)).await;
    let mut open = server.client().await;
    let mut team = Client::with_credentials(
        server.channel().await,
        ghmd::client::Credentials::bearer(TEAM).expect("token"),
    );
    let state = JobState {
        acc_sum: vec![0.5; BINS as usize],
        steps: 3,
        generation: 1,
        ..Default::default()
    };
    expect_refusal(
        open.reseed_job(reseed_request("team-a/x", spec(1), "", state.clone()))
            .await,
        Code::Unauthenticated,
        None,
        &[],
    );
    expect_refusal(
        team.reseed_job(reseed_request("team-b/x", spec(1), "", state.clone()))
            .await,
        Code::PermissionDenied,
        None,
        &["team-a/"],
    );
    let job = team
        .reseed_job(reseed_request("team-a/x", spec(1), "", state))
        .await
        .expect("its own prefix");
    assert_eq!(state_of(&job).generation, 2);
    expect_refusal(
        team.get_job("team-b/x").await,
        Code::PermissionDenied,
        None,
        &[],
    );
}

#[tokio::test]
async fn a_session_that_restores_follows_the_restored_lineage() {
    let server = TestServer::start().await;
    let mut session = HealingSession::create(
        server.uri(),
        "restore/a",
        spec(1),
        "run-1",
        HealingOptions::default(),
    )
    .await
    .expect("session");
    let mut checkpoint = None;
    for step in 0..3 {
        let (counts, tot) = counts(step, 0);
        let response = session
            .harmonize_histogram(step, 0, counts, tot)
            .await
            .expect("step");
        if step == 0 {
            checkpoint = Some(acknowledged_state(&response));
        }
    }
    let restored = session
        .restore(checkpoint.expect("a checkpoint"))
        .await
        .expect("restore");
    assert_eq!(state_of(&restored).generation, 2);
    assert_eq!(session.acknowledged(), &state_of(&restored));
    let (counts, tot) = counts(1, 0);
    let response = session
        .harmonize_histogram(1, 0, counts, tot)
        .await
        .expect("a step after the restore");
    assert_eq!((response.steps, response.generation), (2, 2));
    assert_eq!(
        session.reseeds(),
        0,
        "the restored copy is not taken for a stale one"
    );
    let mut client = server.client().await;
    assert_eq!(
        state_of(&client.get_job("restore/a").await.expect("get")).steps,
        2
    );
}

#[tokio::test]
async fn generation_and_run_id_survive_a_restart() {
    let dir = TempDir::new("lineage-restart");
    let start = |dir: std::path::PathBuf| {
        TestServer::start_with(move |config| {
            config.in_memory = false;
            config.data_dir = dir;
        })
    };
    let server = start(dir.path().to_owned()).await;
    let mut client = server.client().await;
    client
        .create_job_for_run("keep/a", spec(1), "run-7")
        .await
        .expect("create");
    let response = client
        .harmonize(histogram_request("keep/a", 0, 0))
        .await
        .expect("step");
    let restored = client
        .restore_job(RestoreJobRequest {
            job_id: "keep/a".into(),
            state: Some(acknowledged_state(&response)),
        })
        .await
        .expect("restore");
    server.stop().await;

    let server = start(dir.path().to_owned()).await;
    let mut client = server.client().await;
    let loaded = client.get_job("keep/a").await.expect("loaded");
    assert_eq!(loaded.run_id, "run-7");
    assert_eq!(state_of(&loaded), state_of(&restored));
    assert_eq!(state_of(&loaded).generation, 2);
    // The loaded lineage fences as the one before the restart did.
    client
        .harmonize(fenced(histogram_request("keep/a", 1, 0), 2, 1))
        .await
        .expect("the same lineage");
    server.stop().await;
}

#[tokio::test]
async fn a_session_gives_up_after_its_deadline_with_the_last_error() {
    let server = TestServer::start().await;
    let options = HealingOptions {
        deadline: Duration::from_millis(300),
        ..HealingOptions::default()
    };
    let mut session = HealingSession::create(server.uri(), "gone/a", spec(1), "", options)
        .await
        .expect("session");
    server.stop().await;
    let (counts, tot) = counts(0, 0);
    let error = session
        .harmonize_histogram(0, 0, counts, tot)
        .await
        .expect_err("nobody serves the job");
    match &error {
        HealingError::GaveUp { attempts, last, .. } => {
            assert!(*attempts > 1, "it retried: {error}");
            assert_eq!(last.code(), Code::Unavailable, "{error}");
        }
        other => panic!("expected GaveUp, got {other:?}"),
    }
    assert!(error.to_string().contains("healing deadline"), "{error}");
    assert!(error.to_string().contains("step 0"), "{error}");
}

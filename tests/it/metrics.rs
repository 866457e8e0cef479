//! The HTTP listener of a real server: /metrics counts what clients did, in both text formats,
//! /healthz and /readyz answer, and --job-metrics exports each job's density.

use std::time::{Duration, Instant};

use ghmd::client::norms_request;
use ghmd::proto::JobSpec;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::support::http::{http_get, sample, scrape_until};
use crate::support::wire::{frame, grpc_request, h2_connect};
use crate::support::{TestServer, ghm_c, step_synchronous};

fn requests(text: &str, method: &str, code: &str) -> f64 {
    sample(
        text,
        "ghmd_requests_total",
        &[("method", method), ("code", code)],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn requests_steps_elements_and_jobs_are_counted() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("a", ghm_c(10, 0.75))
        .await
        .expect("create");
    let error = client
        .create_job("bad", ghm_c(0, 0.75))
        .await
        .expect_err("0 bins");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    let error = client.get_job("missing").await.expect_err("unknown job");
    assert_eq!(error.code(), tonic::Code::NotFound);
    for step in 0..3 {
        client
            .harmonize_norms("a", step, 0, &[0.05, 0.5, 0.95, 0.3], None)
            .await
            .expect("harmonize");
    }
    // A stream of two requests: one call, counted when the stream ends.
    let stream = tokio_stream::iter(vec![
        norms_request("a", 3, 0, &[0.1; 6], None),
        norms_request("a", 4, 0, &[0.2; 6], None),
    ]);
    let mut responses = client
        .raw()
        .harmonize_stream(stream)
        .await
        .expect("stream")
        .into_inner();
    let mut answered = 0;
    while let Some(response) = responses.message().await.expect("stream message") {
        assert_eq!(response.weights.len(), 6 * 4);
        answered += 1;
    }
    assert_eq!(answered, 2);
    let mut health = HealthClient::new(server.channel().await);
    health
        .check(HealthCheckRequest {
            service: "ghm.v1.Harmonizer".into(),
        })
        .await
        .expect("health");

    let text = scrape_until(server.metrics_addr, |text| {
        requests(text, "ghm.v1.Harmonizer/HarmonizeStream", "OK") == 1.0
            && requests(text, "grpc.health.v1.Health/Check", "OK") == 1.0
            && requests(text, "ghm.v1.Harmonizer/GetJob", "NOT_FOUND") == 1.0
            && requests(text, "ghm.v1.Harmonizer/CreateJob", "INVALID_ARGUMENT") == 1.0
    })
    .await;
    assert_eq!(
        requests(&text, "ghm.v1.Harmonizer/CreateJob", "OK"),
        1.0,
        "{text}"
    );
    assert_eq!(
        requests(&text, "ghm.v1.Harmonizer/CreateJob", "INVALID_ARGUMENT"),
        1.0
    );
    assert_eq!(
        requests(&text, "ghm.v1.Harmonizer/GetJob", "NOT_FOUND"),
        1.0
    );
    assert_eq!(requests(&text, "ghm.v1.Harmonizer/Harmonize", "OK"), 3.0);
    assert_eq!(
        requests(&text, "ghm.v1.Harmonizer/HarmonizeStream", "OK"),
        1.0
    );
    assert_eq!(requests(&text, "grpc.health.v1.Health/Check", "OK"), 1.0);
    assert_eq!(
        sample(
            &text,
            "ghmd_request_duration_seconds_count",
            &[("method", "ghm.v1.Harmonizer/Harmonize")]
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(&text, "ghmd_elements_weighed_total", &[("loss", "ghm_c")]),
        Some((3 * 4 + 2 * 6) as f64)
    );
    assert_eq!(
        sample(&text, "ghmd_steps_applied_total", &[("loss", "ghm_c")]),
        Some(5.0)
    );
    assert_eq!(sample(&text, "ghmd_jobs", &[("loss", "ghm_c")]), Some(1.0));
    assert_eq!(sample(&text, "ghmd_jobs", &[("loss", "ghm_r")]), Some(0.0));

    client.delete_job("a").await.expect("delete");
    let text = scrape_until(server.metrics_addr, |text| {
        sample(text, "ghmd_jobs", &[("loss", "ghm_c")]) == Some(0.0)
    })
    .await;
    assert_eq!(sample(&text, "ghmd_jobs", &[("loss", "ghm_c")]), Some(0.0));
    server.stop().await;
}

#[tokio::test]
async fn a_path_no_service_defines_is_counted_as_unknown() {
    let server = TestServer::start().await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    let error = grpc
        .unary::<_, (), _>(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static("/made.up.Service/Random123"),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await
        .expect_err("no such method");
    assert_eq!(error.code(), tonic::Code::Unimplemented);
    let text = scrape_until(server.metrics_addr, |text| {
        requests(text, "unknown", "UNIMPLEMENTED") == 1.0
    })
    .await;
    assert_eq!(requests(&text, "unknown", "UNIMPLEMENTED"), 1.0, "{text}");
    assert!(!text.contains("Random123"));
    server.stop().await;
}

#[tokio::test]
async fn the_format_follows_the_accept_header_and_health_endpoints_answer() {
    let server = TestServer::start().await;
    let (status, headers, body) = http_get(
        server.metrics_addr,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(headers["content-type"].starts_with("application/openmetrics-text"));
    assert!(body.ends_with("# EOF\n"));
    assert!(body.contains("# TYPE ghmd_steps_applied counter"));
    assert!(body.contains("# TYPE ghmd_build info"));

    let (status, headers, body) = http_get(server.metrics_addr, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"].starts_with("text/plain; version=0.0.4"));
    assert!(!body.contains("# EOF"));
    assert!(body.contains("# TYPE ghmd_steps_applied_total counter"));
    assert!(body.contains("ghmd_build_info{version=\""));

    let (status, _, body) = http_get(server.metrics_addr, "/healthz", None).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, body) = http_get(server.metrics_addr, "/readyz", None).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, _, _) = http_get(server.metrics_addr, "/nope", None).await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn job_metrics_export_each_bin_up_to_the_series_cap() {
    let server = TestServer::start_with(|config| {
        config.job_metrics = true;
        config.job_metrics_max_series = 25;
    })
    .await;
    let mut client = server.client().await;
    // In id order: a and b fit (20 series), c would make 30 and is left out, d has no EMA.
    for (id, momentum) in [("a", 0.75), ("b", 0.5), ("c", 0.9), ("d", 0.0)] {
        client
            .create_job(id, ghm_c(10, momentum))
            .await
            .expect("create");
        client
            .harmonize_norms(id, 0, 0, &[0.01, 0.02, 0.33, 0.34, 0.35, 0.99], None)
            .await
            .expect("harmonize");
    }
    let (_, _, text) = http_get(server.metrics_addr, "/metrics", None).await;
    for id in ["a", "b"] {
        let job = client.get_job(id).await.expect("get");
        let acc_sum = job.state.expect("state").acc_sum;
        assert!(acc_sum.iter().any(|v| *v > 0.0));
        for (bin, value) in acc_sum.iter().enumerate() {
            let lower = format!("{}", bin as f64 / 10.0);
            let exported = sample(
                &text,
                "ghmd_job_density",
                &[("job_id", id), ("bin", &bin.to_string()), ("lower", &lower)],
            );
            assert_eq!(exported, Some(f64::from(*value)), "{id} bin {bin}\n{text}");
        }
    }
    assert!(!text.contains("job_id=\"c\""));
    assert!(!text.contains("job_id=\"d\""));
    assert_eq!(
        sample(&text, "ghmd_job_density_omitted_jobs", &[]),
        Some(1.0)
    );
    server.stop().await;
}

#[tokio::test]
async fn without_job_metrics_there_is_no_density() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("a", ghm_c(10, 0.75))
        .await
        .expect("create");
    let (_, _, text) = http_get(server.metrics_addr, "/metrics", None).await;
    assert!(!text.contains("ghmd_job_density"));
    server.stop().await;
}

fn sync_spec(allow_partial_steps: bool) -> JobSpec {
    JobSpec {
        allow_partial_steps,
        ..step_synchronous(ghm_c(10, 0.75), 2, Duration::from_millis(200))
    }
}

#[tokio::test]
async fn step_synchronous_waits_timeouts_and_partial_steps_are_measured() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("partial", sync_spec(true))
        .await
        .expect("create");
    client
        .create_job("strict", sync_spec(false))
        .await
        .expect("create");

    // Step 0 of "partial" with both ranks, rank 1 arriving 50 ms after rank 0.
    let mut rank0 = server.client().await;
    let first = tokio::spawn(async move {
        rank0
            .harmonize_norms("partial", 0, 0, &[0.1, 0.2], None)
            .await
            .expect("rank 0")
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    client
        .harmonize_norms("partial", 0, 1, &[0.3], None)
        .await
        .expect("rank 1");
    first.await.expect("rank 0 task");
    // Step 1 with rank 0 only: applied without rank 1 when the 200 ms pass.
    let (response, _) = client
        .harmonize_norms("partial", 1, 0, &[0.4], None)
        .await
        .expect("partial step");
    assert_eq!(response.missing_ranks, vec![1]);
    // The strict job aborts its step instead.
    let error = client
        .harmonize_norms("strict", 0, 0, &[0.4], None)
        .await
        .expect_err("timed out");
    assert_eq!(error.code(), tonic::Code::Aborted, "{error:?}");

    let text = scrape_until(server.metrics_addr, |text| {
        sample(text, "ghmd_step_timeouts_total", &[]) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&text, "ghmd_step_timeouts_total", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ghmd_partial_steps_total", &[("loss", "ghm_c")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "ghmd_steps_applied_total", &[("loss", "ghm_c")]),
        Some(2.0)
    );
    // The complete step waited about 50 ms for its last rank: in the (0.025, 0.1] buckets.
    assert_eq!(
        sample(&text, "ghmd_last_rank_wait_seconds_count", &[]),
        Some(1.0)
    );
    let wait = sample(&text, "ghmd_last_rank_wait_seconds_sum", &[]).expect("sum");
    assert!((0.04..1.0).contains(&wait), "{wait}");
    assert_eq!(
        sample(
            &text,
            "ghmd_last_rank_wait_seconds_bucket",
            &[("le", "0.025")]
        ),
        Some(0.0)
    );
    server.stop().await;
}

#[tokio::test]
async fn readyz_turns_503_as_soon_as_a_shutdown_begins() {
    let mut server =
        TestServer::start_with(|config| config.shutdown_grace = Duration::from_secs(10)).await;
    let metrics_addr = server.metrics_addr;
    let mut client = server.client().await;
    let (status, _, _) = http_get(metrics_addr, "/readyz", None).await;
    assert_eq!(status, 200);

    // A Harmonize call whose request is still uploading keeps the server in its shutdown grace
    // after the signal (a step-synchronous request waiting for a rank no longer does: the drain
    // ends it at once).
    client
        .create_job("w", ghm_c(10, 0.75))
        .await
        .expect("create");
    let (send, client_process) = h2_connect(server.addr, None).await;
    let mut send = send.ready().await.expect("ready");
    let request = grpc_request(
        server.addr,
        "/ghm.v1.Harmonizer/Harmonize",
        "application/grpc",
    );
    let (_response, mut upload) = send.send_request(request, false).expect("send");
    upload
        .send_data(frame(false, 1000, &[0u8; 10]).freeze(), false)
        .expect("the first bytes of the body");
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.begin_stop();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, body) = http_get(metrics_addr, "/readyz", None).await;
        if status == 503 {
            assert_eq!(body, "not ready\n");
            break;
        }
        assert!(Instant::now() < deadline, "still ready after the signal");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Liveness is unaffected while the in-flight request finishes.
    let (status, _, _) = http_get(metrics_addr, "/healthz", None).await;
    assert_eq!(status, 200);
    // The uploading client goes away, and with it the last request.
    client_process.abort();
    drop(upload);
    server.stop().await;
}

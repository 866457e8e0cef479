//! `ghmd bench`, briefly: every mode runs against a real server and reports what it measured.
//! The figures themselves live in BENCHMARKS.md, not in tests.

// The bench is a command of the binary, not of the library: compiled here from its source.
#[allow(dead_code)]
#[path = "../../src/bench/mod.rs"]
mod command;

use clap::Parser;
use command::{BenchArgs, JobsOutcome, MethodJobsOutcome, StepsReport};
use ghmd::jobs::MAX_WORLD_SIZE;

use crate::support::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_target_every_mode_reports_and_no_job_is_left_behind() {
    let server = TestServer::start().await;
    let uri = server.uri();
    let args = BenchArgs::parse_from([
        "bench",
        "--target",
        uri.as_str(),
        "--duration",
        "200ms",
        "--raw-elements",
        "10000",
        "--max-concurrency",
        "4",
    ]);
    let report = command::run(&args).await.expect("bench runs");

    assert!(!report.started_by_bench);
    let raw = report.raw.as_ref().expect("raw ran");
    assert_eq!(
        raw.iter().map(|p| p.connections).collect::<Vec<_>>(),
        [1, 4]
    );
    for point in raw {
        assert!(point.ghmd.requests > 0 && point.echo.requests > 0);
        assert!(point.ratio.is_finite() && point.ratio > 0.0, "{point:?}");
        assert!(point.ghmd.latency.p50_ms <= point.ghmd.latency.p99_ms);
    }

    let small = report.small.as_ref().expect("small ran");
    let levels: Vec<usize> = small.points.iter().map(|p| p.concurrency).collect();
    assert!(!levels.is_empty() && levels.len() <= 3, "{levels:?}");
    assert!(levels.windows(2).all(|w| w[1] == 2 * w[0]), "{levels:?}");
    assert!(levels.contains(&small.saturating_concurrency));
    for paced in [&small.half_rate.histogram, &small.half_rate.health] {
        assert!(paced.latency.samples > 0);
        assert_eq!(paced.send_lateness.samples, paced.latency.samples);
        assert!((paced.target_rate - small.saturating_rate / 2.0).abs() < 1e-6);
    }

    match report.steps.as_ref().expect("steps ran") {
        StepsReport::Measured { points } => {
            assert_eq!(
                points.iter().map(|p| p.world_size).collect::<Vec<_>>(),
                [2, 4, 8]
            );
            assert!(points.iter().all(|p| p.rounds > 0));
        }
        other => panic!("this server has step-synchronous jobs: {other:?}"),
    }
    assert!(matches!(report.jobs, Some(JobsOutcome::Skipped { .. })));
    // raw x2, small ratio and half-rate p99, steps W = 8.
    assert_eq!(report.checks.len(), 5, "{:?}", report.checks);
    serde_json::to_string(&report).expect("the report serialises");

    let left = server.registry.snapshots();
    assert!(left.is_empty(), "jobs left behind: {:?}", left.len());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_target_it_starts_a_server_and_reads_its_memory() {
    let args = BenchArgs::parse_from([
        "bench",
        "--mode",
        "jobs",
        "--jobs",
        "3000",
        "--server-binary",
        env!("CARGO_BIN_EXE_ghmd"),
        // Under taskset: the pid the bench reads is still the server's.
        "--server-cpus",
        "0",
    ]);
    let report = command::run(&args).await.expect("bench runs");
    assert!(report.started_by_bench);
    match report.jobs {
        Some(JobsOutcome::Measured(jobs)) => {
            assert_eq!(jobs.jobs, 3000);
            assert!(jobs.rss_before_bytes > 0 && jobs.rss_after_bytes > 0);
            assert!(jobs.bytes_per_job.is_finite(), "{jobs:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(report.raw.is_none() && report.small.is_none() && report.steps.is_none());
}

/// The widest step the server allows completes: every one of its 65,536 ranks answered OK (none
/// ABORTED) within the step timeout, while another job kept answering. Not timed: the step
/// timeout is generous, and the bench's figures say how long it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_of_the_largest_world_completes_while_another_job_is_served() {
    let server = TestServer::start_with(|config| {
        // Every rank comes from this one peer: its share must admit them all as well.
        config.max_concurrent_requests = MAX_WORLD_SIZE + 1024;
        config.caller_max_concurrent_requests = MAX_WORLD_SIZE + 1024;
    })
    .await;
    let uri = server.uri();
    let widest = MAX_WORLD_SIZE.to_string();
    let args = BenchArgs::parse_from([
        "bench",
        "--target",
        uri.as_str(),
        "--mode",
        "wide-steps",
        "--wide-world-sizes",
        widest.as_str(),
    ]);
    let report = command::run(&args).await.expect("bench runs");
    let wide = report.wide_steps.expect("wide steps ran");
    let [point] = wide.points.as_slice() else {
        panic!("one world size: {:?}", wide.points);
    };
    assert_eq!(point.world_size, MAX_WORLD_SIZE);
    assert_eq!(
        (point.answered_ok, &point.failures),
        (MAX_WORLD_SIZE as usize, &Default::default()),
        "every rank answered OK"
    );
    assert!(
        point.probe.samples > 0,
        "the other job answered while the step filled"
    );
    assert!(
        server.registry.snapshots().is_empty(),
        "the bench deleted its jobs"
    );
    server.stop().await;
}

/// Seesaw's and EQLv2's modes at C = 1203: the small climb per method against the health
/// check, and EQLv2's step with its round trip awaited and overlapped; none left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_method_modes_report_against_a_target() {
    let server = TestServer::start().await;
    let uri = server.uri();
    let args = BenchArgs::parse_from([
        "bench",
        "--target",
        uri.as_str(),
        "--mode",
        "small-methods,eqlv2-overlap,jobs-methods",
        "--duration",
        "200ms",
        "--max-concurrency",
        "2",
        "--forward",
        "2ms",
    ]);
    let report = command::run(&args).await.expect("bench runs");
    let methods = report.small_methods.as_ref().expect("small-methods ran");
    assert_eq!(
        methods.iter().map(|m| m.method.name()).collect::<Vec<_>>(),
        ["seesaw", "eqlv2"]
    );
    for method in methods {
        assert_eq!(method.num_classes, 1203);
        let small = &method.report;
        assert!(!small.points.is_empty() && small.points.len() <= 2);
        for point in &small.points {
            assert!(point.histogram.latency.samples > 0, "{point:?}");
            assert!(point.ratio.is_finite() && point.ratio > 0.0, "{point:?}");
        }
        assert!(small.half_rate.histogram.latency.samples > 0);
    }
    let overlap = report.eqlv2_overlap.as_ref().expect("eqlv2-overlap ran");
    assert_eq!((overlap.num_classes, overlap.steps), (1203, 100));
    assert_eq!(overlap.sequential_wait.samples, 100);
    assert_eq!(overlap.overlapped_wait.samples, 100);
    assert!(
        overlap.wait_ratio.is_finite() && overlap.wait_ratio >= 0.0,
        "{overlap:?}"
    );
    // Every loop spins its forward passes, so no step is shorter than one.
    for per_step in [
        overlap.forward_alone_ms_per_step,
        overlap.sequential_ms_per_step,
        overlap.overlapped_ms_per_step,
    ] {
        assert!(per_step >= 2.0, "{overlap:?}");
    }
    assert!(overlap.step_time_ratio.is_finite(), "{overlap:?}");
    assert!(matches!(
        report.jobs_methods,
        Some(MethodJobsOutcome::Skipped { .. })
    ));
    assert!(report.checks.is_empty(), "{:?}", report.checks);
    serde_json::to_string(&report).expect("the report serialises");
    assert!(
        server.registry.snapshots().is_empty(),
        "the bench deleted its jobs"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_target_it_reads_the_memory_of_seesaw_and_eqlv2_jobs() {
    let args = BenchArgs::parse_from([
        "bench",
        "--mode",
        "jobs-methods",
        "--method-jobs",
        "500",
        "--server-binary",
        env!("CARGO_BIN_EXE_ghmd"),
    ]);
    let report = command::run(&args).await.expect("bench runs");
    match report.jobs_methods {
        Some(MethodJobsOutcome::Measured { methods }) => {
            assert_eq!(methods.len(), 2);
            for jobs in methods {
                assert_eq!((jobs.jobs, jobs.num_classes), (500, 1203));
                assert!(jobs.rss_before_bytes > 0 && jobs.rss_after_bytes > 0);
                assert!(jobs.bytes_per_job.is_finite(), "{jobs:?}");
            }
        }
        other => panic!("{other:?}"),
    }
    assert!(report.jobs.is_none() && report.small.is_none());
}

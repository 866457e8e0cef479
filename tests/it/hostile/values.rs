//! Ids, enums and floats at and past their edges, and hostile UpdateJob/RestoreJob values.

use bytes::Bytes;
use ghmd::client::norms_request;
use ghmd::proto::{
    CreateJobRequest, GetJobRequest, HarmonizeRequest, JobSpec, JobState, ListJobsRequest,
    RestoreJobRequest, UpdateJobRequest,
};
use tonic::Code;

use crate::support::fixture::{JOBS, snapshot, still_serving, three_jobs};
use crate::support::{TestServer, assert_status, ghm_c};

#[tokio::test]
async fn huge_ids_unknown_enums_and_odd_floats_get_their_documented_status() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    three_jobs(&mut client).await;
    let before = snapshot(&mut client).await;

    // A 1 MiB job id, on every RPC that takes one: INVALID_ARGUMENT, quoted only in part.
    let huge = "x".repeat(1 << 20);
    let raw = client.raw();
    assert_status(
        raw.create_job(CreateJobRequest {
            job_id: huge.clone(),
            spec: Some(ghm_c(10, 0.0)),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["job_id", "longer than 128"],
        "CreateJob huge id",
    );
    assert_status(
        raw.get_job(GetJobRequest {
            job_id: huge.clone(),
        })
        .await,
        Code::InvalidArgument,
        &["job_id"],
        "GetJob huge id",
    );
    assert_status(
        raw.harmonize(norms_request(&huge, 0, 0, &[0.5], None))
            .await,
        Code::InvalidArgument,
        &["job_id"],
        "Harmonize huge id",
    );
    assert_status(
        raw.harmonize(HarmonizeRequest {
            job_id: huge.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["job_id"],
        "Harmonize huge id, no input",
    );
    assert_status(
        raw.update_job(UpdateJobRequest {
            job_id: huge.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["job_id"],
        "UpdateJob huge id",
    );
    assert_status(
        raw.list_jobs(ListJobsRequest {
            page_token: huge.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["page_token"],
        "ListJobs huge page token",
    );
    let listed = raw
        .list_jobs(ListJobsRequest {
            prefix: huge.clone(),
            ..Default::default()
        })
        .await
        .expect("a huge prefix matches nothing")
        .into_inner();
    assert!(listed.jobs.is_empty());

    // Unknown enum values, the extremes of i32 included.
    for loss in [3, -1, i32::MIN, i32::MAX] {
        let result = client
            .raw()
            .create_job(CreateJobRequest {
                job_id: "h/enum".to_owned(),
                spec: Some(JobSpec {
                    loss,
                    ..ghm_c(10, 0.0)
                }),
                ..Default::default()
            })
            .await;
        assert_status(
            result,
            Code::InvalidArgument,
            &["spec.loss", &loss.to_string()],
            "unknown loss",
        );
    }

    // NaN in every bit pattern, infinities, and negative subnormals are refused; positive
    // subnormals and -0.0 are valid norms in bin 0.
    for bits in [
        0x7fc0_0000u32,
        0x7f80_0001,
        0xffff_ffff,
        0xff80_0000,
        0x7f80_0000,
        0x8000_0001,
    ] {
        let value = f32::from_bits(bits);
        let result = client
            .harmonize_norms(JOBS[0], 0, 0, &[0.5, value], None)
            .await;
        assert_status(
            result,
            Code::InvalidArgument,
            &["gradient_norms[1]"],
            &format!("norm {bits:#x}"),
        );
        let result = client
            .harmonize_norms(JOBS[0], 0, 0, &[0.5, 0.5], Some(&[1.0, value]))
            .await;
        assert_status(
            result,
            Code::InvalidArgument,
            &["label_weights[1]"],
            &format!("label weight {bits:#x}"),
        );
    }
    assert_eq!(
        snapshot(&mut client).await,
        before,
        "a refused float changed a job"
    );
    let (reply, weights) = client
        .harmonize_norms(
            JOBS[0],
            0,
            0,
            &[f32::from_bits(1), -0.0, f32::MIN_POSITIVE],
            None,
        )
        .await
        .expect("subnormal and -0.0 norms are valid");
    assert_eq!(reply.nonempty_bins, 1, "all three are in bin 0");
    assert!(
        weights.iter().all(|w| w.is_finite() && *w > 0.0),
        "{weights:?}"
    );
    // Subnormal label weights are > 0, so valid; a subnormal GHM-R tot is clamped to 1.
    let (reply, _) = client
        .harmonize_norms(JOBS[2], 0, 0, &[0.5, 0.5], Some(&[f32::from_bits(1), 0.0]))
        .await
        .expect("a subnormal label weight");
    assert_eq!(reply.tot, 1.0);
    let reply = client
        .harmonize_histogram(JOBS[2], 0, 0, vec![0; 10], f64::from_bits(1))
        .await
        .expect("a subnormal histogram tot");
    assert_eq!(reply.tot, 1.0);
    for tot in [
        -f64::from_bits(1),
        -1e-300,
        f64::NEG_INFINITY,
        f64::from_bits(0x7ff8_0000_0000_0001),
    ] {
        let result = client
            .harmonize_histogram(JOBS[2], 0, 0, vec![0; 10], tot)
            .await;
        assert_status(
            result,
            Code::InvalidArgument,
            &["histogram.tot"],
            &format!("tot {tot:e}"),
        );
    }
    // A tot whose weights would overflow float32 (the fuzzer found it): refused, not weighed
    // by infinity.
    let one_bin = [vec![1], vec![0; 9]].concat();
    let result = client
        .harmonize_histogram(JOBS[2], 0, 0, one_bin, 1e38)
        .await;
    assert_status(
        result,
        Code::InvalidArgument,
        &["histogram.tot", "float32"],
        "tot 1e38",
    );
    let result = client
        .harmonize_norms(JOBS[2], 0, 0, &[0.5, 0.5], Some(&[f32::MAX, f32::MAX]))
        .await;
    assert_status(
        result,
        Code::InvalidArgument,
        &["label_weights", "float32"],
        "huge label weights",
    );
    // An empty histogram of 4096 bins against a 10-bin job, and one of 10,000,000 entries.
    for len in [4096, 10_000_000] {
        let result = client
            .harmonize_histogram(JOBS[2], 0, 0, vec![0; len], 0.0)
            .await;
        assert_status(
            result,
            Code::InvalidArgument,
            &["histogram.counts", &len.to_string()],
            "histogram length",
        );
    }
    // Byte lengths that are not a multiple of 4, for every bytes field.
    for len in [1usize, 2, 3, 5, 4095] {
        let bytes = Bytes::from(vec![0u8; len]);
        let norms = HarmonizeRequest {
            job_id: JOBS[0].to_owned(),
            input: Some(ghmd::proto::harmonize_request::Input::GradientNorms(
                bytes.clone(),
            )),
            ..Default::default()
        };
        assert_status(
            client.harmonize(norms).await,
            Code::InvalidArgument,
            &["gradient_norms", &format!("{len} bytes")],
            "odd norms",
        );
        let residuals = HarmonizeRequest {
            job_id: JOBS[2].to_owned(),
            input: Some(ghmd::proto::harmonize_request::Input::Residuals(
                bytes.clone(),
            )),
            ..Default::default()
        };
        assert_status(
            client.harmonize(residuals).await,
            Code::InvalidArgument,
            &["residuals", &format!("{len} bytes")],
            "odd residuals",
        );
        let weights = HarmonizeRequest {
            label_weights: bytes,
            ..norms_request(JOBS[0], 0, 0, &[0.5], None)
        };
        assert_status(
            client.harmonize(weights).await,
            Code::InvalidArgument,
            &["label_weights", &format!("{len} bytes")],
            "odd label weights",
        );
    }
    let after = snapshot(&mut client).await;
    assert_eq!(after[1], before[1], "the step-synchronous job changed");
    assert_eq!(
        after[0].state.as_ref().map(|s| s.steps),
        Some(2),
        "one good step only"
    );
    assert_eq!(
        after[2].state.as_ref().map(|s| s.steps),
        Some(3),
        "two good steps only"
    );
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn hostile_update_and_restore_values_are_refused_and_change_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    three_jobs(&mut client).await;
    let before = snapshot(&mut client).await;

    let duration = |seconds: i64, nanos: i32| Some(prost_types::Duration { seconds, nanos });
    #[rustfmt::skip]
    let updates: Vec<(&str, UpdateJobRequest, Code, &[&str])> = vec![
        ("world_size past the limit", UpdateJobRequest { job_id: JOBS[1].into(), world_size: 65537, from_step: 5, ..Default::default() }, Code::InvalidArgument, &["world_size"]),
        ("world_size u32::MAX", UpdateJobRequest { job_id: JOBS[1].into(), world_size: u32::MAX, from_step: 5, ..Default::default() }, Code::InvalidArgument, &["world_size"]),
        ("from_step in the past", UpdateJobRequest { job_id: JOBS[1].into(), world_size: 3, from_step: 0, ..Default::default() }, Code::FailedPrecondition, &["from_step"]),
        ("world_size of an async job", UpdateJobRequest { job_id: JOBS[0].into(), world_size: 3, from_step: 9, ..Default::default() }, Code::FailedPrecondition, &["world_size"]),
        ("negative step_timeout", UpdateJobRequest { job_id: JOBS[1].into(), step_timeout: duration(-1, 0), ..Default::default() }, Code::InvalidArgument, &["step_timeout"]),
        ("zero step_timeout", UpdateJobRequest { job_id: JOBS[1].into(), step_timeout: duration(0, 0), ..Default::default() }, Code::InvalidArgument, &["step_timeout"]),
        ("step_timeout above the cap", UpdateJobRequest { job_id: JOBS[1].into(), step_timeout: duration(i64::MAX, 999_999_999), ..Default::default() }, Code::InvalidArgument, &["step_timeout"]),
        ("step_timeout nanos negative", UpdateJobRequest { job_id: JOBS[1].into(), step_timeout: duration(1, -5), ..Default::default() }, Code::InvalidArgument, &["step_timeout"]),
        ("step_timeout nanos past a second", UpdateJobRequest { job_id: JOBS[1].into(), step_timeout: duration(0, i32::MAX), ..Default::default() }, Code::InvalidArgument, &["step_timeout"]),
    ];
    for (what, request, code, needles) in updates {
        assert_status(client.raw().update_job(request).await, code, needles, what);
    }

    let restore = |job: &str, acc_sum: Vec<f32>, next_step: u64| RestoreJobRequest {
        job_id: job.to_owned(),
        state: Some(JobState {
            acc_sum,
            steps: 1,
            elements: 1,
            next_step,
            ..Default::default()
        }),
    };
    let mut nan_late = vec![0.5f32; 10];
    nan_late[9] = f32::NAN;
    #[rustfmt::skip]
    let restores: Vec<(&str, RestoreJobRequest, &[&str])> = vec![
        ("no state", RestoreJobRequest { job_id: JOBS[0].into(), state: None }, &["state"]),
        ("acc_sum too short", restore(JOBS[0], vec![0.0; 9], 0), &["acc_sum", "9"]),
        ("acc_sum of 4096", restore(JOBS[0], vec![0.0; 4096], 0), &["acc_sum", "4096"]),
        ("acc_sum NaN", restore(JOBS[0], nan_late, 0), &["acc_sum[9]"]),
        ("acc_sum negative", restore(JOBS[0], [vec![0.0; 3], vec![-f32::from_bits(1)], vec![0.0; 6]].concat(), 0), &["acc_sum[3]"]),
        ("acc_sum infinite", restore(JOBS[1], [vec![f32::INFINITY], vec![0.0; 9]].concat(), 1), &["acc_sum[0]"]),
        ("next_step 2^64-1", restore(JOBS[1], vec![0.0; 10], u64::MAX), &["next_step"]),
        ("next_step of an async job", restore(JOBS[0], vec![0.0; 10], 3), &["next_step"]),
    ];
    for (what, request, needles) in restores {
        assert_status(
            client.raw().restore_job(request).await,
            Code::InvalidArgument,
            needles,
            what,
        );
    }
    assert_eq!(
        snapshot(&mut client).await,
        before,
        "a refused update or restore changed a job"
    );
    still_serving(&server).await;
    server.stop().await;
}

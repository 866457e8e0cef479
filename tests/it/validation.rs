//! Every well-formed but bad value: a bad spec creates nothing, a bad input is refused naming
//! its field and index, in a unary call and on a stream alike, and leaves the job unchanged.
//! (What is not even well-formed is in `hostile`.)

use bytes::Bytes;
use ghmd::client::{bytes_to_f32s, f32s_to_bytes};
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{CreateJobRequest, HarmonizeRequest, JobSpec, Loss};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::support::fixture::fingerprint;
use crate::support::request::{histogram, norms, request, residuals};
use crate::support::{TestServer, assert_status, ghm_c, ghm_r};

#[tokio::test]
async fn bad_specs_are_invalid_argument_and_create_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let cases: Vec<(&str, Option<JobSpec>, &str)> = vec![
        ("missing spec", None, "spec"),
        (
            "unspecified loss",
            Some(JobSpec {
                loss: 0,
                ..ghm_c(10, 0.0)
            }),
            "spec.loss",
        ),
        (
            "unknown loss",
            Some(JobSpec {
                loss: 7,
                ..ghm_c(10, 0.0)
            }),
            "spec.loss",
        ),
        ("bins 0", Some(ghm_c(0, 0.0)), "spec.bins"),
        ("bins 4097", Some(ghm_c(4097, 0.0)), "spec.bins"),
        ("GHM-R bins 4097", Some(ghm_r(4097, 0.0)), "spec.bins"),
        ("momentum 1", Some(ghm_c(10, 1.0)), "spec.momentum"),
        ("momentum NaN", Some(ghm_c(10, f64::NAN)), "spec.momentum"),
        ("momentum -0.1", Some(ghm_c(10, -0.1)), "spec.momentum"),
        (
            "momentum inf",
            Some(ghm_c(10, f64::INFINITY)),
            "spec.momentum",
        ),
        (
            "negative mu",
            Some(JobSpec {
                mu: -0.02,
                ..ghm_r(10, 0.0)
            }),
            "spec.mu",
        ),
        (
            "NaN mu",
            Some(JobSpec {
                mu: f64::NAN,
                ..ghm_r(10, 0.0)
            }),
            "spec.mu",
        ),
        (
            "infinite mu",
            Some(JobSpec {
                mu: f64::INFINITY,
                ..ghm_r(10, 0.0)
            }),
            "spec.mu",
        ),
        (
            "mu whose float32 square is 0",
            Some(JobSpec {
                mu: 1e-30,
                ..ghm_r(10, 0.0)
            }),
            "spec.mu",
        ),
        (
            "mu whose float32 square is infinite",
            Some(JobSpec {
                mu: 1e25,
                ..ghm_r(10, 0.0)
            }),
            "spec.mu",
        ),
        (
            "mu for GHM-C",
            Some(JobSpec {
                mu: 0.02,
                ..ghm_c(10, 0.0)
            }),
            "spec.mu",
        ),
    ];
    for (index, (what, spec, field)) in cases.into_iter().enumerate() {
        let job_id = format!("spec/{index}");
        let result = client
            .raw()
            .create_job(CreateJobRequest {
                job_id: job_id.clone(),
                spec,
                ..Default::default()
            })
            .await;
        assert_status(result, Code::InvalidArgument, &[field], what);
        assert_status(
            client.get_job(&job_id).await,
            Code::NotFound,
            &[],
            &format!("{what}: no job left behind"),
        );
    }
    // The edges of every range are accepted, and a GHM-R job weighs any finite residual,
    // 0 included.
    for (index, spec) in [
        ghm_c(1, 0.0),
        ghm_c(4096, 1.0f64.next_down()),
        ghm_r(1, 0.0),
        JobSpec {
            mu: 1e-20,
            ..ghm_r(4096, 0.5)
        },
        JobSpec {
            mu: 1e18,
            ..ghm_r(30, 0.0)
        },
    ]
    .into_iter()
    .enumerate()
    {
        let job_id = format!("edge/{index}");
        client
            .create_job(&job_id, spec)
            .await
            .unwrap_or_else(|e| panic!("{spec:?}: {e}"));
        if spec.loss == i32::from(Loss::GhmR) {
            let response = client
                .harmonize(request(
                    &job_id,
                    residuals(&[0.0, -0.0, 1e-30, -1.0, 3e30]),
                    Bytes::new(),
                ))
                .await
                .unwrap_or_else(|e| panic!("residuals for {spec:?}: {e}"));
            assert_eq!(bytes_to_f32s(&response.weights).len(), 5);
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn every_bad_input_is_rejected_naming_field_and_index_and_leaves_the_job_unchanged() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let c = "bad/ghm-c";
    let r = "bad/ghm-r";
    client.create_job(c, ghm_c(10, 0.75)).await.expect("create");
    client.create_job(r, ghm_r(10, 0.7)).await.expect("create");
    // A first good step, so that there is an EMA state to disturb.
    client
        .harmonize_norms(c, 0, 0, &[0.05, 0.5, 0.95, 1.0], None)
        .await
        .expect("good step");
    client
        .harmonize_norms(r, 0, 0, &[0.05, 0.5, 999.0], Some(&[1.0, 0.5, 2.0]))
        .await
        .expect("good step");

    let tiny_negative = -f32::from_bits(1);
    let mut long_norms = vec![0.5f32; 10_000];
    long_norms[5000] = f32::NAN;
    long_norms[9000] = -1.0;
    let mut long_label_weights = vec![1.0f32; 6000];
    long_label_weights[4097] = -2.0;
    long_label_weights[5999] = f32::NAN;

    let none = Bytes::new();
    let lw = |values: &[f32]| f32s_to_bytes(values);
    #[rustfmt::skip]
    let cases: Vec<(&str, HarmonizeRequest, &[&str])> = vec![
        // Gradient norms: non-finite, negative, out of range; the first bad index is named.
        ("NaN norm", request(c, norms(&[0.1, 0.2, 0.3, f32::NAN, 0.4, 2.0]), none.clone()), &["gradient_norms[3]"]),
        ("+inf norm", request(c, norms(&[0.1, 0.2, f32::INFINITY]), none.clone()), &["gradient_norms[2]"]),
        ("-inf norm", request(c, norms(&[f32::NEG_INFINITY, f32::NAN]), none.clone()), &["gradient_norms[0]"]),
        ("negative norm", request(c, norms(&[0.5, -0.5]), none.clone()), &["gradient_norms[1]"]),
        ("tiny negative norm", request(c, norms(&[0.5, 0.5, 0.5, 0.5, tiny_negative]), none.clone()), &["gradient_norms[4]"]),
        ("GHM-C norm one ulp above 1", request(c, norms(&[0.0, 1.0, 0.2, 0.3, 0.4, 1.0f32.next_up()]), none.clone()), &["gradient_norms[5]"]),
        ("GHM-C norm 2", request(c, norms(&[2.0]), none.clone()), &["gradient_norms[0]"]),
        ("bad norm in a later block", request(c, norms(&long_norms), none.clone()), &["gradient_norms[5000]"]),
        ("bad norm of an invalid element", request(c, norms(&[0.5, 7.0]), lw(&[1.0, 0.0])), &["gradient_norms[1]"]),
        ("GHM-R norm 1000", request(r, norms(&[0.5, 999.9, 1000.0]), none.clone()), &["gradient_norms[2]"]),
        ("GHM-R tiny negative norm", request(r, norms(&[tiny_negative]), none.clone()), &["gradient_norms[0]"]),
        ("GHM-R +inf norm", request(r, norms(&[1.0, f32::INFINITY]), none.clone()), &["gradient_norms[1]"]),
        ("GHM-R NaN norm", request(r, norms(&[f32::NAN]), none.clone()), &["gradient_norms[0]"]),
        // Byte lengths.
        ("norms of 13 bytes", request(c, Some(Input::GradientNorms(Bytes::from(vec![0u8; 13]))), none.clone()), &["gradient_norms", "13 bytes"]),
        ("residuals of 6 bytes", request(r, Some(Input::Residuals(Bytes::from(vec![0u8; 6]))), none.clone()), &["residuals", "6 bytes"]),
        ("label weights of 10 bytes", request(c, norms(&[0.1, 0.2, 0.3]), Bytes::from(vec![0u8; 10])), &["label_weights", "10 bytes"]),
        // Label weights.
        ("fewer label weights", request(c, norms(&[0.1, 0.2, 0.3]), lw(&[1.0, 1.0])), &["label_weights", "2", "gradient_norms", "3"]),
        ("more label weights", request(r, residuals(&[0.1, 0.2]), lw(&[1.0, 1.0, 1.0])), &["label_weights", "3", "residuals", "2"]),
        ("negative label weight", request(c, norms(&[0.1, 0.2, 0.3]), lw(&[1.0, 0.0, -0.5])), &["label_weights[2]"]),
        ("tiny negative label weight", request(r, norms(&[0.1, 0.2]), lw(&[tiny_negative, 1.0])), &["label_weights[0]"]),
        ("NaN label weight", request(r, norms(&[0.1, 0.2]), lw(&[1.0, f32::NAN])), &["label_weights[1]"]),
        ("+inf label weight", request(c, norms(&[0.1, 0.2]), lw(&[f32::INFINITY, 1.0])), &["label_weights[0]"]),
        ("bad label weight in a later block", request(c, norms(&vec![0.5; 6000]), lw(&long_label_weights)), &["label_weights[4097]"]),
        // Histograms.
        ("short histogram", request(c, histogram(vec![1, 2, 3], 6.0), none.clone()), &["histogram.counts", "3", "10"]),
        ("long GHM-R histogram", request(r, histogram(vec![1; 11], 11.0), none.clone()), &["histogram.counts", "11"]),
        ("negative histogram tot", request(r, histogram(vec![1; 10], -1.0), none.clone()), &["histogram.tot"]),
        ("NaN histogram tot", request(r, histogram(vec![1; 10], f64::NAN), none.clone()), &["histogram.tot"]),
        ("infinite histogram tot", request(r, histogram(vec![1; 10], f64::INFINITY), none.clone()), &["histogram.tot"]),
        ("GHM-C histogram negative tot", request(c, histogram(vec![0; 10], -1.0), none.clone()), &["histogram.tot"]),
        ("GHM-C histogram tot != sum(counts)", request(c, histogram(vec![1; 10], 9.0), none.clone()), &["histogram.tot", "10"]),
        ("histogram counts overflowing", request(r, histogram([vec![u64::MAX, 1], vec![0; 8]].concat(), 1.0), none.clone()), &["histogram.counts"]),
        ("label weights with a histogram", request(r, histogram(vec![1; 10], 10.0), lw(&[1.0; 10])), &["label_weights", "histogram"]),
        // Residuals.
        ("residuals for GHM-C", request(c, residuals(&[0.1]), none.clone()), &["residuals"]),
        ("NaN residual", request(r, residuals(&[0.1, f32::NAN]), none.clone()), &["residuals[1]"]),
        ("+inf residual", request(r, residuals(&[f32::INFINITY]), none.clone()), &["residuals[0]"]),
        ("-inf residual", request(r, residuals(&[-3.0, 5.0, f32::NEG_INFINITY]), none.clone()), &["residuals[2]"]),
        ("bad label weight with residuals", request(r, residuals(&[0.1, 0.2]), lw(&[1.0, -1.0])), &["label_weights[1]"]),
        // The request as a whole.
        ("missing input", request(c, None, none.clone()), &["input"]),
        ("missing input with label weights", request(r, None, lw(&[1.0])), &["input"]),
        ("rank 1 on an asynchronous job", HarmonizeRequest { rank: 1, ..request(c, norms(&[0.5]), none.clone()) }, &["rank"]),
        ("rank 7 on an asynchronous job", HarmonizeRequest { rank: 7, ..request(r, histogram(vec![1; 10], 10.0), none.clone()) }, &["rank"]),
    ];

    for (what, bad, needles) in cases {
        let job_id = bad.job_id.clone();
        let before = fingerprint(&mut client, &job_id).await;
        assert_status(
            client.harmonize(bad.clone()).await,
            Code::InvalidArgument,
            needles,
            &format!("unary: {what}"),
        );
        // The same message in a stream ends it with the same status and no response.
        let mut stream = client
            .raw()
            .harmonize_stream(tokio_stream::iter(vec![bad]))
            .await
            .expect("stream opens")
            .into_inner();
        let first = stream.next().await.expect("the stream ends with a status");
        assert_status(
            first,
            Code::InvalidArgument,
            needles,
            &format!("stream: {what}"),
        );
        assert!(
            stream.next().await.is_none(),
            "{what}: nothing after the status"
        );
        assert_eq!(
            fingerprint(&mut client, &job_id).await,
            before,
            "{what}: the job changed"
        );
    }

    // The jobs still work, from the state of their first step.
    for job_id in [c, r] {
        let (response, _) = client
            .harmonize_norms(job_id, 1, 0, &[0.5], None)
            .await
            .expect("a good step after the bad ones");
        assert_eq!(fingerprint(&mut client, job_id).await.steps, 2);
        assert!(!response.acc_sum.is_empty());
    }
    server.stop().await;
}

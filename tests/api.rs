//! The gRPC surface of a real server on port 0: health, reflection, the job lifecycle, every
//! rejected input (and that it leaves the job as it was), streams, concurrency on one job, a
//! 16M-element batch next to small requests, the receive and send limits, and a graceful stop of
//! the real binary on SIGTERM.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::TestServer;
use ghmd::client::{Client, bytes_to_f32s, f32s_to_bytes, norms_request};
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{
    CreateJobRequest, HarmonizeRequest, HarmonizeResponse, Histogram, Job, JobSpec,
    ListJobsRequest, Loss,
};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

// ---------------------------------------------------------------------------------------------
// Helpers.

fn ghm_c(bins: u32, momentum: f64) -> JobSpec {
    JobSpec {
        loss: Loss::GhmC.into(),
        bins,
        momentum,
        ..Default::default()
    }
}

fn ghm_r(bins: u32, momentum: f64) -> JobSpec {
    JobSpec {
        loss: Loss::GhmR.into(),
        bins,
        momentum,
        ..Default::default()
    }
}

fn request(job_id: &str, input: Option<Input>, label_weights: Bytes) -> HarmonizeRequest {
    HarmonizeRequest {
        job_id: job_id.to_owned(),
        step: 0,
        rank: 0,
        input,
        label_weights,
    }
}

fn norms(values: &[f32]) -> Option<Input> {
    Some(Input::GradientNorms(f32s_to_bytes(values)))
}

fn residuals(values: &[f32]) -> Option<Input> {
    Some(Input::Residuals(f32s_to_bytes(values)))
}

fn histogram(counts: Vec<u64>, tot: f64) -> Option<Input> {
    Some(Input::Histogram(Histogram { counts, tot }))
}

/// The bin of `g` by scanning the contract's float32 edges, independent of the server's lookup.
fn scan_bin(loss: Loss, bins: u32, g: f32) -> Option<usize> {
    let edge = |i: u32| -> f32 {
        match (i == bins, loss) {
            (true, Loss::GhmR) => 1000.0,
            (true, _) => i as f32 / bins as f32 + 1e-6f32,
            (false, _) => i as f32 / bins as f32,
        }
    };
    (0..bins)
        .find(|&i| edge(i) <= g && g < edge(i + 1))
        .map(|i| i as usize)
}

/// Everything about a job that a rejected request must leave alone.
#[derive(Debug, PartialEq)]
struct Fingerprint {
    acc_sum_bits: Vec<u32>,
    steps: u64,
    elements: u64,
    update_time: Option<prost_types::Timestamp>,
}

async fn fingerprint(client: &mut Client, job_id: &str) -> Fingerprint {
    let job = client.get_job(job_id).await.expect("get job");
    let state = job.state.expect("state");
    Fingerprint {
        acc_sum_bits: common::bits(&state.acc_sum),
        steps: state.steps,
        elements: state.elements,
        update_time: job.update_time,
    }
}

fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    needles: &[&str],
    context: &str,
) {
    let status = match result {
        Ok(value) => panic!("{context}: expected {code:?}, got OK {value:?}"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        code,
        "{context}: wrong code ({})",
        status.message()
    );
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{context}: message {:?} does not name {needle:?}",
            status.message()
        );
    }
}

/// A small deterministic generator (splitmix64), so that failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1], 1 included.
    fn unit(&mut self) -> f32 {
        (self.next() % ((1 << 24) + 1)) as f32 / (1u32 << 24) as f32
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `weights[i] == bin_weights[bin(g_i)]` for every valid element, 0 for the others.
fn assert_weights_follow_bin_weights(
    loss: Loss,
    bins: u32,
    norms: &[f32],
    label_weights: Option<&[f32]>,
    response: &HarmonizeResponse,
    context: &str,
) {
    let weights = bytes_to_f32s(&response.weights);
    assert_eq!(
        weights.len(),
        norms.len(),
        "{context}: one weight per element"
    );
    assert_eq!(
        response.bin_weights.len(),
        bins as usize,
        "{context}: M bin weights"
    );
    for (i, (&g, &w)) in norms.iter().zip(&weights).enumerate() {
        let valid = label_weights.is_none_or(|lw| lw[i] > 0.0);
        let expected = if valid {
            response.bin_weights[scan_bin(loss, bins, g).expect("valid norm")]
        } else {
            0.0
        };
        assert_eq!(
            w.to_bits(),
            expected.to_bits(),
            "{context}: weights[{i}] (g = {g:e})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Health and reflection.

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_harmonizer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "ghm.v1.Harmonizer"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "health of {service:?}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        })
        .await;
    assert_status(unknown, Code::NotFound, &[], "health of an unknown service");
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_and_describes_the_harmonizer() {
    use prost::Message;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let server = TestServer::start().await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let ask = |message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "ghm.v1.Harmonizer".to_owned(),
        )),
    ];
    let responses: Vec<ServerReflectionResponse> = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection stream")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("reflection answers");
    assert_eq!(responses.len(), 2);

    let Some(MessageResponse::ListServicesResponse(list)) = &responses[0].message_response else {
        panic!("not a service list: {:?}", responses[0]);
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in ["ghm.v1.Harmonizer", "grpc.health.v1.Health"] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }

    let Some(MessageResponse::FileDescriptorResponse(files)) = &responses[1].message_response
    else {
        panic!("no descriptor: {:?}", responses[1]);
    };
    let harmonizer = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("decode"))
        .flat_map(|file| file.service)
        .find(|service| service.name() == "Harmonizer")
        .expect("the descriptor holds the Harmonizer service");
    let methods: Vec<&str> = harmonizer.method.iter().map(|m| m.name()).collect();
    for expected in [
        "CreateJob",
        "GetJob",
        "ListJobs",
        "DeleteJob",
        "Harmonize",
        "HarmonizeStream",
    ] {
        assert!(methods.contains(&expected), "{expected} not in {methods:?}");
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The job lifecycle.

#[tokio::test]
async fn create_job_is_idempotent_for_the_same_spec_only() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let created = client
        .create_job("idem/a", ghm_c(10, 0.75))
        .await
        .expect("create");
    assert_eq!(created.job_id, "idem/a");
    assert_eq!(created.state.as_ref().expect("state").steps, 0);

    client
        .harmonize_norms("idem/a", 0, 0, &[0.1, 0.5, 0.9], None)
        .await
        .expect("a step");
    let again = client
        .create_job("idem/a", ghm_c(10, 0.75))
        .await
        .expect("the same spec again");
    assert_eq!(again.create_time, created.create_time, "the existing job");
    let state = again.state.expect("state");
    assert_eq!(
        (state.steps, state.elements),
        (1, 3),
        "the existing job's state, not a fresh one"
    );

    let before = fingerprint(&mut client, "idem/a").await;
    for (what, spec) in [
        ("bins", ghm_c(11, 0.75)),
        ("momentum", ghm_c(10, 0.7)),
        ("loss", ghm_r(10, 0.75)),
    ] {
        assert_status(
            client.create_job("idem/a", spec).await,
            Code::AlreadyExists,
            &["idem/a"],
            &format!("another {what}"),
        );
    }
    assert_eq!(fingerprint(&mut client, "idem/a").await, before);
    server.stop().await;
}

#[tokio::test]
async fn bad_job_ids_are_invalid_argument_everywhere() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let too_long = "a".repeat(129);
    for id in [
        "",
        too_long.as_str(),
        "has space",
        "colon:id",
        "star*",
        "ünïcode",
        "new\nline",
        "back\\slash",
    ] {
        let context = format!("job_id {id:?}");
        assert_status(
            client.create_job(id, ghm_c(10, 0.0)).await,
            Code::InvalidArgument,
            &["job_id"],
            &format!("CreateJob {context}"),
        );
        assert_status(
            client.get_job(id).await,
            Code::InvalidArgument,
            &["job_id"],
            &format!("GetJob {context}"),
        );
        assert_status(
            client.delete_job(id).await,
            Code::InvalidArgument,
            &["job_id"],
            &format!("DeleteJob {context}"),
        );
        assert_status(
            client.harmonize_norms(id, 0, 0, &[0.5], None).await,
            Code::InvalidArgument,
            &["job_id"],
            &format!("Harmonize {context}"),
        );
    }
    // The edges of the rule are accepted.
    let longest = "b".repeat(128);
    for id in [longest.as_str(), "t", "team/exp-1.run_2/A9"] {
        client
            .create_job(id, ghm_c(10, 0.0))
            .await
            .unwrap_or_else(|e| panic!("{id:?}: {e}"));
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_jobs_are_not_found_and_deleted_jobs_are_gone() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    assert_status(
        client.get_job("nope").await,
        Code::NotFound,
        &["nope"],
        "GetJob",
    );
    assert_status(
        client.delete_job("nope").await,
        Code::NotFound,
        &["nope"],
        "DeleteJob",
    );
    assert_status(
        client.harmonize_norms("nope", 0, 0, &[0.5], None).await,
        Code::NotFound,
        &["nope"],
        "Harmonize",
    );

    client
        .create_job("gone", ghm_c(10, 0.75))
        .await
        .expect("create");
    client
        .harmonize_norms("gone", 0, 0, &[0.5], None)
        .await
        .expect("a step");
    client.delete_job("gone").await.expect("delete");
    assert_status(client.get_job("gone").await, Code::NotFound, &[], "GetJob");
    assert_status(
        client.delete_job("gone").await,
        Code::NotFound,
        &[],
        "DeleteJob twice",
    );
    // A job created again under the same id starts from nothing.
    let fresh = client
        .create_job("gone", ghm_c(10, 0.75))
        .await
        .expect("create again");
    let state = fresh.state.expect("state");
    assert_eq!((state.steps, state.elements), (0, 0));
    assert!(state.acc_sum.iter().all(|&a| a == 0.0));
    server.stop().await;
}

#[tokio::test]
async fn list_jobs_pages_through_every_job_of_a_prefix_exactly_once() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut wanted = Vec::new();
    // Created out of order, with ids that sort differently than they were created.
    for i in (0..23).rev() {
        let id = format!("list/job-{i:02}");
        client
            .create_job(&id, ghm_c(10, 0.0))
            .await
            .expect("create");
        wanted.push(id);
    }
    for id in ["lis", "lisu/x", "list", "other/list/job"] {
        client.create_job(id, ghm_c(10, 0.0)).await.expect("create");
    }
    wanted.sort();

    for page_size in [1u32, 5, 7, 23, 24, 0, 5000] {
        let mut seen: Vec<String> = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = client
                .raw()
                .list_jobs(ListJobsRequest {
                    prefix: "list/".to_owned(),
                    page_size,
                    page_token: token.clone(),
                })
                .await
                .expect("list")
                .into_inner();
            pages += 1;
            assert!(pages <= 30, "page_size {page_size}: paging does not end");
            let limit = if page_size == 0 {
                100
            } else {
                page_size as usize
            };
            assert!(
                page.jobs.len() <= limit,
                "page_size {page_size}: page too big"
            );
            for job in &page.jobs {
                assert!(job.spec.is_some() && job.state.is_some(), "whole jobs");
            }
            seen.extend(page.jobs.into_iter().map(|job: Job| job.job_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(
            seen, wanted,
            "page_size {page_size}: every job once, in order"
        );
    }

    let everything = client
        .raw()
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("list all")
        .into_inner();
    assert_eq!(everything.jobs.len(), 27);
    assert!(everything.next_page_token.is_empty());

    assert_status(
        client
            .raw()
            .list_jobs(ListJobsRequest {
                page_token: "not a token!".to_owned(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["page_token"],
        "a forged page token",
    );
    server.stop().await;
}

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

// ---------------------------------------------------------------------------------------------
// Rejected inputs.

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

// ---------------------------------------------------------------------------------------------
// Streams.

#[tokio::test]
async fn a_stream_answers_each_request_in_order_and_stops_at_the_first_bad_one() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let streamed = "stream/job";
    let replayed = "stream/replay";
    client
        .create_job(streamed, ghm_c(10, 0.75))
        .await
        .expect("create");
    client
        .create_job(replayed, ghm_c(10, 0.75))
        .await
        .expect("create");

    let mut rng = Rng(7);
    let batches: Vec<Vec<f32>> = (0..4)
        .map(|_| (0..50 + rng.below(50)).map(|_| rng.unit()).collect())
        .collect();

    // One request at a time: each is answered before the next is sent.
    let (requests, inbound) = tokio::sync::mpsc::channel(1);
    let mut responses = client
        .raw()
        .harmonize_stream(tokio_stream::wrappers::ReceiverStream::new(inbound))
        .await
        .expect("stream opens")
        .into_inner();
    let mut answered = Vec::new();
    for (step, batch) in batches.iter().enumerate().take(3) {
        let good = norms_request(streamed, 100 + step as u64, 0, batch, None);
        requests.send(good).await.expect("send");
        let response = tokio::time::timeout(Duration::from_secs(30), responses.next())
            .await
            .expect("answered without waiting for more requests")
            .expect("a response")
            .expect("ok");
        assert_eq!(response.step, 100 + step as u64, "in request order");
        answered.push(response);
    }
    // A bad message, then a good one that must never be applied.
    requests
        .send(norms_request(streamed, 103, 0, &[0.5, f32::NAN], None))
        .await
        .expect("send");
    let _ = requests
        .send(norms_request(streamed, 104, 0, &batches[3], None))
        .await;
    let end = responses.next().await.expect("a final status");
    assert_status(
        end,
        Code::InvalidArgument,
        &["gradient_norms[1]"],
        "bad message",
    );
    assert!(responses.next().await.is_none(), "nothing after the status");
    drop(requests);

    // The job took exactly the three good steps: the same as replaying them one by one.
    for (step, batch) in batches.iter().enumerate().take(3) {
        let (replay, _) = client
            .harmonize_norms(replayed, step as u64, 0, batch, None)
            .await
            .expect("replay");
        assert_eq!(
            replay.weights, answered[step].weights,
            "step {step}: weights"
        );
        assert_eq!(
            common::bits(&replay.acc_sum),
            common::bits(&answered[step].acc_sum),
            "step {step}: acc_sum"
        );
    }
    let streamed_state = fingerprint(&mut client, streamed).await;
    let replayed_state = fingerprint(&mut client, replayed).await;
    assert_eq!(streamed_state.steps, 3);
    assert_eq!(
        streamed_state.elements,
        batches[..3].iter().map(|b| b.len() as u64).sum::<u64>()
    );
    assert_eq!(streamed_state.acc_sum_bits, replayed_state.acc_sum_bits);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Concurrency.

/// mmdetection's EMA update of the bins a step touches (tests/data/conformance/README.md).
fn ema(acc_sum: &[f32], counts: &[u64], momentum: f64) -> Vec<f32> {
    acc_sum
        .iter()
        .zip(counts)
        .map(|(&acc, &count)| {
            if count == 0 {
                acc
            } else {
                ((momentum as f32) * acc) + (((1.0 - momentum) * count as f64) as f32)
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_tasks_hammering_one_job_apply_every_request_as_one_whole_step() {
    const TASKS: u64 = 8;
    const REQUESTS: u64 = 50;
    const BINS: u32 = 10;
    const MOMENTUM: f64 = 0.75;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("hammer", ghm_c(BINS, MOMENTUM))
        .await
        .expect("create");

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let uri = server.uri();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(uri).await.expect("own connection");
            let mut rng = Rng(1000 + task);
            let mut done = Vec::new();
            for i in 0..REQUESTS {
                let len = 1 + rng.below(300) as usize;
                let norms: Vec<f32> = (0..len).map(|_| rng.unit()).collect();
                let label_weights: Vec<f32> = (0..len)
                    .map(|_| [0.0, 1.0, 0.5, 2.0][rng.below(4) as usize])
                    .collect();
                let (response, _) = client
                    .harmonize_norms(
                        "hammer",
                        task * REQUESTS + i,
                        0,
                        &norms,
                        Some(&label_weights),
                    )
                    .await
                    .expect("harmonize");
                done.push((norms, label_weights, response));
            }
            done
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }

    let valid: u64 = all
        .iter()
        .map(|(_, lw, _)| lw.iter().filter(|&&w| w > 0.0).count() as u64)
        .sum();
    let state = fingerprint(&mut client, "hammer").await;
    assert_eq!(state.steps, TASKS * REQUESTS, "every request is one step");
    assert_eq!(state.elements, valid, "every valid element counted once");

    // Each response is whole: its weights follow its own bin table, and that table is the one
    // its own acc_sum gives for its own counts (a mixed update would break either).
    let mut steps = Vec::new();
    for (norms, label_weights, response) in &all {
        let context = format!("step {}", response.step);
        assert_weights_follow_bin_weights(
            Loss::GhmC,
            BINS,
            norms,
            Some(label_weights),
            response,
            &context,
        );
        let mut counts = vec![0u64; BINS as usize];
        for (&g, &w) in norms.iter().zip(label_weights) {
            if w > 0.0 {
                counts[scan_bin(Loss::GhmC, BINS, g).expect("in range")] += 1;
            }
        }
        let tot = (counts.iter().sum::<u64>() as f64).max(1.0);
        let n = counts.iter().filter(|&&c| c > 0).count() as u32;
        assert_eq!(response.tot, tot, "{context}: tot");
        assert_eq!(response.nonempty_bins, n, "{context}: n");
        for (bin, &count) in counts.iter().enumerate() {
            let expected = if count > 0 {
                ((1.0f32 / response.acc_sum[bin]) * (tot as f32)) / n as f32
            } else {
                0.0
            };
            assert_eq!(
                response.bin_weights[bin].to_bits(),
                expected.to_bits(),
                "{context}: bin {bin} weight vs its acc_sum"
            );
        }
        steps.push((counts, common::bits(&response.acc_sum)));
    }

    // And the responses chain: starting from zeros, some order applies them one after another,
    // each response's acc_sum being the previous one's with its counts folded in. Equal
    // candidates give equal states, so taking the first that fits is enough.
    let mut acc = vec![0.0f32; BINS as usize];
    let mut left: Vec<usize> = (0..steps.len()).collect();
    while !left.is_empty() {
        let position = left
            .iter()
            .position(|&s| common::bits(&ema(&acc, &steps[s].0, MOMENTUM)) == steps[s].1);
        let Some(position) = position else {
            panic!(
                "after {} steps, no response continues the EMA from {acc:?}",
                steps.len() - left.len()
            );
        };
        let next = left.swap_remove(position);
        acc = ema(&acc, &steps[next].0, MOMENTUM);
    }
    assert_eq!(
        common::bits(&acc),
        state.acc_sum_bits,
        "the chain ends in the job's state"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Size.

/// 16,000,000 norms spread over [0, 1] with every edge of 30 bins present.
fn big_norms(len: usize) -> Vec<f32> {
    let mut rng = Rng(16);
    (0..len)
        .map(|i| {
            if i % 1000 == 0 {
                (i / 1000 % 31) as f32 / 30.0
            } else {
                rng.unit()
            }
        })
        .collect()
}

fn spot_check_big(norms: &[f32], response: &HarmonizeResponse, bins: u32) {
    let weights = bytes_to_f32s(&response.weights);
    assert_eq!(weights.len(), norms.len());
    assert_eq!(response.tot, norms.len() as f64);
    let mut rng = Rng(3);
    let mut indices: Vec<usize> = (0..20_000)
        .map(|_| rng.below(norms.len() as u64) as usize)
        .collect();
    indices.extend((0..norms.len()).step_by(1000).take(31));
    indices.extend([0, norms.len() - 1]);
    for i in indices {
        let bin = scan_bin(Loss::GhmC, bins, norms[i]).expect("in range");
        assert_eq!(
            weights[i].to_bits(),
            response.bin_weights[bin].to_bits(),
            "weights[{i}] (g = {:e})",
            norms[i]
        );
    }
    assert!(response.bin_weights.iter().all(|w| *w > 0.0));
}

/// One thread runs both the server and the clients here, so small requests can only be answered
/// while the big batch is weighed if the server weighs it off the async runtime. Counting them
/// is not enough (they are also answered while the 64 MB travel each way), so the test also
/// bounds the longest wait between two small answers by a third of the big request's time:
/// weighing on the runtime thread stalls it for more than half of that in a debug build, while
/// weighing on the blocking pool leaves gaps of a few percent. The bound is relative to the same
/// run, so a slow machine scales both sides.
#[tokio::test(flavor = "current_thread")]
async fn a_16m_element_request_succeeds_while_other_jobs_keep_answering() {
    const LEN: usize = 16_000_000;
    let server = TestServer::start().await;
    let mut small = server.client().await;
    small
        .create_job("big", ghm_c(30, 0.0))
        .await
        .expect("create");
    small
        .create_job("small", ghm_c(10, 0.75))
        .await
        .expect("create");
    let norms = big_norms(LEN);
    let request = request(
        "big",
        Some(Input::GradientNorms(f32s_to_bytes(&norms))),
        Bytes::new(),
    );

    let mut big_client = server.client().await;
    let started = Instant::now();
    let big = tokio::spawn(async move { big_client.harmonize(request).await });
    let mut answered_meanwhile = 0u32;
    let mut last_answer = Instant::now();
    let mut longest_wait = Duration::ZERO;
    while !big.is_finished() {
        let (response, weights) = small
            .harmonize_norms("small", 0, 0, &[0.05, 0.5, 0.95], None)
            .await
            .expect("a small request during the big one");
        assert_eq!(weights.len(), 3);
        assert_eq!(response.nonempty_bins, 3);
        if !big.is_finished() {
            answered_meanwhile += 1;
            longest_wait = longest_wait.max(last_answer.elapsed());
            last_answer = Instant::now();
        }
    }
    let response = big.await.expect("task").expect("the big request succeeds");
    let elapsed = started.elapsed();
    eprintln!(
        "{answered_meanwhile} small requests answered during the {elapsed:?} of the big one; \
         the longest wait between two was {longest_wait:?}"
    );
    assert!(
        answered_meanwhile >= 5,
        "only {answered_meanwhile} small requests were answered during the big one"
    );
    assert!(
        longest_wait < elapsed / 3,
        "the small requests waited {longest_wait:?} at once during the {elapsed:?} big request"
    );
    spot_check_big(&norms, &response, 30);
    let state = fingerprint(&mut small, "big").await;
    assert_eq!((state.steps, state.elements), (1, LEN as u64));
    server.stop().await;
}

#[tokio::test]
async fn a_message_above_the_receive_limit_is_refused_and_the_server_carries_on() {
    const LIMIT: usize = 1 << 20;
    let server = TestServer::start_with(|config| config.max_recv_message_bytes = LIMIT).await;
    let mut client = server.client().await;
    client
        .create_job("limit", ghm_c(10, 0.75))
        .await
        .expect("create");
    let too_many = vec![0.5f32; LIMIT / 4 + 1];
    let refused = client.harmonize_norms("limit", 0, 0, &too_many, None).await;
    let status = refused.expect_err("a message above the limit");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    // Just under the limit still passes, on the same connection.
    let fits = vec![0.5f32; (LIMIT - 64) / 4];
    let (response, weights) = client
        .harmonize_norms("limit", 1, 0, &fits, None)
        .await
        .expect("a message under the limit");
    assert_eq!(weights.len(), fits.len());
    assert_eq!(response.nonempty_bins, 1);
    let state = fingerprint(&mut client, "limit").await;
    assert_eq!(
        (state.steps, state.elements),
        (1, fits.len() as u64),
        "only the message that fit was applied"
    );
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

// ---------------------------------------------------------------------------------------------
// The real binary.

/// `ghmd serve` as a child process, killed if the test fails before it exits.
struct Daemon {
    child: std::process::Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port nobody listens on right now: bind port 0 and let it go.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// SIGTERM through the shell's `kill` builtin, which every POSIX `sh` has, so that the test
/// needs neither a signal crate nor an `unsafe` call.
fn send_sigterm(pid: u32) {
    let status = std::process::Command::new("sh")
        .args(["-c", "kill -TERM \"$0\"", &pid.to_string()])
        .status()
        .expect("sh");
    assert!(status.success(), "kill -TERM {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_request_finish_and_exits_zero() {
    const LEN: usize = 16_000_000;
    let port = free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ghmd"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--in-memory", "--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ghmd");
    let mut daemon = Daemon { child };

    let uri = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        match Client::connect(uri.clone()).await {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("ghmd did not start listening on {uri}: {error}"),
        }
    };
    client
        .create_job("shutdown", ghm_c(30, 0.0))
        .await
        .expect("create");

    let norms = big_norms(LEN);
    let request = request(
        "shutdown",
        Some(Input::GradientNorms(f32s_to_bytes(&norms))),
        Bytes::new(),
    );
    // An open stream that has had one answer: certainly in flight on the server.
    let (stream_requests, inbound) = tokio::sync::mpsc::channel(1);
    let mut stream = client
        .raw()
        .harmonize_stream(tokio_stream::wrappers::ReceiverStream::new(inbound))
        .await
        .expect("stream opens")
        .into_inner();
    stream_requests
        .send(norms_request("shutdown", 0, 0, &[0.5], None))
        .await
        .expect("send");
    stream
        .next()
        .await
        .expect("a response")
        .expect("the first stream request");

    // The big request shares the connection with a small one sent after it: once the small one
    // is answered, the server has opened the big one's stream (HTTP/2 handles a connection's
    // frames in order), and the big one is still uploading or being weighed.
    let mut big_client = client.clone();
    let big = tokio::spawn(async move { big_client.harmonize(request).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.get_job("shutdown").await.expect("a small request");
    assert!(
        !big.is_finished(),
        "the big request ended before SIGTERM; the test proves nothing"
    );
    send_sigterm(daemon.child.id());

    let response = big
        .await
        .expect("task")
        .expect("the in-flight request completes after SIGTERM");
    spot_check_big(&norms, &response, 30);

    // The open stream is served to its end too.
    stream_requests
        .send(norms_request("shutdown", 1, 0, &[0.25, 0.75], None))
        .await
        .expect("send after SIGTERM");
    let after = stream
        .next()
        .await
        .expect("a response")
        .expect("the stream keeps answering after SIGTERM");
    assert_eq!(after.step, 1);
    drop(stream_requests);
    assert!(stream.next().await.is_none(), "the stream ends cleanly");

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = daemon.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "ghmd did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut log = String::new();
    if let Some(mut stderr) = daemon.child.stderr.take() {
        use std::io::Read;
        let _ = stderr.read_to_string(&mut log);
    }
    assert!(
        status.success(),
        "ghmd exited with {status}; its log:\n{log}"
    );
    assert!(
        log.contains("shutting down"),
        "no shutdown in the log:\n{log}"
    );
    assert!(
        !log.contains("outlived the shutdown grace"),
        "ghmd waited out its grace period instead of stopping when the work was done:\n{log}"
    );
}

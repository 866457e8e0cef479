//! The reference vectors of mmdetection's GHMC/GHMR, bit for bit: through the pure `ghm` module
//! and through the gRPC API of a real server (unary, streaming, and GHM-R from residuals).

use ghmd::client::{bytes_to_f32s, f32s_to_bytes};
use ghmd::ghm::{self, BinEdges, Density, InputField};
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{HarmonizeRequest, HarmonizeResponse};
use tokio_stream::StreamExt;

use crate::support::vectors::{Case, Step, conformance_cases, f32s};
use crate::support::{TestServer, bits, le};

fn check_step(
    case: &Case,
    index: usize,
    step: &Step,
    weights: &[f32],
    tot: f64,
    n: u32,
    acc: &[f32],
) {
    let context = format!("{} step {index}", case.name);
    assert_eq!(
        bits(weights),
        bits(&f32s(&step.expected.weights)),
        "{context}: weights"
    );
    assert_eq!(tot, step.expected.tot, "{context}: tot");
    assert_eq!(n, step.expected.nonempty_bins, "{context}: nonempty_bins");
    assert_eq!(
        bits(acc),
        bits(&f32s(&step.expected.acc_sum)),
        "{context}: acc_sum"
    );
}

#[test]
fn every_case_matches_bit_for_bit_through_the_pure_module() {
    for case in conformance_cases() {
        let edges = BinEdges::new(case.loss(), case.bins as usize);
        let mut density = Density::new(case.bins as usize);
        for (index, step) in case.steps.iter().enumerate() {
            let norms = le(&f32s(&step.gradient_norms));
            let label_weights = le(&f32s(&step.label_weights));
            let counts = ghm::count_batch(
                case.loss(),
                &edges,
                &norms,
                InputField::GradientNorms,
                Some(&label_weights),
            )
            .expect("valid batch");
            let table = density.step(case.momentum, &counts);
            let weights = bytes_to_f32s(&ghm::write_weights(
                &edges,
                &table,
                &norms,
                Some(&label_weights),
            ));
            let acc = if case.momentum > 0.0 {
                density.acc_sum().to_vec()
            } else {
                Vec::new()
            };
            check_step(
                &case,
                index,
                step,
                &weights,
                table.tot,
                table.nonempty_bins,
                &acc,
            );
        }
    }
}

fn request(job_id: &str, index: usize, step: &Step, from_residuals: bool) -> HarmonizeRequest {
    let input = if from_residuals {
        Input::Residuals(f32s_to_bytes(&f32s(&step.residuals)))
    } else {
        Input::GradientNorms(f32s_to_bytes(&f32s(&step.gradient_norms)))
    };
    HarmonizeRequest {
        job_id: job_id.to_owned(),
        step: index as u64,
        rank: 0,
        input: Some(input),
        label_weights: f32s_to_bytes(&f32s(&step.label_weights)),
        ..Default::default()
    }
}

fn check_response(case: &Case, index: usize, step: &Step, response: &HarmonizeResponse) {
    assert_eq!(response.step, index as u64);
    check_step(
        case,
        index,
        step,
        &bytes_to_f32s(&response.weights),
        response.tot,
        response.nonempty_bins,
        &response.acc_sum,
    );
}

#[tokio::test]
async fn every_case_matches_bit_for_bit_over_unary_grpc() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for case in conformance_cases() {
        let job_id = format!("unary/{}", case.name);
        client
            .create_job(&job_id, case.proto_spec())
            .await
            .expect("create");
        for (index, step) in case.steps.iter().enumerate() {
            let response = client
                .harmonize(request(&job_id, index, step, false))
                .await
                .expect("harmonize");
            check_response(&case, index, step, &response);
        }
        let job = client.get_job(&job_id).await.expect("get");
        let state = job.state.expect("state");
        assert_eq!(state.steps, case.steps.len() as u64);
    }
    server.stop().await;
}

#[tokio::test]
async fn every_case_matches_bit_for_bit_over_a_stream() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for case in conformance_cases() {
        let job_id = format!("stream/{}", case.name);
        client
            .create_job(&job_id, case.proto_spec())
            .await
            .expect("create");
        let requests: Vec<HarmonizeRequest> = case
            .steps
            .iter()
            .enumerate()
            .map(|(index, step)| request(&job_id, index, step, false))
            .collect();
        let mut responses = client
            .raw()
            .harmonize_stream(tokio_stream::iter(requests))
            .await
            .expect("stream opens")
            .into_inner();
        for (index, step) in case.steps.iter().enumerate() {
            let response = responses
                .next()
                .await
                .expect("one response per request")
                .expect("ok");
            check_response(&case, index, step, &response);
        }
        assert!(responses.next().await.is_none(), "no extra responses");
    }
    server.stop().await;
}

/// g derived from residuals may differ from the reference's by an ulp (its vectorised sqrt is not
/// always correctly rounded), so compare g within 2 ulp, and weights only away from bin edges.
#[tokio::test]
async fn ghm_r_cases_match_when_the_server_derives_norms_from_residuals() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs();
    let mut compared = 0usize;
    for case in conformance_cases().into_iter().filter(Case::is_ghm_r) {
        let edges = BinEdges::new(case.loss(), case.bins as usize);
        let job_id = format!("residuals/{}", case.name);
        client
            .create_job(&job_id, case.proto_spec())
            .await
            .expect("create");
        for (index, step) in case.steps.iter().enumerate() {
            let derived =
                ghm::norms_from_residuals(&le(&f32s(&step.residuals)), 0.02).expect("finite");
            let reference = f32s(&step.gradient_norms);
            for (i, (d, r)) in derived.iter().zip(&reference).enumerate() {
                assert!(
                    ulps(f32::from_le_bytes(*d), *r) <= 2,
                    "{} step {index}: g[{i}]",
                    case.name
                );
            }
            let response = client
                .harmonize(request(&job_id, index, step, true))
                .await
                .expect("harmonize");
            let weights = bytes_to_f32s(&response.weights);
            let expected = f32s(&step.expected.weights);
            let near_edge = |g: f32| edges.edges().iter().any(|&e| ulps(g, e) <= 2);
            let mut any_near_edge = false;
            for (i, &g) in reference.iter().enumerate() {
                if near_edge(g) {
                    any_near_edge = true;
                } else {
                    assert_eq!(
                        weights[i].to_bits(),
                        expected[i].to_bits(),
                        "{} step {index}: w[{i}]",
                        case.name
                    );
                    compared += 1;
                }
            }
            if !any_near_edge {
                assert_eq!(response.tot, step.expected.tot);
                assert_eq!(response.nonempty_bins, step.expected.nonempty_bins);
                assert_eq!(bits(&response.acc_sum), bits(&f32s(&step.expected.acc_sum)));
            }
        }
    }
    assert!(
        compared > 1000,
        "the residual path compared only {compared} weights"
    );
    server.stop().await;
}

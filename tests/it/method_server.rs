//! Seesaw and EQLv2 through a real server (issue 11): every conformance vector step, unary and
//! on a stream, bit for bit in the response and in GetJob; W ranks through the real step barrier,
//! arriving in shuffled orders, against `Method::step` on the rank-ordered contributions; every
//! bad spec, input and state refused with its field and index and no state change; the state
//! across a restart of the real binary, through a reseed on another replica, and in /metrics.

use std::time::Duration;

use ghmd::client::{Client, f32s_to_bytes};
use ghmd::eqlv2::{Eqlv2, GradContribution};
use ghmd::method::Method;
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{
    AppliedStep, Eqlv2Contribution, Eqlv2Spec, Eqlv2State, HarmonizeRequest, HarmonizeResponse,
    Job, JobSpec, JobState, Loss, ReseedJobRequest, RestoreJobRequest, SeesawContribution,
    SeesawSpec, SeesawState, applied_step, harmonize_response, job_spec, job_state,
};
use ghmd::seesaw::{LabelCounts, Seesaw};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::support::request::job_state;
use crate::support::spec::{eqlv2, seesaw, step_synchronous, with_eqlv2, with_seesaw, with_world};
use crate::support::vectors::{Eqlv2Case, SeesawCase, eqlv2_cases, f32s, seesaw_cases};
use crate::support::{Draw, Ghmd, SplitMix, TempDir, TestServer, assert_status, bits, ghm_c};

// ---------------------------------------------------------------------------------------------
// Specs, requests and states as the tests write them.

fn step_request(job_id: &str, step: u64, rank: u32, input: Input) -> HarmonizeRequest {
    HarmonizeRequest {
        job_id: job_id.to_owned(),
        step,
        rank,
        input: Some(input),
        ..Default::default()
    }
}

fn counts_input(label_counts: &[u64]) -> Input {
    Input::Seesaw(SeesawContribution {
        label_counts: label_counts.to_vec(),
        labels: Vec::new(),
    })
}

fn labels_input(labels: &[i64]) -> Input {
    Input::Seesaw(SeesawContribution {
        label_counts: Vec::new(),
        labels: labels.to_vec(),
    })
}

fn grads_input(pos_grad: &[f32], neg_grad: &[f32]) -> Input {
    Input::Eqlv2(Eqlv2Contribution {
        pos_grad: f32s_to_bytes(pos_grad),
        neg_grad: f32s_to_bytes(neg_grad),
    })
}

fn grad_input(contribution: &GradContribution) -> Input {
    grads_input(&contribution.pos_grad, &contribution.neg_grad)
}

fn raw_grads_input(pos_grad: Vec<u8>, neg_grad: Vec<u8>) -> Input {
    Input::Eqlv2(Eqlv2Contribution {
        pos_grad: pos_grad.into(),
        neg_grad: neg_grad.into(),
    })
}

/// The state a response carries, as a JobState's `method_state` (the same messages).
fn response_state(response: &HarmonizeResponse) -> job_state::MethodState {
    match response.method_state.clone() {
        Some(harmonize_response::MethodState::Seesaw(state)) => {
            job_state::MethodState::Seesaw(state)
        }
        Some(harmonize_response::MethodState::Eqlv2(state)) => job_state::MethodState::Eqlv2(state),
        None => panic!("a Seesaw or EQLv2 response without its state: {response:?}"),
    }
}

fn stored_state(state: &JobState) -> job_state::MethodState {
    state
        .method_state
        .clone()
        .unwrap_or_else(|| panic!("a Seesaw or EQLv2 job without its state: {state:?}"))
}

/// A method state by its bits, so that -0.0, NaN payloads and every rounding show.
fn state_bits(state: &job_state::MethodState) -> (&'static str, Vec<Vec<u32>>) {
    match state {
        job_state::MethodState::Seesaw(s) => ("seesaw", vec![bits(&s.cum_samples)]),
        job_state::MethodState::Eqlv2(s) => (
            "eqlv2",
            vec![bits(&s.pos_grad), bits(&s.neg_grad), bits(&s.pos_neg)],
        ),
    }
}

fn seesaw_proto(state: &ghmd::seesaw::SeesawState) -> job_state::MethodState {
    job_state::MethodState::Seesaw(SeesawState {
        cum_samples: state.cum_samples().to_vec(),
    })
}

fn eqlv2_proto(state: &ghmd::eqlv2::Eqlv2State) -> job_state::MethodState {
    job_state::MethodState::Eqlv2(Eqlv2State {
        pos_grad: state.pos_grad().to_vec(),
        neg_grad: state.neg_grad().to_vec(),
        pos_neg: state.pos_neg().to_vec(),
    })
}

/// The response's state and GetJob's both are `expected`, bit for bit.
async fn assert_state(
    client: &mut Client,
    job_id: &str,
    response: &HarmonizeResponse,
    expected: &job_state::MethodState,
    context: &str,
) {
    assert_eq!(
        state_bits(&response_state(response)),
        state_bits(expected),
        "{context}: the response's state"
    );
    let stored = job_state(client, job_id).await;
    assert_eq!(
        state_bits(&stored_state(&stored)),
        state_bits(expected),
        "{context}: GetJob's state"
    );
    assert!(stored.acc_sum.is_empty(), "{context}: acc_sum");
    assert!(
        response.weights.is_empty()
            && response.bin_weights.is_empty()
            && response.acc_sum.is_empty(),
        "{context}: GHM's fields in a {} response",
        state_bits(expected).0
    );
}

// ---------------------------------------------------------------------------------------------
// (a) Every vector step through a real server.

/// What a client sends for a vector step: the samples' labels where the step has them (the
/// server counts them), else the listed counts. `seesaw_c5_counts_large` lists C counts, leaving
/// out the background none of its steps has, whose count is then 0.
fn seesaw_step_input(case: &SeesawCase, index: usize, send_labels: bool) -> Input {
    let step = &case.steps[index];
    if send_labels && !step.labels.is_empty() {
        return labels_input(&step.labels);
    }
    let mut counts = step.expected.label_counts.clone();
    if counts.len() == case.num_classes as usize {
        counts.push(0);
    }
    counts_input(&counts)
}

fn seesaw_expected(case: &SeesawCase, index: usize) -> job_state::MethodState {
    job_state::MethodState::Seesaw(SeesawState {
        cum_samples: f32s(&case.steps[index].expected.cum_samples),
    })
}

fn eqlv2_step_input(case: &Eqlv2Case, index: usize) -> Input {
    let expected = &case.steps[index].expected;
    grads_input(
        &f32s(&expected.pos_grad_contribution),
        &f32s(&expected.neg_grad_contribution),
    )
}

fn eqlv2_expected(case: &Eqlv2Case, index: usize) -> job_state::MethodState {
    let expected = &case.steps[index].expected;
    job_state::MethodState::Eqlv2(Eqlv2State {
        pos_grad: f32s(&expected.pos_grad),
        neg_grad: f32s(&expected.neg_grad),
        pos_neg: f32s(&expected.pos_neg),
    })
}

/// A stream whose next request is sent only once the previous response was checked, so that
/// GetJob reads the state after each step, not after the last.
struct StepStream {
    requests: tokio::sync::mpsc::Sender<HarmonizeRequest>,
    responses: tonic::Streaming<HarmonizeResponse>,
}

impl StepStream {
    async fn open(client: &mut Client) -> Self {
        let (requests, inbound) = tokio::sync::mpsc::channel(1);
        let responses = client
            .raw()
            .harmonize_stream(tokio_stream::wrappers::ReceiverStream::new(inbound))
            .await
            .expect("stream opens")
            .into_inner();
        Self {
            requests,
            responses,
        }
    }

    async fn send(&mut self, request: HarmonizeRequest) -> HarmonizeResponse {
        self.requests.send(request).await.expect("stream open");
        self.responses
            .next()
            .await
            .expect("one response per request")
            .expect("ok")
    }
}

#[tokio::test]
async fn every_seesaw_vector_step_comes_out_bit_for_bit_unary_and_on_a_stream() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for case in seesaw_cases() {
        // Unary from labels where the vector has them; on the stream from counts.
        for (mode, send_labels) in [("unary", true), ("stream", false)] {
            let job_id = format!("{mode}/{}", case.name);
            let job = client
                .create_job(&job_id, case.proto_spec())
                .await
                .expect("create");
            assert_eq!(job.spec.and_then(|s| s.method), case.proto_spec().method);
            let state = job.state.expect("state");
            assert_eq!(
                state_bits(&stored_state(&state)),
                state_bits(&job_state::MethodState::Seesaw(SeesawState {
                    cum_samples: vec![0.0; case.num_classes as usize + 1]
                })),
                "a fresh job's cum_samples"
            );
            let mut stream = StepStream::open(&mut client).await;
            for index in 0..case.steps.len() {
                let input = seesaw_step_input(&case, index, send_labels);
                let request = step_request(&job_id, index as u64, 0, input);
                let response = if send_labels {
                    client.harmonize(request).await.expect("harmonize")
                } else {
                    stream.send(request).await
                };
                let context = format!("{job_id} step {index}");
                assert_eq!(
                    (response.step, response.steps),
                    (index as u64, index as u64 + 1)
                );
                let expected = seesaw_expected(&case, index);
                assert_state(&mut client, &job_id, &response, &expected, &context).await;
            }
            let state = job_state(&mut client, &job_id).await;
            let samples: u64 = case
                .steps
                .iter()
                .map(|s| s.expected.label_counts.iter().sum::<u64>())
                .sum();
            assert_eq!(
                (state.steps, state.elements),
                (case.steps.len() as u64, samples),
                "{job_id}: steps and samples counted"
            );
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn every_eqlv2_vector_step_comes_out_bit_for_bit_unary_and_on_a_stream() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for case in eqlv2_cases() {
        for mode in ["unary", "stream"] {
            let job_id = format!("{mode}/{}", case.name);
            let job = client
                .create_job(&job_id, case.proto_spec())
                .await
                .expect("create");
            assert_eq!(job.spec.and_then(|s| s.method), case.proto_spec().method);
            let mut stream = StepStream::open(&mut client).await;
            for index in 0..case.steps.len() {
                // The weights of step t come from pos_neg before it: GetJob's, or the last
                // response's.
                let before = job_state(&mut client, &job_id).await;
                let job_state::MethodState::Eqlv2(before) = stored_state(&before) else {
                    panic!("{job_id}: not an EQLv2 state");
                };
                assert_eq!(
                    bits(&before.pos_neg),
                    bits(&f32s(&case.steps[index].expected.pos_neg_before)),
                    "{job_id} step {index}: pos_neg before"
                );
                let request =
                    step_request(&job_id, index as u64, 0, eqlv2_step_input(&case, index));
                let response = if mode == "unary" {
                    client.harmonize(request).await.expect("harmonize")
                } else {
                    stream.send(request).await
                };
                let context = format!("{job_id} step {index}");
                assert_eq!(
                    (response.step, response.steps),
                    (index as u64, index as u64 + 1)
                );
                assert_eq!(response.elements, 0, "{context}: EQLv2 counts no samples");
                assert_state(
                    &mut client,
                    &job_id,
                    &response,
                    &eqlv2_expected(&case, index),
                    &context,
                )
                .await;
            }
        }
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// (b) W ranks through the real step barrier.

/// A random order of `0..ranks`.
fn shuffled(rng: &mut SplitMix, ranks: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ranks).collect();
    for i in (1..ranks).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

/// Sends one step of every rank, each from its own task, in `arrival` order (each task waits a
/// little longer than the one before it, so that the barrier sees them in that order), and
/// returns the responses in rank order.
async fn step_in_order(
    server: &TestServer,
    requests: Vec<HarmonizeRequest>,
    arrival: &[usize],
) -> Vec<Result<HarmonizeResponse, tonic::Status>> {
    let mut tasks = Vec::new();
    for (rank, request) in requests.into_iter().enumerate() {
        let position = arrival
            .iter()
            .position(|&r| r == rank)
            .expect("every rank arrives");
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5 * position as u64)).await;
            client.harmonize(request).await
        }));
    }
    let mut responses = Vec::new();
    for task in tasks {
        responses.push(task.await.expect("rank task"));
    }
    responses
}

fn all_ok(responses: Vec<Result<HarmonizeResponse, tonic::Status>>) -> Vec<HarmonizeResponse> {
    responses
        .into_iter()
        .enumerate()
        .map(|(rank, r)| r.unwrap_or_else(|status| panic!("rank {rank}: {status:?}")))
        .collect()
}

/// One step of every rank of a step-synchronous job, as the barrier applied it.
struct SynchronousStep<'a> {
    job_id: &'a str,
    step: u64,
    arrival: &'a [usize],
}

impl SynchronousStep<'_> {
    /// Every rank's response, and GetJob, hold `expected`, and the step was applied once, whole.
    async fn check(
        &self,
        client: &mut Client,
        responses: &[HarmonizeResponse],
        expected: &job_state::MethodState,
    ) {
        let (job_id, step) = (self.job_id, self.step);
        for (rank, response) in responses.iter().enumerate() {
            let context = format!(
                "{job_id} step {step} rank {rank} (arrival {:?})",
                self.arrival
            );
            assert_eq!(
                (response.steps, response.next_step),
                (step + 1, step + 1),
                "{context}"
            );
            assert!(response.missing_ranks.is_empty(), "{context}");
            assert_state(client, job_id, response, expected, &context).await;
        }
    }
}

/// Counts past 2^24, so that a float32 update per rank would round differently from one update
/// with the exact sum.
fn random_counts(rng: &mut SplitMix, labels: usize) -> Vec<u64> {
    (0..labels)
        .map(|_| match rng.below(3) {
            0 => 0,
            1 => rng.below(5),
            _ => rng.range((1 << 23)..(1 << 26)),
        })
        .collect()
}

/// Column sums of every magnitude, so that float32 rounding in the reduction is the rule.
fn random_grads(rng: &mut SplitMix, classes: usize) -> Vec<f32> {
    (0..classes)
        .map(|_| match rng.below(4) {
            0 => 0.0,
            1 => rng.unit_closed(),
            2 => rng.unit_closed() * 1e6,
            _ => rng.unit_closed() * 1e-3 + 1e-7,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seesaw_of_w_ranks_is_the_global_batchs_counts_whatever_the_arrival_order() {
    const CLASSES: u32 = 7;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let method = Seesaw::new(CLASSES, 0.8, 2.0, 0.01).expect("spec");
    let mut rng = SplitMix(11);
    // Whether one float32 update per rank would have given another state at least once: else
    // this test could not tell a server that sums the counts first from one that does not.
    let mut summing_mattered = false;
    for world in [2u32, 3, 5] {
        let job_id = format!("seesaw/w{world}");
        let spec = step_synchronous(seesaw(CLASSES), world, Duration::from_secs(20));
        client.create_job(&job_id, spec).await.expect("create");
        let mut state = method.initial_state();
        let mut samples = 0u64;
        for step in 0..4u64 {
            // Even ranks send counts, odd ranks labels, which the server counts.
            let mut contributions = Vec::new();
            let mut requests = Vec::new();
            for rank in 0..world {
                let input = if rank % 2 == 0 {
                    let counts = random_counts(&mut rng, method.labels());
                    contributions.push(LabelCounts {
                        counts: counts.clone(),
                    });
                    counts_input(&counts)
                } else {
                    let labels: Vec<i64> = (0..rng.below(300))
                        .map(|_| rng.below(u64::from(CLASSES) + 1) as i64)
                        .collect();
                    contributions.push(method.count_labels(&labels).expect("labels"));
                    labels_input(&labels)
                };
                requests.push(step_request(&job_id, step, rank, input));
            }
            samples += contributions.iter().map(LabelCounts::samples).sum::<u64>();
            let arrival = shuffled(&mut rng, world as usize);
            let mut rank_by_rank = state.clone();
            for contribution in &contributions {
                method
                    .step(&mut rank_by_rank, vec![contribution.clone()])
                    .expect("the model step applies");
            }
            method
                .step(&mut state, contributions)
                .expect("the model step applies");
            summing_mattered |= bits(rank_by_rank.cum_samples()) != bits(state.cum_samples());
            let responses = all_ok(step_in_order(&server, requests, &arrival).await);
            for response in &responses {
                assert_eq!(response.elements, samples, "{job_id} step {step}: samples");
            }
            let synchronous = SynchronousStep {
                job_id: &job_id,
                step,
                arrival: &arrival,
            };
            synchronous
                .check(&mut client, &responses, &seesaw_proto(&state))
                .await;
        }
    }
    assert!(summing_mattered, "no step's counts rounded past 2^24");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eqlv2_of_w_ranks_is_the_rank_order_sum_whatever_the_arrival_order() {
    const CLASSES: u32 = 9;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let method = Eqlv2::new(CLASSES, 12.0, 0.8, 4.0).expect("spec");
    let mut rng = SplitMix(23);
    // Whether the rank order mattered at least once: else this test could not tell a server
    // that sums in arrival order from one that sums in rank order.
    let mut order_mattered = false;
    for world in [2u32, 3, 6] {
        let job_id = format!("eqlv2/w{world}");
        let spec = step_synchronous(eqlv2(CLASSES), world, Duration::from_secs(20));
        client.create_job(&job_id, spec).await.expect("create");
        let mut state = method.initial_state();
        for step in 0..4u64 {
            let contributions: Vec<GradContribution> = (0..world)
                .map(|_| GradContribution {
                    pos_grad: random_grads(&mut rng, CLASSES as usize),
                    neg_grad: random_grads(&mut rng, CLASSES as usize),
                })
                .collect();
            let requests: Vec<HarmonizeRequest> = contributions
                .iter()
                .enumerate()
                .map(|(rank, c)| step_request(&job_id, step, rank as u32, grad_input(c)))
                .collect();
            let arrival = shuffled(&mut rng, world as usize);
            let in_arrival_order: Vec<GradContribution> =
                arrival.iter().map(|&r| contributions[r].clone()).collect();
            let rank_sum = method.reduce(contributions.clone()).expect("reduce");
            let arrival_sum = method.reduce(in_arrival_order).expect("reduce");
            order_mattered |= bits(&rank_sum.pos_grad) != bits(&arrival_sum.pos_grad)
                || bits(&rank_sum.neg_grad) != bits(&arrival_sum.neg_grad);
            method
                .step(&mut state, contributions)
                .expect("the model step applies");
            let responses = all_ok(step_in_order(&server, requests, &arrival).await);
            let synchronous = SynchronousStep {
                job_id: &job_id,
                step,
                arrival: &arrival,
            };
            synchronous
                .check(&mut client, &responses, &eqlv2_proto(&state))
                .await;
        }
    }
    assert!(
        order_mattered,
        "no step's float32 sum depended on the order"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_step_folds_the_ranks_present_and_a_retry_gets_the_kept_outcome() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let timeout = Duration::from_millis(300);
    let seesaw_math = Seesaw::new(4, 0.8, 2.0, 0.01).expect("spec");
    let eqlv2_math = Eqlv2::new(4, 12.0, 0.8, 4.0).expect("spec");
    let mut rng = SplitMix(5);
    for method in ["seesaw", "eqlv2"] {
        let job_id = format!("partial/{method}");
        let spec = if method == "seesaw" {
            seesaw(4)
        } else {
            eqlv2(4)
        };
        let spec = JobSpec {
            allow_partial_steps: true,
            ..step_synchronous(spec, 3, timeout)
        };
        client.create_job(&job_id, spec).await.expect("create");
        let (inputs, expected): (Vec<Input>, job_state::MethodState) = if method == "seesaw" {
            let counts: Vec<Vec<u64>> = (0..3).map(|_| random_counts(&mut rng, 5)).collect();
            let mut state = seesaw_math.initial_state();
            let present = counts[..2]
                .iter()
                .map(|c| LabelCounts { counts: c.clone() })
                .collect();
            seesaw_math.step(&mut state, present).expect("model");
            (
                counts.iter().map(|c| counts_input(c)).collect(),
                seesaw_proto(&state),
            )
        } else {
            let grads: Vec<GradContribution> = (0..3)
                .map(|_| GradContribution {
                    pos_grad: random_grads(&mut rng, 4),
                    neg_grad: random_grads(&mut rng, 4),
                })
                .collect();
            let mut state = eqlv2_math.initial_state();
            eqlv2_math
                .step(&mut state, grads[..2].to_vec())
                .expect("model");
            (grads.iter().map(grad_input).collect(), eqlv2_proto(&state))
        };
        // Ranks 0 and 1 only: the step applies at the timeout without rank 2.
        let requests: Vec<HarmonizeRequest> = inputs[..2]
            .iter()
            .enumerate()
            .map(|(rank, input)| step_request(&job_id, 0, rank as u32, input.clone()))
            .collect();
        let responses = all_ok(step_in_order(&server, requests.clone(), &[1, 0]).await);
        for (rank, response) in responses.iter().enumerate() {
            let context = format!("{job_id} rank {rank}");
            assert_eq!(response.missing_ranks, vec![2], "{context}");
            assert_state(&mut client, &job_id, response, &expected, &context).await;
        }
        let applied = job_state(&mut client, &job_id).await;
        assert_eq!((applied.steps, applied.next_step), (1, 1));

        // The late rank, and a retry of rank 1: both answered from the kept outcome, nothing
        // folded twice.
        let late = client
            .harmonize(step_request(&job_id, 0, 2, inputs[2].clone()))
            .await
            .expect("the late rank gets the kept outcome");
        assert_eq!(late.missing_ranks, vec![2]);
        assert_state(&mut client, &job_id, &late, &expected, "late rank").await;
        let retry = client
            .harmonize(requests[1].clone())
            .await
            .expect("a retry of an applied step");
        assert_eq!(retry, responses[1], "a retry gets the identical response");
        assert_eq!(
            job_state(&mut client, &job_id).await,
            applied,
            "not applied twice"
        );
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// (c) Validation: the precise status, the field and index, and the job as it was.

/// `request` is refused with `code` naming every one of `needles`, and GetJob is the same
/// before and after (state, counters, update time).
async fn refused(
    client: &mut Client,
    request: HarmonizeRequest,
    code: Code,
    needles: &[&str],
    context: &str,
) {
    let job_id = request.job_id.clone();
    let before: Job = client.get_job(&job_id).await.expect("get before");
    assert_status(client.harmonize(request).await, code, needles, context);
    let after = client.get_job(&job_id).await.expect("get after");
    assert_eq!(
        after, before,
        "{context}: the refused request changed the job"
    );
}

/// One step applied first, so that "unchanged" compares a state with values in it.
async fn stepped_jobs(client: &mut Client) {
    client
        .create_job("v/seesaw", seesaw(5))
        .await
        .expect("create");
    client
        .harmonize(step_request("v/seesaw", 0, 0, labels_input(&[0, 5, 5, 3])))
        .await
        .expect("a first step");
    client
        .create_job("v/eqlv2", eqlv2(5))
        .await
        .expect("create");
    client
        .harmonize(step_request(
            "v/eqlv2",
            0,
            0,
            grads_input(&[0.5; 5], &[2.0; 5]),
        ))
        .await
        .expect("a first step");
    client
        .create_job("v/ghm", ghm_c(10, 0.75))
        .await
        .expect("create");
    client
        .harmonize_norms("v/ghm", 0, 0, &[0.1, 0.5, 0.9], None)
        .await
        .expect("a first step");
}

#[tokio::test]
async fn bad_seesaw_inputs_name_the_field_and_index_and_change_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    stepped_jobs(&mut client).await;
    let job = "v/seesaw";
    let max = ghmd::seesaw::MAX_SAMPLES_PER_CONTRIBUTION;
    let cases: Vec<(&str, Input, Vec<&str>)> = vec![
        (
            "too few counts",
            counts_input(&[1, 2, 3, 4]),
            vec!["seesaw.label_counts has 4 entries", "5 classes", "needs 6"],
        ),
        (
            "too many counts",
            counts_input(&[1; 7]),
            vec!["seesaw.label_counts has 7 entries", "needs 6"],
        ),
        (
            "a label past the background",
            labels_input(&[0, 1, 6]),
            vec![
                "seesaw.labels[2] = 6",
                "labels are 0 to 5",
                "5 is the background",
            ],
        ),
        (
            "a negative label",
            labels_input(&[3, -1]),
            vec!["seesaw.labels[1] = -1"],
        ),
        (
            "counts past the most one rank may send",
            counts_input(&[1, max, 0, 0, 0, 0]),
            vec!["seesaw.label_counts[1]"],
        ),
        (
            "counts whose sum overflows u64",
            counts_input(&[0, 0, u64::MAX, u64::MAX, 0, 0]),
            vec!["seesaw.label_counts[2]"],
        ),
        (
            "both counts and labels",
            Input::Seesaw(SeesawContribution {
                label_counts: vec![1; 6],
                labels: vec![0],
            }),
            vec!["seesaw has both label_counts (6 entries) and labels (1)"],
        ),
        (
            "EQLv2's input",
            grads_input(&[0.5; 5], &[0.5; 5]),
            vec!["eqlv2: the job runs seesaw, send seesaw"],
        ),
        (
            "GHM's gradient norms",
            Input::GradientNorms(f32s_to_bytes(&[0.5])),
            vec!["the job runs seesaw"],
        ),
        (
            "GHM's histogram",
            Input::Histogram(ghmd::proto::Histogram {
                counts: vec![1; 6],
                tot: 6.0,
            }),
            vec!["the job runs seesaw"],
        ),
    ];
    for (context, input, needles) in cases {
        let request = step_request(job, 1, 0, input);
        refused(
            &mut client,
            request,
            Code::InvalidArgument,
            &needles,
            context,
        )
        .await;
    }
    let mut weighted = step_request(job, 1, 0, labels_input(&[1, 2]));
    weighted.label_weights = f32s_to_bytes(&[1.0, 1.0]);
    refused(
        &mut client,
        weighted,
        Code::InvalidArgument,
        &["label_weights"],
        "label_weights",
    )
    .await;
    let mut no_input = step_request(job, 1, 0, labels_input(&[]));
    no_input.input = None;
    refused(
        &mut client,
        no_input,
        Code::InvalidArgument,
        &["input"],
        "no input",
    )
    .await;

    // A batch without a sample is a step: it counts nothing and applies.
    let before = job_state(&mut client, job).await;
    let empty = client
        .harmonize(step_request(job, 1, 0, labels_input(&[])))
        .await
        .expect("a step of no sample");
    assert_eq!(
        (empty.steps, empty.elements),
        (before.steps + 1, before.elements)
    );
    assert_state(
        &mut client,
        job,
        &empty,
        &stored_state(&before),
        "no sample",
    )
    .await;
    // And the job goes on: the next step applies.
    client
        .harmonize(step_request(job, 2, 0, labels_input(&[1, 2])))
        .await
        .expect("a good step after the refusals");
    server.stop().await;
}

#[tokio::test]
async fn bad_eqlv2_inputs_name_the_field_and_index_and_change_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    stepped_jobs(&mut client).await;
    let job = "v/eqlv2";
    let good = [0.25f32; 5];
    let with = |index: usize, value: f32| {
        let mut values = good;
        values[index] = value;
        values
    };
    let mut seven_bytes = f32s_to_bytes(&good).to_vec();
    seven_bytes.truncate(7);
    let cases: Vec<(&str, Input, Vec<&str>)> = vec![
        (
            "pos_grad of 4 classes",
            grads_input(&good[..4], &good),
            vec!["eqlv2.pos_grad has 4 entries", "5 classes"],
        ),
        (
            "neg_grad of 6 classes",
            grads_input(&good, &[0.25; 6]),
            vec!["eqlv2.neg_grad has 6 entries"],
        ),
        (
            "bytes not a multiple of 4",
            raw_grads_input(seven_bytes.clone(), f32s_to_bytes(&good).to_vec()),
            vec!["eqlv2.pos_grad has 7 bytes", "multiple of 4"],
        ),
        (
            "neg_grad's bytes not a multiple of 4",
            raw_grads_input(f32s_to_bytes(&good).to_vec(), seven_bytes),
            vec!["eqlv2.neg_grad has 7 bytes", "multiple of 4"],
        ),
        (
            "a negative value",
            grads_input(&good, &with(3, -1.0)),
            vec!["eqlv2.neg_grad[3] = -1e0", "finite and >= 0"],
        ),
        (
            "NaN",
            grads_input(&with(2, f32::NAN), &good),
            vec!["eqlv2.pos_grad[2] = NaN"],
        ),
        (
            "infinity",
            grads_input(&with(4, f32::INFINITY), &good),
            vec!["eqlv2.pos_grad[4] = inf"],
        ),
        (
            "Seesaw's input",
            counts_input(&[1; 6]),
            vec!["seesaw: the job runs eqlv2, send eqlv2 (pos_grad and neg_grad)"],
        ),
        (
            "GHM's residuals",
            Input::Residuals(f32s_to_bytes(&[0.5])),
            vec!["the job runs eqlv2"],
        ),
        (
            "no gradients at all",
            grads_input(&[], &[]),
            vec!["eqlv2.pos_grad has 0 entries", "5 classes"],
        ),
    ];
    for (context, input, needles) in cases {
        let request = step_request(job, 1, 0, input);
        refused(
            &mut client,
            request,
            Code::InvalidArgument,
            &needles,
            context,
        )
        .await;
    }
    let mut weighted = step_request(job, 1, 0, grads_input(&good, &good));
    weighted.label_weights = f32s_to_bytes(&[1.0]);
    refused(
        &mut client,
        weighted,
        Code::InvalidArgument,
        &["label_weights"],
        "label_weights",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_ghm_job_refuses_the_new_methods_inputs() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    stepped_jobs(&mut client).await;
    for (context, input, needle) in [
        (
            "Seesaw's input",
            counts_input(&[1; 11]),
            "seesaw: the job runs ghm_c",
        ),
        (
            "EQLv2's input",
            grads_input(&[0.5; 10], &[0.5; 10]),
            "eqlv2: the job runs ghm_c",
        ),
    ] {
        let request = step_request("v/ghm", 1, 0, input);
        refused(
            &mut client,
            request,
            Code::InvalidArgument,
            &[needle],
            context,
        )
        .await;
    }
    server.stop().await;
}

/// The same refusals on a stream: the stream ends with the status, and the job is unchanged.
#[tokio::test]
async fn a_bad_input_on_a_stream_ends_it_with_the_same_status() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    stepped_jobs(&mut client).await;
    for (job, input, needle) in [
        ("v/seesaw", labels_input(&[9]), "seesaw.labels[0] = 9"),
        (
            "v/eqlv2",
            grads_input(&[0.5; 5], &[-0.5; 5]),
            "eqlv2.neg_grad[0] = -5e-1",
        ),
    ] {
        let before = client.get_job(job).await.expect("get");
        let mut responses = client
            .raw()
            .harmonize_stream(tokio_stream::iter(vec![step_request(job, 1, 0, input)]))
            .await
            .expect("stream opens")
            .into_inner();
        let first = responses.next().await.expect("an answer");
        assert_status(first, Code::InvalidArgument, &[needle], job);
        assert_eq!(client.get_job(job).await.expect("get"), before, "{job}");
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_seesaw_and_eqlv2_specs_are_invalid_argument_and_create_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let seesaw_with = |p: Option<f64>, q: Option<f64>, eps: Option<f64>| {
        with_seesaw(SeesawSpec {
            num_classes: 5,
            p,
            q,
            eps,
        })
    };
    let eqlv2_with = |gamma: Option<f64>, mu: Option<f64>, alpha: Option<f64>| {
        with_eqlv2(Eqlv2Spec {
            num_classes: 5,
            gamma,
            mu,
            alpha,
        })
    };
    let cases: Vec<(&str, JobSpec, Vec<&str>)> = vec![
        (
            "seesaw with a loss",
            JobSpec {
                loss: Loss::GhmC.into(),
                ..seesaw(5)
            },
            vec!["spec.loss"],
        ),
        (
            "eqlv2 with a loss",
            JobSpec {
                loss: Loss::GhmR.into(),
                ..eqlv2(5)
            },
            vec!["spec.loss"],
        ),
        (
            "seesaw with bins",
            JobSpec {
                bins: 10,
                ..seesaw(5)
            },
            vec!["spec.bins"],
        ),
        (
            "eqlv2 with a momentum",
            JobSpec {
                momentum: 0.75,
                ..eqlv2(5)
            },
            vec!["spec.momentum"],
        ),
        (
            "seesaw with GHM-R's mu",
            JobSpec {
                mu: 0.02,
                ..seesaw(5)
            },
            vec!["spec.mu"],
        ),
        (
            "seesaw of 0 classes",
            seesaw(0),
            vec!["spec.seesaw.num_classes = 0"],
        ),
        (
            "seesaw of 65537 classes",
            seesaw(65_537),
            vec!["spec.seesaw.num_classes = 65537", "65536"],
        ),
        (
            "eqlv2 of 0 classes",
            eqlv2(0),
            vec!["spec.eqlv2.num_classes = 0"],
        ),
        (
            "eqlv2 of 65537 classes",
            eqlv2(65_537),
            vec!["spec.eqlv2.num_classes = 65537"],
        ),
        (
            "negative p",
            seesaw_with(Some(-1.0), None, None),
            vec!["spec.seesaw.p = -1"],
        ),
        (
            "NaN q",
            seesaw_with(None, Some(f64::NAN), None),
            vec!["spec.seesaw.q = NaN"],
        ),
        (
            "infinite p",
            seesaw_with(Some(f64::INFINITY), None, None),
            vec!["spec.seesaw.p = inf"],
        ),
        (
            "eps 0",
            seesaw_with(None, None, Some(0.0)),
            vec!["spec.seesaw.eps = 0", "> 0"],
        ),
        (
            "negative eps",
            seesaw_with(None, None, Some(-0.01)),
            vec!["spec.seesaw.eps"],
        ),
        (
            "infinite gamma",
            eqlv2_with(Some(f64::INFINITY), None, None),
            vec!["spec.eqlv2.gamma = inf"],
        ),
        (
            "NaN mu",
            eqlv2_with(None, Some(f64::NAN), None),
            vec!["spec.eqlv2.mu = NaN"],
        ),
        (
            "-infinite alpha",
            eqlv2_with(None, None, Some(f64::NEG_INFINITY)),
            vec!["spec.eqlv2.alpha = -inf"],
        ),
    ];
    for (index, (context, spec, needles)) in cases.into_iter().enumerate() {
        let job_id = format!("spec/{index}");
        assert_status(
            client.create_job(&job_id, spec).await,
            Code::InvalidArgument,
            &needles,
            context,
        );
        assert_status(client.get_job(&job_id).await, Code::NotFound, &[], context);
    }
    server.stop().await;
}

#[tokio::test]
async fn absent_parameters_get_mmdetections_defaults_and_create_is_idempotent_on_them() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let seesaw_defaults = with_seesaw(SeesawSpec {
        num_classes: 1203,
        p: Some(0.8),
        q: Some(2.0),
        eps: Some(0.01),
    });
    let eqlv2_defaults = with_eqlv2(Eqlv2Spec {
        num_classes: 1203,
        gamma: Some(12.0),
        mu: Some(0.8),
        alpha: Some(4.0),
    });
    for (job_id, bare, filled, other) in [
        (
            "defaults/seesaw",
            seesaw(1203),
            seesaw_defaults,
            with_seesaw(SeesawSpec {
                num_classes: 1203,
                p: Some(0.0),
                ..Default::default()
            }),
        ),
        (
            "defaults/eqlv2",
            eqlv2(1203),
            eqlv2_defaults,
            with_eqlv2(Eqlv2Spec {
                num_classes: 1203,
                alpha: Some(2.0),
                ..Default::default()
            }),
        ),
    ] {
        let job = client.create_job(job_id, bare).await.expect("create");
        assert_eq!(
            job.spec.and_then(|s| s.method),
            filled.method,
            "{job_id}: GetJob returns them set"
        );
        // The same spec, whether its defaults are left out or spelt out: the same job.
        assert_eq!(client.create_job(job_id, bare).await.expect("again"), job);
        assert_eq!(
            client.create_job(job_id, filled).await.expect("spelt out"),
            job
        );
        assert_status(
            client.create_job(job_id, other).await,
            Code::AlreadyExists,
            &[],
            job_id,
        );
        // Another method under the same id too.
        assert_status(
            client.create_job(job_id, ghm_c(10, 0.75)).await,
            Code::AlreadyExists,
            &[],
            job_id,
        );
        assert_eq!(client.get_job(job_id).await.expect("get"), job);
    }
    server.stop().await;
}

fn restore(job_id: &str, state: JobState) -> RestoreJobRequest {
    RestoreJobRequest {
        job_id: job_id.to_owned(),
        state: Some(state),
    }
}

fn seesaw_state(cum_samples: Vec<f32>) -> JobState {
    JobState {
        steps: 3,
        method_state: Some(job_state::MethodState::Seesaw(SeesawState { cum_samples })),
        ..Default::default()
    }
}

fn eqlv2_state(pos_grad: Vec<f32>, neg_grad: Vec<f32>) -> JobState {
    let pos_neg = pos_grad
        .iter()
        .zip(&neg_grad)
        .map(|(p, n)| p / (n + 1e-10f32))
        .collect();
    eqlv2_state_with(pos_grad, neg_grad, pos_neg)
}

fn eqlv2_state_with(pos_grad: Vec<f32>, neg_grad: Vec<f32>, pos_neg: Vec<f32>) -> JobState {
    JobState {
        steps: 3,
        method_state: Some(job_state::MethodState::Eqlv2(Eqlv2State {
            pos_grad,
            neg_grad,
            pos_neg,
        })),
        ..Default::default()
    }
}

async fn refused_restore(
    client: &mut Client,
    request: RestoreJobRequest,
    needles: &[&str],
    context: &str,
) {
    let before = client.get_job(&request.job_id).await.expect("get");
    assert_status(
        client.restore_job(request.clone()).await,
        Code::InvalidArgument,
        needles,
        context,
    );
    assert_eq!(
        client.get_job(&request.job_id).await.expect("get"),
        before,
        "{context}: a refused restore changed the job"
    );
}

#[tokio::test]
async fn a_restore_with_a_bad_method_state_is_refused_and_a_good_one_round_trips() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    stepped_jobs(&mut client).await;
    let seesaw_cases: Vec<(&str, JobState, Vec<&str>)> = vec![
        (
            "cum_samples of another length",
            seesaw_state(vec![1.0; 5]),
            vec!["state.seesaw.cum_samples has 5 entries"],
        ),
        (
            "a fractional count",
            seesaw_state(vec![1.0, 0.5, 0.0, 0.0, 0.0, 0.0]),
            vec!["state.seesaw.cum_samples[1] = 5e-1"],
        ),
        (
            "a negative count",
            seesaw_state(vec![1.0, 0.0, 0.0, -2.0, 0.0, 0.0]),
            vec!["state.seesaw.cum_samples[3] = -2e0"],
        ),
        (
            "an infinite count",
            seesaw_state(vec![0.0, 0.0, 0.0, 0.0, 0.0, f32::INFINITY]),
            vec!["state.seesaw.cum_samples[5] = inf"],
        ),
        (
            "no method_state",
            JobState {
                steps: 3,
                ..Default::default()
            },
            vec!["seesaw"],
        ),
        (
            "EQLv2's state",
            eqlv2_state(vec![0.0; 5], vec![0.0; 5]),
            vec!["the job runs seesaw"],
        ),
        (
            "an acc_sum beside it",
            JobState {
                acc_sum: vec![0.0; 10],
                ..seesaw_state(vec![0.0; 6])
            },
            vec!["acc_sum"],
        ),
    ];
    for (context, state, needles) in seesaw_cases {
        refused_restore(&mut client, restore("v/seesaw", state), &needles, context).await;
    }
    let eqlv2_cases: Vec<(&str, JobState, Vec<&str>)> = vec![
        (
            "pos_grad of another length",
            eqlv2_state(vec![0.0; 4], vec![0.0; 4]),
            vec!["state.eqlv2.pos_grad has 4 entries"],
        ),
        (
            "a negative neg_grad",
            eqlv2_state(vec![0.0; 5], vec![0.0, 0.0, -1.0, 0.0, 0.0]),
            vec!["state.eqlv2.neg_grad[2] = -1e0"],
        ),
        (
            "a NaN pos_grad",
            eqlv2_state(vec![0.0, f32::NAN, 0.0, 0.0, 0.0], vec![1.0; 5]),
            vec!["state.eqlv2.pos_grad[1] = NaN"],
        ),
        (
            "pos_neg that pos_grad and neg_grad do not give",
            eqlv2_state_with(vec![1.0; 5], vec![1.0; 5], vec![1.0, 1.0, 1.0, 7.0, 1.0]),
            vec!["state.eqlv2.pos_neg[3]"],
        ),
        (
            "Seesaw's state",
            seesaw_state(vec![0.0; 6]),
            vec!["the job runs eqlv2"],
        ),
        (
            "no method_state",
            JobState {
                steps: 3,
                ..Default::default()
            },
            vec!["eqlv2"],
        ),
    ];
    for (context, state, needles) in eqlv2_cases {
        refused_restore(&mut client, restore("v/eqlv2", state), &needles, context).await;
    }
    refused_restore(
        &mut client,
        restore(
            "v/ghm",
            JobState {
                acc_sum: vec![0.0; 10],
                ..seesaw_state(vec![0.0; 11])
            },
        ),
        &["state"],
        "a GHM job given a Seesaw state",
    )
    .await;

    // A good state round-trips through GetJob, and the job steps on from it.
    let good = eqlv2_state(vec![0.5, 0.0, 3.0, 1.0, 2.0], vec![1.0, 0.0, 0.5, 4.0, 2.0]);
    let restored = client
        .restore_job(restore("v/eqlv2", good.clone()))
        .await
        .expect("restore");
    let state = restored.state.expect("state");
    assert_eq!(
        state_bits(&stored_state(&state)),
        state_bits(&stored_state(&good))
    );
    assert_eq!(state.steps, 3);
    server.stop().await;
}

/// A fold that would leave float32 is refused for every rank of the step, and the job is as
/// it was: not advanced, and the same step then applies with sane contributions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eqlv2_fold_past_float32_is_refused_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let near_max = vec![3e38f32, 0.0, 1.0];
    let neg = vec![1.0f32, 0.0, 1.0];
    for world in [1u32, 2] {
        let job_id = format!("overflow/w{world}");
        let spec = step_synchronous(eqlv2(3), world, Duration::from_secs(20));
        client.create_job(&job_id, spec).await.expect("create");
        client
            .restore_job(restore(&job_id, eqlv2_state(near_max.clone(), neg.clone())))
            .await
            .expect("a state near f32::MAX is a valid state");
        let before = client.get_job(&job_id).await.expect("get");
        // Each rank's value and their sum are finite; the state plus the sum is not.
        let requests: Vec<HarmonizeRequest> = (0..world)
            .map(|rank| {
                let pos = [1e38f32 / world as f32, 0.0, 0.0];
                step_request(&job_id, 0, rank, grads_input(&pos, &[0.0; 3]))
            })
            .collect();
        let responses =
            step_in_order(&server, requests, &(0..world as usize).collect::<Vec<_>>()).await;
        for (rank, response) in responses.into_iter().enumerate() {
            assert_status(
                response,
                Code::InvalidArgument,
                &["state.eqlv2.pos_grad[0]"],
                &format!("{job_id} rank {rank}"),
            );
        }
        let after = client.get_job(&job_id).await.expect("get");
        assert_eq!(after, before, "{job_id}: the refused fold changed the job");
        assert_eq!(
            after.state.as_ref().map(|s| s.next_step),
            Some(0),
            "not advanced"
        );

        // The same step with values the state can take applies.
        let requests: Vec<HarmonizeRequest> = (0..world)
            .map(|rank| step_request(&job_id, 0, rank, grads_input(&[1.0; 3], &[1.0; 3])))
            .collect();
        let applied = all_ok(
            step_in_order(&server, requests, &(0..world as usize).collect::<Vec<_>>()).await,
        );
        assert_eq!(applied[0].steps, 4, "{job_id}");
    }

    // Two ranks whose values are finite but whose sum is not: the reduction names the rank.
    let job_id = "overflow/reduce";
    let spec = step_synchronous(eqlv2(3), 2, Duration::from_secs(20));
    client.create_job(job_id, spec).await.expect("create");
    let before = client.get_job(job_id).await.expect("get");
    let requests: Vec<HarmonizeRequest> = (0..2)
        .map(|rank| step_request(job_id, 0, rank, grads_input(&[0.0, 0.0, 2e38], &[0.0; 3])))
        .collect();
    for (rank, response) in step_in_order(&server, requests, &[0, 1])
        .await
        .into_iter()
        .enumerate()
    {
        assert_status(
            response,
            Code::InvalidArgument,
            &["eqlv2.pos_grad[2]", "rank 1"],
            &format!("reduce rank {rank}"),
        );
    }
    assert_eq!(client.get_job(job_id).await.expect("get"), before);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// (d) Persistence through the real binary.

/// A few steps of a Seesaw and an EQLv2 job, asynchronous and step-synchronous.
async fn populate(client: &mut Client) {
    let mut rng = SplitMix(77);
    for (job_id, spec) in [
        ("p/seesaw", seesaw(1203)),
        ("p/eqlv2", eqlv2(1203)),
        ("p/seesaw-sync", with_world(seesaw(20), 2)),
        ("p/eqlv2-sync", with_world(eqlv2(20), 2)),
        ("p/untouched", eqlv2(3)),
    ] {
        client.create_job(job_id, spec).await.expect("create");
        if job_id == "p/untouched" {
            continue;
        }
        let world = spec.world_size.max(1);
        let classes = match spec.method {
            Some(job_spec::Method::Seesaw(s)) => s.num_classes,
            Some(job_spec::Method::Eqlv2(s)) => s.num_classes,
            None => unreachable!("the new methods only"),
        } as usize;
        for step in 0..3u64 {
            let mut tasks = Vec::new();
            for rank in 0..world {
                let input = if job_id.contains("seesaw") {
                    counts_input(&random_counts(&mut rng, classes + 1))
                } else {
                    grads_input(
                        &random_grads(&mut rng, classes),
                        &random_grads(&mut rng, classes),
                    )
                };
                let mut client = client.clone();
                let request = step_request(job_id, step, rank, input);
                tasks.push(tokio::spawn(async move { client.harmonize(request).await }));
            }
            for task in tasks {
                task.await.expect("task").expect("step");
            }
        }
    }
}

async fn all_jobs(client: &mut Client) -> Vec<Job> {
    crate::support::fixture::list_all(client, "p/", 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seesaw_and_eqlv2_jobs_survive_a_restart_bit_for_bit() {
    let dir = TempDir::new("methods-restart");
    let ghmd = Ghmd::start(dir.path(), &["--snapshot-interval", "1h"]);
    let mut client = Client::connect(ghmd.uri()).await.expect("connect");
    populate(&mut client).await;
    let before = all_jobs(&mut client).await;
    assert_eq!(before.len(), 5);
    drop(client);
    let (status, log) = ghmd.sigterm().await;
    assert!(status.success(), "exit {status:?}\n{log}");

    let ghmd = Ghmd::start(dir.path(), &["--snapshot-interval", "1h"]);
    let mut client = Client::connect(ghmd.uri()).await.expect("connect");
    let after = all_jobs(&mut client).await;
    for (a, b) in after.iter().zip(&before) {
        let (a_state, b_state) = (
            a.state.as_ref().expect("state"),
            b.state.as_ref().expect("state"),
        );
        assert_eq!(
            state_bits(&stored_state(a_state)),
            state_bits(&stored_state(b_state)),
            "{}",
            a.job_id
        );
    }
    assert_eq!(after, before, "specs, states and timestamps");

    // The restored state goes on as the pure math says it would.
    let job_state::MethodState::Eqlv2(restored) =
        stored_state(after[0].state.as_ref().expect("state"))
    else {
        panic!("p/eqlv2 first in id order");
    };
    let method = Eqlv2::new(1203, 12.0, 0.8, 4.0).expect("spec");
    let mut model = method
        .state_from_parts(restored.pos_grad, restored.neg_grad, restored.pos_neg)
        .expect("a valid state");
    let next = GradContribution {
        pos_grad: vec![0.125; 1203],
        neg_grad: vec![3.5; 1203],
    };
    method.step(&mut model, vec![next.clone()]).expect("model");
    let response = client
        .harmonize(step_request("p/eqlv2", 3, 0, grad_input(&next)))
        .await
        .expect("a step after the restart");
    assert_state(
        &mut client,
        "p/eqlv2",
        &response,
        &eqlv2_proto(&model),
        "after restart",
    )
    .await;
    drop(client);
    let (status, log) = ghmd.sigterm().await;
    assert!(status.success(), "exit {status:?}\n{log}");
}

// ---------------------------------------------------------------------------------------------
// (e) Reseeding a new method's job on another replica.

fn acknowledged(response: &HarmonizeResponse) -> JobState {
    JobState {
        acc_sum: Vec::new(),
        steps: response.steps,
        elements: response.elements,
        next_step: response.next_step,
        generation: response.generation,
        method_state: Some(response_state(response)),
    }
}

fn last_step(response: &HarmonizeResponse) -> AppliedStep {
    AppliedStep {
        step: response.step,
        missing_ranks: response.missing_ranks.clone(),
        method_state: Some(match response_state(response) {
            job_state::MethodState::Seesaw(s) => applied_step::MethodState::Seesaw(s),
            job_state::MethodState::Eqlv2(s) => applied_step::MethodState::Eqlv2(s),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reseed_from_the_last_response_puts_an_equal_copy_in_place() {
    let first = TestServer::start().await;
    let second = TestServer::start().await;
    let mut client = first.client().await;
    let mut other = second.client().await;
    let mut rng = SplitMix(3);
    for (job_id, spec) in [
        ("r/seesaw", with_world(seesaw(6), 2)),
        ("r/eqlv2", with_world(eqlv2(6), 2)),
    ] {
        client.create_job(job_id, spec).await.expect("create");
        let input = |rng: &mut SplitMix| {
            if job_id == "r/seesaw" {
                counts_input(&random_counts(rng, 7))
            } else {
                grads_input(&random_grads(rng, 6), &random_grads(rng, 6))
            }
        };
        let mut steps = Vec::new();
        for step in 0..3u64 {
            let requests: Vec<HarmonizeRequest> = (0..2)
                .map(|rank| step_request(job_id, step, rank, input(&mut rng)))
                .collect();
            let responses = all_ok(step_in_order(&first, requests.clone(), &[0, 1]).await);
            steps.push((requests, responses));
        }
        let (requests, responses) = steps.last().expect("three steps");
        let seen = &responses[0];

        let reseed = ReseedJobRequest {
            job_id: job_id.to_owned(),
            spec: Some(spec),
            run_id: String::new(),
            state: Some(acknowledged(seen)),
            last_step: Some(last_step(seen)),
        };
        // A state or a last step of the other method is refused, and makes no copy.
        let (wrong_state, wrong_last_step) = if job_id == "r/seesaw" {
            let state = Eqlv2State {
                pos_grad: vec![0.0; 6],
                neg_grad: vec![0.0; 6],
                pos_neg: vec![100.0; 6],
            };
            (
                job_state::MethodState::Eqlv2(state.clone()),
                applied_step::MethodState::Eqlv2(state),
            )
        } else {
            let state = SeesawState {
                cum_samples: vec![0.0; 7],
            };
            (
                job_state::MethodState::Seesaw(state.clone()),
                applied_step::MethodState::Seesaw(state),
            )
        };
        let mut refused_state = reseed.clone();
        if let Some(state) = refused_state.state.as_mut() {
            state.method_state = Some(wrong_state);
        }
        let mut refused_last_step = reseed.clone();
        if let Some(last) = refused_last_step.last_step.as_mut() {
            last.method_state = Some(wrong_last_step);
        }
        for (what, request) in [("state", refused_state), ("last_step", refused_last_step)] {
            let context = format!("{job_id}: a reseed with {what} of the other method");
            // Which field it names, for last_step: a_reseeds_bad_last_step_is_named_last_step.
            assert_status(
                other.reseed_job(request).await,
                Code::InvalidArgument,
                &["the job runs"],
                &context,
            );
            assert_status(other.get_job(job_id).await, Code::NotFound, &[], &context);
        }

        let copy = other.reseed_job(reseed).await.expect("reseeded");
        let original = job_state(&mut client, job_id).await;
        let copied = copy.state.clone().expect("state");
        assert_eq!(
            state_bits(&stored_state(&copied)),
            state_bits(&stored_state(&original)),
            "{job_id}: the copy's state"
        );
        assert_eq!(
            (copied.steps, copied.elements, copied.next_step),
            (original.steps, original.elements, original.next_step),
            "{job_id}: the copy's counters"
        );
        assert_eq!(copied.generation, seen.generation + 1, "{job_id}");
        assert_eq!(copy.spec, client.get_job(job_id).await.expect("get").spec);

        // Rank 1's answer was lost: its retry on the copy is answered from the kept step.
        let retry = other
            .harmonize(requests[1].clone())
            .await
            .expect("the retry is answered from the kept step");
        assert_eq!(
            state_bits(&response_state(&retry)),
            state_bits(&response_state(&responses[1])),
            "{job_id}: the retry's state"
        );
        assert_eq!(
            (retry.steps, retry.elements, retry.next_step),
            (
                responses[1].steps,
                responses[1].elements,
                responses[1].next_step
            )
        );

        // And both copies go on alike.
        let requests: Vec<HarmonizeRequest> = (0..2)
            .map(|rank| step_request(job_id, 3, rank, input(&mut rng)))
            .collect();
        let on_first = all_ok(step_in_order(&first, requests.clone(), &[0, 1]).await);
        let on_second = all_ok(step_in_order(&second, requests, &[1, 0]).await);
        assert_eq!(
            state_bits(&response_state(&on_second[0])),
            state_bits(&response_state(&on_first[0])),
            "{job_id}: the next step"
        );
    }
    second.stop().await;
    first.stop().await;
}

// ---------------------------------------------------------------------------------------------
// (f) Metrics.

#[tokio::test]
async fn metrics_carry_a_loss_series_per_method() {
    use crate::support::http::{sample, scrape_until};
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .create_job("m/seesaw", seesaw(3))
        .await
        .expect("create");
    client
        .create_job("m/eqlv2", eqlv2(3))
        .await
        .expect("create");
    client
        .create_job("m/eqlv2-b", eqlv2(4))
        .await
        .expect("create");
    for step in 0..3 {
        client
            .harmonize(step_request("m/seesaw", step, 0, labels_input(&[0, 1, 3])))
            .await
            .expect("step");
    }
    for step in 0..2 {
        client
            .harmonize(step_request(
                "m/eqlv2",
                step,
                0,
                grads_input(&[1.0; 3], &[1.0; 3]),
            ))
            .await
            .expect("step");
    }
    let steps =
        |text: &str, loss: &str| sample(text, "ghmd_steps_applied_total", &[("loss", loss)]);
    let text = scrape_until(server.metrics_addr, |text| {
        steps(text, "seesaw") == Some(3.0) && steps(text, "eqlv2") == Some(2.0)
    })
    .await;
    assert_eq!(steps(&text, "seesaw"), Some(3.0), "{text}");
    assert_eq!(steps(&text, "eqlv2"), Some(2.0), "{text}");
    assert_eq!(
        sample(&text, "ghmd_jobs", &[("loss", "seesaw")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ghmd_jobs", &[("loss", "eqlv2")]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ghmd_jobs", &[("loss", "ghm_c")]),
        Some(0.0),
        "{text}"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// (d) The state file of format 3, as this version writes it.

const STATE_V3: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/state-v3.ghmd");

/// The jobs of tests/data/state-v3.ghmd under `prefix`, with their steps: what wrote the file,
/// and what a test replays to compare the loaded jobs with.
async fn state_v3_jobs(server: &TestServer, prefix: &str) {
    let mut client = server.client().await;
    let seesaw_spec = with_seesaw(SeesawSpec {
        num_classes: 5,
        p: Some(0.5),
        ..Default::default()
    });
    let seesaw_id = format!("{prefix}v3-seesaw");
    client
        .create_job(&seesaw_id, seesaw_spec)
        .await
        .expect("create");
    for (step, input) in [
        labels_input(&[0, 5, 5, 2]),
        counts_input(&[1 << 24, 0, 0, 0, 0, 1]),
        labels_input(&[3, 3, 0]),
    ]
    .into_iter()
    .enumerate()
    {
        let request = step_request(&seesaw_id, step as u64, 0, input);
        client.harmonize(request).await.expect("step");
    }
    let eqlv2_id = format!("{prefix}v3-eqlv2");
    client
        .create_job(&eqlv2_id, eqlv2(4))
        .await
        .expect("create");
    for (step, (pos, neg)) in [
        ([0.5f32, 0.0, 1.25, 3.0], [2.0f32, 4.5, 0.0, 1.0]),
        ([1e-3, 7.0, 0.0, 0.0], [0.1, 0.1, 9.0, 0.0]),
    ]
    .into_iter()
    .enumerate()
    {
        let request = step_request(&eqlv2_id, step as u64, 0, grads_input(&pos, &neg));
        client.harmonize(request).await.expect("step");
    }
    let sync_id = format!("{prefix}v3-eqlv2-sync");
    client
        .create_job_for_run(&sync_id, with_world(eqlv2(3), 2), "run-v3")
        .await
        .expect("create");
    for step in 0..2u64 {
        let requests = (0..2u32)
            .map(|rank| {
                let value = (step as f32 + 1.0) * (rank as f32 + 0.5);
                step_request(
                    &sync_id,
                    step,
                    rank,
                    grads_input(&[value, 0.0, 0.25], &[1.0, value, 0.0]),
                )
            })
            .collect();
        all_ok(step_in_order(server, requests, &[1, 0]).await);
    }
}

/// `GHMD_WRITE_STATE_FIXTURE=1` writes tests/data/state-v3.ghmd (and the snapshot_load fuzz
/// seeds made of it) from a server of this version; without it the test loads the committed
/// file and compares every job with the same jobs replayed on the server that loaded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_of_format_3_loads_its_seesaw_and_eqlv2_jobs() {
    if std::env::var_os("GHMD_WRITE_STATE_FIXTURE").is_some() {
        write_state_v3().await;
    }
    let dir = TempDir::new("state-v3");
    std::fs::copy(STATE_V3, dir.path().join(ghmd::persist::STATE_FILE)).expect("copy the fixture");
    let bytes = std::fs::read(STATE_V3).expect("the fixture");
    assert_eq!(&bytes[..ghmd::persist::MAGIC.len()], ghmd::persist::MAGIC);
    let version = &bytes[ghmd::persist::MAGIC.len()..ghmd::persist::MAGIC.len() + 4];
    assert_eq!(version, 3u32.to_le_bytes(), "a file of format 3");

    let data_dir = dir.path().to_owned();
    let server = TestServer::start_with(move |config| {
        config.in_memory = false;
        config.data_dir = data_dir;
    })
    .await;
    state_v3_jobs(&server, "replay/").await;
    let mut client = server.client().await;
    for name in ["v3-seesaw", "v3-eqlv2", "v3-eqlv2-sync"] {
        let loaded = client
            .get_job(&format!("fixture/{name}"))
            .await
            .expect("loaded");
        let replayed = client
            .get_job(&format!("replay/{name}"))
            .await
            .expect("replayed");
        let (a, b) = (loaded.state.expect("state"), replayed.state.expect("state"));
        assert_eq!(
            state_bits(&stored_state(&a)),
            state_bits(&stored_state(&b)),
            "{name}: the state"
        );
        assert_eq!(a, b, "{name}: the counters and lineage");
        assert_eq!(loaded.spec, replayed.spec, "{name}: the spec");
        assert_eq!(loaded.run_id, replayed.run_id, "{name}: the run id");
    }
    // It steps on: the loaded step-synchronous job takes step 2 of both ranks.
    let requests = (0..2u32)
        .map(|rank| {
            step_request(
                "fixture/v3-eqlv2-sync",
                2,
                rank,
                grads_input(&[1.0; 3], &[1.0; 3]),
            )
        })
        .collect();
    let responses = all_ok(step_in_order(&server, requests, &[0, 1]).await);
    assert_eq!((responses[0].steps, responses[0].next_step), (3, 3));
    server.stop().await;
}

async fn write_state_v3() {
    let dir = TempDir::new("write-state-v3");
    let data_dir = dir.path().to_owned();
    let server = TestServer::start_with(move |config| {
        config.in_memory = false;
        config.data_dir = data_dir;
    })
    .await;
    state_v3_jobs(&server, "fixture/").await;
    server.stop().await;
    let file = std::fs::read(dir.path().join(ghmd::persist::STATE_FILE)).expect("the snapshot");
    std::fs::write(STATE_V3, &file).expect("write the fixture");
    // The snapshot_load target's seeds: the payload behind a header the harness writes (an
    // even selector), and the whole file (an odd one).
    let seeds =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/snapshot_load");
    let mut payload = vec![0u8];
    payload.extend_from_slice(&file[ghmd::persist::HEADER_LEN..]);
    std::fs::write(seeds.join("seed-methods-v3"), payload).expect("write the seed");
    let mut whole = vec![1u8];
    whole.extend_from_slice(&file);
    std::fs::write(seeds.join("seed-methods-v3-whole-file"), whole).expect("write the seed");
}

/// The file of the previous format (before Seesaw and EQLv2) loads on this version as it was
/// written (tests/data/state-v2.md lists what GetJob said then), and its jobs step on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_of_format_2_still_loads_and_steps_on() {
    let dir = TempDir::new("state-v2");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/state-v2.ghmd"),
        dir.path().join(ghmd::persist::STATE_FILE),
    )
    .expect("copy the fixture");
    let data_dir = dir.path().to_owned();
    let server = TestServer::start_with(move |config| {
        config.in_memory = false;
        config.data_dir = data_dir;
    })
    .await;
    let mut client = server.client().await;
    let sync = client.get_job("fixture/v2-sync").await.expect("loaded");
    let state = sync.state.expect("state");
    assert_eq!(
        (
            state.steps,
            state.elements,
            state.next_step,
            state.generation
        ),
        (3, 15, 3, 1)
    );
    assert_eq!(sync.run_id, "run-v2");
    assert!(state.method_state.is_none(), "a GHM job");
    let momentum_once = 0.578125f32;
    assert_eq!(
        bits(&state.acc_sum),
        bits(&[
            0.0,
            momentum_once,
            momentum_once,
            momentum_once,
            0.0,
            momentum_once,
            0.0,
            0.0,
            0.0,
            momentum_once
        ])
    );
    let r#async = job_state(&mut client, "fixture/v2-async").await;
    assert_eq!(
        (r#async.steps, r#async.elements, r#async.generation),
        (1, 15, 2)
    );
    let requests = [vec![0.2f32, 0.3], vec![0.1, 0.5, 0.9]]
        .iter()
        .enumerate()
        .map(|(rank, norms)| HarmonizeRequest {
            rank: rank as u32,
            ..step_request(
                "fixture/v2-sync",
                3,
                0,
                Input::GradientNorms(f32s_to_bytes(norms)),
            )
        })
        .collect();
    let responses = all_ok(step_in_order(&server, requests, &[1, 0]).await);
    assert_eq!((responses[0].steps, responses[0].generation), (4, 1));
    assert!(responses[0].method_state.is_none());
    server.stop().await;
}

/// A reseed's last_step whose state is wrong is refused naming last_step, the field the client
/// got wrong, not `state` (which in the same request is right).
#[tokio::test]
async fn a_reseeds_bad_last_step_is_named_last_step() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let state = |cum_samples: Vec<f32>| SeesawState { cum_samples };
    let good = state(vec![4.0, 0.0, 1.0]);
    let cases = [
        (
            "of another method",
            applied_step::MethodState::Eqlv2(Eqlv2State {
                pos_grad: vec![0.0; 2],
                neg_grad: vec![0.0; 2],
                pos_neg: vec![100.0; 2],
            }),
            "last_step.eqlv2",
        ),
        (
            "of another length",
            applied_step::MethodState::Seesaw(state(vec![4.0, 0.0])),
            "last_step.seesaw.cum_samples has 2 entries",
        ),
    ];
    for (context, last_state, needle) in cases {
        let request = ReseedJobRequest {
            job_id: "r/last-step".to_owned(),
            spec: Some(with_world(seesaw(2), 2)),
            run_id: String::new(),
            state: Some(JobState {
                steps: 1,
                elements: 5,
                next_step: 1,
                generation: 1,
                method_state: Some(job_state::MethodState::Seesaw(good.clone())),
                ..Default::default()
            }),
            last_step: Some(AppliedStep {
                step: 0,
                method_state: Some(last_state),
                ..Default::default()
            }),
        };
        assert_status(
            client.reseed_job(request).await,
            Code::InvalidArgument,
            &[needle],
            context,
        );
    }
    server.stop().await;
}

/// In a step-synchronous job a rank's bad contribution is refused before the barrier: it is
/// not filed, the other rank keeps waiting, and the same rank's good resend completes the step
/// with exactly the two good contributions. The most samples one rank may count apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_rank_leaves_the_step_to_its_good_resend() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let method = Eqlv2::new(3, 12.0, 0.8, 4.0).expect("spec");
    let job_id = "resend/eqlv2";
    let spec = step_synchronous(eqlv2(3), 2, Duration::from_secs(20));
    client.create_job(job_id, spec).await.expect("create");
    let good = [
        GradContribution {
            pos_grad: vec![0.5, 1e-3, 3.0],
            neg_grad: vec![1.0, 2.0, 0.0],
        },
        GradContribution {
            pos_grad: vec![0.25, 7.0, 0.0],
            neg_grad: vec![0.125, 0.0, 5.0],
        },
    ];
    let waiting = {
        let mut client = server.client().await;
        let request = step_request(job_id, 0, 0, grad_input(&good[0]));
        tokio::spawn(async move { client.harmonize(request).await })
    };
    let bad = step_request(job_id, 0, 1, grads_input(&[0.5, f32::NAN, 0.0], &[0.0; 3]));
    assert_status(
        client.harmonize(bad).await,
        Code::InvalidArgument,
        &["eqlv2.pos_grad[1] = NaN"],
        "rank 1's bad contribution",
    );
    let resent = client
        .harmonize(step_request(job_id, 0, 1, grad_input(&good[1])))
        .await
        .expect("the good resend completes the step");
    let first = waiting
        .await
        .expect("rank 0 task")
        .expect("rank 0 answered");
    let mut state = method.initial_state();
    method.step(&mut state, good.to_vec()).expect("model");
    for (rank, response) in [first, resent].iter().enumerate() {
        assert_eq!((response.steps, response.next_step), (1, 1), "rank {rank}");
        let context = format!("rank {rank}");
        assert_state(
            &mut client,
            job_id,
            response,
            &eqlv2_proto(&state),
            &context,
        )
        .await;
    }

    let most = ghmd::seesaw::MAX_SAMPLES_PER_CONTRIBUTION;
    client
        .create_job("resend/seesaw", seesaw(1))
        .await
        .expect("create");
    let response = client
        .harmonize(step_request(
            "resend/seesaw",
            0,
            0,
            counts_input(&[most - 1, 1]),
        ))
        .await
        .expect("exactly the most samples one rank may count");
    assert_eq!(response.elements, most);
    let expected = job_state::MethodState::Seesaw(SeesawState {
        cum_samples: vec![(most - 1) as f32, 1.0],
    });
    assert_state(
        &mut client,
        "resend/seesaw",
        &response,
        &expected,
        "the most samples",
    )
    .await;
    server.stop().await;
}

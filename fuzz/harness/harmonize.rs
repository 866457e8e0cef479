//! The body of the `harmonize_request` fuzz target, shared with `tests/it/fuzz_regressions.rs` so
//! that every input the fuzzer ever found interesting is replayed by the ordinary test suite.
//!
//! One input is: a selector byte, then protobuf bytes. The bytes are decoded as a
//! `HarmonizeRequest` exactly as the server's codec would, and go through the real
//! `HarmonizerService` (authorization, validation, conversion, the registry, the kernels) against
//! a fresh registry holding one job whose spec the selector picks (or, for spec index 7, a spec
//! decoded from the input too). Step-synchronous jobs get a companion rank, so that a valid
//! request completes its step instead of waiting.
//!
//! The selector's bits: 0x07 the spec's index, among GHM's specs, or with 0x10 set among
//! Seesaw's and EQLv2's (7: decoded either way); 0x08 keeps the request's own job id; 0x20
//! restores the job first from a RestoreJobRequest decoded from the input (a length byte, then
//! the message; its job id is the job's), before the HarmonizeRequest.
//!
//! A crash is: a panic anywhere, a status of INTERNAL or UNKNOWN (a server bug, never the
//! caller's fault), or an OK response that breaks the contract (GHM: weights of another
//! length, a weight that is negative or not finite, bin weights of another length; Seesaw and
//! EQLv2: no state of the job's method, or one of another class count or with a value that is
//! negative or not finite).

use ghmd::api::HarmonizerService;
use ghmd::auth::Access;
use ghmd::jobs::{Registry, RegistryLimits};
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::harmonizer_server::Harmonizer;
use ghmd::proto::{
    CreateJobRequest, Eqlv2Contribution, Eqlv2Spec, HarmonizeRequest, HarmonizeResponse, Histogram,
    JobSpec, Loss, RestoreJobRequest, SeesawContribution, SeesawSpec, harmonize_response, job_spec,
};
use prost::Message;
use tonic::{Code, Request};

const JOB: &str = "fuzz/job";

fn fixed_spec(index: u8) -> JobSpec {
    let (loss, bins, momentum, world_size) = match index {
        0 => (Loss::GhmC, 10, 0.0, 1),
        1 => (Loss::GhmC, 30, 0.75, 1),
        2 => (Loss::GhmR, 10, 0.7, 1),
        3 => (Loss::GhmR, 1, 0.0, 1),
        4 => (Loss::GhmC, 4096, 0.5, 1),
        5 => (Loss::GhmC, 10, 0.75, 2),
        _ => (Loss::GhmR, 10, 0.0, 2),
    };
    JobSpec {
        loss: loss.into(),
        bins,
        momentum,
        world_size,
        step_timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// Seesaw's and EQLv2's specs (selector bit 0x10): small, LVIS-sized and step-synchronous.
fn fixed_method_spec(index: u8) -> JobSpec {
    let (method, world_size) = match index {
        0 => (seesaw(5), 1),
        1 => (seesaw(1203), 1),
        2 => (eqlv2(5), 1),
        3 => (eqlv2(1203), 1),
        4 => (seesaw(5), 2),
        5 => (eqlv2(5), 2),
        _ => (seesaw(1), 1),
    };
    JobSpec {
        method: Some(method),
        world_size,
        step_timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn seesaw(num_classes: u32) -> job_spec::Method {
    job_spec::Method::Seesaw(SeesawSpec {
        num_classes,
        ..Default::default()
    })
}

fn eqlv2(num_classes: u32) -> job_spec::Method {
    job_spec::Method::Eqlv2(Eqlv2Spec {
        num_classes,
        ..Default::default()
    })
}

/// A length byte, then a message of at most that many bytes; the rest of the input after it.
fn length_prefixed<M: Message + Default>(bytes: &[u8]) -> Option<(M, &[u8])> {
    let (&len, tail) = bytes.split_first()?;
    let len = usize::from(len).min(tail.len());
    let message = M::decode(&tail[..len]).ok()?;
    Some((message, &tail[len..]))
}

/// A rank's empty contribution for the job's method, what the companion rank sends.
fn empty_input(spec: &JobSpec) -> Input {
    match spec.method {
        None => Input::Histogram(Histogram {
            counts: vec![0; spec.bins as usize],
            tot: 0.0,
        }),
        Some(job_spec::Method::Seesaw(seesaw)) => Input::Seesaw(SeesawContribution {
            label_counts: vec![0; seesaw.num_classes as usize + 1],
            labels: Vec::new(),
        }),
        Some(job_spec::Method::Eqlv2(eqlv2)) => Input::Eqlv2(Eqlv2Contribution {
            pos_grad: vec![0; eqlv2.num_classes as usize * 4].into(),
            neg_grad: vec![0; eqlv2.num_classes as usize * 4].into(),
        }),
    }
}

fn check_values(what: &str, values: &[f32], entries: usize) {
    assert_eq!(values.len(), entries, "{what} of another length");
    for v in values {
        assert!(v.is_finite() && *v >= 0.0, "{what}: {v}");
    }
}

/// An OK response keeps the contract of the job's method.
fn check_response(spec: &JobSpec, response: &HarmonizeResponse, elements: Option<usize>) {
    let classes = match spec.method {
        None => {
            check_ghm_response(spec, response, elements);
            return;
        }
        Some(job_spec::Method::Seesaw(seesaw)) => seesaw.num_classes as usize,
        Some(job_spec::Method::Eqlv2(eqlv2)) => eqlv2.num_classes as usize,
    };
    assert!(
        response.weights.is_empty() && response.bin_weights.is_empty(),
        "GHM's weights in a {spec:?} response"
    );
    match (&spec.method, &response.method_state) {
        (
            Some(job_spec::Method::Seesaw(_)),
            Some(harmonize_response::MethodState::Seesaw(state)),
        ) => {
            check_values("cum_samples", &state.cum_samples, classes + 1);
            for v in &state.cum_samples {
                assert_eq!(v.fract(), 0.0, "cum_samples counts whole samples: {v}");
            }
        }
        (Some(job_spec::Method::Eqlv2(_)), Some(harmonize_response::MethodState::Eqlv2(state))) => {
            check_values("pos_grad", &state.pos_grad, classes);
            check_values("neg_grad", &state.neg_grad, classes);
            check_values("pos_neg", &state.pos_neg, classes);
        }
        (method, state) => panic!("a {method:?} job answered with the state {state:?}"),
    }
}

fn check_ghm_response(spec: &JobSpec, response: &HarmonizeResponse, elements: Option<usize>) {
    if let Some(elements) = elements {
        assert_eq!(
            response.weights.len(),
            elements * 4,
            "weights of another length"
        );
    }
    assert_eq!(response.bin_weights.len(), spec.bins as usize);
    for chunk in response.weights.chunks_exact(4) {
        let w = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        assert!(w.is_finite() && w >= 0.0, "weight {w}");
    }
    for w in &response.bin_weights {
        assert!(w.is_finite() && *w >= 0.0, "bin weight {w}");
    }
    assert!(
        response.tot >= 1.0 && response.tot.is_finite(),
        "tot {}",
        response.tot
    );
    assert!(
        response.method_state.is_none(),
        "a GHM response with a method state"
    );
}

fn with_access<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Access::Open);
    request
}

fn check_status(status: &tonic::Status) {
    assert!(
        !matches!(status.code(), Code::Internal | Code::Unknown),
        "a server bug: {status:?}"
    );
}

/// How far an input got, so that the replay test can tell the seeds reach the kernels.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not decodable, or the job could not be created: the input never reached Harmonize.
    Skipped,
    /// Harmonize refused it with this status.
    Refused(Code),
    /// Harmonize weighed it.
    Weighed,
}

/// Runs one fuzz input. Panics on a crash as defined above.
pub fn run(data: &[u8]) -> Outcome {
    let Some((&selector, rest)) = data.split_first() else {
        return Outcome::Skipped;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
    {
        Ok(runtime) => runtime,
        Err(_) => return Outcome::Skipped,
    };
    runtime.block_on(run_async(selector, rest))
}

async fn run_async(selector: u8, mut bytes: &[u8]) -> Outcome {
    let service = HarmonizerService::new(Registry::new(RegistryLimits::default()));
    let spec_index = selector & 0x07;
    let spec = if spec_index == 7 {
        // A length byte, then a fuzzed CreateJobRequest's spec.
        let Some((request, rest)) = length_prefixed::<CreateJobRequest>(bytes) else {
            return Outcome::Skipped;
        };
        bytes = rest;
        request.spec
    } else if selector & 0x10 != 0 {
        Some(fixed_method_spec(spec_index))
    } else {
        Some(fixed_spec(spec_index))
    };
    let created = service
        .create_job(with_access(CreateJobRequest {
            job_id: JOB.to_owned(),
            spec,
            ..Default::default()
        }))
        .await;
    let job = match created {
        Ok(job) => job.into_inner(),
        Err(status) => {
            check_status(&status);
            return Outcome::Skipped;
        }
    };
    let spec = job.spec.unwrap_or_default();

    if selector & 0x20 != 0 {
        let Some((mut restore, rest)) = length_prefixed::<RestoreJobRequest>(bytes) else {
            return Outcome::Skipped;
        };
        bytes = rest;
        restore.job_id = JOB.to_owned();
        if let Err(status) = service.restore_job(with_access(restore)).await {
            check_status(&status);
        }
    }

    let Ok(mut request) = HarmonizeRequest::decode(bytes) else {
        return Outcome::Skipped;
    };
    if selector & 0x08 == 0 {
        request.job_id = JOB.to_owned();
    }
    let elements = match &request.input {
        Some(Input::GradientNorms(b) | Input::Residuals(b)) => Some(b.len() / 4),
        _ => None,
    };

    // A step-synchronous job needs its other rank; it sends an empty histogram.
    let companion = (spec.world_size == 2 && request.rank < 2).then(|| HarmonizeRequest {
        job_id: JOB.to_owned(),
        step: request.step,
        rank: 1 - request.rank,
        input: Some(empty_input(&spec)),
        label_weights: Default::default(),
        ..Default::default()
    });
    let fuzzed = service.harmonize(with_access(request));
    let result = match companion {
        Some(companion) => {
            let (result, other) = tokio::join!(fuzzed, service.harmonize(with_access(companion)));
            if let Err(status) = &other {
                check_status(status);
            }
            result
        }
        None => fuzzed.await,
    };
    let outcome = match result {
        Err(status) => {
            check_status(&status);
            Outcome::Refused(status.code())
        }
        Ok(response) => {
            check_response(&spec, &response.into_inner(), elements);
            Outcome::Weighed
        }
    };
    // The job still answers, whatever happened.
    let get = service
        .get_job(with_access(ghmd::proto::GetJobRequest {
            job_id: JOB.to_owned(),
        }))
        .await;
    assert!(get.is_ok(), "GetJob after the request: {get:?}");
    outcome
}

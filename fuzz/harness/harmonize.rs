//! The body of the `harmonize_request` fuzz target, shared with `tests/it/fuzz_regressions.rs` so
//! that every input the fuzzer ever found interesting is replayed by the ordinary test suite.
//!
//! One input is: a selector byte, then protobuf bytes. The bytes are decoded as a
//! `HarmonizeRequest` exactly as the server's codec would, and go through the real
//! `HarmonizerService` (authorization, validation, conversion, the registry, the kernels) against
//! a fresh registry holding one job whose spec the selector picks (or, for selector 7, a spec
//! decoded from the input too). Step-synchronous jobs get a companion rank, so that a valid
//! request completes its step instead of waiting.
//!
//! A crash is: a panic anywhere, a status of INTERNAL or UNKNOWN (a server bug, never the
//! caller's fault), or an OK response that breaks the contract (weights of another length,
//! a weight that is negative or not finite, bin weights of another length).

use ghmd::api::HarmonizerService;
use ghmd::auth::Access;
use ghmd::jobs::{Registry, RegistryLimits};
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::harmonizer_server::Harmonizer;
use ghmd::proto::{CreateJobRequest, HarmonizeRequest, Histogram, JobSpec, Loss};
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
        let Some((&len, tail)) = bytes.split_first() else {
            return Outcome::Skipped;
        };
        let len = usize::from(len).min(tail.len());
        let spec = match CreateJobRequest::decode(&tail[..len]) {
            Ok(request) => request.spec,
            Err(_) => return Outcome::Skipped,
        };
        bytes = &tail[len..];
        spec
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
        input: Some(Input::Histogram(Histogram {
            counts: vec![0; spec.bins as usize],
            tot: 0.0,
        })),
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
            let response = response.into_inner();
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

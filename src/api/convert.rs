//! Proto messages to the registry's domain types and back. What is wrong in a message as such
//! (an unset field, an unknown enum value, a malformed Duration) is refused here; the bounds a
//! job keeps are the registry's to check.

use std::time::Duration;

use tonic::Status;

use super::status::missing;
use crate::ghm::{self, Loss};
use crate::jobs::{
    BatchInput, Fence, JobSnapshot, JobSpec, JobUpdate, Reseed, SeedState, SeedStep, StepInput,
    StepOutcome, WorldSizeChange, check_world_size,
};
use crate::proto;

/// The step timeout of a job that does not set one, as the contract documents.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(60);

pub fn loss_from_proto(value: i32) -> Result<Loss, Status> {
    match proto::Loss::try_from(value) {
        Ok(proto::Loss::GhmC) => Ok(Loss::GhmC),
        Ok(proto::Loss::GhmR) => Ok(Loss::GhmR),
        Ok(proto::Loss::Unspecified) => Err(Status::invalid_argument(
            "spec.loss is unset: choose LOSS_GHM_C or LOSS_GHM_R",
        )),
        Err(_) => Err(Status::invalid_argument(format!(
            "spec.loss = {value} is not a known Loss: choose LOSS_GHM_C (1) or LOSS_GHM_R (2)"
        ))),
    }
}

fn loss_to_proto(loss: Loss) -> proto::Loss {
    match loss {
        Loss::GhmC => proto::Loss::GhmC,
        Loss::GhmR => proto::Loss::GhmR,
    }
}

/// A step timeout as a valid, positive `google.protobuf.Duration`; its bounds are the
/// registry's to check.
fn step_timeout_from_proto(field: &str, value: prost_types::Duration) -> Result<Duration, Status> {
    // prost would quietly normalise {1s, -5ns} or {0s, 2^31ns}; the protobuf spec calls them
    // invalid, and a timeout the caller did not mean is worse than a refusal.
    let nanos_ok = (-999_999_999..=999_999_999).contains(&value.nanos)
        && !(value.seconds > 0 && value.nanos < 0)
        && !(value.seconds < 0 && value.nanos > 0);
    if !nanos_ok {
        return Err(Status::invalid_argument(format!(
            "{field} = {}s {}ns: not a valid google.protobuf.Duration (nanos must be within \
             +-999999999 and have the sign of seconds)",
            value.seconds, value.nanos
        )));
    }
    let timeout = Duration::try_from(value).map_err(|_| {
        Status::invalid_argument(format!(
            "{field} = {}s {}ns: must be positive",
            value.seconds, value.nanos
        ))
    })?;
    Ok(timeout)
}

fn duration_to_proto(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: duration.subsec_nanos() as i32,
    }
}

pub fn spec_from_proto(
    spec: Option<proto::JobSpec>,
    max_step_timeout: Duration,
) -> Result<JobSpec, Status> {
    let spec = spec.ok_or_else(|| missing("spec"))?;
    let loss = loss_from_proto(spec.loss)?;
    let ghm = ghm::Spec::new(loss, spec.bins, spec.momentum, spec.mu)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    // Checked here too, and not only by the registry, so that a request wrong in several
    // fields hears of its world size before its step timeout, as it always has.
    check_world_size("spec.world_size", spec.world_size).map_err(Status::invalid_argument)?;
    let step_timeout = match spec.step_timeout {
        Some(timeout) => step_timeout_from_proto("spec.step_timeout", timeout)?,
        None => DEFAULT_STEP_TIMEOUT.min(max_step_timeout),
    };
    Ok(JobSpec {
        ghm,
        world_size: spec.world_size,
        step_timeout,
        allow_partial_steps: spec.allow_partial_steps,
    })
}

pub fn spec_to_proto(spec: &JobSpec) -> proto::JobSpec {
    proto::JobSpec {
        loss: loss_to_proto(spec.ghm.loss()).into(),
        bins: spec.ghm.bins() as u32,
        momentum: spec.ghm.momentum(),
        mu: spec.ghm.mu(),
        world_size: spec.world_size,
        step_timeout: Some(duration_to_proto(spec.step_timeout)),
        allow_partial_steps: spec.allow_partial_steps,
        method: None,
    }
}

pub fn job_to_proto(job: JobSnapshot) -> proto::Job {
    proto::Job {
        spec: Some(spec_to_proto(&job.spec)),
        state: Some(proto::JobState {
            acc_sum: job.acc_sum,
            steps: job.steps,
            elements: job.elements,
            next_step: job.next_step,
            generation: job.generation,
            method_state: None,
        }),
        create_time: Some(job.create_time.into()),
        update_time: Some(job.update_time.into()),
        job_id: job.id,
        run_id: job.run_id,
    }
}

/// Splits a request into its job id, the domain's view of it and the lineage it expects.
pub fn step_input_from_proto(
    request: proto::HarmonizeRequest,
) -> Result<(String, StepInput, Fence), Status> {
    let fence = Fence {
        generation: request.expected_generation,
        steps: request.expected_steps,
    };
    use proto::harmonize_request::Input;
    let batch = match request.input {
        Some(Input::GradientNorms(bytes)) => BatchInput::GradientNorms(bytes),
        Some(Input::Residuals(bytes)) => BatchInput::Residuals(bytes),
        Some(Input::Histogram(histogram)) => BatchInput::Histogram {
            counts: histogram.counts,
            tot: histogram.tot,
        },
        Some(Input::Seesaw(_) | Input::Eqlv2(_)) | None => {
            return Err(Status::invalid_argument(format!(
                "job {:?}: input is required: set gradient_norms, residuals or histogram",
                request.job_id
            )));
        }
    };
    // proto3 bytes carry no presence: empty label weights mean "all 1", like an absent field.
    let label_weights = Some(request.label_weights).filter(|bytes| !bytes.is_empty());
    Ok((
        request.job_id,
        StepInput {
            step: request.step,
            rank: request.rank,
            batch,
            label_weights,
        },
        fence,
    ))
}

pub fn outcome_to_proto(job_id: String, outcome: StepOutcome) -> proto::HarmonizeResponse {
    let applied = &outcome.applied;
    proto::HarmonizeResponse {
        job_id,
        step: outcome.step,
        weights: outcome.weights.map(Into::into).unwrap_or_default(),
        bin_weights: applied.table.bin_weights().to_vec(),
        tot: applied.table.tot,
        nonempty_bins: applied.table.nonempty_bins,
        acc_sum: applied.acc_sum.clone(),
        missing_ranks: applied.missing_ranks.clone(),
        steps: applied.counters.steps,
        elements: applied.counters.elements,
        next_step: applied.counters.next_step,
        generation: applied.counters.generation,
        method_state: None,
    }
}

/// A ReseedJob request in the domain's terms; its state and last step are checked by the
/// registry, as a RestoreJob's are.
pub fn reseed_from_proto(
    request: proto::ReseedJobRequest,
    max_step_timeout: Duration,
) -> Result<(String, Reseed), Status> {
    let spec = spec_from_proto(request.spec, max_step_timeout)?;
    let state = request.state.ok_or_else(|| missing("state"))?;
    let last_step = request.last_step.map(|last| SeedStep {
        step: last.step,
        bin_weights: last.bin_weights,
        tot: last.tot,
        nonempty_bins: last.nonempty_bins,
        acc_sum: last.acc_sum,
        missing_ranks: last.missing_ranks,
    });
    Ok((
        request.job_id,
        Reseed {
            spec,
            run_id: request.run_id,
            state: SeedState {
                acc_sum: state.acc_sum,
                steps: state.steps,
                elements: state.elements,
                next_step: state.next_step,
                generation: state.generation,
            },
            last_step,
        },
    ))
}

pub fn update_from_proto(request: &proto::UpdateJobRequest) -> Result<JobUpdate, Status> {
    // As in `spec_from_proto`: the world size is heard of first.
    check_world_size("world_size", request.world_size).map_err(Status::invalid_argument)?;
    let world_size = (request.world_size > 0).then_some(WorldSizeChange {
        from_step: request.from_step,
        world_size: request.world_size,
    });
    let step_timeout = request
        .step_timeout
        .map(|timeout| step_timeout_from_proto("step_timeout", timeout))
        .transpose()?;
    Ok(JobUpdate {
        world_size,
        step_timeout,
        allow_partial_steps: request.allow_partial_steps,
    })
}

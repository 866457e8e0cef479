//! Proto messages to the registry's domain types and back. What is wrong in a message as such
//! (an unset field, an unknown enum value, a malformed Duration) is refused here; the bounds a
//! job keeps are the registry's to check.

use std::time::Duration;

use tonic::Status;

use super::status::missing;
use crate::eqlv2::{self, Eqlv2};
use crate::ghm::{self, Loss};
use crate::jobs::{
    BatchInput, Fence, JobSnapshot, JobSpec, JobUpdate, Reseed, SeedState, SeedStep, StepInput,
    StepOutcome, WorldSizeChange, check_world_size,
};
use crate::method::{AnyState, AnyTable, Ghm, GhmStepInput, MethodSpec, StateInput};
use crate::proto;
use crate::seesaw::{self, Seesaw};

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
    let method = method_from_proto(&spec)?;
    // Checked here too, and not only by the registry, so that a request wrong in several
    // fields hears of its world size before its step timeout, as it always has.
    check_world_size("spec.world_size", spec.world_size).map_err(Status::invalid_argument)?;
    let step_timeout = match spec.step_timeout {
        Some(timeout) => step_timeout_from_proto("spec.step_timeout", timeout)?,
        None => DEFAULT_STEP_TIMEOUT.min(max_step_timeout),
    };
    Ok(JobSpec {
        method,
        world_size: spec.world_size,
        step_timeout,
        allow_partial_steps: spec.allow_partial_steps,
    })
}

/// The method a spec names: GHM when the `method` oneof is unset (as every client written
/// before Seesaw and EQLv2 sends it), else the oneof's, with GHM's fields left at 0.
fn method_from_proto(spec: &proto::JobSpec) -> Result<MethodSpec, Status> {
    use proto::job_spec::Method as ProtoMethod;
    let invalid = |e: &dyn std::fmt::Display| Status::invalid_argument(e.to_string());
    let Some(method) = &spec.method else {
        let loss = loss_from_proto(spec.loss)?;
        let ghm =
            ghm::Spec::new(loss, spec.bins, spec.momentum, spec.mu).map_err(|e| invalid(&e))?;
        return Ok(MethodSpec::Ghm(Ghm { spec: ghm }));
    };
    let name = match method {
        ProtoMethod::Seesaw(_) => "seesaw",
        ProtoMethod::Eqlv2(_) => "eqlv2",
    };
    let ghm_field = if spec.loss != 0 {
        Some(format!("spec.loss = {}", spec.loss))
    } else if spec.bins != 0 {
        Some(format!("spec.bins = {}", spec.bins))
    } else if spec.momentum != 0.0 {
        Some(format!("spec.momentum = {}", spec.momentum))
    } else if spec.mu != 0.0 {
        Some(format!("spec.mu = {}", spec.mu))
    } else {
        None
    };
    if let Some(field) = ghm_field {
        return Err(Status::invalid_argument(format!(
            "{field}: loss, bins, momentum and mu are GHM's; a {name} job leaves them unset \
             (spec.{name} holds its parameters)"
        )));
    }
    Ok(match method {
        ProtoMethod::Seesaw(seesaw) => MethodSpec::Seesaw(
            Seesaw::new(
                seesaw.num_classes,
                seesaw.p.unwrap_or(seesaw::DEFAULT_P),
                seesaw.q.unwrap_or(seesaw::DEFAULT_Q),
                seesaw.eps.unwrap_or(seesaw::DEFAULT_EPS),
            )
            .map_err(|e| invalid(&e))?,
        ),
        ProtoMethod::Eqlv2(eqlv2) => MethodSpec::Eqlv2(
            Eqlv2::new(
                eqlv2.num_classes,
                eqlv2.gamma.unwrap_or(eqlv2::DEFAULT_GAMMA),
                eqlv2.mu.unwrap_or(eqlv2::DEFAULT_MU),
                eqlv2.alpha.unwrap_or(eqlv2::DEFAULT_ALPHA),
            )
            .map_err(|e| invalid(&e))?,
        ),
    })
}

pub fn spec_to_proto(spec: &JobSpec) -> proto::JobSpec {
    use proto::job_spec::Method as ProtoMethod;
    let mut message = proto::JobSpec {
        world_size: spec.world_size,
        step_timeout: Some(duration_to_proto(spec.step_timeout)),
        allow_partial_steps: spec.allow_partial_steps,
        ..Default::default()
    };
    match &spec.method {
        MethodSpec::Ghm(ghm) => {
            message.loss = loss_to_proto(ghm.spec.loss()).into();
            message.bins = ghm.spec.bins() as u32;
            message.momentum = ghm.spec.momentum();
            message.mu = ghm.spec.mu();
        }
        MethodSpec::Seesaw(seesaw) => {
            message.method = Some(ProtoMethod::Seesaw(proto::SeesawSpec {
                num_classes: seesaw.num_classes() as u32,
                p: Some(seesaw.p()),
                q: Some(seesaw.q()),
                eps: Some(seesaw.eps()),
            }));
        }
        MethodSpec::Eqlv2(eqlv2) => {
            message.method = Some(ProtoMethod::Eqlv2(proto::Eqlv2Spec {
                num_classes: eqlv2.num_classes() as u32,
                gamma: Some(eqlv2.gamma()),
                mu: Some(eqlv2.mu()),
                alpha: Some(eqlv2.alpha()),
            }));
        }
    }
    message
}

fn seesaw_state(cum_samples: &[f32]) -> proto::SeesawState {
    proto::SeesawState {
        cum_samples: cum_samples.to_vec(),
    }
}

fn eqlv2_state(state: &crate::eqlv2::Eqlv2State) -> proto::Eqlv2State {
    proto::Eqlv2State {
        pos_grad: state.pos_grad().to_vec(),
        neg_grad: state.neg_grad().to_vec(),
        pos_neg: state.pos_neg().to_vec(),
    }
}

pub fn job_to_proto(job: JobSnapshot) -> proto::Job {
    use proto::job_state::MethodState;
    let (acc_sum, method_state) = match &job.state {
        AnyState::Ghm(density) => (density.acc_sum().to_vec(), None),
        AnyState::Seesaw(state) => (
            Vec::new(),
            Some(MethodState::Seesaw(seesaw_state(state.cum_samples()))),
        ),
        AnyState::Eqlv2(state) => (Vec::new(), Some(MethodState::Eqlv2(eqlv2_state(state)))),
    };
    proto::Job {
        spec: Some(spec_to_proto(&job.spec)),
        state: Some(proto::JobState {
            acc_sum,
            steps: job.steps,
            elements: job.elements,
            next_step: job.next_step,
            generation: job.generation,
            method_state,
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
        Some(Input::Seesaw(seesaw)) => {
            match (seesaw.label_counts.is_empty(), seesaw.labels.is_empty()) {
                (false, false) => {
                    return Err(Status::invalid_argument(format!(
                        "job {:?}: seesaw has both label_counts ({} entries) and labels ({}): \
                         send one of the two",
                        request.job_id,
                        seesaw.label_counts.len(),
                        seesaw.labels.len()
                    )));
                }
                (false, true) => BatchInput::SeesawCounts(seesaw.label_counts),
                // Both empty: a batch without samples, which counts nothing, as the reference.
                (true, _) => BatchInput::SeesawLabels(seesaw.labels),
            }
        }
        Some(Input::Eqlv2(eqlv2)) => BatchInput::Eqlv2 {
            pos_grad: eqlv2.pos_grad,
            neg_grad: eqlv2.neg_grad,
        },
        None => {
            return Err(Status::invalid_argument(format!(
                "job {:?}: input is required: set gradient_norms, residuals or histogram (GHM), \
                 seesaw or eqlv2",
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
    use proto::harmonize_response::MethodState;
    let applied = &outcome.applied;
    let (bin_weights, tot, nonempty_bins, method_state) = match &applied.table {
        AnyTable::Ghm(table) => (
            table.bin_weights().to_vec(),
            table.tot,
            table.nonempty_bins,
            None,
        ),
        AnyTable::Seesaw(cum_samples) => (
            Vec::new(),
            0.0,
            0,
            Some(MethodState::Seesaw(seesaw_state(cum_samples))),
        ),
        AnyTable::Eqlv2(state) => (
            Vec::new(),
            0.0,
            0,
            Some(MethodState::Eqlv2(eqlv2_state(state))),
        ),
    };
    proto::HarmonizeResponse {
        job_id,
        step: outcome.step,
        weights: outcome.weights.map(Into::into).unwrap_or_default(),
        bin_weights,
        tot,
        nonempty_bins,
        acc_sum: applied.acc_sum.clone(),
        missing_ranks: applied.missing_ranks.clone(),
        steps: applied.counters.steps,
        elements: applied.counters.elements,
        next_step: applied.counters.next_step,
        generation: applied.counters.generation,
        method_state,
    }
}

/// A ReseedJob request in the domain's terms; its state and last step are checked by the
/// registry, as a RestoreJob's are.
pub fn reseed_from_proto(
    request: proto::ReseedJobRequest,
    max_step_timeout: Duration,
) -> Result<(String, Reseed), Status> {
    use proto::applied_step::MethodState;
    let spec = spec_from_proto(request.spec, max_step_timeout)?;
    let state = request.state.ok_or_else(|| missing("state"))?;
    let last_step = request
        .last_step
        .map(|last| {
            let method_state = match last.method_state {
                None => None,
                Some(MethodState::Seesaw(seesaw)) => Some(StateInput::Seesaw {
                    cum_samples: seesaw.cum_samples,
                }),
                Some(MethodState::Eqlv2(eqlv2)) => Some(eqlv2_input(eqlv2)),
            };
            if method_state.is_some() && !(last.bin_weights.is_empty() && last.acc_sum.is_empty()) {
                return Err(Status::invalid_argument(
                    "last_step: bin_weights and acc_sum are GHM's; a step with a seesaw or eqlv2 \
                     state leaves them empty",
                ));
            }
            Ok(SeedStep {
                step: last.step,
                ghm: GhmStepInput {
                    bin_weights: last.bin_weights,
                    tot: last.tot,
                    nonempty_bins: last.nonempty_bins,
                    acc_sum: last.acc_sum,
                },
                method_state,
                missing_ranks: last.missing_ranks,
            })
        })
        .transpose()?;
    Ok((
        request.job_id,
        Reseed {
            spec,
            run_id: request.run_id,
            state: SeedState {
                state: state_input_from_proto(state.acc_sum, state.method_state)?,
                steps: state.steps,
                elements: state.elements,
                next_step: state.next_step,
                generation: state.generation,
            },
            last_step,
        },
    ))
}

/// A response's state as a JobState's (for ReseedJob and checkpoints): the three oneofs hold the
/// same messages, and proto gives each its own Rust type.
pub fn state_of_job(
    state: proto::harmonize_response::MethodState,
) -> proto::job_state::MethodState {
    use proto::harmonize_response::MethodState as Response;
    use proto::job_state::MethodState;
    match state {
        Response::Seesaw(state) => MethodState::Seesaw(state),
        Response::Eqlv2(state) => MethodState::Eqlv2(state),
    }
}

/// A response's state as ReseedJobRequest.last_step's.
pub fn state_of_applied_step(
    state: proto::harmonize_response::MethodState,
) -> proto::applied_step::MethodState {
    use proto::applied_step::MethodState;
    use proto::harmonize_response::MethodState as Response;
    match state {
        Response::Seesaw(state) => MethodState::Seesaw(state),
        Response::Eqlv2(state) => MethodState::Eqlv2(state),
    }
}

fn eqlv2_input(eqlv2: proto::Eqlv2State) -> StateInput {
    StateInput::Eqlv2 {
        pos_grad: eqlv2.pos_grad,
        neg_grad: eqlv2.neg_grad,
        pos_neg: eqlv2.pos_neg,
    }
}

/// A JobState's statistic as the client sent it: GHM's `acc_sum` when `method_state` is unset.
pub fn state_input_from_proto(
    acc_sum: Vec<f32>,
    method_state: Option<proto::job_state::MethodState>,
) -> Result<StateInput, Status> {
    use proto::job_state::MethodState;
    let input = match method_state {
        None => return Ok(StateInput::Ghm { acc_sum }),
        Some(MethodState::Seesaw(seesaw)) => StateInput::Seesaw {
            cum_samples: seesaw.cum_samples,
        },
        Some(MethodState::Eqlv2(eqlv2)) => eqlv2_input(eqlv2),
    };
    if !acc_sum.is_empty() {
        return Err(Status::invalid_argument(format!(
            "state.acc_sum has {} entries: it is GHM's; a state with a seesaw or eqlv2 member \
             leaves it empty",
            acc_sum.len()
        )));
    }
    Ok(input)
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

//! A client that heals itself: when the replica holding its job dies, pauses, restarts or comes
//! back from an older snapshot, it reconnects, reseeds the job from the last response it
//! acknowledged and sends the interrupted step again, so that training code sees a delay and
//! never an error, a lost step or a weight that a never-failing server would not have given.
//!
//! Every request is fenced with the lineage of the last acknowledged response, so a copy that
//! holds less refuses (STALE_COPY, JOB_NOT_HERE) instead of answering; the session then reseeds
//! that copy (ReseedJob) and resends. Only a bounded time is spent healing one call.
//!
//! A run that resumes from a checkpoint restores through [`HealingSession::restore`] (rank 0),
//! and the other ranks create their sessions after it: a session that acknowledged the job's
//! state from before a restore would take the restored copy, which has fewer steps, for a
//! stale one, and reseed the old state over it.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use super::{Client, ClientError, ClientOptions, job_request};
use crate::api::convert::{state_of_applied_step, state_of_job};
use crate::api::error_info::{JOB_NOT_HERE, RUN_ACTIVE, RUN_REPLACED, STALE_COPY, reason_of};
use crate::proto::{
    AppliedStep, HarmonizeRequest, HarmonizeResponse, Job, JobSpec, JobState, ReseedJobRequest,
    RestoreJobRequest,
};

/// The state a response acknowledges: what ReseedJob puts a copy back to, and what a checkpoint
/// needs without a GetJob.
pub fn acknowledged_state(response: &HarmonizeResponse) -> JobState {
    JobState {
        acc_sum: response.acc_sum.clone(),
        steps: response.steps,
        elements: response.elements,
        next_step: response.next_step,
        generation: response.generation,
        method_state: response.method_state.clone().map(state_of_job),
    }
}

/// The step a response reports, for ReseedJob's `last_step`.
pub fn applied_step(response: &HarmonizeResponse) -> AppliedStep {
    AppliedStep {
        step: response.step,
        bin_weights: response.bin_weights.clone(),
        tot: response.tot,
        nonempty_bins: response.nonempty_bins,
        acc_sum: response.acc_sum.clone(),
        missing_ranks: response.missing_ranks.clone(),
        method_state: response.method_state.clone().map(state_of_applied_step),
    }
}

/// How a session connects and how long it keeps trying.
#[derive(Clone, Debug)]
pub struct HealingOptions {
    pub client: ClientOptions,
    /// The longest one call may spend healing before it fails.
    pub deadline: Duration,
    /// The first pause between attempts; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Send the steps on one HarmonizeStream (reopened after a failure) instead of one
    /// Harmonize call each.
    pub stream: bool,
}

impl Default for HealingOptions {
    fn default() -> Self {
        Self {
            client: ClientOptions::default(),
            deadline: Duration::from_secs(60),
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(500),
            stream: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HealingError {
    #[error("{0}")]
    Client(#[from] ClientError),
    /// RUN_REPLACED or RUN_ACTIVE: the job belongs to another run; healing cannot help.
    #[error("job {job_id:?}: {reason}: {}", status.message())]
    RunLost {
        job_id: String,
        reason: String,
        status: Status,
    },
    /// An error no retry can cure (a bad request, a permission).
    #[error("job {job_id:?}: {:?}: {}", status.code(), status.message())]
    Refused { job_id: String, status: Status },
    #[error(
        "job {job_id:?}: {what} did not succeed within the healing deadline of {deadline:?} \
         ({attempts} attempts); the last error was {:?}: {}",
        last.code(),
        last.message()
    )]
    GaveUp {
        job_id: String,
        what: String,
        deadline: Duration,
        attempts: u32,
        last: Status,
    },
}

/// What a failed call asks the session to do.
enum Remedy {
    /// The connection or the replica failed: reconnect and send again.
    Reconnect,
    /// This replica's copy is absent or stale: reseed it, then send again.
    Reseed,
    /// The step did not happen (aborted): send it again.
    Resend,
    Fail,
}

fn remedy(status: &Status) -> Remedy {
    match reason_of(status).as_deref() {
        Some(STALE_COPY | JOB_NOT_HERE) => return Remedy::Reseed,
        Some(RUN_ACTIVE | RUN_REPLACED) => return Remedy::Fail,
        _ => {}
    }
    match status.code() {
        // What a dead replica, a proxy that lost its upstream, or a stream a proxy cut look like.
        Code::Unavailable | Code::Cancelled | Code::Internal | Code::Unknown => Remedy::Reconnect,
        Code::NotFound => Remedy::Reseed,
        Code::Aborted => Remedy::Resend,
        _ => Remedy::Fail,
    }
}

/// One job as one rank sees it, healed across failures of the server side.
pub struct HealingSession {
    target: String,
    options: HealingOptions,
    client: Client,
    job_id: String,
    spec: JobSpec,
    run_id: String,
    /// The counters and lineage of the last response acknowledged (or of CreateJob's answer).
    acknowledged: JobState,
    /// Step-synchronous jobs: the last acknowledged step, for a reseed to answer its retries.
    last_step: Option<AppliedStep>,
    reseeds: u64,
    /// With `HealingOptions::stream`: the open stream, if any.
    stream: Option<OpenStream>,
}

/// A HarmonizeStream carrying one request at a time.
struct OpenStream {
    requests: mpsc::Sender<HarmonizeRequest>,
    responses: Streaming<HarmonizeResponse>,
}

/// Attempts and pauses within one call's healing deadline.
struct Attempts {
    started: Instant,
    attempts: u32,
    backoff: Duration,
}

impl Attempts {
    fn new(options: &HealingOptions) -> Self {
        Self {
            started: Instant::now(),
            attempts: 0,
            backoff: options.first_backoff,
        }
    }

    /// Waits before the next attempt, or gives up with `last` once the deadline has passed.
    async fn pause(
        &mut self,
        options: &HealingOptions,
        job_id: &str,
        what: &str,
        last: Status,
    ) -> Result<(), HealingError> {
        self.attempts += 1;
        let left = options.deadline.saturating_sub(self.started.elapsed());
        if left.is_zero() {
            return Err(HealingError::GaveUp {
                job_id: job_id.to_owned(),
                what: what.to_owned(),
                deadline: options.deadline,
                attempts: self.attempts,
                last,
            });
        }
        tokio::time::sleep(self.backoff.min(left)).await;
        self.backoff = (self.backoff * 2).min(options.max_backoff);
        Ok(())
    }
}

impl HealingSession {
    /// Creates (or joins, as another rank of the same run) the job, retrying while the server
    /// is unreachable.
    pub async fn create(
        target: impl Into<String>,
        job_id: &str,
        spec: JobSpec,
        run_id: &str,
        options: HealingOptions,
    ) -> Result<Self, HealingError> {
        let target = target.into();
        let client = Client::connect_lazy_with(target.clone(), &options.client)?;
        let mut session = Self {
            target,
            options,
            client,
            job_id: job_id.to_owned(),
            spec,
            run_id: run_id.to_owned(),
            acknowledged: JobState::default(),
            last_step: None,
            reseeds: 0,
            stream: None,
        };
        let mut attempts = Attempts::new(&session.options);
        loop {
            let created = session
                .client
                .create_job_for_run(job_id, session.spec, run_id)
                .await;
            let status = match created {
                Ok(job) => {
                    session.acknowledge_job(&job);
                    return Ok(session);
                }
                Err(status) => status,
            };
            match remedy(&status) {
                Remedy::Reconnect => session.reconnect()?,
                Remedy::Fail | Remedy::Reseed | Remedy::Resend => {
                    return Err(session.fatal(status));
                }
            }
            attempts
                .pause(&session.options, job_id, "CreateJob", status)
                .await?;
        }
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The counters and lineage of the last acknowledged response: what a checkpoint records.
    pub fn acknowledged(&self) -> &JobState {
        &self.acknowledged
    }

    /// How many times this session reseeded its job.
    pub fn reseeds(&self) -> u64 {
        self.reseeds
    }

    fn fatal(&self, status: Status) -> HealingError {
        match reason_of(&status) {
            Some(reason) if reason == RUN_ACTIVE || reason == RUN_REPLACED => {
                HealingError::RunLost {
                    job_id: self.job_id.clone(),
                    reason,
                    status,
                }
            }
            _ => HealingError::Refused {
                job_id: self.job_id.clone(),
                status,
            },
        }
    }

    fn reconnect(&mut self) -> Result<(), HealingError> {
        self.stream = None;
        self.client = Client::connect_lazy_with(self.target.clone(), &self.options.client)?;
        Ok(())
    }

    /// One attempt, on the session's stream or as one call. A stream that failed is dropped:
    /// the server ends a stream at its first error, and a proxy may have cut it.
    async fn send(&mut self, request: HarmonizeRequest) -> Result<HarmonizeResponse, Status> {
        if !self.options.stream {
            return self.client.harmonize(request).await;
        }
        let result = self.send_on_stream(request).await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn send_on_stream(
        &mut self,
        request: HarmonizeRequest,
    ) -> Result<HarmonizeResponse, Status> {
        let stream = match self.stream.as_mut() {
            Some(stream) => stream,
            None => {
                let (requests, inbound) = mpsc::channel(1);
                let responses = self
                    .client
                    .raw()
                    .harmonize_stream(job_request(&self.job_id, ReceiverStream::new(inbound)))
                    .await?
                    .into_inner();
                self.stream.insert(OpenStream {
                    requests,
                    responses,
                })
            }
        };
        let ended = || Status::unavailable("the stream ended without answering the request");
        if stream.requests.send(request).await.is_err() {
            // The stream is gone; its final status says why, if it came.
            return Err(stream.responses.message().await.err().unwrap_or_else(ended));
        }
        stream.responses.message().await?.ok_or_else(ended)
    }

    fn acknowledge_job(&mut self, job: &Job) {
        self.acknowledged = job.state.clone().unwrap_or_default();
        self.last_step = None;
    }

    fn acknowledge(&mut self, response: &HarmonizeResponse) {
        self.acknowledged = acknowledged_state(response);
        self.last_step = (self.spec.world_size > 1).then(|| applied_step(response));
    }

    /// Puts this replica's copy at the acknowledged state (or leaves a copy that holds more).
    async fn reseed(&mut self) -> Result<(), Status> {
        let request = ReseedJobRequest {
            job_id: self.job_id.clone(),
            spec: Some(self.spec),
            run_id: self.run_id.clone(),
            state: Some(self.acknowledged.clone()),
            last_step: self.last_step.clone(),
        };
        self.client.reseed_job(request).await?;
        self.reseeds += 1;
        Ok(())
    }

    /// Puts the job back to a checkpoint's state (RestoreJob) and follows the restored lineage
    /// from then on.
    pub async fn restore(&mut self, state: JobState) -> Result<Job, HealingError> {
        let request = RestoreJobRequest {
            job_id: self.job_id.clone(),
            state: Some(state),
        };
        let job = self
            .client
            .restore_job(request)
            .await
            .map_err(|status| self.fatal(status))?;
        self.acknowledge_job(&job);
        Ok(job)
    }

    /// Weighs one request (its job id is the session's), healing whatever fails on the server
    /// side within the deadline.
    pub async fn harmonize(
        &mut self,
        mut request: HarmonizeRequest,
    ) -> Result<HarmonizeResponse, HealingError> {
        request.job_id = self.job_id.clone();
        let what = format!("step {}", request.step);
        let mut attempts = Attempts::new(&self.options);
        let mut needs_reseed = false;
        loop {
            let failure = if needs_reseed {
                self.reseed().await.err()
            } else {
                None
            };
            let failure = match failure {
                Some(status) => status,
                None => {
                    needs_reseed = false;
                    request.expected_generation = self.acknowledged.generation;
                    request.expected_steps = self.acknowledged.steps;
                    match self.send(request.clone()).await {
                        Ok(response) => {
                            self.acknowledge(&response);
                            return Ok(response);
                        }
                        Err(status) => status,
                    }
                }
            };
            match remedy(&failure) {
                Remedy::Fail => return Err(self.fatal(failure)),
                Remedy::Reconnect => self.reconnect()?,
                Remedy::Reseed => needs_reseed = true,
                Remedy::Resend => {}
            }
            tracing::debug!(
                job_id = %self.job_id,
                code = ?failure.code(),
                message = failure.message(),
                "healing"
            );
            attempts
                .pause(&self.options, &self.job_id, &what, failure)
                .await?;
        }
    }

    /// Sends bin counts and the raw tot (histogram mode).
    pub async fn harmonize_histogram(
        &mut self,
        step: u64,
        rank: u32,
        counts: Vec<u64>,
        tot: f64,
    ) -> Result<HarmonizeResponse, HealingError> {
        self.harmonize(HarmonizeRequest {
            step,
            rank,
            input: Some(crate::proto::harmonize_request::Input::Histogram(
                crate::proto::Histogram { counts, tot },
            )),
            ..Default::default()
        })
        .await
    }
}

//! The `ghm.v1.Harmonizer` service: each RPC authorizes the caller for the job, checks its
//! `x-ghmd-job` header, converts the request, asks the registry and converts the answer. A
//! stream is a task that handles its requests in order, until it fails or the server drains.

use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::access::{access_of, authorize, owner_of};
use super::convert::{
    job_to_proto, outcome_to_proto, reseed_from_proto, spec_from_proto, state_input_from_proto,
    step_input_from_proto, update_from_proto,
};
use super::routing::Routing;
use super::status::missing;
use crate::auth::Access;
use crate::jobs::{Registry, validate_job_id};
use crate::proto::harmonizer_server::Harmonizer;
use crate::proto::{
    CreateJobRequest, DeleteJobRequest, DeleteJobResponse, GetJobRequest, HarmonizeRequest,
    HarmonizeResponse, Job, ListJobsRequest, ListJobsResponse, ReseedJobRequest, RestoreJobRequest,
    UpdateJobRequest,
};
use crate::shutdown::Shutdown;

/// How long a job must go unchanged before another run may take it over, by default
/// (`--run-takeover-after`).
pub const DEFAULT_RUN_TAKEOVER_AFTER: Duration = Duration::from_secs(120);

/// The requests that name one job, so that every one of them is authorized and routed alike.
trait JobScoped {
    fn job_id(&self) -> &str;
}

macro_rules! job_scoped {
    ($($request:ty),*) => {
        $(impl JobScoped for $request {
            fn job_id(&self) -> &str {
                &self.job_id
            }
        })*
    };
}

job_scoped!(
    CreateJobRequest,
    GetJobRequest,
    DeleteJobRequest,
    UpdateJobRequest,
    RestoreJobRequest,
    ReseedJobRequest,
    HarmonizeRequest
);

/// What an open stream is told when the server stops: at a message boundary, with the code
/// clients retry on, so that they move to another replica at once.
fn shutting_down() -> Status {
    Status::unavailable(
        "ghmd is shutting down: this stream ends here, at a message boundary; open a new one \
         (to another replica, or to this one once it is back) and send the next request there",
    )
}

/// Completes once the server starts draining; never without a drain signal.
async fn draining(drain: &mut Option<Shutdown>) {
    match drain {
        Some(drain) => drain.recv().await,
        None => std::future::pending::<()>().await,
    }
}

const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

/// The `ghm.v1.Harmonizer` service over a job registry, which holds every limit a request is
/// checked against.
#[derive(Clone)]
pub struct HarmonizerService {
    registry: Registry,
    routing: Routing,
    run_takeover_after: Duration,
    /// Turns true when the server starts shutting down: open streams end at their next message
    /// boundary.
    drain: Option<Shutdown>,
}

impl HarmonizerService {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            routing: Routing::default(),
            run_takeover_after: DEFAULT_RUN_TAKEOVER_AFTER,
            drain: None,
        }
    }

    /// The `x-ghmd-job` policy (`--require-job-header`) and who counts its refusals.
    pub fn with_routing(mut self, routing: Routing) -> Self {
        self.routing = routing;
        self
    }

    /// `--run-takeover-after`.
    pub fn with_run_takeover_after(mut self, after: Duration) -> Self {
        self.run_takeover_after = after;
        self
    }

    /// The server's shutdown signal, so that open streams end when it starts draining.
    pub fn with_drain(mut self, drain: Shutdown) -> Self {
        self.drain = Some(drain);
        self
    }

    /// Authorizes a job-scoped call and checks its `x-ghmd-job` header.
    fn job_call<T: JobScoped>(&self, request: Request<T>) -> Result<(Access, T), Status> {
        let access = access_of(&request)?;
        let (metadata, _, message) = request.into_parts();
        authorize(&access, message.job_id())?;
        self.routing.check_call(&metadata, message.job_id())?;
        Ok((access, message))
    }

    /// Weighs one request whose caller is authorized and whose route is checked.
    async fn harmonize_one(&self, request: HarmonizeRequest) -> Result<HarmonizeResponse, Status> {
        let (job_id, input, fence) = step_input_from_proto(request)?;
        let outcome = self
            .registry
            .harmonize_fenced(&job_id, input, fence)
            .await?;
        Ok(outcome_to_proto(job_id, outcome))
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<HarmonizeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Harmonizer for HarmonizerService {
    async fn create_job(
        &self,
        request: Request<CreateJobRequest>,
    ) -> Result<Response<Job>, Status> {
        // The caller's quotas and its peer address, read before the request is taken apart.
        let owner = access_of(&request).map(|access| owner_of(&access, &request))?;
        let (access, request) = self.job_call(request)?;
        let spec = spec_from_proto(request.spec, self.registry.max_step_timeout())?;
        let (job, created) = self.registry.create_for_run(
            &request.job_id,
            spec,
            &request.run_id,
            self.run_takeover_after,
            Some(&owner),
        )?;
        if created {
            tracing::info!(
                job_id = %request.job_id,
                run_id = %request.run_id,
                generation = job.generation,
                caller = access.name(),
                "job created"
            );
        }
        Ok(Response::new(job_to_proto(job)))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let (_, request) = self.job_call(request)?;
        let job = self.registry.get(&request.job_id)?;
        Ok(Response::new(job_to_proto(job.snapshot())))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let access = access_of(&request)?;
        let request = request.into_inner();
        let page_size = match request.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            validate_job_id(&request.page_token).map_err(|_| {
                Status::invalid_argument(
                    "page_token is not one this server handed out: pass next_page_token as it came",
                )
            })?;
            Some(request.page_token.as_str())
        };
        let page = self
            .registry
            .list(&request.prefix, after, page_size, |id| access.may_use(id));
        Ok(Response::new(ListJobsResponse {
            jobs: page.jobs.into_iter().map(job_to_proto).collect(),
            next_page_token: page.next_after.unwrap_or_default(),
        }))
    }

    async fn delete_job(
        &self,
        request: Request<DeleteJobRequest>,
    ) -> Result<Response<DeleteJobResponse>, Status> {
        let (access, DeleteJobRequest { job_id }) = self.job_call(request)?;
        self.registry.delete(&job_id)?;
        tracing::info!(%job_id, caller = access.name(), "job deleted");
        Ok(Response::new(DeleteJobResponse {}))
    }

    async fn update_job(
        &self,
        request: Request<UpdateJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let (_, request) = self.job_call(request)?;
        let update = update_from_proto(&request)?;
        let job = self.registry.update(&request.job_id, &update)?;
        tracing::info!(job_id = %request.job_id, ?update, "job updated");
        Ok(Response::new(job_to_proto(job)))
    }

    async fn restore_job(
        &self,
        request: Request<RestoreJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let (_, request) = self.job_call(request)?;
        let state = request.state.ok_or_else(|| missing("state"))?;
        let state_input = state_input_from_proto(state.acc_sum, state.method_state)?;
        let job = self.registry.restore(
            &request.job_id,
            state_input,
            state.steps,
            state.elements,
            state.next_step,
        )?;
        tracing::info!(
            job_id = %request.job_id,
            next_step = job.next_step,
            generation = job.generation,
            "job restored"
        );
        Ok(Response::new(job_to_proto(job)))
    }

    async fn reseed_job(
        &self,
        request: Request<ReseedJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let owner = access_of(&request).map(|access| owner_of(&access, &request))?;
        let (access, request) = self.job_call(request)?;
        let (job_id, reseed) = reseed_from_proto(request, self.registry.max_step_timeout())?;
        let (seen_generation, seen_steps) = (reseed.state.generation, reseed.state.steps);
        let (job, outcome) = self.registry.reseed(&job_id, reseed, Some(&owner))?;
        tracing::info!(
            %job_id,
            outcome = outcome.label(),
            seen_generation,
            seen_steps,
            generation = job.generation,
            steps = job.steps,
            caller = access.name(),
            "job reseeded"
        );
        Ok(Response::new(job_to_proto(job)))
    }

    async fn harmonize(
        &self,
        request: Request<HarmonizeRequest>,
    ) -> Result<Response<HarmonizeResponse>, Status> {
        let (_, request) = self.job_call(request)?;
        self.harmonize_one(request).await.map(Response::new)
    }

    type HarmonizeStreamStream = ResponseStream;

    /// One task per stream handles its requests in order; a rejected request (or a broken
    /// inbound message) is sent as the stream's final status.
    async fn harmonize_stream(
        &self,
        request: Request<Streaming<HarmonizeRequest>>,
    ) -> Result<Response<Self::HarmonizeStreamStream>, Status> {
        let access = access_of(&request)?;
        let mut route = self.routing.open_stream(request.metadata())?;
        let mut inbound = request.into_inner();
        let service = self.clone();
        let mut drain = self.drain.clone();
        let (responses, outbound) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                // A stream waiting for its next request ends as soon as the server drains; one
                // in the middle of a step ends after that step's answer.
                let message = tokio::select! {
                    biased;
                    () = draining(&mut drain) => {
                        let _ = responses.send(Err(shutting_down())).await;
                        break;
                    }
                    message = inbound.next() => message,
                };
                let Some(message) = message else {
                    break;
                };
                // A token revoked while the stream is open stops it here, at its next message.
                let result = match message.and_then(|request| {
                    access.check_not_revoked()?;
                    Ok(request)
                }) {
                    Ok(request) => match authorize(&access, &request.job_id)
                        .and_then(|()| route.check(&request.job_id))
                    {
                        Ok(()) => service.harmonize_one(request).await,
                        Err(status) => Err(status),
                    },
                    Err(status) => Err(status),
                };
                let failed = result.is_err();
                if responses.send(result).await.is_err() || failed {
                    break;
                }
                if drain.as_ref().is_some_and(Shutdown::is_stopped) {
                    let _ = responses.send(Err(shutting_down())).await;
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }
}

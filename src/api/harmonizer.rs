//! The `ghm.v1.Harmonizer` service: each RPC authorizes the caller for the job, converts the
//! request, asks the registry and converts the answer. A stream is a task that handles its
//! requests in order.

use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::access::{access_of, authorize, owner_of};
use super::convert::{
    job_to_proto, outcome_to_proto, spec_from_proto, step_input_from_proto, update_from_proto,
};
use super::status::missing;
use crate::auth::Access;
use crate::jobs::{Registry, validate_job_id};
use crate::proto::harmonizer_server::Harmonizer;
use crate::proto::{
    CreateJobRequest, DeleteJobRequest, DeleteJobResponse, GetJobRequest, HarmonizeRequest,
    HarmonizeResponse, Job, ListJobsRequest, ListJobsResponse, RestoreJobRequest, UpdateJobRequest,
};

const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

/// The `ghm.v1.Harmonizer` service over a job registry, which holds every limit a request is
/// checked against.
#[derive(Clone)]
pub struct HarmonizerService {
    registry: Registry,
}

impl HarmonizerService {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }

    async fn harmonize_one(
        &self,
        access: &Access,
        request: HarmonizeRequest,
    ) -> Result<HarmonizeResponse, Status> {
        authorize(access, &request.job_id)?;
        let (job_id, input) = step_input_from_proto(request)?;
        let outcome = self.registry.harmonize(&job_id, input).await?;
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
        let access = access_of(&request)?;
        let owner = owner_of(&access, &request);
        let request = request.into_inner();
        authorize(&access, &request.job_id)?;
        let spec = spec_from_proto(request.spec, self.registry.max_step_timeout())?;
        let (job, created) = self
            .registry
            .create_for(&request.job_id, spec, Some(&owner))?;
        if created {
            tracing::info!(job_id = %request.job_id, caller = access.name(), "job created");
        }
        Ok(Response::new(job_to_proto(job)))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let access = access_of(&request)?;
        let job_id = request.into_inner().job_id;
        authorize(&access, &job_id)?;
        let job = self.registry.get(&job_id)?;
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
        let access = access_of(&request)?;
        let job_id = request.into_inner().job_id;
        authorize(&access, &job_id)?;
        self.registry.delete(&job_id)?;
        tracing::info!(%job_id, caller = access.name(), "job deleted");
        Ok(Response::new(DeleteJobResponse {}))
    }

    async fn update_job(
        &self,
        request: Request<UpdateJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let access = access_of(&request)?;
        let request = request.into_inner();
        authorize(&access, &request.job_id)?;
        let update = update_from_proto(&request)?;
        let job = self.registry.update(&request.job_id, &update)?;
        tracing::info!(job_id = %request.job_id, ?update, "job updated");
        Ok(Response::new(job_to_proto(job)))
    }

    async fn restore_job(
        &self,
        request: Request<RestoreJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let access = access_of(&request)?;
        let request = request.into_inner();
        authorize(&access, &request.job_id)?;
        let state = request.state.ok_or_else(|| missing("state"))?;
        let job = self.registry.restore(
            &request.job_id,
            state.acc_sum,
            state.steps,
            state.elements,
            state.next_step,
        )?;
        tracing::info!(job_id = %request.job_id, next_step = job.next_step, "job restored");
        Ok(Response::new(job_to_proto(job)))
    }

    async fn harmonize(
        &self,
        request: Request<HarmonizeRequest>,
    ) -> Result<Response<HarmonizeResponse>, Status> {
        let access = access_of(&request)?;
        self.harmonize_one(&access, request.into_inner())
            .await
            .map(Response::new)
    }

    type HarmonizeStreamStream = ResponseStream;

    /// One task per stream handles its requests in order; a rejected request (or a broken
    /// inbound message) is sent as the stream's final status.
    async fn harmonize_stream(
        &self,
        request: Request<Streaming<HarmonizeRequest>>,
    ) -> Result<Response<Self::HarmonizeStreamStream>, Status> {
        let access = access_of(&request)?;
        let mut inbound = request.into_inner();
        let service = self.clone();
        let (responses, outbound) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                let result = match message {
                    Ok(request) => service.harmonize_one(&access, request).await,
                    Err(status) => Err(status),
                };
                let failed = result.is_err();
                if responses.send(result).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outbound))))
    }
}

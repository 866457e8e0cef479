//! A small typed client: float arrays in and out instead of packed bytes. The integration tests
//! and the bench tool use it; other languages generate theirs from the proto. Every job-scoped
//! call carries the job id in the `x-ghmd-job` header, so that a proxy can route it; a
//! [`HealingSession`] also survives the death or restart of the replica holding its job.

mod healing;

pub use healing::{HealingError, HealingOptions, HealingSession, acknowledged_state, applied_step};

use bytes::Bytes;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::api::JOB_HEADER;
use crate::proto::harmonize_request::Input;
use crate::proto::harmonizer_client::HarmonizerClient;
use crate::proto::{
    CreateJobRequest, DeleteJobRequest, GetJobRequest, HarmonizeRequest, HarmonizeResponse,
    Histogram, Job, JobSpec, ReseedJobRequest, RestoreJobRequest,
};

/// Large enough for a 16M-element batch and its weights each way.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Packs float32 values as the contract's little-endian bytes.
pub fn f32s_to_bytes(values: &[f32]) -> Bytes {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes.into()
}

/// Unpacks the contract's little-endian float32 bytes; a trailing partial value is dropped.
pub fn bytes_to_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .as_chunks::<4>()
        .0
        .iter()
        .map(|b| f32::from_le_bytes(*b))
        .collect()
}

/// How to reach a server that wants TLS or a bearer token.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Sent as `authorization: Bearer <token>` with every call.
    pub token: Option<String>,
    /// The server's CA (`ca_certificate`), this client's certificate for mutual TLS
    /// (`identity`), the name the server's certificate holds (`domain_name`). Use an
    /// `https://` target with it.
    pub tls: Option<ClientTlsConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the token cannot be sent as an HTTP header value (visible ASCII only)")]
    InvalidToken,
}

/// A request with the job id in the routing header. An id that cannot be a header value is
/// sent without it: the server refuses the id itself, with the reason.
pub fn job_request<T>(job_id: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = job_id.parse::<MetadataValue<Ascii>>() {
        request.metadata_mut().insert(JOB_HEADER, value);
    }
    request
}

/// Adds the bearer token, if any, to every call.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl Credentials {
    pub fn bearer(token: &str) -> Result<Self, ClientError> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::InvalidToken)?;
        value.set_sensitive(true);
        Ok(Self {
            authorization: Some(value),
        })
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Where and how to connect, with the credentials to send.
fn endpoint(
    target: String,
    options: &ClientOptions,
) -> Result<(Endpoint, Credentials), ClientError> {
    let credentials = match &options.token {
        Some(token) => Credentials::bearer(token)?,
        None => Credentials::default(),
    };
    let mut endpoint = Endpoint::from_shared(target)?;
    if let Some(tls) = &options.tls {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    Ok((endpoint, credentials))
}

/// The channel under the typed client: a connection plus the caller's credentials.
pub type Transport = InterceptedService<Channel, Credentials>;

#[derive(Clone)]
pub struct Client {
    inner: HarmonizerClient<Transport>,
}

impl Client {
    /// `target` is a URI such as `http://127.0.0.1:50051`.
    pub async fn connect(target: impl Into<String>) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(target.into())?.connect().await?;
        Ok(Self::from_channel(channel))
    }

    /// Connects with TLS and/or a bearer token; `https://host:port` with TLS.
    pub async fn connect_with(
        target: impl Into<String>,
        options: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let (endpoint, credentials) = endpoint(target.into(), options)?;
        let channel = endpoint.connect().await?;
        Ok(Self::with_credentials(channel, credentials))
    }

    /// Like `connect_with`, but the connection is made on the first call: what a client that
    /// reconnects after a failure wants, since the server may not be back yet.
    pub fn connect_lazy_with(
        target: impl Into<String>,
        options: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let (endpoint, credentials) = endpoint(target.into(), options)?;
        Ok(Self::with_credentials(endpoint.connect_lazy(), credentials))
    }

    pub fn from_channel(channel: Channel) -> Self {
        Self::with_credentials(channel, Credentials::default())
    }

    pub fn with_credentials(channel: Channel, credentials: Credentials) -> Self {
        Self {
            inner: HarmonizerClient::new(InterceptedService::new(channel, credentials))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// The generated client, for calls this wrapper does not cover.
    pub fn raw(&mut self) -> &mut HarmonizerClient<Transport> {
        &mut self.inner
    }

    pub async fn create_job(&mut self, job_id: &str, spec: JobSpec) -> Result<Job, Status> {
        self.create_job_for_run(job_id, spec, "").await
    }

    /// CreateJob on behalf of one training run (see CreateJobRequest.run_id).
    pub async fn create_job_for_run(
        &mut self,
        job_id: &str,
        spec: JobSpec,
        run_id: &str,
    ) -> Result<Job, Status> {
        let request = CreateJobRequest {
            job_id: job_id.to_owned(),
            spec: Some(spec),
            run_id: run_id.to_owned(),
        };
        let request = job_request(job_id, request);
        Ok(self.inner.create_job(request).await?.into_inner())
    }

    pub async fn get_job(&mut self, job_id: &str) -> Result<Job, Status> {
        let request = GetJobRequest {
            job_id: job_id.to_owned(),
        };
        let request = job_request(job_id, request);
        Ok(self.inner.get_job(request).await?.into_inner())
    }

    pub async fn delete_job(&mut self, job_id: &str) -> Result<(), Status> {
        let request = DeleteJobRequest {
            job_id: job_id.to_owned(),
        };
        let request = job_request(job_id, request);
        self.inner.delete_job(request).await?;
        Ok(())
    }

    pub async fn restore_job(&mut self, request: RestoreJobRequest) -> Result<Job, Status> {
        let request = job_request(&request.job_id.clone(), request);
        Ok(self.inner.restore_job(request).await?.into_inner())
    }

    pub async fn reseed_job(&mut self, request: ReseedJobRequest) -> Result<Job, Status> {
        let request = job_request(&request.job_id.clone(), request);
        Ok(self.inner.reseed_job(request).await?.into_inner())
    }

    pub async fn harmonize(
        &mut self,
        request: HarmonizeRequest,
    ) -> Result<HarmonizeResponse, Status> {
        let request = job_request(&request.job_id.clone(), request);
        Ok(self.inner.harmonize(request).await?.into_inner())
    }

    /// Weighs gradient norms; returns the response and its weights unpacked.
    pub async fn harmonize_norms(
        &mut self,
        job_id: &str,
        step: u64,
        rank: u32,
        norms: &[f32],
        label_weights: Option<&[f32]>,
    ) -> Result<(HarmonizeResponse, Vec<f32>), Status> {
        let request = norms_request(job_id, step, rank, norms, label_weights);
        let response = self.harmonize(request).await?;
        let weights = bytes_to_f32s(&response.weights);
        Ok((response, weights))
    }

    /// Sends only bin counts and the raw tot; the answer's `bin_weights` is the table to apply.
    pub async fn harmonize_histogram(
        &mut self,
        job_id: &str,
        step: u64,
        rank: u32,
        counts: Vec<u64>,
        tot: f64,
    ) -> Result<HarmonizeResponse, Status> {
        self.harmonize(HarmonizeRequest {
            job_id: job_id.to_owned(),
            step,
            rank,
            input: Some(Input::Histogram(Histogram { counts, tot })),
            label_weights: Bytes::new(),
            ..Default::default()
        })
        .await
    }
}

/// A request carrying gradient norms and, optionally, label weights.
pub fn norms_request(
    job_id: &str,
    step: u64,
    rank: u32,
    norms: &[f32],
    label_weights: Option<&[f32]>,
) -> HarmonizeRequest {
    HarmonizeRequest {
        job_id: job_id.to_owned(),
        step,
        rank,
        input: Some(Input::GradientNorms(f32s_to_bytes(norms))),
        label_weights: label_weights.map(f32s_to_bytes).unwrap_or_default(),
        ..Default::default()
    }
}

//! A small typed client: float arrays in and out instead of packed bytes. The integration tests
//! and the bench tool use it; other languages generate theirs from the proto.

use bytes::Bytes;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::proto::harmonize_request::Input;
use crate::proto::harmonizer_client::HarmonizerClient;
use crate::proto::{
    CreateJobRequest, DeleteJobRequest, GetJobRequest, HarmonizeRequest, HarmonizeResponse,
    Histogram, Job, JobSpec,
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

#[derive(Clone)]
pub struct Client {
    inner: HarmonizerClient<Channel>,
}

impl Client {
    /// `target` is a URI such as `http://127.0.0.1:50051`.
    pub async fn connect(target: impl Into<String>) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(target.into())?.connect().await?;
        Ok(Self::from_channel(channel))
    }

    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: HarmonizerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// The generated client, for calls this wrapper does not cover.
    pub fn raw(&mut self) -> &mut HarmonizerClient<Channel> {
        &mut self.inner
    }

    pub async fn create_job(&mut self, job_id: &str, spec: JobSpec) -> Result<Job, Status> {
        let request = CreateJobRequest {
            job_id: job_id.to_owned(),
            spec: Some(spec),
        };
        Ok(self.inner.create_job(request).await?.into_inner())
    }

    pub async fn get_job(&mut self, job_id: &str) -> Result<Job, Status> {
        let request = GetJobRequest {
            job_id: job_id.to_owned(),
        };
        Ok(self.inner.get_job(request).await?.into_inner())
    }

    pub async fn delete_job(&mut self, job_id: &str) -> Result<(), Status> {
        let request = DeleteJobRequest {
            job_id: job_id.to_owned(),
        };
        self.inner.delete_job(request).await?;
        Ok(())
    }

    pub async fn harmonize(
        &mut self,
        request: HarmonizeRequest,
    ) -> Result<HarmonizeResponse, Status> {
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
    }
}

//! Harmonize requests with any input, valid or not, as the generated client cannot build them.

use bytes::Bytes;
use ghmd::client::f32s_to_bytes;
use ghmd::proto::harmonize_request::Input;
use ghmd::proto::{HarmonizeRequest, Histogram};

pub fn request(job_id: &str, input: Option<Input>, label_weights: Bytes) -> HarmonizeRequest {
    HarmonizeRequest {
        job_id: job_id.to_owned(),
        step: 0,
        rank: 0,
        input,
        label_weights,
        ..Default::default()
    }
}

pub fn norms(values: &[f32]) -> Option<Input> {
    Some(Input::GradientNorms(f32s_to_bytes(values)))
}

pub fn residuals(values: &[f32]) -> Option<Input> {
    Some(Input::Residuals(f32s_to_bytes(values)))
}

pub fn histogram(counts: Vec<u64>, tot: f64) -> Option<Input> {
    Some(Input::Histogram(Histogram { counts, tot }))
}

/// A job's state as GetJob reports it.
pub async fn job_state(client: &mut ghmd::client::Client, job_id: &str) -> ghmd::proto::JobState {
    client
        .get_job(job_id)
        .await
        .expect("get")
        .state
        .expect("state")
}

//! Jobs with some state to disturb, and the views of them that "a refused request changed
//! nothing" compares before and after.

use ghmd::client::Client;
use ghmd::proto::{Job, ListJobsRequest};

use super::spec::with_world;
use super::{TestServer, bits, ghm_c, ghm_r};

/// Everything about one job that a rejected request must leave alone.
#[derive(Debug, PartialEq)]
pub struct Fingerprint {
    pub acc_sum_bits: Vec<u32>,
    pub steps: u64,
    pub elements: u64,
    pub update_time: Option<prost_types::Timestamp>,
}

pub async fn fingerprint(client: &mut Client, job_id: &str) -> Fingerprint {
    let job = client.get_job(job_id).await.expect("get job");
    let state = job.state.expect("state");
    Fingerprint {
        acc_sum_bits: bits(&state.acc_sum),
        steps: state.steps,
        elements: state.elements,
        update_time: job.update_time,
    }
}

/// The jobs of [`three_jobs`]: an asynchronous GHM-C job, a step-synchronous one, a GHM-R one.
pub const JOBS: [&str; 3] = ["h/async", "h/sync", "h/ghm-r"];

/// Creates [`JOBS`], each with one step behind it.
pub async fn three_jobs(client: &mut Client) {
    client
        .create_job(JOBS[0], ghm_c(10, 0.75))
        .await
        .expect("create");
    client
        .create_job(JOBS[1], with_world(ghm_c(10, 0.75), 2))
        .await
        .expect("create");
    client
        .create_job(JOBS[2], ghm_r(10, 0.7))
        .await
        .expect("create");
    client
        .harmonize_norms(JOBS[0], 0, 0, &[0.05, 0.5, 0.95], None)
        .await
        .expect("step");
    client
        .harmonize_norms(JOBS[2], 0, 0, &[0.05, 5.0, 900.0], None)
        .await
        .expect("step");
    let mut other = client.clone();
    let rank1 =
        tokio::spawn(async move { other.harmonize_norms(JOBS[1], 0, 1, &[0.3], None).await });
    client
        .harmonize_norms(JOBS[1], 0, 0, &[0.7], None)
        .await
        .expect("rank 0");
    rank1.await.expect("task").expect("rank 1");
}

/// Every job of [`JOBS`], whole (spec, state, timestamps): "no job changed" is this
/// before == after. It also checks that no job was created or deleted.
pub async fn snapshot(client: &mut Client) -> Vec<Job> {
    let mut jobs = Vec::new();
    for id in JOBS {
        jobs.push(client.get_job(id).await.expect("get"));
    }
    let listed = client
        .raw()
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        listed.jobs.len(),
        JOBS.len(),
        "a job was created or deleted"
    );
    jobs
}

/// The server still answers a good request (on a new connection) and health says SERVING.
pub async fn still_serving(server: &TestServer) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut client = server.client().await;
    client
        .create_job("h/probe", ghm_c(10, 0.0))
        .await
        .expect("a good request");
    client
        .harmonize_norms("h/probe", 0, 0, &[0.5], None)
        .await
        .expect("a good step");
    client.delete_job("h/probe").await.expect("delete");
    let mut health = HealthClient::new(server.channel().await);
    let status = health
        .check(HealthCheckRequest::default())
        .await
        .expect("health")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
}

/// Every job under `prefix`, page by page of `page_size`, in the order ListJobs gives them.
pub async fn list_all(client: &mut Client, prefix: &str, page_size: u32) -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .raw()
            .list_jobs(ListJobsRequest {
                prefix: prefix.to_owned(),
                page_size,
                page_token,
            })
            .await
            .expect("list")
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return jobs;
        }
        page_token = page.next_page_token;
    }
}

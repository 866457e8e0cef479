//! A job's life over gRPC: created (idempotently, for the same spec only), named by a valid
//! id, found or not found, listed page by page, deleted.

use ghmd::proto::{Job, ListJobsRequest};
use tonic::Code;

use crate::support::fixture::fingerprint;
use crate::support::{TestServer, assert_status, ghm_c, ghm_r};

#[tokio::test]
async fn create_job_is_idempotent_for_the_same_spec_only() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let created = client
        .create_job("idem/a", ghm_c(10, 0.75))
        .await
        .expect("create");
    assert_eq!(created.job_id, "idem/a");
    assert_eq!(created.state.as_ref().expect("state").steps, 0);

    client
        .harmonize_norms("idem/a", 0, 0, &[0.1, 0.5, 0.9], None)
        .await
        .expect("a step");
    let again = client
        .create_job("idem/a", ghm_c(10, 0.75))
        .await
        .expect("the same spec again");
    assert_eq!(again.create_time, created.create_time, "the existing job");
    let state = again.state.expect("state");
    assert_eq!(
        (state.steps, state.elements),
        (1, 3),
        "the existing job's state, not a fresh one"
    );

    let before = fingerprint(&mut client, "idem/a").await;
    for (what, spec) in [
        ("bins", ghm_c(11, 0.75)),
        ("momentum", ghm_c(10, 0.7)),
        ("loss", ghm_r(10, 0.75)),
    ] {
        assert_status(
            client.create_job("idem/a", spec).await,
            Code::AlreadyExists,
            &["idem/a"],
            &format!("another {what}"),
        );
    }
    assert_eq!(fingerprint(&mut client, "idem/a").await, before);
    server.stop().await;
}

#[tokio::test]
async fn bad_job_ids_are_invalid_argument_everywhere() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let too_long = "a".repeat(129);
    for id in [
        "",
        too_long.as_str(),
        "has space",
        "colon:id",
        "star*",
        "ünïcode",
        "new\nline",
        "back\\slash",
    ] {
        let context = format!("job_id {id:?}");
        assert_status(
            client.create_job(id, ghm_c(10, 0.0)).await,
            Code::InvalidArgument,
            &["job_id"],
            &format!("CreateJob {context}"),
        );
        assert_status(
            client.get_job(id).await,
            Code::InvalidArgument,
            &["job_id"],
            &format!("GetJob {context}"),
        );
        assert_status(
            client.delete_job(id).await,
            Code::InvalidArgument,
            &["job_id"],
            &format!("DeleteJob {context}"),
        );
        assert_status(
            client.harmonize_norms(id, 0, 0, &[0.5], None).await,
            Code::InvalidArgument,
            &["job_id"],
            &format!("Harmonize {context}"),
        );
    }
    // The edges of the rule are accepted.
    let longest = "b".repeat(128);
    for id in [longest.as_str(), "t", "team/exp-1.run_2/A9"] {
        client
            .create_job(id, ghm_c(10, 0.0))
            .await
            .unwrap_or_else(|e| panic!("{id:?}: {e}"));
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_jobs_are_not_found_and_deleted_jobs_are_gone() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    assert_status(
        client.get_job("nope").await,
        Code::NotFound,
        &["nope"],
        "GetJob",
    );
    assert_status(
        client.delete_job("nope").await,
        Code::NotFound,
        &["nope"],
        "DeleteJob",
    );
    assert_status(
        client.harmonize_norms("nope", 0, 0, &[0.5], None).await,
        Code::NotFound,
        &["nope"],
        "Harmonize",
    );

    client
        .create_job("gone", ghm_c(10, 0.75))
        .await
        .expect("create");
    client
        .harmonize_norms("gone", 0, 0, &[0.5], None)
        .await
        .expect("a step");
    client.delete_job("gone").await.expect("delete");
    assert_status(client.get_job("gone").await, Code::NotFound, &[], "GetJob");
    assert_status(
        client.delete_job("gone").await,
        Code::NotFound,
        &[],
        "DeleteJob twice",
    );
    // A job created again under the same id starts from nothing.
    let fresh = client
        .create_job("gone", ghm_c(10, 0.75))
        .await
        .expect("create again");
    let state = fresh.state.expect("state");
    assert_eq!((state.steps, state.elements), (0, 0));
    assert!(state.acc_sum.iter().all(|&a| a == 0.0));
    server.stop().await;
}

#[tokio::test]
async fn list_jobs_pages_through_every_job_of_a_prefix_exactly_once() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut wanted = Vec::new();
    // Created out of order, with ids that sort differently than they were created.
    for i in (0..23).rev() {
        let id = format!("list/job-{i:02}");
        client
            .create_job(&id, ghm_c(10, 0.0))
            .await
            .expect("create");
        wanted.push(id);
    }
    for id in ["lis", "lisu/x", "list", "other/list/job"] {
        client.create_job(id, ghm_c(10, 0.0)).await.expect("create");
    }
    wanted.sort();

    for page_size in [1u32, 5, 7, 23, 24, 0, 5000] {
        let mut seen: Vec<String> = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = client
                .raw()
                .list_jobs(ListJobsRequest {
                    prefix: "list/".to_owned(),
                    page_size,
                    page_token: token.clone(),
                })
                .await
                .expect("list")
                .into_inner();
            pages += 1;
            assert!(pages <= 30, "page_size {page_size}: paging does not end");
            let limit = if page_size == 0 {
                100
            } else {
                page_size as usize
            };
            assert!(
                page.jobs.len() <= limit,
                "page_size {page_size}: page too big"
            );
            for job in &page.jobs {
                assert!(job.spec.is_some() && job.state.is_some(), "whole jobs");
            }
            seen.extend(page.jobs.into_iter().map(|job: Job| job.job_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(
            seen, wanted,
            "page_size {page_size}: every job once, in order"
        );
    }

    let everything = client
        .raw()
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("list all")
        .into_inner();
    assert_eq!(everything.jobs.len(), 27);
    assert!(everything.next_page_token.is_empty());

    assert_status(
        client
            .raw()
            .list_jobs(ListJobsRequest {
                page_token: "not a token!".to_owned(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        &["page_token"],
        "a forged page token",
    );
    server.stop().await;
}

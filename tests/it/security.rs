//! Who gets in: TLS (and mutual TLS) with certificates made at test time, bearer tokens and
//! their job-id prefixes on every RPC and every stream message, ListJobs showing only the
//! caller's jobs, health open and reflection closed without a token, and SIGHUP reloading the
//! tokens file of the real binary without logging a token.

use std::time::Duration;

use ghmd::client::{Client, ClientOptions, Credentials, norms_request};
use ghmd::proto::{
    DeleteJobRequest, GetJobRequest, JobState, ListJobsRequest, RestoreJobRequest, UpdateJobRequest,
};
use rcgen::ExtendedKeyUsagePurpose;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::ClientTlsConfig;

use crate::support::binary::Launch;
use crate::support::fixture::list_all;
use crate::support::tls::{Ca, ServerTls};
use crate::support::{TempDir, TestServer, ghm_c};

// ---------------------------------------------------------------------------------------------
// Helpers.

/// What a TLS client gets from one CreateJob: Ok, or the code of the failure (a failed
/// connection counts as UNAVAILABLE). Bounded in time: a refused client must not hang.
async fn try_create(uri: String, tls: Option<ClientTlsConfig>, job_id: &str) -> Result<(), String> {
    let attempt = async {
        let options = ClientOptions { token: None, tls };
        let mut client = Client::connect_with(uri, &options)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        client
            .create_job(job_id, ghm_c(10, 0.75))
            .await
            .map(|_| ())
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
    };
    tokio::time::timeout(Duration::from_secs(20), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

// ---------------------------------------------------------------------------------------------
// TLS.

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_refuses_plaintext_and_strangers() {
    let files = ServerTls::new();
    let (cert, key) = (files.cert.clone(), files.key.clone());
    let server = TestServer::start_with(|config| {
        config.tls_cert = Some(cert);
        config.tls_key = Some(key);
    })
    .await;
    let https = format!("https://127.0.0.1:{}", server.addr.port());

    try_create(https.clone(), Some(files.ca.client_config(None)), "tls/ok")
        .await
        .expect("a client that trusts the CA");

    let plaintext = try_create(server.uri(), None, "tls/plaintext").await;
    assert!(plaintext.is_err(), "plaintext was served: {plaintext:?}");

    let stranger = Ca::new("some other CA");
    let untrusted = try_create(
        https.clone(),
        Some(stranger.client_config(None)),
        "tls/stranger",
    )
    .await;
    assert!(
        untrusted.is_err(),
        "a client that does not trust the CA got through"
    );

    // Only the trusted client's job exists.
    let mut client = Client::connect_with(
        https,
        &ClientOptions {
            token: None,
            tls: Some(files.ca.client_config(None)),
        },
    )
    .await
    .expect("connect");
    client.get_job("tls/ok").await.expect("the trusted job");
    for refused in ["tls/plaintext", "tls/stranger"] {
        let status = client.get_job(refused).await.expect_err(refused);
        assert_eq!(status.code(), Code::NotFound, "{refused}");
    }
    drop(files.dir);
    server.stop().await;
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let files = ServerTls::new();
    let client_ca = Ca::new("ghmd test client CA");
    let client_ca_path = files.dir.write("client-ca.pem", &client_ca.pem);
    let (cert, key) = (files.cert.clone(), files.key.clone());
    let server = TestServer::start_with(|config| {
        config.tls_cert = Some(cert);
        config.tls_key = Some(key);
        config.tls_client_ca = Some(client_ca_path);
    })
    .await;
    let https = format!("https://127.0.0.1:{}", server.addr.port());

    let without = try_create(
        https.clone(),
        Some(files.ca.client_config(None)),
        "mtls/without",
    )
    .await;
    assert!(without.is_err(), "no client certificate got through");

    let rogue_ca = Ca::new("rogue client CA");
    let (rogue_cert, rogue_key) = rogue_ca.leaf(&["worker"], ExtendedKeyUsagePurpose::ClientAuth);
    let rogue = try_create(
        https.clone(),
        Some(files.ca.client_config(Some((&rogue_cert, &rogue_key)))),
        "mtls/rogue",
    )
    .await;
    assert!(rogue.is_err(), "a certificate of another CA got through");

    let (worker_cert, worker_key) =
        client_ca.leaf(&["worker"], ExtendedKeyUsagePurpose::ClientAuth);
    let identity = Some((worker_cert.as_str(), worker_key.as_str()));
    try_create(
        https.clone(),
        Some(files.ca.client_config(identity)),
        "mtls/ok",
    )
    .await
    .expect("a client certificate from the client CA");

    let mut client = Client::connect_with(
        https,
        &ClientOptions {
            token: None,
            tls: Some(files.ca.client_config(identity)),
        },
    )
    .await
    .expect("connect");
    for refused in ["mtls/without", "mtls/rogue"] {
        let status = client.get_job(refused).await.expect_err(refused);
        assert_eq!(status.code(), Code::NotFound, "{refused}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_server_with_an_unreadable_or_bad_certificate_does_not_start() {
    let files = ServerTls::new();
    let garbage = files.dir.write("garbage.pem", "not a certificate");
    let cases = [
        (
            files.dir.path().join("missing.pem"),
            files.key.clone(),
            "--tls-cert",
        ),
        (files.cert.clone(), garbage.clone(), "TLS"),
    ];
    for (cert, key, needle) in cases {
        let error = TestServer::try_start_with(|config| {
            config.tls_cert = Some(cert);
            config.tls_key = Some(key);
        })
        .await
        .err()
        .expect("refused");
        assert!(error.to_string().contains(needle), "{error}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens.

const TEAM_A: &str = "team-a-secret-0123456789abcdef";
const TEAM_B: &str = "team-b-secret-0123456789abcdef";
const ADMIN: &str = "admin-secret-0123456789abcdef0";

fn tokens_toml(entries: &[(&str, &str, &[&str])]) -> String {
    let mut text = String::new();
    for (name, token, prefixes) in entries {
        let prefixes: Vec<String> = prefixes.iter().map(|p| format!("{p:?}")).collect();
        text.push_str(&format!(
            "[[token]]\nname = {name:?}\ntoken = {token:?}\nprefixes = [{}]\n\n",
            prefixes.join(", ")
        ));
    }
    text
}

fn standard_tokens() -> String {
    tokens_toml(&[
        ("team-a", TEAM_A, &["team-a/"]),
        ("team-b", TEAM_B, &["team-b/", "shared/b-"]),
        ("admin", ADMIN, &[""]),
    ])
}

/// Every RPC of the Harmonizer once, against `job_id`, each with its code.
async fn every_rpc(client: &mut Client, job_id: &str) -> Vec<(&'static str, Result<(), Code>)> {
    fn code<T>(result: Result<T, tonic::Status>) -> Result<(), Code> {
        result.map(|_| ()).map_err(|status| status.code())
    }
    let raw = client.raw();
    let mut results = vec![
        (
            "CreateJob",
            code(
                raw.create_job(ghmd::proto::CreateJobRequest {
                    job_id: job_id.to_owned(),
                    spec: Some(ghm_c(10, 0.75)),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "GetJob",
            code(
                raw.get_job(GetJobRequest {
                    job_id: job_id.to_owned(),
                })
                .await,
            ),
        ),
        (
            "UpdateJob",
            code(
                raw.update_job(UpdateJobRequest {
                    job_id: job_id.to_owned(),
                    ..Default::default()
                })
                .await,
            ),
        ),
        (
            "RestoreJob",
            code(
                raw.restore_job(RestoreJobRequest {
                    job_id: job_id.to_owned(),
                    state: Some(JobState {
                        acc_sum: vec![0.0; 10],
                        ..Default::default()
                    }),
                })
                .await,
            ),
        ),
        (
            "Harmonize",
            code(
                raw.harmonize(norms_request(job_id, 0, 0, &[0.5], None))
                    .await,
            ),
        ),
    ];
    let stream = raw
        .harmonize_stream(tokio_stream::iter(vec![norms_request(
            job_id,
            0,
            0,
            &[0.5],
            None,
        )]))
        .await;
    let stream_result = match stream {
        Err(status) => Err(status.code()),
        Ok(response) => match response.into_inner().next().await {
            Some(Ok(_)) => Ok(()),
            Some(Err(status)) => Err(status.code()),
            None => Err(Code::Unknown),
        },
    };
    results.push(("HarmonizeStream", stream_result));
    results.push((
        "DeleteJob",
        code(
            raw.delete_job(DeleteJobRequest {
                job_id: job_id.to_owned(),
            })
            .await,
        ),
    ));
    results
}

async fn list_ids(client: &mut Client, prefix: &str, page_size: u32) -> Vec<String> {
    list_all(client, prefix, page_size)
        .await
        .into_iter()
        .map(|job| job.job_id)
        .collect()
}

#[tokio::test]
async fn tokens_decide_who_may_use_which_job_on_every_rpc() {
    let dir = TempDir::new("tokens");
    let path = dir.write("tokens.toml", &standard_tokens());
    let server = TestServer::start_with(|config| config.tokens_file = Some(path)).await;

    let mut admin = server.client_with_token(Some(ADMIN)).await;
    for id in [
        "team-a/1",
        "team-a/2",
        "team-b/1",
        "shared/b-1",
        "shared/c-1",
        "other",
    ] {
        admin.create_job(id, ghm_c(10, 0.75)).await.expect(id);
    }
    admin
        .harmonize_norms("team-b/1", 0, 0, &[0.1, 0.5], None)
        .await
        .expect("a step");
    let before = admin.get_job("team-b/1").await.expect("get");

    // No token and unknown tokens: UNAUTHENTICATED on every RPC, ListJobs included.
    for token in [
        None,
        Some("not-a-known-token-at-all-000000"),
        Some(&TEAM_A[..TEAM_A.len() - 1]),
    ] {
        let mut client = server.client_with_token(token).await;
        for (rpc, result) in every_rpc(&mut client, "team-b/1").await {
            assert_eq!(result, Err(Code::Unauthenticated), "{rpc} with {token:?}");
        }
        let status = client
            .raw()
            .list_jobs(ListJobsRequest::default())
            .await
            .expect_err("list without a good token");
        assert_eq!(status.code(), Code::Unauthenticated);
    }

    // A good token outside its prefixes: PERMISSION_DENIED on every job-scoped RPC.
    let mut team_a = server.client_with_token(Some(TEAM_A)).await;
    for job_id in ["team-b/1", "team-b/new", "team-a", "shared/b-1", "other"] {
        for (rpc, result) in every_rpc(&mut team_a, job_id).await {
            assert_eq!(
                result,
                Err(Code::PermissionDenied),
                "team-a: {rpc} on {job_id}"
            );
        }
    }
    let status = team_a.get_job("team-b/1").await.expect_err("denied");
    assert!(
        status.message().contains("team-a") && status.message().contains("\"team-a/\""),
        "{status:?}"
    );
    assert!(
        !status.message().contains(TEAM_A),
        "the token is echoed: {status:?}"
    );
    assert_eq!(
        admin.get_job("team-b/1").await.expect("get"),
        before,
        "team-b/1 changed"
    );

    // Inside its prefixes, everything works, for each prefix of a token.
    for (rpc, result) in every_rpc(&mut team_a, "team-a/3").await {
        assert_eq!(result, Ok(()), "team-a: {rpc} on its own job");
    }
    let mut team_b = server.client_with_token(Some(TEAM_B)).await;
    team_b.get_job("shared/b-1").await.expect("second prefix");
    let status = team_b
        .get_job("shared/c-1")
        .await
        .expect_err("not its prefix");
    assert_eq!(status.code(), Code::PermissionDenied);

    // ListJobs: only the caller's jobs, in every page.
    assert_eq!(list_ids(&mut team_a, "", 1).await, ["team-a/1", "team-a/2"]);
    assert_eq!(list_ids(&mut team_a, "", 0).await, ["team-a/1", "team-a/2"]);
    assert!(list_ids(&mut team_a, "team-b/", 10).await.is_empty());
    assert_eq!(
        list_ids(&mut team_b, "", 1).await,
        ["shared/b-1", "team-b/1"]
    );
    assert_eq!(list_ids(&mut admin, "", 2).await.len(), 6);

    // A stream is checked message by message: the second, outside the prefixes, ends it.
    let mut responses = team_a
        .raw()
        .harmonize_stream(tokio_stream::iter(vec![
            norms_request("team-a/1", 0, 0, &[0.5], None),
            norms_request("team-b/1", 1, 0, &[0.5], None),
            norms_request("team-a/1", 2, 0, &[0.5], None),
        ]))
        .await
        .expect("stream opens")
        .into_inner();
    responses.next().await.expect("first").expect("own job");
    let end = responses
        .next()
        .await
        .expect("a status")
        .expect_err("denied");
    assert_eq!(end.code(), Code::PermissionDenied);
    assert!(responses.next().await.is_none());
    assert_eq!(
        admin.get_job("team-b/1").await.expect("get"),
        before,
        "team-b/1 changed"
    );
    let team_a_1 = admin.get_job("team-a/1").await.expect("get");
    assert_eq!(
        team_a_1.state.expect("state").steps,
        1,
        "only the first message applied"
    );

    server.stop().await;
}

#[tokio::test]
async fn health_stays_open_and_reflection_needs_a_token() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let dir = TempDir::new("health");
    let path = dir.write("tokens.toml", &standard_tokens());
    let server = TestServer::start_with(|config| config.tokens_file = Some(path)).await;

    let mut health = HealthClient::new(server.channel().await);
    health
        .check(HealthCheckRequest {
            service: "ghm.v1.Harmonizer".to_owned(),
        })
        .await
        .expect("health without a token");

    let list = || {
        tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }])
    };
    let mut anonymous = ServerReflectionClient::new(server.channel().await);
    let status = anonymous
        .server_reflection_info(list())
        .await
        .expect_err("reflection without a token");
    assert_eq!(status.code(), Code::Unauthenticated);

    let mut known = ServerReflectionClient::with_interceptor(
        server.channel().await,
        Credentials::bearer(TEAM_A).expect("token"),
    );
    let answers: Vec<_> = known
        .server_reflection_info(list())
        .await
        .expect("reflection with a token")
        .into_inner()
        .collect::<Result<_, _>>()
        .await
        .expect("answers");
    assert_eq!(answers.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_bad_tokens_file_stops_the_start_instead_of_running_open() {
    let dir = TempDir::new("badfile");
    for (name, text) in [
        ("empty.toml", String::new()),
        ("short.toml", tokens_toml(&[("a", "short", &["a/"])])),
    ] {
        let path = dir.write(name, &text);
        let error = TestServer::try_start_with(|config| config.tokens_file = Some(path))
            .await
            .err()
            .expect("refused");
        assert!(error.to_string().contains(name), "{error}");
    }
    let missing = dir.path().join("missing.toml");
    assert!(
        TestServer::try_start_with(|config| config.tokens_file = Some(missing))
            .await
            .is_err()
    );
}

// ---------------------------------------------------------------------------------------------
// The real binary: start-up log, SIGHUP reload, no token in the log.

async fn connect(uri: &str, token: &str) -> Client {
    let options = ClientOptions {
        token: Some(token.to_owned()),
        tls: None,
    };
    Client::connect_with(uri.to_owned(), &options)
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_warns_in_its_start_up_log() {
    let daemon = Launch::in_memory().rust_log("debug").start();
    let uri = daemon.uri();
    let log = daemon.wait_for_log("ghmd serving gRPC").await;
    assert!(
        log.contains("OPEN"),
        "no warning about running open:\n{log}"
    );
    assert!(
        log.contains("plaintext"),
        "no warning about plaintext:\n{log}"
    );
    let mut client = Client::connect(uri).await.expect("connect");
    client
        .create_job("open/job", ghm_c(10, 0.75))
        .await
        .expect("open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tokens_file_and_a_bad_file_keeps_the_old_tokens() {
    let dir = TempDir::new("sighup");
    let path = dir.write(
        "tokens.toml",
        &tokens_toml(&[("team-a", TEAM_A, &["team-a/"])]),
    );
    let daemon = Launch::in_memory()
        .args(&["--tokens-file", path.to_str().expect("utf-8 path")])
        .rust_log("debug")
        .start();
    let uri = daemon.uri();
    let log = daemon.wait_for_log("bearer tokens required").await;
    assert!(!log.contains("OPEN"), "{log}");

    let mut a = connect(&uri, TEAM_A).await;
    a.create_job("team-a/1", ghm_c(10, 0.75))
        .await
        .expect("team-a before the reload");
    let mut b = connect(&uri, TEAM_B).await;
    let status = b
        .get_job("team-b/1")
        .await
        .expect_err("team-b is not known yet");
    assert_eq!(status.code(), Code::Unauthenticated);

    // Replace team-a by team-b and reload.
    std::fs::write(&path, tokens_toml(&[("team-b", TEAM_B, &["team-b/"])])).expect("write");
    daemon.signal("HUP");
    daemon.wait_for_log("tokens file reloaded").await;
    b.create_job("team-b/1", ghm_c(10, 0.75))
        .await
        .expect("team-b after the reload");
    let status = a.get_job("team-a/1").await.expect_err("team-a was removed");
    assert_eq!(status.code(), Code::Unauthenticated);

    // A broken file: the server says why and keeps team-b.
    std::fs::write(&path, "[[token]]\nname = \"x\"\ntoken = \"x\"\n").expect("write");
    daemon.signal("HUP");
    let log = daemon.wait_for_log("stay in force").await;
    assert!(log.contains("tokens.toml"), "{log}");
    b.get_job("team-b/1").await.expect("team-b still in force");
    let status = a.get_job("team-a/1").await.expect_err("team-a still out");
    assert_eq!(status.code(), Code::Unauthenticated);

    // The server is still up after the signals, and no token was ever logged.
    let mut admin_less = connect(&uri, "a-token-nobody-has-0000000000").await;
    let status = admin_less.get_job("team-b/1").await.expect_err("unknown");
    assert_eq!(status.code(), Code::Unauthenticated);
    let log = daemon.log();
    for secret in [TEAM_A, TEAM_B, "a-token-nobody-has-0000000000"] {
        assert!(!log.contains(secret), "a token is in the log:\n{log}");
    }
    assert!(
        log.contains("not authenticated"),
        "refusals are not logged at debug:\n{log}"
    );
}

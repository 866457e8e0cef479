//! The real binary's graceful stop: SIGTERM lets what is in flight finish, then ghmd exits 0.

use std::time::Duration;

use bytes::Bytes;
use ghmd::client::{Client, f32s_to_bytes, norms_request};
use ghmd::proto::harmonize_request::Input;
use tokio_stream::StreamExt;

use crate::support::binary::Launch;
use crate::support::ghm_c;
use crate::support::request::request;
use crate::support::weights::{big_norms, spot_check_big};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_request_finish_and_exits_zero() {
    const LEN: usize = 16_000_000;
    let daemon = Launch::in_memory().start();
    let mut client = Client::connect(daemon.uri()).await.expect("connect");
    client
        .create_job("shutdown", ghm_c(30, 0.0))
        .await
        .expect("create");

    let norms = big_norms(LEN);
    let request = request(
        "shutdown",
        Some(Input::GradientNorms(f32s_to_bytes(&norms))),
        Bytes::new(),
    );
    // An open stream that has had one answer: certainly in flight on the server.
    let (stream_requests, inbound) = tokio::sync::mpsc::channel(1);
    let mut stream = client
        .raw()
        .harmonize_stream(tokio_stream::wrappers::ReceiverStream::new(inbound))
        .await
        .expect("stream opens")
        .into_inner();
    stream_requests
        .send(norms_request("shutdown", 0, 0, &[0.5], None))
        .await
        .expect("send");
    stream
        .next()
        .await
        .expect("a response")
        .expect("the first stream request");

    // The big request shares the connection with a small one sent after it: once the small one
    // is answered, the server has opened the big one's stream (HTTP/2 handles a connection's
    // frames in order), and the big one is still uploading or being weighed.
    let mut big_client = client.clone();
    let big = tokio::spawn(async move { big_client.harmonize(request).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    client.get_job("shutdown").await.expect("a small request");
    assert!(
        !big.is_finished(),
        "the big request ended before SIGTERM; the test proves nothing"
    );
    daemon.signal("TERM");

    let response = big
        .await
        .expect("task")
        .expect("the in-flight request completes after SIGTERM");
    spot_check_big(&norms, &response, 30);

    // The open stream, idle between messages, ends at once with UNAVAILABLE (issue 10: a
    // rolling restart must not wait for it), so that its client moves to another replica.
    let ended = stream
        .next()
        .await
        .expect("a final status")
        .expect_err("the idle stream ends on SIGTERM");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    drop(stream_requests);

    let (status, log) = daemon.exited().await;
    assert!(
        status.success(),
        "ghmd exited with {status}; its log:\n{log}"
    );
    assert!(
        log.contains("shutting down"),
        "no shutdown in the log:\n{log}"
    );
    assert!(
        !log.contains("outlived the shutdown grace"),
        "ghmd waited out its grace period instead of stopping when the work was done:\n{log}"
    );
}

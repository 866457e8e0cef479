//! Broken gRPC framing over a raw HTTP/2 connection: a status, never a hang, and no change.

use bytes::{Bytes, BytesMut};
use tonic::Code;

use super::good_harmonize;
use crate::support::TestServer;
use crate::support::fixture::{JOBS, snapshot, still_serving, three_jobs};
use crate::support::wire::{frame, raw_h2};

#[tokio::test]
async fn broken_grpc_framing_gets_a_status_and_changes_nothing() {
    let server = TestServer::start_with(|config| config.max_recv_message_bytes = 1 << 20).await;
    let mut client = server.client().await;
    three_jobs(&mut client).await;
    let before = snapshot(&mut client).await;
    let good = good_harmonize(JOBS[0]);
    const GRPC: &str = "application/grpc";
    const HARMONIZE: &str = "/ghm.v1.Harmonizer/Harmonize";
    const STREAM: &str = "/ghm.v1.Harmonizer/HarmonizeStream";

    // (what, path, content type, body, expected grpc-status)
    let cases: Vec<(&str, &str, &str, BytesMut, Code)> = vec![
        (
            "a frame shorter than it declares",
            HARMONIZE,
            GRPC,
            frame(false, 100, &good),
            Code::Internal,
        ),
        (
            "half a frame header",
            HARMONIZE,
            GRPC,
            BytesMut::from(&[0u8, 0, 0][..]),
            Code::Internal,
        ),
        (
            "no message at all",
            HARMONIZE,
            GRPC,
            BytesMut::new(),
            Code::Internal,
        ),
        (
            "a compressed flag without grpc-encoding",
            HARMONIZE,
            GRPC,
            frame(true, good.len() as u32, &good),
            Code::Internal,
        ),
        (
            "a flag byte of 7",
            HARMONIZE,
            GRPC,
            frame(false, good.len() as u32, &good)
                .iter()
                .enumerate()
                .map(|(i, b)| if i == 0 { 7 } else { *b })
                .collect(),
            Code::Internal,
        ),
        (
            "a frame declaring 4 GiB",
            HARMONIZE,
            GRPC,
            frame(false, u32::MAX, &good),
            Code::OutOfRange,
        ),
        (
            "a frame declaring one byte past the limit",
            HARMONIZE,
            GRPC,
            frame(false, (1 << 20) + 1, &good),
            Code::OutOfRange,
        ),
        (
            "a stream cut inside its second frame",
            STREAM,
            GRPC,
            [
                frame(false, good.len() as u32, &good),
                frame(false, 50, &good[..3]),
            ]
            .concat()
            .as_slice()
            .into(),
            Code::Internal,
        ),
        (
            "an unknown method",
            "/ghm.v1.Harmonizer/Explode",
            GRPC,
            frame(false, good.len() as u32, &good),
            Code::Unimplemented,
        ),
        (
            "an unknown service",
            "/ghm.v2.Nope/Harmonize",
            GRPC,
            frame(false, good.len() as u32, &good),
            Code::Unimplemented,
        ),
    ];
    for (what, path, content_type, body, code) in cases {
        let answer = raw_h2(server.addr, path, content_type, body.freeze()).await;
        assert_eq!(answer.http_status, 200, "{what}");
        assert_eq!(
            answer.grpc_status,
            Some(code as i32),
            "{what}: grpc-message {:?}",
            answer.grpc_message
        );
        if what.starts_with("a stream cut") {
            assert_eq!(
                answer.messages, 1,
                "{what}: the good first message is answered"
            );
        } else {
            assert_eq!(answer.messages, 0, "{what}: no response message");
        }
    }

    // Two messages on a unary call: tonic serves the first and ignores the rest, so the job
    // takes exactly one step.
    let two = [
        frame(false, good.len() as u32, &good),
        frame(false, good.len() as u32, &good),
    ]
    .concat();
    let answer = raw_h2(server.addr, HARMONIZE, GRPC, two.into()).await;
    assert_eq!((answer.grpc_status, answer.messages), (Some(0), 1));

    // Not gRPC at all: HTTP 415, no grpc-status required of the server.
    let answer = raw_h2(
        server.addr,
        HARMONIZE,
        "application/json",
        Bytes::from_static(b"{}"),
    )
    .await;
    assert!(
        answer.http_status == 415 || answer.grpc_status.is_some_and(|s| s != 0),
        "JSON was accepted: {}",
        answer.http_status
    );

    // The cut stream and the two-message call applied one message each; nothing else changed.
    let after = snapshot(&mut client).await;
    assert_eq!(after[1..], before[1..]);
    assert_eq!(after[0].state.as_ref().map(|s| s.steps), Some(3));
    still_serving(&server).await;
    server.stop().await;
}

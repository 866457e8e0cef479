//! Wrong wire types and broken protobuf, in a unary call or after good messages on a stream:
//! INVALID_ARGUMENT naming the field.

use bytes::{BufMut, Bytes, BytesMut};
use ghmd::client::{bytes_to_f32s, norms_request};
use http::uri::PathAndQuery;
use tonic::Code;

use super::good_harmonize;
use crate::support::fixture::{JOBS, snapshot, still_serving, three_jobs};
use crate::support::wire::{
    FIXED32, FIXED64, LEN, RawCodec, START_GROUP, VARINT, encode, key, len_field, raw_unary, varint,
};
use crate::support::{TestServer, assert_status};

#[tokio::test]
async fn undecodable_protobuf_is_invalid_argument_naming_the_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    three_jobs(&mut client).await;
    let before = snapshot(&mut client).await;

    const HARMONIZE: &str = "/ghm.v1.Harmonizer/Harmonize";
    let mut cases: Vec<(&str, &'static str, BytesMut, &[&str])> = Vec::new();

    let mut b = BytesMut::new();
    key(&mut b, 1, VARINT);
    varint(&mut b, 7);
    cases.push(("job_id as a varint", HARMONIZE, b, &["job_id", "wire type"]));

    let mut b = BytesMut::new();
    len_field(&mut b, 1, &[b'h', 0xff, 0xfe]);
    cases.push(("job_id not UTF-8", HARMONIZE, b, &["job_id", "UTF-8"]));

    let mut b = good_harmonize(JOBS[0]);
    len_field(&mut b, 2, b"\x01");
    cases.push(("step as bytes", HARMONIZE, b, &["step", "wire type"]));

    let mut b = good_harmonize(JOBS[0]);
    key(&mut b, 3, FIXED64);
    b.put_u64_le(1);
    cases.push(("rank as fixed64", HARMONIZE, b, &["rank", "wire type"]));

    let mut b = BytesMut::new();
    len_field(&mut b, 1, JOBS[0].as_bytes());
    key(&mut b, 4, FIXED32);
    b.put_f32_le(0.5);
    cases.push((
        "gradient_norms as fixed32 (the oneof input)",
        HARMONIZE,
        b,
        &["input", "wire type"],
    ));

    let mut b = BytesMut::new();
    len_field(&mut b, 1, JOBS[2].as_bytes());
    key(&mut b, 6, VARINT);
    varint(&mut b, 3);
    cases.push((
        "histogram as a varint (the oneof input)",
        HARMONIZE,
        b,
        &["input", "wire type"],
    ));

    let mut histogram = BytesMut::new();
    key(&mut histogram, 1, LEN);
    varint(&mut histogram, 3);
    histogram.put_slice(&[0x81, 0x82, 0x83]); // a packed varint that never ends
    let mut b = BytesMut::new();
    len_field(&mut b, 1, JOBS[2].as_bytes());
    len_field(&mut b, 6, &histogram);
    cases.push(("histogram.counts truncated", HARMONIZE, b, &["counts"]));

    let mut histogram = BytesMut::new();
    key(&mut histogram, 2, VARINT);
    varint(&mut histogram, 4);
    let mut b = BytesMut::new();
    len_field(&mut b, 1, JOBS[2].as_bytes());
    len_field(&mut b, 6, &histogram);
    cases.push((
        "histogram.tot as a varint",
        HARMONIZE,
        b,
        &["tot", "wire type"],
    ));

    let mut b = BytesMut::new();
    key(&mut b, 1, LEN);
    varint(&mut b, 1000);
    b.put_slice(JOBS[0].as_bytes());
    cases.push(("a length past the end", HARMONIZE, b, &["buffer underflow"]));

    let mut b = good_harmonize(JOBS[0]);
    key(&mut b, 2, VARINT);
    b.put_slice(&[0xff; 11]);
    cases.push(("an 11-byte varint", HARMONIZE, b, &["varint"]));

    let mut b = good_harmonize(JOBS[0]);
    b.put_u8(0x0f); // field 1, wire type 7
    cases.push(("wire type 7", HARMONIZE, b, &["wire type"]));

    let mut b = good_harmonize(JOBS[0]);
    b.put_u8(0x00); // field number 0
    cases.push(("field number 0", HARMONIZE, b, &[]));

    let mut b = good_harmonize(JOBS[0]);
    for _ in 0..200 {
        key(&mut b, 99, START_GROUP);
    }
    cases.push(("groups nested 200 deep", HARMONIZE, b, &["recursion limit"]));

    let mut b = BytesMut::new();
    len_field(&mut b, 1, b"h/new");
    key(&mut b, 2, VARINT);
    varint(&mut b, 1);
    cases.push((
        "CreateJob spec as a varint",
        "/ghm.v1.Harmonizer/CreateJob",
        b,
        &["spec", "wire type"],
    ));

    let mut spec = BytesMut::new();
    key(&mut spec, 3, VARINT);
    varint(&mut spec, 1);
    let mut b = BytesMut::new();
    len_field(&mut b, 1, b"h/new");
    len_field(&mut b, 2, &spec);
    cases.push((
        "spec.momentum as a varint",
        "/ghm.v1.Harmonizer/CreateJob",
        b,
        &["momentum", "wire type"],
    ));

    let mut b = BytesMut::new();
    key(&mut b, 1, FIXED32);
    b.put_u32_le(0);
    cases.push((
        "GetJob job_id as fixed32",
        "/ghm.v1.Harmonizer/GetJob",
        b,
        &["job_id"],
    ));
    let b = BytesMut::from(&[0x0a, 0x05, b'h'][..]);
    cases.push((
        "DeleteJob truncated",
        "/ghm.v1.Harmonizer/DeleteJob",
        b,
        &[],
    ));

    let mut state = BytesMut::new();
    key(&mut state, 1, VARINT);
    varint(&mut state, 5);
    key(&mut state, 1, LEN);
    varint(&mut state, 6); // packed floats of 6 bytes
    state.put_slice(&[0; 6]);
    let mut b = BytesMut::new();
    len_field(&mut b, 1, JOBS[0].as_bytes());
    len_field(&mut b, 2, &state);
    cases.push((
        "RestoreJob acc_sum of 6 bytes",
        "/ghm.v1.Harmonizer/RestoreJob",
        b,
        &["acc_sum"],
    ));

    let mut b = BytesMut::new();
    len_field(&mut b, 1, JOBS[1].as_bytes());
    key(&mut b, 5, LEN);
    varint(&mut b, 1);
    b.put_u8(1);
    cases.push((
        "UpdateJob allow_partial_steps as bytes",
        "/ghm.v1.Harmonizer/UpdateJob",
        b,
        &["allow_partial_steps"],
    ));

    let mut b = BytesMut::new();
    key(&mut b, 2, LEN);
    varint(&mut b, 1);
    b.put_u8(1);
    cases.push((
        "ListJobs page_size as bytes",
        "/ghm.v1.Harmonizer/ListJobs",
        b,
        &["page_size"],
    ));

    for (what, method, body, needles) in cases {
        let result = raw_unary(server.channel().await, method, body.freeze()).await;
        assert_status(result, Code::InvalidArgument, needles, what);
    }

    // Unknown fields are skipped, as protobuf's forward compatibility wants.
    let mut b = good_harmonize(JOBS[0]);
    key(&mut b, 99, VARINT);
    varint(&mut b, 12345);
    len_field(&mut b, 100, b"from a newer client");
    let reply = raw_unary(server.channel().await, HARMONIZE, b.freeze())
        .await
        .expect("unknown fields");
    let reply: ghmd::proto::HarmonizeResponse = prost::Message::decode(reply).expect("decode");
    assert_eq!(bytes_to_f32s(&reply.weights).len(), 1);
    let after = snapshot(&mut client).await;
    assert_eq!(
        after[1..],
        before[1..],
        "a job other than the one weighed changed"
    );
    assert_eq!(after[0].state.as_ref().map(|s| s.steps), Some(2));
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn a_stream_that_sends_garbage_after_good_messages_keeps_the_good_ones_only() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    three_jobs(&mut client).await;
    let before = snapshot(&mut client).await;

    let good = |step: u64| encode(&norms_request(JOBS[0], step, 0, &[0.25, 0.75], None)).freeze();
    let garbages: Vec<(&str, Bytes)> = vec![
        (
            "random bytes",
            Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff]),
        ),
        ("a truncated varint", Bytes::from_static(&[0x10, 0xff])),
        ("a job id of invalid UTF-8", {
            let mut b = BytesMut::new();
            len_field(&mut b, 1, &[0xc3, 0x28]);
            b.freeze()
        }),
    ];
    let mut steps = 1;
    for (what, garbage) in garbages {
        let messages = vec![good(10), good(11), garbage, good(12)];
        let mut grpc = tonic::client::Grpc::new(server.channel().await);
        grpc.ready().await.expect("ready");
        let mut responses = grpc
            .streaming(
                tonic::Request::new(tokio_stream::iter(messages)),
                PathAndQuery::from_static("/ghm.v1.Harmonizer/HarmonizeStream"),
                RawCodec,
            )
            .await
            .expect("stream opens")
            .into_inner();
        for step in [10, 11] {
            let reply = responses
                .message()
                .await
                .expect("a response")
                .expect("a message");
            let reply: ghmd::proto::HarmonizeResponse =
                prost::Message::decode(reply).expect("decode");
            assert_eq!(reply.step, step, "{what}");
        }
        assert_status(
            responses.message().await,
            Code::InvalidArgument,
            &["protobuf"],
            what,
        );
        steps += 2;
        let after = snapshot(&mut client).await;
        assert_eq!(after[1..], before[1..], "{what}");
        assert_eq!(
            after[0].state.as_ref().map(|s| s.steps),
            Some(steps),
            "{what}: the two good messages applied once each, nothing after the garbage"
        );
    }
    still_serving(&server).await;
    server.stop().await;
}

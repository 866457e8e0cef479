//! The wire below the generated client, for what a well-behaved client cannot send: protobuf
//! written by hand, any bytes as a gRPC message, and gRPC frames over a raw HTTP/2 connection.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::uri::PathAndQuery;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

// ---------------------------------------------------------------------------------------------
// A codec that sends and receives bytes as they are, so that a test can put any bytes in a
// gRPC message.

#[derive(Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

/// One unary call of `method` whose request message is `body`, whatever it holds.
pub async fn raw_unary(
    channel: tonic::transport::Channel,
    method: &'static str,
    body: Bytes,
) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = PathAndQuery::from_static(method);
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Protobuf by hand.

pub const VARINT: u8 = 0;
pub const FIXED64: u8 = 1;
pub const LEN: u8 = 2;
pub const START_GROUP: u8 = 3;
pub const FIXED32: u8 = 5;

pub fn varint(buf: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

pub fn key(buf: &mut BytesMut, field: u32, wire_type: u8) {
    varint(buf, (u64::from(field) << 3) | u64::from(wire_type));
}

pub fn len_field(buf: &mut BytesMut, field: u32, bytes: &[u8]) {
    key(buf, field, LEN);
    varint(buf, bytes.len() as u64);
    buf.put_slice(bytes);
}

pub fn encode<M: prost::Message>(message: &M) -> BytesMut {
    BytesMut::from(message.encode_to_vec().as_slice())
}

// ---------------------------------------------------------------------------------------------
// gRPC over a raw HTTP/2 connection.

/// A gRPC message frame: the compressed flag, the length it declares, and the bytes that follow
/// (which need not be as many).
pub fn frame(compressed: bool, declared_len: u32, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_u8(u8::from(compressed));
    b.put_u32(declared_len);
    b.put_slice(payload);
    b
}

/// An HTTP/2 connection to `addr` with the given initial stream window (h2's default if
/// none), and the task that drives it; aborting the task is the client process dying.
pub async fn h2_connect(
    addr: SocketAddr,
    initial_window_size: Option<u32>,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut builder = h2::client::Builder::new();
    if let Some(window) = initial_window_size {
        builder.initial_window_size(window);
    }
    let (send, connection) = builder.handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (send, driver)
}

/// The headers of a gRPC call of `path` on `addr`.
pub fn grpc_request(addr: SocketAddr, path: &str, content_type: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(())
        .expect("request")
}

/// What came back for a raw HTTP/2 request.
pub struct Answer {
    pub http_status: u16,
    pub grpc_status: Option<i32>,
    pub grpc_message: String,
    /// How many gRPC message frames the response body held.
    pub messages: usize,
}

/// Sends `body` as the request body of `path`, with `content_type`, and reads the answer.
pub async fn raw_h2(addr: SocketAddr, path: &str, content_type: &str, body: Bytes) -> Answer {
    let (send, _driver) = h2_connect(addr, None).await;
    let mut send = send.ready().await.expect("ready");
    let request = grpc_request(addr, path, content_type);
    let (response, mut request_body) = send.send_request(request, false).expect("send");
    request_body.send_data(body, true).expect("body");
    tokio::time::timeout(Duration::from_secs(20), async {
        let response = response.await.expect("response headers");
        let http_status = response.status().as_u16();
        let grpc = |headers: &http::HeaderMap| {
            (
                headers
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse().ok()),
                headers
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
            )
        };
        let (mut grpc_status, mut grpc_message) = grpc(response.headers());
        let mut body = response.into_body();
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("body chunk");
            let _ = body.flow_control().release_capacity(chunk.len());
            data.put(chunk);
        }
        if let Ok(Some(trailers)) = body.trailers().await {
            (grpc_status, grpc_message) = grpc(&trailers);
        }
        let mut messages = 0;
        while data.len() >= 5 {
            let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            data.advance(5 + len.min(data.len() - 5));
            messages += 1;
        }
        Answer {
            http_status,
            grpc_status,
            grpc_message,
            messages,
        }
    })
    .await
    .expect("the server answers a broken request, it does not hang")
}

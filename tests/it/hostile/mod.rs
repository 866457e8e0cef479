//! What arrives on the port when the caller is broken or hostile, beyond the well-formed bad
//! values of `validation`: raw protobuf with wrong wire types, broken gRPC framing over a raw
//! HTTP/2 client, huge ids, odd floats, hostile UpdateJob/RestoreJob values, garbage after good
//! messages on a stream, and a client that opens many streams and never reads. Each gets its
//! documented status, the server keeps serving, and no job changes (GetJob before and after).

mod floods;
mod framing;
mod protobuf;
mod values;

use bytes::BytesMut;
use ghmd::client::norms_request;

use crate::support::wire::encode;

/// A well-formed request for `job_id` with one norm, to which a case appends its poison.
pub fn good_harmonize(job_id: &str) -> BytesMut {
    encode(&norms_request(job_id, 0, 0, &[0.5], None))
}

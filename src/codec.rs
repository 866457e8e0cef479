//! The protobuf codec of the Harmonizer service (build.rs points the generated code here).
//!
//! It is tonic-prost's codec except for one thing: a message that does not decode (wrong wire
//! types, truncated varints, invalid UTF-8 in a string, ...) is INVALID_ARGUMENT, with prost's
//! message naming the field, rather than INTERNAL. The bytes came from the caller; INTERNAL
//! would page whoever watches the server's own failures for a client's bug.
//!
//! Two more, for speed, with the same bytes meaning the same message:
//! - a `HarmonizeResponse` is encoded by prost without its three large fields, which follow as
//!   length-delimited fields written with one copy each (prost writes a packed float one
//!   `put_f32_le` at a time); protobuf parsers accept fields in any order;
//! - a message is decoded from a `Bytes` of the whole message (taken from tonic's buffer without
//!   a copy), whose `advance` is a pointer bump rather than `BytesMut`'s bookkeeping, which
//!   prost pays for every varint of a histogram's counts.

use std::marker::PhantomData;

use std::any::Any;

use bytes::{Buf, BufMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::proto::HarmonizeResponse;

#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProtoEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProtoEncoder { _type: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder { _type: PhantomData }
    }
}

#[derive(Debug, Clone)]
pub struct ProtoEncoder<T> {
    _type: PhantomData<T>,
}

impl<T: prost::Message + 'static> Encoder for ProtoEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, mut item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // A type test the compiler resolves for each message type: no cost for the others.
        if let Some(response) = (&mut item as &mut dyn Any).downcast_mut::<HarmonizeResponse>() {
            let parts = ResponseParts::new(std::mem::take(response));
            buf.reserve(parts.encoded_len());
            parts.encode(buf);
            return Ok(());
        }
        let len = item.encoded_len();
        buf.reserve(len);
        item.encode_raw(buf);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// `HarmonizeResponse`'s large fields, by their numbers in the contract.
const WEIGHTS_FIELD: u32 = 3;
const BIN_WEIGHTS_FIELD: u32 = 4;
const ACC_SUM_FIELD: u32 = 7;

/// A response split for encoding: every field but the three large ones stays in `rest` and goes
/// through prost, so that a field added to the contract is encoded too.
struct ResponseParts {
    rest: HarmonizeResponse,
    weights: bytes::Bytes,
    bin_weights: Vec<f32>,
    acc_sum: Vec<f32>,
}

impl ResponseParts {
    fn new(mut response: HarmonizeResponse) -> Self {
        Self {
            weights: std::mem::take(&mut response.weights),
            bin_weights: std::mem::take(&mut response.bin_weights),
            acc_sum: std::mem::take(&mut response.acc_sum),
            rest: response,
        }
    }

    fn encoded_len(&self) -> usize {
        self.rest.encoded_len()
            + delimited_len(WEIGHTS_FIELD, self.weights.len())
            + delimited_len(
                BIN_WEIGHTS_FIELD,
                std::mem::size_of_val(&self.bin_weights[..]),
            )
            + delimited_len(ACC_SUM_FIELD, std::mem::size_of_val(&self.acc_sum[..]))
    }

    fn encode(&self, buf: &mut impl BufMut) {
        self.rest.encode_raw(buf);
        put_delimited(buf, WEIGHTS_FIELD, &self.weights);
        put_packed_f32(buf, BIN_WEIGHTS_FIELD, &self.bin_weights);
        put_packed_f32(buf, ACC_SUM_FIELD, &self.acc_sum);
    }
}

/// The encoded size of a length-delimited field of `len` bytes; an empty one is not written,
/// as proto3 leaves out an empty `bytes` or packed field.
fn delimited_len(field: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        key_len(field) + encoded_len_varint(len as u64) + len
    }
}

fn put_delimited(buf: &mut impl BufMut, field: u32, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    encode_key(field, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.put_slice(bytes);
}

fn put_packed_f32(buf: &mut impl BufMut, field: u32, values: &[f32]) {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: an f32 is 4 initialised bytes without padding, u8 has alignment 1, and the
        // slice covers exactly the floats' memory; on a little-endian machine those bytes are
        // the contract's little-endian floats.
        let bytes = unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        };
        put_delimited(buf, field, bytes);
    }
    #[cfg(not(target_endian = "little"))]
    {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        put_delimited(buf, field, &bytes);
    }
}

#[derive(Debug, Clone)]
pub struct ProtoDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: prost::Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let message = buf.copy_to_bytes(buf.remaining());
        U::decode(message).map(Some).map_err(|error| {
            Status::invalid_argument(format!("the message is not valid protobuf: {error}"))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custom_encoding(response: &HarmonizeResponse) -> Vec<u8> {
        let parts = ResponseParts::new(response.clone());
        let mut out = Vec::new();
        parts.encode(&mut out);
        assert_eq!(out.len(), parts.encoded_len());
        out
    }

    fn floats(count: usize, scale: f32) -> Vec<f32> {
        (0..count).map(|i| i as f32 * scale - 1.5).collect()
    }

    #[test]
    #[allow(
        clippy::needless_update,
        reason = "a field added to the contract leaves this test compiling, and encoded"
    )]
    fn a_response_decodes_with_plain_prost_as_the_message_it_was() {
        let weights: Vec<u8> = floats(1000, 0.25)
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let responses = [
            HarmonizeResponse::default(),
            HarmonizeResponse {
                job_id: "team/a-job".to_owned(),
                step: 7,
                weights: weights.into(),
                bin_weights: floats(30, 0.5),
                tot: 12345.5,
                nonempty_bins: 17,
                acc_sum: floats(30, 3.0),
                missing_ranks: vec![1, 5],
                ..Default::default()
            },
            // A histogram's answer: no weights, and momentum 0: no acc_sum.
            HarmonizeResponse {
                job_id: "j".to_owned(),
                bin_weights: vec![f32::MIN_POSITIVE, 0.0, -0.0, f32::MAX],
                tot: 1.0,
                ..Default::default()
            },
        ];
        for response in responses {
            let custom = custom_encoding(&response);
            let prost = response.encode_to_vec();
            assert_eq!(custom.len(), prost.len());
            let decoded = HarmonizeResponse::decode(&custom[..]).expect("decodes");
            assert_eq!(
                decoded,
                HarmonizeResponse::decode(&prost[..]).expect("decodes")
            );
            assert_eq!(decoded, response);
            // Bit for bit, -0.0 and all.
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&decoded.bin_weights), bits(&response.bin_weights));
            // The same bytes once the large fields are moved where prost puts them.
            let mut reordered = decoded.clone();
            reordered.weights = Default::default();
            reordered.bin_weights.clear();
            reordered.acc_sum.clear();
            assert!(custom.starts_with(&reordered.encode_to_vec()));
        }
    }
}

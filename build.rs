//! Compiles the contract with protox, so that building ghmd needs no system `protoc`, and keeps
//! the encoded descriptor set for the reflection service.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/ghm/v1/ghm.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("ghm_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .bytes(".ghm.v1.HarmonizeRequest")
        .bytes(".ghm.v1.HarmonizeResponse")
        .bytes(".ghm.v1.Eqlv2Contribution")
        // A malformed message is the caller's INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::ProtoCodec")
        .compile_fds(descriptors)?;
    Ok(())
}

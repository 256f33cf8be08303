//! Generates the prost types of `keel_types::proto` from `proto/keel/v1/keel.proto`, the
//! schema clients and peers read: compiled by protox (a Rust protobuf compiler, so no `protoc`
//! is needed), turned into Rust by prost-build.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let file = root.join("keel/v1/keel.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let descriptors = protox::compile([&file], [&root])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}

//! Compiles the public contract in `proto/` into Rust and writes the file
//! descriptor set that gRPC server reflection serves. `protoc` comes from
//! `protoc-bin-vendored`, so a fresh machine needs no system protobuf compiler.

use std::{
    env,
    path::{Path, PathBuf},
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        "proto/msys/v1/user.proto",
        "proto/msys/v1/order.proto",
        "proto/msys/v1/monitor.proto",
        "proto/msys/v1/events.proto",
        "proto/msys/v1/metrics.proto",
        "proto/msys/v1/load.proto",
    ];
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().file_descriptor_set_path(out_dir.join("msys_descriptor.bin")).compile_with_config(
        config,
        &protos,
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    // The dashboard bundle that src/frontend/assets.rs embeds: a new or rebuilt bundle recompiles.
    // Cargo counts a missing path as changed on every build, so without the bundle (a plain
    // `cargo build` before scripts/build-frontend.sh) watch its parent instead, which notices
    // the bundle appearing and is otherwise still.
    if Path::new("frontend/dist").exists() {
        println!("cargo:rerun-if-changed=frontend/dist");
    } else {
        println!("cargo:rerun-if-changed=frontend");
    }
    Ok(())
}

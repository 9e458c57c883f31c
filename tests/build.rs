//! Generates the CRI client (`runtime.v1`, tests/src/cri.rs) from the vendored
//! `proto/runtime/v1/api.proto`. protox parses the proto in Rust, so no `protoc` is needed; only
//! clients are generated (the tests play the kubelet, never the runtime).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/runtime/v1/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}

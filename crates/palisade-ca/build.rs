//! Compiles `proto/istio/v1/auth/ca.proto` with protox (pure Rust; no protoc needed) and
//! generates the tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/istio/v1/auth/ca.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

//! Compiles `cluster/v1/cluster.proto` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=cluster");
    let files = protox::compile(["cluster/v1/cluster.proto"], ["."])?;
    tonic_prost_build::configure()
        // Gradient pieces are large: decode them without copying.
        .bytes(".cluster.v1.Piece.data")
        .compile_fds(files)?;
    Ok(())
}

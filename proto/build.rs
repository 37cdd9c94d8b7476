//! Compiles the `.proto` contract with `protox` (pure Rust), so a fresh machine needs no
//! system `protoc`, and writes the descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "coinflow/fulfillment/v1/event.proto",
        "coinflow/fulfillment/v1/ingest.proto",
        "coinflow/fulfillment/v1/fulfillment.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let mut compiler = protox::Compiler::new(["."])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(files)?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("coinflow_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .bytes(".coinflow.fulfillment.v1")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

//! Compiles the CSI, kubelet plugin-registration and agent-to-agent
//! transfer protocols with the pure-Rust `protox` compiler, so that a fresh
//! machine needs no `protoc`, and lists the CSI methods for the metrics
//! (`csi_methods.rs`).

use std::fmt::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/csi.proto",
        "proto/pluginregistration.proto",
        "proto/transfer.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    // The metrics label an RPC by its method only when the method is one of
    // these: a path a client made up must not become a series of its own.
    let mut methods = String::from(
        "/// Every method of the CSI services, as named in csi.proto.\npub const METHODS: &[&str] = &[\n",
    );
    for file in fds.file.iter().filter(|f| f.package() == "csi.v1") {
        for method in file.service.iter().flat_map(|s| &s.method) {
            writeln!(methods, "    {:?},", method.name())?;
        }
    }
    methods.push_str("];\n");
    std::fs::write(
        std::path::Path::new(&std::env::var("OUT_DIR")?).join("csi_methods.rs"),
        methods,
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}

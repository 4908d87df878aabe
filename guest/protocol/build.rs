//! Generates the message types and the async ttrpc client/server from `proto/agent.proto`.

use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("agent");
    if let Err(e) = std::fs::create_dir_all(&out) {
        panic!("create {}: {e}", out.display());
    }
    println!("cargo:rerun-if-changed=proto/agent.proto");
    if let Err(e) = Codegen::new()
        .inputs(["proto/agent.proto"])
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out)
        .run()
    {
        panic!("generate agent.proto: {e}");
    }
    // `include!` cannot take a file with inner attributes or inner doc comments: drop them.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => panic!("read {}: {e}", path.display()),
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect();
        if let Err(e) = std::fs::write(&path, kept.join("\n")) {
            panic!("write {}: {e}", path.display());
        }
    }
}

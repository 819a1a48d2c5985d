//! Compiles `protos/agent.proto` into ttrpc message and service modules in OUT_DIR.

use std::fs;
use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=protos/agent.proto");

    Codegen::new()
        .out_dir(&out_dir)
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc code generation for protos/agent.proto");

    // The generated files open with inner attributes and doc comments, which are not
    // allowed in a file that is `include!`d into a module: drop them.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out_dir.join(name);
        let text = fs::read_to_string(&path).expect("read generated code");
        let kept: String = text
            .lines()
            .filter(|line| {
                let line = line.trim_start();
                !(line.starts_with("#![") || line.starts_with("//!"))
            })
            .map(|line| format!("{line}\n"))
            .collect();
        fs::write(&path, kept).expect("write generated code");
    }
}

//! containerd-shim-capsid-v2: containerd runs this binary for
//! `--runtime io.containerd.capsid.v2`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-v" || a == "--version") {
        println!(
            "containerd-shim-capsid-v2 version {}",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "containerd-shim-capsid-v2: this build has no Task service; \
         use `capsid run` (see docs/containerd.md)"
    );
    ExitCode::FAILURE
}

//! containerd-shim-capsid-v2: containerd runs this binary for
//! `--runtime io.containerd.capsid.v2` (actions `start`, `delete`, and
//! serve mode without an action).
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context};
use capsid_shim::{bootstrap, logging};

fn main() -> ExitCode {
    // Everything this process and its children make (run directories,
    // sockets, logs, disks, the VM's files) is for root alone unless it
    // says otherwise.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-capsid-v2: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let flags = containerd_shim::parse(&args).context("bad arguments")?;
    if flags.version {
        println!(
            "containerd-shim-capsid-v2 version {}",
            env!("CARGO_PKG_VERSION")
        );
        return Ok(());
    }
    let cwd = std::env::current_dir().context("no working directory")?;
    match flags.action.as_str() {
        "start" => {
            logging::init(logging::open_fifo(&cwd), flags.debug);
            let answer = bootstrap::start(&flags)?;
            // containerd 1.6 takes everything printed as the address.
            let mut out = std::io::stdout();
            out.write_all(&answer)?;
            out.flush()?;
            Ok(())
        }
        "delete" => {
            logging::init(None, flags.debug);
            let response = bootstrap::delete(&flags)?;
            std::io::stdout().write_all(&response)?;
            Ok(())
        }
        "" => {
            let log = logging::open_fifo(&cwd);
            let stderr_sink = log.as_ref().and_then(|f| f.try_clone().ok());
            logging::init(log, flags.debug);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(bootstrap::serve(&flags, stderr_sink))?;
            Ok(())
        }
        capsid_sandbox::pool::WARM_ACTION => {
            // The daemon points stderr at the sandbox's log.
            logging::init(None, flags.debug);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(capsid_shim::warm::run())
        }
        other => bail!("unknown action {other:?} (expected start or delete)"),
    }
}

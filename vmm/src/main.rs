//! capsid-vmm: runs one microVM described by a JSON config file, or
//! restores one from a snapshot (`--restore`).
//!
//! Exit status: 0 when the guest reset itself (how a capsid guest ends),
//! 1 when the VMM failed, 3 when the guest crashed, 4 when the host ended
//! the VM (signal, or a shutdown request the guest did not answer).

use std::path::PathBuf;
use std::process::ExitCode;

use capsid_vmm::machine::VmEnd;
use capsid_vmm::seccomp::{self, SeccompMode};
use capsid_vmm::snapshot::restore;
use capsid_vmm::{builder, config};
use capsid_vmm::{EXIT_GUEST_CRASH, EXIT_GUEST_RESET, EXIT_STOPPED, EXIT_VMM_ERROR};
use clap::Parser;

/// Runs one capsid microVM.
#[derive(Debug, Parser)]
#[command(name = "capsid-vmm", version, about)]
struct Args {
    /// The VM description (JSON). With --restore: optional, the same VM
    /// with other host-side paths (serial, control socket, disks, taps,
    /// vsock socket).
    #[arg(long, value_name = "FILE", required_unless_present = "restore")]
    config: Option<PathBuf>,
    /// Restores the VM a snapshot saved: its state file (`snapshot`
    /// request of the control API).
    #[arg(long, value_name = "STATE")]
    restore: Option<PathBuf>,
    /// The snapshot's memory file (default: where the snapshot wrote it).
    #[arg(long, value_name = "FILE", requires = "restore")]
    memory: Option<PathBuf>,
    /// What a system call outside a thread's seccomp list does: `kill`
    /// the VMM, `log` it and let it through (for making lists on a new
    /// host), or `off`: no filters.
    #[arg(long, value_enum, value_name = "MODE", default_value = "kill")]
    seccomp: SeccompMode,
}

fn main() -> ExitCode {
    // Everything capsid-vmm makes (its control socket, vsock sockets,
    // console log) is for root alone.
    // SAFETY: umask(2) only changes this process's file mode mask; it
    // cannot fail and touches no memory.
    unsafe {
        libc::umask(0o077);
    }
    // Warnings the guest can cause are bounded (a flood of bad requests
    // must not fill the host's log).
    capsid_devices::log_limit::init_guest_facing_logging();
    let args = Args::parse();
    match run(&args) {
        Ok(VmEnd::Reset) => ExitCode::from(EXIT_GUEST_RESET),
        Ok(VmEnd::Crash(why)) => {
            eprintln!("capsid-vmm: guest crashed: {why}");
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        Ok(VmEnd::Stopped(why)) => {
            eprintln!("capsid-vmm: stopped: {why}");
            ExitCode::from(EXIT_STOPPED)
        }
        Err(e) => {
            eprintln!("capsid-vmm: {}", capsid_devices::describe(e.as_ref()));
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

fn run(args: &Args) -> anyhow::Result<VmEnd> {
    // Compiled before the build: a vhost-user watchdog thread started by
    // the build installs its filter too.
    seccomp::init(args.seccomp)?;
    let machine = match (&args.restore, &args.config) {
        // Both files are checked whole before any VM exists.
        (Some(state), config) => builder::restore(restore::load(
            state,
            args.memory.as_deref(),
            config.as_deref(),
        )?)?,
        (None, Some(config)) => builder::build(&config::from_file(config)?)?,
        (None, None) => anyhow::bail!("--config or --restore is needed"),
    };
    Ok(machine.run()?)
}

//! capsid-vhost: serves one capsid virtio device over vhost-user, for QEMU.
//!
//! One device per process: a device crash takes only itself down, and each
//! process can be confined to exactly the host resources its device needs.
//! The process exits when the frontend (QEMU) disconnects.

use std::path::PathBuf;
use std::process::ExitCode;

use capsid_devices::hosting::vhost_user;
use capsid_devices::virtio::rng::Rng;
use clap::{Parser, Subcommand};

/// Serves a capsid virtio device over vhost-user.
#[derive(Debug, Parser)]
#[command(name = "capsid-vhost", version, about)]
struct Args {
    #[command(subcommand)]
    device: Device,
}

#[derive(Debug, Subcommand)]
enum Device {
    /// Entropy device (virtio-rng) fed by the host's getrandom(2).
    Rng {
        /// vhost-user socket to listen on.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAPSID_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = match args.device {
        Device::Rng { socket } => {
            vhost_user::serve(Rng::default(), &socket).map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capsid-vhost: {}", capsid_devices::describe(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

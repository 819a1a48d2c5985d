//! `capsid`: containers in microVMs from the command line.
#![forbid(unsafe_code)]

mod check;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Runs containers in their own KVM microVMs.
#[derive(Debug, Parser)]
#[command(name = "capsid", version, about)]
struct Cli {
    /// Configuration file (default: $CAPSID_CONFIG, then /etc/capsid/config.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reports what this host can do and which VM backend capsid uses.
    Check(check::CheckArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAPSID_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => check::run(cli.config.as_deref(), &args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capsid: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `capsid`: containers in microVMs from the command line.
#![forbid(unsafe_code)]

mod bench;
mod check;
mod network;
mod run;
mod run_pooled;
mod runs;
mod stats;
mod tty;

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
    /// Runs a container in its own microVM.
    Run(Box<run::RunArgs>),
    /// Shows every running sandbox's memory: assigned, touched, reclaimed.
    Stats(stats::StatsArgs),
    /// Measures start-up latency (phase by phase) and memory per sandbox.
    Bench(Box<bench::BenchArgs>),
    /// Removes what `capsid run`s killed by SIGKILL (or a crash) left behind.
    Gc(runs::GcArgs),
}

fn main() -> ExitCode {
    // Everything this process makes (run directories, sockets, logs,
    // disks) is for root alone unless it says otherwise.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAPSID_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // A closing span logs how long it took: the phases of `capsid run`.
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => check::run(cli.config.as_deref(), &args),
        Command::Stats(args) => stats::run(cli.config.as_deref(), &args),
        Command::Gc(args) => runs::gc(cli.config.as_deref(), &args),
        Command::Bench(args) => {
            bench::run(cli.config.as_deref(), *args).map(|()| ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let code = match tokio::runtime::Runtime::new() {
                Ok(rt) => {
                    let code = rt.block_on(run::run(cli.config.as_deref(), *args));
                    // A read of our stdin may still block a runtime thread
                    // (a terminal): do not wait for it.
                    rt.shutdown_background();
                    code
                }
                Err(e) => Err(anyhow::Error::from(e).context("starting the async runtime")),
            };
            // Like `docker run`: 125 when capsid itself failed, else the
            // container's status.
            let code = code.unwrap_or_else(|e| {
                eprintln!("capsid: {e:#}");
                125
            });
            std::process::exit(code);
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capsid: {e:#}");
            ExitCode::FAILURE
        }
    }
}

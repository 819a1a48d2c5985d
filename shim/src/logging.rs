//! The shim's log: tracing lines into the bundle's `log` FIFO, which
//! containerd reads and copies into its own log. Without a reader (a
//! `delete` after containerd restarted) the log goes to stderr instead.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tracing_subscriber::EnvFilter;

/// Environment variable overriding the log filter (`debug`, `capsid_shim=trace`).
pub const LOG_ENV: &str = "CAPSID_LOG";

/// Opens the `log` FIFO of `bundle` for writing without waiting for a
/// reader; `None` if there is no FIFO or nobody reads it.
pub fn open_fifo(bundle: &Path) -> Option<File> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(bundle.join("log"))
        .ok()?;
    // Blocking writes from here on: a slow reader must not lose lines.
    fcntl(&file, FcntlArg::F_SETFL(OFlag::empty())).ok()?;
    Some(file)
}

/// Sends tracing output to `sink` (else stderr), at debug level when
/// `debug`, or as `$CAPSID_LOG` says.
pub fn init(sink: Option<File>, debug: bool) {
    let filter = EnvFilter::try_from_env(LOG_ENV)
        .unwrap_or_else(|_| EnvFilter::new(if debug { "debug" } else { "info" }));
    // A sink that fails must not take the shim down. After Delete
    // containerd closes its end of the log FIFO, which is also the shim's
    // stderr, and the shim's last lines fail with EPIPE; by default the
    // subscriber then reports the failure with `eprintln!`, which panics
    // when stderr fails too: exit 101 on the main thread, and the panic's
    // message lost in the same closed FIFO.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .log_internal_errors(false);
    let installed = match sink {
        Some(file) => builder.with_writer(Mutex::new(file)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
    if installed.is_err() {
        eprintln!("containerd-shim-capsid-v2: a logger was installed already");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_reader_means_no_fifo() {
        let dir = tempfile::tempdir().unwrap();
        assert!(open_fifo(dir.path()).is_none());
        nix::unistd::mkfifo(
            &dir.path().join("log"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(open_fifo(dir.path()).is_none(), "no reader yet");
        let _reader = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(dir.path().join("log"))
            .unwrap();
        assert!(open_fifo(dir.path()).is_some());
    }
}

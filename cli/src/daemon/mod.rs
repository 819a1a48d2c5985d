//! What capsid's host daemons (`capsid-balloond`, `capsid-poold`) set up
//! first, the same way: included by each with `#[path]`, as the binaries
//! of this package share no library.

/// Root-only files from here on, and logs on stderr filtered by
/// `CAPSID_LOG` (default `info`), coloured only on a terminal: journald
/// and log files get plain text. The umask is inherited by whatever the
/// daemon starts (capsid-poold's warm shims, as containerd's shims have it
/// set by their own `main`).
pub fn init() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAPSID_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

//! capsid-vhost: serves one capsid virtio device over vhost-user, for QEMU.
//!
//! One device per process: a device crash takes only itself down, and each
//! process can be confined to exactly the host resources its device needs.
//! The process exits when the frontend (QEMU) disconnects.

use std::path::PathBuf;
use std::process::ExitCode;

use capsid_devices::hosting::vhost_user;
use capsid_devices::seccomp::{Confinement, Kind, Mode, Role};
use capsid_devices::virtio::blk::{Blk, BlkConfig};
use capsid_devices::virtio::net::{parse_mac, Net, Tap};
use capsid_devices::virtio::rng::Rng;
use capsid_devices::virtio::vsock::Vsock;
use clap::{Parser, Subcommand};

/// Serves a capsid virtio device over vhost-user.
#[derive(Debug, Parser)]
#[command(name = "capsid-vhost", version, about)]
struct Args {
    /// What a syscall outside the device's seccomp allow-lists does: kill
    /// the process, log it (kernel log, type=1326) and let it through, or
    /// install no filter at all.
    #[arg(long, global = true, value_enum, value_name = "MODE", default_value_t = Mode::Kill)]
    seccomp: Mode,
    #[command(subcommand)]
    device: Device,
}

#[derive(Debug, Subcommand)]
enum Device {
    /// Block device (virtio-blk) backed by a file or host block device.
    Blk {
        /// vhost-user socket to listen on.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The disk image (a regular file or a block device).
        #[arg(long, value_name = "FILE")]
        path: PathBuf,
        /// Open the image read-only and offer a read-only disk.
        #[arg(long)]
        readonly: bool,
        /// Id returned to the guest (at most 20 bytes; default: the file name).
        #[arg(long, value_name = "ID")]
        serial: Option<String>,
    },
    /// Network device (virtio-net) attached to an existing tap interface.
    Net {
        /// vhost-user socket to listen on.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The tap interface, in this process's network namespace.
        #[arg(long, value_name = "NAME")]
        tap: String,
        /// MAC address offered in the device's configuration space.
        #[arg(long, value_name = "MAC", value_parser = parse_mac)]
        mac: Option<[u8; 6]>,
    },
    /// Entropy device (virtio-rng) fed by the host's getrandom(2).
    Rng {
        /// vhost-user socket to listen on.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
    /// Socket device (virtio-vsock) with a hybrid Unix-socket host side.
    Vsock {
        /// vhost-user socket to listen on.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The guest's CID (3 or more).
        #[arg(long, value_name = "CID")]
        guest_cid: u64,
        /// Host Unix socket: clients connect here and write `CONNECT <port>`;
        /// guest connections to port P go to `<PATH>_<P>`.
        #[arg(long, value_name = "PATH")]
        uds_path: PathBuf,
    },
    /// Not a virtio device: QEMU's serial console, written to a capped,
    /// rotating log (a guest printing forever fills no host disk).
    Console {
        /// Unix socket QEMU's chardev connects to.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The log file (the previous generation is `<FILE>.1`).
        #[arg(long, value_name = "FILE")]
        log: PathBuf,
        /// Bytes per generation.
        #[arg(long, value_name = "BYTES", default_value_t = capsid_devices::capped_log::DEFAULT_MAX_BYTES)]
        max_bytes: u64,
    },
}

/// Accepts QEMU's one connection on `socket` and copies what the guest
/// prints into `log` until QEMU goes.
fn serve_console(
    socket: &std::path::Path,
    log: &std::path::Path,
    max_bytes: u64,
    seccomp: Confinement,
) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut out = capsid_devices::capped_log::CappedLog::open(log, max_bytes)?;
    let claim = capsid_devices::socket_claim::SocketClaim::new(socket)?;
    let listener = claim.listen()?;
    seccomp.install(Role::Process)?;
    let (mut conn, _) = listener.accept()?;
    drop(listener);
    // The socket and its lock file go: nobody else may connect.
    drop(claim);
    // From here on: QEMU's stream in, the capped log out.
    seccomp.install(Role::Connected)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
}

fn main() -> ExitCode {
    // Everything this process makes (run directories, sockets, logs,
    // disks) is for root alone unless it says otherwise.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // Warnings the guest can cause are bounded (a flood of bad requests
    // must not fill the host's log).
    capsid_devices::log_limit::init_guest_facing_logging();
    let args = Args::parse();
    let kind = match &args.device {
        Device::Blk { .. } => Kind::Blk,
        Device::Net { .. } => Kind::Net,
        Device::Rng { .. } => Kind::Rng,
        Device::Vsock { .. } => Kind::Vsock,
        Device::Console { .. } => Kind::Console,
    };
    let seccomp = Confinement::new(kind, args.seccomp);
    let result = match args.device {
        Device::Blk {
            socket,
            path,
            readonly,
            serial,
        } => Blk::new(&BlkConfig {
            path,
            read_only: readonly,
            serial,
        })
        .map_err(anyhow::Error::from)
        .and_then(|dev| {
            vhost_user::serve_confined(dev, &socket, seccomp).map_err(anyhow::Error::from)
        }),
        Device::Net { socket, tap, mac } => Tap::open(&tap)
            .map_err(anyhow::Error::from)
            .and_then(|tap| Net::new(tap, mac).map_err(anyhow::Error::from))
            .and_then(|dev| {
                vhost_user::serve_confined(dev, &socket, seccomp).map_err(anyhow::Error::from)
            }),
        Device::Rng { socket } => vhost_user::serve_confined(Rng::default(), &socket, seccomp)
            .map_err(anyhow::Error::from),
        Device::Vsock {
            socket,
            guest_cid,
            uds_path,
        } => Vsock::new(guest_cid, &uds_path)
            .map_err(anyhow::Error::from)
            .and_then(|dev| {
                vhost_user::serve_confined(dev, &socket, seccomp).map_err(anyhow::Error::from)
            }),
        Device::Console {
            socket,
            log,
            max_bytes,
        } => serve_console(&socket, &log, max_bytes, seccomp),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capsid-vhost: {}", capsid_devices::describe(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

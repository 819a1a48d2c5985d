//! What the jailer does as root in the caller's namespaces, before it
//! forks into the jail's: the sandbox's network namespace and cgroups, its
//! taps handed to the jail uid, the passed files opened, rlimits set.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::Path;

use capsid_jail::JailSpec;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sched::CloneFlags;
use nix::sys::resource::{setrlimit, Resource};

use super::{sys, JailError};

/// The flags capsid's devices attach to a tap with (an Ethernet tap with a
/// virtio-net header, no packet-info prefix): TUNSETIFF on an existing tap
/// must name its type.
#[allow(clippy::cast_possible_truncation)] // 0x5002 fits in a short
const TAP_FLAGS: libc::c_short =
    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;

/// Runs the host-side steps.
pub fn enter(spec: &JailSpec) -> Result<(), JailError> {
    if let Some(ns) = &spec.netns {
        let file = File::open(ns).map_err(|source| JailError::Path {
            what: "open the network namespace",
            path: ns.clone(),
            source,
        })?;
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
            .map_err(sys("join the sandbox's network namespace"))?;
    }
    for tap in &spec.taps {
        hand_tap(tap, spec.uid, spec.gid)?;
    }
    for cgroup in &spec.cgroups {
        let procs = cgroup.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string()).map_err(|source| {
            JailError::Path {
                what: "join the cgroup",
                path: cgroup.clone(),
                source,
            }
        })?;
    }
    for passed in &spec.fds {
        let file = OpenOptions::new()
            .read(true)
            .write(passed.writable)
            .open(&passed.path)
            .map_err(|source| JailError::Path {
                what: "open the passed file",
                path: passed.path.clone(),
                source,
            })?;
        place(file, passed.fd)?;
    }
    let limit = |resource, value: u64, what| setrlimit(resource, value, value).map_err(sys(what));
    limit(Resource::RLIMIT_NOFILE, spec.max_files, "set RLIMIT_NOFILE")?;
    if let Some(size) = spec.max_file_size {
        limit(Resource::RLIMIT_FSIZE, size, "set RLIMIT_FSIZE")?;
    }
    // A crash of a process holding guest memory must not write it out.
    limit(Resource::RLIMIT_CORE, 0, "set RLIMIT_CORE")?;
    Ok(())
}

/// Puts `file` at descriptor `fd`, inherited across exec.
fn place(file: File, fd: i32) -> Result<(), JailError> {
    let raw = file.as_raw_fd();
    if raw == fd {
        fcntl(&file, FcntlArg::F_SETFD(FdFlag::empty())).map_err(sys("keep a passed file"))?;
        // Kept open for the program.
        let _ = file.into_raw_fd();
        return Ok(());
    }
    // SAFETY: dup2 onto a number the jailer does not otherwise use (the
    // spec's descriptors are 3 or more and chosen by the caller); the copy
    // has no close-on-exec flag, which is the point.
    let rc = unsafe { libc::dup2(raw, fd) };
    if rc < 0 {
        return Err(JailError::Sys {
            what: "place a passed file",
            source: nix::Error::last(),
        });
    }
    Ok(())
}

/// The parent keeps none of the child's files.
pub fn close_passed(spec: &JailSpec) {
    for passed in &spec.fds {
        // SAFETY: the descriptor was placed by `enter` for the child only;
        // nothing in the parent holds it.
        unsafe { libc::close(passed.fd) };
    }
}

/// Makes the persistent tap `name` attachable by `uid`/`gid` without
/// CAP_NET_ADMIN (the kernel lets a tap's owner attach to it).
fn hand_tap(name: &str, uid: u32, gid: u32) -> Result<(), JailError> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| JailError::Path {
            what: "open",
            path: "/dev/net/tun".into(),
            source,
        })?;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(JailError::Path {
            what: "hand over the tap",
            path: name.into(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    // SAFETY: `ifreq` is a plain C struct for which all-zero bytes are a
    // valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = TAP_FLAGS;
    let fail = |what| {
        let source = std::io::Error::last_os_error();
        JailError::Path {
            what,
            path: Path::new(name).to_path_buf(),
            source,
        }
    };
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is;
    // `tun` is an open /dev/net/tun.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(fail("attach to the tap"));
    }
    // SAFETY: TUNSETOWNER and TUNSETGROUP take their id by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOWNER, libc::c_ulong::from(uid)) } < 0 {
        return Err(fail("give the tap to the jail's uid"));
    }
    // SAFETY: as above.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETGROUP, libc::c_ulong::from(gid)) } < 0 {
        return Err(fail("give the tap to the jail's gid"));
    }
    Ok(())
}

//! The host's memory as the policy sees it: `/proc/meminfo`, PSI
//! (`/proc/pressure/memory`), a process's resident memory, or a
//! "pretend host" of a fixed size whose use is what the sandboxes' VMM
//! processes hold (for tests and demos on a big machine).

use std::path::Path;

use crate::process::ProcessRef;

/// The host's memory right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostMemory {
    /// Memory the host has (or pretends to have), MiB.
    pub total_mib: u64,
    /// Memory that can still be handed out without pressure, MiB.
    pub available_mib: u64,
    /// Memory in use beyond the total, MiB (a pretend host can be
    /// overdrawn; a real one cannot).
    pub overdrawn_mib: u64,
    /// PSI `some avg10` of memory (percent of time some task stalled on
    /// memory), where the kernel offers it.
    pub psi_some_avg10: Option<f64>,
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, MiB.
pub fn meminfo() -> Option<(u64, u64)> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// Parses meminfo text.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib / 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// `some avg10` of `/proc/pressure/memory`.
pub fn psi_memory() -> Option<f64> {
    parse_psi(&std::fs::read_to_string("/proc/pressure/memory").ok()?)
}

/// Parses PSI text.
pub fn parse_psi(text: &str) -> Option<f64> {
    let some = text.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// Resident memory of a process, MiB, counting shared memory it maps
/// (guest RAM is a memfd): `VmRSS` of `/proc/PID/status`.
pub fn rss_mib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&text, "VmRSS:").map(|kib| kib / 1024)
}

/// Host memory a VMM process holds for its VM, MiB: its private resident
/// memory (`RssAnon` + `RssFile`) plus the allocated size of every memfd
/// it has open (QEMU's guest RAM). Counting the memfd rather than the
/// mapped `RssShmem` includes guest pages only a device process wrote
/// (a disk read by vhost-user-blk lands in guest RAM without QEMU ever
/// mapping the page) and counts each page once. Without a memfd (capsid-vmm's
/// anonymous guest RAM) it is `VmRSS`.
pub fn vm_footprint_mib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let anon = parse_status_kib(&text, "RssAnon:")?;
    let file = parse_status_kib(&text, "RssFile:").unwrap_or(0);
    let shmem = parse_status_kib(&text, "RssShmem:").unwrap_or(0);
    let memfd = memfd_kib(pid);
    Some((anon + file + if memfd > 0 { memfd } else { shmem }) / 1024)
}

/// Guest RAM resident on the host, MiB: the allocated size of the memfds
/// VMM process `pid` has open (QEMU's guest RAM), or, without a memfd
/// (capsid-vmm's anonymous guest RAM), its `RssAnon` (which also counts
/// the VMM's own small heap). Measured by the host, so a guest cannot
/// inflate or hide it.
pub fn guest_resident_mib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let anon = parse_status_kib(&text, "RssAnon:")?;
    let memfd = memfd_kib(pid);
    Some(if memfd > 0 { memfd } else { anon } / 1024)
}

/// Allocated KiB of the distinct memfds process `pid` has open.
fn memfd_kib(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let mut seen = std::collections::HashSet::new();
    let mut kib = 0;
    for fd in fds.flatten() {
        let is_memfd = std::fs::read_link(fd.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("/memfd:"));
        if !is_memfd {
            continue;
        }
        if let Ok(meta) = std::fs::metadata(fd.path()) {
            if seen.insert((meta.dev(), meta.ino())) {
                // st_blocks counts 512-byte units.
                kib += meta.blocks() / 2;
            }
        }
    }
    kib
}

/// A `kB` field of `/proc/PID/status`.
pub fn parse_status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// When a process started (clock ticks since boot): with the pid, it
/// names a process even after pid reuse.
pub fn start_time(pid: u32) -> Option<u64> {
    ProcessRef::of(pid).map(|p| p.start_time)
}

/// Whether process `pid` that started at `started` still runs.
pub fn alive(pid: u32, started: Option<u64>) -> bool {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return false;
    }
    match started {
        Some(t) => start_time(pid) == Some(t),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_parsed() {
        let t = "MemTotal:       24684084 kB\nMemFree:  100 kB\nMemAvailable:   24003336 kB\n";
        assert_eq!(parse_meminfo(t), Some((24105, 23440)));
        assert_eq!(parse_meminfo("MemTotal: x kB\n"), None);
    }

    #[test]
    fn psi_is_parsed() {
        let t = "some avg10=12.50 avg60=0.00 avg300=0.00 total=5\nfull avg10=1.00 avg60=0 avg300=0 total=0\n";
        assert_eq!(parse_psi(t), Some(12.5));
        assert_eq!(parse_psi("some avg10=NaN\n"), None);
        assert_eq!(parse_psi(""), None);
    }

    #[test]
    fn own_process_is_measured() {
        let me = std::process::id();
        assert!(rss_mib(me).is_some());
        assert!(vm_footprint_mib(me).is_some());
        assert!(guest_resident_mib(me).is_some());
        let t = start_time(me);
        assert!(t.is_some());
        assert!(alive(me, t));
        assert!(
            !alive(me, t.map(|t| t + 1)),
            "another start time is another process"
        );
        assert!(!alive(u32::MAX, None));
    }

    #[test]
    fn memfd_pages_count_once_and_only_when_allocated() {
        use std::io::Write;
        let fd = nix::sys::memfd::memfd_create(c"capsid-test", nix::sys::memfd::MFdFlags::empty())
            .unwrap();
        let mut file = std::fs::File::from(fd);
        let before = memfd_kib(std::process::id());
        file.set_len(64 << 20).unwrap();
        assert_eq!(
            memfd_kib(std::process::id()),
            before,
            "a sparse memfd costs nothing"
        );
        file.write_all(&vec![1u8; 8 << 20]).unwrap();
        let kib = memfd_kib(std::process::id()) - before;
        assert!((8 * 1024..9 * 1024).contains(&kib), "{kib}");
    }
}

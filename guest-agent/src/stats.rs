//! Statistics of a container's cgroup (v2) and of the guest's memory.

use std::fs;
use std::path::Path;

use capsid_protocol::agent::{
    CpuStats, GuestMemInfo, IoStats, MemoryStats, PidsStats, StatsResponse,
};

/// Parses `key value` lines (cpu.stat, memory.stat, memory.events).
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(key)).then(|| it.next()).flatten()
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A single-value file; "max" reads as 0 (no limit).
fn single(path: &Path) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// Sums rbytes/wbytes/rios/wios over every device of io.stat.
fn io_stat(text: &str) -> IoStats {
    let mut io = IoStats::new();
    for field in text.split_whitespace() {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0);
        match k {
            "rbytes" => io.read_bytes += v,
            "wbytes" => io.write_bytes += v,
            "rios" => io.read_ios += v,
            "wios" => io.write_ios += v,
            _ => {}
        }
    }
    io
}

/// /proc/meminfo in bytes.
pub fn guest_meminfo(text: &str) -> GuestMemInfo {
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let mut m = GuestMemInfo::new();
    m.total = kib("MemTotal");
    m.free = kib("MemFree");
    m.available = kib("MemAvailable");
    m.cached = kib("Cached");
    m
}

/// OOM kills recorded in the cgroup's memory.events.
pub fn oom_kills(cgroup: &Path) -> u64 {
    keyed(
        &fs::read_to_string(cgroup.join("memory.events")).unwrap_or_default(),
        "oom_kill",
    )
}

/// Everything for one cgroup.
pub fn collect(cgroup: &Path) -> StatsResponse {
    let read = |f: &str| fs::read_to_string(cgroup.join(f)).unwrap_or_default();
    let cpu_stat = read("cpu.stat");
    let mut cpu = CpuStats::new();
    cpu.usage_usec = keyed(&cpu_stat, "usage_usec");
    cpu.user_usec = keyed(&cpu_stat, "user_usec");
    cpu.system_usec = keyed(&cpu_stat, "system_usec");
    cpu.nr_periods = keyed(&cpu_stat, "nr_periods");
    cpu.nr_throttled = keyed(&cpu_stat, "nr_throttled");
    cpu.throttled_usec = keyed(&cpu_stat, "throttled_usec");

    let mem_stat = read("memory.stat");
    let events = read("memory.events");
    let mut memory = MemoryStats::new();
    memory.usage_bytes = single(&cgroup.join("memory.current"));
    memory.limit_bytes = single(&cgroup.join("memory.max"));
    memory.anon_bytes = keyed(&mem_stat, "anon");
    memory.file_bytes = keyed(&mem_stat, "file");
    memory.oom_events = keyed(&events, "oom");
    memory.oom_kill_events = keyed(&events, "oom_kill");

    let mut pids = PidsStats::new();
    pids.current = single(&cgroup.join("pids.current"));
    pids.limit = single(&cgroup.join("pids.max"));

    let mut resp = StatsResponse::new();
    resp.cpu = protobuf::MessageField::some(cpu);
    resp.memory = protobuf::MessageField::some(memory);
    resp.pids = protobuf::MessageField::some(pids);
    resp.io = protobuf::MessageField::some(io_stat(&read("io.stat")));
    resp.guest_memory = protobuf::MessageField::some(guest_meminfo(
        &fs::read_to_string("/proc/meminfo").unwrap_or_default(),
    ));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let w = |f: &str, t: &str| fs::write(dir.path().join(f), t).unwrap();
        w("cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 3\nnr_throttled 1\nthrottled_usec 20\n");
        w("memory.current", "4096\n");
        w("memory.max", "max\n");
        w("memory.stat", "anon 1024\nfile 2048\n");
        w("memory.events", "low 0\nhigh 0\nmax 5\noom 2\noom_kill 1\n");
        w("pids.current", "3\n");
        w("pids.max", "100\n");
        w("io.stat", "254:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n254:16 rbytes=5 wbytes=0 rios=1 wios=0\n");
        let s = collect(dir.path());
        assert_eq!(s.cpu.usage_usec, 1500);
        assert_eq!(s.cpu.throttled_usec, 20);
        assert_eq!(s.memory.usage_bytes, 4096);
        assert_eq!(s.memory.limit_bytes, 0, "max means no limit");
        assert_eq!((s.memory.anon_bytes, s.memory.file_bytes), (1024, 2048));
        assert_eq!((s.memory.oom_events, s.memory.oom_kill_events), (2, 1));
        assert_eq!((s.pids.current, s.pids.limit), (3, 100));
        assert_eq!(
            (
                s.io.read_bytes,
                s.io.write_bytes,
                s.io.read_ios,
                s.io.write_ios
            ),
            (15, 20, 2, 2)
        );
        assert_eq!(oom_kills(dir.path()), 1);
    }

    #[test]
    fn meminfo_is_in_bytes() {
        let m = guest_meminfo("MemTotal:  1000 kB\nMemFree: 200 kB\nMemAvailable: 500 kB\nCached: 100 kB\nSwapCached: 7 kB\n");
        assert_eq!(
            (m.total, m.free, m.available, m.cached),
            (1024000, 204800, 512000, 102400)
        );
    }
}

//! What benchmarks read from /proc: a process's proportional memory, the
//! guest RAM a VMM has touched, and processes that mention a path.

use std::path::Path;

/// Proportional set size of `pid` in KiB (`Pss:` of smaps_rollup): shared
/// pages count once in total across the processes sharing them, so the
/// sum over a sandbox's processes is what that sandbox costs the host.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    field_kib(&text, "Pss:")
}

fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident KiB of the mappings of `pid` whose name contains `needle`
/// (guest RAM: QEMU's `memfd:` memory backend).
pub fn mapping_rss_kib(pid: u32, needle: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(sum_mapping_rss(&text, needle))
}

fn sum_mapping_rss(smaps: &str, needle: &str) -> u64 {
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let is_header =
            first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        if is_header {
            inside = line.contains(needle);
        } else if inside {
            if let Some(v) = field_kib(line, "Rss:") {
                total += v;
            }
        }
    }
    total
}

/// Pids of processes whose command line mentions `marker`.
pub fn processes_mentioning(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(marker))
                .unwrap_or(false)
        })
        .collect()
}

/// Whether a process exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_pss() {
        let text = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss: 160996 kB\nPss: 158074 kB\n";
        assert_eq!(field_kib(text, "Pss:"), Some(158_074));
    }

    #[test]
    fn memfd_rss() {
        let smaps = "\
7f00-7f10 rw-s 00000000 00:01 5 /memfd:memory-backend-memfd (deleted)
Size: 262144 kB
Rss: 50324 kB
Pss: 50000 kB
7f20-7f30 rw-p 00000000 00:00 0
Size: 1024 kB
Rss: 512 kB
";
        assert_eq!(sum_mapping_rss(smaps, "memfd:"), 50_324);
    }

    #[test]
    fn own_process_is_alive() {
        assert!(alive(std::process::id()));
        assert!(pss_kib(std::process::id()).is_some());
    }
}

//! capsid-vmm's balloon through its control socket (docs/vmm.md):
//! `balloon_set {target_mib}` (the balloon's size) and `balloon_stats`.

use std::path::Path;

use capsid_vmm_api::control::{BalloonStatsReply, Request};

use super::stats::RawStats;
use super::Result;
use crate::vmm_control;

/// Sets the balloon to `balloon_mib`.
pub fn set_target(socket: &Path, balloon_mib: u32) -> Result<()> {
    vmm_control::call(
        socket,
        &Request::BalloonSet {
            target_mib: balloon_mib,
        },
    )?;
    Ok(())
}

/// The balloon's target and actual size (MiB) and the guest's last stats.
pub fn status(socket: &Path) -> Result<(u64, u64, RawStats)> {
    let reply: BalloonStatsReply = vmm_control::call_for(socket, &Request::BalloonStats)?;
    Ok(from_reply(&reply))
}

/// Reads a `balloon_stats` answer (sizes from page counts, so nothing is
/// lost to MiB rounding).
pub fn from_reply(reply: &BalloonStatsReply) -> (u64, u64, RawStats) {
    let pages_mib = |pages: u32| u64::from(pages) / 256;
    let s = &reply.stats;
    (
        pages_mib(reply.target_pages),
        pages_mib(reply.actual_pages),
        RawStats {
            swap_in: s.swap_in,
            swap_out: s.swap_out,
            major_faults: s.major_faults,
            minor_faults: s.minor_faults,
            free: s.free_memory,
            total: s.total_memory,
            available: s.available_memory,
            caches: s.disk_caches,
            last_update: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balloon::BalloonError;
    use capsid_vmm_api::control::Reply;
    use serde_json::{json, Value};
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    fn read(answer: Value) -> std::result::Result<BalloonStatsReply, serde_json::Error> {
        serde_json::from_value::<Reply>(answer)?.body_as()
    }

    #[test]
    fn stats_answer_is_read() {
        let v = json!({
            "ok": true, "target_pages": 16384, "actual_pages": 8192,
            "target_mib": 64, "actual_mib": 32,
            "stats": {"free_memory": 1u64 << 20, "total_memory": null, "disk_caches": 7},
        });
        let (t, a, s) = from_reply(&read(v).unwrap());
        assert_eq!((t, a), (64, 32));
        assert_eq!(s.free, Some(1 << 20));
        assert_eq!(s.total, None);
        assert_eq!(s.caches, Some(7));
        assert!(read(json!({"ok": true})).is_err());
    }

    #[test]
    fn requests_and_refusals_go_over_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm-api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let fake = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in [
                r#"{"ok":true}"#,
                r#"{"ok":false,"error":"balloon target 999 MiB exceeds the VM's 64 MiB"}"#,
                r#"{"ok":true,"target_pages":512,"actual_pages":256,"stats":{}}"#,
            ] {
                let (s, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                seen.push(line);
                writeln!(&s, "{answer}").unwrap();
            }
            seen
        });
        set_target(&path, 32).unwrap();
        let e = set_target(&path, 999).unwrap_err();
        assert!(e.to_string().contains("exceeds the VM's 64 MiB"), "{e}");
        assert!(e.to_string().contains("refused balloon_set"), "{e}");
        assert!(matches!(e, BalloonError::Control(_)), "{e}");
        let (target, actual, _) = status(&path).unwrap();
        assert_eq!((target, actual), (2, 1));
        let seen = fake.join().unwrap();
        // The exact lines capsid-vmm has always been sent.
        assert_eq!(seen[0], "{\"op\":\"balloon_set\",\"target_mib\":32}\n");
        assert_eq!(seen[2], "{\"op\":\"balloon_stats\"}\n");
        let first: Value = serde_json::from_str(&seen[0]).unwrap();
        assert_eq!(first, json!({"op": "balloon_set", "target_mib": 32}));
    }
}

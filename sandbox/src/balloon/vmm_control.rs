//! capsid-vmm's balloon through its control socket (docs/vmm.md):
//! `balloon_set {target_mib}` (the balloon's size) and `balloon_stats`.

use std::path::Path;

use serde_json::{json, Value};

use super::stats::RawStats;
use super::{BalloonError, Result};
use crate::backend::capsid_vmm::control_request;

/// Sets the balloon to `balloon_mib`.
pub fn set_target(socket: &Path, balloon_mib: u32) -> Result<()> {
    let answer = request(
        socket,
        "balloon_set",
        &json!({"op": "balloon_set", "target_mib": balloon_mib}),
    )?;
    drop(answer);
    Ok(())
}

/// The balloon's target and actual size (MiB) and the guest's last stats.
pub fn status(socket: &Path) -> Result<(u64, u64, RawStats)> {
    let answer = request(socket, "balloon_stats", &json!({"op": "balloon_stats"}))?;
    parse_status(&answer).ok_or_else(|| BalloonError::Refused {
        socket: socket.to_path_buf(),
        what: "balloon_stats",
        message: format!("unexpected answer {answer}"),
    })
}

fn request(socket: &Path, what: &'static str, req: &Value) -> Result<Value> {
    let answer = control_request(socket, req).map_err(|source| BalloonError::Io {
        socket: socket.to_path_buf(),
        source,
    })?;
    if answer.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(answer)
    } else {
        Err(BalloonError::Refused {
            socket: socket.to_path_buf(),
            what,
            message: answer
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_string(),
        })
    }
}

/// Reads a `balloon_stats` answer (sizes from page counts, so nothing is
/// lost to MiB rounding).
pub fn parse_status(v: &Value) -> Option<(u64, u64, RawStats)> {
    let pages_mib = |key: &str| v.get(key).and_then(Value::as_u64).map(|p| p / 256);
    let target = pages_mib("target_pages")?;
    let actual = pages_mib("actual_pages")?;
    let s = v.get("stats");
    let get = |key: &str| s.and_then(|s| s.get(key)).and_then(Value::as_u64);
    Some((
        target,
        actual,
        RawStats {
            swap_in: get("swap_in"),
            swap_out: get("swap_out"),
            major_faults: get("major_faults"),
            minor_faults: get("minor_faults"),
            free: get("free_memory"),
            total: get("total_memory"),
            available: get("available_memory"),
            caches: get("disk_caches"),
            last_update: None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn stats_answer_is_read() {
        let v = json!({
            "ok": true, "target_pages": 16384, "actual_pages": 8192,
            "target_mib": 64, "actual_mib": 32,
            "stats": {"free_memory": 1u64 << 20, "total_memory": null, "disk_caches": 7},
        });
        let (t, a, s) = parse_status(&v).unwrap();
        assert_eq!((t, a), (64, 32));
        assert_eq!(s.free, Some(1 << 20));
        assert_eq!(s.total, None);
        assert_eq!(s.caches, Some(7));
        assert!(parse_status(&json!({"ok": true})).is_none());
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
        let seen = fake.join().unwrap();
        let first: Value = serde_json::from_str(&seen[0]).unwrap();
        assert_eq!(first, json!({"op": "balloon_set", "target_mib": 32}));
    }
}

//! A small QMP client (QEMU Machine Protocol: JSON objects, one per line,
//! over the VM's `-qmp unix:` socket), just enough for the balloon:
//! `qmp_capabilities`, `balloon`, `query-balloon`, and `qom-set`/`qom-get`
//! on the balloon device for its guest statistics.
//!
//! Every session is short: connect, negotiate, a few commands, close. QEMU
//! serves one QMP client at a time, so nobody may hold the socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::stats::RawStats;
use super::{BalloonError, Result};

/// The QOM path of capsid's balloon device (`-device ...,id=balloon0`).
pub const BALLOON_QOM_PATH: &str = "/machine/peripheral/balloon0";
/// How often QEMU asks the guest for fresh statistics, in seconds.
pub const STATS_POLL_INTERVAL_S: u32 = 1;
/// How long one QMP exchange may take.
const TIMEOUT: Duration = Duration::from_secs(3);
/// Longest line accepted from QEMU.
const MAX_LINE: u64 = 256 * 1024;
/// Events QEMU may send before an answer; more means something is wrong.
const MAX_EVENTS_PER_ANSWER: usize = 64;

/// A negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `socket`, reads the greeting and leaves negotiation mode.
    pub fn connect(socket: &Path) -> Result<Self> {
        let io = |source| BalloonError::Io {
            socket: socket.to_path_buf(),
            source,
        };
        let stream = crate::private_dir::connect_no_follow(socket).map_err(io)?;
        stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut q = Self {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(q.refused("the greeting", format!("unexpected {greeting}")));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &'static str, arguments: Option<Value>) -> Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| self.io(source))?;
        for _ in 0..MAX_EVENTS_PER_ANSWER {
            let mut msg = self.read_message()?;
            if let Some(ret) = msg.get_mut("return") {
                return Ok(ret.take());
            }
            if let Some(err) = msg.get("error") {
                let desc = err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description");
                return Err(self.refused(command, desc.to_string()));
            }
            // An asynchronous event (BALLOON_CHANGE, ...): not our answer.
        }
        Err(self.refused(command, "no answer among QEMU's events".into()))
    }

    /// Asks the balloon to leave the guest `bytes` of memory.
    pub fn set_guest_memory(&mut self, bytes: u64) -> Result<()> {
        self.execute("balloon", Some(json!({ "value": bytes })))
            .map(drop)
    }

    /// The guest's memory as QEMU sees it now (assigned minus the inflated
    /// balloon, bytes) and the guest's last statistics; keeps QEMU polling
    /// the guest every `poll_s` seconds.
    pub fn balloon_state(&mut self, poll_s: u32) -> Result<(u64, RawStats)> {
        let actual = self.execute("query-balloon", None)?;
        let actual = actual
            .get("actual")
            .and_then(Value::as_u64)
            .ok_or_else(|| self.refused("query-balloon", format!("no actual in {actual}")))?;
        self.execute(
            "qom-set",
            Some(json!({
                "path": BALLOON_QOM_PATH,
                "property": "guest-stats-polling-interval",
                "value": poll_s,
            })),
        )?;
        let stats = self.execute(
            "qom-get",
            Some(json!({ "path": BALLOON_QOM_PATH, "property": "guest-stats" })),
        )?;
        Ok((actual, parse_guest_stats(&stats)))
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(|source| self.io(source))?;
        if n == 0 {
            return Err(self.io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if !line.ends_with('\n') {
            return Err(self.refused("reading", "an overlong or cut-off line".into()));
        }
        serde_json::from_str(&line).map_err(|e| self.refused("reading", e.to_string()))
    }

    fn io(&self, source: std::io::Error) -> BalloonError {
        BalloonError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn refused(&self, what: &'static str, message: String) -> BalloonError {
        BalloonError::Refused {
            socket: self.socket.clone(),
            what,
            message,
        }
    }
}

/// Reads `qom-get guest-stats`: `{"stats": {"stat-free-memory": N, ...},
/// "last-update": T}`. QEMU reports a statistic the guest never sent as
/// -1 (or 2^64-1): that is "absent", and so is a report never updated.
pub fn parse_guest_stats(v: &Value) -> RawStats {
    if v.get("last-update").and_then(Value::as_u64).unwrap_or(0) == 0 {
        return RawStats::default();
    }
    let Some(stats) = v.get("stats") else {
        return RawStats::default();
    };
    let get = |name: &str| {
        stats
            .get(name)
            .and_then(Value::as_u64)
            .filter(|&n| n != u64::MAX)
    };
    RawStats {
        swap_in: get("stat-swap-in"),
        swap_out: get("stat-swap-out"),
        major_faults: get("stat-major-faults"),
        minor_faults: get("stat-minor-faults"),
        free: get("stat-free-memory"),
        total: get("stat-total-memory"),
        available: get("stat-available-memory"),
        caches: get("stat-disk-caches"),
        last_update: v.get("last-update").and_then(Value::as_u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn guest_stats_are_read_and_absent_ones_dropped() {
        let v = json!({
            "stats": {
                "stat-swap-in": 0, "stat-swap-out": 0,
                "stat-major-faults": 5, "stat-minor-faults": 900,
                "stat-free-memory": 100u64 << 20, "stat-total-memory": 480u64 << 20,
                "stat-available-memory": 300u64 << 20, "stat-disk-caches": -1,
                "stat-htlb-pgalloc": 0,
            },
            "last-update": 1700000000u64,
        });
        let s = parse_guest_stats(&v);
        assert_eq!(s.free, Some(100 << 20));
        assert_eq!(s.total, Some(480 << 20));
        assert_eq!(s.caches, None, "-1 means not reported");
        assert_eq!(s.major_faults, Some(5));
        assert_eq!(s.last_update, Some(1700000000));
        let mut never = v.clone();
        never["last-update"] = json!(0);
        assert_eq!(parse_guest_stats(&never), RawStats::default());
        assert_eq!(parse_guest_stats(&json!("garbage")), RawStats::default());
        let mut max = v;
        max["stats"]["stat-free-memory"] = json!(u64::MAX);
        assert_eq!(parse_guest_stats(&max).free, None);
    }

    /// A fake QEMU: greets, answers each command from `answers` in turn
    /// (after an event), and records the requests.
    fn fake_qemu(
        dir: &Path,
        answers: Vec<Value>,
    ) -> (PathBuf, std::thread::JoinHandle<Vec<Value>>) {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut seen = Vec::new();
            for answer in answers {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(serde_json::from_str(&line).unwrap());
                writeln!(
                    w,
                    r#"{{"event": "BALLOON_CHANGE", "data": {{"actual": 1}}}}"#
                )
                .unwrap();
                writeln!(w, "{answer}").unwrap();
            }
            seen
        });
        (path, handle)
    }

    #[test]
    fn a_session_negotiates_and_skips_events() {
        let dir = tempfile::tempdir().unwrap();
        let (path, fake) = fake_qemu(
            dir.path(),
            vec![
                json!({"return": {}}),
                json!({"return": {}}),
                json!({"return": {"actual": 128u64 << 20}}),
                json!({"return": {}}),
                json!({"return": {"stats": {"stat-free-memory": 1}, "last-update": 5}}),
            ],
        );
        let mut q = Qmp::connect(&path).unwrap();
        q.set_guest_memory(128 << 20).unwrap();
        let (actual, stats) = q.balloon_state(2).unwrap();
        drop(q);
        assert_eq!(actual, 128 << 20);
        assert_eq!(stats.free, Some(1));
        let seen = fake.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[1]["execute"], "balloon");
        assert_eq!(seen[1]["arguments"]["value"], 128u64 << 20);
        assert_eq!(
            seen[3]["arguments"]["property"],
            "guest-stats-polling-interval"
        );
        assert_eq!(seen[3]["arguments"]["value"], 2);
        assert_eq!(seen[4]["arguments"]["path"], BALLOON_QOM_PATH);
    }

    #[test]
    fn qemu_errors_are_reported_with_their_description() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _fake) = fake_qemu(
            dir.path(),
            vec![
                json!({"return": {}}),
                json!({"error": {"class": "GenericError", "desc": "No balloon device has been activated"}}),
            ],
        );
        let mut q = Qmp::connect(&path).unwrap();
        let e = q.set_guest_memory(1).unwrap_err();
        assert!(e.to_string().contains("No balloon device"), "{e}");
    }

    #[test]
    fn a_missing_socket_is_named() {
        let e = Qmp::connect(Path::new("/nonexistent/qmp.sock")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/qmp.sock"), "{e}");
    }
}

//! The control API's wire: line-delimited JSON on a Unix socket. Each
//! request is one JSON object on one line with an `op` field ([`Request`]);
//! each gets one JSON object back on one line ([`Reply`]),
//! `{"ok":true,...}` with the operation's fields ([`BalloonStatsReply`],
//! [`MetricsReply`]) or `{"ok":false,"error":"..."}`. docs/vmm.md lists
//! the operations.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest request line capsid-vmm accepts.
pub const MAX_REQUEST_LEN: u64 = 64 * 1024;
/// Grace period of a `shutdown` that names none.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 1000;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Sets the balloon target.
    BalloonSet {
        /// Target in MiB.
        target_mib: u32,
    },
    /// Returns the balloon's state and the guest's last statistics
    /// ([`BalloonStatsReply`]), and asks the guest for fresh ones.
    BalloonStats,
    /// Parks every vCPU.
    Pause,
    /// Lets the vCPUs run again.
    Resume,
    /// Exit counters, device counters, guest memory layout, start-up time
    /// ([`MetricsReply`]).
    Metrics,
    /// Saves a paused VM: guest RAM to the file `memory`, everything else
    /// (vCPUs, interrupt controllers, clock, devices, the config the VM
    /// was built from) to the file `state` ([`SnapshotReply`]). The VM
    /// stays paused. `capsid-vmm --restore` starts a VM from the two.
    Snapshot {
        /// The state file (written whole, then renamed into place).
        state: PathBuf,
        /// The memory file: the RAM regions in order, sparse where the
        /// guest's pages are zero.
        memory: PathBuf,
    },
    /// Presses Ctrl-Alt-Del; if the guest has not reset within
    /// `timeout_ms`, the VMM ends anyway.
    Shutdown {
        /// Grace period (default [`DEFAULT_SHUTDOWN_TIMEOUT_MS`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// For tests of capsid-vmm's seccomp filters only: the control thread
    /// makes a system call no filter allows, so that the kernel kills the
    /// VMM (SIGSYS). capsid-vmm honours it only when started with
    /// [`TEST_CONTROL_ENV`]`=1`, and refuses it otherwise.
    TestForbiddenSyscall,
}

/// The environment variable that lets capsid-vmm honour test-only
/// requests ([`Request::TestForbiddenSyscall`]) when set to `1`.
pub const TEST_CONTROL_ENV: &str = "CAPSID_VMM_TEST_CONTROL";

impl Request {
    /// The request's `op`, for messages.
    pub fn op(&self) -> &'static str {
        match self {
            Self::BalloonSet { .. } => "balloon_set",
            Self::BalloonStats => "balloon_stats",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Metrics => "metrics",
            Self::Snapshot { .. } => "snapshot",
            Self::Shutdown { .. } => "shutdown",
            Self::TestForbiddenSyscall => "test_forbidden_syscall",
        }
    }
}

/// One answer line: `ok`, the error when not ok, and the operation's
/// fields beside them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out (absent reads as not).
    #[serde(default)]
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The operation's fields.
    #[serde(flatten)]
    pub body: Map<String, Value>,
}

impl Reply {
    /// `{"ok":true}`.
    pub fn done() -> Self {
        Self {
            ok: true,
            error: None,
            body: Map::new(),
        }
    }

    /// `{"ok":false,"error":message}`.
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(message.into()),
            body: Map::new(),
        }
    }

    /// `{"ok":true,...}` with the fields of `body` (a body that is not an
    /// object goes in `result`).
    pub fn with_body<T: Serialize>(body: &T) -> Result<Self, serde_json::Error> {
        let body = match serde_json::to_value(body)? {
            Value::Object(mut fields) => {
                fields.remove("ok");
                fields
            }
            Value::Null => Map::new(),
            other => Map::from_iter([("result".to_string(), other)]),
        };
        Ok(Self {
            ok: true,
            error: None,
            body,
        })
    }

    /// The fields of an ok reply, or the error of a refusal.
    pub fn into_result(self) -> Result<Map<String, Value>, String> {
        if self.ok {
            Ok(self.body)
        } else {
            Err(self.error.unwrap_or_else(|| "no reason given".into()))
        }
    }

    /// The fields read as an operation's reply type.
    pub fn body_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_value(Value::Object(self.body.clone()))
    }
}

/// The answer to `balloon_stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatsReply {
    /// The balloon size the host asked for, 4 KiB pages.
    pub target_pages: u32,
    /// The balloon size the guest has reached, 4 KiB pages.
    pub actual_pages: u32,
    /// `target_pages` in MiB, rounded down.
    #[serde(default)]
    pub target_mib: u64,
    /// `actual_pages` in MiB, rounded down.
    #[serde(default)]
    pub actual_mib: u64,
    /// Whether the guest was asked for fresh statistics.
    #[serde(default)]
    pub refresh_requested: bool,
    /// The guest's last statistics.
    #[serde(default)]
    pub stats: GuestMemoryStats,
    /// What the balloon device has done.
    #[serde(default)]
    pub counters: BalloonCounters,
}

/// The guest's memory statistics, as last reported (virtio 1.2, 5.5.6.3);
/// a figure the guest did not report is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestMemoryStats {
    /// Bytes swapped in.
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    pub swap_out: Option<u64>,
    /// Major page faults.
    pub major_faults: Option<u64>,
    /// Minor page faults.
    pub minor_faults: Option<u64>,
    /// Free memory, bytes.
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    pub total_memory: Option<u64>,
    /// Available memory, bytes.
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    pub disk_caches: Option<u64>,
    /// Successful hugetlb page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb page allocations.
    pub hugetlb_failures: Option<u64>,
}

/// What the balloon device has done since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BalloonCounters {
    /// Pages the guest gave back (inflate), each discarded on the host.
    pub inflated_pages: u64,
    /// Pages the guest took back (deflate).
    pub deflated_pages: u64,
    /// Page frame numbers outside guest memory, skipped.
    pub invalid_pfns: u64,
    /// Bytes of free page reports discarded on the host.
    pub reported_bytes: u64,
    /// Reported ranges outside guest memory or unaligned, skipped.
    pub invalid_reports: u64,
    /// Discards the host refused.
    pub discard_failures: u64,
    /// Chains with device-writable buffers where readable ones belong, or
    /// pointing outside guest memory.
    pub malformed_chains: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// The answer to `snapshot`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Bytes of the memory file (guest RAM; the file is sparse where the
    /// guest's pages were zero).
    pub memory_bytes: u64,
    /// Bytes of guest RAM actually written (pages that were not zero).
    pub memory_written_bytes: u64,
    /// How long the snapshot took, in microseconds.
    pub took_us: u64,
}

/// The answer to `metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsReply {
    /// Per vCPU.
    pub vcpus: Vec<VcpuMetrics>,
    /// Per virtio-mmio device.
    pub devices: Vec<DeviceMetrics>,
    /// Guest RAM regions.
    pub guest_memory: Vec<MemoryRegion>,
    /// When the first vCPU first entered the guest (CLOCK_MONOTONIC ns,
    /// comparable across processes); null before.
    pub first_kvm_run_monotonic_ns: Option<u64>,
}

/// One vCPU's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuMetrics {
    /// Its index.
    pub index: u8,
    /// Its exits by reason.
    pub exits: ExitCounts,
}

/// Exits of one vCPU, by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// HLT exits (only without an in-kernel LAPIC).
    pub hlt: u64,
    /// KVM_RUN interrupted by a signal (pause, shutdown).
    pub interrupted: u64,
    /// Triple faults, failed entries, internal errors, system events.
    pub fatal: u64,
    /// Anything else.
    pub other: u64,
}

/// One virtio-mmio device's place and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMetrics {
    /// The device ("blk", "net", ...).
    pub name: String,
    /// Base address of its MMIO window.
    pub base: u64,
    /// Its interrupt line.
    pub gsi: u32,
    /// Whether the driver has set DRIVER_OK.
    pub activated: bool,
    /// Device events processed (queue kicks and host-side readiness).
    pub events: u64,
    /// Interrupts raised (used buffers and configuration changes).
    pub interrupts: u64,
    /// Device model errors (logged, the device lives on).
    pub device_errors: u64,
    /// Register accesses refused: wrong width, read-only or unknown
    /// register, write at the wrong time.
    pub refused_accesses: u64,
    /// Interrupts that could not be delivered.
    pub interrupt_failures: u64,
}

/// One region of guest RAM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Where the VMM maps it.
    pub host_addr: u64,
    /// Bytes.
    pub size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(request: &Request) -> String {
        serde_json::to_string(request).unwrap()
    }

    #[test]
    fn requests_are_the_json_capsid_vmm_reads() {
        let pinned = [
            (
                Request::Shutdown {
                    timeout_ms: Some(500),
                },
                r#"{"op":"shutdown","timeout_ms":500}"#,
            ),
            (
                Request::Shutdown { timeout_ms: None },
                r#"{"op":"shutdown"}"#,
            ),
            (
                Request::BalloonSet { target_mib: 32 },
                r#"{"op":"balloon_set","target_mib":32}"#,
            ),
            (Request::BalloonStats, r#"{"op":"balloon_stats"}"#),
            (Request::Pause, r#"{"op":"pause"}"#),
            (Request::Resume, r#"{"op":"resume"}"#),
            (Request::Metrics, r#"{"op":"metrics"}"#),
            (
                Request::Snapshot {
                    state: "/s/vm.state".into(),
                    memory: "/s/vm.mem".into(),
                },
                r#"{"op":"snapshot","state":"/s/vm.state","memory":"/s/vm.mem"}"#,
            ),
            (
                Request::TestForbiddenSyscall,
                r#"{"op":"test_forbidden_syscall"}"#,
            ),
        ];
        for (request, json) in pinned {
            assert_eq!(line(&request), json);
            assert_eq!(serde_json::from_str::<Request>(json).unwrap(), request);
            assert_eq!(
                serde_json::from_str::<Value>(json).unwrap()["op"],
                request.op()
            );
        }
    }

    #[test]
    fn requests_parse_leniently_only_where_documented() {
        let r: Request = serde_json::from_str(r#"{"op":"shutdown","timeout_ms":null}"#).unwrap();
        assert_eq!(r, Request::Shutdown { timeout_ms: None });
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"balloon_set","target_mib":1,"x":1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"balloon_set"}"#).is_err());
    }

    #[test]
    fn replies_carry_ok() {
        let json = |r: &Reply| serde_json::to_value(r).unwrap();
        assert_eq!(json(&Reply::done()), json!({"ok": true}));
        assert_eq!(
            json(&Reply::refused("no")),
            json!({"ok": false, "error": "no"})
        );
        assert_eq!(
            json(&Reply::with_body(&json!({"a": 1, "ok": false})).unwrap()),
            json!({"ok": true, "a": 1})
        );
        assert_eq!(json(&Reply::with_body(&()).unwrap()), json!({"ok": true}));
        assert_eq!(
            json(&Reply::with_body(&7).unwrap()),
            json!({"ok": true, "result": 7})
        );
    }

    #[test]
    fn replies_read_back() {
        let r: Reply = serde_json::from_str(r#"{"ok":false,"error":"too big"}"#).unwrap();
        assert_eq!(r.into_result(), Err("too big".to_string()));
        let r: Reply = serde_json::from_str(r#"{"ok":false}"#).unwrap();
        assert_eq!(r.into_result(), Err("no reason given".to_string()));
        let r: Reply = serde_json::from_str(r#"{"result":1}"#).unwrap();
        assert!(!r.ok);
        let r: Reply = serde_json::from_str(r#"{"ok":true,"a":[1]}"#).unwrap();
        assert_eq!(r.into_result().unwrap()["a"], json!([1]));
    }

    #[test]
    fn balloon_stats_reply_is_the_json_clients_read() {
        let stats = BalloonStatsReply {
            target_pages: 16384,
            actual_pages: 8192,
            target_mib: 64,
            actual_mib: 32,
            refresh_requested: true,
            stats: GuestMemoryStats {
                free_memory: Some(1 << 20),
                disk_caches: Some(7),
                ..GuestMemoryStats::default()
            },
            counters: BalloonCounters {
                inflated_pages: 3,
                ..BalloonCounters::default()
            },
        };
        let reply = Reply::with_body(&stats).unwrap();
        let v = serde_json::to_value(&reply).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["target_pages"], 16384);
        assert_eq!(v["actual_mib"], 32);
        assert_eq!(v["refresh_requested"], true);
        assert_eq!(v["stats"]["free_memory"], 1 << 20);
        assert_eq!(v["stats"]["total_memory"], Value::Null);
        assert_eq!(v["counters"]["inflated_pages"], 3);
        let back: Reply = serde_json::from_value(v).unwrap();
        assert_eq!(back.body_as::<BalloonStatsReply>().unwrap(), stats);
        // What older or leaner VMMs send is still read; the pages are not
        // optional.
        let lean: Reply = serde_json::from_str(
            r#"{"ok":true,"target_pages":1,"actual_pages":2,"stats":{"total_memory":null}}"#,
        )
        .unwrap();
        let s = lean.body_as::<BalloonStatsReply>().unwrap();
        assert_eq!(
            (s.target_pages, s.actual_pages, s.stats.total_memory),
            (1, 2, None)
        );
        let bare: Reply = serde_json::from_str(r#"{"ok":true}"#).unwrap();
        assert!(bare.body_as::<BalloonStatsReply>().is_err());
    }

    #[test]
    fn metrics_reply_round_trips() {
        let m = MetricsReply {
            vcpus: vec![VcpuMetrics {
                index: 0,
                exits: ExitCounts {
                    io_out: 2,
                    ..ExitCounts::default()
                },
            }],
            devices: vec![DeviceMetrics {
                name: "blk".into(),
                base: 0xd000_0000,
                gsi: 5,
                activated: true,
                ..DeviceMetrics::default()
            }],
            guest_memory: vec![MemoryRegion {
                guest_addr: 0,
                host_addr: 0x7f00_0000_0000,
                size: 16 << 20,
            }],
            first_kvm_run_monotonic_ns: None,
        };
        let v = serde_json::to_value(Reply::with_body(&m).unwrap()).unwrap();
        assert_eq!(v["vcpus"][0]["exits"]["io_out"], 2);
        assert_eq!(v["devices"][0]["gsi"], 5);
        assert_eq!(v["guest_memory"][0]["size"], 16 << 20);
        assert_eq!(v["first_kvm_run_monotonic_ns"], Value::Null);
        let back: Reply = serde_json::from_value(v).unwrap();
        assert_eq!(back.body_as::<MetricsReply>().unwrap(), m);
    }
}

//! Task metrics in containerd's cgroup v2 format
//! (`io.containerd.cgroups.v2.Metrics`), from the agent's view of the
//! container's cgroup inside the guest, so `ctr task metrics` and the CRI
//! plugin read them as they read runc's.

use capsid_protocol::agent::StatsResponse;
use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField, MessageFull};

/// Errors encoding metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The protobuf encoder failed.
    #[error("cannot encode the container's metrics: this is a shim bug, please report it")]
    Encode(#[source] containerd_shim_protos::protobuf::Error),
}

/// Result of metrics operations.
pub type Result<T> = std::result::Result<T, MetricsError>;

/// The container's cgroup v2 metrics.
pub fn from_agent(stats: &StatsResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(cpu) = stats.cpu.as_ref() {
        m.cpu = MessageField::some(CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            nr_periods: cpu.nr_periods,
            nr_throttled: cpu.nr_throttled,
            throttled_usec: cpu.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = stats.memory.as_ref() {
        // An unlimited cgroup inside the guest is limited by the guest.
        let limit = match (mem.limit_bytes, stats.guest_memory.as_ref()) {
            (0 | u64::MAX, Some(guest)) if guest.total > 0 => guest.total,
            (limit, _) => limit,
        };
        m.memory = MessageField::some(MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: limit,
            anon: mem.anon_bytes,
            file: mem.file_bytes,
            ..Default::default()
        });
        m.memory_events = MessageField::some(MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        });
    }
    if let Some(pids) = stats.pids.as_ref() {
        m.pids = MessageField::some(PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        });
    }
    if let Some(io) = stats.io.as_ref() {
        m.io = MessageField::some(IOStat {
            usage: vec![IOEntry {
                rbytes: io.read_bytes,
                wbytes: io.write_bytes,
                rios: io.read_ios,
                wios: io.write_ios,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    m
}

/// `metrics` as the `Any` a StatsResponse carries.
pub fn to_any(metrics: &Metrics) -> Result<Any> {
    Ok(Any {
        type_url: Metrics::descriptor().full_name().to_string(),
        value: metrics.write_to_bytes().map_err(MetricsError::Encode)?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsid_protocol::agent::{CpuStats, GuestMemInfo, IoStats, MemoryStats, PidsStats};

    #[test]
    fn agent_stats_map_to_cgroup_v2_metrics() {
        let mut s = StatsResponse::new();
        s.cpu = MessageField::some(CpuStats {
            usage_usec: 1500,
            user_usec: 1000,
            system_usec: 500,
            ..Default::default()
        });
        s.memory = MessageField::some(MemoryStats {
            usage_bytes: 4 << 20,
            limit_bytes: u64::MAX,
            anon_bytes: 1 << 20,
            oom_kill_events: 2,
            ..Default::default()
        });
        s.guest_memory = MessageField::some(GuestMemInfo {
            total: 240 << 20,
            ..Default::default()
        });
        s.pids = MessageField::some(PidsStats {
            current: 3,
            limit: 100,
            ..Default::default()
        });
        s.io = MessageField::some(IoStats {
            read_bytes: 7,
            ..Default::default()
        });
        let m = from_agent(&s);
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.memory.usage, 4 << 20);
        assert_eq!(
            m.memory.usage_limit,
            240 << 20,
            "guest RAM bounds an unlimited cgroup"
        );
        assert_eq!(m.memory_events.oom_kill, 2);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.io.usage[0].rbytes, 7);

        let any = to_any(&m).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        assert_eq!(Metrics::parse_from_bytes(&any.value).unwrap(), m);
    }

    #[test]
    fn missing_sections_stay_empty() {
        let m = from_agent(&StatsResponse::new());
        assert!(m.cpu.is_none() && m.memory.is_none() && m.pids.is_none());
    }
}

//! `[memory]`: over-assignment and the balloon policy (docs/memory.md).
//!
//! Read through a loosely typed twin so that a negative, fractional or
//! absurd value gets an error naming its key instead of a bare type error.

use serde::{Deserialize, Serialize};

/// `[memory]` of the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawMemoryConfig")]
pub struct MemoryConfig {
    /// Sandboxes register with the balloon policy (and the start-time
    /// over-assignment check applies).
    pub enabled: bool,
    /// The memory assigned to all sandboxes together may be at most this
    /// many times the host's memory; starting one more is refused.
    pub overcommit_ratio: f64,
    /// Guest-usable memory the policy never goes below, MiB.
    pub floor_mib: u64,
    /// Kept above a guest's working set, MiB.
    pub headroom_mib: u64,
    /// Reclaim when the host's available memory falls below this share.
    pub low_watermark_percent: u32,
    /// Give memory back when the host's available memory is above this share.
    pub high_watermark_percent: u32,
    /// PSI memory `some avg10` (percent) above which the host counts as short.
    pub psi_threshold: u32,
    /// MiB given back per sandbox per round when the host is comfortable.
    pub deflate_step_mib: u64,
    /// How often the policy looks, milliseconds.
    pub interval_ms: u64,
    /// Pretend the host has this many MiB, used by the VMM processes of
    /// the sandboxes (tests, demos); absent: the real host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretend_host_mib: Option<u64>,
}

// Validation keeps the ratio finite, so equality is total.
impl Eq for MemoryConfig {}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            overcommit_ratio: 2.0,
            floor_mib: 128,
            headroom_mib: 64,
            low_watermark_percent: 10,
            high_watermark_percent: 20,
            psi_threshold: 10,
            deflate_step_mib: 64,
            interval_ms: 1000,
            pretend_host_mib: None,
        }
    }
}

/// Largest ratio accepted.
pub const MAX_OVERCOMMIT_RATIO: f64 = 100.0;
/// Largest MiB figure accepted (16 TiB).
const MAX_MIB: i64 = 16 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemoryConfig {
    enabled: Option<bool>,
    overcommit_ratio: Option<f64>,
    floor_mib: Option<i64>,
    headroom_mib: Option<i64>,
    low_watermark_percent: Option<i64>,
    high_watermark_percent: Option<i64>,
    psi_threshold: Option<i64>,
    deflate_step_mib: Option<i64>,
    interval_ms: Option<i64>,
    pretend_host_mib: Option<i64>,
}

fn in_range(key: &str, v: i64, min: i64, max: i64) -> Result<u64, String> {
    if v < min || v > max {
        Err(format!(
            "memory.{key} = {v} is out of range ({min} to {max})"
        ))
    } else {
        u64::try_from(v).map_err(|_| format!("memory.{key} = {v} is negative"))
    }
}

impl TryFrom<RawMemoryConfig> for MemoryConfig {
    type Error = String;

    fn try_from(r: RawMemoryConfig) -> Result<Self, String> {
        let d = Self::default();
        let mib = |key, v: Option<i64>, min, default: u64| match v {
            Some(v) => in_range(key, v, min, MAX_MIB),
            None => Ok(default),
        };
        let pct = |key, v: Option<i64>, default: u32| match v {
            Some(v) => in_range(key, v, 0, 100).map(|v| u32::try_from(v).unwrap_or(100)),
            None => Ok(default),
        };
        let ratio = r.overcommit_ratio.unwrap_or(d.overcommit_ratio);
        if !ratio.is_finite() || ratio <= 0.0 || ratio > MAX_OVERCOMMIT_RATIO {
            return Err(format!(
                "memory.overcommit_ratio = {ratio} is out of range (above 0, at most {MAX_OVERCOMMIT_RATIO})"
            ));
        }
        let c = Self {
            enabled: r.enabled.unwrap_or(d.enabled),
            overcommit_ratio: ratio,
            floor_mib: mib("floor_mib", r.floor_mib, 0, d.floor_mib)?,
            headroom_mib: mib("headroom_mib", r.headroom_mib, 0, d.headroom_mib)?,
            low_watermark_percent: pct(
                "low_watermark_percent",
                r.low_watermark_percent,
                d.low_watermark_percent,
            )?,
            high_watermark_percent: pct(
                "high_watermark_percent",
                r.high_watermark_percent,
                d.high_watermark_percent,
            )?,
            psi_threshold: pct("psi_threshold", r.psi_threshold, d.psi_threshold)?,
            deflate_step_mib: mib(
                "deflate_step_mib",
                r.deflate_step_mib,
                1,
                d.deflate_step_mib,
            )?,
            interval_ms: match r.interval_ms {
                Some(v) => in_range("interval_ms", v, 10, 3_600_000)?,
                None => d.interval_ms,
            },
            pretend_host_mib: r
                .pretend_host_mib
                .map(|v| in_range("pretend_host_mib", v, 1, MAX_MIB))
                .transpose()?,
        };
        if c.low_watermark_percent >= c.high_watermark_percent {
            return Err(format!(
                "memory.low_watermark_percent ({}) must be below memory.high_watermark_percent ({})",
                c.low_watermark_percent, c.high_watermark_percent
            ));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::message;
    use crate::config::Config;

    #[test]
    fn defaults_and_keys() {
        let c = Config::parse("").unwrap();
        assert!(c.memory.enabled);
        assert_eq!(c.memory.pretend_host_mib, None);
        let c = Config::parse(
            "[memory]\novercommit_ratio = 3.5\nfloor_mib = 96\npretend_host_mib = 1024\ninterval_ms = 200\n",
        )
        .unwrap();
        assert_eq!(c.memory.overcommit_ratio, 3.5);
        assert_eq!(c.memory.floor_mib, 96);
        assert_eq!(c.memory.pretend_host_mib, Some(1024));
        assert_eq!(c.memory.interval_ms, 200);
        let text = toml::to_string(&c).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), c);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("floor_mib = -1", "memory.floor_mib"),
            ("headroom_mib = 99999999999", "memory.headroom_mib"),
            ("overcommit_ratio = -2.0", "memory.overcommit_ratio"),
            ("overcommit_ratio = 0.0", "memory.overcommit_ratio"),
            ("overcommit_ratio = nan", "memory.overcommit_ratio"),
            ("overcommit_ratio = inf", "memory.overcommit_ratio"),
            (
                "low_watermark_percent = 101",
                "memory.low_watermark_percent",
            ),
            ("low_watermark_percent = 30", "memory.low_watermark_percent"),
            ("psi_threshold = -5", "memory.psi_threshold"),
            ("deflate_step_mib = 0", "memory.deflate_step_mib"),
            ("interval_ms = 0", "memory.interval_ms"),
            ("pretend_host_mib = 0", "memory.pretend_host_mib"),
        ] {
            let e = Config::parse(&format!("[memory]\n{text}\n")).unwrap_err();
            assert!(message(&e).contains(key), "{text}: {e}");
        }
        let e = Config::parse("[memory]\nfloor = 5\n").unwrap_err();
        assert!(message(&e).contains("floor"), "{e}");
    }
}

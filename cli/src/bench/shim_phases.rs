//! Phases of a `ctr run` with capsid's shim, read from the shim's log
//! lines in containerd's log (each stamped with UTC wall time): from
//! ctr's launch to the shim's Create, the VM (a cold boot, or a pooled
//! sandbox taken and fitted), the container made in it, the process's
//! run, the teardown at Delete, and ctr's exit after it.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The phases of one run, ms; `None` where a milestone was not logged.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ShimPhases {
    /// ctr's launch → the shim's Create (containerd, `shim start`, and
    /// with a pool the claim).
    pub to_create_ms: Option<f64>,
    /// Create → the VM ready for the container: a cold boot, or the
    /// pooled sandbox's network, cgroup and memory fitted.
    pub vm_ms: Option<f64>,
    /// → the container made in the VM (rootfs, spec, runtime helper).
    pub container_ms: Option<f64>,
    /// → the process exited (start, run, exit reported).
    pub run_ms: Option<f64>,
    /// → Delete done (VM stopped, host side undone).
    pub teardown_ms: Option<f64>,
    /// → ctr exited.
    pub ctr_exit_ms: Option<f64>,
}

/// The milestones, in order, as the shim logs them for container `id`.
const MILESTONES: [&[&str]; 5] = [
    &["INFO create "],
    &[
        "INFO sandbox started ",
        "INFO container takes a pooled sandbox ",
    ],
    &["INFO container created "],
    &["INFO process exited "],
    &["INFO deleted "],
];

/// Reads the phases of container `id` from `log` (containerd's), for a
/// ctr launched at `launched` and gone at `exited`.
pub fn read(log: &str, id: &str, launched: SystemTime, exited: SystemTime) -> ShimPhases {
    let tag = format!("container={id} ");
    let tag_end = format!("container={id}");
    let mut at: [Option<f64>; 5] = [None; 5];
    for line in log.lines() {
        if !(line.contains(&tag) || line.ends_with(&tag_end)) {
            continue;
        }
        for (i, words) in MILESTONES.iter().enumerate() {
            if at[i].is_none() && words.iter().any(|w| line.contains(w)) {
                at[i] = line.split_whitespace().next().and_then(unix_seconds);
            }
        }
    }
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs_f64());
    let points = [
        secs(launched),
        at[0],
        at[1],
        at[2],
        at[3],
        at[4],
        secs(exited),
    ];
    let gap = |a: usize, b: usize| match (points[a], points[b]) {
        (Some(x), Some(y)) if y >= x => Some((y - x) * 1000.0),
        _ => None,
    };
    ShimPhases {
        to_create_ms: gap(0, 1),
        vm_ms: gap(1, 2),
        container_ms: gap(2, 3),
        run_ms: gap(3, 4),
        teardown_ms: gap(4, 5),
        ctr_exit_ms: gap(5, 6),
    }
}

/// `2026-12-06T11:09:34.937644Z` (tracing's UTC stamp) as Unix seconds.
fn unix_seconds(stamp: &str) -> Option<f64> {
    let stamp = stamp.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = t.next()?.parse().ok()?;
    #[allow(clippy::cast_precision_loss)]
    let whole = (days_from_civil(y, m, day) * 86_400 + h * 3600 + min * 60) as f64;
    Some(whole + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_are_unix_time() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(unix_seconds("2000-03-01T00:00:01.5Z"), Some(951_868_801.5));
        assert_eq!(unix_seconds("2026-12-06T11:09:34Z"), Some(1_796_555_374.0));
        assert_eq!(unix_seconds("garbage"), None);
    }

    #[test]
    fn phases_follow_the_milestones_of_the_container_only() {
        let log = "\
2026-12-06T11:09:34.9376Z  INFO the task takes a pooled sandbox id=x2 sandbox=w
2026-12-06T11:09:34.9387Z  INFO create container=x2 bundle=/b
2026-12-06T11:09:34.9400Z  INFO create container=x22 bundle=/b
2026-12-06T11:09:34.9526Z  INFO container takes a pooled sandbox container=x2 sandbox=w
2026-12-06T11:09:35.6566Z  INFO container created container=x2 guest_pid=39 host_pid=4317
2026-12-06T11:09:35.9439Z  INFO process exited container=x2 exec= status=0
2026-12-06T11:09:36.0976Z  INFO deleted container=x2
";
        let launched = UNIX_EPOCH + Duration::from_secs_f64(1_796_555_374.9);
        let exited = UNIX_EPOCH + Duration::from_secs_f64(1_796_555_376.1);
        let p = read(log, "x2", launched, exited);
        let near = |v: Option<f64>, want: f64| (v.unwrap() - want).abs() < 0.5;
        assert!(near(p.to_create_ms, 38.7), "{p:?}");
        assert!(near(p.vm_ms, 13.9), "{p:?}");
        assert!(near(p.container_ms, 704.0), "{p:?}");
        assert!(near(p.run_ms, 287.3), "{p:?}");
        assert!(near(p.teardown_ms, 153.7), "{p:?}");
        assert!(near(p.ctr_exit_ms, 2.4), "{p:?}");
        let none = read(log, "y", launched, exited);
        assert_eq!(none.vm_ms, None);
    }
}

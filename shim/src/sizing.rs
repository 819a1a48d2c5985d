//! How big a container's VM is: from the OCI spec's resources, overridden by
//! `io.capsid.*` annotations, with the host config's defaults for the rest.
//!
//! * vCPUs: `io.capsid.vcpus`, else ceil(cpu quota / period), else the default.
//! * RAM: `io.capsid.memory_mib`, else the memory limit plus headroom for the
//!   guest kernel and agent, else the default.

use std::collections::HashMap;

use capsid_sandbox::config::{VmConfig, MAX_VCPUS, MIN_MEMORY_MIB};
use oci_spec::runtime::{LinuxResources, Spec};

/// Annotation overriding the number of vCPUs.
pub const ANNOTATION_VCPUS: &str = "io.capsid.vcpus";
/// Annotation overriding guest RAM, in MiB.
pub const ANNOTATION_MEMORY_MIB: &str = "io.capsid.memory_mib";
/// Annotation opting a sandbox in or out of the balloon policy: `on`
/// (default) or `off` (the host never reclaims its memory).
pub const ANNOTATION_BALLOON_POLICY: &str = "io.capsid.balloon.policy";
/// Guest RAM added to a container's memory limit for the guest kernel, the
/// agent and page tables.
pub const MEMORY_HEADROOM_MIB: u32 = 64;

/// Errors sizing a VM.
#[derive(Debug, thiserror::Error)]
pub enum SizingError {
    /// An annotation is not a number in range.
    #[error("annotation {key}={value:?}: {reason}")]
    Annotation {
        /// The annotation.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The spec's resources ask for something no VM can be.
    #[error("OCI spec resources: {0}")]
    Resources(String),
    /// An update asks for more than the running VM has.
    #[error("the VM's size is fixed when it boots: {0}")]
    Fixed(String),
}

/// Result of sizing.
pub type Result<T> = std::result::Result<T, SizingError>;

/// The size of one sandbox VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
}

/// Sizes the VM for `spec`, with `defaults` from the host config.
pub fn vm_size(spec: &Spec, defaults: &VmConfig) -> Result<VmSize> {
    let empty = HashMap::new();
    let annotations = spec.annotations().as_ref().unwrap_or(&empty);
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());

    let vcpus = match annotation(annotations, ANNOTATION_VCPUS, 1, MAX_VCPUS)? {
        Some(v) => v,
        None => {
            let cpu = resources.and_then(|r| r.cpu().as_ref());
            match (cpu.and_then(|c| c.quota()), cpu.and_then(|c| c.period())) {
                (Some(quota), Some(period)) if quota > 0 && period > 0 => {
                    let quota = quota.unsigned_abs();
                    let n = quota.div_ceil(period);
                    u32::try_from(n)
                        .ok()
                        .filter(|n| *n <= MAX_VCPUS)
                        .ok_or_else(|| {
                            SizingError::Resources(format!(
                                "cpu quota {quota}/{period} needs {n} vCPUs, more than {MAX_VCPUS}"
                            ))
                        })?
                }
                _ => defaults.vcpus,
            }
        }
    };

    let memory_mib = match annotation(annotations, ANNOTATION_MEMORY_MIB, MIN_MEMORY_MIB, u32::MAX)?
    {
        Some(m) => m,
        None => match resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
        {
            Some(limit) if limit > 0 => {
                let limit_mib = limit.unsigned_abs().div_ceil(1 << 20);
                u32::try_from(limit_mib)
                    .ok()
                    .and_then(|m| m.checked_add(MEMORY_HEADROOM_MIB))
                    .ok_or_else(|| {
                        SizingError::Resources(format!("memory limit {limit} bytes is too large"))
                    })?
                    .max(MIN_MEMORY_MIB)
            }
            _ => defaults.memory_mib,
        },
    };
    Ok(VmSize { vcpus, memory_mib })
}

/// Refuses a resource update the running VM cannot follow: limits must fit
/// in its vCPUs and RAM, and the `io.capsid.*` size annotations cannot change.
pub fn check_update(
    resources: &LinuxResources,
    annotations: &HashMap<String, String>,
    size: VmSize,
) -> Result<()> {
    if let Some(limit) = resources
        .memory()
        .as_ref()
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
    {
        let room = u64::from(size.memory_mib.saturating_sub(MEMORY_HEADROOM_MIB)) << 20;
        if limit.unsigned_abs() > room {
            return Err(SizingError::Fixed(format!(
                "a memory limit of {} MiB does not fit in the VM's {} MiB \
                 (at most {} MiB for the container)",
                limit.unsigned_abs().div_ceil(1 << 20),
                size.memory_mib,
                room >> 20
            )));
        }
    }
    let cpu = resources.cpu().as_ref();
    if let (Some(quota), Some(period)) = (cpu.and_then(|c| c.quota()), cpu.and_then(|c| c.period()))
    {
        if quota > 0 && period > 0 && quota.unsigned_abs().div_ceil(period) > u64::from(size.vcpus)
        {
            return Err(SizingError::Fixed(format!(
                "a CPU quota of {quota}/{period} needs more than the VM's {} vCPUs",
                size.vcpus
            )));
        }
    }
    for (key, current) in [
        (ANNOTATION_VCPUS, size.vcpus),
        (ANNOTATION_MEMORY_MIB, size.memory_mib),
    ] {
        if let Some(value) = annotations.get(key) {
            if value.trim().parse::<u32>().ok() != Some(current) {
                return Err(SizingError::Fixed(format!(
                    "{key} cannot change from {current} to {value:?}"
                )));
            }
        }
    }
    Ok(())
}

fn annotation(
    annotations: &HashMap<String, String>,
    key: &'static str,
    min: u32,
    max: u32,
) -> Result<Option<u32>> {
    let Some(value) = annotations.get(key) else {
        return Ok(None);
    };
    let n: u32 = value.trim().parse().map_err(|_| SizingError::Annotation {
        key,
        value: value.clone(),
        reason: "not a whole number".into(),
    })?;
    if !(min..=max).contains(&n) {
        return Err(SizingError::Annotation {
            key,
            value: value.clone(),
            reason: format!("must be between {min} and {max}"),
        });
    }
    Ok(Some(n))
}

/// Whether the balloon policy may reclaim memory from `spec`'s sandbox.
pub fn balloon_policy(spec: &Spec) -> Result<bool> {
    let value = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_BALLOON_POLICY));
    match value.map(String::as_str) {
        None | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(SizingError::Annotation {
            key: ANNOTATION_BALLOON_POLICY,
            value: other.to_string(),
            reason: "expected on or off".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    const BASE: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}"#;

    #[test]
    fn balloon_policy_annotation() {
        let s = spec(&format!("{BASE}}}"));
        assert!(balloon_policy(&s).unwrap());
        let with = |v: &str| {
            spec(&format!(
                r#"{BASE},"annotations":{{"io.capsid.balloon.policy":"{v}"}}}}"#
            ))
        };
        assert!(balloon_policy(&with("on")).unwrap());
        assert!(!balloon_policy(&with("off")).unwrap());
        let e = balloon_policy(&with("maybe")).unwrap_err();
        assert!(e.to_string().contains("io.capsid.balloon.policy"), "{e}");
    }

    #[test]
    fn defaults_when_nothing_is_said() {
        let s = spec(&format!("{BASE}}}"));
        let size = vm_size(&s, &VmConfig::default()).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
    }

    #[test]
    fn resources_set_the_size() {
        let s = spec(&format!(
            r#"{BASE},"linux":{{"resources":{{"cpu":{{"quota":150000,"period":100000}},
            "memory":{{"limit":134217728}}}}}}}}"#
        ));
        let size = vm_size(&s, &VmConfig::default()).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 2,
                memory_mib: 128 + MEMORY_HEADROOM_MIB
            }
        );
    }

    #[test]
    fn annotations_win() {
        let s = spec(&format!(
            r#"{BASE},"annotations":{{"io.capsid.vcpus":"3","io.capsid.memory_mib":"512"}},
            "linux":{{"resources":{{"memory":{{"limit":134217728}}}}}}}}"#
        ));
        let size = vm_size(&s, &VmConfig::default()).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 3,
                memory_mib: 512
            }
        );
    }

    #[test]
    fn bad_annotations_are_named() {
        for (value, why) in [
            ("lots", "not a whole number"),
            ("0", "between"),
            ("99", "between"),
        ] {
            let s = spec(&format!(
                r#"{BASE},"annotations":{{"io.capsid.vcpus":"{value}"}}}}"#
            ));
            let e = vm_size(&s, &VmConfig::default()).unwrap_err().to_string();
            assert!(e.contains("io.capsid.vcpus") && e.contains(why), "{e}");
        }
        let s = spec(&format!(
            r#"{BASE},"annotations":{{"io.capsid.memory_mib":"8"}}}}"#
        ));
        let e = vm_size(&s, &VmConfig::default()).unwrap_err().to_string();
        assert!(e.contains("io.capsid.memory_mib"), "{e}");
    }

    #[test]
    fn updates_must_fit_the_vm() {
        let size = VmSize {
            vcpus: 2,
            memory_mib: 256,
        };
        let res = |json: &str| -> LinuxResources { serde_json::from_str(json).unwrap() };
        let none = HashMap::new();
        check_update(&res(r#"{"memory":{"limit":134217728}}"#), &none, size).unwrap();
        check_update(
            &res(r#"{"cpu":{"quota":200000,"period":100000}}"#),
            &none,
            size,
        )
        .unwrap();
        check_update(&res(r#"{"pids":{"limit":10}}"#), &none, size).unwrap();
        let e = check_update(&res(r#"{"memory":{"limit":1073741824}}"#), &none, size)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1024 MiB does not fit in the VM's 256 MiB"),
            "{e}"
        );
        let e = check_update(
            &res(r#"{"cpu":{"quota":300000,"period":100000}}"#),
            &none,
            size,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("2 vCPUs"), "{e}");
        let grow: HashMap<String, String> =
            [(ANNOTATION_VCPUS.to_string(), "4".to_string())].into();
        let e = check_update(&res("{}"), &grow, size)
            .unwrap_err()
            .to_string();
        assert!(e.contains("io.capsid.vcpus cannot change from 2"), "{e}");
        let same: HashMap<String, String> =
            [(ANNOTATION_MEMORY_MIB.to_string(), "256".to_string())].into();
        check_update(&res("{}"), &same, size).unwrap();
    }

    #[test]
    fn unlimited_quota_uses_default() {
        let s = spec(&format!(
            r#"{BASE},"linux":{{"resources":{{"cpu":{{"quota":-1,"period":100000}}}}}}}}"#
        ));
        assert_eq!(vm_size(&s, &VmConfig::default()).unwrap().vcpus, 1);
    }
}

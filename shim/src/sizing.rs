//! How big a container's VM is: from the OCI spec's resources, overridden by
//! `io.capsid.*` annotations, with the host config's defaults for the rest.
//!
//! * vCPUs: `io.capsid.vcpus`, else ceil(cpu quota / period), else the default.
//! * RAM: `io.capsid.memory_mib`, else the memory limit plus headroom for the
//!   guest kernel and agent, else the default.
//!
//! The spec is the tenant's word (in Kubernetes it writes pod annotations
//! and limits), so the host's `[vm.policy]` bounds it: only the annotations
//! it allows, no unknown `io.capsid.*` one (a typo must not silently mean
//! the default), and no VM larger than its maxima, whichever part of the
//! spec asked for the size.

use std::collections::HashMap;

use capsid_sandbox::config::policy::{ANNOTATION_PREFIX, KNOWN_ANNOTATIONS};
use capsid_sandbox::config::{PodConfig, PolicyConfig, VmConfig, MAX_VCPUS, MIN_MEMORY_MIB};
use oci_spec::runtime::{LinuxResources, Spec};

pub use capsid_sandbox::config::policy::{
    ANNOTATION_BALLOON_POLICY, ANNOTATION_MEMORY_MIB, ANNOTATION_VCPUS,
};
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
    /// An `io.capsid.*` annotation capsid does not know.
    #[error("unknown annotation {key}={value:?} (capsid knows {known})")]
    UnknownAnnotation {
        /// The annotation, escaped to one line.
        key: String,
        /// Its value.
        value: String,
        /// The annotations capsid knows.
        known: String,
    },
    /// An annotation the host's `[vm.policy]` does not let specs use.
    #[error(
        "annotation {key}={value:?} is not allowed by this host's policy (allowed: {allowed})"
    )]
    NotAllowed {
        /// The annotation.
        key: &'static str,
        /// Its value.
        value: String,
        /// The annotations the policy allows.
        allowed: String,
    },
    /// The spec asks for a VM larger than the host's `[vm.policy]` allows.
    #[error(
        "the VM would have {size} (from {from}), more than this host's policy allows \
         ([vm.policy] {key} = {max})"
    )]
    AbovePolicy {
        /// The size asked for, with its unit.
        size: String,
        /// Which part of the spec asked for it.
        from: String,
        /// The policy key that bounds it.
        key: &'static str,
        /// Its value.
        max: u32,
    },
    /// An update asks for more than the running VM has.
    #[error("the VM's size is fixed when it boots: {0}")]
    Fixed(String),
    /// A pod is larger than the most its VM may grow to.
    #[error(
        "the pod's VM would have {size_mib} MiB of RAM (from {from}), more than this host lets \
         a pod's VM grow to ([pod] max_memory_mib = {max_mib})"
    )]
    AbovePodMax {
        /// The pod's size.
        size_mib: u32,
        /// Which part of the spec asked for it.
        from: String,
        /// `[pod] max_memory_mib`.
        max_mib: u32,
    },
    /// A pod's containers' limits need more than its VM may grow to.
    #[error(
        "a memory limit of {limit_mib} MiB does not fit in the pod's VM: its containers' limits \
         would total {total_mib} MiB, which with {MEMORY_HEADROOM_MIB} MiB for the guest needs \
         {needed_mib} MiB, more than the {vm_max_mib} MiB the pod's VM may grow to ({why})"
    )]
    PastPodMax {
        /// The container's limit.
        limit_mib: u64,
        /// The pod's containers' limits with it.
        total_mib: u64,
        /// What the VM would need.
        needed_mib: u64,
        /// The most the pod's VM may have.
        vm_max_mib: u32,
        /// Where that maximum comes from.
        why: String,
    },
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

/// Sizes the VM for `spec`, with `defaults` from the host config, and
/// holds the spec to the host's policy (`defaults.policy`): this is where
/// Create refuses an `io.capsid.*` annotation the policy does not allow,
/// the balloon opt-out included, before anything is made.
pub fn vm_size(spec: &Spec, defaults: &VmConfig) -> Result<VmSize> {
    let empty = HashMap::new();
    let annotations = spec.annotations().as_ref().unwrap_or(&empty);
    // A pod's VM is sized from the pod's resources, which the CRI plugin
    // writes as annotations on the pod sandbox's spec (kubelet's sum of
    // the pod's limits); its own resources are the pause process's.
    let pod = pod_resources(annotations)?;
    let resources = pod
        .as_ref()
        .or_else(|| spec.linux().as_ref().and_then(|l| l.resources().as_ref()));
    let policy = &defaults.policy;
    check_annotations(annotations, policy)?;

    let (vcpus, vcpus_from) = match annotation(annotations, ANNOTATION_VCPUS, 1, MAX_VCPUS)? {
        Some(v) => (v, format!("annotation {ANNOTATION_VCPUS}={v}")),
        None => {
            let cpu = resources.and_then(|r| r.cpu().as_ref());
            match (cpu.and_then(|c| c.quota()), cpu.and_then(|c| c.period())) {
                (Some(quota), Some(period)) if quota > 0 && period > 0 => {
                    let quota = quota.unsigned_abs();
                    let n = quota.div_ceil(period);
                    let n = u32::try_from(n)
                        .ok()
                        .filter(|n| *n <= MAX_VCPUS)
                        .ok_or_else(|| {
                            SizingError::Resources(format!(
                                "cpu quota {quota}/{period} needs {n} vCPUs, more than {MAX_VCPUS}"
                            ))
                        })?;
                    (n, format!("the OCI cpu quota {quota}/{period}"))
                }
                _ => (defaults.vcpus, "the [vm] default".into()),
            }
        }
    };
    if vcpus > policy.max_vcpus {
        return Err(SizingError::AbovePolicy {
            size: format!("{vcpus} vCPUs"),
            from: vcpus_from,
            key: "max_vcpus",
            max: policy.max_vcpus,
        });
    }

    let (memory_mib, memory_from) =
        match annotation(annotations, ANNOTATION_MEMORY_MIB, MIN_MEMORY_MIB, u32::MAX)? {
            Some(m) => (m, format!("annotation {ANNOTATION_MEMORY_MIB}={m}")),
            None => match resources
                .and_then(|r| r.memory().as_ref())
                .and_then(|m| m.limit())
            {
                Some(limit) if limit > 0 => {
                    let limit_mib = limit.unsigned_abs().div_ceil(1 << 20);
                    let m = u32::try_from(limit_mib)
                        .ok()
                        .and_then(|m| m.checked_add(MEMORY_HEADROOM_MIB))
                        .ok_or_else(|| {
                            SizingError::Resources(format!(
                                "memory limit {limit} bytes is too large"
                            ))
                        })?
                        .max(MIN_MEMORY_MIB);
                    (
                        m,
                        format!(
                            "the OCI memory limit of {limit_mib} MiB \
                             and {MEMORY_HEADROOM_MIB} MiB for the guest"
                        ),
                    )
                }
                _ => (defaults.memory_mib, "the [vm] default".into()),
            },
        };
    if memory_mib > policy.max_memory_mib {
        return Err(SizingError::AbovePolicy {
            size: format!("{memory_mib} MiB of RAM"),
            from: memory_from,
            key: "max_memory_mib",
            max: policy.max_memory_mib,
        });
    }
    Ok(VmSize { vcpus, memory_mib })
}

/// The CRI plugin's pod sizing annotations on a pod sandbox's spec.
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// The pod's CPU quota (with [`SANDBOX_CPU_PERIOD`]).
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// The pod's CPU period.
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// The pod's resources from a pod sandbox's CRI annotations, when the pod
/// gave any (0 or absent: none).
fn pod_resources(annotations: &HashMap<String, String>) -> Result<Option<LinuxResources>> {
    let number = |key: &'static str| -> Result<Option<i64>> {
        match annotations.get(key) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<i64>()
                .map(|n| (n > 0).then_some(n))
                .map_err(|_| SizingError::Annotation {
                    key,
                    value: v.clone(),
                    reason: "not a whole number".into(),
                }),
        }
    };
    let memory = number(SANDBOX_MEMORY)?;
    let quota = number(SANDBOX_CPU_QUOTA)?;
    let period = number(SANDBOX_CPU_PERIOD)?.and_then(|p| u64::try_from(p).ok());
    if memory.is_none() && quota.is_none() {
        return Ok(None);
    }
    let mut resources = LinuxResources::default();
    if let Some(limit) = memory {
        let mut m = oci_spec::runtime::LinuxMemory::default();
        m.set_limit(Some(limit));
        resources.set_memory(Some(m));
    }
    if let (Some(quota), Some(period)) = (quota, period) {
        let mut c = oci_spec::runtime::LinuxCpu::default();
        c.set_quota(Some(quota));
        c.set_period(Some(period));
        resources.set_cpu(Some(c));
    }
    Ok(Some(resources))
}

/// The most guest RAM a pod's VM of `size` may grow to, MiB: `[pod]
/// max_memory_mib` (0: the pod's own size, no growth). A pod larger than
/// the maximum is refused, naming the key.
pub fn pod_max_memory(size: VmSize, spec: &Spec, pod: &PodConfig) -> Result<u32> {
    if pod.max_memory_mib == 0 {
        return Ok(size.memory_mib);
    }
    if size.memory_mib > pod.max_memory_mib {
        let annotations = spec.annotations().clone().unwrap_or_default();
        let from = if annotations.contains_key(ANNOTATION_MEMORY_MIB) {
            format!("annotation {ANNOTATION_MEMORY_MIB}")
        } else if annotations.contains_key(SANDBOX_MEMORY) {
            format!("{SANDBOX_MEMORY} and {MEMORY_HEADROOM_MIB} MiB for the guest")
        } else {
            "the [vm] default".into()
        };
        return Err(SizingError::AbovePodMax {
            size_mib: size.memory_mib,
            from,
            max_mib: pod.max_memory_mib,
        });
    }
    Ok(pod.max_memory_mib)
}

/// A memory limit in MiB (rounded up), when `resources` set one.
pub fn memory_limit_mib(resources: &LinuxResources) -> Option<u64> {
    resources
        .memory()
        .as_ref()
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| l.unsigned_abs().div_ceil(1 << 20))
}

/// The pod container's memory limit in MiB, when its spec sets one.
pub fn spec_memory_limit_mib(spec: &Spec) -> Option<u64> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(memory_limit_mib)
}

/// What the guest of a pod's VM of `vm_mib` may use for the pod to have
/// `size_mib`, MiB: the size, plus the page descriptors the guest kernel
/// keeps for the RAM held in the balloon (64 bytes per 4 KiB page, 1/64),
/// so that the pod has what a VM booted at its size would have. The
/// balloon holds the rest. With `hotplug` (the VM boots with only whole
/// blocks of what it uses, capsid_sandbox::hotplug) the kernel describes
/// only those blocks, so only their part past the size is made up for.
pub fn pod_vm_usable(size_mib: u32, vm_mib: u32, hotplug: bool) -> u32 {
    let described = if hotplug {
        capsid_sandbox::hotplug::present_for(size_mib).min(vm_mib)
    } else {
        vm_mib
    };
    let reserve = described.saturating_sub(size_mib);
    size_mib.saturating_add(reserve / 64).min(vm_mib)
}

/// The guest RAM a pod's VM needs for its containers' memory limits
/// totalling `limits_mib`: the limits plus the guest's headroom.
pub fn pod_memory_needed(limits_mib: u64) -> u64 {
    limits_mib.saturating_add(u64::from(MEMORY_HEADROOM_MIB))
}

/// How a pod's VM must change for `limits_mib` (its containers' memory
/// limits, the new one included, which is `limit_mib`): `None` when its
/// `usable_mib` suffices, else the size to grow to, refused past
/// `vm_max_mib` (`config_max_mib` is `[pod] max_memory_mib`, named in the
/// error).
pub fn pod_growth(
    limits_mib: u64,
    limit_mib: u64,
    usable_mib: u32,
    vm_max_mib: u32,
    config_max_mib: u32,
) -> Result<Option<u32>> {
    let needed = pod_memory_needed(limits_mib);
    if needed <= u64::from(usable_mib) {
        return Ok(None);
    }
    match u32::try_from(needed).ok().filter(|n| *n <= vm_max_mib) {
        Some(n) => Ok(Some(n)),
        None => Err(SizingError::PastPodMax {
            limit_mib,
            total_mib: limits_mib,
            needed_mib: needed,
            vm_max_mib,
            why: if config_max_mib == 0 {
                "[pod] max_memory_mib = 0: pods do not grow".into()
            } else if vm_max_mib < config_max_mib {
                format!("the pod's VM booted when [pod] max_memory_mib was {vm_max_mib}")
            } else {
                format!("[pod] max_memory_mib = {config_max_mib}")
            },
        }),
    }
}

/// Refuses a pod container whose CPU quota does not fit in its pod's VM
/// (its memory limit grows the VM instead: [`pod_growth`]).
pub fn check_fits_pod(spec: &Spec, pod: VmSize) -> Result<()> {
    match spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
        Some(resources) => check_cpu(resources, pod),
        None => Ok(()),
    }
}

/// Refuses an `io.capsid.*` annotation capsid does not know or `policy`
/// does not allow; other annotations are not capsid's business. Keys are
/// looked at in order, so that the error names the same one every time.
fn check_annotations(annotations: &HashMap<String, String>, policy: &PolicyConfig) -> Result<()> {
    let mut keys: Vec<&String> = annotations
        .keys()
        .filter(|k| {
            k.get(..ANNOTATION_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(ANNOTATION_PREFIX))
        })
        .collect();
    keys.sort();
    for key in keys {
        let value = annotations.get(key).cloned().unwrap_or_default();
        let Some(known) = KNOWN_ANNOTATIONS.iter().copied().find(|k| k == key) else {
            return Err(SizingError::UnknownAnnotation {
                key: key.escape_debug().to_string(),
                value,
                known: KNOWN_ANNOTATIONS.join(", "),
            });
        };
        if !policy.allows(known) {
            return Err(SizingError::NotAllowed {
                key: known,
                value,
                allowed: policy.allowed_list(),
            });
        }
    }
    Ok(())
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
    check_update_in_pod(resources, annotations, size)
}

/// [`check_update`] for a pod's container: its memory limit grows the
/// pod's VM ([`pod_growth`]); its CPU quota must fit in the VM's vCPUs and
/// the `io.capsid.*` size annotations cannot change from `size`, the size
/// the VM booted with.
pub fn check_update_in_pod(
    resources: &LinuxResources,
    annotations: &HashMap<String, String>,
    size: VmSize,
) -> Result<()> {
    check_cpu(resources, size)?;
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

/// Refuses a CPU quota that needs more than the VM's vCPUs.
fn check_cpu(resources: &LinuxResources, size: VmSize) -> Result<()> {
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
/// Whether the spec may carry the opt-out at all is the policy's call,
/// made in [`vm_size`].
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
    fn a_pods_vm_is_sized_from_the_pods_annotations() {
        let s = spec(&format!(
            r#"{BASE},"annotations":{{"io.kubernetes.cri.sandbox-memory":"268435456","io.kubernetes.cri.sandbox-cpu-quota":"150000","io.kubernetes.cri.sandbox-cpu-period":"100000"}},"linux":{{"resources":{{"memory":{{"limit":1048576}}}}}}}}"#
        ));
        let size = vm_size(&s, &VmConfig::default()).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 2,
                memory_mib: 256 + MEMORY_HEADROOM_MIB
            }
        );
        // None given (0 is none): the [vm] defaults.
        let s = spec(&format!(
            r#"{BASE},"annotations":{{"io.kubernetes.cri.sandbox-memory":"0"}}}}"#
        ));
        assert_eq!(
            vm_size(&s, &VmConfig::default()).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        let s = spec(&format!(
            r#"{BASE},"annotations":{{"io.kubernetes.cri.sandbox-memory":"lots"}}}}"#
        ));
        let e = vm_size(&s, &VmConfig::default()).unwrap_err();
        assert!(e.to_string().contains("sandbox-memory"), "{e}");
        // A container's memory limit grows the pod's VM; a CPU quota past
        // its vCPUs is refused.
        let member = spec(&format!(
            r#"{BASE},"linux":{{"resources":{{"memory":{{"limit":536870912}}}}}}}}"#
        ));
        check_fits_pod(&member, size).unwrap();
        let member = spec(&format!(
            r#"{BASE},"linux":{{"resources":{{"cpu":{{"quota":300000,"period":100000}}}}}}}}"#
        ));
        let e = check_fits_pod(&member, size).unwrap_err();
        assert!(
            e.to_string().contains("needs more than the VM's 2 vCPUs"),
            "{e}"
        );
    }

    #[test]
    fn a_pods_maximum_bounds_its_size() {
        let size = |m| VmSize {
            vcpus: 1,
            memory_mib: m,
        };
        let pod = PodConfig::default();
        let s = spec(&format!(
            r#"{BASE},"annotations":{{"io.kubernetes.cri.sandbox-memory":"4294967296"}}}}"#
        ));
        assert_eq!(pod_max_memory(size(320), &s, &pod).unwrap(), 1024);
        assert_eq!(pod_max_memory(size(1024), &s, &pod).unwrap(), 1024);
        let e = pod_max_memory(size(4160), &s, &pod).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the pod's VM would have 4160 MiB of RAM (from io.kubernetes.cri.sandbox-memory \
             and 64 MiB for the guest), more than this host lets a pod's VM grow to \
             ([pod] max_memory_mib = 1024)"
        );
        let fixed = PodConfig { max_memory_mib: 0 };
        assert_eq!(pod_max_memory(size(4160), &s, &fixed).unwrap(), 4160);
    }

    #[test]
    fn a_pods_guest_gets_the_page_descriptors_of_its_reserve() {
        assert_eq!(pod_vm_usable(192, 2048, false), 192 + 29);
        assert_eq!(pod_vm_usable(2048, 2048, false), 2048);
        assert_eq!(pod_vm_usable(320, 320, false), 320);
        assert_eq!(pod_vm_usable(8192, 2048, false), 2048);
        // Booted with 256 of 2048: only 64 MiB past the size is described.
        assert_eq!(pod_vm_usable(192, 2048, true), 193);
        assert_eq!(pod_vm_usable(2048, 2048, true), 2048);
    }

    #[test]
    fn a_pod_grows_by_what_its_limits_need_up_to_its_maximum() {
        // 256 + 64 usable: limits up to 256 fit.
        assert_eq!(pod_growth(256, 64, 320, 2048, 2048).unwrap(), None);
        // 100 + 200 + 300 = 600 MiB of limits: 664 MiB.
        assert_eq!(pod_growth(600, 300, 320, 2048, 2048).unwrap(), Some(664));
        // Right at the maximum, then one past it.
        assert_eq!(pod_growth(1984, 1000, 664, 2048, 2048).unwrap(), Some(2048));
        let e = pod_growth(1985, 1001, 664, 2048, 2048).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a memory limit of 1001 MiB does not fit in the pod's VM: its containers' limits \
             would total 1985 MiB, which with 64 MiB for the guest needs 2049 MiB, more than \
             the 2048 MiB the pod's VM may grow to ([pod] max_memory_mib = 2048)"
        );
        let e = pod_growth(u64::MAX, 1, 664, 2048, 2048).unwrap_err();
        assert!(matches!(e, SizingError::PastPodMax { .. }), "{e}");
        let e = pod_growth(400, 400, 320, 320, 0).unwrap_err().to_string();
        assert!(
            e.ends_with("([pod] max_memory_mib = 0: pods do not grow)"),
            "{e}"
        );
        // Limits in MiB, rounded up; none, 0 and -1 are no limit.
        let res = |json: &str| -> LinuxResources { serde_json::from_str(json).unwrap() };
        assert_eq!(memory_limit_mib(&res(r#"{"memory":{"limit":1}}"#)), Some(1));
        assert_eq!(
            memory_limit_mib(&res(r#"{"memory":{"limit":134217728}}"#)),
            Some(128)
        );
        for none in [
            "{}",
            r#"{"memory":{"limit":0}}"#,
            r#"{"memory":{"limit":-1}}"#,
        ] {
            assert_eq!(memory_limit_mib(&res(none)), None, "{none}");
        }
        // In a pod, an update's memory is the pod's business; its CPU and
        // the size annotations are checked as before.
        let size = VmSize {
            vcpus: 2,
            memory_mib: 320,
        };
        let none = HashMap::new();
        check_update_in_pod(&res(r#"{"memory":{"limit":1073741824}}"#), &none, size).unwrap();
        assert!(check_update_in_pod(
            &res(r#"{"cpu":{"quota":300000,"period":100000}}"#),
            &none,
            size
        )
        .is_err());
    }

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

    fn with_annotations(pairs: &[(&str, &str)]) -> Spec {
        let mut s = spec(&format!("{BASE}}}"));
        s.set_annotations(Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        s
    }

    fn policy(allowed: &[&str]) -> VmConfig {
        let mut vm = VmConfig::default();
        vm.policy.allowed_annotations = allowed.iter().map(|a| a.to_string()).collect();
        vm
    }

    #[test]
    fn the_balloon_opt_out_is_refused_unless_allowed() {
        let s = with_annotations(&[(ANNOTATION_BALLOON_POLICY, "off")]);
        let e = vm_size(&s, &VmConfig::default()).unwrap_err();
        assert!(matches!(e, SizingError::NotAllowed { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "annotation io.capsid.balloon.policy=\"off\" is not allowed by this host's policy \
             (allowed: io.capsid.vcpus, io.capsid.memory_mib)"
        );
        let vm = policy(&[ANNOTATION_BALLOON_POLICY]);
        assert_eq!(vm_size(&s, &vm).unwrap().vcpus, 1);
        assert!(!balloon_policy(&s).unwrap());
    }

    #[test]
    fn size_annotations_obey_the_allow_list() {
        let s = with_annotations(&[(ANNOTATION_VCPUS, "2")]);
        assert_eq!(vm_size(&s, &VmConfig::default()).unwrap().vcpus, 2);
        let e = vm_size(&s, &policy(&[ANNOTATION_MEMORY_MIB]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("io.capsid.vcpus=\"2\" is not allowed")
                && e.ends_with("(allowed: io.capsid.memory_mib)"),
            "{e}"
        );
        let e = vm_size(&s, &policy(&[])).unwrap_err().to_string();
        assert!(e.ends_with("(allowed: none)"), "{e}");
    }

    #[test]
    fn unknown_capsid_annotations_are_refused() {
        for key in ["io.capsid.vcpu", "IO.Capsid.vcpus", "io.capsid.balloon"] {
            let s = with_annotations(&[(key, "2")]);
            let e = vm_size(&s, &policy(&KNOWN_ANNOTATIONS)).unwrap_err();
            assert!(matches!(e, SizingError::UnknownAnnotation { .. }), "{e}");
            assert_eq!(
                e.to_string(),
                format!(
                    "unknown annotation {key}=\"2\" (capsid knows io.capsid.vcpus, \
                     io.capsid.memory_mib, io.capsid.balloon.policy)"
                )
            );
        }
        // Tenant text stays on one line.
        let s = with_annotations(&[("io.capsid.x\ny", "a\nb")]);
        let e = vm_size(&s, &VmConfig::default()).unwrap_err().to_string();
        assert!(
            !e.contains('\n') && e.starts_with(r#"unknown annotation io.capsid.x\ny="a\nb""#),
            "{e}"
        );
        // The first bad key in order is named, every time.
        let s = with_annotations(&[
            ("io.capsid.zzz", "1"),
            (ANNOTATION_BALLOON_POLICY, "off"),
            ("io.capsid.aaa", "1"),
        ]);
        let e = vm_size(&s, &VmConfig::default()).unwrap_err().to_string();
        assert!(e.starts_with("unknown annotation io.capsid.aaa="), "{e}");
    }

    #[test]
    fn other_annotations_are_ignored() {
        let s = with_annotations(&[
            ("io.kubernetes.cri.sandbox-id", "x"),
            ("io.capsidx.vcpus", "99"),
            ("io.capsid", "99"),
            ("nerdctl/name", "y"),
        ]);
        assert_eq!(
            vm_size(&s, &policy(&[])).unwrap(),
            vm_size(&spec(&format!("{BASE}}}")), &VmConfig::default()).unwrap()
        );
    }

    #[test]
    fn sizes_above_the_policy_are_refused_whatever_asks() {
        let vm = VmConfig::default();
        // Right at the maxima is fine.
        let s = with_annotations(&[(ANNOTATION_VCPUS, "8"), (ANNOTATION_MEMORY_MIB, "8192")]);
        assert_eq!(
            vm_size(&s, &vm).unwrap(),
            VmSize {
                vcpus: 8,
                memory_mib: 8192
            }
        );
        let cases = [
            (
                r#""annotations":{"io.capsid.vcpus":"9"}"#,
                "the VM would have 9 vCPUs (from annotation io.capsid.vcpus=9), more than \
                 this host's policy allows ([vm.policy] max_vcpus = 8)",
            ),
            (
                r#""annotations":{"io.capsid.memory_mib":"4294967295"}"#,
                "the VM would have 4294967295 MiB of RAM (from annotation \
                 io.capsid.memory_mib=4294967295), more than this host's policy allows \
                 ([vm.policy] max_memory_mib = 8192)",
            ),
            (
                r#""linux":{"resources":{"cpu":{"quota":1600000,"period":100000}}}"#,
                "the VM would have 16 vCPUs (from the OCI cpu quota 1600000/100000), more \
                 than this host's policy allows ([vm.policy] max_vcpus = 8)",
            ),
            (
                r#""linux":{"resources":{"memory":{"limit":8589934592}}}"#,
                "the VM would have 8256 MiB of RAM (from the OCI memory limit of 8192 MiB \
                 and 64 MiB for the guest), more than this host's policy allows \
                 ([vm.policy] max_memory_mib = 8192)",
            ),
        ];
        for (json, want) in cases {
            let s = spec(&format!("{BASE},{json}}}"));
            let e = vm_size(&s, &vm).unwrap_err();
            assert!(matches!(e, SizingError::AbovePolicy { .. }), "{e}");
            assert_eq!(e.to_string(), want);
        }
        // Beyond what any VM can be, the absolute range speaks first.
        let s = with_annotations(&[(ANNOTATION_VCPUS, "99")]);
        let e = vm_size(&s, &vm).unwrap_err().to_string();
        assert!(e.contains("must be between 1 and 32"), "{e}");
        // A raised policy lets the same spec through.
        let mut big = VmConfig::default();
        big.policy.max_vcpus = 16;
        let s = spec(&format!(
            r#"{BASE},"linux":{{"resources":{{"cpu":{{"quota":1600000,"period":100000}}}}}}}}"#
        ));
        assert_eq!(vm_size(&s, &big).unwrap().vcpus, 16);
        // Defaults set past the policy by code, not by a checked file.
        let odd = VmConfig {
            vcpus: 12,
            ..VmConfig::default()
        };
        let e = vm_size(&spec(&format!("{BASE}}}")), &odd)
            .unwrap_err()
            .to_string();
        assert!(e.contains("12 vCPUs (from the [vm] default)"), "{e}");
    }

    #[test]
    fn unlimited_quota_uses_default() {
        let s = spec(&format!(
            r#"{BASE},"linux":{{"resources":{{"cpu":{{"quota":-1,"period":100000}}}}}}}}"#
        ));
        assert_eq!(vm_size(&s, &VmConfig::default()).unwrap().vcpus, 1);
    }
}

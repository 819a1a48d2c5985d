//! `[vm.policy]`: what a container spec may ask of its VM on this host
//! (docs/policy.md).
//!
//! The shim sizes a VM from the spec's `io.capsid.*` annotations and its
//! OCI resources, and in Kubernetes a tenant writes both (pod annotations,
//! resource limits). The host's admin decides here which annotations
//! tenants may use and how large any VM may get. The table sits under
//! `[vm]` because it bounds the sizes `[vm]` defaults: whatever reads the
//! `[vm]` defaults to size a VM gets the policy with them.

use serde::{Deserialize, Serialize};

use super::{MAX_VCPUS, MIN_MEMORY_MIB};

/// Prefix of capsid's annotations; any key with it (in any letter case) is
/// capsid's, and one capsid does not know is refused, not ignored.
pub const ANNOTATION_PREFIX: &str = "io.capsid.";
/// Annotation overriding the number of vCPUs.
pub const ANNOTATION_VCPUS: &str = "io.capsid.vcpus";
/// Annotation overriding guest RAM, in MiB.
pub const ANNOTATION_MEMORY_MIB: &str = "io.capsid.memory_mib";
/// Annotation opting a sandbox in or out of the balloon policy: `on`
/// (default) or `off` (the host never reclaims its memory).
pub const ANNOTATION_BALLOON_POLICY: &str = "io.capsid.balloon.policy";
/// Every `io.capsid.*` annotation capsid reads.
pub const KNOWN_ANNOTATIONS: [&str; 3] = [
    ANNOTATION_VCPUS,
    ANNOTATION_MEMORY_MIB,
    ANNOTATION_BALLOON_POLICY,
];

/// `[vm.policy]` of the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// The `io.capsid.*` annotations a spec may carry; any other one fails
    /// Create. By default only the size ones: `io.capsid.balloon.policy=off`
    /// would let a tenant pin all its RAM against the balloon policy, on
    /// which the host's memory over-assignment relies.
    pub allowed_annotations: Vec<String>,
    /// Most vCPUs any VM may have, whatever its spec says.
    pub max_vcpus: u32,
    /// Most guest RAM any VM may have, MiB, whatever its spec says.
    pub max_memory_mib: u32,
}

/// Default `max_vcpus`: a fixed number, not the host's CPU count, so that a
/// spec runs or is refused the same way on every host of a cluster.
pub const DEFAULT_MAX_VCPUS: u32 = 8;
/// Default `max_memory_mib`.
pub const DEFAULT_MAX_MEMORY_MIB: u32 = 8192;

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            allowed_annotations: vec![ANNOTATION_VCPUS.into(), ANNOTATION_MEMORY_MIB.into()],
            max_vcpus: DEFAULT_MAX_VCPUS,
            max_memory_mib: DEFAULT_MAX_MEMORY_MIB,
        }
    }
}

impl PolicyConfig {
    /// Whether specs may carry annotation `key`.
    pub fn allows(&self, key: &str) -> bool {
        self.allowed_annotations.iter().any(|a| a == key)
    }

    /// The allowed annotations for a message: `a, b`, or `none`.
    pub fn allowed_list(&self) -> String {
        if self.allowed_annotations.is_empty() {
            "none".into()
        } else {
            self.allowed_annotations.join(", ")
        }
    }

    /// Checks the policy against the `[vm]` defaults it bounds: the error
    /// is the key (as `vm.policy.KEY`) and what is wrong with it.
    pub(super) fn check(
        &self,
        vcpus: u32,
        memory_mib: u32,
    ) -> std::result::Result<(), (&'static str, String)> {
        for a in &self.allowed_annotations {
            if !KNOWN_ANNOTATIONS.contains(&a.as_str()) {
                return Err((
                    "vm.policy.allowed_annotations",
                    format!(
                        "{a:?} is not a capsid annotation (known: {})",
                        KNOWN_ANNOTATIONS.join(", ")
                    ),
                ));
            }
        }
        if self.max_vcpus == 0 || self.max_vcpus > MAX_VCPUS {
            return Err((
                "vm.policy.max_vcpus",
                format!("{} is not between 1 and {MAX_VCPUS}", self.max_vcpus),
            ));
        }
        if self.max_vcpus < vcpus {
            return Err((
                "vm.policy.max_vcpus",
                format!(
                    "{} is below vm.vcpus = {vcpus}: the default VM would be refused",
                    self.max_vcpus
                ),
            ));
        }
        if self.max_memory_mib < MIN_MEMORY_MIB {
            return Err((
                "vm.policy.max_memory_mib",
                format!(
                    "{} MiB is below the {MIN_MEMORY_MIB} MiB a guest needs",
                    self.max_memory_mib
                ),
            ));
        }
        if self.max_memory_mib < memory_mib {
            return Err((
                "vm.policy.max_memory_mib",
                format!(
                    "{} MiB is below vm.memory_mib = {memory_mib}: the default VM would be refused",
                    self.max_memory_mib
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::message;
    use crate::config::Config;

    #[test]
    fn defaults_allow_only_the_size_annotations() {
        let c = Config::parse("").unwrap();
        let p = &c.vm.policy;
        assert!(p.allows(ANNOTATION_VCPUS));
        assert!(p.allows(ANNOTATION_MEMORY_MIB));
        assert!(!p.allows(ANNOTATION_BALLOON_POLICY));
        assert_eq!(p.max_vcpus, DEFAULT_MAX_VCPUS);
        assert_eq!(p.max_memory_mib, DEFAULT_MAX_MEMORY_MIB);
        assert_eq!(p.allowed_list(), "io.capsid.vcpus, io.capsid.memory_mib");
    }

    #[test]
    fn keys_are_read_and_round_trip() {
        let c = Config::parse(
            "[vm]\nvcpus = 2\n[vm.policy]\n\
             allowed_annotations = [\"io.capsid.balloon.policy\"]\n\
             max_vcpus = 32\nmax_memory_mib = 65536\n",
        )
        .unwrap();
        assert_eq!(c.vm.vcpus, 2);
        assert_eq!(
            c.vm.policy,
            PolicyConfig {
                allowed_annotations: vec![ANNOTATION_BALLOON_POLICY.into()],
                max_vcpus: 32,
                max_memory_mib: 65536,
            }
        );
        let text = toml::to_string(&c).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), c);
        let none = Config::parse("[vm.policy]\nallowed_annotations = []\n").unwrap();
        assert_eq!(none.vm.policy.allowed_list(), "none");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key, why) in [
            (
                "[vm.policy]\nallowed_annotations = [\"io.capsid.vcpu\"]",
                "vm.policy.allowed_annotations",
                "\"io.capsid.vcpu\" is not a capsid annotation (known: io.capsid.vcpus, \
                 io.capsid.memory_mib, io.capsid.balloon.policy)",
            ),
            (
                "[vm.policy]\nmax_vcpus = 0",
                "vm.policy.max_vcpus",
                "0 is not between 1 and 32",
            ),
            (
                "[vm.policy]\nmax_vcpus = 33",
                "vm.policy.max_vcpus",
                "33 is not between 1 and 32",
            ),
            (
                "[vm]\nvcpus = 4\n[vm.policy]\nmax_vcpus = 2",
                "vm.policy.max_vcpus",
                "2 is below vm.vcpus = 4",
            ),
            (
                "[vm.policy]\nmax_memory_mib = 32",
                "vm.policy.max_memory_mib",
                "32 MiB is below the 64 MiB",
            ),
            (
                "[vm]\nmemory_mib = 1024\n[vm.policy]\nmax_memory_mib = 512",
                "vm.policy.max_memory_mib",
                "512 MiB is below vm.memory_mib = 1024",
            ),
            (
                "[vm]\nmemory_mib = 16384",
                "vm.policy.max_memory_mib",
                "8192 MiB is below vm.memory_mib = 16384",
            ),
        ] {
            let e = Config::parse(&format!("{text}\n")).unwrap_err();
            let m = message(&e);
            assert!(
                m.starts_with(&format!("invalid config value {key}: ")) && m.contains(why),
                "{text}: {m}"
            );
        }
    }

    #[test]
    fn unknown_and_mistyped_keys_are_refused() {
        let e = Config::parse("[vm.policy]\nmax_cpus = 4\n").unwrap_err();
        assert!(message(&e).contains("unknown field `max_cpus`"), "{e}");
        let e = Config::parse("[vm.policy]\nmax_memory_mib = -1\n").unwrap_err();
        assert!(message(&e).contains("max_memory_mib"), "{}", message(&e));
    }
}

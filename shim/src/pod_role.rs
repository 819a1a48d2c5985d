//! Which part of a Kubernetes pod a task is, from the annotations the CRI
//! plugin writes into every spec of a pod: the pod's sandbox (its pause
//! container) boots the pod's VM, and the pod's other containers join that
//! VM. A task without them is a container of its own, in a VM of its own.
//!
//! The same annotations group a pod into one shim process: `start` answers
//! every task of a pod with the address of the shim that runs the pod's
//! sandbox, as containerd's runc shim groups a pod.

use std::collections::HashMap;
use std::path::Path;

/// The CRI plugin's annotation telling a pod's sandbox from its containers.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI plugin's annotation naming the pod's sandbox (on the sandbox
/// itself too, naming itself).
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Errors reading a task's role.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The bundle's config.json cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config.json is not JSON with an annotations object.
    #[error("cannot read the annotations of {path}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The annotations contradict each other or are incomplete.
    #[error("{0}")]
    Invalid(String),
}

/// A task's part in a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not part of a pod: a container in a VM of its own.
    Single,
    /// A pod's sandbox (pause) container: it boots the pod's VM.
    Sandbox {
        /// The pod's sandbox id (the task's own id).
        id: String,
    },
    /// A container added to the running VM of pod `sandbox_id`.
    Member {
        /// The pod's sandbox id.
        sandbox_id: String,
    },
}

impl Role {
    /// The role `annotations` give task `id`.
    pub fn from_annotations(
        id: &str,
        annotations: &HashMap<String, String>,
    ) -> Result<Self, RoleError> {
        let Some(kind) = annotations.get(CONTAINER_TYPE) else {
            return Ok(Self::Single);
        };
        let sandbox_id = annotations
            .get(SANDBOX_ID)
            .filter(|s| !s.is_empty())
            .cloned();
        match (kind.as_str(), sandbox_id) {
            ("sandbox", Some(s)) if s == id => Ok(Self::Sandbox { id: s }),
            ("sandbox", Some(s)) => Err(RoleError::Invalid(format!(
                "pod sandbox {id} names another sandbox ({SANDBOX_ID}={s})"
            ))),
            // containerd before 1.6's CRI annotations named the sandbox
            // only on containers: the sandbox is the task itself.
            ("sandbox", None) => Ok(Self::Sandbox { id: id.to_string() }),
            ("container", Some(s)) if s == id => Err(RoleError::Invalid(format!(
                "container {id} names itself as its pod's sandbox ({SANDBOX_ID})"
            ))),
            ("container", Some(s)) => Ok(Self::Member { sandbox_id: s }),
            ("container", None) => Err(RoleError::Invalid(format!(
                "container {id} is a pod's container ({CONTAINER_TYPE}=container) \
                 without the pod's sandbox id ({SANDBOX_ID})"
            ))),
            (other, _) => Err(RoleError::Invalid(format!(
                "unknown {CONTAINER_TYPE} {other:?} (expected \"sandbox\" or \"container\")"
            ))),
        }
    }

    /// The role of the task whose bundle is `bundle` (its config.json).
    pub fn of_bundle(id: &str, bundle: &Path) -> Result<Self, RoleError> {
        #[derive(serde::Deserialize)]
        struct Annotations {
            #[serde(default)]
            annotations: HashMap<String, String>,
        }
        let path = bundle.join("config.json");
        let shown = path.display().to_string();
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            // Create says what is wrong with a bundle without a spec.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::Single),
            Err(source) => {
                return Err(RoleError::Read {
                    path: shown,
                    source,
                })
            }
        };
        let parsed: Annotations =
            serde_json::from_slice(&text).map_err(|source| RoleError::Parse {
                path: shown,
                source,
            })?;
        Self::from_annotations(id, &parsed.annotations)
    }

    /// The id the task's shim is found by: the pod's sandbox id for every
    /// task of a pod, the task's own id otherwise.
    pub fn group<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Self::Single => id,
            Self::Sandbox { id } => id,
            Self::Member { sandbox_id } => sandbox_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn roles_follow_the_cri_annotations() {
        assert_eq!(
            Role::from_annotations("c", &ann(&[])).unwrap(),
            Role::Single
        );
        let sandbox = ann(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "p1")]);
        let role = Role::from_annotations("p1", &sandbox).unwrap();
        assert_eq!(role, Role::Sandbox { id: "p1".into() });
        assert_eq!(role.group("p1"), "p1");
        let member = ann(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "p1")]);
        let role = Role::from_annotations("c1", &member).unwrap();
        assert_eq!(
            role,
            Role::Member {
                sandbox_id: "p1".into()
            }
        );
        assert_eq!(role.group("c1"), "p1");
        assert_eq!(Role::Single.group("c1"), "c1");
    }

    #[test]
    fn contradictions_are_named() {
        for (id, pairs, words) in [
            (
                "c1",
                vec![(CONTAINER_TYPE, "container")],
                "without the pod's sandbox id",
            ),
            (
                "p1",
                vec![(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "p2")],
                "names another sandbox",
            ),
            (
                "c1",
                vec![(CONTAINER_TYPE, "container"), (SANDBOX_ID, "c1")],
                "names itself",
            ),
            (
                "c1",
                vec![(CONTAINER_TYPE, "vm")],
                "unknown io.kubernetes.cri.container-type \"vm\"",
            ),
        ] {
            let e = Role::from_annotations(id, &ann(&pairs)).unwrap_err();
            assert!(e.to_string().contains(words), "{e}");
        }
    }

    #[test]
    fn bundles_are_read_for_annotations_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            format!(r#"{{"ociVersion":"1.0.2","annotations":{{"{CONTAINER_TYPE}":"container","{SANDBOX_ID}":"p9"}}}}"#),
        )
        .unwrap();
        assert_eq!(
            Role::of_bundle("c", dir.path()).unwrap(),
            Role::Member {
                sandbox_id: "p9".into()
            }
        );
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        assert_eq!(Role::of_bundle("c", dir.path()).unwrap(), Role::Single);
        std::fs::write(dir.path().join("config.json"), "[").unwrap();
        assert!(Role::of_bundle("c", dir.path())
            .unwrap_err()
            .to_string()
            .contains("annotations"));
    }
}

//! The sandbox's volume share: a virtio-fs filesystem the host exports
//! (virtiofsd), mounted once at [`SHARE_DIR`]; containers bind its entries
//! at their destinations (the host rewrote each volume's source to
//! `SHARE_DIR/vN`, or `SHARE_DIR/c3/v0` for a pod's container). A pod's
//! container may have its rootfs there too (`c3/rootfs`, bound by
//! [`crate::rootfs::assemble`]): the share is mounted before the rootfs is
//! assembled.

use std::path::Path;
use std::sync::Mutex;

use nix::mount::{mount, MsFlags};

use crate::lock::LockExt as _;

/// Where the share is mounted (the host's `volumes::GUEST_SHARE_DIR`).
pub const SHARE_DIR: &str = "/run/capsid/volumes";

/// Errors mounting the share.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The tag is not one virtio-fs can carry.
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes without NUL or comma")]
    Tag(String),
    /// The mount point cannot be made.
    #[error("cannot create {SHARE_DIR}")]
    Mkdir(#[source] std::io::Error),
    /// The kernel refused the mount (no such tag: the VM has no share).
    #[error("cannot mount the virtio-fs share {tag:?} on {SHARE_DIR}")]
    Mount {
        /// The tag.
        tag: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A second tag was asked for: a sandbox has one share.
    #[error("the share {mounted:?} is mounted; {asked:?} cannot be mounted too")]
    Other {
        /// Mounted already.
        mounted: String,
        /// Asked for now.
        asked: String,
    },
}

/// The tag mounted, once mounted.
static MOUNTED: Mutex<Option<String>> = Mutex::new(None);

/// Mounts the share tagged `tag` unless it is mounted already. Files
/// there belong to the host's users: nothing on it is a device, and the
/// container's own mounts decide exec and suid on each bind.
pub fn ensure(tag: &str) -> Result<(), ShareError> {
    if tag.is_empty() || tag.len() > 36 || tag.contains(['\0', ',']) {
        return Err(ShareError::Tag(tag.to_string()));
    }
    let mut mounted = MOUNTED.lock_or_recover();
    if let Some(m) = mounted.as_deref() {
        return if m == tag {
            Ok(())
        } else {
            Err(ShareError::Other {
                mounted: m.to_string(),
                asked: tag.to_string(),
            })
        };
    }
    std::fs::create_dir_all(SHARE_DIR).map_err(ShareError::Mkdir)?;
    mount(
        Some(tag),
        Path::new(SHARE_DIR),
        Some("virtiofs"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(|source| ShareError::Mount {
        tag: tag.to_string(),
        source,
    })?;
    tracing::info!(tag, dir = SHARE_DIR, "volume share mounted");
    *mounted = Some(tag.to_string());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tags_are_refused_before_mounting() {
        for tag in ["", "a,b", &"x".repeat(37)] {
            assert!(matches!(ensure(tag), Err(ShareError::Tag(_))), "{tag:?}");
        }
    }
}

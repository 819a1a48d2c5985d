//! Building a read-only filesystem image from a staged directory: erofs with
//! `mkfs.erofs` (erofs-utils) where installed, else ext4 with `mke2fs -d`.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{ImageError, Result};
use crate::locate;

/// Lines of a failed tool's output kept for the error.
const OUTPUT_LINES: usize = 5;
/// ext4 block size.
const EXT4_BLOCK: u64 = 4096;

/// A read-only root filesystem format the guest mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsType {
    /// EROFS: compact, read-only by design, fast to build.
    Erofs,
    /// ext4, mounted read-only: the fallback without erofs-utils.
    Ext4,
}

impl FsType {
    /// The name the guest's `mount -t` takes, also the cached file's extension.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Erofs => "erofs",
            Self::Ext4 => "ext4",
        }
    }

    /// Both formats, preferred first.
    pub(crate) const ALL: [FsType; 2] = [FsType::Erofs, FsType::Ext4];
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A filesystem builder found on this host.
#[derive(Debug, Clone)]
pub(crate) struct Mkfs {
    pub fs_type: FsType,
    tool: PathBuf,
}

impl Mkfs {
    /// The builder for `wanted`, or the best one installed: mkfs.erofs,
    /// else mke2fs.
    pub(crate) fn detect(wanted: Option<FsType>) -> Result<Self> {
        let candidates: &[FsType] = match wanted {
            Some(FsType::Erofs) => &[FsType::Erofs],
            Some(FsType::Ext4) => &[FsType::Ext4],
            None => &FsType::ALL,
        };
        for &fs_type in candidates {
            if let Some(tool) = find_tool(fs_type) {
                return Ok(Self { fs_type, tool });
            }
        }
        Err(ImageError::NoMkfs)
    }

    /// Builds the image `out` (which must not exist) from the directory `dir`.
    pub(crate) fn build(&self, dir: &Path, out: &Path) -> Result<()> {
        let mut cmd = Command::new(&self.tool);
        match self.fs_type {
            FsType::Erofs => {
                // Uncompressed: the guest kernel needs no decompressor, and
                // per-file times are kept as the layers set them.
                cmd.args(["--quiet", "--preserve-mtime"]).arg(out).arg(dir);
            }
            FsType::Ext4 => {
                let (bytes, inodes) = usage(dir).map_err(|source| ImageError::Cache {
                    action: "measure",
                    path: dir.to_path_buf(),
                    source,
                })?;
                // Room for metadata, and never too small to format.
                let size = (bytes + bytes / 4 + (16 << 20)).div_ceil(EXT4_BLOCK) * EXT4_BLOCK;
                let file = fs::File::create_new(out).map_err(|source| ImageError::Cache {
                    action: "create",
                    path: out.to_path_buf(),
                    source,
                })?;
                file.set_len(size).map_err(|source| ImageError::Cache {
                    action: "size",
                    path: out.to_path_buf(),
                    source,
                })?;
                cmd.args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
                    .args(["-O", "^has_journal,^resize_inode", "-L", "capsid-rootfs"])
                    .arg("-N")
                    .arg((inodes + inodes / 4 + 64).to_string())
                    .arg("-d")
                    .arg(dir)
                    .arg(out)
                    .arg(format!("{}k", size / 1024));
            }
        }
        let tool = self.tool.display().to_string();
        tracing::debug!(command = ?cmd, "building filesystem image");
        let output = cmd.output().map_err(|source| ImageError::Cache {
            action: "run",
            path: self.tool.clone(),
            source,
        })?;
        if output.status.success() {
            return Ok(());
        }
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(OUTPUT_LINES)..].join(" / ");
        Err(ImageError::Mkfs {
            tool,
            status: output.status.to_string(),
            output: tail,
        })
    }
}

fn find_tool(fs_type: FsType) -> Option<PathBuf> {
    let name = match fs_type {
        FsType::Erofs => "mkfs.erofs",
        FsType::Ext4 => "mke2fs",
    };
    // mke2fs lives in sbin, which a user's PATH may lack.
    locate::binary(Path::new(name)).or_else(|| {
        ["/usr/sbin", "/sbin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|p| p.is_file())
    })
}

/// Bytes (rounded up to blocks) and inodes a tree needs.
fn usage(dir: &Path) -> io::Result<(u64, u64)> {
    let (bytes, inodes) = usage_below(dir)?;
    Ok((bytes + EXT4_BLOCK, inodes + 1))
}

/// [`usage`] of what is in `dir`, not counting `dir` itself.
fn usage_below(dir: &Path) -> io::Result<(u64, u64)> {
    let mut bytes = 0;
    let mut inodes = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        inodes += 1;
        bytes += meta.size().div_ceil(EXT4_BLOCK) * EXT4_BLOCK;
        if meta.is_dir() {
            let (b, i) = usage_below(&entry.path())?;
            bytes += b + EXT4_BLOCK;
            inodes += i;
        }
    }
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_blocks_and_inodes() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("d")).unwrap();
        fs::write(tmp.path().join("d/f"), vec![0u8; 5000]).unwrap();
        std::os::unix::fs::symlink("d/f", tmp.path().join("l")).unwrap();
        let (bytes, inodes) = usage(tmp.path()).unwrap();
        assert_eq!(inodes, 4);
        assert!(bytes >= 2 * EXT4_BLOCK + EXT4_BLOCK, "{bytes}");
    }

    #[test]
    fn names_are_mount_types() {
        assert_eq!(FsType::Erofs.to_string(), "erofs");
        assert_eq!(FsType::Ext4.as_str(), "ext4");
    }
}

//! A rootfs the caller mounted itself: Docker Engine (overlay2 graphdriver)
//! calls Create with no rootfs mounts and `root.path` naming the merged
//! directory of an overlay it mounted. Reading the merged view would give
//! every container a disk of its own; instead the overlay's lower
//! directories are found in the mount table, and they are the image's
//! immutable layers, so the disk is cached by their identity exactly as for
//! containerd's snapshots.
//!
//! Docker puts one lower of its own on top of the image's: the container's
//! `<id>-init` layer, holding empty placeholders for /etc/hosts,
//! /etc/hostname, /etc/resolv.conf and a few mount points. The guest agent
//! writes those files itself, so that layer is left out; otherwise every
//! container would be a cache miss.
//!
//! Whenever the layers cannot be used (a lower that does not resolve,
//! data-only layers, a path the layers' remount cannot name) the merged
//! directory itself is the rootfs: always correct, only not cached.
//!
//! # How the kernel prints an overlay in /proc/self/mountinfo
//!
//! Mount points are printed with ` `, tab, newline and `\` as 3-digit octal
//! escapes (`\040`, `\011`, `\012`, `\134`); so are the values of the super
//! options (`seq_show_option`), and there also `,` (`\054`). A raw `,` thus
//! always separates options. Then each kernel has its own form of the
//! layers:
//!
//! * up to 6.4, and again once the 6.5/6.6 regression fixes are in:
//!   `lowerdir=` is the string the mounter gave, in which `\` escapes the
//!   next character (`\:` is a colon in a name) and `::` starts the
//!   data-only layers (6.5+); printed through the octal escapes, `\:`
//!   reads `\134:`;
//! * some 6.5 and 6.6 kernels: each layer on its own, `:`-separated (`::`
//!   before data-only layers), a colon in a name printed `\072` and a
//!   backslash `\134`;
//! * 6.8+, with the new mount API's `lowerdir+=`/`datadir+=` options: one
//!   option per layer, the path as given (a colon in it is just a colon).
//!
//! `\134` is the escape character of the first form and a plain backslash
//! in the second; nothing in the line tells which. It is read as the
//! escape: backslashes in layer paths are unheard of (Docker's never have
//! one), and a misread name fails to resolve, which falls back to the
//! merged directory.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::rootfs::{RootfsError, RootfsSource};

/// Directories whose contents are the host's own: a root path in (or of)
/// them is refused, since the disk built from it would copy host state
/// into a tenant's VM.
const REFUSED_ROOTS: &[&str] = &["/", "/proc", "/sys", "/dev", "/boot", "/etc"];

/// The suffix of Docker's per-container init layer's directory.
const DOCKER_INIT_LAYER: &str = "-init/diff";

/// Bytes a layer's path must not hold: `rootfs::MergedLowers` remounts
/// the layers with their paths joined by `:` into one `lowerdir=` option
/// and escapes nothing, so a `:`, `,` or `\` in one would make it mount
/// other directories than the layers (or fail), under their cache key.
const NOT_REMOUNTABLE: &[u8] = b":,\\";

/// Where the rootfs at `root` comes from: the image layers under its
/// overlay when it is the mount point of one, the directory itself
/// otherwise.
pub fn source(root: &Path) -> Result<RootfsSource, RootfsError> {
    let canonical = std::fs::canonicalize(root).map_err(|source| RootfsError::Stat {
        path: root.to_path_buf(),
        source,
    })?;
    check_allowed(&canonical)?;
    // Bytes, not text: a mount point anywhere on the host may have a name
    // that is not UTF-8 (the kernel prints it as it is).
    let mountinfo = std::fs::read("/proc/self/mountinfo").map_err(|source| RootfsError::Stat {
        path: PathBuf::from("/proc/self/mountinfo"),
        source,
    })?;
    Ok(source_in(canonical, &mountinfo))
}

/// [`source`] for the canonical, allowed `root` and the mount table
/// `mountinfo`.
fn source_in(root: PathBuf, mountinfo: &[u8]) -> RootfsSource {
    let Some(layers) = overlay_layers(mountinfo, &root) else {
        return RootfsSource::Dir(root);
    };
    if layers.data_only > 0 {
        // Data-only layers are not part of the merged view: their files are
        // reachable only through metacopy files of the regular lowers (the
        // kernel requires metacopy=on for them), which hold the metadata
        // and redirect to the data. The lowers alone would make a disk of
        // empty files, so the kernel's merged view is read instead.
        tracing::warn!(
            root = %root.display(),
            data_layers = layers.data_only,
            "overlay with data-only layers: building the rootfs disk from the merged directory, uncached"
        );
        return RootfsSource::Dir(root);
    }
    // A lower that cannot be used falls back to the merged directory, be it
    // relative or absolute. The table shows each path as the mounter wrote
    // it, against its own root and working directory, not the shim's: a
    // dockerd in a chroot or another mount namespace (Docker in Docker, a
    // snap) names layers this process cannot resolve, and that is not a
    // broken host. The merged view is right in every such case; failing
    // the container over a cache would not be, and the warning tells why
    // it was not cached.
    match resolve(&root, layers.lowers) {
        Ok(lowers) if lowers.is_empty() => RootfsSource::Dir(root),
        Ok(lowers) => RootfsSource::Overlay { lowers },
        Err(e) => {
            tracing::warn!(
                root = %root.display(),
                error = %crate::describe(&e),
                "overlay layer unusable: building the rootfs disk from the merged directory, uncached"
            );
            RootfsSource::Dir(root)
        }
    }
}

/// Refuses the host's root and its system directories.
fn check_allowed(root: &Path) -> Result<(), RootfsError> {
    let top: PathBuf = root.components().take(2).collect();
    let refused = REFUSED_ROOTS.iter().any(|r| {
        let r = Path::new(r);
        root == r || (r != Path::new("/") && top == r)
    });
    if refused {
        return Err(RootfsError::Unsupported(format!(
            "root path {} is part of the host's own file system",
            root.display()
        )));
    }
    Ok(())
}

/// The layers an overlay's super options name.
#[derive(Debug, Default, PartialEq, Eq)]
struct OverlayLayers {
    /// The lower directories of the merged view, top first, as the mounter
    /// named them (maybe relative).
    lowers: Vec<PathBuf>,
    /// How many data-only layers it has (`datadir+=`, or after `::`).
    data_only: usize,
}

/// One line of the mount table, the fields used here.
#[derive(Debug)]
struct MountLine<'a> {
    /// Where it is mounted, unescaped.
    point: PathBuf,
    /// The file system type.
    fs_type: &'a [u8],
    /// The super block's options, as printed.
    super_options: &'a [u8],
}

/// Splits one line of the mount table; `None` if it is not one.
fn parse_line(line: &[u8]) -> Option<MountLine<'_>> {
    // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL…] - TYPE SOURCE SUPER_OPTIONS
    // Every field but the last has its spaces escaped; the super options
    // are taken to the end of the line, whole even where an early 6.5
    // kernel printed a layer's spaces as they are.
    let dash = line.windows(3).position(|w| w == b" - ")?;
    let (left, right) = (&line[..dash], &line[dash + 3..]);
    let point = left.split(|b| *b == b' ').nth(4)?;
    let mut right = right.splitn(3, |b| *b == b' ');
    let fs_type = right.next()?;
    let _source = right.next()?;
    let super_options = right.next().unwrap_or_default();
    Some(MountLine {
        point: path_from(unescape(point)),
        fs_type,
        super_options,
    })
}

/// The layers of the overlay visible at `point`: the last mount there in
/// the table (each mount at a point hides the ones before it); `None` if
/// there is none or it is not an overlay.
fn overlay_layers(mountinfo: &[u8], point: &Path) -> Option<OverlayLayers> {
    let visible = mountinfo
        .split(|b| *b == b'\n')
        .rev()
        .filter_map(parse_line)
        .find(|m| m.point == point)?;
    (visible.fs_type == b"overlay").then(|| layers(visible.super_options))
}

/// Reads the layers from an overlay's super options: `lowerdir=` first,
/// then the `lowerdir+=` ones in order (the kernel takes one form or the
/// other, never both). `datadir+=` layers are only counted.
fn layers(super_options: &[u8]) -> OverlayLayers {
    let mut layers = OverlayLayers::default();
    let mut added = Vec::new();
    // The separators are raw commas: a comma in a value is `\054`.
    for option in super_options.split(|b| *b == b',') {
        if let Some(value) = option.strip_prefix(b"lowerdir=") {
            let (lowers, data_only) = split_lowerdir(value);
            layers.lowers.extend(lowers);
            layers.data_only += data_only;
        } else if let Some(value) = option.strip_prefix(b"lowerdir+=") {
            // One path, not a list: no `:` or `\` of its own to undo.
            let lower = unescape(value);
            if !lower.is_empty() {
                added.push(path_from(lower));
            }
        } else if option.starts_with(b"datadir+=") {
            layers.data_only += 1;
        }
    }
    layers.lowers.extend(added);
    layers
}

/// Splits a printed `lowerdir=` value into its layers (top first) and the
/// number of data-only layers after them: a raw `:` separates layers, `::`
/// starts the data-only ones; a backslash (printed `\134`) makes the next
/// character part of the name (`\134:` is a colon, `\134\134` a
/// backslash); a `\072` is a colon in a name.
fn split_lowerdir(value: &[u8]) -> (Vec<PathBuf>, usize) {
    let mut parts = Vec::new();
    let mut current = Vec::new();
    let mut literal = false;
    for byte in decode(value) {
        match byte {
            Byte::Raw(b) | Byte::Escaped(b) if literal => {
                current.push(b);
                literal = false;
            }
            Byte::Raw(b'\\') | Byte::Escaped(b'\\') => literal = true,
            Byte::Raw(b':') => parts.push(std::mem::take(&mut current)),
            Byte::Raw(b) | Byte::Escaped(b) => current.push(b),
        }
    }
    parts.push(current);
    let merged = parts.iter().take_while(|p| !p.is_empty()).count();
    let data_only = parts.iter().skip(merged).filter(|p| !p.is_empty()).count();
    let lowers = parts.into_iter().take(merged).map(path_from).collect();
    (lowers, data_only)
}

/// A byte of a printed field: as it is, or from an octal escape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Byte {
    /// Printed as it is.
    Raw(u8),
    /// Printed as `\ooo`.
    Escaped(u8),
}

impl Byte {
    fn value(self) -> u8 {
        match self {
            Byte::Raw(b) | Byte::Escaped(b) => b,
        }
    }
}

/// Reads mountinfo's octal escapes (`\040` for a space and so on): a
/// backslash and exactly three octal digits, at most `\377`.
fn decode(field: &[u8]) -> Vec<Byte> {
    let mut out = Vec::with_capacity(field.len());
    let mut rest = field;
    loop {
        match rest {
            [] => return out,
            [b'\\', a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7', tail @ ..] => {
                out.push(Byte::Escaped(
                    ((a - b'0') << 6) | ((b - b'0') << 3) | (c - b'0'),
                ));
                rest = tail;
            }
            [b, tail @ ..] => {
                out.push(Byte::Raw(*b));
                rest = tail;
            }
        }
    }
}

/// Undoes mountinfo's octal escapes.
fn unescape(field: &[u8]) -> Vec<u8> {
    decode(field).into_iter().map(Byte::value).collect()
}

/// A path from its bytes (Linux paths need not be UTF-8).
fn path_from(bytes: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes))
}

/// Makes the lowers absolute and canonical, and drops Docker's init layer.
/// A relative lower is relative to the directory the mount was made from:
/// overlay2 mounts `<home>/<id>/merged` from `<home>`. Fails on the first
/// lower that does not resolve or cannot be remounted.
fn resolve(root: &Path, lowers: Vec<PathBuf>) -> Result<Vec<PathBuf>, RootfsError> {
    let home = root.parent().and_then(Path::parent).unwrap_or(root);
    let mut resolved = Vec::with_capacity(lowers.len());
    for lower in lowers {
        let path = if lower.is_absolute() {
            lower
        } else {
            home.join(lower)
        };
        let canonical = std::fs::canonicalize(&path).map_err(|source| RootfsError::Stat {
            path: path.clone(),
            source,
        })?;
        let bytes = canonical.as_os_str().as_bytes();
        if bytes.ends_with(DOCKER_INIT_LAYER.as_bytes()) {
            tracing::debug!(layer = %canonical.display(), "Docker's init layer left to the guest");
            continue;
        }
        if bytes.iter().any(|b| NOT_REMOUNTABLE.contains(b)) {
            return Err(RootfsError::Unsupported(format!(
                "image layer {} has a ':', ',' or '\\' in its path, which a lowerdir= option cannot carry unescaped",
                canonical.display()
            )));
        }
        resolved.push(canonical);
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    fn lowers(mountinfo: &[u8], point: &str) -> Option<Vec<PathBuf>> {
        overlay_layers(mountinfo, Path::new(point)).map(|l| {
            assert_eq!(l.data_only, 0, "{point}");
            l.lowers
        })
    }

    /// `path` as the kernel prints it in a mount point or an option value.
    fn printed(path: &Path) -> String {
        let mut out = String::new();
        for c in path.to_string_lossy().chars() {
            match c {
                ' ' => out.push_str("\\040"),
                '\t' => out.push_str("\\011"),
                '\n' => out.push_str("\\012"),
                '\\' => out.push_str("\\134"),
                ',' => out.push_str("\\054"),
                c => out.push(c),
            }
        }
        out
    }

    #[test]
    fn the_hosts_own_directories_are_refused() {
        for p in ["/", "/proc", "/proc/1/root", "/sys/fs", "/etc", "/dev"] {
            let e = check_allowed(Path::new(p)).unwrap_err().to_string();
            assert!(e.contains(p), "{e}");
        }
        for p in ["/var/lib/docker/overlay2/x/merged", "/tmp/r", "/srv/rootfs"] {
            assert!(check_allowed(Path::new(p)).is_ok(), "{p}");
        }
        let e = source(Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("host's own file system"), "{e}");
    }

    /// Up to 6.4 and on current kernels (6.1 here): `lowerdir=` as the
    /// mounter wrote it, `\:` printed `\134:`, a space `\040`, `\,` printed
    /// `\134\054`.
    #[test]
    fn lowerdir_as_the_mounter_wrote_it() {
        let table = br"22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
1201 29 0:112 / /var/lib/docker/overlay2/abc/merged rw,relatime shared:600 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/INIT:/var/lib/docker/overlay2/l/A\134:B:/d/with\040space\134\054comma:l/REL,upperdir=/var/lib/docker/overlay2/abc/diff,workdir=/var/lib/docker/overlay2/abc/work,index=off
1202 29 0:113 / /srv/my\040root\011x rw,relatime - overlay overlay rw,lowerdir=/x\134\134y:/z\134,upperdir=/u,workdir=/w
";
        assert_eq!(
            lowers(table, "/var/lib/docker/overlay2/abc/merged").unwrap(),
            paths(&[
                "/var/lib/docker/overlay2/l/INIT",
                "/var/lib/docker/overlay2/l/A:B",
                "/d/with space,comma",
                "l/REL",
            ])
        );
        assert_eq!(
            lowers(table, "/srv/my root\tx").unwrap(),
            paths(&["/x\\y", "/z"])
        );
        assert_eq!(lowers(table, "/srv/my\\040root\\011x"), None);
        assert_eq!(lowers(table, "/proc"), None);
        assert_eq!(lowers(table, "/nowhere"), None);
    }

    /// Some 6.5 and 6.6 kernels: one escaped path per layer, `\072` for a
    /// colon in a name, `::` before the data-only layers.
    #[test]
    fn lowerdir_with_each_layer_escaped() {
        let table = br"1300 29 0:120 / /m rw,relatime - overlay overlay rw,lowerdir=/l/a\072b:/l/c\040d,upperdir=/u,workdir=/w
1301 29 0:121 / /n rw,relatime - overlay overlay rw,lowerdir=/l/a\072b:/l/c::/data/e::/data/f,metacopy=on
";
        assert_eq!(lowers(table, "/m").unwrap(), paths(&["/l/a:b", "/l/c d"]));
        assert_eq!(
            overlay_layers(table, Path::new("/n")).unwrap(),
            OverlayLayers {
                lowers: paths(&["/l/a:b", "/l/c"]),
                data_only: 2,
            }
        );
    }

    /// 6.8+ with the new mount API: a `lowerdir+=` option per layer, the
    /// path as given (a colon in it is part of it).
    #[test]
    fn a_lowerdir_option_per_layer() {
        let table = br"1400 29 0:130 / /n rw,relatime - overlay overlay rw,lowerdir+=/l/top,lowerdir+=/l/a:b\054c\134:d,lowerdir+=l/rel,upperdir=/u,workdir=/w,uuid=on
1401 29 0:131 / /d rw,relatime - overlay overlay ro,lowerdir+=/l/top,datadir+=/d/one,datadir+=/d/two,redirect_dir=follow,metacopy=on
";
        assert_eq!(
            lowers(table, "/n").unwrap(),
            paths(&["/l/top", "/l/a:b,c\\:d", "l/rel"])
        );
        assert_eq!(
            overlay_layers(table, Path::new("/d")).unwrap(),
            OverlayLayers {
                lowers: paths(&["/l/top"]),
                data_only: 2,
            }
        );
    }

    #[test]
    fn the_last_mount_at_the_point_is_the_visible_one() {
        let table = br"1500 29 0:140 / /p rw,relatime - overlay overlay rw,lowerdir=/l/a,upperdir=/u,workdir=/w
1501 1500 0:141 / /p rw,nosuid,nodev - tmpfs tmpfs rw,size=1024k
1502 29 0:150 / /q rw,relatime - tmpfs tmpfs rw
1503 1502 0:151 / /q rw,relatime - overlay overlay rw,lowerdir=/l/b,upperdir=/u2,workdir=/w2
1504 29 0:152 / /r rw,relatime - overlay overlay rw,lowerdir=/l/old,upperdir=/u3,workdir=/w3
1505 1504 0:153 / /r rw,relatime - overlay overlay rw,lowerdir=/l/new,upperdir=/u4,workdir=/w4
";
        assert_eq!(lowers(table, "/p"), None);
        assert_eq!(lowers(table, "/q").unwrap(), paths(&["/l/b"]));
        assert_eq!(lowers(table, "/r").unwrap(), paths(&["/l/new"]));
    }

    #[test]
    fn odd_bytes_are_not_escapes_and_need_not_be_utf8() {
        use Byte::{Escaped, Raw};
        assert_eq!(
            decode(br"\8\400\0401\+12\"),
            [
                Raw(b'\\'),
                Raw(b'8'),
                Raw(b'\\'),
                Raw(b'4'),
                Raw(b'0'),
                Raw(b'0'),
                Escaped(b' '),
                Raw(b'1'),
                Raw(b'\\'),
                Raw(b'+'),
                Raw(b'1'),
                Raw(b'2'),
                Raw(b'\\'),
            ]
        );
        let table = [
            b"60 29 0:50 / /mnt/caf".as_slice(),
            &[0xe9],
            b" rw - overlay overlay rw,lowerdir=/l/",
            &[0xff],
            b"\n61 29 0:51 / /o rw - overlay overlay rw,lowerdir=/l/o\n",
        ]
        .concat();
        assert_eq!(lowers(&table, "/o").unwrap(), paths(&["/l/o"]));
        let point = path_from(b"/mnt/caf\xe9".to_vec());
        assert_eq!(
            overlay_layers(&table, &point).unwrap().lowers,
            [path_from(b"/l/\xff".to_vec())]
        );
    }

    #[test]
    fn lowers_resolve_through_links_and_skip_the_init_layer() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("overlay2");
        for d in ["img/diff", "c1-init/diff", "c1/merged", "l"] {
            std::fs::create_dir_all(home.join(d)).unwrap();
        }
        std::os::unix::fs::symlink("../img/diff", home.join("l/IMG")).unwrap();
        std::os::unix::fs::symlink("../c1-init/diff", home.join("l/INIT")).unwrap();
        let root = home.join("c1/merged");
        let lowers = resolve(&root, paths(&["l/INIT", "l/IMG"])).unwrap();
        assert_eq!(
            lowers,
            [std::fs::canonicalize(home.join("img/diff")).unwrap()]
        );
        let e = resolve(&root, paths(&["l/GONE"])).unwrap_err();
        assert!(matches!(e, RootfsError::Stat { .. }), "{e}");
        assert!(e.to_string().contains("l/GONE"), "{e}");
    }

    #[test]
    fn unusable_layers_fall_back_to_the_merged_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let home = std::fs::canonicalize(tmp.path())
            .unwrap()
            .join("docker root");
        for d in ["img/diff", "c1-init/diff", "c1/merged", "l", "a:b/diff"] {
            std::fs::create_dir_all(home.join(d)).unwrap();
        }
        std::os::unix::fs::symlink("../img/diff", home.join("l/IMG")).unwrap();
        std::os::unix::fs::symlink("../c1-init/diff", home.join("l/INIT")).unwrap();
        std::os::unix::fs::symlink("../a:b/diff", home.join("l/COLON")).unwrap();
        let root = home.join("c1/merged");
        let point = printed(&root);
        let overlay = |options: &str| {
            format!(
                "29 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                 900 29 0:99 / {point} rw,relatime shared:500 - overlay overlay rw,{options},upperdir=/u,workdir=/w\n"
            )
        };
        let dir = RootfsSource::Dir(root.clone());
        let image = RootfsSource::Overlay {
            lowers: vec![home.join("img/diff")],
        };
        let absolute = printed(&home.join("l/IMG"));
        for (options, expected) in [
            ("lowerdir=l/INIT:l/IMG".to_owned(), &image),
            (format!("lowerdir+=l/INIT,lowerdir+={absolute}"), &image),
            ("lowerdir=l/INIT".to_owned(), &dir),
            ("lowerdir=l/INIT:l/GONE:l/IMG".to_owned(), &dir),
            ("lowerdir=l/INIT:/nonexistent/layer".to_owned(), &dir),
            ("lowerdir=l/INIT:l/COLON".to_owned(), &dir),
            ("lowerdir=l/INIT:l/IMG::l/IMG".to_owned(), &dir),
            ("lowerdir+=l/IMG,datadir+=l/IMG".to_owned(), &dir),
        ] {
            let table = overlay(&options);
            assert_eq!(
                &source_in(root.clone(), table.as_bytes()),
                expected,
                "{options}"
            );
        }
        let hidden =
            overlay("lowerdir=l/IMG") + &format!("901 900 0:100 / {point} rw - tmpfs tmpfs rw\n");
        assert_eq!(source_in(root.clone(), hidden.as_bytes()), dir);
        assert_eq!(source_in(root.clone(), b""), dir);
    }

    #[test]
    fn a_plain_directory_is_itself() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            source(tmp.path()).unwrap(),
            RootfsSource::Dir(std::fs::canonicalize(tmp.path()).unwrap())
        );
    }
}

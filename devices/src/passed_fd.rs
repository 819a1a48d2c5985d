//! Files handed over as inherited file descriptors.
//!
//! A jailed device process runs as an unprivileged uid that cannot open
//! the disk images itself: the jailer (root) opens each one and passes it
//! as an inherited descriptor N, naming it `/proc/self/fd/N` (or
//! `/dev/fd/N`). Opening that path again would check the inode's
//! permissions against the jailed uid and fail, so such a path is taken
//! as the descriptor itself: duplicated (close-on-exec), after checking
//! that its access mode allows what the caller asks for. Any other path is
//! opened as usual.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Path prefixes that name one of this process's descriptors.
const FD_DIRS: [&str; 3] = ["/proc/self/fd/", "/proc/thread-self/fd/", "/dev/fd/"];

/// The lowest descriptor taken as passed: 0–2 are stdio, never a disk.
const FIRST_PASSED_FD: RawFd = 3;

/// Opens `path` for reading, and for writing too when `write`.
///
/// For `/proc/self/fd/N`, `/proc/thread-self/fd/N` or `/dev/fd/N`
/// (N ≥ 3), descriptor N is duplicated with `F_DUPFD_CLOEXEC` instead of
/// the path being opened again; its access mode must allow reading
/// (`O_RDONLY` or `O_RDWR`) and, when `write`, writing (`O_RDWR`, since
/// reading is always needed). Every error names the path.
pub fn open(path: &Path, write: bool) -> io::Result<File> {
    match passed_fd(path)? {
        Some(fd) => take(path, fd, write),
        None => OpenOptions::new().read(true).write(write).open(path),
    }
}

/// The descriptor `path` names, `None` for an ordinary path, an error for
/// a descriptor path whose number is not one (`/proc/self/fd/x`, `…/fd/1`).
fn passed_fd(path: &Path) -> io::Result<Option<RawFd>> {
    let Some(text) = path.to_str() else {
        return Ok(None);
    };
    let Some(number) = FD_DIRS.iter().find_map(|dir| text.strip_prefix(dir)) else {
        return Ok(None);
    };
    let fd = if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
        number.parse::<RawFd>().ok()
    } else {
        None
    };
    match fd {
        Some(fd) if fd >= FIRST_PASSED_FD => Ok(Some(fd)),
        Some(fd) => Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{}: descriptor {fd} is stdio, not a passed file",
                path.display()
            ),
        )),
        None => Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{}: not a descriptor number after {}",
                path.display(),
                text.strip_suffix(number).unwrap_or(text)
            ),
        )),
    }
}

/// Duplicates descriptor `fd` (named by `path`) after checking its mode.
fn take(path: &Path, fd: RawFd, write: bool) -> io::Result<File> {
    let named = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("{}: passed descriptor {fd}: {e}", path.display()),
        )
    };
    // SAFETY: F_GETFL reads the flags of descriptor `fd`, whatever it is;
    // no memory is passed, and an fd that is not open gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(named(io::Error::last_os_error()));
    }
    let mode = flags & libc::O_ACCMODE;
    let readable = mode == libc::O_RDONLY || mode == libc::O_RDWR;
    let writable = mode == libc::O_WRONLY || mode == libc::O_RDWR;
    let refuse = |what: &str| {
        Err(io::Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{}: passed descriptor {fd} is open {}, but {what} is needed (pass it O_RDWR{})",
                path.display(),
                describe_mode(flags),
                if write { "" } else { " or O_RDONLY" },
            ),
        ))
    };
    if flags & libc::O_PATH != 0 || !readable {
        return refuse("read access");
    }
    if write && !writable {
        return refuse("write access");
    }
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor (≥ 3) for the same
    // open file; no memory is passed, and the original stays open.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, FIRST_PASSED_FD) };
    if dup < 0 {
        return Err(named(io::Error::last_os_error()));
    }
    // SAFETY: `dup` was just made by fcntl for this call alone: nothing
    // else owns it, so it gets exactly one owner here.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(dup) }))
}

/// The access mode of `flags`, as open(2) spells it.
fn describe_mode(flags: libc::c_int) -> &'static str {
    if flags & libc::O_PATH != 0 {
        return "O_PATH";
    }
    match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "O_RDONLY",
        libc::O_WRONLY => "O_WRONLY",
        libc::O_RDWR => "O_RDWR",
        _ => "with an unknown access mode",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;

    fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    fn fd_path(dir: &str, fd: &impl AsRawFd) -> String {
        format!("{dir}{}", fd.as_raw_fd())
    }

    #[test]
    fn read_only_descriptor_is_refused_for_write_naming_the_path() {
        let f = temp_file(b"disk");
        let ro = File::open(f.path()).unwrap();
        let path = fd_path("/proc/self/fd/", &ro);
        let e = open(Path::new(&path), true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        let text = e.to_string();
        assert!(text.contains(&path), "{text}");
        assert!(
            text.contains("O_RDONLY") && text.contains("write"),
            "{text}"
        );
    }

    #[test]
    fn read_only_descriptor_reads() {
        let f = temp_file(b"the disk's bytes");
        let ro = File::open(f.path()).unwrap();
        for dir in FD_DIRS {
            let path = fd_path(dir, &ro);
            let mut got = open(Path::new(&path), false).unwrap();
            assert_ne!(got.as_raw_fd(), ro.as_raw_fd());
            got.seek(SeekFrom::Start(0)).unwrap();
            let mut text = String::new();
            got.read_to_string(&mut text).unwrap();
            assert_eq!(text, "the disk's bytes", "{path}");
            // Close-on-exec, unlike an inherited descriptor.
            // SAFETY: F_GETFD only reads the descriptor's flags.
            let fd_flags = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(fd_flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
    }

    #[test]
    fn read_write_descriptor_writes() {
        let f = temp_file(b"0000");
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        let got = open(Path::new(&fd_path("/dev/fd/", &rw)), true).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&got, b"11", 1).unwrap();
        assert_eq!(std::fs::read(f.path()).unwrap(), b"0110");
    }

    #[test]
    fn write_only_descriptor_is_refused_for_reading() {
        let f = temp_file(b"x");
        let wo = OpenOptions::new().write(true).open(f.path()).unwrap();
        let path = fd_path("/proc/self/fd/", &wo);
        let e = open(Path::new(&path), false).unwrap_err();
        assert!(e.to_string().contains("O_WRONLY"), "{e}");
        assert!(e.to_string().contains(&path), "{e}");
    }

    #[test]
    fn closed_descriptor_is_named() {
        let path = "/proc/self/fd/987654";
        let e = open(Path::new(path), false).unwrap_err();
        assert!(e.to_string().contains(path), "{e}");
    }

    #[test]
    fn normal_path_still_opens() {
        let f = temp_file(b"plain");
        let mut got = open(f.path(), true).unwrap();
        let mut text = String::new();
        got.read_to_string(&mut text).unwrap();
        assert_eq!(text, "plain");
        got.write_all(b"!").unwrap();
        let missing = open(Path::new("/nonexistent/disk.img"), false).unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn descriptor_paths_that_are_no_number_are_errors() {
        for path in [
            "/proc/self/fd/notanumber",
            "/proc/self/fd/",
            "/dev/fd/-4",
            "/dev/fd/3x",
            "/proc/self/fd/1",
        ] {
            let e = open(Path::new(path), false).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{path}: {e}");
            assert!(e.to_string().contains(path), "{e}");
        }
    }
}

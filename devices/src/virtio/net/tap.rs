//! The host side of virtio-net: an existing tap interface attached by name,
//! moving frames with a virtio-net header in front (`IFF_VNET_HDR`).
//!
//! All the ioctls of the device live here.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VIRTIO_NET_HDR_LEN;

/// Where the kernel's tun/tap driver is opened.
const TUN_PATH: &str = "/dev/net/tun";

/// TUNSETIFF flags: an Ethernet tap, no packet-info prefix, a virtio-net
/// header in front of every frame.
#[allow(clippy::cast_possible_truncation)] // 0x5002 fits in a short
const TAP_FLAGS: libc::c_short =
    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;

/// The header length set at attach time, before features are negotiated.
#[allow(clippy::cast_possible_truncation)] // 12
const HEADER_LEN: libc::c_int = VIRTIO_NET_HDR_LEN as libc::c_int;

/// Errors attaching to a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be a Linux interface name.
    #[error("invalid interface name {0:?}: 1 to 15 bytes, no '/', ':', whitespace or NUL")]
    InvalidName(String),
    /// No interface has that name in this network namespace.
    #[error("no network interface {0:?} in this network namespace (create it with `ip tuntap add dev {0} mode tap`)")]
    NotFound(String),
    /// The tun/tap driver could not be opened.
    #[error("cannot open {TUN_PATH}")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF refused the interface (not a tap, multi-queue, busy, or
    /// owned by someone else).
    #[error("cannot attach to {name:?} as a tap")]
    Attach {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A tap setting could not be applied.
    #[error("cannot set {what} on the tap")]
    Configure {
        /// Which setting (the ioctl).
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Result of tap operations.
pub type Result<T> = std::result::Result<T, TapError>;

/// Frames with a virtio-net header in front, to and from the host: the tap
/// in production, an in-memory fake in tests.
pub trait FrameIo {
    /// Reads one frame into `buf`, returning its length; `WouldBlock` when
    /// none is waiting. A frame longer than `buf` is cut short, and the
    /// length returned is then `buf.len()` or more.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Sets the length of the header in front of every frame (10 or 12).
    fn set_header_len(&mut self, len: usize) -> io::Result<()>;
}

/// An attached tap interface, nonblocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks that `name` can be an interface name (`dev_valid_name` in Linux).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

impl Tap {
    /// Attaches to the existing tap `name` in the caller's network
    /// namespace, with a 12-byte virtio-net header and no offloads.
    ///
    /// A missing interface is an error: TUNSETIFF would otherwise create a
    /// fresh, unconfigured tap that disappears when the device exits.
    pub fn open(name: &str) -> Result<Self> {
        if !valid_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let c_name = CString::new(name).map_err(|_| TapError::InvalidName(name.to_string()))?;
        // SAFETY: `c_name` is a NUL-terminated string that outlives the call;
        // if_nametoindex only reads it.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        if index == 0 {
            return Err(TapError::NotFound(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;

        // SAFETY: `ifreq` is a plain C struct (a name array and a union of
        // integers, addresses and a pointer) for which all-zero bytes are a
        // valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = TAP_FLAGS;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `ifr` is one,
        // valid and exclusively borrowed for the call, and `file` is an open
        // /dev/net/tun descriptor.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if rc < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Self {
            file,
            name: name.to_string(),
        };
        tap.ioctl_int(libc::TUNSETVNETHDRSZ, HEADER_LEN)
            .map_err(|source| TapError::Configure {
                what: "TUNSETVNETHDRSZ",
                source,
            })?;
        tap.ioctl_int(libc::TUNSETVNETLE, 1)
            .map_err(|source| TapError::Configure {
                what: "TUNSETVNETLE",
                source,
            })?;
        // No offloads: the tap must hand over complete, checksummed frames
        // no larger than its MTU.
        tap.set_offload(0).map_err(|source| TapError::Configure {
            what: "TUNSETOFFLOAD",
            source,
        })?;
        tracing::info!(tap = %tap.name, "attached to tap");
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TUNSETOFFLOAD: which offloads frames read from the tap may use.
    fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned
        // long of TUN_F_* bits) and touches no memory of ours.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A tun ioctl that reads one `int` through a pointer.
    fn ioctl_int(&self, request: libc::Ioctl, value: libc::c_int) -> io::Result<()> {
        // SAFETY: `request` is TUNSETVNETHDRSZ or TUNSETVNETLE, which read a
        // single `int` from the pointer; `value` lives across the call and
        // is only read.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, &value) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl FrameIo for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("tap took {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }

    fn set_header_len(&mut self, len: usize) -> io::Result<()> {
        let len =
            libc::c_int::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.ioctl_int(libc::TUNSETVNETHDRSZ, len)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// A tap in memory for the queue logic's tests: frames to hand the
/// driver, frames the driver sent, and an always-readable fd standing in
/// for the tap's in polling tests.
#[cfg(test)]
#[derive(Debug)]
pub(super) struct FakeTap {
    /// Frames waiting to be read, header included.
    pub incoming: std::collections::VecDeque<Vec<u8>>,
    /// Frames written, header included.
    pub sent: Vec<Vec<u8>>,
    /// Makes every write fail.
    pub refuse_writes: bool,
    /// The header length last set.
    pub header_len: usize,
    ready: vmm_sys_util::eventfd::EventFd,
}

#[cfg(test)]
impl FakeTap {
    pub fn new() -> Self {
        let ready = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        ready.write(1).unwrap();
        Self {
            incoming: Default::default(),
            sent: Vec::new(),
            refuse_writes: false,
            header_len: VIRTIO_NET_HDR_LEN,
            ready,
        }
    }
}

#[cfg(test)]
impl FrameIo for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .incoming
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(frame.len())
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.refuse_writes {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.sent.push(frame.to_vec());
        Ok(())
    }

    fn set_header_len(&mut self, len: usize) -> io::Result<()> {
        self.header_len = len;
        Ok(())
    }
}

#[cfg(test)]
impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(valid_name("tap0"));
        assert!(valid_name("capt-0_x.y"));
        assert!(valid_name("a234567890abcde"));
        assert!(!valid_name(""));
        assert!(!valid_name("."));
        assert!(!valid_name(".."));
        assert!(!valid_name("a234567890abcdef"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a:b"));
        assert!(!valid_name("a b"));
        assert!(!valid_name("a\0b"));
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        assert!(matches!(
            Tap::open("no/such"),
            Err(TapError::InvalidName(_))
        ));
    }

    #[test]
    fn missing_interface_is_reported() {
        let err = Tap::open("capsidnx0").unwrap_err();
        assert!(matches!(err, TapError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("capsidnx0"), "{err}");
    }
}

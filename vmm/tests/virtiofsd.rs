//! capsid-vmm's virtio-fs frontend against the real virtiofsd
//! (`/usr/local/bin/virtiofsd`): the vhost-user handshake at connection
//! and DRIVER_OK on shared guest RAM, then FUSE requests on the request
//! queue, answered by virtiofsd through its own mapping of guest memory
//! and signalled back as an interrupt with the VRING bit.
//!
//! The confinement tests speak raw FUSE, as a hostile guest owning its
//! FUSE client would: `..` lookups, lookups under symlink inodes, OPEN of
//! symlinks, names with slashes, and a rename race against a symlink to a
//! directory outside the share. Each runs against virtiofsd with
//! `--sandbox namespace` (what capsid uses) and with `--sandbox none`,
//! where only virtiofsd's own path handling (`openat2` with
//! `RESOLVE_IN_ROOT`, `O_NOFOLLOW`, no open of non-regular inodes) stands
//! between the guest and the host. A control test reads a file inside the
//! share through the same helper, so a broken helper cannot make the
//! escape tests pass by failing everything.
//!
//! virtiofsd missing is a failure (`make deps` installs it), not a skip.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capsid_devices::hosting::mmio::*;
use capsid_devices::virtio::{DeviceEvent, VIRTIO_F_VERSION_1};
use capsid_vmm::config::FsConfig;
use capsid_vmm::devices::vhost_user::fs::{VhostUserFs, VIRTIO_ID_FS};
use capsid_vmm::vstate::memory::{create_guest_memory, Backing};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VIRTIOFSD: &str = "/usr/local/bin/virtiofsd";
/// The sandboxes each confinement test runs under.
const SANDBOXES: [&str; 2] = ["namespace", "none"];

// FUSE opcodes (<linux/fuse.h>).
const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_READLINK: u32 = 5;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_RELEASE: u32 = 18;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_ROOT_ID: u64 = 1;
/// Size of `fuse_in_header` and of `fuse_out_header`.
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;

/// The unique id of FUSE_INIT; later requests count up from it.
const UNIQUE: u64 = 0x1234;
const QUEUE_SIZE: u16 = 16;
/// (descriptors, available ring, used ring) of hiprio and request queue.
const QUEUES: [(u64, u64, u64); 2] = [(0x10000, 0x11000, 0x12000), (0x20000, 0x21000, 0x22000)];
const REQUEST: u64 = 0x30000;
const REQUEST_MAX: usize = 0x1000;
const REPLY: u64 = 0x40000;
const REPLY_LEN: u32 = 0x10000;

/// What the secret outside the share holds; no reply may contain it.
const SECRET_MARKER: &[u8] = b"CAPSID-SECRET-MARKER-5c0f1e9a: must never cross into the guest\n";
const SECRET_NAME: &str = "secret.txt";
const INSIDE_TEXT: &[u8] = b"inside the share\n";
/// What `vol/swap/secret.txt` (inside the share) holds.
const DECOY_TEXT: &[u8] = b"decoy inside the share\n";

fn require_virtiofsd() {
    assert!(
        Path::new(VIRTIOFSD).exists(),
        "{VIRTIOFSD} is not installed: run `make deps` (it builds virtiofsd into /usr/local)"
    );
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_virtiofsd(shared: &Path, socket: &Path, sandbox: &str) -> Daemon {
    require_virtiofsd();
    let child = Command::new(VIRTIOFSD)
        .arg("--shared-dir")
        .arg(shared)
        .arg("--socket-path")
        .arg(socket)
        .args(["--sandbox", sandbox, "--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start virtiofsd");
    let mut daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(status) = daemon.0.try_wait().unwrap() {
            panic!("virtiofsd exited ({status}) before its socket appeared");
        }
        assert!(Instant::now() < deadline, "no virtiofsd socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    daemon
}

#[derive(Default)]
struct Counter(AtomicU32);

impl Interrupt for Counter {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

type Fs = MmioTransport<VhostUserFs>;

fn r(t: &mut Fs, offset: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(offset, &mut d);
    u32::from_le_bytes(d)
}

fn w(t: &mut Fs, offset: u64, v: u32) -> TransportEvent {
    t.write(offset, &v.to_le_bytes())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn errno(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// The part of `fuse_attr` the tests look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attr {
    ino: u64,
    size: u64,
    mode: u32,
    nlink: u32,
}

impl Attr {
    /// `fuse_attr`: ino, size, blocks, atime, mtime, ctime (u64 each),
    /// their nsecs (u32 each), mode, nlink, uid, gid, rdev, blksize, flags.
    fn parse(b: &[u8]) -> Self {
        assert!(b.len() >= 88, "short fuse_attr ({} bytes)", b.len());
        Self {
            ino: u64_at(b, 0),
            size: u64_at(b, 8),
            mode: u32_at(b, 60),
            nlink: u32_at(b, 64),
        }
    }

    fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// `fuse_entry_out`: nodeid, generation, entry and attr timeouts, attr.
#[derive(Debug, Clone, Copy)]
struct Entry {
    nodeid: u64,
    attr: Attr,
}

/// FUSE requests on the request queue of a vhost-user-fs device driven
/// to DRIVER_OK, one at a time: a readable descriptor with the request,
/// a writable one for the answer.
struct Guest {
    t: Fs,
    mem: GuestMemoryMmap,
    kicks: Vec<EventFd>,
    irq: Arc<Counter>,
    /// Requests made available on the request queue so far.
    posted: u16,
    /// Unique id of the next request.
    unique: u64,
}

impl Guest {
    /// Connects to virtiofsd at `socket` and sets the device up as Linux's
    /// driver does, to DRIVER_OK with both queues handed to virtiofsd.
    fn connect(socket: &Path) -> Self {
        let mem = create_guest_memory(32 << 20, Backing::Shared).unwrap();
        let config = FsConfig::new(socket, "capsid");
        let kicks: Vec<EventFd> = (0..config.queue_count())
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let clones = kicks.iter().map(|k| k.try_clone().unwrap()).collect();
        // Connection: SET_OWNER, features, protocol features, queue count.
        let dev = VhostUserFs::connect(&config, clones).expect("handshake with virtiofsd");
        assert!(!dev.backend().is_closed());
        let irq = Arc::new(Counter::default());
        let mut t = MmioTransport::new(dev, mem.clone(), irq.clone());
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_FS);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES) & 1, 1, "VERSION_1");

        // The driver's side, as Linux does it.
        w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(
            &mut t,
            VIRTIO_MMIO_DRIVER_FEATURES,
            (VIRTIO_F_VERSION_1 >> 32) as u32,
        );
        let features_ok =
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        w(&mut t, VIRTIO_MMIO_STATUS, features_ok);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), features_ok);
        for (q, (desc, avail, used)) in QUEUES.iter().enumerate() {
            w(&mut t, VIRTIO_MMIO_QUEUE_SEL, q as u32);
            w(&mut t, VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
            w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, *desc as u32);
            w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, *avail as u32);
            w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, *used as u32);
            w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        // DRIVER_OK: memory table, rings, kick and call fds, enable.
        assert_eq!(
            w(
                &mut t,
                VIRTIO_MMIO_STATUS,
                features_ok | VIRTIO_CONFIG_S_DRIVER_OK
            ),
            TransportEvent::Activated
        );
        assert!(
            t.is_activated(),
            "status {:#x}",
            r(&mut t, VIRTIO_MMIO_STATUS)
        );
        assert_eq!(t.device().started_rings(), &[0, 1]);
        Self {
            t,
            mem,
            kicks,
            irq,
            posted: 0,
            unique: UNIQUE,
        }
    }

    /// Sends one request (`fuse_in_header` of protocol 7.31, then `body`)
    /// and waits for virtiofsd to return its descriptors. With `reply`,
    /// a writable descriptor takes the answer, checked against the
    /// request: `Ok(payload)` after `fuse_out_header`, or `Err(errno)`.
    /// Without (FORGET), nothing is answered.
    fn exchange(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        reply: bool,
    ) -> Result<Vec<u8>, i32> {
        let unique = self.unique;
        self.unique += 1;
        let len = IN_HEADER + body.len();
        assert!(len <= REQUEST_MAX);
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&(len as u32).to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&unique.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding: root
        req.extend_from_slice(body);
        self.mem.write_slice(&req, GuestAddress(REQUEST)).unwrap();
        // A stale answer must not pass for this one.
        self.mem
            .write_slice(&[0u8; OUT_HEADER], GuestAddress(REPLY))
            .unwrap();

        let (desc, avail, used) = QUEUES[1];
        let mut table = Vec::new();
        table.extend_from_slice(&REQUEST.to_le_bytes());
        table.extend_from_slice(&(len as u32).to_le_bytes());
        table.extend_from_slice(&u16::from(reply).to_le_bytes()); // NEXT
        table.extend_from_slice(&1u16.to_le_bytes());
        table.extend_from_slice(&REPLY.to_le_bytes());
        table.extend_from_slice(&REPLY_LEN.to_le_bytes());
        table.extend_from_slice(&2u16.to_le_bytes()); // WRITE
        table.extend_from_slice(&0u16.to_le_bytes());
        self.mem.write_slice(&table, GuestAddress(desc)).unwrap();
        let slot = u64::from(self.posted % QUEUE_SIZE);
        self.mem
            .write_obj(0u16, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        self.posted = self.posted.wrapping_add(1);
        self.mem
            .write_obj(self.posted, GuestAddress(avail + 2))
            .unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        // The kick is what KVM would signal on the guest's QueueNotify.
        self.kicks[1].write(1).unwrap();

        let deadline = Instant::now() + Duration::from_secs(10);
        while self.mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap() != self.posted {
            self.t.process(DeviceEvent::Backend);
            assert!(
                Instant::now() < deadline,
                "virtiofsd did not answer opcode {opcode} (unique {unique:#x})"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        // The call that came with it: VRING interrupt, acknowledged.
        self.t.process(DeviceEvent::Backend);
        w(
            &mut self.t,
            VIRTIO_MMIO_INTERRUPT_ACK,
            VIRTIO_MMIO_INT_VRING,
        );
        let elem = used + 4 + 8 * slot;
        assert_eq!(self.mem.read_obj::<u32>(GuestAddress(elem)).unwrap(), 0);
        let written = self.mem.read_obj::<u32>(GuestAddress(elem + 4)).unwrap();
        if !reply {
            assert_eq!(written, 0, "an answer to opcode {opcode}");
            return Ok(Vec::new());
        }
        let mut header = [0u8; OUT_HEADER];
        self.mem
            .read_slice(&mut header, GuestAddress(REPLY))
            .unwrap();
        let out_len = u32_at(&header, 0);
        let error = i32::from_le_bytes(header[4..8].try_into().unwrap());
        assert_eq!(u64_at(&header, 8), unique, "answer to another request");
        assert_eq!(
            out_len, written,
            "opcode {opcode}: header length vs used length"
        );
        assert!(out_len as usize >= OUT_HEADER && out_len <= REPLY_LEN);
        assert!(error <= 0, "positive error {error}");
        if error < 0 {
            assert_eq!(out_len as usize, OUT_HEADER, "an error with a payload");
            return Err(-error);
        }
        let mut payload = vec![0u8; out_len as usize - OUT_HEADER];
        self.mem
            .read_slice(&mut payload, GuestAddress(REPLY + OUT_HEADER as u64))
            .unwrap();
        Ok(payload)
    }

    fn request(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Result<Vec<u8>, i32> {
        self.exchange(opcode, nodeid, body, true)
    }

    /// FUSE_INIT (`fuse_init_in` of 7.31, no flags): the protocol version
    /// virtiofsd answers with.
    fn init(&mut self) -> (u32, u32) {
        let mut body = Vec::new();
        body.extend_from_slice(&7u32.to_le_bytes()); // major
        body.extend_from_slice(&31u32.to_le_bytes()); // minor
        body.extend_from_slice(&0x2_0000u32.to_le_bytes()); // max_readahead
        body.extend_from_slice(&[0u8; 52]); // flags, flags2, unused
        let out = self.request(FUSE_INIT, 0, &body).expect("FUSE_INIT");
        (u32_at(&out, 0), u32_at(&out, 4))
    }

    /// Connects and sends FUSE_INIT.
    fn mount(socket: &Path) -> Self {
        let mut guest = Self::connect(socket);
        let (major, minor) = guest.init();
        assert_eq!(major, 7);
        assert!(minor >= 31, "minor {minor}");
        guest
    }

    fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<Entry, i32> {
        let mut body = name.to_vec();
        body.push(0);
        let out = self.request(FUSE_LOOKUP, parent, &body)?;
        assert!(
            out.len() >= 128,
            "short fuse_entry_out ({} bytes)",
            out.len()
        );
        let entry = Entry {
            nodeid: u64_at(&out, 0),
            attr: Attr::parse(&out[40..]),
        };
        assert_ne!(entry.nodeid, 0, "a negative entry for {name:?}");
        Ok(entry)
    }

    fn forget(&mut self, nodeid: u64, nlookup: u64) {
        self.exchange(FUSE_FORGET, nodeid, &nlookup.to_le_bytes(), false)
            .unwrap();
    }

    fn getattr(&mut self, nodeid: u64) -> Result<Attr, i32> {
        // fuse_getattr_in: getattr_flags, dummy, fh.
        let out = self.request(FUSE_GETATTR, nodeid, &[0u8; 16])?;
        Ok(Attr::parse(&out[16..]))
    }

    fn readlink(&mut self, nodeid: u64) -> Result<Vec<u8>, i32> {
        self.request(FUSE_READLINK, nodeid, &[])
    }

    fn open_with(&mut self, opcode: u32, nodeid: u64) -> Result<u64, i32> {
        // fuse_open_in: flags (O_RDONLY), open_flags.
        let out = self.request(opcode, nodeid, &[0u8; 8])?;
        Ok(u64_at(&out, 0))
    }

    fn open(&mut self, nodeid: u64) -> Result<u64, i32> {
        self.open_with(FUSE_OPEN, nodeid)
    }

    fn read_with(&mut self, opcode: u32, nodeid: u64, fh: u64) -> Result<Vec<u8>, i32> {
        // fuse_read_in: fh, offset, size, read_flags, lock_owner, flags,
        // padding.
        let mut body = Vec::new();
        body.extend_from_slice(&fh.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&4096u32.to_le_bytes());
        body.extend_from_slice(&[0u8; 20]);
        self.request(opcode, nodeid, &body)
    }

    fn release_with(&mut self, opcode: u32, nodeid: u64, fh: u64) {
        // fuse_release_in: fh, flags, release_flags, lock_owner.
        let mut body = fh.to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 16]);
        self.request(opcode, nodeid, &body).expect("RELEASE");
    }

    /// OPEN, READ (the first 4 KiB), RELEASE.
    fn read_file(&mut self, nodeid: u64) -> Result<Vec<u8>, i32> {
        let fh = self.open(nodeid)?;
        let data = self.read_with(FUSE_READ, nodeid, fh);
        self.release_with(FUSE_RELEASE, nodeid, fh);
        data
    }

    /// OPENDIR, READDIR (one 4 KiB batch), RELEASEDIR: the names.
    fn list(&mut self, nodeid: u64) -> Result<Vec<String>, i32> {
        let fh = self.open_with(FUSE_OPENDIR, nodeid)?;
        let out = self.read_with(FUSE_READDIR, nodeid, fh);
        self.release_with(FUSE_RELEASEDIR, nodeid, fh);
        let out = out?;
        // fuse_dirent: ino, off, namelen, type, name padded to 8 bytes.
        let mut names = Vec::new();
        let mut at = 0;
        while at + 24 <= out.len() {
            let namelen = u32_at(&out, at + 16) as usize;
            names.push(String::from_utf8_lossy(&out[at + 24..at + 24 + namelen]).into_owned());
            at += (24 + namelen).div_ceil(8) * 8;
        }
        Ok(names)
    }
}

/// The share and what lies around it, on the host:
///
/// ```text
/// <tmp>/share/                    --shared-dir
/// <tmp>/share/vol/inside.txt
/// <tmp>/share/vol/abs -> <tmp>/secret/secret.txt
/// <tmp>/share/vol/up -> ../../..
/// <tmp>/share/vol/swap/secret.txt (a decoy)
/// <tmp>/secret/secret.txt         SECRET_MARKER, outside the share
/// ```
///
/// Fields drop in order: the guest (taking its rings back), the daemon,
/// the files.
struct Share {
    guest: Guest,
    _daemon: Daemon,
    vol: PathBuf,
    secret_dir: PathBuf,
    secret: PathBuf,
    /// `<tmp>`'s own name, for paths that climb out of the share.
    top_name: String,
    dir: tempfile::TempDir,
}

impl Share {
    fn new(sandbox: &str) -> Self {
        require_virtiofsd();
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("share");
        let vol = shared.join("vol");
        std::fs::create_dir_all(vol.join("swap")).unwrap();
        std::fs::write(vol.join("inside.txt"), INSIDE_TEXT).unwrap();
        std::fs::write(vol.join("swap").join(SECRET_NAME), DECOY_TEXT).unwrap();
        let secret_dir = dir.path().join("secret");
        std::fs::create_dir(&secret_dir).unwrap();
        let secret = secret_dir.join(SECRET_NAME);
        std::fs::write(&secret, SECRET_MARKER).unwrap();
        std::os::unix::fs::symlink(&secret, vol.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../..", vol.join("up")).unwrap();
        // On the host, both links do reach out of the share.
        assert_eq!(std::fs::read(vol.join("abs")).unwrap(), SECRET_MARKER);
        assert_eq!(
            std::fs::canonicalize(vol.join("up")).unwrap(),
            std::fs::canonicalize(dir.path().parent().unwrap()).unwrap()
        );
        let socket = dir.path().join("virtiofsd.sock");
        let daemon = start_virtiofsd(&shared, &socket, sandbox);
        let guest = Guest::mount(&socket);
        let top_name = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        Self {
            guest,
            _daemon: daemon,
            vol,
            secret_dir,
            secret,
            top_name,
            dir,
        }
    }

    fn host_ino(path: &Path) -> u64 {
        std::fs::symlink_metadata(path).unwrap().ino()
    }

    /// Host inodes a guest must never get hold of: the secret, its
    /// directory, and every directory from the share's parent up (those on
    /// the share's file system: inode numbers of others may collide).
    fn outside_inos(&self) -> Vec<u64> {
        let dev = std::fs::metadata(&self.vol).unwrap().dev();
        let mut inos = vec![
            Self::host_ino(&self.secret),
            Self::host_ino(&self.secret_dir),
        ];
        inos.extend(
            self.dir
                .path()
                .ancestors()
                .map(|p| std::fs::metadata(p).unwrap())
                .filter(|m| m.dev() == dev)
                .map(|m| m.ino()),
        );
        inos
    }

    fn vol_node(&mut self) -> Entry {
        self.guest.lookup(FUSE_ROOT_ID, b"vol").expect("LOOKUP vol")
    }

    /// An entry the guest got must not be outside; a regular file it names
    /// must not read as the secret.
    fn assert_inside(&mut self, what: &str, entry: &Entry) {
        assert!(
            !self.outside_inos().contains(&entry.attr.ino),
            "{what}: virtiofsd handed out host inode {} from outside the share",
            entry.attr.ino
        );
        if entry.attr.kind() == libc::S_IFREG {
            let data = self.guest.read_file(entry.nodeid);
            assert!(
                !data.as_ref().is_ok_and(|d| contains(d, SECRET_MARKER)),
                "{what}: the guest read the secret"
            );
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn virtiofsd_takes_the_rings_and_answers_fuse_init() {
    require_virtiofsd();
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("share");
    std::fs::create_dir(&shared).unwrap();
    let socket = dir.path().join("virtiofsd.sock");
    let _daemon = start_virtiofsd(&shared, &socket, "namespace");

    let mut guest = Guest::connect(&socket);
    let (major, minor) = guest.init();
    assert_eq!(major, 7);
    assert!(minor >= 31, "minor {minor}");
    // One call from virtiofsd, turned into one VRING interrupt.
    assert_eq!(guest.irq.0.load(Ordering::SeqCst), 1);
    let used = QUEUES[1].2;
    assert_eq!(
        guest.mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(),
        1
    );

    // Reset takes the rings back from virtiofsd; the process lives on.
    let t = &mut guest.t;
    assert_eq!(w(t, VIRTIO_MMIO_STATUS, 0), TransportEvent::Reset);
    assert!(t.device().started_rings().is_empty());
    assert!(!t.device().backend().is_closed());
}

/// The control: through the same helper, what is inside the share is
/// found, listed and read, and slashed names resolve inside it. If this
/// fails, the escape tests prove nothing.
#[test]
fn the_helper_reads_what_is_inside_the_share() {
    for sandbox in SANDBOXES {
        let mut share = Share::new(sandbox);
        let g = &mut share.guest;
        let root = g.getattr(FUSE_ROOT_ID).expect("GETATTR root");
        assert_eq!(root.kind(), libc::S_IFDIR);
        let vol = g.lookup(FUSE_ROOT_ID, b"vol").expect("LOOKUP vol");
        assert_eq!(vol.attr.kind(), libc::S_IFDIR);
        assert_eq!(vol.attr.ino, Share::host_ino(&share.vol));
        let mut names = g.list(vol.nodeid).expect("READDIR vol");
        names.sort();
        assert_eq!(
            names,
            [".", "..", "abs", "inside.txt", "swap", "up"],
            "{sandbox}"
        );

        let inside = g.lookup(vol.nodeid, b"inside.txt").expect("inside.txt");
        assert_eq!(inside.attr.kind(), libc::S_IFREG);
        assert_eq!(inside.attr.size, INSIDE_TEXT.len() as u64);
        // attr.ino is the host's: comparing with host inodes means something.
        assert_eq!(
            inside.attr.ino,
            Share::host_ino(&share.vol.join("inside.txt"))
        );
        assert_eq!(g.read_file(inside.nodeid).unwrap(), INSIDE_TEXT);
        assert_eq!(g.getattr(inside.nodeid).unwrap(), inside.attr);
        let decoy = g
            .lookup(vol.nodeid, b"swap/secret.txt")
            .expect("slashed name");
        assert_eq!(g.read_file(decoy.nodeid).unwrap(), DECOY_TEXT);
        let via_root = g
            .lookup(FUSE_ROOT_ID, b"vol/inside.txt")
            .expect("vol/inside.txt");
        assert_eq!(via_root.nodeid, inside.nodeid, "same inode, same node id");
        g.forget(via_root.nodeid, 1);
        assert_eq!(g.read_file(inside.nodeid).unwrap(), INSIDE_TEXT);
        assert_eq!(g.lookup(vol.nodeid, b"absent").unwrap_err(), libc::ENOENT);
    }
}

/// LOOKUP ".." never names anything outside: on the root it is the root
/// itself (or an error), however often repeated; on `vol` it stays inside
/// (virtiofsd 1.14 answers `vol` itself: it resolves every name with
/// `openat2(RESOLVE_IN_ROOT)` relative to the parent node, so ".." cannot
/// climb even one level).
#[test]
fn dotdot_never_leaves_the_share() {
    for sandbox in SANDBOXES {
        let mut share = Share::new(sandbox);
        let root = share.guest.getattr(FUSE_ROOT_ID).expect("GETATTR root");
        let vol = share.vol_node();

        let mut node = FUSE_ROOT_ID;
        for step in 1..=8 {
            match share.guest.lookup(node, b"..") {
                Ok(up) => {
                    assert_eq!(up.attr, root, "{sandbox}: \"..\" #{step} from the root");
                    share.assert_inside("root/..", &up);
                    node = up.nodeid;
                }
                Err(e) => {
                    eprintln!("{sandbox}: \"..\" #{step} from the root: {}", errno(e));
                    break;
                }
            }
        }

        let inside = [root.ino, vol.attr.ino];
        let mut node = vol.nodeid;
        for step in 1..=8 {
            match share.guest.lookup(node, b"..") {
                Ok(up) => {
                    assert!(
                        inside.contains(&up.attr.ino),
                        "{sandbox}: \"..\" #{step} from vol is host inode {}, neither the \
                         root ({}) nor vol ({})",
                        up.attr.ino,
                        root.ino,
                        vol.attr.ino
                    );
                    if step == 1 {
                        let which = if up.attr == root {
                            "the root"
                        } else {
                            "vol itself"
                        };
                        eprintln!("{sandbox}: \"..\" from vol is {which}");
                    }
                    share.assert_inside("vol/..", &up);
                    node = up.nodeid;
                }
                Err(e) => {
                    eprintln!("{sandbox}: \"..\" #{step} from vol: {}", errno(e));
                    break;
                }
            }
        }
    }
}

/// The symlinks pointing out of the share are handed out as symlinks
/// (their own inode and text), never opened, never used as a directory.
#[test]
fn symlinks_out_of_the_share_are_never_followed() {
    for sandbox in SANDBOXES {
        let mut share = Share::new(sandbox);
        let vol = share.vol_node();
        let secret_path = share.secret.as_os_str().as_bytes().to_vec();
        let top = share.top_name.clone();
        let secret_ino = Share::host_ino(&share.secret);
        for (name, text, probes) in [
            (
                "abs",
                secret_path,
                vec![SECRET_NAME.to_owned(), ".".to_owned()],
            ),
            (
                "up",
                b"../../..".to_vec(),
                vec!["etc".to_owned(), top.clone(), SECRET_NAME.to_owned()],
            ),
        ] {
            let g = &mut share.guest;
            let link = g.lookup(vol.nodeid, name.as_bytes()).expect(name);
            assert_eq!(
                link.attr.kind(),
                libc::S_IFLNK,
                "{sandbox}: {name} {link:?}"
            );
            assert_eq!(
                link.attr.size,
                text.len() as u64,
                "{name}: the link's own size"
            );
            assert_ne!(link.attr.ino, secret_ino);
            assert_eq!(g.getattr(link.nodeid).unwrap(), link.attr, "{name}");
            assert_eq!(g.readlink(link.nodeid).unwrap(), text, "{name}");
            let opened = g.open(link.nodeid);
            assert!(opened.is_err(), "{sandbox}: OPEN {name} gave {opened:?}");
            let listed = g.open_with(FUSE_OPENDIR, link.nodeid);
            assert!(listed.is_err(), "{sandbox}: OPENDIR {name} gave {listed:?}");
            let mut errors = vec![errno(opened.unwrap_err())];
            for probe in probes {
                let under = g.lookup(link.nodeid, probe.as_bytes());
                assert!(
                    under.is_err(),
                    "{sandbox}: LOOKUP {probe:?} under {name}: {under:?}"
                );
                errors.push(errno(under.unwrap_err()));
            }
            eprintln!("{sandbox}: {name}: OPEN, LOOKUP under it: {errors:?}");
        }
    }
}

/// virtiofsd accepts names with slashes in LOOKUP (a Linux guest never
/// sends them; a hostile one may) and resolves them, symlinks in the
/// middle included: none of these reaches the secret, though each naming
/// it does on the host (checked first), as it would through a plain
/// `openat` without a sandbox.
#[test]
fn slashed_names_stay_in_the_share() {
    for sandbox in SANDBOXES {
        let mut share = Share::new(sandbox);
        let vol = share.vol_node();
        let top = share.top_name.clone();
        let secret_rel = format!("secret/{SECRET_NAME}");
        let from_vol = [
            "abs/".to_owned(),
            "abs/.".to_owned(),
            format!("up/{top}/{secret_rel}"),
            format!("../../{secret_rel}"),
            format!("swap/../../../{secret_rel}"),
            format!("up/../../../..{}", share.secret.display()),
            format!("{}", share.secret.display()),
        ];
        let from_root = [
            format!("../{secret_rel}"),
            format!("vol/up/{top}/{secret_rel}"),
            "vol/abs/".to_owned(),
            "../..".to_owned(),
            format!("../../{top}/{secret_rel}"),
        ];
        let shared = share.vol.parent().unwrap().to_owned();
        for (base, name) in from_vol
            .iter()
            .map(|n| (&share.vol, n))
            .chain(from_root.iter().map(|n| (&shared, n)))
            .filter(|(_, n)| n.ends_with(SECRET_NAME))
        {
            let host = std::fs::read(base.join(name));
            assert_eq!(host.unwrap(), SECRET_MARKER, "{name} on the host");
        }
        let mut found = Vec::new();
        for (parent, name) in from_vol
            .iter()
            .map(|n| (vol.nodeid, n))
            .chain(from_root.iter().map(|n| (FUSE_ROOT_ID, n)))
        {
            if let Ok(entry) = share.guest.lookup(parent, name.as_bytes()) {
                found.push(format!("{name} (ino {})", entry.attr.ino));
                share.assert_inside(name, &entry);
                share.guest.forget(entry.nodeid, 1);
            }
        }
        eprintln!(
            "{sandbox}: of {} slashed names, found (inside): {found:?}",
            from_vol.len() + from_root.len()
        );
    }
}

/// `vol/swap` flips between a directory (holding a decoy `secret.txt`)
/// and a symlink to the secret's directory (absolute and relative
/// targets, alternately) as fast as a host thread can, for 2 s, while the
/// guest looks up `swap` then `secret.txt` under it, and `swap/secret.txt`
/// in one name, reading whatever it finds: never the secret.
#[test]
fn swapping_a_directory_for_a_symlink_never_leaks() {
    #[derive(Debug, Default)]
    struct Seen {
        rounds: u32,
        swap_dir: u32,
        swap_link: u32,
        swap_absent: u32,
        under_dir_read: u32,
        under_dir_failed: u32,
        under_link_failed: u32,
        slashed_read: u32,
        slashed_failed: u32,
    }
    for sandbox in SANDBOXES {
        let mut share = Share::new(sandbox);
        let vol = share.vol_node();
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let stop = stop.clone();
            let swap = share.vol.join("swap");
            let away = share.vol.join("swap.dir");
            let targets = [share.secret_dir.clone(), PathBuf::from("../../secret")];
            assert_eq!(
                std::fs::read(share.vol.join(&targets[1]).join(SECRET_NAME)).unwrap(),
                SECRET_MARKER
            );
            std::thread::spawn(move || {
                let mut flips = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    std::fs::rename(&swap, &away).unwrap();
                    std::os::unix::fs::symlink(&targets[flips as usize % 2], &swap).unwrap();
                    std::fs::remove_file(&swap).unwrap();
                    std::fs::rename(&away, &swap).unwrap();
                    flips += 1;
                }
                flips
            })
        };

        let mut seen = Seen::default();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            seen.rounds += 1;
            let g = &mut share.guest;
            match g.lookup(vol.nodeid, b"swap") {
                Ok(swap) if swap.attr.kind() == libc::S_IFDIR => {
                    seen.swap_dir += 1;
                    match g.lookup(swap.nodeid, SECRET_NAME.as_bytes()) {
                        Ok(file) => {
                            let data = g.read_file(file.nodeid).expect("read the decoy");
                            assert!(!contains(&data, SECRET_MARKER), "{sandbox}: leaked");
                            assert_eq!(data, DECOY_TEXT);
                            g.forget(file.nodeid, 1);
                            seen.under_dir_read += 1;
                        }
                        Err(_) => seen.under_dir_failed += 1,
                    }
                    g.forget(swap.nodeid, 1);
                }
                Ok(swap) => {
                    assert_eq!(swap.attr.kind(), libc::S_IFLNK, "{swap:?}");
                    seen.swap_link += 1;
                    let under = g.lookup(swap.nodeid, SECRET_NAME.as_bytes());
                    assert!(
                        under.is_err(),
                        "{sandbox}: found under the symlink: {under:?}"
                    );
                    seen.under_link_failed += 1;
                    assert!(
                        g.open(swap.nodeid).is_err(),
                        "{sandbox}: opened the symlink"
                    );
                    g.forget(swap.nodeid, 1);
                }
                Err(e) => {
                    assert_eq!(e, libc::ENOENT, "{sandbox}: LOOKUP swap: {}", errno(e));
                    seen.swap_absent += 1;
                }
            }
            match g.lookup(vol.nodeid, format!("swap/{SECRET_NAME}").as_bytes()) {
                Ok(file) => {
                    share.assert_inside("swap/secret.txt", &file);
                    let data = share.guest.read_file(file.nodeid).expect("read the decoy");
                    assert_eq!(data, DECOY_TEXT, "{sandbox}");
                    share.guest.forget(file.nodeid, 1);
                    seen.slashed_read += 1;
                }
                Err(_) => seen.slashed_failed += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        let flips = flipper.join().unwrap();
        eprintln!("{sandbox}: {flips} host flips; {seen:?}");
        assert!(seen.rounds >= 200, "{sandbox}: only {} rounds", seen.rounds);
        assert!(flips >= 200, "{sandbox}: only {flips} flips");
        assert!(
            seen.swap_dir > 0 && seen.swap_link > 0,
            "{sandbox}: the race was not exercised: {seen:?}"
        );
        assert!(
            seen.under_dir_read > 0 && seen.slashed_read > 0,
            "{sandbox}: the decoy was never read, so reads prove nothing: {seen:?}"
        );
    }
}

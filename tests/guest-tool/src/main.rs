//! capsid-guest-tool: runs inside test guests (busybox has no vsock).
//!
//! * `vsock-connect PORT`: connects to the host's vsock PORT, copies stdin
//!   to it (then half-closes) and what comes back to stdout.
//! * `vsock-echo-server PORT NOTIFY_PORT`: listens on vsock PORT and echoes
//!   every connection back; once listening it connects to the host's
//!   NOTIFY_PORT and exits when the host closes that connection.
//! * `resolve NAME`: asks the first nameserver of /etc/resolv.conf for
//!   NAME's IPv4 address (a plain DNS query over UDP: static binaries
//!   cannot use glibc's NSS) and prints it.
//! * `iobench DIR [--size-mib N] [--ops N] [--files N]`: file I/O
//!   throughput and metadata operations in DIR (benches/volumes.py), one
//!   JSON object per line; every file it makes is removed again.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Instant;

const HOST_CID: u32 = 2;

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the returned fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn connect(port: u32) -> std::io::Result<File> {
    let fd = vsock_socket()?;
    let a = addr(HOST_CID, port);
    // SAFETY: `a` is a valid sockaddr_vm of the size passed.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            std::ptr::from_ref(&a).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(File::from(fd))
}

fn shutdown_write(f: &File) {
    // SAFETY: shutdown(2) on a socket fd we own.
    unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(f), libc::SHUT_WR) };
}

fn copy_and_half_close(mut from: impl Read, to: &File) -> std::io::Result<u64> {
    let mut to_w = to;
    let n = std::io::copy(&mut from, &mut to_w)?;
    shutdown_write(to);
    Ok(n)
}

fn cmd_connect(port: u32) -> std::io::Result<()> {
    let sock = connect(port)?;
    let writer = sock.try_clone()?;
    let t = std::thread::spawn(move || copy_and_half_close(std::io::stdin().lock(), &writer));
    let mut out = std::io::stdout().lock();
    std::io::copy(&mut &sock, &mut out)?;
    out.flush()?;
    t.join()
        .map_err(|_| std::io::Error::other("stdin thread panicked"))??;
    Ok(())
}

fn cmd_echo_server(port: u32, notify_port: u32) -> std::io::Result<()> {
    let fd = vsock_socket()?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let a = addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `a` is a valid sockaddr_vm of the size passed; raw is our socket.
    let rc = unsafe {
        libc::bind(
            raw,
            std::ptr::from_ref(&a).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen(2) on our bound socket.
    if rc < 0 || unsafe { libc::listen(raw, 64) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::thread::spawn(move || loop {
        // SAFETY: accept(2) on our listening socket; null address is allowed.
        let c = unsafe {
            libc::accept4(
                raw,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            continue;
        }
        // SAFETY: c is a fresh descriptor from accept4 that nothing else owns.
        let conn = File::from(unsafe { OwnedFd::from_raw_fd(c) });
        std::thread::spawn(move || {
            if let Ok(reader) = conn.try_clone() {
                let _ = copy_and_half_close(reader, &conn);
            }
        });
    });
    // Ready: tell the host, then live as long as the host keeps this open.
    let mut control = connect(notify_port)?;
    control.write_all(b"listening\n")?;
    let mut sink = Vec::new();
    let _ = control.read_to_end(&mut sink);
    drop(fd);
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = |i: usize| args.get(i).and_then(|p| p.parse::<u32>().ok());
    let result = match (args.first().map(String::as_str), port(1), port(2)) {
        (Some("vsock-connect"), Some(p), _) => cmd_connect(p),
        (Some("vsock-echo-server"), Some(p), Some(n)) => cmd_echo_server(p, n),
        (Some("resolve"), _, _) if args.len() == 2 => cmd_resolve(&args[1]),
        (Some("iobench"), _, _) => match IoBench::parse(&args[1..]) {
            Some(bench) => bench.run(),
            None => Err(std::io::Error::other(
                "usage: iobench DIR [--size-mib N] [--ops N] [--files N]",
            )),
        },
        _ => {
            eprintln!(
                "usage: capsid-guest-tool vsock-connect PORT | vsock-echo-server PORT NOTIFY_PORT \
                 | resolve NAME | iobench DIR [--size-mib N] [--ops N] [--files N]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capsid-guest-tool: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves `name` to an IPv4 address with one DNS query.
fn cmd_resolve(name: &str) -> std::io::Result<()> {
    let conf = std::fs::read_to_string("/etc/resolv.conf")?;
    let server = conf
        .lines()
        .find_map(|l| l.strip_prefix("nameserver"))
        .map(str::trim)
        .ok_or_else(|| std::io::Error::other("no nameserver in /etc/resolv.conf"))?;
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    let mut reply = [0u8; 1500];
    let mut n = 0;
    for _ in 0..3 {
        socket.send_to(&query, (server, 53))?;
        if let Ok((got, _)) = socket.recv_from(&mut reply) {
            n = got;
            break;
        }
    }
    let reply = &reply[..n];
    let bad = || std::io::Error::other(format!("no A record for {name} from {server}"));
    if n < 12 || reply[0..2] != [0x12, 0x34] {
        return Err(bad());
    }
    let answers = u16::from_be_bytes([reply[6], reply[7]]);
    // Skip the header and the question (its name, type, class).
    let mut at = 12;
    while *reply.get(at).ok_or_else(bad)? != 0 {
        at += usize::from(reply[at]) + 1;
    }
    at += 5;
    for _ in 0..answers {
        // The answer's name: a pointer, or labels.
        if reply.get(at).ok_or_else(bad)? & 0xc0 == 0xc0 {
            at += 2;
        } else {
            while *reply.get(at).ok_or_else(bad)? != 0 {
                at += usize::from(reply[at]) + 1;
            }
            at += 1;
        }
        let field = reply.get(at..at + 10).ok_or_else(bad)?;
        let kind = u16::from_be_bytes([field[0], field[1]]);
        let len = usize::from(u16::from_be_bytes([field[8], field[9]]));
        at += 10;
        let data = reply.get(at..at + len).ok_or_else(bad)?;
        if kind == 1 && len == 4 {
            println!("{}.{}.{}.{}", data[0], data[1], data[2], data[3]);
            return Ok(());
        }
        at += len;
    }
    Err(bad())
}

/// Block size of the random reads and writes.
const IO_BLOCK: u64 = 4096;
/// Size of each sequential write and read.
const SEQ_CHUNK: usize = 1 << 20;

/// `iobench`: what to measure, in which directory.
#[derive(Debug)]
struct IoBench {
    dir: std::path::PathBuf,
    size_mib: u64,
    ops: u64,
    files: u64,
}

/// Removes what iobench made when it goes out of scope, on error too.
#[derive(Debug)]
struct Cleanup {
    file: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// xorshift64: the same offsets in every run and on every side.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Prints one result line: `{"test":TEST,FIELDS,"secs":S,"UNIT":COUNT/S}`.
fn report(test: &str, fields: &str, count: f64, unit: &str, start: Instant) {
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    println!(
        r#"{{"test":"{test}",{fields},"secs":{secs:.4},"{unit}":{:.2}}}"#,
        count / secs
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

impl IoBench {
    fn parse(args: &[String]) -> Option<Self> {
        let (dir, mut rest) = args.split_first()?;
        let mut bench = Self {
            dir: dir.into(),
            size_mib: 64,
            ops: 2000,
            files: 500,
        };
        while let [flag, value, tail @ ..] = rest {
            let value = value.parse::<u64>().ok().filter(|v| *v > 0)?;
            match flag.as_str() {
                "--size-mib" => bench.size_mib = value,
                "--ops" => bench.ops = value,
                "--files" => bench.files = value,
                _ => return None,
            }
            rest = tail;
        }
        rest.is_empty().then_some(bench)
    }

    fn run(&self) -> std::io::Result<()> {
        let tag = format!("iobench-{}", std::process::id());
        let cleanup = Cleanup {
            file: self.dir.join(format!("{tag}.bin")),
            dir: self.dir.join(format!("{tag}.d")),
        };
        let written = &cleanup.file;
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);

        // Sequential write: 1 MiB writes, then fsync.
        let mut chunk = vec![0u8; SEQ_CHUNK];
        for b in chunk.chunks_mut(8) {
            let word = rng.next().to_le_bytes();
            b.copy_from_slice(&word[..b.len()]);
        }
        let start = Instant::now();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(written)?;
        for _ in 0..self.size_mib {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        drop(f);
        let size = self.size_mib << 20;
        let fields = format!(r#""mib":{}"#, self.size_mib);
        report("seq_write", &fields, mib(size), "mib_s", start);

        // Sequential reads of read.bin (made by the caller, so not in this
        // kernel's page cache); again through a new open (what a cache
        // kept across opens gives); and a third pass on that same open.
        let pre_made = self.dir.join("read.bin");
        let (source, note) = if pre_made.is_file() {
            (pre_made, "read.bin")
        } else {
            (written.clone(), "written file (no read.bin: may be cached)")
        };
        let mut f: Option<File> = None;
        for test in ["seq_read", "seq_reread", "seq_reread_same_fd"] {
            let start = Instant::now();
            let file = match f.take() {
                Some(mut file) if test == "seq_reread_same_fd" => {
                    file.seek(std::io::SeekFrom::Start(0))?;
                    file
                }
                _ => File::open(&source)?,
            };
            let file = f.insert(file);
            let mut total = 0u64;
            loop {
                let n = file.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let fields = format!(r#""source":"{note}","mib":{:.2}"#, mib(total));
            report(test, &fields, mib(total), "mib_s", start);
        }
        drop(f);

        // Random 4 KiB reads at aligned offsets of read.bin.
        let rand_io = |test: &str,
                       path: &std::path::Path,
                       write: bool,
                       rng: &mut XorShift|
         -> std::io::Result<()> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)?;
            let blocks = f.metadata()?.len() / IO_BLOCK;
            if blocks == 0 {
                return Err(std::io::Error::other(format!(
                    "{} is smaller than {IO_BLOCK} bytes",
                    path.display()
                )));
            }
            let mut block = [0u8; IO_BLOCK as usize];
            let start = Instant::now();
            for _ in 0..self.ops {
                let offset = rng.next() % blocks * IO_BLOCK;
                if write {
                    block[..8].copy_from_slice(&offset.to_le_bytes());
                    std::os::unix::fs::FileExt::write_all_at(&f, &block, offset)?;
                } else {
                    std::os::unix::fs::FileExt::read_exact_at(&f, &mut block, offset)?;
                }
            }
            if write {
                f.sync_all()?;
            }
            let fields = format!(r#""ops":{}"#, self.ops);
            report(test, &fields, self.ops as f64, "iops", start);
            Ok(())
        };
        rand_io("rand_read", &source, false, &mut rng)?;
        // Random 4 KiB writes into the written file, then fsync.
        rand_io("rand_write", written, true, &mut rng)?;
        std::fs::remove_file(written)?;

        // Metadata: create (64 bytes each), stat, unlink many small files.
        std::fs::create_dir(&cleanup.dir)?;
        let names: Vec<_> = (0..self.files)
            .map(|i| cleanup.dir.join(format!("f{i}")))
            .collect();
        let content = [b'x'; 64];
        let count = self.files as f64;
        let fields = format!(r#""files":{}"#, self.files);
        let start = Instant::now();
        for name in &names {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(name)?
                .write_all(&content)?;
        }
        report("create", &fields, count, "ops_s", start);
        let start = Instant::now();
        for name in &names {
            if std::fs::symlink_metadata(name)?.len() != 64 {
                return Err(std::io::Error::other(format!(
                    "{} is not 64 bytes",
                    name.display()
                )));
            }
        }
        report("stat", &fields, count, "ops_s", start);
        let start = Instant::now();
        for name in &names {
            std::fs::remove_file(name)?;
        }
        report("unlink", &fields, count, "ops_s", start);
        std::fs::remove_dir(&cleanup.dir)?;
        Ok(())
    }
}

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

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

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
        _ => {
            eprintln!(
                "usage: capsid-guest-tool vsock-connect PORT | vsock-echo-server PORT NOTIFY_PORT \
                 | resolve NAME"
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

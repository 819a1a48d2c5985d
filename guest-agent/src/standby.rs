//! The runtime helper started ahead of time: the "standby".
//!
//! Spawning the runtime helper ([`crate::runtime`]) for a job — a
//! `posix_spawn` of `/proc/self/exe`, the 10 MiB agent, and that process's
//! way to its `main` — took about 110 ms of every container create and
//! every exec under QEMU-TCG (docs/performance.md). So the agent keeps one
//! helper started ahead of time, `capsid-agent __runtime-standby`, which
//! waits for one job, runs it exactly as a helper spawned for it would
//! ([`runtime::run_and_report`]: same result file, same timings) and exits.
//! A job that finds no standby ready spawns its own helper, as before; after
//! each job the next standby is started in the background, never more than
//! one at a time.
//!
//! * **The channel.** One end of a `socketpair(AF_UNIX, SOCK_SEQPACKET)`
//!   is the standby's stdin (its stdout is /dev/null, its stderr the
//!   agent's: the console). Stdin rather than an extra fd: std's `Command`
//!   then spawns with `posix_spawn`, as it does the helper; placing any
//!   other fd needs a `pre_exec` hook, which makes std fork the
//!   multi-threaded agent instead.
//! * **The job.** One message ([`encode`]): a tag, the argument count, and
//!   the helper's arguments ([`Invocation::to_args`]), each NUL-terminated,
//!   so a message cut short never parses; with SCM_RIGHTS, the job's stdin,
//!   stdout and stderr — none for a terminal job, whose helper has /dev/null
//!   as stdio. The standby puts them on its fds 0–2, which closes the socket
//!   and the received copies, and runs the job. The agent drops its copies
//!   of the stream fds once the standby has answered that it took the job
//!   (below), as it does after a spawn, so the host still sees EOF exactly
//!   when the process is done.
//! * **Same conditions as a fresh helper.** A helper inherits the agent's
//!   environment, root, namespaces, cgroup, rlimits and umask, none of
//!   which the agent changes after boot (nor per job), so a helper started
//!   earlier inherits what one started now would; std's spawn resets the
//!   signal mask and SIGPIPE either way. The cwd is `/`, which every helper
//!   sets again ([`runtime::run_and_report`]: libcontainer's start moves the
//!   agent's for a moment).
//! * **When.** Starting a standby costs about the CPU the spawn it saves
//!   costs, so it is started only once the guest's containers have been
//!   left alone for [`IDLE_BEFORE_START`]: no create, start, exec or
//!   removal in progress or ended, and no process exited, in that time.
//!   Otherwise its start-up takes that CPU from what comes next: the
//!   StartProcess that follows a CreateContainer, a cold guest's first
//!   create (it comes right after the agent connects), or the host's own
//!   handling of an exit (the output drained, the task deleted, the VM
//!   stopped), which shares the host's CPUs with the guest (all were
//!   measured slower). A job never waits for a standby that is still
//!   starting: it spawns its own helper.
//! * **No priority of its own.** It runs at the agent's priority, as a
//!   helper does. A standby started at nice 19 and put back to 0 for its
//!   job was tried: CFS keeps a sleeper's virtual runtime, and CPU used at
//!   nice 19 counts 68 times over, so the ~0.1 s its start-up took left
//!   the job (and the processes it forks, the container's among them)
//!   behind every other task for seconds of CPU.
//! * **Taking the job.** The standby answers the message with one byte
//!   before it does anything with the job, and the agent waits for it
//!   (bounded): a standby that ends before it took the job (killed while
//!   idle, say, or given a message it cannot parse) never runs it, and the
//!   job spawns its own helper. So does one that was found ended before the
//!   send, or whose socket refuses the job. One that does not answer within
//!   [`ACK_TIMEOUT`] is killed. One that ends after it took its job fails
//!   the job, as a helper that ends without a result does. A dropped
//!   standby's socket closes, on which an idle standby exits.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    recv, recvmsg, send, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned,
    MsgFlags, SockFlag, SockType,
};
use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout, Pid};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::oneshot::{self, error::TryRecvError};

use crate::lock::LockExt as _;
use crate::reaper::{Exit, Reaper};
use crate::runtime::{self, Entry, Invocation};
use crate::stdio::Streams;

/// The first argument that selects the standby.
pub const STANDBY_ARG: &str = "__runtime-standby";

/// What every job message starts with.
const TAG: &[u8] = b"capsid-standby/1\0";

/// The longest job message: three paths and an id fit many times over.
const MAX_MESSAGE: usize = 64 * 1024;

/// The fds a job without a terminal comes with: stdin, stdout, stderr.
const STDIO_FDS: usize = 3;

/// How long the guest's containers must have been left alone before a
/// standby is started (see the module's documentation). A second: longer
/// than the host takes to react to an exit or a create, shorter than the
/// gaps between the execs of a probe or a `kubectl exec`.
const IDLE_BEFORE_START: Duration = Duration::from_secs(1);

/// What the standby answers a job it took with.
const ACK: &[u8] = b"+";

/// How long the agent waits for a standby to take its job. It only has to
/// be scheduled and read its socket, which no healthy guest takes seconds
/// for.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A job message that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// It does not start with [`TAG`].
    #[error("no standby job tag")]
    Tag,
    /// It is not UTF-8 text ending in a NUL.
    #[error("not NUL-terminated text")]
    Text,
    /// Its argument count is missing or does not match its arguments.
    #[error("argument count missing or wrong")]
    Count,
    /// Its arguments are no runtime invocation.
    #[error("no runtime invocation")]
    Invocation,
    /// An argument holds a NUL byte (it cannot be encoded).
    #[error("an argument holds a NUL byte")]
    Nul,
    /// It is longer than [`MAX_MESSAGE`].
    #[error("longer than {MAX_MESSAGE} bytes")]
    TooLong,
}

/// The job message for `inv`.
pub fn encode(inv: &Invocation) -> Result<Vec<u8>, MessageError> {
    let args = inv.to_args();
    let mut msg = TAG.to_vec();
    msg.extend_from_slice(args.len().to_string().as_bytes());
    msg.push(0);
    for arg in &args {
        if arg.contains('\0') {
            return Err(MessageError::Nul);
        }
        msg.extend_from_slice(arg.as_bytes());
        msg.push(0);
    }
    if msg.len() > MAX_MESSAGE {
        return Err(MessageError::TooLong);
    }
    Ok(msg)
}

/// The invocation of a job message ([`encode`]).
pub fn decode(msg: &[u8]) -> Result<Invocation, MessageError> {
    if msg.len() > MAX_MESSAGE {
        return Err(MessageError::TooLong);
    }
    let body = msg.strip_prefix(TAG).ok_or(MessageError::Tag)?;
    let text = std::str::from_utf8(body).map_err(|_| MessageError::Text)?;
    // Every field ends in a NUL: a message cut anywhere lacks the last one,
    // or an argument, which the count tells.
    let fields = text.strip_suffix('\0').ok_or(MessageError::Text)?;
    let mut fields = fields.split('\0');
    let count: usize = fields
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or(MessageError::Count)?;
    let args: Vec<String> = fields.map(str::to_string).collect();
    if args.len() != count {
        return Err(MessageError::Count);
    }
    Invocation::parse(&args).ok_or(MessageError::Invocation)
}

/// How many stdio fds the job `inv` comes with.
fn stdio_fds_of(inv: &Invocation) -> usize {
    // A terminal job (it has a console socket) leaves the helper's stdio
    // /dev/null: the container's streams go to the agent's pty pump.
    if inv.console_socket.is_some() {
        0
    } else {
        STDIO_FDS
    }
}

/// Sends the job message `msg` and the stdio `fds` on `sock`.
fn send_job(sock: BorrowedFd<'_>, msg: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let iov = [IoSlice::new(msg)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    // The socket's buffer takes the one message whether or not the standby
    // is reading yet, so nothing here waits on it; a standby that is gone
    // is an EPIPE, not a SIGPIPE.
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    // A SOCK_SEQPACKET message goes whole or not at all.
    if sent != msg.len() {
        return Err(Errno::EMSGSIZE);
    }
    Ok(())
}

/// The standby's word that it took its job: nothing of the job happens
/// before it.
fn acknowledge(sock: BorrowedFd<'_>) -> nix::Result<()> {
    send(sock.as_raw_fd(), ACK, MsgFlags::MSG_NOSIGNAL).map(drop)
}

/// Whether the standby's answer is on `sock`: `Ok(true)` it took the job,
/// `Ok(false)` its end is closed with no answer on the socket (it ended
/// without taking the job: had it taken it, the answer would be there
/// first), WouldBlock: not yet.
fn read_ack(sock: BorrowedFd<'_>) -> std::io::Result<bool> {
    let mut byte = [0u8; 1];
    loop {
        return match recv(sock.as_raw_fd(), &mut byte, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(Errno::EINTR) => continue,
            Err(e @ Errno::EAGAIN) => Err(e.into()),
            // ECONNRESET: it closed its end with the job unread.
            Err(_) => Ok(false),
        };
    }
}

/// A job as the standby received it.
#[derive(Debug)]
pub struct Received {
    /// The job.
    pub inv: Invocation,
    /// The fds that came with it.
    pub fds: Vec<OwnedFd>,
}

/// Why the standby got no job.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// recvmsg failed.
    #[error("cannot receive the job")]
    Recv(#[source] nix::Error),
    /// The agent closed the socket without sending a job.
    #[error("the agent closed the socket without a job")]
    Closed,
    /// The message or its fds did not fit (more than a job has).
    #[error("the job message was cut short")]
    Truncated,
    /// The message is not a job.
    #[error("bad job message")]
    Message(#[source] MessageError),
}

/// Waits for the one job message on `sock`.
pub fn receive_job(sock: BorrowedFd<'_>) -> Result<Received, ReceiveError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (len, fds) = loop {
        match receive_once(sock, &mut buf) {
            Err(ReceiveError::Recv(Errno::EINTR)) => continue,
            got => break got?,
        }
    };
    if len == 0 && fds.is_empty() {
        return Err(ReceiveError::Closed);
    }
    let inv = decode(&buf[..len]).map_err(ReceiveError::Message)?;
    Ok(Received { inv, fds })
}

/// One recvmsg: the message's length and the fds it carried.
fn receive_once(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Vec<OwnedFd>), ReceiveError> {
    let mut iov = [IoSliceMut::new(buf)];
    // Room for one fd more than a job has: more are cut (MSG_CTRUNC), and
    // the message refused.
    let mut cmsg = nix::cmsg_space!([RawFd; STDIO_FDS + 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(ReceiveError::Recv)?;
    let mut fds = Vec::new();
    // cmsgs() refuses a cut control buffer (MSG_CTRUNC).
    for c in msg.cmsgs().map_err(|_| ReceiveError::Truncated)? {
        if let ControlMessageOwned::ScmRights(received) = c {
            for fd in received {
                // SAFETY: SCM_RIGHTS just installed `fd` in this process;
                // nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) || fds.len() > STDIO_FDS {
        return Err(ReceiveError::Truncated);
    }
    Ok((msg.bytes, fds))
}

/// Why the standby could not give a job its stdio.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The job came with the wrong number of fds.
    #[error("the job came with {got} stdio fds, {want} expected")]
    Fds {
        /// Received.
        got: usize,
        /// Expected.
        want: usize,
    },
    /// /dev/null could not be opened (terminal jobs).
    #[error("cannot open /dev/null")]
    DevNull(#[source] std::io::Error),
    /// dup2 onto fd 0, 1 or 2 failed.
    #[error("cannot put the job's stdio on fds 0-2")]
    Dup(#[source] nix::Error),
}

/// Makes the job's stdio the standby's own, as a spawn would have: the
/// received fds, or /dev/null for a terminal job. Fd 0, the socket, is
/// replaced and so closed, and so are the received copies.
fn wire_stdio(inv: &Invocation, fds: Vec<OwnedFd>) -> Result<(), WireError> {
    let want = stdio_fds_of(inv);
    let [stdin, stdout, stderr]: [OwnedFd; 3] = if want == 0 && fds.is_empty() {
        // As std's `Stdio::null()` opens it for a spawned helper.
        let open = |write: bool| {
            File::options()
                .read(!write)
                .write(write)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(WireError::DevNull)
        };
        [open(false)?, open(true)?, open(true)?]
    } else {
        let got = fds.len();
        fds.try_into()
            .ok()
            .filter(|_| want == STDIO_FDS)
            .ok_or(WireError::Fds { got, want })?
    };
    dup2_stdin(&stdin).map_err(WireError::Dup)?;
    dup2_stdout(&stdout).map_err(WireError::Dup)?;
    dup2_stderr(&stderr).map_err(WireError::Dup)?;
    Ok(())
}

/// `capsid-agent __runtime-standby`: waits for one job on stdin, then runs
/// it as the helper does. The exit code only says whether a result was
/// written (0 also when the agent closed the socket without a job).
pub fn main() -> ExitCode {
    let entered = crate::monotonic_ns();
    // Started while a start had the agent in a container's state directory,
    // it would hold that directory while it waits: `/` at once (the job
    // sets it again, as every helper does).
    let _ = std::env::set_current_dir("/");
    // SAFETY: fd 0 is the socket the agent gave this process as its stdin
    // (`spawn_standby`). It is only borrowed, and stays open until
    // `wire_stdio` replaces it, after the borrow's last use.
    let sock = unsafe { BorrowedFd::borrow_raw(libc::STDIN_FILENO) };
    let Received { inv, fds } = match receive_job(sock) {
        Ok(job) => job,
        Err(ReceiveError::Closed) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "capsid-agent: standby runtime helper: {}",
                crate::describe(&e)
            );
            return ExitCode::from(2);
        }
    };
    let job = crate::monotonic_ns();
    // Without the agent's knowing the job was taken, it would run it again
    // elsewhere: no answer, no job.
    if let Err(e) = acknowledge(sock) {
        eprintln!("capsid-agent: standby runtime helper: cannot take the job: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = wire_stdio(&inv, fds) {
        let text = format!("standby runtime helper: {}", crate::describe(&e));
        return match std::fs::write(&inv.result, runtime::error_outcome(&text)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    runtime::run_and_report(&inv, Entry::Standby { entered, job })
}

/// A standby that is started and waits for its job.
#[derive(Debug)]
struct Ready {
    pid: i32,
    /// The agent's end of the socket.
    sock: OwnedFd,
    exit: oneshot::Receiver<Exit>,
}

#[derive(Debug)]
enum Slot {
    Empty,
    Starting,
    Ready(Ready),
}

/// Why a job does not go to a standby (it spawns its own helper then).
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// None is ready: none was started yet, or it is still starting.
    #[error("no standby is ready")]
    NotReady,
    /// The job cannot be put in a message.
    #[error("the job cannot be sent")]
    Encode(#[source] MessageError),
    /// The standby ended while it waited.
    #[error("the standby (pid {pid}) ended while idle ({how})")]
    Died {
        /// Its pid.
        pid: i32,
        /// How it ended.
        how: String,
    },
    /// The socket could not be watched for the standby's answer.
    #[error("cannot watch the standby's (pid {pid}) socket")]
    Watch {
        /// Its pid.
        pid: i32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket refused the job.
    #[error("cannot send the job to the standby (pid {pid})")]
    Send {
        /// Its pid.
        pid: i32,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The standby ended without taking the job.
    #[error("the standby (pid {pid}) ended before it took the job")]
    NotTaken {
        /// Its pid.
        pid: i32,
    },
    /// The standby did not take the job in time (and was killed, unless
    /// it had ended).
    #[error("the standby (pid {pid}) did not take the job within {ACK_TIMEOUT:?}{}", if *killed { ": killed" } else { "" })]
    TimedOut {
        /// Its pid.
        pid: i32,
        /// Whether it was killed for it.
        killed: bool,
    },
    /// The standby's answer could not be waited for (and it was killed,
    /// unless it had ended).
    #[error("cannot wait for the standby's (pid {pid}) answer{}", if *killed { ": killed" } else { "" })]
    Unanswered {
        /// Its pid.
        pid: i32,
        /// Whether it was killed for it.
        killed: bool,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why a standby could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The socketpair could not be made.
    #[error("socketpair")]
    Socketpair(#[source] nix::Error),
    /// `/proc/self/exe` could not be spawned.
    #[error("spawning /proc/self/exe")]
    Spawn(#[source] std::io::Error),
    /// The spawning task ended without a result (it panicked).
    #[error("the spawning task")]
    Task(#[source] tokio::task::JoinError),
}

/// Container operations in progress, and when the last one ended.
#[derive(Debug)]
struct Activity {
    busy: usize,
    last: Instant,
}

/// `CAPSID_AGENT_STANDBY=off` (a word of the kernel command line, as
/// `CAPSID_AGENT_LOG`) turns standbys off: every job spawns its helper.
const ENABLE_ENV: &str = "CAPSID_AGENT_STANDBY";

/// Whether standbys are on (see [`ENABLE_ENV`]).
pub fn enabled() -> bool {
    !matches!(
        std::env::var(ENABLE_ENV).as_deref(),
        Ok("off" | "0" | "false" | "no")
    )
}

/// The agent's one standby runtime helper.
#[derive(Debug)]
pub struct Standby {
    reaper: Reaper,
    /// Off: [`Self::replenish`] does nothing, so no job finds a standby.
    enabled: bool,
    slot: Mutex<Slot>,
    activity: Mutex<Activity>,
}

/// A container operation in progress ([`Standby::busy`]); a standby is
/// started only once none has been for [`IDLE_BEFORE_START`].
#[derive(Debug)]
pub struct Busy(Arc<Standby>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut activity = self.0.activity.lock_or_recover();
        activity.busy = activity.busy.saturating_sub(1);
        activity.last = Instant::now();
    }
}

impl Standby {
    /// No standby yet ([`Self::replenish`] starts one, if `enabled`);
    /// `reaper` collects the exits of those it starts.
    pub fn new(reaper: Reaper, enabled: bool) -> Arc<Self> {
        Arc::new(Self {
            reaper,
            enabled,
            slot: Mutex::new(Slot::Empty),
            activity: Mutex::new(Activity {
                busy: 0,
                last: Instant::now(),
            }),
        })
    }

    /// Marks a container operation (create, start, exec, removal) in
    /// progress until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.activity.lock_or_recover().busy += 1;
        Busy(Arc::clone(self))
    }

    /// Notes something the host will react to (a process's exit): a
    /// standby is started only [`IDLE_BEFORE_START`] after it.
    pub fn touch(&self) {
        self.activity.lock_or_recover().last = Instant::now();
    }

    /// Waits until no container operation has run for
    /// [`IDLE_BEFORE_START`].
    async fn until_idle(&self) {
        loop {
            let wait = {
                let activity = self.activity.lock_or_recover();
                if activity.busy > 0 {
                    IDLE_BEFORE_START
                } else {
                    IDLE_BEFORE_START.saturating_sub(activity.last.elapsed())
                }
            };
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Starts a standby in the background once the guest's container
    /// operations pause, unless one is ready or already on its way. Must
    /// be called inside the tokio runtime.
    pub fn replenish(self: &Arc<Self>) {
        if !self.enabled {
            return;
        }
        {
            let mut slot = self.slot.lock_or_recover();
            if !matches!(*slot, Slot::Empty) {
                return;
            }
            *slot = Slot::Starting;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            me.until_idle().await;
            let began = crate::monotonic_ns();
            let next = match me.start().await {
                Ok(ready) => {
                    let now = crate::monotonic_ns();
                    tracing::debug!(
                        pid = ready.pid,
                        ms = now.saturating_sub(began) as f64 / 1e6,
                        at_ms = now as f64 / 1e6,
                        "standby runtime helper started"
                    );
                    Slot::Ready(ready)
                }
                Err(e) => {
                    tracing::warn!(error = %crate::describe(&e), "cannot start a standby runtime helper: jobs spawn their own");
                    Slot::Empty
                }
            };
            *me.slot.lock_or_recover() = next;
        });
    }

    async fn start(&self) -> Result<Ready, StartError> {
        let reaper = self.reaper.clone();
        tokio::task::spawn_blocking(move || spawn_standby(&reaper))
            .await
            .map_err(StartError::Task)?
    }

    /// Hands `inv` and its `stdio` (none for a terminal job) to the
    /// standby, if one is ready: its pid and its exit, as a spawned
    /// helper's. The caller still holds `stdio` and drops it: the standby
    /// has its own copies once this returns `Ok`. On `Err` the standby never
    /// runs the job, and the caller spawns a helper for it.
    pub async fn hand_over(
        &self,
        inv: &Invocation,
        stdio: Option<&Streams>,
    ) -> Result<(i32, oneshot::Receiver<Exit>), Unavailable> {
        let msg = encode(inv).map_err(Unavailable::Encode)?;
        let taken = {
            let mut slot = self.slot.lock_or_recover();
            match std::mem::replace(&mut *slot, Slot::Empty) {
                Slot::Ready(ready) => Some(ready),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        // From here on an error drops the standby: its socket closes and,
        // if it still lives, it exits.
        let Some(Ready {
            pid,
            sock,
            mut exit,
        }) = taken
        else {
            return Err(Unavailable::NotReady);
        };
        match exit.try_recv() {
            Err(TryRecvError::Empty) => {}
            ended => {
                return Err(Unavailable::Died {
                    pid,
                    how: how_it_ended(ended.ok()),
                })
            }
        }
        // SAFETY: an OwnedFd's fd is open and the same for its whole
        // life, which the AsyncFd owns; nothing here swaps it.
        let sock =
            unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }.map_err(|e| {
                Unavailable::Watch {
                    pid,
                    source: e.into(),
                }
            })?;
        let fds = stdio.map(|s| {
            [
                s.stdin.as_raw_fd(),
                s.stdout.as_raw_fd(),
                s.stderr.as_raw_fd(),
            ]
        });
        let fds: &[RawFd] = match &fds {
            Some(fds) => fds,
            None => &[],
        };
        send_job(sock.get_ref().as_fd(), &msg, fds)
            .map_err(|source| Unavailable::Send { pid, source })?;
        let answer = sock.async_io(Interest::READABLE, |s| read_ack(s.as_fd()));
        let waited = match tokio::time::timeout(ACK_TIMEOUT, answer).await {
            Ok(Ok(took)) => Ok(took),
            // The socket could not be waited on: as good as no answer.
            Ok(Err(e)) => Err(Some(e)),
            Err(_) => Err(None),
        };
        let took = match waited {
            Ok(took) => took,
            Err(why) => {
                // It may be reading right now: once killed it runs nothing
                // more, and an answer sent before is on the socket.
                // `is_empty` leaves the exit to be awaited. (Its pid is its
                // own until the reaper has waited for it, and free only for
                // the moment before the reaper delivers the exit: a reuse
                // in that moment needs the pid space to wrap around.)
                let killed = exit.is_empty()
                    && !exit.is_terminated()
                    && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok();
                if !read_ack(sock.get_ref().as_fd()).unwrap_or(false) {
                    return Err(match why {
                        None => Unavailable::TimedOut { pid, killed },
                        Some(source) => Unavailable::Unanswered {
                            pid,
                            killed,
                            source,
                        },
                    });
                }
                true
            }
        };
        if !took {
            return Err(Unavailable::NotTaken { pid });
        }
        Ok((pid, exit))
    }
}

/// How a process ended, for messages.
pub fn how_it_ended(exit: Option<Exit>) -> String {
    match exit {
        Some(Exit {
            status,
            signaled: true,
        }) => format!("killed by signal {}", status - 128),
        Some(Exit { status, .. }) => format!("exit status {status}"),
        None => "its exit is unknown".to_string(),
    }
}

/// Spawns a standby, its exit registered with `reaper` as a helper's is:
/// its pid, the agent's end of its socket and its exit. Blocking (the
/// spawn waits for the exec, tens of milliseconds under QEMU-TCG).
fn spawn_standby(reaper: &Reaper) -> Result<Ready, StartError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(StartError::Socketpair)?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(STANDBY_ARG)
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let (pid, exit) = reaper.spawn(&mut cmd).map_err(StartError::Spawn)?;
    // The command goes with its copy of the standby's end of the socket,
    // so the standby sees EOF once the agent drops its own end.
    drop(cmd);
    Ok(Ready {
        pid,
        sock: ours,
        exit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Job;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn invocations() -> [Invocation; 2] {
        [
            Invocation {
                job: Job::Create {
                    id: "c1".into(),
                    bundle: "/run/capsid/bundles/c1".into(),
                },
                result: "/run/capsid/bundles/c1/result-init".into(),
                console_socket: None,
            },
            Invocation {
                job: Job::Exec {
                    id: "c1".into(),
                    process: "/run/capsid/bundles/c1/exec-e1.json".into(),
                },
                result: "/run/capsid/bundles/c1/result-e1".into(),
                console_socket: Some("/run/capsid/bundles/c1/console-e1.sock".into()),
            },
        ]
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn messages_round_trip() {
        for inv in invocations() {
            let msg = encode(&inv).unwrap();
            assert_eq!(decode(&msg), Ok(inv));
        }
    }

    #[test]
    fn cut_messages_are_refused() {
        for inv in invocations() {
            let msg = encode(&inv).unwrap();
            for len in 0..msg.len() {
                assert!(
                    decode(&msg[..len]).is_err(),
                    "{:?} parsed",
                    String::from_utf8_lossy(&msg[..len])
                );
            }
        }
    }

    #[test]
    fn garbage_is_refused() {
        let inv = &invocations()[0];
        let good = encode(inv).unwrap();
        let mut extra = good.clone();
        extra.extend_from_slice(b"more\0");
        let mut wrong_count = good.clone();
        wrong_count[TAG.len()] = b'9';
        let mut wrong_tag = good.clone();
        wrong_tag[0] = b'X';
        let mut not_utf8 = good.clone();
        let last = not_utf8.len() - 2;
        not_utf8[last] = 0xff;
        let mut huge = good.clone();
        huge.resize(MAX_MESSAGE + 1, 0);
        let cases: [(&[u8], MessageError); 9] = [
            (b"", MessageError::Tag),
            (b"\0\0\0\0", MessageError::Tag),
            (&wrong_tag, MessageError::Tag),
            (&extra, MessageError::Count),
            (&wrong_count, MessageError::Count),
            (&not_utf8, MessageError::Text),
            (&huge, MessageError::TooLong),
            (b"capsid-standby/1\0x\0", MessageError::Count),
            (
                b"capsid-standby/1\x004\0__runtime\0explode\0x\0y\0",
                MessageError::Invocation,
            ),
        ];
        for (msg, want) in cases {
            assert_eq!(decode(msg), Err(want), "{:?}", String::from_utf8_lossy(msg));
        }
        let mut nul = inv.clone();
        nul.result = "/run/a\0b".into();
        assert_eq!(encode(&nul), Err(MessageError::Nul));
    }

    /// A job and its three fds across the socket: the standby's copies are
    /// the same files.
    #[test]
    fn a_job_and_its_stdio_cross_the_socket() {
        let (agent, standby) = pair();
        let inv = invocations()[0].clone();
        let (mut host_in, guest_in) = UnixStream::pair().unwrap();
        let (host_out, guest_out) = UnixStream::pair().unwrap();
        let (host_err, guest_err) = UnixStream::pair().unwrap();
        let fds = [
            guest_in.as_raw_fd(),
            guest_out.as_raw_fd(),
            guest_err.as_raw_fd(),
        ];
        send_job(agent.as_fd(), &encode(&inv).unwrap(), &fds).unwrap();
        drop((guest_in, guest_out, guest_err));
        let got = receive_job(standby.as_fd()).unwrap();
        assert_eq!(got.inv, inv);
        assert_eq!(got.fds.len(), 3);
        let [stdin, stdout, stderr]: [OwnedFd; 3] = got.fds.try_into().unwrap();
        host_in.write_all(b"in").unwrap();
        drop(host_in);
        let mut text = String::new();
        File::from(stdin).read_to_string(&mut text).unwrap();
        assert_eq!(text, "in", "stdin reaches, then EOF");
        File::from(stdout).write_all(b"out").unwrap();
        File::from(stderr).write_all(b"err").unwrap();
        for (mut host, want) in [(host_out, "out"), (host_err, "err")] {
            let mut text = String::new();
            host.read_to_string(&mut text).unwrap();
            assert_eq!(text, want, "EOF once the last copy is closed");
        }
    }

    #[test]
    fn receiving_refuses_what_is_no_job() {
        // The agent's end closed without a message.
        let (agent, standby) = pair();
        drop(agent);
        assert!(matches!(
            receive_job(standby.as_fd()),
            Err(ReceiveError::Closed)
        ));
        // Garbage.
        let (agent, standby) = pair();
        send_job(agent.as_fd(), b"hello", &[]).unwrap();
        assert!(matches!(
            receive_job(standby.as_fd()),
            Err(ReceiveError::Message(MessageError::Tag))
        ));
        // More fds than a job has.
        let (agent, standby) = pair();
        let devnull = File::open("/dev/null").unwrap();
        let msg = encode(&invocations()[0]).unwrap();
        send_job(agent.as_fd(), &msg, &[devnull.as_raw_fd(); 5]).unwrap();
        assert!(matches!(
            receive_job(standby.as_fd()),
            Err(ReceiveError::Truncated)
        ));
    }

    #[test]
    fn a_job_needs_the_stdio_of_its_kind() {
        let [plain, terminal] = invocations();
        assert_eq!(stdio_fds_of(&plain), 3);
        assert_eq!(stdio_fds_of(&terminal), 0);
        // Checked before any dup2: these leave the test's stdio alone.
        let e = wire_stdio(&plain, Vec::new()).unwrap_err();
        assert_eq!(e.to_string(), "the job came with 0 stdio fds, 3 expected");
        let fds = (0..3)
            .map(|_| OwnedFd::from(File::open("/dev/null").unwrap()))
            .collect();
        let e = wire_stdio(&terminal, fds).unwrap_err();
        assert_eq!(e.to_string(), "the job came with 3 stdio fds, 0 expected");
    }

    /// A standby waits for container operations to pause.
    #[tokio::test]
    async fn a_standby_waits_for_a_pause() {
        let standby = Standby::new(Reaper::default(), true);
        let busy = standby.busy();
        let waiting = tokio::time::timeout(IDLE_BEFORE_START * 2, standby.until_idle());
        assert!(waiting.await.is_err(), "started while busy");
        let ended = Instant::now();
        drop(busy);
        standby.until_idle().await;
        assert!(ended.elapsed() >= IDLE_BEFORE_START);
        // Paused long enough already: no wait (a timeout polls its future
        // before it looks at the clock).
        tokio::time::sleep(IDLE_BEFORE_START).await;
        let at_once = tokio::time::timeout(Duration::ZERO, standby.until_idle());
        assert!(at_once.await.is_ok());
    }

    /// No process has this pid (above any pid_max): the timeout's kill, not
    /// reached here, would find nothing.
    const FAKE_PID: i32 = i32::MAX;

    /// A standby in the slot: `sock` its socket, [`FAKE_PID`] its pid.
    fn put_ready(standby: &Standby, sock: OwnedFd, exit: oneshot::Receiver<Exit>) {
        *standby.slot.lock().unwrap() = Slot::Ready(Ready {
            pid: FAKE_PID,
            sock,
            exit,
        });
    }

    /// A job handed over: the standby took it (answered), with its stdio.
    #[tokio::test]
    async fn a_ready_standby_takes_the_job() {
        let standby = Standby::new(Reaper::default(), true);
        let inv = invocations()[0].clone();
        let (agent, standby_end) = pair();
        let (_tx, exit) = oneshot::channel();
        put_ready(&standby, agent, exit);
        let playing = std::thread::spawn(move || {
            let got = receive_job(standby_end.as_fd()).unwrap();
            acknowledge(standby_end.as_fd()).unwrap();
            (got.inv, got.fds.len())
        });
        let devnull = |write: bool| {
            OwnedFd::from(
                File::options()
                    .read(!write)
                    .write(write)
                    .open("/dev/null")
                    .unwrap(),
            )
        };
        let streams = Streams {
            stdin: devnull(false),
            stdout: devnull(true),
            stderr: devnull(true),
        };
        let (pid, _exit) = standby.hand_over(&inv, Some(&streams)).await.unwrap();
        assert_eq!(pid, FAKE_PID);
        assert_eq!(playing.join().unwrap(), (inv, 3));
        assert!(matches!(*standby.slot.lock().unwrap(), Slot::Empty));
    }

    /// The fallback's triggers: no standby, one that ended while idle, one
    /// whose socket is gone, one that ends without taking the job.
    #[tokio::test]
    async fn an_unusable_standby_is_not_handed_the_job() {
        let standby = Standby::new(Reaper::default(), true);
        let inv = invocations()[0].clone();
        assert!(matches!(
            standby.hand_over(&inv, None).await,
            Err(Unavailable::NotReady)
        ));

        let (tx, exit) = oneshot::channel();
        let (agent, _standby_end) = pair();
        put_ready(&standby, agent, exit);
        tx.send(Exit {
            status: 137,
            signaled: true,
        })
        .unwrap();
        let e = standby.hand_over(&inv, None).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("the standby (pid {FAKE_PID}) ended while idle (killed by signal 9)")
        );
        assert!(matches!(*standby.slot.lock().unwrap(), Slot::Empty));

        // The peer is gone: the send fails (EPIPE).
        let (_tx, exit) = oneshot::channel();
        let (agent, standby_end) = pair();
        drop(standby_end);
        put_ready(&standby, agent, exit);
        let e = standby.hand_over(&inv, None).await.unwrap_err();
        assert!(
            matches!(
                e,
                Unavailable::Send {
                    source: Errno::EPIPE,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(matches!(*standby.slot.lock().unwrap(), Slot::Empty));

        // It ends with the job unread, or read but not taken.
        for read_first in [false, true] {
            let (_tx, exit) = oneshot::channel();
            let (agent, standby_end) = pair();
            put_ready(&standby, agent, exit);
            let playing = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                if read_first {
                    receive_job(standby_end.as_fd()).unwrap();
                }
            });
            let e = standby.hand_over(&inv, None).await.unwrap_err();
            assert!(matches!(e, Unavailable::NotTaken { .. }), "{e:?}");
            playing.join().unwrap();
        }
    }
}

//! Serving a [`VirtioDevice`] as a vhost-user backend (the `vhost` and
//! `vhost-user-backend` crates do the protocol; this adapts the model).

use std::cell::Cell;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::Queue;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::relay;
use crate::seccomp::{Confinement, Role, SeccompError};
use crate::socket_claim::{ClaimError, SocketClaim};
use crate::virtio::{DeviceEvent, VirtioDevice};

/// Errors serving a device over vhost-user.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket path cannot be claimed (in use, or unwritable).
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// The vhost-user daemon failed to start or serve.
    #[error(
        "the vhost-user daemon cannot {step}: {message} (see the frontend's log, and the \
         host's fd and thread limits)"
    )]
    Daemon {
        /// "start" or "serve the frontend".
        step: &'static str,
        // A String: vhost_user_backend::Error implements neither std::error::Error nor Sync.
        /// What vhost-user-backend said.
        message: String,
    },
    /// The device's host-side fd could not be added to the event loop.
    #[error("cannot watch the device's host-side fd")]
    Watch(#[source] std::io::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The relay in front of the daemon could not be set up.
    #[error("cannot set up the vhost-user relay")]
    Relay(#[source] std::io::Error),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Result of vhost-user hosting.
pub type Result<T> = std::result::Result<T, VhostUserError>;

/// Keeps the text of a vhost-user-backend error, naming the step that failed.
fn daemon_error(step: &'static str) -> impl FnOnce(vhost_user_backend::Error) -> VhostUserError {
    move |e| VhostUserError::Daemon {
        step,
        message: e.to_string(),
    }
}

/// A device model behind vhost-user.
pub struct VhostUserDevice<D: VirtioDevice> {
    device: D,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    exit: (EventConsumer, EventNotifier),
    /// Stacked on each queue worker at its first event.
    seccomp: Option<Confinement>,
}

thread_local! {
    /// Whether this thread (a queue worker) has its own filter yet.
    static QUEUES_CONFINED: Cell<bool> = const { Cell::new(false) };
}

impl<D: VirtioDevice> std::fmt::Debug for VhostUserDevice<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("device", &self.device.name())
            .finish()
    }
}

impl<D: VirtioDevice> VhostUserDevice<D> {
    fn num_queues(&self) -> usize {
        self.device.queue_max_sizes().len()
    }

    /// The event id under which the device's host-side fd is reported:
    /// ids 0..num_queues are the queues, num_queues is the exit event.
    fn backend_event(&self) -> u16 {
        u16::try_from(self.num_queues() + 1).unwrap_or(u16::MAX)
    }
}

impl<D: VirtioDevice + Sync> VhostUserBackendMut for VhostUserDevice<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        self.device
            .queue_max_sizes()
            .iter()
            .copied()
            .max()
            .map_or(0, usize::from)
    }

    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.device.ack_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&mut self) {
        self.device.reset();
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The vrings carry the event-index flag themselves; the device's
        // queue handling asks them.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut data = vec![0u8; size.min(4096) as usize];
        self.device.read_config(u64::from(offset), &mut data);
        data
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        self.device.write_config(u64::from(offset), buf);
        Ok(())
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        // Before anything the guest wrote is looked at.
        if let Some(seccomp) = self.seccomp {
            if !QUEUES_CONFINED.get() {
                seccomp.install(Role::Queues).map_err(|e| {
                    tracing::error!(error = %crate::describe(&e), "queue worker left unconfined: stopping it");
                    std::io::Error::other(e)
                })?;
                QUEUES_CONFINED.set(true);
            }
        }
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let event = if usize::from(device_event) < self.num_queues() {
            DeviceEvent::Queue(device_event)
        } else if device_event == self.backend_event() {
            DeviceEvent::Backend
        } else {
            tracing::warn!(device_event, "unexpected vhost-user event");
            return Ok(());
        };
        let Some(mem) = self.mem.as_ref() else {
            // Events before the frontend sent its memory table: nothing to do.
            return Ok(());
        };
        let mem = mem.memory();
        let notify = {
            let mut guards: Vec<_> = vrings.iter().map(VringT::get_mut).collect();
            let mut queues: Vec<&mut Queue> =
                guards.iter_mut().map(|g| g.get_queue_mut()).collect();
            // An error here is the guest's doing (a broken ring): log it and
            // keep serving; returning it would end the device's event loop.
            match self.device.process(event, &mut queues, &mem) {
                Ok(notify) => notify,
                Err(e) => {
                    tracing::warn!(device = self.device.name(), error = %crate::describe(&e), "request processing failed");
                    0
                }
            }
        };
        for (index, vring) in vrings.iter().enumerate() {
            if notify & crate::virtio::queue_bit(index) != 0 {
                vring.signal_used_queue()?;
            }
        }
        Ok(())
    }
}

/// Serves `device` on the vhost-user socket `path` for one frontend
/// connection; returns when the frontend disconnects. The socket file is
/// removed on return. No seccomp filter: see [`serve_confined`].
pub fn serve<D: VirtioDevice + Sync + 'static>(device: D, path: &Path) -> Result<()> {
    run(device, path, None)
}

/// Like [`serve`], with the threads confined by `seccomp` once the socket
/// is bound: the process-wide list before the daemon starts its threads,
/// the queue workers' list on their first event, the main thread's once
/// the frontend is connected (see [`crate::seccomp`]).
pub fn serve_confined<D: VirtioDevice + Sync + 'static>(
    device: D,
    path: &Path,
    seccomp: Confinement,
) -> Result<()> {
    run(device, path, Some(seccomp))
}

fn run<D: VirtioDevice + Sync + 'static>(
    device: D,
    path: &Path,
    seccomp: Option<Confinement>,
) -> Result<()> {
    // Held until return: the socket and its lock file go away with it.
    let claim = SocketClaim::new(path)?;
    // QEMU's virtio-net front end enables rings before acking the protocol
    // features, which the vhost crate refuses: serve it through the relay.
    let relayed = device.device_type() == crate::virtio::net::VIRTIO_ID_NET;
    let backend_fd = device.backend_fd();
    let exit =
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(VhostUserError::EventFd)?;
    let exit_notifier = exit.1.try_clone().map_err(VhostUserError::EventFd)?;
    let name = device.name();
    // Every socket is bound (and the relay's connection to the daemon
    // made) before the filters go on: they allow neither bind nor connect.
    let (mut listener, relay_ends) = if relayed {
        let public = claim.listen()?;
        let private = relay::private_path(path);
        let listener = Listener::new(&private, true).map_err(listen_error)?;
        // Queued until the daemon accepts it; the path is not needed
        // once connected.
        let back = UnixStream::connect(&private).map_err(VhostUserError::Relay)?;
        let _ = std::fs::remove_file(&private);
        (listener, Some((public, back)))
    } else {
        let public = claim.listen()?;
        // SAFETY: the descriptor is a listening socket owned by nothing
        // else from here on; the claim, not the Listener, removes the path.
        let listener = unsafe { Listener::from_raw_fd(public.into_raw_fd()) };
        (listener, None)
    };
    if let Some(seccomp) = seccomp {
        // No other thread exists yet: every later one inherits this.
        seccomp.install(Role::Process)?;
    }
    let backend = Arc::new(RwLock::new(VhostUserDevice {
        device,
        mem: None,
        exit,
        seccomp,
    }));
    let backend_event = backend
        .read()
        .map(|b| b.backend_event())
        .unwrap_or(u16::MAX);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(format!("capsid-vhost-{name}"), backend, mem)
        .map_err(daemon_error("start"))?;
    if let Some(fd) = backend_fd {
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(fd, EventSet::IN, u64::from(backend_event))
                .map_err(VhostUserError::Watch)?;
        }
    }
    let relay = match relay_ends {
        Some((public, back)) => {
            Some(relay::spawn(public, back, seccomp).map_err(VhostUserError::Relay)?)
        }
        None => None,
    };
    daemon
        .start(&mut listener)
        .map_err(daemon_error("accept the frontend"))?;
    if let Some(seccomp) = seccomp {
        seccomp.install(Role::Connected)?;
    }
    let result = daemon.wait();
    // The workers exit on this whatever the session's end.
    if let Err(e) = exit_notifier.notify() {
        tracing::warn!(error = %e, "cannot tell the vhost-user workers to exit");
    }
    // A frontend going away mid-message is how a session ends.
    let result = match result {
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        other => other.map_err(daemon_error("serve the frontend")),
    };
    // Once the daemon's connection is over the relay winds down too.
    if let (Ok(()), Some(relay)) = (&result, relay) {
        let _ = relay.join();
    }
    result
}

/// A vhost-user listener that cannot be bound.
fn listen_error(e: vhost::vhost_user::Error) -> VhostUserError {
    VhostUserError::Daemon {
        step: "listen",
        message: e.to_string(),
    }
}

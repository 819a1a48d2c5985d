//! The one thread that serves every virtio device: an epoll set holding
//! each queue's notify eventfd (signalled by KVM on the guest's
//! `QueueNotify` write, without an exit) and, while a device is active,
//! its host-side fd (tap, vsock sockets, balloon statistics timer, a
//! vhost-user backend's call eventfds). The queues of a device served by
//! a vhost-user backend are not watched: the backend reads them.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use capsid_devices::virtio::DeviceEvent;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::MmioSlot;
use super::{DeviceError, QueueService, Result};

/// Token kind of a device's host-side fd (queue kinds are their index).
const BACKEND: u64 = u32::MAX as u64;
/// Token of the stop eventfd.
const STOP: u64 = u64::MAX;
/// Events taken from epoll per wait.
const EVENTS_PER_WAIT: usize = 32;

fn token(slot: usize, kind: u64) -> u64 {
    ((slot as u64) << 32) | kind
}

fn untoken(data: u64) -> (usize, u64) {
    ((data >> 32) as usize, data & 0xffff_ffff)
}

/// What vCPU threads use to tell the event loop about devices.
#[derive(Debug, Clone)]
pub struct LoopHandle {
    epoll: Arc<Epoll>,
    slots: Arc<Vec<MmioSlot>>,
}

impl LoopHandle {
    fn backend_fd(&self, index: usize) -> Option<i32> {
        let slot = self.slots.get(index)?;
        let dev = slot.device().lock().ok()?;
        dev.backend_fd()
    }

    /// Device `index` was activated: start serving its host-side fd.
    pub fn activated(&self, index: usize) {
        let Some(fd) = self.backend_fd(index) else {
            return;
        };
        let event = EpollEvent::new(EventSet::IN, token(index, BACKEND));
        match self.epoll.ctl(ControlOperation::Add, fd, event) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                tracing::warn!(slot = index, error = %e, "cannot watch a device's host-side fd")
            }
        }
    }

    /// Device `index` was reset: stop serving its host-side fd.
    pub fn reset(&self, index: usize) {
        if let Some(fd) = self.backend_fd(index) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }
}

/// The event loop, before its thread starts.
#[derive(Debug)]
pub struct EventLoop {
    handle: LoopHandle,
    stop: EventFd,
}

/// The running event loop thread.
#[derive(Debug)]
pub struct EventLoopThread {
    thread: std::thread::JoinHandle<()>,
    stop: EventFd,
}

impl EventLoopThread {
    /// Ends the loop and waits for its thread (which drops its share of
    /// the devices).
    pub fn stop(self) {
        if self.stop.write(1).is_ok() {
            let _ = self.thread.join();
        }
    }
}

impl EventLoop {
    /// An epoll set watching every queue eventfd of `slots`.
    pub fn new(slots: Arc<Vec<MmioSlot>>) -> Result<Self> {
        let epoll = Epoll::new().map_err(DeviceError::EventLoop)?;
        for (index, slot) in slots.iter().enumerate() {
            if slot.queue_service() != QueueService::EventLoop {
                continue;
            }
            for (q, evt) in slot.queue_evts().iter().enumerate() {
                epoll
                    .ctl(
                        ControlOperation::Add,
                        evt.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, token(index, q as u64)),
                    )
                    .map_err(DeviceError::EventLoop)?;
            }
        }
        let stop = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventLoop)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )
            .map_err(DeviceError::EventLoop)?;
        Ok(Self {
            handle: LoopHandle {
                epoll: Arc::new(epoll),
                slots,
            },
            stop,
        })
    }

    /// The handle vCPU threads report transport events to.
    pub fn handle(&self) -> LoopHandle {
        self.handle.clone()
    }

    /// Starts the event loop thread.
    pub fn spawn(self) -> Result<EventLoopThread> {
        let stop = self.stop.try_clone().map_err(DeviceError::EventLoop)?;
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || self.run())
            .map_err(DeviceError::EventLoop)?;
        Ok(EventLoopThread { thread, stop })
    }

    fn run(self) {
        // Every device's files, taps and sockets are open already.
        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Devices);
        let LoopHandle { epoll, slots } = self.handle;
        let mut events = [EpollEvent::default(); EVENTS_PER_WAIT];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "device event loop failed; devices stop");
                    return;
                }
            };
            for event in &events[..n] {
                if event.data() == STOP {
                    return;
                }
                let (index, kind) = untoken(event.data());
                let Some(slot) = slots.get(index) else {
                    continue;
                };
                let device_event = if kind == BACKEND {
                    DeviceEvent::Backend
                } else {
                    let Ok(q) = u16::try_from(kind) else {
                        continue;
                    };
                    if let Some(evt) = slot.queue_evts().get(usize::from(q)) {
                        // Non-blocking: nothing to read means a spurious wake.
                        let _ = evt.read();
                    }
                    DeviceEvent::Queue(q)
                };
                if let Ok(mut dev) = slot.device().lock() {
                    dev.process(device_event);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        assert_eq!(untoken(token(7, 3)), (7, 3));
        assert_eq!(untoken(token(18, BACKEND)), (18, BACKEND));
    }
}

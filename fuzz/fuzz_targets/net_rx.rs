//! Fuzzes the virtio-net receive path: the input is guest memory holding a
//! split receive queue (descriptor table, available ring) and whatever the
//! descriptors point at, followed by the frames the tap hands over (each a
//! little-endian u16 length and that many bytes; a few lengths stand for a
//! frame too long to read and for tap errors). The device is kicked on its
//! receive queue and told the tap is readable, so frames are delivered into
//! the driver's buffers or held back. Nothing may panic, whatever the rings
//! and frames say, and no frame delivered may be bigger than the device's
//! buffer.

#![no_main]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use capsid_devices::virtio::net::{
    FrameIo, Net, MAX_BUFFER_SIZE, RX_QUEUE, VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_LEN_LEGACY,
};
use capsid_devices::virtio::{DeviceEvent, VirtioDevice, VIRTIO_F_VERSION_1};
use capsid_fuzz::{poll_fd, queue};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x2_0000;
/// Bytes of input that become guest memory; the rest are frames.
const IMAGE_LEN: usize = 0x800;
/// Ring layouts (descriptor table, available ring, used ring) per queue.
const RX: (u32, u32, u32) = (0x0, 0x100, 0x200);
const TX: (u32, u32, u32) = (0x400, 0x500, 0x600);

/// Frame lengths that stand for something else than a frame.
const TOO_LONG: u16 = 0xffff;
const INTERRUPTED: u16 = 0xfffe;
const BROKEN: u16 = 0xfffd;

enum Incoming {
    Frame(Vec<u8>),
    /// A frame longer than any buffer: cut short when read.
    TooLong,
    /// A read interrupted by a signal.
    Interrupted,
    /// A read that fails for good.
    Broken,
}

/// A tap in memory handing over the fuzzer's frames.
struct FakeTap {
    /// Stands in for the tap's fd in the device's epoll set.
    fd: RawFd,
    incoming: VecDeque<Incoming>,
}

impl FrameIo for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.incoming.pop_front() {
            None => Err(io::ErrorKind::WouldBlock.into()),
            Some(Incoming::Frame(frame)) => {
                let n = frame.len().min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                Ok(frame.len())
            }
            Some(Incoming::TooLong) => {
                buf.fill(0x5a);
                Ok(buf.len() + 1)
            }
            Some(Incoming::Interrupted) => Err(io::ErrorKind::Interrupted.into()),
            Some(Incoming::Broken) => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn write_frame(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }

    fn set_header_len(&mut self, len: usize) -> io::Result<()> {
        assert!(len == VIRTIO_NET_HDR_LEN || len == VIRTIO_NET_HDR_LEN_LEGACY);
        Ok(())
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

fn frames(mut rest: &[u8]) -> VecDeque<Incoming> {
    let mut out = VecDeque::new();
    while let [lo, hi, tail @ ..] = rest {
        rest = tail;
        out.push_back(match u16::from_le_bytes([*lo, *hi]) {
            TOO_LONG => Incoming::TooLong,
            INTERRUPTED => Incoming::Interrupted,
            BROKEN => Incoming::Broken,
            len => {
                let n = usize::from(len).min(rest.len());
                let (frame, tail) = rest.split_at(n);
                rest = tail;
                Incoming::Frame(frame.to_vec())
            }
        });
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let (image, rest) = rest.split_at(rest.len().min(IMAGE_LEN));
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    mem.write_slice(image, GuestAddress(0))
        .expect("fill guest memory");

    let tap = FakeTap {
        fd: poll_fd(),
        incoming: frames(rest),
    };
    let mut net = Net::new(tap, None).expect("net device");
    net.ack_features(if control & 2 != 0 {
        VIRTIO_F_VERSION_1
    } else {
        0
    });

    let mut rx = queue(RX, control & 1 != 0);
    let mut tx = queue(TX, false);
    let kick = DeviceEvent::Queue(u16::try_from(RX_QUEUE).expect("queue index"));
    let events = [kick, DeviceEvent::Backend, kick, DeviceEvent::Backend];
    for event in events {
        let mut queues = [&mut rx, &mut tx];
        if net.process(event, &mut queues, &mem).is_err() {
            break;
        }
    }
    if control & 4 != 0 {
        net.reset();
    }

    // No frame delivered is bigger than the device's buffer.
    let stats = net.stats();
    assert!(
        stats.rx_bytes <= stats.rx_frames * MAX_BUFFER_SIZE as u64,
        "{stats:?}"
    );
    assert_eq!(stats.tx_frames, 0);
});

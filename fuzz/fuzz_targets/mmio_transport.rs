//! Fuzzes the virtio-mmio transport register handler: the input is guest
//! memory (rings and buffers) followed by a sequence of register reads
//! and writes of any offset and width, queue kicks, host-side events and
//! configuration changes, against an entropy device or a balloon. Nothing
//! may panic, whatever the driver does.

#![no_main]

use std::sync::Arc;

use capsid_devices::hosting::mmio::{Interrupt, MmioTransport};
use capsid_devices::virtio::balloon::{Balloon, BalloonConfig};
use capsid_devices::virtio::rng::{EntropySource, Rng, RngError};
use capsid_devices::virtio::{DeviceEvent, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x1_0000;
/// Bytes of input that become guest memory.
const IMAGE_LEN: usize = 0x2000;

struct NoIrq;

impl Interrupt for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Pattern;

impl EntropySource for Pattern {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
        buf.fill(0xa5);
        Ok(())
    }
}

fn drive<D: VirtioDevice>(t: &mut MmioTransport<D>, mut ops: &[u8]) {
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        let take = |ops: &mut &[u8], n: usize| -> Vec<u8> {
            let n = n.min(ops.len());
            let (a, b) = ops.split_at(n);
            *ops = b;
            a.to_vec()
        };
        match op % 6 {
            0 | 1 => {
                let hdr = take(&mut ops, 3);
                if hdr.len() < 3 {
                    return;
                }
                let offset = u64::from(u16::from_le_bytes([hdr[0], hdr[1]]) & 0x1ff);
                let width = [1usize, 2, 4, 8][usize::from(hdr[2] & 3)];
                if op % 6 == 0 {
                    let mut data = vec![0u8; width];
                    t.read(offset, &mut data);
                } else {
                    // Mostly small values, as drivers write, sometimes raw.
                    let mut data = take(&mut ops, width);
                    data.resize(width, 0);
                    let _ = t.write(offset, &data);
                }
            }
            2 => {
                let q = take(&mut ops, 1).first().copied().unwrap_or(0);
                t.process(DeviceEvent::Queue(u16::from(q % 8)));
            }
            3 => {
                t.process(DeviceEvent::Backend);
            }
            4 => t.signal_config_change(),
            _ => {
                let _ = t.device_request(|_, _, _| 1);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (image, ops) = rest.split_at(rest.len().min(IMAGE_LEN));
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    mem.write_slice(image, GuestAddress(0))
        .expect("fill guest memory");
    let irq = Arc::new(NoIrq);
    if which & 1 == 0 {
        let mut t = MmioTransport::new(Rng::with_source(Pattern), mem, irq);
        drive(&mut t, ops);
    } else {
        let config = BalloonConfig {
            deflate_on_oom: which & 2 != 0,
            stats_polling_interval_s: 0,
            free_page_reporting: which & 4 != 0,
        };
        let Ok(balloon) = Balloon::new(config) else {
            return;
        };
        let mut t = MmioTransport::new(balloon, mem, irq);
        drive(&mut t, ops);
    }
});

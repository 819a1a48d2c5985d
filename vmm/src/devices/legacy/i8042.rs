//! The i8042 keyboard controller, as much of it as a microVM needs: the
//! CPU reset line (command 0xFE, or output port bit 0 cleared through
//! command 0xD1), the command byte, self tests, a keyboard that
//! acknowledges commands, and a Ctrl-Alt-Del key sequence the host can
//! inject to ask the guest to reboot.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

/// Offset of the data port (0x60) from the device base.
pub const DATA: u8 = 0;
/// Offset of the status/command port (0x64) from the device base.
pub const COMMAND: u8 = 4;

/// Status: output buffer full.
const SB_OUT_FULL: u8 = 0x01;
/// Status: system flag (self test passed).
const SB_SYSTEM: u8 = 0x04;
/// Status: keyboard not inhibited.
const SB_UNLOCKED: u8 = 0x10;
/// Command byte: keyboard interrupt enabled.
const CB_KBD_INT: u8 = 0x01;
/// Command byte: system flag.
const CB_SYSTEM: u8 = 0x04;
/// Command byte: translate scancode set 2 to set 1.
const CB_XLATE: u8 = 0x40;

/// Controller commands.
const CMD_READ_CMD_BYTE: u8 = 0x20;
const CMD_WRITE_CMD_BYTE: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;
/// Keyboard replies.
const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;
const KBD_CMD_RESET: u8 = 0xff;
/// Bytes the output buffer holds at most.
const BUFFER_LEN: usize = 16;

/// Ctrl, Alt, Del pressed and released, scancode set 1.
const CTRL_ALT_DEL_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// The same in set 2.
const CTRL_ALT_DEL_SET2: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// What a snapshot keeps of the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The command byte.
    pub command_byte: u8,
    /// A command waiting for its data byte.
    pub pending: Option<u8>,
    /// Bytes waiting in the output buffer.
    pub out: Vec<u8>,
}

/// The controller; `R` pulls the reset line, `I` raises IRQ 1.
#[derive(Debug)]
pub struct I8042<R: Trigger, I: Trigger> {
    reset: R,
    irq: I,
    command_byte: u8,
    pending: Option<u8>,
    out: VecDeque<u8>,
}

impl<R: Trigger, I: Trigger> I8042<R, I> {
    /// A controller in its power-on state.
    pub fn new(reset: R, irq: I) -> Self {
        Self {
            reset,
            irq,
            command_byte: CB_KBD_INT | CB_SYSTEM | CB_XLATE,
            pending: None,
            out: VecDeque::with_capacity(BUFFER_LEN),
        }
    }

    /// A controller in a snapshot's `state` (a longer output buffer than
    /// the controller's is cut); raises IRQ 1 when bytes wait for the
    /// guest, as the controller would have.
    pub fn from_state(reset: R, irq: I, state: &I8042State) -> Self {
        let mut dev = Self::new(reset, irq);
        dev.command_byte = state.command_byte;
        dev.pending = state.pending;
        dev.push(&state.out);
        dev
    }

    /// The controller's state.
    pub fn state(&self) -> I8042State {
        I8042State {
            command_byte: self.command_byte,
            pending: self.pending,
            out: self.out.iter().copied().collect(),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        for b in bytes {
            if self.out.len() < BUFFER_LEN {
                self.out.push_back(*b);
            }
        }
        self.notify();
    }

    fn notify(&self) {
        if !self.out.is_empty() && self.command_byte & CB_KBD_INT != 0 {
            // A lost keyboard interrupt only delays the guest's read.
            let _ = self.irq.trigger();
        }
    }

    /// A guest read at `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            DATA => {
                let b = self.out.pop_front().unwrap_or(0);
                self.notify();
                b
            }
            COMMAND => {
                let full = if self.out.is_empty() { 0 } else { SB_OUT_FULL };
                SB_SYSTEM | SB_UNLOCKED | full
            }
            _ => 0xff,
        }
    }

    /// A guest write at `offset`; true when it pulled the reset line.
    pub fn write(&mut self, offset: u8, value: u8) -> bool {
        match offset {
            COMMAND => self.command(value),
            DATA => self.data(value),
            _ => false,
        }
    }

    fn command(&mut self, cmd: u8) -> bool {
        self.pending = None;
        match cmd {
            CMD_RESET_CPU => return self.pull_reset(),
            CMD_READ_CMD_BYTE => self.push(&[self.command_byte]),
            CMD_WRITE_CMD_BYTE | CMD_WRITE_OUTPUT_PORT => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push(&[0x55]),
            CMD_KBD_TEST => self.push(&[0x00]),
            // Enable/disable keyboard or mouse, and the rest: accepted.
            _ => {}
        }
        false
    }

    fn data(&mut self, value: u8) -> bool {
        match self.pending.take() {
            Some(CMD_WRITE_CMD_BYTE) => {
                self.command_byte = value;
                false
            }
            // Output port bit 0 is the CPU reset line, active low.
            Some(CMD_WRITE_OUTPUT_PORT) if value & 1 == 0 => self.pull_reset(),
            Some(_) => false,
            None => {
                // A keyboard command: acknowledged; a reset also passes
                // its self test.
                if value == KBD_CMD_RESET {
                    self.push(&[KBD_ACK, KBD_RESET_OK]);
                } else {
                    self.push(&[KBD_ACK]);
                }
                false
            }
        }
    }

    fn pull_reset(&mut self) -> bool {
        // The flag records the reset whatever the trigger reports.
        let _ = self.reset.trigger();
        true
    }

    /// Queues Ctrl-Alt-Del key presses and releases for the guest, in the
    /// scancode set it reads.
    pub fn ctrl_alt_del(&mut self) {
        let seq = if self.command_byte & CB_XLATE != 0 {
            CTRL_ALT_DEL_SET1
        } else {
            CTRL_ALT_DEL_SET2
        };
        self.push(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Count(Arc<AtomicU32>);

    impl Trigger for Count {
        type E = std::convert::Infallible;
        fn trigger(&self) -> Result<(), Self::E> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn dev() -> (I8042<Count, Count>, Count, Count) {
        let (r, i) = (Count::default(), Count::default());
        (I8042::new(r.clone(), i.clone()), r, i)
    }

    #[test]
    fn reset_by_command_and_by_output_port() {
        let (mut d, r, _) = dev();
        assert!(!d.write(COMMAND, 0x20));
        assert!(d.write(COMMAND, 0xfe));
        assert_eq!(r.0.load(Ordering::SeqCst), 1);
        assert!(!d.write(COMMAND, 0xd1));
        assert!(!d.write(DATA, 0x01));
        assert!(!d.write(COMMAND, 0xd1));
        assert!(d.write(DATA, 0xfe));
    }

    #[test]
    fn command_byte_round_trip_and_self_test() {
        let (mut d, _, _) = dev();
        d.write(COMMAND, 0x60);
        d.write(DATA, 0x00);
        d.write(COMMAND, 0x20);
        assert_eq!(d.read(COMMAND) & SB_OUT_FULL, 1);
        assert_eq!(d.read(DATA), 0x00);
        assert_eq!(d.read(COMMAND) & SB_OUT_FULL, 0);
        d.write(COMMAND, 0xaa);
        assert_eq!(d.read(DATA), 0x55);
        d.write(DATA, 0xff);
        assert_eq!((d.read(DATA), d.read(DATA)), (0xfa, 0xaa));
    }

    #[test]
    fn ctrl_alt_del_is_queued_and_interrupts() {
        let (mut d, r, i) = dev();
        d.ctrl_alt_del();
        assert!(i.0.load(Ordering::SeqCst) >= 1);
        let got: Vec<u8> = (0..CTRL_ALT_DEL_SET1.len()).map(|_| d.read(DATA)).collect();
        assert_eq!(got, CTRL_ALT_DEL_SET1);
        assert_eq!(r.0.load(Ordering::SeqCst), 0);
        // Without translation the keyboard speaks set 2.
        d.write(COMMAND, 0x60);
        d.write(DATA, CB_KBD_INT);
        d.ctrl_alt_del();
        assert_eq!(d.read(DATA), 0x14);
    }

    #[test]
    fn state_round_trips() {
        let (mut d, _, _) = dev();
        d.write(COMMAND, 0x60);
        d.write(DATA, CB_KBD_INT);
        d.ctrl_alt_del();
        d.read(DATA);
        d.write(COMMAND, 0xd1);
        let state = d.state();
        assert_eq!(state.pending, Some(0xd1));
        let (r, i) = (Count::default(), Count::default());
        let mut back = I8042::from_state(r.clone(), i.clone(), &state);
        assert_eq!(back.state(), state);
        // Keys still waiting interrupt the restored guest.
        assert!(i.0.load(Ordering::SeqCst) >= 1);
        assert_eq!(back.read(DATA), CTRL_ALT_DEL_SET2[1]);
        // The pending output-port write still resets.
        assert!(back.write(DATA, 0xfe));
        assert_eq!(r.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn buffer_is_bounded() {
        let (mut d, _, _) = dev();
        for _ in 0..10 {
            d.ctrl_alt_del();
        }
        let n = (0..100)
            .take_while(|_| {
                d.read(COMMAND) & SB_OUT_FULL != 0 && {
                    d.read(DATA);
                    true
                }
            })
            .count();
        assert_eq!(n, BUFFER_LEN);
    }
}

//! Legacy PC devices on port I/O: COM1 (8250 UART, vm-superio) for the
//! console, interrupting on IRQ 4, and the i8042 keyboard controller
//! whose reset line is how a guest ends the VM (IRQ 1 for the keys the
//! host injects).

pub mod i8042;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};

use self::i8042::{I8042State, I8042};
use super::IrqLine;
use crate::vstate::vcpu::Bus;

/// COM1's I/O ports.
pub const COM1_BASE: u16 = 0x3f8;
const COM1_LEN: u16 = 8;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command port: writing 0xFE pulses the CPU reset line.
pub const I8042_COMMAND: u16 = 0x64;

/// A trigger that records that it fired (the i8042 reset line).
#[derive(Debug, Default, Clone)]
pub struct Flag(Arc<AtomicBool>);

impl Flag {
    /// Whether it has fired.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl Trigger for Flag {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// A device register's offset from its base port (callers match the range
/// first, so it is small).
fn port_offset(port: u16, base: u16) -> u8 {
    u8::try_from(port.wrapping_sub(base)).unwrap_or(u8::MAX)
}

type Console = Box<dyn Write + Send>;

/// Errors restoring the legacy devices.
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    /// The saved serial port is not one vm-superio takes.
    #[error("the saved serial port cannot be restored: {0}")]
    Serial(String),
    /// A device's lock was poisoned by a panic.
    #[error("the {0} is out of service")]
    Poisoned(&'static str),
}

/// The 8250's registers, as a snapshot keeps them (vm-superio's
/// `SerialState`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegisters {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable.
    pub interrupt_enable: u8,
    /// Interrupt identification.
    pub interrupt_identification: u8,
    /// Line control.
    pub line_control: u8,
    /// Line status.
    pub line_status: u8,
    /// Modem control.
    pub modem_control: u8,
    /// Modem status.
    pub modem_status: u8,
    /// Scratch.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialRegisters {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegisters> for SerialState {
    fn from(s: &SerialRegisters) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// What a snapshot keeps of the legacy devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyState {
    /// COM1.
    pub serial: SerialRegisters,
    /// The i8042.
    pub i8042: I8042State,
}

/// The port-I/O devices of the VM.
pub struct LegacyBus {
    serial: Mutex<Serial<IrqLine, vm_superio::serial::NoEvents, Console>>,
    i8042: Mutex<I8042<Flag, IrqLine>>,
    reset: Flag,
    unhandled_logged: AtomicBool,
}

impl std::fmt::Debug for LegacyBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyBus")
            .field("reset", &self.reset.is_set())
            .finish()
    }
}

impl LegacyBus {
    /// COM1 writing to `console` and interrupting on `serial_irq`, and the
    /// i8042 interrupting on `keyboard_irq`.
    pub fn new(console: Console, serial_irq: IrqLine, keyboard_irq: IrqLine) -> Self {
        let reset = Flag::default();
        Self {
            serial: Mutex::new(Serial::new(serial_irq, console)),
            i8042: Mutex::new(I8042::new(reset.clone(), keyboard_irq)),
            reset,
            unhandled_logged: AtomicBool::new(false),
        }
    }

    /// The devices of [`Self::new`] in a snapshot's `state`; each raises
    /// its interrupt if the state has one pending, so build them once the
    /// interrupt controllers hold their own restored state.
    pub fn restore(
        console: Console,
        serial_irq: IrqLine,
        keyboard_irq: IrqLine,
        state: &LegacyState,
    ) -> Result<Self, LegacyError> {
        let reset = Flag::default();
        let serial = Serial::from_state(
            &SerialState::from(&state.serial),
            serial_irq,
            vm_superio::serial::NoEvents,
            console,
        )
        .map_err(|e| LegacyError::Serial(e.to_string()))?;
        Ok(Self {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042::from_state(reset.clone(), keyboard_irq, &state.i8042)),
            reset,
            unhandled_logged: AtomicBool::new(false),
        })
    }

    /// The devices' state, for a snapshot.
    pub fn state(&self) -> Result<LegacyState, LegacyError> {
        let serial = self
            .serial
            .lock()
            .map_err(|_| LegacyError::Poisoned("serial port"))?
            .state();
        let i8042 = self
            .i8042
            .lock()
            .map_err(|_| LegacyError::Poisoned("i8042"))?
            .state();
        Ok(LegacyState {
            serial: serial.into(),
            i8042,
        })
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard.
    pub fn ctrl_alt_del(&self) {
        if let Ok(mut i8042) = self.i8042.lock() {
            i8042.ctrl_alt_del();
        }
    }

    /// Flushes the console.
    pub fn flush(&self) {
        if let Ok(mut serial) = self.serial.lock() {
            let _ = serial.writer_mut().flush();
        }
    }

    /// Logs an access to no device, once per VM: a guest probing absent
    /// hardware must not flood the log.
    pub fn log_unhandled(&self, what: &str, addr: u64) {
        if !self.unhandled_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                what,
                addr = format_args!("{addr:#x}"),
                "guest access to no device (further ones not logged)"
            );
        }
    }
}

impl Bus for LegacyBus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&p) => {
                if let Ok(mut serial) = self.serial.lock() {
                    *first = serial.read(port_offset(p, COM1_BASE));
                }
            }
            I8042_DATA | I8042_COMMAND => {
                if let Ok(mut i8042) = self.i8042.lock() {
                    *first = i8042.read(port_offset(port, I8042_DATA));
                }
            }
            _ => self.log_unhandled("pio read", u64::from(port)),
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        let Some(&value) = data.first() else {
            return false;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&p) => {
                if let Ok(mut serial) = self.serial.lock() {
                    if let Err(e) = serial.write(port_offset(p, COM1_BASE), value) {
                        tracing::warn!(error = ?e, "serial console write failed");
                    }
                }
                false
            }
            I8042_DATA | I8042_COMMAND => {
                if let Ok(mut i8042) = self.i8042.lock() {
                    i8042.write(port_offset(port, I8042_DATA), value);
                }
                self.reset.is_set()
            }
            _ => {
                self.log_unhandled("pio write", u64::from(port));
                false
            }
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0xff);
        self.log_unhandled("mmio read", addr);
    }

    fn mmio_write(&self, addr: u64, _data: &[u8]) {
        self.log_unhandled("mmio write", addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn bus(console: Console) -> LegacyBus {
        LegacyBus::new(
            console,
            IrqLine::detached().unwrap(),
            IrqLine::detached().unwrap(),
        )
    }

    #[test]
    fn serial_output_reaches_console() {
        let sink = Sink::default();
        let bus = bus(Box::new(sink.clone()));
        for b in b"hi\n" {
            assert!(!bus.pio_write(COM1_BASE, &[*b]));
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi\n");
        // Line status register: transmitter empty.
        let mut lsr = [0u8];
        bus.pio_read(COM1_BASE + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn i8042_pulse_resets() {
        let bus = bus(Box::new(std::io::sink()));
        assert!(!bus.pio_write(I8042_COMMAND, &[0x20]));
        assert!(bus.pio_write(I8042_COMMAND, &[0xfe]));
    }

    #[test]
    fn ctrl_alt_del_reaches_the_data_port() {
        let bus = bus(Box::new(std::io::sink()));
        bus.ctrl_alt_del();
        let mut status = [0u8];
        bus.pio_read(I8042_COMMAND, &mut status);
        assert_eq!(status[0] & 1, 1);
        let mut key = [0u8];
        bus.pio_read(I8042_DATA, &mut key);
        assert_eq!(key[0], 0x1d);
    }

    #[test]
    fn state_survives_a_restore() {
        let bus = bus(Box::new(std::io::sink()));
        // The guest's line control and scratch registers, and a key.
        bus.pio_write(COM1_BASE + 3, &[0x03]);
        bus.pio_write(COM1_BASE + 7, &[0x5a]);
        bus.ctrl_alt_del();
        let state = bus.state().unwrap();
        let json = serde_json::to_string(&state).unwrap();
        let back: LegacyState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let sink = Sink::default();
        let restored = LegacyBus::restore(
            Box::new(sink.clone()),
            IrqLine::detached().unwrap(),
            IrqLine::detached().unwrap(),
            &back,
        )
        .unwrap();
        let mut scratch = [0u8];
        restored.pio_read(COM1_BASE + 7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
        let mut key = [0u8];
        restored.pio_read(I8042_DATA, &mut key);
        assert_eq!(key[0], 0x1d);
        restored.pio_write(COM1_BASE, b"x");
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"x");
    }

    #[test]
    fn unknown_ports_read_as_ones_and_do_not_panic() {
        let bus = bus(Box::new(std::io::sink()));
        let mut data = [0u8; 4];
        bus.pio_read(0x1234, &mut data);
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.pio_write(0x1234, &[]));
        bus.mmio_write(0xd000_0000, &[1, 2, 3, 4]);
    }
}

//! The port I/O bus: COM1 and the i8042 reset line. Ports nobody decodes read
//! as all ones and ignore writes, as on a PC with nothing plugged in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vm_superio::serial::SerialState;
use vm_superio::{I8042Device, Serial};

use super::console::ConsoleWriter;
use super::triggers::{IrqLine, ResetLine};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
const COM1_PORTS: std::ops::RangeInclusive<u16> = COM1_BASE..=COM1_BASE + 7;
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;
/// The pvpanic port QEMU established: a guest writes `PVPANIC_PANICKED` when
/// its kernel panics, so the VMM can tell a crash from an orderly reboot
/// (with `panic=N`, Linux reboots after a panic the same way as on `reboot`).
pub const PVPANIC_PORT: u16 = 0x505;
/// Event bits of the pvpanic device; reading the port returns the ones supported.
pub const PVPANIC_PANICKED: u8 = 1 << 0;

/// What the vCPU loop must do after a port access.
#[derive(Debug, PartialEq, Eq)]
pub enum PioOutcome {
    Continue,
    /// The guest asked for a CPU reset: the VM ends.
    Reset,
    /// The guest kernel reported a panic: the VM ends.
    Panic,
}

pub struct PioBus {
    serial: Mutex<Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleWriter>>,
    i8042: Mutex<I8042Device<ResetLine>>,
    reset: ResetLine,
    /// Set once the console sink has failed (e.g. a closed pipe), so the
    /// failure is logged once rather than for every byte the guest prints.
    console_failed: AtomicBool,
}

impl PioBus {
    /// The devices at power-on, or the serial port as a snapshot recorded it.
    pub fn new(
        serial_irq: IrqLine,
        console: ConsoleWriter,
        saved: Option<&SerialState>,
    ) -> Result<Self, String> {
        let reset = ResetLine::default();
        let serial = match saved {
            None => Serial::new(serial_irq, console),
            Some(state) => Serial::from_state(state, serial_irq, vm_superio::serial::NoEvents, console)
                .map_err(|e| format!("the saved serial port state: {e:?}"))?,
        };
        Ok(PioBus {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042Device::new(reset.clone())),
            reset,
            console_failed: AtomicBool::new(false),
        })
    }

    /// All devices here have 8-bit registers, so each byte is one access:
    /// that is how `rep insb` arrives (count bytes for one exit).
    pub fn read(&self, port: u16, data: &mut [u8]) {
        for byte in data.iter_mut() {
            *byte = match port {
                p if COM1_PORTS.contains(&p) => lock(&self.serial).read((port - COM1_BASE) as u8),
                I8042_DATA | I8042_COMMAND => lock(&self.i8042).read((port - I8042_DATA) as u8),
                PVPANIC_PORT => PVPANIC_PANICKED,
                _ => {
                    tracing::trace!(port = format_args!("{port:#x}"), "read from unclaimed port");
                    0xff
                }
            };
        }
    }

    /// Each byte is one access, as for reads (`rep outsb`).
    pub fn write(&self, port: u16, data: &[u8]) -> PioOutcome {
        for &value in data {
            let outcome = self.write_byte(port, value);
            if outcome != PioOutcome::Continue {
                return outcome;
            }
        }
        PioOutcome::Continue
    }

    fn write_byte(&self, port: u16, value: u8) -> PioOutcome {
        match port {
            p if COM1_PORTS.contains(&p) => {
                let result = lock(&self.serial).write((port - COM1_BASE) as u8, value);
                // The console sink failing must not take the guest down.
                if let Err(e) = result {
                    if !self.console_failed.swap(true, Ordering::Relaxed) {
                        tracing::warn!("serial console output failed, dropping it from now on: {e:?}");
                    }
                }
            }
            I8042_DATA | I8042_COMMAND => {
                let _ = lock(&self.i8042).write((port - I8042_DATA) as u8, value);
                if self.reset.take() {
                    return PioOutcome::Reset;
                }
            }
            PVPANIC_PORT if value & PVPANIC_PANICKED != 0 => return PioOutcome::Panic,
            _ => tracing::trace!(port = format_args!("{port:#x}"), value, "write to unclaimed port"),
        }
        PioOutcome::Continue
    }

    pub fn serial_state(&self) -> SerialState {
        lock(&self.serial).state()
    }

    /// Flushes what the console buffered.
    pub fn flush_console(&self) {
        let _ = lock(&self.serial).writer_mut().flush();
    }
}

/// A device whose lock was poisoned by a panicking vCPU thread is still in a
/// consistent state for these simple register files, so keep going.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex as StdMutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Captured(Arc<StdMutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn bus() -> (PioBus, Captured) {
        let out = Captured::default();
        let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap());
        (PioBus::new(irq, Box::new(out.clone()), None).unwrap(), out)
    }

    #[test]
    fn com1_data_register_reaches_the_console() {
        let (bus, out) = bus();
        for b in b"hi\n" {
            assert_eq!(bus.write(COM1_BASE, &[*b]), PioOutcome::Continue);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn i8042_reset_command_ends_the_vm_once() {
        let (bus, _) = bus();
        assert_eq!(bus.write(I8042_COMMAND, &[0xd1]), PioOutcome::Continue);
        assert_eq!(bus.write(I8042_COMMAND, &[0xfe]), PioOutcome::Reset);
        assert_eq!(bus.write(I8042_DATA, &[0xfe]), PioOutcome::Continue);
    }

    #[test]
    fn pvpanic_reports_a_panic() {
        let (bus, _) = bus();
        let mut features = [0u8];
        bus.read(PVPANIC_PORT, &mut features);
        assert_eq!(features[0], PVPANIC_PANICKED);
        assert_eq!(bus.write(PVPANIC_PORT, &[0]), PioOutcome::Continue);
        assert_eq!(bus.write(PVPANIC_PORT, &[PVPANIC_PANICKED]), PioOutcome::Panic);
    }

    #[test]
    fn string_writes_reach_the_console_byte_by_byte() {
        let (bus, out) = bus();
        assert_eq!(bus.write(COM1_BASE, b"rep outsb"), PioOutcome::Continue);
        assert_eq!(&*out.0.lock().unwrap(), b"rep outsb");
    }

    #[test]
    fn unclaimed_ports_float_high() {
        let (bus, _) = bus();
        let mut data = [0u8; 2];
        bus.read(0x2f8, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(bus.write(0x80, &[0x12]), PioOutcome::Continue);
    }

    #[test]
    fn line_status_reports_an_empty_transmitter() {
        let (bus, _) = bus();
        let mut lsr = [0u8];
        bus.read(COM1_BASE + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }
}

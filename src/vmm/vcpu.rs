//! One vCPU: its thread's run loop, the exits it handles, and how another
//! thread makes it leave `KVM_RUN`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use kvm_bindings::{KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::devices::virtio::mmio::MmioBus;
use super::devices::{PioBus, PioOutcome};
use super::emulation::{self, Assist};
use super::error::{hex, Error};
use super::memory::GuestMemoryHost;

/// Why a vCPU stopped running.
#[derive(Debug)]
pub enum VcpuEnd {
    /// The guest pulled the reset line (i8042) or asked KVM for a shutdown or reset.
    GuestReset,
    /// The CPU shut down on a triple fault: the guest crashed.
    TripleFault,
    /// The guest kernel said it panicked (pvpanic).
    GuestPanic,
    /// The VMM asked it to stop.
    Stopped,
    Failed(Error),
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*const AtomicU8> = const { Cell::new(std::ptr::null()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Setting immediate_exit closes the race where the signal lands after the
    // thread checked its stop flag but before it entered KVM_RUN: the next
    // KVM_RUN then returns at once with EINTR.
    IMMEDIATE_EXIT.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is set only while this thread owns the vCPU
            // and its kvm_run mapping, and cleared before that ends. The byte
            // is also written by this same thread outside the handler and read
            // by KVM; a one-byte store cannot tear, and the handler only ever
            // sets it, so the interleavings are all benign.
            unsafe { &*p }.store(1, Ordering::SeqCst);
        }
    });
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the handler once per process; every caller learns whether it is
/// there, since a kick without it would kill the whole process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno())
    });
    result.map_err(std::io::Error::from_raw_os_error)
}

pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
    bus: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    mem: GuestMemoryHost,
    assists: u64,
}

/// What one exit asks the loop to do next.
enum Next {
    Run,
    End(VcpuEnd),
    EmulationFailure,
}

impl Vcpu {
    pub fn new(index: u8, fd: VcpuFd, bus: Arc<PioBus>, mmio: Arc<MmioBus>, mem: GuestMemoryHost) -> Self {
        Vcpu {
            index,
            fd,
            bus,
            mmio,
            mem,
            assists: 0,
        }
    }

    /// Runs the guest until it ends, fails, or `stop` is set and the thread kicked.
    pub fn run(mut self, stop: &AtomicBool) -> VcpuEnd {
        let immediate_exit = &raw mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit.cast::<AtomicU8>().cast_const()));
        let end = self.run_loop(stop);
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null()));
        // Where a guest was when it was stopped is the first clue to a hang;
        // fetched only when it will be logged.
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return end;
        }
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        tracing::debug!(
            vcpu = self.index,
            assists = self.assists,
            rip = format_args!("{rip:#x}"),
            ?end,
            "vCPU stopped"
        );
        end
    }

    fn run_loop(&mut self, stop: &AtomicBool) -> VcpuEnd {
        loop {
            if stop.load(Ordering::SeqCst) {
                return VcpuEnd::Stopped;
            }
            let next = match self.fd.run() {
                Ok(exit) => handle_exit(self.index, &self.bus, &self.mmio, exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    Next::Run
                }
                Err(e) => Next::End(VcpuEnd::Failed(Error::Kvm("KVM_RUN", e))),
            };
            match next {
                Next::Run => {}
                Next::End(end) => return end,
                Next::EmulationFailure => {
                    if let Err(e) = self.assist_emulation() {
                        return VcpuEnd::Failed(e);
                    }
                }
            }
        }
    }

    /// Completes an instruction KVM's emulator could not, or fails naming it.
    fn assist_emulation(&mut self) -> Result<(), Error> {
        // SAFETY: called only right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR,
        // for which `internal` is the active member of the union.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
            return Err(self.failure(format!(
                "KVM internal error, suberror {} (data {:x?})",
                internal.suberror,
                &internal.data[..(internal.ndata as usize).min(16)]
            )));
        }
        let mut regs = self.fd.get_regs().map_err(|e| Error::Kvm("KVM_GET_REGS", e))?;
        let bytes = emulation::instruction_bytes(internal.ndata, &internal.data)
            .unwrap_or_else(|| self.fetch_instruction(regs.rip));
        let unsupported = || Error::UnsupportedInstruction {
            vcpu: self.index,
            rip: regs.rip,
            bytes: bytes.clone(),
        };
        let assist = emulation::decide(&bytes).ok_or_else(unsupported)?;
        tracing::trace!(vcpu = self.index, rip = format_args!("{:#x}", regs.rip), ?assist, bytes = %hex(&bytes), "emulation assist");
        self.assists += 1;
        let (len, vector) = match assist {
            Assist::Skip { len } => (len, None),
            Assist::SkipAndRaise { len, vector } => (len, Some(vector)),
        };
        regs.rip += u64::from(len);
        self.fd
            .set_regs(&regs)
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        if let Some(vector) = vector {
            let mut events = self
                .fd
                .get_vcpu_events()
                .map_err(|e| Error::Kvm("KVM_GET_VCPU_EVENTS", e))?;
            events.exception.injected = 1;
            events.exception.nr = vector;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            self.fd
                .set_vcpu_events(&events)
                .map_err(|e| Error::Kvm("KVM_SET_VCPU_EVENTS", e))?;
        }
        Ok(())
    }

    /// Reads the bytes at a guest virtual address, for KVMs that do not
    /// report them with the exit.
    fn fetch_instruction(&self, rip: u64) -> Vec<u8> {
        let Ok(t) = self.fd.translate_gva(rip) else {
            return Vec::new();
        };
        if t.valid == 0 {
            return Vec::new();
        }
        let mut buf = [0u8; 15];
        // An instruction may run off the end of RAM; keep what was readable.
        let n = self
            .mem
            .read(&mut buf, GuestAddress(t.physical_address))
            .unwrap_or(0);
        buf[..n].to_vec()
    }

    fn failure(&self, reason: String) -> Error {
        Error::Vcpu {
            vcpu: self.index,
            reason,
        }
    }
}

fn handle_exit(index: u8, bus: &PioBus, mmio: &MmioBus, exit: VcpuExit<'_>) -> Next {
    match exit {
        VcpuExit::IoOut(port, data) => match bus.write(port, data) {
            PioOutcome::Continue => Next::Run,
            PioOutcome::Reset => Next::End(VcpuEnd::GuestReset),
            PioOutcome::Panic => Next::End(VcpuEnd::GuestPanic),
        },
        VcpuExit::IoIn(port, data) => {
            bus.read(port, data);
            Next::Run
        }
        VcpuExit::MmioRead(addr, data) => {
            if mmio.read(addr, data) {
                return Next::Run;
            }
            tracing::trace!(
                vcpu = index,
                addr = format_args!("{addr:#x}"),
                "read from unclaimed MMIO"
            );
            data.fill(0xff);
            Next::Run
        }
        VcpuExit::MmioWrite(addr, data) => {
            if mmio.write(addr, data) {
                return Next::Run;
            }
            tracing::trace!(
                vcpu = index,
                addr = format_args!("{addr:#x}"),
                "write to unclaimed MMIO"
            );
            Next::Run
        }
        VcpuExit::Shutdown => Next::End(VcpuEnd::TripleFault),
        VcpuExit::SystemEvent(kind, _)
            if kind == KVM_SYSTEM_EVENT_SHUTDOWN || kind == KVM_SYSTEM_EVENT_RESET =>
        {
            Next::End(VcpuEnd::GuestReset)
        }
        VcpuExit::InternalError => Next::EmulationFailure,
        VcpuExit::FailEntry(reason, cpu) => Next::End(VcpuEnd::Failed(Error::Vcpu {
            vcpu: index,
            reason: format!("KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"),
        })),
        other => Next::End(VcpuEnd::Failed(Error::Vcpu {
            vcpu: index,
            reason: format!("unexpected exit {other:?}"),
        })),
    }
}

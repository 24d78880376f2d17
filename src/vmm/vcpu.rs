//! One vCPU: its thread's run loop, the exits it handles, and how another
//! thread makes it leave `KVM_RUN`.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use kvm_bindings::{KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::devices::virtio::mmio::MmioBus;
use super::devices::{PioBus, PioOutcome};
use super::emulation::{self, Assist};
use super::error::{hex, Error};
use super::memory::GuestMemoryHost;
use super::snapshot::vcpu_state::{self, VcpuState};

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
    // thread checked its stop and pause flags but before it entered KVM_RUN: the next
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

/// The VM has ended, or is ending, so its vCPUs cannot be paused or resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the VM is not running")]
pub struct NotRunning;

/// What the host asks of a VM's vCPU threads (stop, pause) and what they
/// report back (parked, ended). Shared by the threads and the handles that
/// drive them, from any thread.
pub struct VcpuControl {
    stop: AtomicBool,
    /// Mirrors `ControlState::pause`, so the run loop can check it on every
    /// iteration without taking the lock.
    pause: AtomicBool,
    state: Mutex<ControlState>,
    /// Signalled on every change of `ControlState`: vCPU threads wait on it
    /// to be resumed, pausers wait on it for the threads to park.
    changed: Condvar,
}

struct ControlState {
    pause: bool,
    /// The kernel thread id of each vCPU thread while it may be kicked: set
    /// once it is inside its run loop with the kick handler pointed at its
    /// `kvm_run`, cleared before it leaves. Kicks are only sent under the
    /// lock, so a thread id is never used after its thread has gone (and
    /// maybe been reused by another thread).
    threads: Vec<Option<libc::pid_t>>,
    /// vCPU threads parked in `VcpuControl::park`.
    parked: usize,
    /// vCPU threads whose run loop has returned.
    ended: usize,
    /// Per vCPU: a state capture asked of its parked thread, and its answer.
    captures: Vec<Capture>,
}

enum Capture {
    None,
    Wanted,
    Done(Box<Result<VcpuState, Error>>),
}

impl ControlState {
    fn all_still(&self) -> bool {
        self.parked + self.ended == self.threads.len()
    }
}

impl VcpuControl {
    pub fn new(vcpus: usize) -> Self {
        VcpuControl {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            state: Mutex::new(ControlState {
                pause: false,
                threads: vec![None; vcpus],
                parked: 0,
                ended: 0,
                captures: (0..vcpus).map(|_| Capture::None).collect(),
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        // Nothing panics while holding the lock; should it anyway, the
        // counters are still consistent, and a stop must still get through.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes every vCPU leave `KVM_RUN` and return `VcpuEnd::Stopped`,
    /// paused ones included. Returns at once; join the threads to wait.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let state = self.lock();
        self.changed.notify_all();
        kick_all(&state);
    }

    /// Freezes the guest: returns once every vCPU thread is out of
    /// `KVM_RUN` and parked, so the guest executes nothing more until
    /// `resume`. Pausing a paused VM is not an error: it returns, like the
    /// first call, once every vCPU is parked. A `resume` that races this
    /// call wins, and this returns without waiting.
    pub fn pause(&self) -> Result<(), NotRunning> {
        let started = Instant::now();
        let mut state = self.lock();
        if self.stop.load(Ordering::SeqCst) || state.ended > 0 {
            return Err(NotRunning);
        }
        if !state.pause {
            state.pause = true;
            // Set before the kicks, so a thread that misses its kick (it was
            // not yet in KVM_RUN) sees the flag before it enters again, and
            // one that is in KVM_RUN is forced out by the kick.
            self.pause.store(true, Ordering::SeqCst);
            kick_all(&state);
        }
        while state.pause && !state.all_still() {
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        // A vCPU that ended meanwhile (the guest reset, a stop) ends the VM.
        if self.stop.load(Ordering::SeqCst) || state.ended > 0 {
            return Err(NotRunning);
        }
        tracing::debug!(
            vcpus = state.threads.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "vCPUs paused"
        );
        Ok(())
    }

    /// Lets paused vCPUs run again from where they were. Resuming a VM that
    /// is not paused is not an error.
    pub fn resume(&self) -> Result<(), NotRunning> {
        let mut state = self.lock();
        if self.stop.load(Ordering::SeqCst) || state.ended > 0 {
            return Err(NotRunning);
        }
        if state.pause {
            state.pause = false;
            self.pause.store(false, Ordering::SeqCst);
            self.changed.notify_all();
            tracing::debug!("vCPUs resumed");
        }
        Ok(())
    }

    /// The state of every vCPU of a paused VM, each read by its own thread.
    pub fn capture(&self) -> Result<Vec<VcpuState>, Error> {
        let not_running = || Error::Snapshot("the VM is not paused".into());
        let mut state = self.lock();
        if !state.pause || !state.all_still() || self.stop.load(Ordering::SeqCst) || state.ended > 0 {
            return Err(not_running());
        }
        state.captures.iter_mut().for_each(|c| *c = Capture::Wanted);
        self.changed.notify_all();
        loop {
            if self.stop.load(Ordering::SeqCst) || state.ended > 0 {
                state.captures.iter_mut().for_each(|c| *c = Capture::None);
                return Err(not_running());
            }
            if state.captures.iter().all(|c| matches!(c, Capture::Done(_))) {
                break;
            }
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        let idle = (0..state.threads.len()).map(|_| Capture::None).collect();
        std::mem::replace(&mut state.captures, idle)
            .into_iter()
            .map(|c| match c {
                Capture::Done(result) => *result,
                _ => unreachable!("all done above"),
            })
            .collect()
    }

    /// Whether a pause is in force (the vCPUs may still be on their way to
    /// parking if a `pause` call has not returned yet).
    pub fn is_paused(&self) -> bool {
        self.lock().pause
    }

    /// Called by a vCPU thread that saw the pause flag: waits, out of
    /// KVM_RUN, until resumed or stopped, reading its state with `capture`
    /// when asked to.
    fn park(&self, index: u8, capture: &mut dyn FnMut() -> Result<VcpuState, Error>) {
        let mut state = self.lock();
        let parked_at = Instant::now();
        // Counted even if a resume came first: the pauser waiting for this
        // thread then sees `pause` cleared and stops waiting anyway.
        state.parked += 1;
        self.changed.notify_all();
        while state.pause && !self.stop.load(Ordering::SeqCst) {
            if matches!(state.captures.get(usize::from(index)), Some(Capture::Wanted)) {
                drop(state);
                let result = capture();
                state = self.lock();
                state.captures[usize::from(index)] = Capture::Done(Box::new(result));
                self.changed.notify_all();
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state.parked -= 1;
        drop(state);
        tracing::trace!(
            vcpu = index,
            parked_ms = parked_at.elapsed().as_millis() as u64,
            "vCPU unparked"
        );
    }
}

/// Sends the kick signal to every vCPU thread inside its run loop. Needs the
/// lock so none of them can leave (and its thread id be reused) meanwhile.
fn kick_all(state: &MutexGuard<'_, ControlState>) {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    for tid in state.threads.iter().flatten() {
        // SAFETY: tgkill only sends a signal; the thread is alive (it
        // unregisters under the lock held here before it exits) and has the
        // kick handler installed (Vm::start checks that before any vCPU runs).
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, *tid, kick_signal()) };
        if rc != 0 {
            tracing::warn!(
                tid,
                error = %std::io::Error::last_os_error(),
                "could not kick a vCPU thread"
            );
        }
    }
}

/// A vCPU thread's registration with its `VcpuControl`; dropping it (also
/// when the run loop panics) unregisters the thread and detaches the kick
/// handler from its `kvm_run`, before that mapping goes away with the vCPU fd.
struct Registration<'a> {
    control: &'a VcpuControl,
    index: usize,
}

impl<'a> Registration<'a> {
    /// # Safety
    /// `immediate_exit` must stay valid until the registration is dropped,
    /// on this thread: the kick handler writes through it until then.
    unsafe fn new(control: &'a VcpuControl, index: u8, immediate_exit: *const AtomicU8) -> Self {
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        let index = usize::from(index);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        control.lock().threads[index] = Some(tid);
        Registration { control, index }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut state = self.control.lock();
        state.threads[self.index] = None;
        state.ended += 1;
        self.control.changed.notify_all();
        drop(state);
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null()));
    }
}

pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
    bus: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    mem: GuestMemoryHost,
    /// The MSRs a snapshot saves.
    msr_indices: Arc<Vec<u32>>,
    assists: u64,
}

/// What one exit asks the loop to do next.
enum Next {
    Run,
    End(VcpuEnd),
    EmulationFailure,
}

impl Vcpu {
    pub fn new(
        index: u8,
        fd: VcpuFd,
        bus: Arc<PioBus>,
        mmio: Arc<MmioBus>,
        mem: GuestMemoryHost,
        msr_indices: Arc<Vec<u32>>,
    ) -> Self {
        Vcpu {
            index,
            fd,
            bus,
            mmio,
            mem,
            msr_indices,
            assists: 0,
        }
    }

    /// Reads this vCPU's state for a snapshot. The I/O exit the thread last
    /// handled is completed first (one `KVM_RUN` that returns before
    /// entering the guest), or a port or MMIO read's value would be lost.
    fn capture(&mut self) -> Result<VcpuState, Error> {
        self.fd.set_kvm_immediate_exit(1);
        let completed = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Ok(()) => {
                return Err(self.failure("KVM ran the guest despite immediate_exit".into()));
            }
            Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
        }
        vcpu_state::capture(&self.fd, &self.msr_indices)
    }

    /// Runs the guest until it ends, fails, or `control` stops it; parks
    /// whenever `control` pauses it.
    pub fn run(mut self, control: &VcpuControl) -> VcpuEnd {
        let immediate_exit = &raw mut self.fd.get_kvm_run().immediate_exit;
        // SAFETY: the kvm_run mapping lives as long as `self.fd`, which
        // outlives the registration: it is dropped below, or on a panic as a
        // local before the `self` parameter.
        let registration = unsafe {
            Registration::new(
                control,
                self.index,
                immediate_exit.cast::<AtomicU8>().cast_const(),
            )
        };
        let end = self.run_loop(control);
        drop(registration);
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

    fn run_loop(&mut self, control: &VcpuControl) -> VcpuEnd {
        loop {
            if control.stop.load(Ordering::SeqCst) {
                return VcpuEnd::Stopped;
            }
            if control.pause.load(Ordering::SeqCst) {
                let index = self.index;
                control.park(index, &mut || self.capture());
                // Stopped while parked, or paused again: the checks above decide.
                continue;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::thread::JoinHandle;
    use std::time::Duration;

    /// A vCPU thread without KVM: its "KVM_RUN" spins until its
    /// immediate_exit byte is set, which only the kick handler does, so a
    /// pause or stop gets through only by the real kick. It waits
    /// `park_delay` before parking, so a pause that does not wait for the
    /// threads to park shows. `in_run` counts the threads inside "KVM_RUN".
    fn fake_vcpu(
        control: &Arc<VcpuControl>,
        index: u8,
        park_delay: Duration,
        in_run: &Arc<AtomicUsize>,
    ) -> JoinHandle<()> {
        install_kick_handler().unwrap();
        let control = control.clone();
        let in_run = in_run.clone();
        std::thread::spawn(move || {
            let immediate_exit = AtomicU8::new(0);
            // SAFETY: dropped before `immediate_exit`, declared after it.
            let _registration = unsafe { Registration::new(&control, index, &immediate_exit) };
            loop {
                if control.stop.load(Ordering::SeqCst) {
                    return;
                }
                if control.pause.load(Ordering::SeqCst) {
                    std::thread::sleep(park_delay);
                    control.park(index, &mut || Err(Error::Snapshot("no KVM here".into())));
                    continue;
                }
                in_run.fetch_add(1, Ordering::SeqCst);
                while immediate_exit.load(Ordering::SeqCst) == 0 {
                    std::thread::yield_now();
                }
                in_run.fetch_sub(1, Ordering::SeqCst);
                immediate_exit.store(0, Ordering::SeqCst);
            }
        })
    }

    fn vcpus(control: &Arc<VcpuControl>, park_delay: Duration) -> Vec<JoinHandle<()>> {
        vcpus_counted(control, park_delay, &Arc::default())
    }

    fn vcpus_counted(
        control: &Arc<VcpuControl>,
        park_delay: Duration,
        in_run: &Arc<AtomicUsize>,
    ) -> Vec<JoinHandle<()>> {
        (0..control.lock().threads.len())
            .map(|i| fake_vcpu(control, i as u8, park_delay, in_run))
            .collect()
    }

    fn stop_and_join(control: &VcpuControl, threads: Vec<JoinHandle<()>>) {
        control.stop();
        for t in threads {
            t.join().unwrap();
        }
        let state = control.lock();
        assert_eq!((state.ended, state.parked), (state.threads.len(), 0));
        assert!(state.threads.iter().all(Option::is_none));
    }

    #[test]
    fn pause_returns_once_every_thread_is_parked() {
        let control = Arc::new(VcpuControl::new(3));
        let in_run = Arc::new(AtomicUsize::new(0));
        let threads = vcpus_counted(&control, Duration::from_millis(20), &in_run);
        for _ in 0..3 {
            // Every thread in "KVM_RUN", where only a kick gets it out.
            while in_run.load(Ordering::SeqCst) < 3 {
                std::thread::yield_now();
            }
            control.pause().unwrap();
            assert_eq!(in_run.load(Ordering::SeqCst), 0);
            assert_eq!(control.lock().parked, 3);
            assert!(control.is_paused());
            // Again: nothing changes.
            control.pause().unwrap();
            assert_eq!(control.lock().parked, 3);
            control.resume().unwrap();
            control.resume().unwrap();
            assert!(!control.is_paused());
        }
        stop_and_join(&control, threads);
    }

    #[test]
    fn threads_that_have_not_started_yet_park_on_their_own() {
        let control = Arc::new(VcpuControl::new(2));
        let pauser = {
            let control = control.clone();
            std::thread::spawn(move || control.pause())
        };
        while !control.is_paused() {
            std::thread::yield_now();
        }
        // Like vCPU threads just spawned: the pause is in force before they
        // register, so no kick reaches them; they must see the flag.
        let threads = vcpus(&control, Duration::ZERO);
        pauser.join().unwrap().unwrap();
        assert_eq!(control.lock().parked, 2);
        stop_and_join(&control, threads);
    }

    #[test]
    fn stop_ends_paused_threads() {
        let control = Arc::new(VcpuControl::new(2));
        let threads = vcpus(&control, Duration::ZERO);
        control.pause().unwrap();
        stop_and_join(&control, threads);
        assert_eq!(control.pause(), Err(NotRunning));
        assert_eq!(control.resume(), Err(NotRunning));
    }

    #[test]
    fn a_resume_during_a_pause_wins() {
        let control = Arc::new(VcpuControl::new(2));
        let threads = vcpus(&control, Duration::from_millis(300));
        let resumer = {
            let control = control.clone();
            std::thread::spawn(move || {
                while !control.is_paused() {
                    std::thread::yield_now();
                }
                control.resume().unwrap();
            })
        };
        control.pause().unwrap();
        resumer.join().unwrap();
        assert!(!control.is_paused());
        stop_and_join(&control, threads);
    }

    #[test]
    fn a_thread_that_ends_ends_the_pause() {
        let control = Arc::new(VcpuControl::new(2));
        let running = fake_vcpu(&control, 0, Duration::ZERO, &Arc::default());
        // vCPU 1 returns at once, as on a guest reset.
        let immediate_exit = AtomicU8::new(0);
        // SAFETY: `immediate_exit` outlives the registration dropped here.
        drop(unsafe { Registration::new(&control, 1, &immediate_exit) });
        assert_eq!(control.pause(), Err(NotRunning));
        stop_and_join(&control, vec![running]);
    }
}

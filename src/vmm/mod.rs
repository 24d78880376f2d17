//! The virtual machine monitor: a config goes in, a running VM comes out.
//!
//! ```text
//! Vm::create(config)  → KVM VM, guest RAM, kernel loaded, vCPUs in their boot state
//!   .start()          → one thread per vCPU
//!   .wait()           → how the guest ended
//! ```
//!
//! While it runs, a `StopHandle` ends it and a `PauseHandle` freezes and
//! thaws its vCPUs, from any thread.

pub mod config;
pub mod cpuid;
pub mod devices;
pub mod emulation;
pub mod error;
pub mod host;
pub mod layout;
pub mod memory;
pub mod snapshot;
pub mod vcpu;
pub mod x86_64;

use std::ffi::CString;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{
    kvm_mp_state, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

pub use config::{
    BlockConfig, BootSource, ConsoleOutput, FsConfig, MemorySize, RestoreMemory, ShareFlags, VmConfig,
    VsockConfig,
};
pub use cpuid::CpuProfile;
pub use error::{Error, Result};
pub use vcpu::NotRunning;

use devices::pio::COM1_IRQ;
use devices::triggers::IrqLine;
use devices::virtio::block::Block;
use devices::virtio::fs::Fs;
use devices::virtio::mmio::{MmioBus, MmioTransport, MMIO_WINDOW};
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;
use devices::PioBus;
use memory::GuestMemoryHost;
use vcpu::{Vcpu, VcpuControl, VcpuEnd};
use x86_64::{linux, mptable, regs};

/// The microVM defaults: serial console, keyboard-controller reboot so a
/// guest `reboot` ends the VM, one UART to probe, and no speculative-execution
/// mitigations inside a guest that is already isolated by the hypervisor.
/// Parameters the guest kernel does not know would be handed to its init as
/// arguments, so there are none for features the skiff kernel leaves out.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 8250.nr_uarts=1 mitigations=off";

/// Where KVM puts the three pages of the real-mode TSS it needs on Intel;
/// just below the BIOS area at the top of the 32-bit space, inside the MMIO gap.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// vCPU threads run a shallow loop; a small stack keeps the VMM's footprint down.
const VCPU_STACK_SIZE: usize = 256 << 10;

/// How the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset or power-off (Linux's `reboot`).
    GuestReset,
    /// A vCPU triple-faulted: the guest crashed.
    TripleFault,
    /// The guest kernel panicked and said so through the pvpanic port.
    GuestPanic,
    /// The host stopped it.
    Stopped,
}

/// A VM whose vCPUs are ready to run.
pub struct Vm {
    vcpus: Vec<Vcpu>,
    bus: Arc<PioBus>,
    // Before the VM fd: device workers stop before the memory and VM go.
    mmio: Arc<MmioBus>,
    profile: CpuProfile,
    /// Of the CPUID vCPU 0 got: what a snapshot must be restored with.
    cpuid_hash: String,
    // Drop order matters: the VM fd goes before the memory it maps.
    vm_fd: VmFd,
    memory: GuestMemoryHost,
    _kvm: Kvm,
}

/// A virtio device's MMIO base and its transport.
type Slot = (u64, MmioTransport);

/// A KVM VM with its guest RAM, interrupt controllers and PIT, before any
/// device or vCPU.
struct Machine {
    kvm: Kvm,
    vm_fd: VmFd,
    memory: GuestMemoryHost,
    profile: CpuProfile,
}

impl Machine {
    /// Checks the config and the host, then makes the VM around the guest
    /// RAM `memory` returns.
    fn open(config: &VmConfig, memory: impl FnOnce() -> Result<GuestMemoryHost>) -> Result<Machine> {
        let kvm = open_kvm(&config.kvm_device)?;
        config.validate(kvm.get_max_vcpus(), host::total_memory())?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::KvmUnavailable(format!("this host's KVM lacks {name}")));
            }
        }
        let profile = config
            .cpu_profile
            .unwrap_or_else(|| CpuProfile::for_backend(host::detect_backend()));
        tracing::debug!(%profile, vcpus = config.vcpus, memory = %config.memory, "creating VM");

        // Made before the VM fd so that, on any early return, the fd (and
        // with it the memslots) is dropped before the memory they point at.
        let memory = memory()?;
        let vm_fd = kvm.create_vm().map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        // Before the irqchip: once it exists, every memslot change waits for
        // KVM's SRCU readers, which costs milliseconds here instead of microseconds.
        memory::register(&vm_fd, &memory)?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm_fd
            .create_irq_chip()
            .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;
        Ok(Machine {
            kvm,
            vm_fd,
            memory,
            profile,
        })
    }

    /// The config's virtio devices on their transports, in slot order, and
    /// the kernel arguments that announce them. Opened before any guest
    /// work so a bad disk or socket path is reported first.
    fn devices(&self, config: &VmConfig) -> Result<(Vec<Slot>, Vec<String>)> {
        let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
        for disk in &config.block_devices {
            virtio.push(Box::new(Block::open(disk)?));
        }
        for share in &config.shared_dirs {
            virtio.push(Box::new(Fs::new(share)?));
        }
        if let Some(v) = &config.vsock {
            virtio.push(Box::new(Vsock::new(v)?));
        }
        let mut transports = Vec::new();
        let mut device_args = Vec::new();
        for (index, device) in virtio.into_iter().enumerate() {
            let (base, gsi) = layout::virtio_slot(index);
            device_args.push(format!(
                "virtio_mmio.device={}K@{base:#x}:{gsi}",
                MMIO_WINDOW >> 10
            ));
            transports.push((
                base,
                MmioTransport::new(device, &self.vm_fd, self.memory.clone(), base, gsi)?,
            ));
        }
        Ok((transports, device_args))
    }

    fn cpuid(&self, vcpus: u8) -> Result<impl Fn(u8) -> kvm_bindings::CpuId> {
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let profile = self.profile;
        Ok(move |index| cpuid::for_vcpu(&supported, profile, index, vcpus))
    }

    /// The serial port's interrupt line and the console, then the `Vm`.
    fn finish(
        self,
        config_console: ConsoleOutput,
        mmio: MmioBus,
        fds: Vec<VcpuFd>,
        cpuid_hash: String,
        serial: Option<&vm_superio::serial::SerialState>,
    ) -> Result<Vm> {
        // Close-on-exec like every other fd here: a helper process the
        // runtime starts must not be able to raise the guest's IRQ 4.
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| Error::Memory(format!("eventfd: {e}")))?;
        self.vm_fd
            .register_irqfd(&serial_evt, COM1_IRQ)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let msr_indices = Arc::new(
            self.kvm
                .get_msr_index_list()
                .map_err(|e| Error::Kvm("KVM_GET_MSR_INDEX_LIST", e))?
                .as_slice()
                .to_vec(),
        );
        // Last, so a VM that fails to build leaves no console file behind.
        let console = devices::console::open(config_console)?;
        let bus = Arc::new(PioBus::new(IrqLine(serial_evt), console, serial).map_err(Error::Snapshot)?);
        let mmio = Arc::new(mmio);
        let memory = self.memory;
        let vcpus = fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                Vcpu::new(
                    i as u8,
                    fd,
                    bus.clone(),
                    mmio.clone(),
                    memory.clone(),
                    msr_indices.clone(),
                )
            })
            .collect();
        Ok(Vm {
            vcpus,
            bus,
            mmio,
            profile: self.profile,
            cpuid_hash,
            vm_fd: self.vm_fd,
            memory,
            _kvm: self.kvm,
        })
    }
}

impl Vm {
    /// Builds the VM. On error, everything created so far is released: no fd,
    /// mapping or file is left behind.
    pub fn create(config: VmConfig) -> Result<Vm> {
        let mem_size = config.memory.0;
        let machine = Machine::open(&config, || memory::allocate(mem_size))?;
        let (transports, device_args) = machine.devices(&config)?;
        let mut mmio = MmioBus::default();
        for (base, transport) in transports {
            mmio.add(base, transport);
        }
        let memory = &machine.memory;
        let profile = machine.profile;
        let cr3 = regs::write_boot_structures(memory)?;
        mptable::write(memory, config.vcpus).map_err(|e| Error::BootSetup(e.to_string()))?;
        let (entry, arg, all_vcpus_start) = match &config.boot {
            BootSource::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                let cmdline = compose_cmdline(cmdline, profile, &device_args);
                tracing::debug!(%cmdline, "kernel command line");
                let e = linux::load(memory, mem_size, kernel, initrd.as_deref(), &cmdline)?;
                (e.entry, e.zero_page, false)
            }
            BootSource::Code { code, load_addr } => {
                memory
                    .write_slice(code, GuestAddress(*load_addr))
                    .map_err(|e| Error::Memory(format!("writing the code: {e}")))?;
                (*load_addr, 0, true)
            }
        };

        let cpuid = machine.cpuid(config.vcpus)?;
        let mut fds = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let fd = machine
                .vm_fd
                .create_vcpu(u64::from(index))
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            fd.set_cpuid2(&cpuid(index))
                .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
            regs::set_boot_msrs(&fd)?;
            fd.set_fpu(&regs::initial_fpu())
                .map_err(|e| Error::Kvm("KVM_SET_FPU", e))?;
            let lapic = fd.get_lapic().map_err(|e| Error::Kvm("KVM_GET_LAPIC", e))?;
            fd.set_lapic(&regs::configure_lint(lapic))
                .map_err(|e| Error::Kvm("KVM_SET_LAPIC", e))?;
            // Linux brings up the other vCPUs itself with INIT/SIPI; only the
            // boot vCPU starts in the entry state.
            if index == 0 || all_vcpus_start {
                enter_long_mode(&fd, cr3, entry, arg, index)?;
            }
            if index != 0 && all_vcpus_start {
                fd.set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .map_err(|e| Error::Kvm("KVM_SET_MP_STATE", e))?;
            }
            fds.push(fd);
        }
        let cpuid_hash = snapshot::cpuid_hash(&cpuid(0));
        machine.finish(config.console, mmio, fds, cpuid_hash, None)
    }

    /// Builds a VM from the snapshot in `dir`: its memory mapped privately
    /// from the snapshot's file, every vCPU, interrupt controller and
    /// device where the snapshot left it. `config` gives what may differ
    /// from the VM that was saved (the devices' host sides: shared
    /// directories, the vsock socket and CID, the console) and must agree
    /// with it on the rest: vCPUs, memory, CPU profile, and the devices'
    /// kinds, order and tags. Its boot source is not used.
    pub fn restore(config: VmConfig, dir: &Path) -> Result<Vm> {
        let started = Instant::now();
        let loaded = snapshot::load(dir)?;
        let saved = &loaded.state;
        let mismatch = |what: String| Error::Snapshot(format!("{}: {what}", dir.display()));
        if saved.memory_bytes != config.memory.0 || saved.vcpus.len() != usize::from(config.vcpus) {
            return Err(mismatch(format!(
                "it is of a VM with {} vCPUs and {}, not {} and {}",
                saved.vcpus.len(),
                MemorySize(saved.memory_bytes),
                config.vcpus,
                config.memory
            )));
        }
        let how = config.restore_memory.unwrap_or_else(RestoreMemory::auto);
        let machine = Machine::open(&config, || match how {
            RestoreMemory::Mapped => snapshot::memory_file::map_private(&loaded.memory, saved.memory_bytes),
            RestoreMemory::Copied => snapshot::memory_file::load_copy(&loaded.memory, saved.memory_bytes),
        })?;
        if machine.profile.to_string() != saved.cpu_profile {
            return Err(mismatch(format!(
                "it was taken with CPU profile {}, this VM has {}",
                saved.cpu_profile, machine.profile
            )));
        }
        let cpuid = machine.cpuid(config.vcpus)?;
        if snapshot::cpuid_hash(&cpuid(0)) != saved.cpuid_hash {
            return Err(mismatch(
                "it was taken on a host whose KVM offers other CPU features".into(),
            ));
        }
        // The interrupt controllers first: restored devices may raise their
        // lines as soon as their workers start.
        let vm_fd = &machine.vm_fd;
        vm_fd
            .set_pit2(&saved.pit)
            .map_err(|e| Error::Kvm("KVM_SET_PIT2", e))?;
        for chip in &saved.irqchips {
            vm_fd
                .set_irqchip(chip)
                .map_err(|e| Error::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        // The guest's clock goes on from where it was saved; its wall clock
        // is set by the guest's agent from the host's.
        let clock = kvm_bindings::kvm_clock_data {
            clock: saved.clock.clock,
            ..Default::default()
        };
        vm_fd
            .set_clock(&clock)
            .map_err(|e| Error::Kvm("KVM_SET_CLOCK", e))?;

        let (transports, _) = machine.devices(&config)?;
        if transports.len() != saved.devices.len() {
            return Err(mismatch(format!(
                "it has {} virtio devices, this VM {}",
                saved.devices.len(),
                transports.len()
            )));
        }
        let mut fds = Vec::with_capacity(saved.vcpus.len());
        for (index, state) in saved.vcpus.iter().enumerate() {
            let fd = vm_fd
                .create_vcpu(index as u64)
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            fd.set_cpuid2(&cpuid(index as u8))
                .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
            snapshot::vcpu_state::restore(&fd, state)?;
            // Tells a guest with kvmclock it was stopped, so its watchdogs
            // do not take the gap for a lockup. Only possible once the guest
            // has set up kvmclock, hence not an error.
            let _ = fd.kvmclock_ctrl();
            fds.push(fd);
        }
        // The devices after the vCPUs: a restored device may raise an
        // interrupt at once (vsock announces its transport reset from its
        // own thread), and a vCPU's saved local APIC, set later, would
        // overwrite it, or the I/O APIC would find no CPU to deliver it to.
        // Lost, the guest agent slept on, never learning to reconnect.
        let mut mmio = MmioBus::default();
        for ((base, mut transport), state) in transports.into_iter().zip(&saved.devices) {
            transport.restore(state)?;
            mmio.add(base, transport);
        }

        let cpuid_hash = saved.cpuid_hash.clone();
        let vm = machine.finish(config.console, mmio, fds, cpuid_hash, Some(&saved.serial))?;
        tracing::debug!(
            snapshot = %loaded.dir.display(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "VM restored"
        );
        Ok(vm)
    }

    pub fn cpu_profile(&self) -> CpuProfile {
        self.profile
    }

    pub fn memory(&self) -> &GuestMemoryHost {
        &self.memory
    }

    /// Starts one thread per vCPU.
    pub fn start(mut self) -> Result<RunningVm> {
        vcpu::install_kick_handler().map_err(Error::KickHandler)?;
        let (events, receiver) = channel();
        let vcpus = std::mem::take(&mut self.vcpus);
        let mut running = RunningVm {
            threads: Vec::with_capacity(vcpus.len()),
            control: Arc::new(VcpuControl::new(vcpus.len())),
            events,
            receiver,
            started: Instant::now(),
            vm: self,
        };
        for vcpu in vcpus {
            let index = vcpu.index;
            let control = running.control.clone();
            let events = running.events.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .stack_size(VCPU_STACK_SIZE)
                .spawn(move || {
                    // A panic must still be reported, or `wait` would wait forever.
                    let end = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run(&control)))
                        .unwrap_or_else(|_| {
                            VcpuEnd::Failed(Error::Vcpu {
                                vcpu: index,
                                reason: "the vCPU thread panicked".into(),
                            })
                        });
                    let _ = events.send(Event::Vcpu(index, end));
                });
            match spawned {
                Ok(handle) => running.threads.push(handle),
                // Dropping `running` stops and joins the threads already started.
                Err(source) => return Err(Error::Thread { index, source }),
            }
        }
        Ok(running)
    }
}

fn open_kvm(path: &Path) -> Result<Kvm> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::KvmUnavailable(format!("invalid KVM device path {}", path.display())))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|e| {
        let path = path.display();
        Error::KvmUnavailable(match e.errno() {
            libc::ENOENT => {
                format!("{path} does not exist: this host has no KVM (is the kvm module loaded?)")
            }
            libc::EACCES | libc::EPERM => {
                format!("permission denied opening {path}: run as root or join the group that owns it")
            }
            _ => format!("cannot open {path}: {e}"),
        })
    })?;
    // The only stable KVM API version there has ever been; anything else is
    // not KVM (e.g. a wrong device node).
    const KVM_API_VERSION: i32 = 12;
    if kvm.get_api_version() != KVM_API_VERSION {
        return Err(Error::KvmUnavailable(format!(
            "{} is not a KVM device",
            path.display()
        )));
    }
    Ok(kvm)
}

/// What the kernel cannot discover about this machine, announced on its
/// command line: the pvpanic port, and that power-off goes through the
/// keyboard controller's reset line like a reboot (the skiff kernel's
/// `poweroff=kbd`; without ACPI a power-off would otherwise be a halt that
/// never reaches the VMM).
pub fn platform_args() -> Vec<String> {
    vec![
        format!("pvpanic_port={:#x}", devices::pio::PVPANIC_PORT),
        "poweroff=kbd".to_owned(),
    ]
}

/// The caller's command line plus the platform announcements, what the CPU
/// profile needs, and the virtio devices. An argument the caller already gave
/// (same key before `=`) is the caller's to decide; devices are always added.
pub fn compose_cmdline(base: &str, profile: CpuProfile, devices: &[String]) -> String {
    let key = |arg: &str| arg.split('=').next().unwrap_or(arg).to_owned();
    let mut parts: Vec<String> = base.split_whitespace().map(str::to_owned).collect();
    let given: Vec<String> = parts.iter().map(|p| key(p)).collect();
    let ours = platform_args()
        .into_iter()
        .chain(profile.kernel_args().iter().map(|a| a.to_string()));
    for arg in ours {
        if !given.contains(&key(&arg)) {
            parts.push(arg);
        }
    }
    parts.extend(devices.iter().cloned());
    parts.join(" ")
}

fn enter_long_mode(fd: &VcpuFd, cr3: u64, entry: u64, arg: u64, index: u8) -> Result<()> {
    let sregs = fd.get_sregs().map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    fd.set_sregs(&regs::long_mode_sregs(sregs, cr3))
        .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
    let mut r = regs::entry_regs(entry, arg);
    r.rdi = u64::from(index);
    fd.set_regs(&r).map_err(|e| Error::Kvm("KVM_SET_REGS", e))
}

enum Event {
    Vcpu(u8, VcpuEnd),
    StopRequested,
    Snapshot(std::path::PathBuf, Sender<Result<()>>),
}

/// Snapshots a running VM from any thread; the thread in
/// [`RunningVm::wait`] carries it out, so the VM cannot end meanwhile.
#[derive(Clone)]
pub struct SnapshotHandle(Sender<Event>);

impl SnapshotHandle {
    /// As [`RunningVm::snapshot`]: the VM is left paused.
    pub fn snapshot(&self, dir: &Path) -> Result<()> {
        let (reply, answer) = channel();
        let gone = || Error::Snapshot("the VM has ended".into());
        self.0
            .send(Event::Snapshot(dir.to_owned(), reply))
            .map_err(|_| gone())?;
        answer.recv().unwrap_or_else(|_| Err(gone()))
    }
}

/// Asks a running VM to stop, from any thread.
#[derive(Clone)]
pub struct StopHandle(Sender<Event>);

impl StopHandle {
    pub fn stop(&self) {
        let _ = self.0.send(Event::StopRequested);
    }
}

/// Freezes and thaws a running VM's vCPUs, from any thread.
///
/// `pause` returns once no vCPU is in the guest any more; the guest's memory
/// and devices stay as they are (device threads may still complete I/O the
/// guest started). A paused VM can still be stopped. Pausing a paused VM and
/// resuming a running one do nothing; either on a VM that has ended (or is
/// being stopped) is `NotRunning`.
#[derive(Clone)]
pub struct PauseHandle(Arc<VcpuControl>);

impl PauseHandle {
    pub fn pause(&self) -> std::result::Result<(), NotRunning> {
        self.0.pause()
    }

    pub fn resume(&self) -> std::result::Result<(), NotRunning> {
        self.0.resume()
    }

    pub fn is_paused(&self) -> bool {
        self.0.is_paused()
    }
}

/// A VM whose vCPU threads are running. Dropping it stops and joins them.
pub struct RunningVm {
    threads: Vec<JoinHandle<()>>,
    control: Arc<VcpuControl>,
    events: Sender<Event>,
    receiver: Receiver<Event>,
    started: Instant,
    // Last: the threads must be joined before the VM they run goes away.
    vm: Vm,
}

impl RunningVm {
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.events.clone())
    }

    pub fn pause_handle(&self) -> PauseHandle {
        PauseHandle(self.control.clone())
    }

    pub fn snapshot_handle(&self) -> SnapshotHandle {
        SnapshotHandle(self.events.clone())
    }

    pub fn memory(&self) -> &GuestMemoryHost {
        &self.vm.memory
    }

    /// Writes the VM to `dir` (which must not exist): pauses it, reads
    /// every vCPU on its own thread, then, with every device's worker held
    /// still, the interrupt controllers, PIT, clock, devices and memory.
    /// The VM stays paused: resume it to go on, or drop it.
    pub fn snapshot(&self, dir: &Path) -> Result<()> {
        let started = Instant::now();
        self.control
            .pause()
            .map_err(|_| Error::Snapshot("the VM is not running".into()))?;
        let vcpus = self.control.capture()?;
        let vm = &self.vm;
        let cpuid_hash = vm.cpuid_hash.clone();
        vm.mmio.freeze(|devices| {
            let mut irqchips = Vec::new();
            for chip_id in snapshot::IRQCHIPS {
                let mut chip = kvm_bindings::kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                vm.vm_fd
                    .get_irqchip(&mut chip)
                    .map_err(|e| Error::Kvm("KVM_GET_IRQCHIP", e))?;
                irqchips.push(chip);
            }
            let state = snapshot::VmState {
                memory_bytes: vm.memory.iter().map(|r| r.len()).sum(),
                cpu_profile: vm.profile.to_string(),
                cpuid_hash,
                vcpus,
                irqchips,
                pit: vm.vm_fd.get_pit2().map_err(|e| Error::Kvm("KVM_GET_PIT2", e))?,
                clock: vm.vm_fd.get_clock().map_err(|e| Error::Kvm("KVM_GET_CLOCK", e))?,
                serial: vm.bus.serial_state(),
                devices: devices.to_vec(),
            };
            snapshot::write(dir, &state, |path| snapshot::memory_file::save(&vm.memory, path))
        })?;
        tracing::info!(
            dir = %dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        Ok(())
    }

    /// Blocks until the guest ends, a vCPU fails, or a stop is requested; then
    /// stops every vCPU and returns how it ended.
    pub fn wait(mut self) -> Result<VmExit> {
        // `self` holds a sender, so this only returns with an event.
        let event = loop {
            match self.receiver.recv().unwrap_or(Event::StopRequested) {
                Event::Snapshot(dir, reply) => {
                    let _ = reply.send(self.snapshot(&dir));
                }
                other => break other,
            }
        };
        // Measured while the guest's memory is still mapped, and only when it
        // will be logged: mincore over all guest RAM is not free for big guests.
        if tracing::enabled!(tracing::Level::INFO) {
            let rss = memory::process_rss().unwrap_or(0);
            let guest = memory::resident_bytes(&self.vm.memory);
            tracing::info!(
                process_rss_kib = rss >> 10,
                guest_resident_kib = guest >> 10,
                vmm_overhead_kib = rss.saturating_sub(guest) >> 10,
                "memory at VM end"
            );
        }
        self.shutdown();
        let elapsed = self.started.elapsed();
        let outcome = match event {
            Event::StopRequested | Event::Snapshot(..) => Ok(VmExit::Stopped),
            Event::Vcpu(index, end) => {
                tracing::debug!(vcpu = index, ?end, "first vCPU to stop");
                match end {
                    VcpuEnd::GuestReset => Ok(VmExit::GuestReset),
                    VcpuEnd::TripleFault => Ok(VmExit::TripleFault),
                    VcpuEnd::GuestPanic => Ok(VmExit::GuestPanic),
                    VcpuEnd::Stopped => Ok(VmExit::Stopped),
                    VcpuEnd::Failed(e) => Err(e),
                }
            }
        };
        tracing::info!(elapsed_ms = elapsed.as_millis() as u64, ?outcome, "VM ended");
        outcome
    }

    fn shutdown(&mut self) {
        // Also wakes vCPUs that are paused.
        self.control.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.vm.bus.flush_console();
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_profile_args_are_added_once() {
        let clear = CpuProfile::Baseline.kernel_args()[1];
        assert!(clear.starts_with("clearcpuid=") && clear.contains("popcnt"));
        assert_eq!(
            compose_cmdline("console=ttyS0", CpuProfile::Baseline, &[]),
            format!("console=ttyS0 pvpanic_port=0x505 poweroff=kbd noxsave {clear}")
        );
        assert_eq!(
            compose_cmdline("noxsave  quiet", CpuProfile::Baseline, &[]),
            format!("noxsave quiet pvpanic_port=0x505 poweroff=kbd {clear}")
        );
        assert_eq!(
            compose_cmdline(
                "console=ttyS0",
                CpuProfile::Host,
                &["virtio_mmio.device=4K@0xd0000000:5".into()]
            ),
            "console=ttyS0 pvpanic_port=0x505 poweroff=kbd virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn the_callers_arguments_win() {
        assert_eq!(
            compose_cmdline("clearcpuid=avx pvpanic_port=0", CpuProfile::Baseline, &[]),
            "clearcpuid=avx pvpanic_port=0 poweroff=kbd noxsave"
        );
    }

    #[test]
    fn clearcpuid_fits_linux_6_1_parse_buffer() {
        // cpu_parse_early_param() copies the value into a 128-byte buffer.
        for arg in CpuProfile::Baseline.kernel_args() {
            assert!(arg.len() < 128, "{arg}");
        }
    }
}

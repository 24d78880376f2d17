//! VMM start-up: from "create the VM" to the guest's first instruction (a
//! port write), against the same guest on bare kvm-ioctls calls as the
//! baseline. Also prints the VMM's memory overhead for a 1-vCPU 128 MiB guest,
//! and times pausing and resuming a guest that is running.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use skiff::vmm::{memory, BootSource, ConsoleOutput, MemorySize, Vm, VmConfig, VmExit};

const LOAD_ADDR: u64 = 0x10_0000;
/// mov dx, 0x3f8; mov al, '!'; out dx, al; reset through the i8042; park.
const GUEST: [u8; 15] = [
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'!', 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xfa, 0xf4, 0xeb, 0xfd,
];

/// Records when the guest's first byte reached the console.
#[derive(Clone, Default)]
struct FirstByte(Arc<Mutex<Option<Instant>>>);

impl Write for FirstByte {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().get_or_insert_with(Instant::now);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn config(memory: u64, console: ConsoleOutput) -> VmConfig {
    let mut c = VmConfig::new(BootSource::Code {
        code: GUEST.to_vec(),
        load_addr: LOAD_ADDR,
    });
    c.memory = MemorySize(memory);
    c.console = console;
    c
}

fn skiff_first_instruction() -> Duration {
    let first = FirstByte::default();
    let start = Instant::now();
    let vm = Vm::create(config(128 << 20, ConsoleOutput::Writer(Box::new(first.clone())))).unwrap();
    let exit = vm.start().unwrap().wait().unwrap();
    assert_eq!(exit, VmExit::GuestReset);
    let at = first.0.lock().unwrap().expect("guest wrote nothing");
    at - start
}

/// The least a VMM can do to run the same code: a VM, 128 MiB of memory, one
/// vCPU in flat 64-bit mode with the same page tables, run to the port write.
fn bare_kvm_first_instruction() -> Duration {
    let start = Instant::now();
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mem = memory::allocate(128 << 20).unwrap();
    memory::register(&vm, &mem).unwrap();
    use vm_memory::{Bytes, GuestAddress};
    mem.write_slice(&GUEST, GuestAddress(LOAD_ADDR)).unwrap();
    let cr3 = skiff::vmm::x86_64::regs::write_boot_structures(&mem).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let sregs = skiff::vmm::x86_64::regs::long_mode_sregs(vcpu.get_sregs().unwrap(), cr3);
    let _: kvm_segment = sregs.cs;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&skiff::vmm::x86_64::regs::entry_regs(LOAD_ADDR, 0))
        .unwrap();
    loop {
        if let VcpuExit::IoOut(0x3f8, _) = vcpu.run().unwrap() {
            return start.elapsed();
        }
    }
}

fn vmm_start(c: &mut Criterion) {
    let mut group = c.benchmark_group("vmm_start");
    group.sample_size(30);
    group.bench_function("skiff_create_to_first_guest_instruction", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| skiff_first_instruction()).sum())
    });
    group.bench_function("bare_kvm_create_to_first_guest_instruction", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| bare_kvm_first_instruction()).sum())
    });
    group.finish();
    let _ = kvm_userspace_memory_region::default();
}

/// Not a timing: printed once so the figure sits beside the start-up times.
fn memory_overhead(_: &mut Criterion) {
    let before = memory::process_rss().unwrap();
    let mut c = config(128 << 20, ConsoleOutput::Null);
    // A guest that stays up (parks without resetting) so it is measured while running.
    c.boot = BootSource::Code {
        code: vec![0x66, 0xba, 0xf8, 0x03, 0xb0, b'!', 0xee, 0xfa, 0xf4, 0xeb, 0xfd],
        load_addr: LOAD_ADDR,
    };
    let running = Vm::create(c).unwrap().start().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let rss = memory::process_rss().unwrap();
    let guest = memory::resident_bytes(running.memory());
    drop(running);
    println!(
        "vmm_memory_overhead: process rss {} KiB (before the VM {} KiB), guest pages resident {} KiB, \
         VMM overhead (rss - guest) {} KiB, added by the VM (rss - before - guest) {} KiB",
        rss >> 10,
        before >> 10,
        guest >> 10,
        rss.saturating_sub(guest) >> 10,
        (rss.saturating_sub(before).saturating_sub(guest)) >> 10
    );
}

/// Pause and resume of a 1-vCPU guest that counts in memory at 2 MiB. Only
/// the two calls are timed; between rounds the guest is seen to count again,
/// so every pause catches a vCPU that is really in the guest.
fn pause_resume(c: &mut Criterion) {
    use vm_memory::{Bytes, GuestAddress};
    const COUNTER: u64 = 0x20_0000;
    let mut vm_config = config(16 << 20, ConsoleOutput::Null);
    vm_config.boot = BootSource::Code {
        // mov ebx, COUNTER ; again: inc qword [rbx] ; jmp again
        code: vec![0xbb, 0x00, 0x00, 0x20, 0x00, 0x48, 0xff, 0x03, 0xeb, 0xfb],
        load_addr: LOAD_ADDR,
    };
    let running = Vm::create(vm_config).unwrap().start().unwrap();
    let pause = running.pause_handle();
    let count = || {
        running
            .memory()
            .load::<u64>(GuestAddress(COUNTER), std::sync::atomic::Ordering::Relaxed)
            .unwrap()
    };
    let mut group = c.benchmark_group("vmm_pause");
    group.bench_function("pause_and_resume_a_busy_vcpu", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let seen = count();
                while count() == seen {
                    std::hint::spin_loop();
                }
                let start = Instant::now();
                pause.pause().unwrap();
                pause.resume().unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, vmm_start, memory_overhead, pause_resume);
criterion_main!(benches);

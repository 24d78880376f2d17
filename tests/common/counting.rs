//! Tiny guests that count in guest memory, for tests that pause, resume,
//! snapshot and restore VMs and watch the counters.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use skiff::vmm::{RunningVm, StopHandle};
use vm_memory::{Bytes, GuestAddress};

use super::{asm, CODE_ADDR};

/// Where the guests count: one u64 per vCPU.
pub const COUNTERS: u64 = 0x20_0000;
/// Tiny guests count thousands of times a second; this only bounds a hang.
pub const LIMIT: Duration = Duration::from_secs(60);

/// Stops the VM if the test has not finished within `LIMIT`, so a guest
/// that never pauses or resumes fails its test instead of hanging the suite;
/// and aborts the whole test process if even the stop does not end it.
pub struct Watchdog(#[allow(dead_code)] Sender<()>);

pub fn watchdog(stop: StopHandle) -> Watchdog {
    let (done, finished) = channel::<()>();
    std::thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(LIMIT) {
            eprintln!("watchdog: the test took over {LIMIT:?}; stopping the VM");
            stop.stop();
            if let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(LIMIT) {
                eprintln!("watchdog: the VM did not stop; aborting");
                std::process::abort();
            }
        }
    });
    Watchdog(done)
}

/// Each vCPU increments its own counter, `COUNTERS + 8 * index`, forever.
pub fn counting_guest() -> Vec<u8> {
    let mut code = vec![0xbb];
    code.extend((COUNTERS as u32).to_le_bytes()); // mov ebx, COUNTERS
    code.extend([
        0x48, 0x8d, 0x1c, 0xfb, // lea rbx, [rbx + rdi*8] (rdi = vCPU index)
        0x48, 0xff, 0x03, // again: inc qword [rbx]
        0xeb, 0xfb, // jmp again
    ]);
    code
}

/// Programs the in-kernel PIC and PIT for a 1 kHz timer whose handler
/// counts interrupts at `COUNTERS`, and sleeps in `hlt` between them. With
/// the in-kernel irqchip that `hlt` never leaves KVM_RUN.
pub fn timer_guest() -> Vec<u8> {
    const HANDLER: usize = 0x100;
    const IDTR: usize = 0x200;
    const IDT: usize = 0x300;
    const VECTOR: usize = 0x20;
    // 1.193182 MHz / 1193
    const DIVISOR: u16 = 1193;
    let mut image = vec![0x90u8; IDT + (VECTOR + 1) * 16];

    let mut main = vec![0x48, 0xc7, 0xc0]; // mov rax, imm32
    main.extend(((CODE_ADDR + IDTR as u64) as u32).to_le_bytes());
    main.extend([0x0f, 0x01, 0x18]); // lidt [rax]
    let out = |port: u8, value: u8| [0xb0, value, 0xe6, port]; // mov al, value ; out port, al
    main.extend(out(0x20, 0x11)); // PIC ICW1: edge triggered, cascade, ICW4 follows
    main.extend(out(0x21, VECTOR as u8)); // ICW2: IRQ0 is this vector
    main.extend(out(0x21, 0x04)); // ICW3: the slave hangs off IRQ2
    main.extend(out(0x21, 0x01)); // ICW4: 8086 mode
    main.extend(out(0x21, 0xfe)); // mask everything but IRQ0
    main.extend(out(0x43, 0x34)); // PIT channel 0, low then high byte, rate generator
    main.extend(out(0x40, DIVISOR as u8));
    main.extend(out(0x40, (DIVISOR >> 8) as u8));
    main.extend([
        0xfb, // sti
        0xf4, // idle: hlt
        0xeb, 0xfd, // jmp idle
    ]);
    image[..main.len()].copy_from_slice(&main);

    let mut handler = vec![0xff, 0x04, 0x25]; // inc dword [abs32]
    handler.extend((COUNTERS as u32).to_le_bytes());
    handler.push(0x50); // push rax
    handler.extend(out(0x20, 0x20)); // end of interrupt
    handler.push(0x58); // pop rax
    handler.extend(asm::IRETQ);
    image[HANDLER..HANDLER + handler.len()].copy_from_slice(&handler);

    let idt_limit = ((VECTOR + 1) * 16 - 1) as u16;
    image[IDTR..IDTR + 2].copy_from_slice(&idt_limit.to_le_bytes());
    image[IDTR + 2..IDTR + 10].copy_from_slice(&(CODE_ADDR + IDT as u64).to_le_bytes());

    // 64-bit interrupt gate: present, DPL 0, code selector 8.
    let target = CODE_ADDR + HANDLER as u64;
    let gate = IDT + VECTOR * 16;
    image[gate..gate + 16].fill(0);
    image[gate..gate + 2].copy_from_slice(&(target as u16).to_le_bytes());
    image[gate + 2..gate + 4].copy_from_slice(&8u16.to_le_bytes());
    image[gate + 5] = 0x8e;
    image[gate + 6..gate + 8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
    image[gate + 8..gate + 12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
    image
}

pub fn counters(vm: &RunningVm, vcpus: u8) -> Vec<u64> {
    (0..u64::from(vcpus))
        .map(|i| {
            vm.memory()
                .load::<u64>(GuestAddress(COUNTERS + 8 * i), Ordering::Relaxed)
                .unwrap()
        })
        .collect()
}

/// Waits until every counter has moved past `from`.
pub fn all_advance(vm: &RunningVm, from: &[u64]) -> bool {
    let deadline = Instant::now() + LIMIT;
    while Instant::now() < deadline {
        let now = counters(vm, from.len() as u8);
        if now.iter().zip(from).all(|(n, f)| n > f) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

//! Pausing and resuming a running VM's vCPUs, with tiny guests that count in
//! guest memory: a paused guest's counter must not move, a resumed one's must.

mod common;

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use common::{asm, code_vm, Console, CODE_ADDR};
use skiff::vmm::{NotRunning, RunningVm, StopHandle, Vm, VmConfig, VmExit};
use vm_memory::{Bytes, GuestAddress};

/// Where the guests count: one u64 per vCPU.
const COUNTERS: u64 = 0x20_0000;
/// How long a paused counter is watched for movement.
const STILL: Duration = Duration::from_millis(200);
/// Tiny guests count thousands of times a second; this only bounds a hang.
const LIMIT: Duration = Duration::from_secs(60);

/// Stops the VM if the test has not finished within `LIMIT`, so a guest
/// that never pauses or resumes fails its test instead of hanging the suite;
/// and aborts the whole test process if even the stop does not end it.
struct Watchdog(#[allow(dead_code)] Sender<()>);

fn watchdog(stop: StopHandle) -> Watchdog {
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
fn counting_guest() -> Vec<u8> {
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
fn timer_guest() -> Vec<u8> {
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

fn counters(vm: &RunningVm, vcpus: u8) -> Vec<u64> {
    (0..u64::from(vcpus))
        .map(|i| {
            vm.memory()
                .load::<u64>(GuestAddress(COUNTERS + 8 * i), Ordering::Relaxed)
                .unwrap()
        })
        .collect()
}

/// Waits until every counter has moved past `from`.
fn all_advance(vm: &RunningVm, from: &[u64]) -> bool {
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

/// Pauses the VM and checks that no counter moves; returns how long the
/// pause took.
fn pause_holds(vm: &RunningVm, vcpus: u8, still: Duration) -> Duration {
    let started = Instant::now();
    vm.pause_handle().pause().unwrap();
    let took = started.elapsed();
    assert!(vm.pause_handle().is_paused());
    let before = counters(vm, vcpus);
    std::thread::sleep(still);
    assert_eq!(counters(vm, vcpus), before, "a paused guest ran");
    took
}

fn start(config: VmConfig) -> (RunningVm, Watchdog) {
    let running = Vm::create(config).unwrap().start().unwrap();
    let dog = watchdog(running.stop_handle());
    (running, dog)
}

/// Stops the VM and checks that it ends as stopped.
fn stop(running: RunningVm) {
    running.stop_handle().stop();
    assert_eq!(running.wait().unwrap(), VmExit::Stopped);
}

#[test]
fn a_paused_guest_stays_put_until_resumed() {
    let console = Console::default();
    let mut config = code_vm(counting_guest(), &console);
    config.vcpus = 2;
    let (running, _dog) = start(config);
    assert!(all_advance(&running, &[0, 0]), "the guest never counted");

    let took = pause_holds(&running, 2, STILL);
    println!("pause of 2 busy vCPUs took {took:?}");
    // Pausing again is harmless and changes nothing.
    pause_holds(&running, 2, Duration::from_millis(50));

    let paused_at = counters(&running, 2);
    running.pause_handle().resume().unwrap();
    assert!(!running.pause_handle().is_paused());
    assert!(
        all_advance(&running, &paused_at),
        "the resumed guest did not count"
    );
    // Resuming a running VM is harmless.
    running.pause_handle().resume().unwrap();
    let now = counters(&running, 2);
    assert!(all_advance(&running, &now), "the guest stopped counting");

    stop(running);
}

#[test]
fn repeated_pauses_all_hold_and_the_guest_goes_on() {
    let console = Console::default();
    let mut config = code_vm(counting_guest(), &console);
    config.vcpus = 2;
    let (running, _dog) = start(config);
    assert!(all_advance(&running, &[0, 0]), "the guest never counted");

    let mut took = Vec::new();
    for _ in 0..50 {
        took.push(pause_holds(&running, 2, Duration::from_millis(10)));
        let paused_at = counters(&running, 2);
        running.pause_handle().resume().unwrap();
        assert!(
            all_advance(&running, &paused_at),
            "the resumed guest did not count"
        );
    }
    took.sort();
    println!(
        "pause of 2 busy vCPUs, 50 times: min {:?}, median {:?}, max {:?}",
        took[0],
        took[took.len() / 2],
        took[took.len() - 1]
    );
    stop(running);
}

#[test]
fn a_pause_right_after_start_holds() {
    let console = Console::default();
    let mut config = code_vm(counting_guest(), &console);
    config.vcpus = 2;
    // The vCPU threads may not even have reached their run loops yet.
    let (running, _dog) = start(config);
    pause_holds(&running, 2, STILL);
    let paused_at = counters(&running, 2);
    running.pause_handle().resume().unwrap();
    assert!(
        all_advance(&running, &paused_at),
        "the resumed guest did not count"
    );
    stop(running);
}

#[test]
fn stop_while_paused_ends_the_vm() {
    let console = Console::default();
    let mut config = code_vm(counting_guest(), &console);
    config.vcpus = 2;
    let (running, _dog) = start(config);
    assert!(all_advance(&running, &[0, 0]), "the guest never counted");
    let pause = running.pause_handle();
    pause_holds(&running, 2, Duration::from_millis(50));
    stop(running);
    // Nothing is left to pause or resume.
    assert_eq!(pause.pause(), Err(NotRunning));
    assert_eq!(pause.resume(), Err(NotRunning));
}

#[test]
fn a_guest_that_ended_cannot_be_paused() {
    let console = Console::default();
    let mut code = asm::I8042_RESET.to_vec();
    code.extend(asm::PARK);
    let (running, _dog) = start(code_vm(code, &console));
    let pause = running.pause_handle();
    assert_eq!(running.wait().unwrap(), VmExit::GuestReset);
    assert_eq!(pause.pause(), Err(NotRunning));
    assert!(!pause.is_paused());
}

#[test]
fn a_halted_guest_is_paused_and_its_timer_waits() {
    let console = Console::default();
    let (running, _dog) = start(code_vm(timer_guest(), &console));
    assert!(
        all_advance(&running, &[0]),
        "no timer interrupt reached the guest"
    );

    // The vCPU sleeps in KVM_RUN between interrupts; the kick must get it out.
    let took = pause_holds(&running, 1, STILL);
    println!("pause of 1 halted vCPU took {took:?}");

    let paused_at = counters(&running, 1);
    running.pause_handle().resume().unwrap();
    assert!(all_advance(&running, &paused_at), "the timer did not resume");
    stop(running);
}

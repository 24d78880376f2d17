//! The VMM against real KVM, with guests of a few instructions assembled here:
//! fast, and independent of any kernel.

mod common;

use std::time::Duration;

use common::{asm, code_vm, Console, CODE_ADDR};
use skiff::vmm::host::{detect_backend, KvmBackend};
use skiff::vmm::{Error, Vm, VmExit};

/// Tiny guests finish in milliseconds; a `Stopped` result means one hung.
fn run(config: skiff::vmm::VmConfig) -> Result<VmExit, Error> {
    common::run_with_limit(config, Duration::from_secs(60))
}

#[test]
fn serial_output_reaches_the_console() {
    let console = Console::default();
    let mut code = asm::COM1_TO_DX.to_vec();
    code.extend(asm::print(b"hello from a tiny guest\n"));
    code.extend(asm::I8042_RESET);
    code.extend(asm::PARK);
    assert_eq!(run(code_vm(code, &console)).unwrap(), VmExit::GuestReset);
    assert_eq!(console.text(), "hello from a tiny guest\n");
}

#[test]
fn i8042_reset_ends_the_vm() {
    let console = Console::default();
    let mut code = asm::I8042_RESET.to_vec();
    // Nothing after the reset may run.
    code.extend(asm::COM1_TO_DX);
    code.extend(asm::print(b"after reset"));
    code.extend(asm::PARK);
    assert_eq!(run(code_vm(code, &console)).unwrap(), VmExit::GuestReset);
    assert_eq!(console.text(), "");
}

#[test]
fn halted_guest_is_stopped_by_the_host() {
    let console = Console::default();
    let mut code = asm::COM1_TO_DX.to_vec();
    code.extend(asm::print(b"H"));
    code.extend(asm::PARK);
    let running = Vm::create(code_vm(code, &console)).unwrap().start().unwrap();
    assert!(console.wait_for("H", Duration::from_secs(30)), "guest never ran");
    // With the in-kernel irqchip the halted vCPU sleeps inside KVM_RUN; the
    // stop must kick it out.
    running.stop_handle().stop();
    assert_eq!(running.wait().unwrap(), VmExit::Stopped);
}

/// Every vCPU prints its index and bumps a shared counter; vCPU 0 waits for
/// all of them before it resets the VM.
fn all_vcpus_check_in(vcpus: u8) -> Vec<u8> {
    let mut code = asm::COM1_TO_DX.to_vec();
    code.extend([
        0x89, 0xf8, // mov eax, edi (vCPU index)
        0x04, b'0', // add al, '0'
        0xee, // out dx, al
        0xbb, 0x00, 0x00, 0x20, 0x00, // mov ebx, 0x200000 (counter)
        0xf0, 0xff, 0x03, // lock inc dword [rbx]
        0x85, 0xff, // test edi, edi
        0x75, 0x09, // jnz park
        0x83, 0x3b, vcpus, // spin: cmp dword [rbx], vcpus
        0x75, 0xfb, // jne spin
    ]);
    code.extend(asm::I8042_RESET);
    code.extend(asm::PARK);
    code
}

#[test]
fn two_vcpus_both_run() {
    let console = Console::default();
    let mut config = code_vm(all_vcpus_check_in(2), &console);
    config.vcpus = 2;
    assert_eq!(run(config).unwrap(), VmExit::GuestReset);
    let mut seen: Vec<char> = console.text().chars().collect();
    seen.sort();
    assert_eq!(seen, vec!['0', '1']);
}

/// A guest with an IDT whose #BP handler prints "B": it prints A, runs int3,
/// C, fwait, D, then resets. "ABCD" means the breakpoint was delivered and
/// returned to the next instruction, and fwait went on.
fn breakpoint_guest() -> Vec<u8> {
    const HANDLER: u64 = 0x100;
    const IDTR: u64 = 0x200;
    const IDT: u64 = 0x300;
    let mut image = vec![0x90u8; 0x400];
    let mut main = vec![0x48, 0xc7, 0xc0]; // mov rax, imm32
    main.extend(((CODE_ADDR + IDTR) as u32).to_le_bytes());
    main.extend([0x0f, 0x01, 0x18]); // lidt [rax]
    main.extend(asm::COM1_TO_DX);
    main.extend(asm::print(b"A"));
    main.push(asm::INT3);
    main.extend(asm::print(b"C"));
    main.push(asm::FWAIT);
    main.extend(asm::print(b"D"));
    main.extend(asm::I8042_RESET);
    main.extend(asm::PARK);
    image[..main.len()].copy_from_slice(&main);

    let mut handler = asm::COM1_TO_DX.to_vec();
    handler.extend(asm::print(b"B"));
    handler.extend(asm::IRETQ);
    image[HANDLER as usize..HANDLER as usize + handler.len()].copy_from_slice(&handler);

    let idt_limit: u16 = 4 * 16 - 1;
    image[IDTR as usize..IDTR as usize + 2].copy_from_slice(&idt_limit.to_le_bytes());
    image[IDTR as usize + 2..IDTR as usize + 10].copy_from_slice(&(CODE_ADDR + IDT).to_le_bytes());

    // 64-bit interrupt gate for vector 3: present, DPL 0, code selector 8.
    let target = CODE_ADDR + HANDLER;
    let gate = IDT as usize + 3 * 16;
    image[gate..gate + 16].fill(0);
    image[gate..gate + 2].copy_from_slice(&(target as u16).to_le_bytes());
    image[gate + 2..gate + 4].copy_from_slice(&8u16.to_le_bytes());
    image[gate + 5] = 0x8e;
    image[gate + 6..gate + 8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
    image[gate + 8..gate + 12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
    image
}

#[test]
fn int3_and_fwait_are_handled() {
    let console = Console::default();
    assert_eq!(
        run(code_vm(breakpoint_guest(), &console)).unwrap(),
        VmExit::GuestReset
    );
    assert_eq!(console.text(), "ABCD");
}

#[test]
fn unsupported_instruction_is_reported_with_its_bytes() {
    let console = Console::default();
    let mut code = asm::COM1_TO_DX.to_vec();
    code.extend(asm::print(b"X"));
    let popcnt_at = CODE_ADDR + code.len() as u64;
    code.extend(asm::POPCNT);
    code.extend(asm::I8042_RESET);
    code.extend(asm::PARK);
    let result = run(code_vm(code, &console));
    assert_eq!(console.text(), "X");
    match detect_backend() {
        // Only KVM's instruction emulator gives up on popcnt.
        KvmBackend::Software => match result {
            Err(Error::UnsupportedInstruction { vcpu, rip, bytes }) => {
                assert_eq!(vcpu, 0);
                assert_eq!(rip, popcnt_at);
                assert_eq!(&bytes[..5], &asm::POPCNT);
                let message = Error::UnsupportedInstruction { vcpu, rip, bytes }.to_string();
                assert!(message.contains("f3 48 0f b8 c0"), "{message}");
                assert!(message.contains(&format!("{popcnt_at:#x}")), "{message}");
            }
            other => panic!("expected an unsupported-instruction error, got {other:?}"),
        },
        KvmBackend::Hardware => assert_eq!(result.unwrap(), VmExit::GuestReset),
    }
}

#[test]
fn pvpanic_write_is_reported_as_a_panic() {
    let console = Console::default();
    // mov dx, 0x505 ; mov al, 1 ; out dx, al
    let mut code = vec![0x66, 0xba, 0x05, 0x05, 0xb0, 0x01, 0xee];
    code.extend(asm::I8042_RESET);
    code.extend(asm::PARK);
    assert_eq!(run(code_vm(code, &console)).unwrap(), VmExit::GuestPanic);
}

#[test]
fn triple_fault_is_reported() {
    let console = Console::default();
    // ud2 with no IDT: #UD, then #DF, then shutdown.
    let mut code = asm::UD2.to_vec();
    code.extend(asm::PARK);
    assert_eq!(run(code_vm(code, &console)).unwrap(), VmExit::TripleFault);
}

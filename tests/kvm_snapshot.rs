//! Snapshots of running tiny guests, restored in fresh VMs: the original
//! and every restored copy go on counting from where the snapshot was, each
//! in its own memory, with timer interrupts (in-kernel PIC and PIT) and
//! several vCPUs; a damaged or mismatched snapshot is refused.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::counting::{all_advance, counters, counting_guest, timer_guest, watchdog, COUNTERS};
use common::{code_vm, Console};
use skiff::vmm::{Error, RestoreMemory, RunningVm, Vm, VmConfig, VmExit};
use vm_memory::{Bytes, GuestAddress};

fn start(vm: Vm) -> (RunningVm, common::counting::Watchdog) {
    let running = vm.start().unwrap();
    let dog = watchdog(running.stop_handle());
    (running, dog)
}

fn stop(running: RunningVm) {
    running.stop_handle().stop();
    assert_eq!(running.wait().unwrap(), VmExit::Stopped);
}

fn restore(config: VmConfig, dir: &Path) -> Result<Vm, Error> {
    Vm::restore(config, dir)
}

/// The timer guest counts PIT interrupts in `hlt`: after a restore, only a
/// working interrupt controller, PIT and LAPIC make its counter move.
#[test]
fn a_timer_guest_goes_on_in_the_original_and_in_two_restored_copies() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let console = Console::default();
    let (original, _dog) = start(Vm::create(code_vm(timer_guest(), &console)).unwrap());
    assert!(all_advance(&original, &[10]), "no timer interrupts");

    original.snapshot(&snap).unwrap();
    assert!(original.pause_handle().is_paused());
    let saved = counters(&original, 1);
    original.pause_handle().resume().unwrap();
    assert!(
        all_advance(&original, &saved),
        "the original stopped after its snapshot"
    );

    // One copy maps the memory file, the other copies it: each host kind's way.
    let copy = |how| {
        let mut config = code_vm(timer_guest(), &console);
        config.restore_memory = Some(how);
        start(restore(config, &snap).unwrap())
    };
    let a = copy(RestoreMemory::Mapped);
    let b = copy(RestoreMemory::Copied);
    for copy in [&a.0, &b.0] {
        let at_start = counters(copy, 1);
        assert!(at_start[0] >= saved[0], "a copy started before the snapshot");
        assert!(
            all_advance(copy, &at_start),
            "a restored copy gets no timer interrupts"
        );
    }
    // Each copy writes its own memory: a mark in one is in no other.
    let mark = GuestAddress(COUNTERS + 0x1000);
    a.0.memory().write_obj(0xaaaa_u64, mark).unwrap();
    b.0.memory().write_obj(0xbbbb_u64, mark).unwrap();
    assert_eq!(a.0.memory().read_obj::<u64>(mark).unwrap(), 0xaaaa);
    assert_eq!(original.memory().read_obj::<u64>(mark).unwrap(), 0);
    stop(a.0);
    stop(b.0);
    stop(original);
    // Nor did any write reach the snapshot: it restores as it was.
    let c = start(restore(code_vm(timer_guest(), &console), &snap).unwrap());
    assert_eq!(c.0.memory().read_obj::<u64>(mark).unwrap(), 0);
    stop(c.0);
}

#[test]
fn busy_vcpus_are_restored_each_with_its_own_registers() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let console = Console::default();
    let config = || {
        let mut c = code_vm(counting_guest(), &console);
        c.vcpus = 2;
        c
    };
    let (original, _dog) = start(Vm::create(config()).unwrap());
    assert!(all_advance(&original, &[0, 0]));
    original.snapshot(&snap).unwrap();
    let saved = counters(&original, 2);
    stop(original);

    let (copy, _dog) = start(restore(config(), &snap).unwrap());
    // Each vCPU's RBX points at its own counter: were the registers mixed
    // up, one counter would stand still.
    assert!(all_advance(&copy, &saved), "a restored vCPU does not count");
    let now = counters(&copy, 2);
    assert!(now[0] >= saved[0] && now[1] >= saved[1]);
    stop(copy);
}

#[test]
fn damaged_or_mismatched_snapshots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let console = Console::default();
    let (original, _dog) = start(Vm::create(code_vm(timer_guest(), &console)).unwrap());
    assert!(all_advance(&original, &[3]));
    original.snapshot(&snap).unwrap();
    // A snapshot never overwrites another.
    let again = original.snapshot(&snap).unwrap_err().to_string();
    assert!(again.contains("creating it"), "{again}");
    stop(original);

    let refused = |dir: &Path, config: VmConfig, want: &str| {
        let err = restore(config, dir)
            .err()
            .expect("a bad snapshot was restored")
            .to_string();
        assert!(err.contains(want), "expected {want:?} in: {err}");
    };
    let mut two = code_vm(timer_guest(), &console);
    two.vcpus = 2;
    refused(&snap, two, "1 vCPUs");
    let mut bigger = code_vm(timer_guest(), &console);
    bigger.memory = skiff::vmm::MemorySize(32 << 20);
    refused(&snap, bigger, "1 vCPUs and 16 MiB");

    let copy = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir(&to).unwrap();
        for f in ["snapshot.json", "state.json", "memory"] {
            std::fs::copy(snap.join(f), to.join(f)).unwrap();
        }
        to
    };
    // One byte of guest memory changed, where the guest's code is.
    let flipped = copy("flipped");
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(flipped.join("memory"))
        .unwrap();
    mem.write_all_at(&[0x90], common::CODE_ADDR + 0x10).unwrap();
    refused(
        &flipped,
        code_vm(timer_guest(), &console),
        "memory does not match",
    );
    // Guest memory cut short.
    let short = copy("short");
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(short.join("memory"))
        .unwrap();
    mem.set_len(8 << 20).unwrap();
    refused(
        &short,
        code_vm(timer_guest(), &console),
        "memory has 8388608 bytes",
    );
    // The vCPU state edited.
    let edited = copy("edited");
    let state = std::fs::read_to_string(edited.join("state.json")).unwrap();
    std::fs::write(
        edited.join("state.json"),
        state.replacen("\"memory_bytes\":", "\"memory_bytes\": ", 1),
    )
    .unwrap();
    refused(
        &edited,
        code_vm(timer_guest(), &console),
        "state.json does not match",
    );
    // The manifest gone: the snapshot was never finished.
    let unfinished = copy("unfinished");
    std::fs::remove_file(unfinished.join("snapshot.json")).unwrap();
    refused(
        &unfinished,
        code_vm(timer_guest(), &console),
        "reading snapshot.json",
    );
    // The original still restores.
    let (ok, _dog) = start(restore(code_vm(timer_guest(), &console), &snap).unwrap());
    let at = counters(&ok, 1);
    assert!(all_advance(&ok, &at));
    stop(ok);
}

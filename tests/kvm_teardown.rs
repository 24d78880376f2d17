//! Teardown leaves nothing behind. A test binary of its own, so no other
//! test's threads or fds come and go while these count theirs.

mod common;

use std::time::{Duration, Instant};

use common::{asm, code_vm, Console};
use skiff::vmm::{ConsoleOutput, MemorySize, Vm};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// Threads of this process, leaving out the workers KVM itself adds to it
/// (newer kernels run e.g. `kvm-nx-lpage-recovery` in the VMM's thread group).
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm")).unwrap_or_default();
            !comm.starts_with("kvm-")
        })
        .count()
}

#[test]
fn dropping_a_running_vm_stops_its_threads_and_closes_its_fds() {
    let console = Console::default();
    let mut code = asm::COM1_TO_DX.to_vec();
    code.extend(asm::print(b"R"));
    code.extend(asm::PARK);
    let (before, fds) = (threads(), count("/proc/self/fd"));

    let mut config = code_vm(code, &console);
    config.vcpus = 2;
    let running = Vm::create(config).unwrap().start().unwrap();
    assert!(console.wait_for("R", Duration::from_secs(30)), "guest never ran");
    assert_eq!(threads(), before + 2);
    drop(running);

    // A joined thread can linger in /proc for a moment after it is reaped.
    settles(|| threads() == before);
    assert_eq!(threads(), before);
    assert_eq!(count("/proc/self/fd"), fds);

    // A VM that fails at its very last step (the console file), after memory,
    // vCPUs and the irqfd exist, releases everything too.
    let mut bad = code_vm(vec![0xf4], &console);
    bad.vcpus = 2;
    bad.memory = MemorySize(64 << 20);
    bad.console = ConsoleOutput::File("/nonexistent/dir/console.log".into());
    let err = Vm::create(bad).err().expect("the console cannot be created");
    assert!(err.to_string().contains("/nonexistent/dir/console.log"), "{err}");
    assert_eq!(count("/proc/self/fd"), fds);
    assert_eq!(threads(), before);
}

fn settles(done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !done() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

//! Teardown leaves nothing behind. A test binary of its own, so no other
//! test's threads or fds come and go while these count theirs.

mod common;

use std::time::Duration;

use common::{asm, code_vm, Console};
use skiff::vmm::{MemorySize, Vm};

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

    assert_eq!(threads(), before);
    assert_eq!(count("/proc/self/fd"), fds);

    // A VM that fails to build releases everything too.
    let mut bad = code_vm(vec![0xf4], &console);
    bad.memory = MemorySize(1 << 20);
    assert!(Vm::create(bad).is_err());
    assert_eq!(count("/proc/self/fd"), fds);
}

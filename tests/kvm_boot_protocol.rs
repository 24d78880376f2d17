//! Kernel loading through the Linux 64-bit boot protocol, with stand-in
//! kernels that echo back what the zero page tells them.

mod common;

use common::fake_kernel;
use common::Console;
use skiff::vmm::{BootSource, CpuProfile, VmConfig, VmExit};

fn boot(kernel: &[u8], initrd: Option<&[u8]>, cmdline: &str, profile: CpuProfile) -> (VmExit, String) {
    let dir = tempfile::tempdir().unwrap();
    let kernel_path = dir.path().join("kernel");
    fake_kernel::write(&kernel_path, kernel);
    let initrd_path = initrd.map(|bytes| {
        let p = dir.path().join("initrd");
        fake_kernel::write(&p, bytes);
        p
    });
    let console = Console::default();
    let mut config = VmConfig::new(BootSource::Linux {
        kernel: kernel_path,
        initrd: initrd_path,
        cmdline: cmdline.into(),
    });
    config.console = console.output();
    config.cpu_profile = Some(profile);
    let exit = common::run_with_limit(config, std::time::Duration::from_secs(60)).unwrap();
    (exit, console.text())
}

#[test]
fn elf_vmlinux_gets_command_line_and_initrd() {
    let (exit, out) = boot(
        &fake_kernel::elf_vmlinux(),
        Some(b"INITRD-CONTENTS"),
        "console=ttyS0 skiff.test=1",
        CpuProfile::Host,
    );
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(
        out,
        "console=ttyS0 skiff.test=1 pvpanic_port=0x505 poweroff=kbdINITRD-CONTENTS"
    );
}

#[test]
fn bzimage_is_entered_at_its_64_bit_entry() {
    let (exit, out) = boot(
        &fake_kernel::bzimage(),
        Some(b"BZ-INITRD"),
        "root=/dev/vda",
        CpuProfile::Host,
    );
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(out, "root=/dev/vda pvpanic_port=0x505 poweroff=kbdBZ-INITRD");
}

#[test]
fn baseline_profile_adds_its_kernel_arguments() {
    let (_, out) = boot(&fake_kernel::elf_vmlinux(), None, "quiet", CpuProfile::Baseline);
    assert_eq!(
        out,
        format!(
            "quiet pvpanic_port=0x505 poweroff=kbd {}",
            CpuProfile::Baseline.kernel_args().join(" ")
        )
    );
}

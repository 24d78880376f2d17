//! `skiff boot` as a user runs it: success, and every kind of bad input ending
//! in one clear line on stderr, a non-zero status and nothing left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fake_kernel;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let f = Fixture {
            dir: tempfile::tempdir().unwrap(),
        };
        fake_kernel::write(&f.path("vmlinux"), &fake_kernel::elf_vmlinux());
        fake_kernel::write(&f.path("initrd"), b"RAMDISK");
        f
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn boot(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_skiff"))
            .arg("boot")
            .args(args)
            .output()
            .unwrap()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a failure with exactly one line on stderr containing every `needle`.
fn assert_fails_with(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

#[test]
fn boots_and_exits_zero_when_the_guest_resets() {
    let f = Fixture::new();
    let out = f.boot(&[
        "--kernel",
        s(&f.path("vmlinux")),
        "--initrd",
        s(&f.path("initrd")),
        "--cmdline",
        "hello",
        "--cpu-profile",
        "host",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello pvpanic_port=0x505 poweroff=kbdRAMDISK"
    );
}

#[test]
fn console_can_go_to_a_file() {
    let f = Fixture::new();
    let console = f.path("console.log");
    let out = f.boot(&[
        "--kernel",
        s(&f.path("vmlinux")),
        "--cmdline",
        "to-file",
        "--cpu-profile",
        "host",
        "--console",
        s(&console),
    ]);
    assert!(out.status.success());
    assert_eq!(out.stdout, b"");
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "to-file pvpanic_port=0x505 poweroff=kbd"
    );
}

#[test]
fn json_logs_go_to_the_log_file() {
    let f = Fixture::new();
    let log = f.path("skiff.log");
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args([
            "--log",
            s(&log),
            "--log-format",
            "json",
            "--debug",
            "boot",
            "--kernel",
        ])
        .arg(f.path("vmlinux"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(line.starts_with('{') && line.ends_with('}'), "not JSON: {line}");
    }
    assert!(text.contains("VM ended"), "{text}");
}

#[test]
fn missing_kernel() {
    let f = Fixture::new();
    let out = f.boot(&["--kernel", "/nonexistent/vmlinux"]);
    assert_fails_with(&out, &["kernel /nonexistent/vmlinux", "No such file"]);
}

#[test]
fn file_that_is_not_a_kernel() {
    let f = Fixture::new();
    std::fs::write(f.path("script"), "#!/bin/sh\necho not a kernel\n").unwrap();
    let out = f.boot(&["--kernel", s(&f.path("script"))]);
    assert_fails_with(&out, &["script", "not a kernel"]);
}

#[test]
fn truncated_kernel() {
    let f = Fixture::new();
    let elf = fake_kernel::elf_vmlinux();
    std::fs::write(f.path("truncated"), &elf[..elf.len() - 10]).unwrap();
    let out = f.boot(&["--kernel", s(&f.path("truncated"))]);
    assert_fails_with(&out, &["truncated", "kernel"]);
    let header_only = f.path("header-only");
    std::fs::write(&header_only, &elf[..40]).unwrap();
    assert_fails_with(&f.boot(&["--kernel", s(&header_only)]), &["header-only"]);
}

#[test]
fn initrd_that_does_not_fit() {
    let f = Fixture::new();
    let big = std::fs::File::create(f.path("big-initrd")).unwrap();
    big.set_len(200 << 20).unwrap();
    let out = f.boot(&[
        "--kernel",
        s(&f.path("vmlinux")),
        "--initrd",
        s(&f.path("big-initrd")),
        "--memory",
        "128M",
    ]);
    assert_fails_with(&out, &["initrd", "big-initrd", "do not fit"]);
}

#[test]
fn memory_too_small_or_beyond_the_host() {
    let f = Fixture::new();
    let k = f.path("vmlinux");
    assert_fails_with(
        &f.boot(&["--kernel", s(&k), "--memory", "1M"]),
        &["memory 1 MiB is too small"],
    );
    assert_fails_with(
        &f.boot(&["--kernel", s(&k), "--memory", "64T"]),
        &["exceeds the host"],
    );
    // Enough for the boot structures but not the kernel at 16 MiB.
    assert_fails_with(
        &f.boot(&["--kernel", s(&k), "--memory", "8M"]),
        &["kernel", "8 MiB"],
    );
}

#[test]
fn unparsable_memory_size() {
    let f = Fixture::new();
    let out = f.boot(&["--kernel", s(&f.path("vmlinux")), "--memory", "lots"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid size \"lots\""));
}

#[test]
fn vcpu_count_out_of_range() {
    let f = Fixture::new();
    let k = f.path("vmlinux");
    assert_fails_with(
        &f.boot(&["--kernel", s(&k), "--vcpus", "0"]),
        &["vcpus must be at least 1"],
    );
    assert_fails_with(
        &f.boot(&["--kernel", s(&k), "--vcpus", "255"]),
        &["255 vCPUs requested", "at most"],
    );
}

#[test]
fn no_kvm_device() {
    let f = Fixture::new();
    let out = f.boot(&[
        "--kernel",
        s(&f.path("vmlinux")),
        "--kvm-device",
        "/nonexistent/kvm",
    ]);
    assert_fails_with(&out, &["/nonexistent/kvm does not exist"]);
}

#[test]
fn kvm_device_that_is_not_kvm() {
    let f = Fixture::new();
    let out = f.boot(&["--kernel", s(&f.path("vmlinux")), "--kvm-device", "/dev/null"]);
    assert_fails_with(&out, &["/dev/null"]);
}

#[test]
fn failed_boot_leaves_no_console_file() {
    let f = Fixture::new();
    let console = f.path("console.log");
    let out = f.boot(&["--kernel", "/nonexistent", "--console", s(&console)]);
    assert!(!out.status.success());
    assert!(!console.exists());
    let out = f.boot(&[
        "--kernel",
        s(&f.path("vmlinux")),
        "--vcpus",
        "0",
        "--console",
        s(&console),
    ]);
    assert!(!out.status.success());
    assert!(!console.exists());
}

#[test]
fn sigterm_stops_a_running_guest_cleanly() {
    let f = Fixture::new();
    // A kernel that never ends: it parks after printing.
    let elf = fake_kernel::elf_with_code(fake_kernel::parked_entry_code());
    fake_kernel::write(&f.path("parked"), &elf);

    let console = f.path("console.log");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(["boot", "--cpu-profile", "host", "--cmdline", "up", "--kernel"])
            .arg(f.path("parked"))
            .arg("--console")
            .arg(&console)
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .starts_with("up")
    {
        assert!(std::time::Instant::now() < deadline, "guest never printed");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
}

#[test]
fn console_pipe_closed_by_the_reader_does_not_stop_the_guest() {
    use std::os::fd::FromRawFd;
    let f = Fixture::new();
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two-element array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds were just created and are owned here, once each.
    let (reader, writer) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(["boot", "--cpu-profile", "host", "--kernel"])
        .arg(f.path("vmlinux"))
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one warning expected: {stderr}");
    assert!(stderr.contains("serial console output failed"), "{stderr}");
}

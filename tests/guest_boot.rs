//! Real boots of the guest kernel with the test initramfs. About a minute
//! each on a host without hardware virtualization, so there are few.
//!
//! The kernel and initramfs come from SKIFF_KERNEL / SKIFF_INITRD when set
//! (scripts/setup.sh prints them), otherwise from the build scripts, which
//! return their cached results at once once built.

mod common;

use common::artifact;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MARKER: &str = "skiff-guest: hello from the microVM";
/// Far above the ~1 minute a boot takes on a software-KVM host; only there to
/// turn a hung guest into a failure instead of a stuck CI run.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

struct Boot {
    status: std::process::ExitStatus,
    /// Console lines with the time since the VMM started.
    lines: Vec<(Duration, String)>,
}

impl Boot {
    fn line_time(&self, needle: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }
    fn has(&self, needle: &str) -> bool {
        self.line_time(needle).is_some()
    }
    fn console(&self) -> String {
        console_text(&self.lines)
    }
}

fn console_text(lines: &[(Duration, String)]) -> String {
    lines
        .iter()
        .map(|(_, l)| l.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `skiff boot`'s default command line, for tests that add to it.
const BASE_CMDLINE: &str = skiff::vmm::DEFAULT_CMDLINE;

fn boot(args: &[&str]) -> Boot {
    let kernel = artifact("SKIFF_KERNEL", "scripts/build-kernel.sh");
    let initrd = artifact("SKIFF_INITRD", "rootfs/build-test-initramfs.sh");
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("boot")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((start.elapsed(), line));
        }
    });
    let mut lines = Vec::new();
    loop {
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "guest did not finish within {BOOT_TIMEOUT:?}; console so far:\n{}",
                console_text(&lines)
            );
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    reader.join().unwrap();
    let status = child.wait().unwrap();
    Boot { status, lines }
}

#[test]
fn kernel_boots_to_init_on_two_vcpus_and_reboots() {
    let b = boot(&["--vcpus", "2", "--memory", "128M"]);
    let console = b.console();
    assert!(b.has(MARKER), "marker missing; console:\n{console}");
    assert!(
        b.has("skiff-guest: cpus=2"),
        "guest did not see 2 CPUs; console:\n{console}"
    );
    assert!(b.has("skiff-guest: rebooting"), "console:\n{console}");
    assert!(
        b.status.success(),
        "VMM exited with {:?}; console:\n{console}",
        b.status
    );
    eprintln!(
        "figures: to 'Run /init' {:?}, to marker {:?}, to exit {:?}",
        b.line_time("Run /init"),
        b.line_time(MARKER),
        b.lines.last().map(|(t, _)| *t)
    );
}

#[test]
fn guest_poweroff_ends_the_vm() {
    let b = boot(&["--cmdline", &format!("{BASE_CMDLINE} skiff.test.end=poweroff")]);
    let console = b.console();
    assert!(b.has("skiff-guest: powering off"), "console:\n{console}");
    assert!(b.has("reboot: Power down"), "console:\n{console}");
    assert!(
        b.status.success(),
        "VMM exited with {:?}; console:\n{console}",
        b.status
    );
}

#[test]
fn kernel_panic_is_reported_as_a_failure() {
    // No such init: the kernel panics right after unpacking the initramfs,
    // and with panic=1 would then reboot exactly like a clean exit.
    let b = boot(&[
        "--cmdline",
        &format!("{BASE_CMDLINE} rdinit=/no-such-init init=/no-such-init"),
    ]);
    let console = b.console();
    assert!(b.has("Kernel panic"), "no panic on the console:\n{console}");
    assert_eq!(b.status.code(), Some(1), "console:\n{console}");
}

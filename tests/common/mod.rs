//! Helpers shared by the integration tests: tiny guests assembled by hand and
//! a console that the test can read while the guest runs.

#![allow(dead_code)]

pub mod containerd;
pub mod counting;
pub mod fake_kernel;
pub mod oci;
pub mod podman;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skiff::vmm::{BootSource, ConsoleOutput, VmConfig};

/// Where tiny guests are loaded; inside the identity-mapped first gigabyte and
/// clear of the boot structures below 1 MiB.
pub const CODE_ADDR: u64 = 0x10_0000;

/// A console whose output the test can read at any time.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    pub fn output(&self) -> ConsoleOutput {
        ConsoleOutput::Writer(Box::new(self.clone()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until the console contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// x86-64 machine code for the few things tiny guests do.
pub mod asm {
    /// mov dx, 0x3f8 (COM1)
    pub const COM1_TO_DX: [u8; 4] = [0x66, 0xba, 0xf8, 0x03];
    /// mov al, 0xfe ; out 0x64, al — pulse the CPU reset line through the i8042.
    pub const I8042_RESET: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64];
    /// cli ; hlt ; jmp back to the hlt
    pub const PARK: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];
    pub const INT3: u8 = 0xcc;
    pub const FWAIT: u8 = 0x9b;
    /// popcnt rax, rax
    pub const POPCNT: [u8; 5] = [0xf3, 0x48, 0x0f, 0xb8, 0xc0];
    /// ud2
    pub const UD2: [u8; 2] = [0x0f, 0x0b];
    /// iretq
    pub const IRETQ: [u8; 2] = [0x48, 0xcf];

    /// Writes each byte of `text` to the port in DX.
    pub fn print(text: &[u8]) -> Vec<u8> {
        text.iter().flat_map(|c| [0xb0, *c, 0xee]).collect()
    }
}

/// Starts the VM and waits for it, stopping it after `limit` so a hung guest
/// fails its test instead of hanging the suite.
pub fn run_with_limit(config: VmConfig, limit: Duration) -> Result<skiff::vmm::VmExit, skiff::vmm::Error> {
    let running = skiff::vmm::Vm::create(config)?.start()?;
    let stop = running.stop_handle();
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        stop.stop();
    });
    running.wait()
}

/// A config that runs `code` on a small guest, with the console captured.
pub fn code_vm(code: Vec<u8>, console: &Console) -> VmConfig {
    let mut config = VmConfig::new(BootSource::Code {
        code,
        load_addr: CODE_ADDR,
    });
    config.memory = skiff::vmm::MemorySize(16 << 20);
    config.console = console.output();
    config
}

/// Where the tests' skiffs keep their templates: SKIFF_TEMPLATE_DIR when
/// set, otherwise one directory for every test of every run (templates are
/// keyed by everything they are made of, this build included), so the
/// suite boots the kernel once per VM size instead of once per container.
/// The last `lines` lines of `text`, for a failure message.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub fn template_dir() -> std::path::PathBuf {
    std::env::var_os("SKIFF_TEMPLATE_DIR")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("templates"))
}

/// A built artifact: the path in `env` when set (scripts/setup.sh prints
/// them), otherwise what `script` prints, which returns its cached result at
/// once once built.
pub fn artifact(env: &str, script: &str) -> std::path::PathBuf {
    if let Ok(path) = std::env::var(env) {
        return path.into();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join(script))
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed (run scripts/setup.sh first)"
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}

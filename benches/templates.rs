//! Templates against cold boots, with the real guest kernel and agent
//! (SKIFF_KERNEL, SKIFF_AGENT_INITRD and SKIFF_BUSYBOX_ROOTFS, as
//! scripts/setup.sh prints them):
//! - `start/cold` and `start/template`: `skiff boot --bundle` of a busybox
//!   `echo`, from the command's start to the container's first line of
//!   output, booted from the kernel or restored from a template;
//! - `restore/vmm-mapped` and `restore/vmm-copied`: the VMM's side of a
//!   restore, from reading the snapshot until the vCPU threads run guest
//!   code, with the memory file mapped or copied;
//! - then, outside criterion, the memory ten idle VMs of each kind take
//!   (restored mapped, restored copied, cold; all in this process:
//!   resident, proportional, and private).
//!
//! A cold boot is most of a minute on a host without hardware
//! virtualization, so each group takes criterion's minimum of ten samples.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use skiff::runtime::root::GuestRoot;
use skiff::runtime::sandbox::{Cancel, Launch, Sandbox, SandboxConfig, VmResources};
use skiff::runtime::template::{padded_layout, TemplateStore};
use skiff::vmm::{ConsoleOutput, MemorySize, RestoreMemory, Vm};

const MEMORY: u64 = 128 << 20;
const IDLE_VMS: usize = 10;

fn artifact(name: &str) -> PathBuf {
    std::env::var_os(name)
        .unwrap_or_else(|| panic!("{name} is not set: run scripts/setup.sh and export what it prints"))
        .into()
}

struct Setup {
    dir: tempfile::TempDir,
    store: TemplateStore,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        std::fs::create_dir(&bundle).unwrap();
        let copied = Command::new("cp")
            .arg("-a")
            .arg(artifact("SKIFF_BUSYBOX_ROOTFS"))
            .arg(bundle.join("rootfs"))
            .status()
            .unwrap();
        assert!(copied.success());
        let config = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "env": ["PATH=/bin"],
                        "args": ["echo", "hello"]},
        });
        std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
        let store = TemplateStore::new(dir.path().join("templates"));
        Setup { dir, store }
    }

    fn resources(&self) -> VmResources {
        VmResources {
            kernel: artifact("SKIFF_KERNEL"),
            initrd: artifact("SKIFF_AGENT_INITRD"),
            vcpus: 1,
            memory: MemorySize(MEMORY),
            cpu_profile: None,
            kvm_device: "/dev/kvm".into(),
        }
    }

    /// One `skiff boot --bundle`: how long until its first line of output.
    /// A run the host's guest-memory defect spoils (software KVM) is run
    /// again, untimed.
    fn first_output(&self, cold: bool) -> Duration {
        for _ in 0..3 {
            if let Some(took) = self.try_first_output(cold) {
                return took;
            }
            eprintln!("a run failed (the host defect); running it again");
        }
        panic!("three runs in a row failed");
    }

    fn try_first_output(&self, cold: bool) -> Option<Duration> {
        let started = Instant::now();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff"));
        cmd.arg("--root")
            .arg(self.dir.path().join("state"))
            .arg("boot")
            .arg("--kernel")
            .arg(artifact("SKIFF_KERNEL"))
            .arg("--initrd")
            .arg(artifact("SKIFF_AGENT_INITRD"))
            .arg("--bundle")
            .arg(self.dir.path().join("bundle"))
            .arg("--template-dir")
            .arg(self.store.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if cold {
            cmd.arg("--cold-boot");
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let took = started.elapsed();
        let ended = child.wait().unwrap();
        (line == "hello\n" && ended.success()).then_some(took)
    }

    /// A template VM's configuration, its shares all empty.
    fn sandbox_config(&self, name: &str) -> SandboxConfig {
        let empty = self.store.empty_dir().unwrap();
        SandboxConfig {
            vm: self.resources(),
            root: GuestRoot::Shared(empty.clone()),
            shares: padded_layout(Vec::new(), &empty),
            work_dir: self.dir.path().join(name),
            console: ConsoleOutput::Null,
            debug_guest: false,
        }
    }
}

fn bench(c: &mut Criterion) {
    let setup = Setup::new();
    let mut group = c.benchmark_group("start");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    // The template is built by the warm-up's first run, untimed.
    group.bench_function("template", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| setup.first_output(false)).sum())
    });
    group.bench_function("cold", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| setup.first_output(true)).sum())
    });
    group.finish();

    let inputs = setup.store.inputs(&setup.resources(), false).unwrap();
    let template = setup
        .store
        .ensure(&inputs, &setup.resources(), false, &Cancel::default())
        .unwrap();
    let mut group = c.benchmark_group("restore");
    group.sample_size(20);
    for (name, how) in [
        ("vmm-mapped", RestoreMemory::Mapped),
        ("vmm-copied", RestoreMemory::Copied),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let work = setup.dir.path().join(format!("vmm-{i}"));
                    std::fs::create_dir_all(&work).unwrap();
                    let mut config = setup
                        .sandbox_config("unused")
                        .into_vm_config(&work.join("vsock.sock"));
                    config.restore_memory = Some(how);
                    let started = Instant::now();
                    let running = Vm::restore(config, &template.snapshot_dir())
                        .unwrap()
                        .start()
                        .unwrap();
                    total += started.elapsed();
                    running.stop_handle().stop();
                    running.wait().unwrap();
                    std::fs::remove_dir_all(&work).unwrap();
                }
                total
            })
        });
    }
    group.finish();

    idle_memory(&setup, &template.snapshot_dir());
}

/// Resident, proportional and anonymous memory of this process, in KiB.
fn memory() -> [u64; 3] {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    [field("Rss:"), field("Pss:"), field("Anonymous:")]
}

fn idle_memory(setup: &Setup, snapshot: &Path) {
    let restore = Launch::Restore(snapshot.to_owned());
    // Restored both ways: mapped is what containers get by default,
    // copied what SKIFF_RESTORE_MEMORY=copied gives.
    for (kind, launch, how) in [
        ("restored-mapped", restore.clone(), "mapped"),
        ("restored-copied", restore, "copied"),
        ("cold", Launch::Boot, ""),
    ] {
        // Read by each restore; set while no other thread of this process runs.
        std::env::set_var(skiff::vmm::config::RESTORE_MEMORY_ENV, how);
        let before = memory();
        let started = Instant::now();
        let vms: Vec<Sandbox> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..IDLE_VMS)
                .map(|i| {
                    let config = setup.sandbox_config(&format!("{kind}-{i}"));
                    let launch = launch.clone();
                    s.spawn(move || {
                        let mut vm = Sandbox::launch(config, launch, &Cancel::default()).unwrap();
                        vm.provision().unwrap();
                        vm
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Idle, as a VM waiting for its container is.
        std::thread::sleep(Duration::from_secs(2));
        let after = memory();
        let per_vm = |i: usize| (after[i].saturating_sub(before[i])) / IDLE_VMS as u64;
        println!(
            "memory/{kind}: {IDLE_VMS} idle VMs of {} MiB ready in {:.1} s; per VM: RSS {} KiB, PSS {} KiB, anonymous {} KiB",
            MEMORY >> 20,
            started.elapsed().as_secs_f64(),
            per_vm(0),
            per_vm(1),
            per_vm(2)
        );
        drop(vms);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

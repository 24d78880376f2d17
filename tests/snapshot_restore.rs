//! A real guest snapshotted while its agent waits for `Provision`, as a
//! template is: the original goes on, and two VMs restored from the
//! snapshot at once each reconnect to their own host, get their own
//! entropy, and run a container on their own root, unseen by the other.
//! One kernel boot in all; the restores skip the boot.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::artifact;
use skiff::runtime::root::GuestRoot;
use skiff::runtime::sandbox::{Cancel, Launch, Sandbox, SandboxConfig, VmResources};
use skiff::vmm::{ConsoleOutput, MemorySize};
use skiff_protocol::{AgentMessage, ContainerSpec, RootFs, RootSource, StreamKind, INIT_ID, ROOT_TAG};

fn rootfs_copy(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    let busybox = artifact("SKIFF_BUSYBOX_ROOTFS", "rootfs/build-busybox-rootfs.sh");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&busybox)
        .arg(&to)
        .status()
        .unwrap()
        .success());
    to
}

fn config(dir: &Path, name: &str, root: &Path) -> SandboxConfig {
    SandboxConfig {
        vm: VmResources {
            kernel: artifact("SKIFF_KERNEL", "scripts/build-kernel.sh"),
            initrd: artifact("SKIFF_AGENT_INITRD", "rootfs/build-agent-initramfs.sh"),
            vcpus: 1,
            memory: MemorySize(256 << 20),
            cpu_profile: None,
            kvm_device: "/dev/kvm".into(),
        },
        root: GuestRoot::Shared(root.to_owned()),
        shares: Vec::new(),
        work_dir: dir.join(format!("{name}-vm")),
        console: ConsoleOutput::File(dir.join(format!("{name}.console"))),
        debug_guest: false,
    }
}

/// Prints every VM's console if the test fails.
struct Consoles<'a>(&'a Path);

impl Drop for Consoles<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for name in ["original", "copy0", "copy1"] {
            let path = self.0.join(format!("{name}.console"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!("--- {name}'s console, last 60 lines ---\n{tail}");
        }
    }
}

/// Runs `script` as the container's process; returns its stdout.
fn run(sandbox: &mut Sandbox, hostname: &str, script: &str) -> String {
    let process = serde_json::from_value(serde_json::json!({
        "args": ["sh", "-c", script],
        "env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
    }))
    .unwrap();
    let mounts = serde_json::from_value(serde_json::json!([
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
    ]))
    .unwrap();
    sandbox
        .create_container(ContainerSpec {
            root: RootFs {
                source: RootSource::Shared { tag: ROOT_TAG.into() },
                readonly: false,
            },
            hostname: Some(hostname.into()),
            mounts,
            files: Vec::new(),
            process,
        })
        .unwrap();
    let mut streams = sandbox
        .attach(
            INIT_ID,
            &[StreamKind::Stdin, StreamKind::Stdout, StreamKind::Stderr],
        )
        .unwrap();
    let mut stderr = streams.pop().unwrap();
    let mut stdout = streams.pop().unwrap();
    drop(streams);
    if let Err(e) = sandbox.start(INIT_ID) {
        panic!("{hostname}: starting the container: {e:?}");
    }
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    match sandbox.expect(INIT_ID).unwrap() {
        AgentMessage::Exited { status, .. } => {
            assert_eq!(
                status,
                skiff_protocol::ExitStatus::Code(0),
                "stdout {out:?}, stderr {err:?}"
            )
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    out
}

const SCRIPT: &str = "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                      date +%s; echo $0 > /written-by-me; ls /written-by-*";

#[test]
fn a_template_snapshot_goes_on_and_restores_twice_in_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _consoles = Consoles(d);
    let snap = d.join("template");
    let cancel = Cancel::default();

    let booted = Instant::now();
    let mut original = Sandbox::launch(
        config(d, "original", &rootfs_copy(d, "root0")),
        Launch::Boot,
        &cancel,
    )
    .expect("cold boot");
    let boot_took = booted.elapsed();
    original.snapshot(&snap).unwrap();
    original.resume().unwrap();
    original.provision().unwrap();

    let restoring = Instant::now();
    let roots = [rootfs_copy(d, "root1"), rootfs_copy(d, "root2")];
    let mut copies: Vec<Sandbox> = roots
        .iter()
        .enumerate()
        .map(|(i, root)| {
            let mut s = Sandbox::launch(
                config(d, &format!("copy{i}"), root),
                Launch::Restore(snap.clone()),
                &cancel,
            )
            .expect("restore");
            s.provision().expect("provisioning a restored VM");
            s
        })
        .collect();
    let restore_took = restoring.elapsed();
    eprintln!("figures: cold boot to Ready {boot_took:?}; two restores to Provisioned {restore_took:?}");

    let mut outputs = Vec::new();
    for (name, sandbox) in [("original", &mut original)].into_iter().chain(
        copies
            .iter_mut()
            .enumerate()
            .map(|(i, s)| (["copy0", "copy1"][i], s)),
    ) {
        let out = run(sandbox, name, SCRIPT);
        outputs.push(out);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut randoms = Vec::new();
    for (out, name) in outputs.iter().zip(["original", "copy0", "copy1"]) {
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{name}: {out:?}");
        assert_eq!(lines[0], name);
        assert_eq!(lines[1].len(), 32, "{name}: {out:?}");
        randoms.push(lines[1].to_owned());
        let guest_time: i64 = lines[2].parse().unwrap();
        assert!(
            (now - guest_time).abs() < 120,
            "{name}'s clock says {guest_time}, the host's {now}"
        );
        // Its own root only: a file the others wrote is not there.
        assert_eq!(lines[3], "/written-by-me", "{name}");
    }
    randoms.sort();
    randoms.dedup();
    assert_eq!(
        randoms.len(),
        3,
        "two VMs read the same random numbers: {outputs:?}"
    );
    for root in &roots {
        assert_eq!(
            std::fs::read_to_string(root.join("written-by-me")).unwrap(),
            "sh\n"
        );
    }
    for s in copies.into_iter().chain([original]) {
        s.shutdown().unwrap();
    }
}

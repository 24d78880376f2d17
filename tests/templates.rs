//! `skiff template` and the template store as a user meets them: a
//! template prebuilt, listed, found damaged by the restore that needs it
//! and built again (the container still runs, correctly), and removed.
//! Two kernel boots: the prebuild and the rebuild.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::containerd::output_within;
use common::{artifact, tail};
use serde_json::{json, Value};

/// Far above a boot's ~40 s here; it only turns a hang into a failure.
const TIMEOUT: Duration = Duration::from_secs(300);

fn skiff(dir: &Path, args: &[&str]) -> Output {
    output_within(&mut command(dir, args), TIMEOUT).unwrap()
}

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff"));
    cmd.arg("--root")
        .arg(dir.join("state"))
        .arg("--log")
        .arg(dir.join("skiff.log"))
        .args(args)
        .arg("--template-dir")
        .arg(dir.join("templates"))
        .env(
            "SKIFF_KERNEL",
            artifact("SKIFF_KERNEL", "scripts/build-kernel.sh"),
        )
        .env(
            "SKIFF_AGENT_INITRD",
            artifact("SKIFF_AGENT_INITRD", "rootfs/build-agent-initramfs.sh"),
        )
        .stdin(Stdio::null());
    cmd
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn list(dir: &Path) -> Vec<Value> {
    serde_json::from_str(&ok(
        &skiff(dir, &["template", "list", "--format", "json"]),
        "list",
    ))
    .unwrap()
}

/// Flips the first byte of guest memory that is not zero.
fn damage(memory: &Path) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(memory)
        .unwrap();
    let bytes = std::fs::read(memory).unwrap();
    let at = bytes
        .iter()
        .position(|&b| b != 0)
        .expect("a memory file with data");
    file.write_all_at(&[bytes[at] ^ 0xff], at as u64).unwrap();
}

#[test]
fn a_template_is_prebuilt_listed_rebuilt_when_damaged_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    let key = ok(&skiff(d, &["template", "prebuild"]), "prebuild")
        .trim()
        .to_owned();
    assert_eq!(key.len(), 32, "{key:?}");
    let listed = list(d);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let info = &listed[0]["info"];
    assert_eq!(info["key"], json!(key));
    assert_eq!(info["inputs"]["vcpus"], json!(1));
    assert_eq!(info["inputs"]["memory_bytes"], json!(128u64 << 20));
    // Sparse: a booted guest's idle memory is not stored.
    let disk = listed[0]["disk_bytes"].as_u64().unwrap();
    assert!(disk > 0 && disk < 128 << 20, "{disk} bytes on disk");
    let first_build = info["build_id"].clone();
    // Built already: nothing is booted again.
    assert_eq!(ok(&skiff(d, &["template", "prebuild"]), "prebuild").trim(), key);
    assert_eq!(list(d)[0]["info"]["build_id"], first_build);

    damage(&d.join("templates").join(&key).join("snapshot/memory"));
    let rootfs = d.join("bundle/rootfs");
    std::fs::create_dir_all(d.join("bundle")).unwrap();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(artifact("SKIFF_BUSYBOX_ROOTFS", "rootfs/build-busybox-rootfs.sh"))
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(copied.success());
    let config = json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": "rebuilt",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "cwd": "/",
            "env": ["PATH=/bin"],
            "args": ["sh", "-c", "echo $(hostname) ran; echo written > /proof"],
        },
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    });
    std::fs::write(d.join("bundle/config.json"), config.to_string()).unwrap();
    let bundle = d.join("bundle");
    let console = d.join("console.log");
    let run = || {
        output_within(
            &mut command(
                d,
                &[
                    "boot",
                    "--bundle",
                    bundle.to_str().unwrap(),
                    "--console",
                    console.to_str().unwrap(),
                ],
            ),
            TIMEOUT,
        )
    };
    // On software-KVM hosts the first container in a process that has just
    // built a template has hung or lost its agent to the host's defect in
    // guest memory (see common::oci::HOST_DEFECT_SIGNS); the template is
    // rebuilt by then, and a second run, in a process of its own, restores
    // it. The log checked below keeps both runs.
    let out = match run() {
        Ok(out) if out.status.success() => out,
        first => {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            let what = match first {
                Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            eprintln!(
                "{what}; the guest console ends:\n{}\nrunning it again",
                tail(&text, 40)
            );
            run().unwrap()
        }
    };
    let stdout = ok(&out, "a run from the damaged template");
    assert_eq!(stdout, "rebuilt ran\n");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("proof")).unwrap(),
        "written\n"
    );
    let log = std::fs::read_to_string(d.join("skiff.log")).unwrap();
    assert!(
        log.contains("the template was refused") && log.contains("memory"),
        "the log does not say why the template was rebuilt:\n{log}"
    );
    let listed = list(d);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["info"]["key"], json!(key));
    assert_ne!(listed[0]["info"]["build_id"], first_build);

    ok(&skiff(d, &["template", "remove", "--all"]), "remove --all");
    assert!(list(d).is_empty());
    assert!(!d.join("templates").join(&key).exists());
    let out = skiff(d, &["template", "remove", "0123abcd"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no such template: 0123abcd"), "{stderr}");
}

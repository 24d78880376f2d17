//! Real container engines driving the runtime under test: containerd 1.6
//! through its runc shim (`ctr run --runtime io.containerd.runc.v2
//! --runc-binary RUNTIME`) and podman 4.3 through conmon (`podman --runtime
//! RUNTIME`), with the busybox images of rootfs/build-busybox-oci.sh.
//!
//! The runtime is [`runtime_under_test`]: skiff;
//! `SKIFF_OCI_TEST_RUNTIME=runc` (or a path) runs the same tests against
//! another, to tell a harness problem from a skiff one.

mod common;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::artifact;
use common::containerd::{describe, Containerd, Runtime, BUSYBOX_IMAGE};
use common::oci::{defect_in_consoles, DEFECT_ATTEMPTS};
use common::podman::{Podman, BUSYBOX_IMPORTED};

/// The runtime every test here hands to the engines.
fn runtime_under_test() -> Runtime {
    match std::env::var("SKIFF_OCI_TEST_RUNTIME").as_deref() {
        Ok("skiff") | Ok("") | Err(_) => skiff(),
        Ok("runc") => runc(),
        // Absolute, since the shim runs it from the bundle's directory.
        Ok(path) => Runtime::new(
            std::fs::canonicalize(path).unwrap_or_else(|e| panic!("SKIFF_OCI_TEST_RUNTIME={path}: {e}")),
        ),
    }
}

fn runc() -> Runtime {
    Runtime::installed("runc").expect("runc is not installed (scripts/setup.sh installs it)")
}

/// skiff, with what neither engine passes on: the guest kernel, the agent's
/// initramfs and an image cache (SKIFF_IMAGE_CACHE when set, so runs can
/// share one; a private one otherwise), plus a directory for the guests'
/// consoles, read by [`retry_on_host_defect`].
fn skiff() -> Runtime {
    let scratch = tempfile::tempdir().unwrap();
    let images = std::env::var_os("SKIFF_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| scratch.path().join("images"));
    let consoles = scratch.path().join("consoles");
    std::fs::create_dir(&consoles).unwrap();
    Runtime::new(env!("CARGO_BIN_EXE_skiff"))
        .with_env(
            "SKIFF_KERNEL",
            artifact("SKIFF_KERNEL", "scripts/build-kernel.sh"),
        )
        .with_env(
            "SKIFF_AGENT_INITRD",
            artifact("SKIFF_AGENT_INITRD", "rootfs/build-agent-initramfs.sh"),
        )
        .with_env("SKIFF_IMAGE_CACHE", images)
        .with_env("SKIFF_TEMPLATE_DIR", common::template_dir())
        .with_env("SKIFF_GUEST_CONSOLE_DIR", consoles)
        // A boot takes most of a minute on a host without hardware
        // virtualization; this only turns a hang into a failure.
        .with_timeout(Duration::from_secs(600))
        .owning(scratch)
}

/// The directory of the images built by rootfs/build-busybox-oci.sh.
fn busybox_images() -> PathBuf {
    artifact("SKIFF_BUSYBOX_OCI", "rootfs/build-busybox-oci.sh")
}

/// One container at a time: with skiff each is a microVM whose boot keeps
/// a core busy for most of a minute, and this host has two.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `attempt`, and again (up to `DEFECT_ATTEMPTS` in all) while it fails
/// with a guest console showing the host defect above. Runtimes without
/// guest consoles (runc) get exactly one attempt.
fn retry_on_host_defect(runtime: &Runtime, attempt: impl Fn()) {
    let consoles = runtime
        .env
        .iter()
        .find(|(k, _)| k == "SKIFF_GUEST_CONSOLE_DIR")
        .map(|(_, v)| PathBuf::from(v));
    for tried in 1.. {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&attempt));
        let Err(panic) = outcome else { return };
        let defect = consoles.as_deref().and_then(defect_in_consoles);
        let Some(defect) = defect.filter(|_| tried < DEFECT_ATTEMPTS) else {
            std::panic::resume_unwind(panic)
        };
        eprintln!("the host's exec defect killed a guest process; running the attempt again. The console:\n{defect}");
        if let Some(dir) = &consoles {
            let _ = std::fs::remove_dir_all(dir);
            let _ = std::fs::create_dir(dir);
        }
    }
}

fn containerd_with_busybox(runtime: &Runtime) -> Containerd {
    let ctd = Containerd::start(runtime);
    ctd.import(&busybox_images().join("busybox.oci.tar"));
    ctd
}

fn podman_with_busybox(runtime: &Runtime) -> Podman {
    let podman = Podman::new(runtime);
    podman.import(&busybox_images().join("busybox-rootfs.tar"), BUSYBOX_IMPORTED);
    podman
}

#[test]
fn containerd_shows_the_container_output() {
    let _serial = one_at_a_time();
    let rt = runtime_under_test();
    retry_on_host_defect(&rt, || {
        let ctd = containerd_with_busybox(&rt);
        let out = ctd.run(BUSYBOX_IMAGE, "echo-hi", &["echo", "hi"]);
        let what = format!("{}\n{}", describe(&out), ctd.diagnosis());
        assert!(out.status.success(), "{what}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n", "{what}");
        assert!(ctd.containers().is_empty(), "--rm left {:?}", ctd.containers());
        assert_eq!(
            ctd.leftover_runtime_state(),
            Vec::<String>::new(),
            "the runtime's delete left state"
        );
    });
}

#[test]
fn containerd_passes_on_the_exit_status() {
    let _serial = one_at_a_time();
    let rt = runtime_under_test();
    retry_on_host_defect(&rt, || {
        let ctd = containerd_with_busybox(&rt);
        let out = ctd.run(BUSYBOX_IMAGE, "exit-3", &["sh", "-c", "exit 3"]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}\n{}",
            describe(&out),
            ctd.diagnosis()
        );
    });
}

/// `ctr task kill` reaches the container: SIGKILL, since `sleep` as the
/// container's init ignores SIGTERM (ctr's default) under runc.
#[test]
fn containerd_task_kill_ends_a_sleep() {
    let _serial = one_at_a_time();
    let rt = runtime_under_test();
    retry_on_host_defect(&rt, || {
        let ctd = containerd_with_busybox(&rt);
        let id = "sleeper";
        ctd.run_detached(BUSYBOX_IMAGE, id, &["sleep", "1000"]);
        assert_eq!(
            ctd.task_status(id).as_deref(),
            Some("RUNNING"),
            "{}",
            ctd.diagnosis()
        );
        ctd.kill(id, "SIGKILL");
        assert!(
            ctd.wait_for_status(id, "STOPPED", rt.timeout),
            "still {:?} after SIGKILL\n{}",
            ctd.task_status(id),
            ctd.diagnosis()
        );
        let deleted = ctd.delete(id);
        // ctr reports a non-zero exit status when it deletes the task:
        // 137, 128 + SIGKILL, as for any process killed by a signal.
        assert!(
            String::from_utf8_lossy(&deleted.stderr).contains("exit code 137"),
            "ctr task delete: {}",
            describe(&deleted)
        );
        assert_eq!(ctd.task_status(id), None);
        assert!(ctd.containers().is_empty(), "left {:?}", ctd.containers());
        assert_eq!(
            ctd.leftover_runtime_state(),
            Vec::<String>::new(),
            "the runtime's delete left state"
        );
    });
}

#[test]
fn podman_shows_the_container_output() {
    let _serial = one_at_a_time();
    let rt = runtime_under_test();
    retry_on_host_defect(&rt, || {
        let podman = podman_with_busybox(&rt);
        let out = podman.run(BUSYBOX_IMPORTED, &["echo", "hi"]);
        let what = format!("{}\n{}", describe(&out), podman.diagnosis());
        assert!(out.status.success(), "{what}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n", "{what}");
        assert_eq!(podman.leftover_runtime_state(), Vec::<String>::new(), "{what}");
    });
}

#[test]
fn podman_passes_on_the_exit_status() {
    let _serial = one_at_a_time();
    let rt = runtime_under_test();
    retry_on_host_defect(&rt, || {
        let podman = podman_with_busybox(&rt);
        let out = podman.run(BUSYBOX_IMPORTED, &["sh", "-c", "exit 3"]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}\n{}",
            describe(&out),
            podman.diagnosis()
        );
    });
}

//! A state root, bundles and the `skiff` binary driven as containerd's
//! runc shim drives runc, for the OCI command tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::artifact;

/// What the guest console shows when the host's exec defect (see
/// tests/bundle_run.rs) killed a process: the kernel's report, or (it is
/// not always printed) the agent's debug line for a process that died of
/// SIGSEGV, which no test container does on purpose.
pub const HOST_DEFECT_SIGNS: [&str; 4] = [
    // Any address: the agent's own threads have crashed at others.
    "segfault at ",
    "exited: Signal(11)",
    // The agent itself (PID 1) hit.
    "Attempted to kill init",
    "general protection fault",
];

/// How many times a test runs an attempt that the host defect spoiled.
/// Measured here, a container whose shell at once `exec`s a busybox applet
/// hit it in about half of its attempts; three in a row still came.
pub const DEFECT_ATTEMPTS: usize = 5;

/// The lines of a guest console that show the host defect, shown when a
/// test runs an attempt again, so a log tells which process died and how.
pub fn defect_lines(console: &str) -> String {
    console
        .lines()
        .filter(|line| HOST_DEFECT_SIGNS.iter().any(|sign| line.contains(sign)))
        .take(5)
        .collect::<Vec<_>>()
        .join("\n")
}

/// What the consoles in `dir` show of the host defect, if anything.
pub fn defect_in_consoles(dir: &Path) -> Option<String> {
    let lines: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|text| defect_lines(&text))
        .filter(|lines| !lines.is_empty())
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

pub struct Oci {
    dir: tempfile::TempDir,
    pub root: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
}

impl Oci {
    pub fn new() -> Oci {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        Oci {
            root,
            kernel: artifact("SKIFF_KERNEL", "scripts/build-kernel.sh"),
            initrd: artifact("SKIFF_AGENT_INITRD", "rootfs/build-agent-initramfs.sh"),
            rootfs: artifact("SKIFF_BUSYBOX_ROOTFS", "rootfs/build-busybox-rootfs.sh"),
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `skiff --root <root> …` with the guest artifacts in its environment,
    /// as an installation would have them in place.
    pub fn skiff(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff"));
        // Debug logs (the monitors' in their state directories, the agent's
        // on the guest console) are what a failure is diagnosed from.
        cmd.arg("--root").arg(&self.root);
        if std::env::var_os("SKIFF_TEST_QUIET_GUEST").is_none() {
            cmd.arg("--debug");
        }
        cmd.arg("--log").arg(self.path("skiff.log"));
        self.vm_env(&mut cmd);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// The variables a skiff started by another program needs.
    pub fn vm_env(&self, cmd: &mut Command) {
        cmd.env("SKIFF_KERNEL", &self.kernel)
            .env("SKIFF_AGENT_INITRD", &self.initrd)
            .env("SKIFF_IMAGE_CACHE", self.image_cache())
            .env("SKIFF_TEMPLATE_DIR", super::template_dir())
            .env("SKIFF_GUEST_CONSOLE_DIR", self.path("consoles"));
    }

    /// Shared by every test of the run: the busybox image is built once.
    pub fn image_cache(&self) -> PathBuf {
        std::env::temp_dir().join("skiff-test-images")
    }

    /// Runs `skiff <args>` to its end.
    pub fn run(&self, args: &[&str]) -> Output {
        self.skiff().args(args).output().unwrap()
    }

    /// Runs `skiff <args>` and insists it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "skiff {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `skiff <args>`, insists it fails, and returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "skiff {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// A bundle named `name` running `args` in the busybox image, from
    /// `skiff spec`'s default with `edit` applied.
    pub fn bundle(&self, name: &str, args: &[&str], edit: impl FnOnce(&mut Value)) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("config.json"));
        let out = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(["spec", "--bundle"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skiff spec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        // Its own copy: the container's writes land in its rootfs.
        let rootfs = dir.join("rootfs");
        if !rootfs.exists() {
            copy_tree(&self.rootfs, &rootfs);
        }
        config["root"]["path"] = Value::from("rootfs");
        config["process"]["terminal"] = Value::from(false);
        config["process"]["args"] = Value::from(args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        edit(&mut config);
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&config).unwrap(),
        )
        .unwrap();
        dir
    }

    pub fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).unwrap()
    }

    pub fn status(&self, id: &str) -> String {
        self.state(id)["status"].as_str().unwrap().to_owned()
    }

    /// Waits until `id` has `status`.
    pub fn wait_status(&self, id: &str, status: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.status(id);
            if now == status {
                return;
            }
            assert!(Instant::now() < deadline, "{id} is still {now}, not {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The guest console of container `id`.
    pub fn console(&self, id: &str) -> String {
        std::fs::read_to_string(self.path("consoles").join(format!("{id}.log"))).unwrap_or_default()
    }

    /// What the guest consoles show of the host's exec defect, if anything.
    pub fn host_defect(&self) -> Option<String> {
        defect_in_consoles(&self.path("consoles"))
    }

    /// Nothing of any container is left: no state, no VMM process.
    pub fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.root)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left under the state root: {left:?}");
        assert_eq!(
            monitors_of(&self.root),
            Vec::<i32>::new(),
            "VMM processes left running"
        );
    }

    /// Ends every container still there (a failed test's) and its VMM.
    pub fn clean_up(&self) {
        if let Ok(dir) = std::fs::read_dir(&self.root) {
            for e in dir.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                let _ = self.run(&["delete", "--force", &id]);
            }
        }
        for pid in monitors_of(&self.root) {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Runs `scenario` again (at most [`DEFECT_ATTEMPTS`] times in all) only when it failed
    /// and a guest console shows the host's exec defect.
    pub fn retry_on_host_defect(&self, scenario: impl Fn(&Oci)) {
        for tried in 1.. {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(self)));
            let Err(panic) = outcome else { return };
            let defect = self.host_defect();
            self.clean_up();
            let Some(defect) = defect.filter(|_| tried < DEFECT_ATTEMPTS) else {
                std::panic::resume_unwind(panic)
            };
            eprintln!("the host's exec defect killed a guest process; running again. The console:\n{defect}");
            let _ = std::fs::remove_dir_all(self.path("consoles"));
        }
    }
}

impl Drop for Oci {
    fn drop(&mut self) {
        self.clean_up();
        if std::thread::panicking() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("consoles and logs kept in {}", kept.display());
        }
    }
}

/// `cp -a from to`.
pub fn copy_tree(from: &Path, to: &Path) {
    let copied = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(copied.success(), "cp -a {} {}", from.display(), to.display());
}

/// Pids of skiff monitors whose command line names `root`.
pub fn monitors_of(root: &Path) -> Vec<i32> {
    let root = root.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
            .unwrap_or(true);
        if !zombie && args.iter().any(|a| a == "monitor") && args.contains(&root) {
            pids.push(pid);
        }
    }
    pids
}

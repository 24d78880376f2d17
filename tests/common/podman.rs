//! podman with storage, state and configuration of the test's own, for
//! tests that run a runtime the way podman and conmon do.
//!
//! Nothing of the host's podman setup is read or written: the storage
//! (`--root`, `--runroot`), libpod's state (`--tmpdir`), the configuration
//! files (CONTAINERS_CONF and friends) live in a temporary directory, the
//! runtime's own state in another under /run, and containers go in a
//! cgroup parent of their own. Containers get no network (`--network none`): podman's default
//! bridge would add an interface and iptables chains to the host.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::containerd::{
    cleanup, describe, dir_entries, on_overlayfs, output_within, runtime_state_dir, tail, unique_name, which,
    Runtime, ENGINE_TIMEOUT,
};

/// The name the plain rootfs tarball of rootfs/build-busybox-oci.sh gets
/// on import.
pub const BUSYBOX_IMPORTED: &str = "skiff.test/busybox-rootfs:latest";

/// podman's default ulimits exceed this kind of host's hard nofile limit
/// (20000), and the runtime fails to apply them.
const ULIMITS: [&str; 4] = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"];

/// podman's built-in list of runtimes it passes `--log-format=json --log
/// FILE` to, so their errors reach podman's messages.
const JSON_LOG_RUNTIMES: [&str; 6] = ["crun", "runc", "kata", "runsc", "youki", "krun"];

pub struct Podman {
    dir: tempfile::TempDir,
    runtime_state: tempfile::TempDir,
    runtime: Runtime,
    /// What podman is told the runtime is: a script that gives the real
    /// one its environment and private state root (see
    /// [`Runtime::write_wrapper`]).
    wrapper: PathBuf,
    cgroup_parent: String,
    storage_driver: &'static str,
}

impl Podman {
    pub fn new(runtime: &Runtime) -> Podman {
        which("podman").expect("podman is not installed (scripts/setup.sh installs it)");
        let dir = tempfile::Builder::new()
            .prefix("skiff-podman-")
            .tempdir()
            .unwrap();
        let storage_driver = if on_overlayfs(dir.path()) {
            "vfs"
        } else {
            "overlay"
        };
        let mut fixture = Podman {
            dir,
            runtime_state: runtime_state_dir(),
            runtime: runtime.clone(),
            wrapper: PathBuf::new(),
            cgroup_parent: format!("/{}", unique_name("skiff-test")),
            storage_driver,
        };
        std::fs::create_dir(fixture.path("bin")).unwrap();
        // The runtime keeps its state here rather than in its default
        // (/run/runc for runc), so a container podman loses track of can
        // still be found and deleted.
        let root = fixture.runtime_root();
        fixture.wrapper = runtime.write_wrapper(
            &fixture.path("bin"),
            &[OsStr::new("--root"), root.as_os_str()],
            &fixture.calls_log(),
        );
        fixture.write_config();
        fixture
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn runtime_root(&self) -> PathBuf {
        self.runtime_state.path().to_path_buf()
    }

    fn calls_log(&self) -> PathBuf {
        self.path("runtime-calls.log")
    }

    fn write_config(&self) {
        let mut json_runtimes: Vec<String> = JSON_LOG_RUNTIMES.iter().map(|r| r.to_string()).collect();
        let name = self.runtime.name();
        if !json_runtimes.contains(&name) {
            json_runtimes.push(name);
        }
        let quoted: Vec<String> = json_runtimes.iter().map(|r| format!("\"{r}\"")).collect();
        std::fs::write(
            self.path("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\nruntime_supports_json = [{}]\n",
                quoted.join(", ")
            ),
        )
        .unwrap();
        std::fs::write(
            self.path("storage.conf"),
            format!(
                "[storage]\ndriver = \"{}\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                self.storage_driver,
                self.path("root").display(),
                self.path("runroot").display()
            ),
        )
        .unwrap();
        // Images are imported from files; nothing is ever pulled.
        std::fs::write(
            self.path("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .unwrap();
    }

    /// podman with this fixture's storage, state, configuration and
    /// runtime. The same global flags go into the exit command that conmon
    /// runs when a container ends, so it cleans up in the same place.
    pub fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            .arg("--root")
            .arg(self.path("root"))
            .arg("--runroot")
            .arg(self.path("runroot"))
            .arg("--tmpdir")
            .arg(self.path("libpod"))
            .arg("--storage-driver")
            .arg(self.storage_driver)
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"])
            .arg("--network-config-dir")
            .arg(self.path("networks"))
            .arg("--volumepath")
            .arg(self.path("volumes"))
            .arg("--runtime")
            .arg(&self.wrapper);
        c
    }

    /// `podman import TARBALL NAME`: a plain rootfs tarball as an image.
    pub fn import(&self, tarball: &Path, name: &str) {
        let mut c = self.command();
        c.args(["import", "--quiet"]).arg(tarball).arg(name);
        let out = output_within(&mut c, ENGINE_TIMEOUT).unwrap_or_else(|e| panic!("podman import: {e}"));
        assert!(out.status.success(), "podman import: {}", describe(&out));
    }

    /// `podman run` with the options every container here needs: no pull,
    /// no network, ulimits this host allows, and the fixture's cgroup
    /// parent (podman's default, /libpod_parent, is shared with the host).
    /// Options, the image and the command follow.
    pub fn run_command(&self) -> Command {
        let mut c = self.command();
        c.args(["run", "--pull", "never", "--network", "none"])
            .args(ULIMITS)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent);
        c
    }

    /// `podman run --rm IMAGE ARGS...`: the container's output and
    /// podman's exit status, which is the container process's.
    pub fn run(&self, image: &str, args: &[&str]) -> Output {
        let mut c = self.run_command();
        c.arg("--rm").arg(image).args(args);
        output_within(&mut c, self.runtime.timeout)
            .unwrap_or_else(|e| panic!("podman run: {e}\n{}", self.diagnosis()))
    }

    /// The containers whose state the runtime still keeps; empty once every
    /// container was deleted through the runtime.
    pub fn leftover_runtime_state(&self) -> Vec<String> {
        dir_entries(&self.runtime_root())
    }

    /// Every argument list podman and conmon ran the runtime with, one a
    /// line, oldest first.
    pub fn runtime_calls(&self) -> String {
        std::fs::read_to_string(self.calls_log()).unwrap_or_default()
    }

    /// For failure messages: the runtime's calls, and the error log podman
    /// gave a runtime it passes `--log` to.
    pub fn diagnosis(&self) -> String {
        let mut text = format!("--- runtime calls ---\n{}", self.runtime_calls());
        for log in find_files(&self.path("runroot"), "oci-log") {
            text.push_str(&format!("\n--- {} ---\n{}", log.display(), tail(&log, 20)));
        }
        text
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let mut rm = self.command();
        rm.args(["rm", "--all", "--force", "--time", "0"]);
        if let Err(e) = output_within(&mut rm, ENGINE_TIMEOUT) {
            eprintln!("cleanup: {e}");
        }
        // conmon and the `podman container cleanup` it starts when a
        // container ends are not our children and may still be at work;
        // their command lines name our storage.
        cleanup::end_processes(
            &cleanup::pids_mentioning(self.dir.path()),
            std::time::Duration::from_secs(5),
        );
        cleanup::delete_runtime_state(&self.runtime, &self.runtime_root());
        // What the runtime itself left running (skiff's VM monitors) names
        // its state directory.
        cleanup::end_processes(
            &cleanup::pids_mentioning(self.runtime_state.path()),
            std::time::Duration::from_secs(5),
        );
        cleanup::remove_cgroup(&self.cgroup_parent);
        cleanup::unmount_below(self.dir.path());
        cleanup::remove_tree(self.dir.path());
        cleanup::remove_tree(self.runtime_state.path());
    }
}

/// Files named `name` below `dir`.
fn find_files(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(find_files(&path, name));
        } else if e.file_name() == name {
            found.push(path);
        }
    }
    found
}

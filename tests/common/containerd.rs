//! A private containerd for tests that run a runtime the way containerd's
//! runc shim (`io.containerd.runc.v2`) does, plus what podman.rs shares:
//! the runtime under test ([`Runtime`]), commands with a time limit, and
//! the host-side cleanup both engines need.
//!
//! Each [`Containerd`] has its own root, state, socket and namespace under a
//! temporary directory (the runtime's state in one under /run, see
//! [`runtime_state_dir`]), so tests run side by side and never touch a
//! containerd the host may run. Some paths are fixed inside containerd 1.6
//! and cannot be moved: the shim's sockets go to /run/containerd/s (removed
//! again when the last fixture of the process ends, if no one else had made
//! it), and cgroups go to `/<namespace>/<id>` in every hierarchy (the
//! namespace is unique, and dropped with the fixture).

use std::ffi::{CString, OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The name the OCI archive of rootfs/build-busybox-oci.sh carries.
pub const BUSYBOX_IMAGE: &str = "skiff.test/busybox:latest";

/// Limit for the engines' own bookkeeping commands (import, kill, delete,
/// listing); a container's run gets its runtime's [`Runtime::timeout`].
pub const ENGINE_TIMEOUT: Duration = Duration::from_secs(60);

/// An OCI runtime binary as the engines are to run it.
#[derive(Clone, Debug)]
pub struct Runtime {
    pub path: PathBuf,
    /// Variables the runtime needs beyond what an engine passes on (skiff:
    /// its kernel, initramfs and image cache).
    pub env: Vec<(OsString, OsString)>,
    /// How long one container may take from `run` to its exit status.
    pub timeout: Duration,
    /// Directories the runtime's variables point into, removed with the
    /// last clone.
    scratch: Option<Arc<tempfile::TempDir>>,
}

impl Runtime {
    pub fn new(path: impl Into<PathBuf>) -> Runtime {
        Runtime {
            path: path.into(),
            env: Vec::new(),
            timeout: Duration::from_secs(60),
            scratch: None,
        }
    }

    /// The runtime found in PATH or in the sbin directories, where Debian
    /// installs runc and crun but a non-login PATH may not reach.
    pub fn installed(name: &str) -> Option<Runtime> {
        which(name).map(Runtime::new)
    }

    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Runtime {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Runtime {
        self.timeout = timeout;
        self
    }

    /// Keeps `dir` until the last clone of this runtime is dropped.
    pub fn owning(mut self, dir: tempfile::TempDir) -> Runtime {
        self.scratch = Some(Arc::new(dir));
        self
    }

    /// The binary's file name; podman decides by it which runtime flags
    /// to pass (`runtime_supports_json` in containers.conf).
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "runtime".into())
    }

    /// Writes `dir/<name>`, a shell script that runs this runtime with its
    /// variables set and `leading_args` before the caller's arguments, and
    /// appends every argument list it is called with to `call_log`.
    ///
    /// This is how a runtime gets its environment under podman: conmon
    /// runs the runtime with only the few variables podman gives conmon,
    /// podman itself passes just PATH and XDG_RUNTIME_DIR, and the
    /// `podman container cleanup` that conmon starts at exit runs it with an
    /// empty environment and without podman's `--runtime-flag`s.
    pub fn write_wrapper(&self, dir: &Path, leading_args: &[&OsStr], call_log: &Path) -> PathBuf {
        let mut exec = String::from("exec env");
        for (key, value) in &self.env {
            let mut assignment = key.clone();
            assignment.push("=");
            assignment.push(value);
            exec.push(' ');
            exec.push_str(&sh_quote(&assignment));
        }
        exec.push(' ');
        exec.push_str(&sh_quote(self.path.as_os_str()));
        for arg in leading_args {
            exec.push(' ');
            exec.push_str(&sh_quote(arg));
        }
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >>{}\n{exec} \"$@\"\n",
            sh_quote(call_log.as_os_str())
        );
        let path = dir.join(self.name());
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

/// `name` in PATH, /usr/sbin or /sbin.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A word for sh that stands for exactly `s`.
pub fn sh_quote(s: &OsStr) -> String {
    let s = s.to_str().expect("the wrapper's arguments must be UTF-8");
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `cmd` with no stdin, collecting its output; kills it and returns a
/// `TimedOut` error if it outlives `timeout`, so a hung engine fails a test
/// (or is given up on in cleanup) instead of hanging the suite.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> std::io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = Drain::start(child.stdout.take().unwrap());
    let err = Drain::start(child.stderr.take().unwrap());
    let Some(status) = wait_within(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{cmd:?} did not finish within {timeout:?}"),
        ));
    };
    // A process the command left behind (a daemonized shim, conmon) may
    // have inherited the pipes and keep them open for good, so the output
    // is what arrives soon after the exit.
    let deadline = Instant::now() + Duration::from_secs(2);
    Ok(Output {
        status,
        stdout: out.collect(deadline),
        stderr: err.collect(deadline),
    })
}

/// A pipe read to its end on a thread of its own, into a buffer that can be
/// taken before the end comes.
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Drain {
    fn start(mut pipe: impl Read + Send + 'static) -> Drain {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Drain { buf, thread }
    }

    /// What was read, once the pipe ended or `deadline` passed.
    fn collect(self, deadline: Instant) -> Vec<u8> {
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::mem::take(&mut *self.buf.lock().unwrap())
    }
}

fn wait_within(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The output as one text for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The last `lines` lines of a log file, for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A directory for the runtime's state (its `--root`), under /run like
/// runc's and skiff's defaults and about as short: runtimes put unix
/// sockets in there, below a directory named after the container (64
/// characters for podman), and a socket's path must fit in 108 bytes.
pub fn runtime_state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("skiff-")
        .tempdir_in("/run")
        .expect("creating a runtime state directory in /run")
}

/// The names in `dir`, sorted; none if it does not exist.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
}

/// A name no other fixture of any process has: cgroup names and
/// containerd namespaces are host-wide.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether `path` lives on overlayfs, where neither containerd's overlayfs
/// snapshotter nor podman's overlay driver can stack another overlay (a CI
/// job inside a container); they then fall back to plain copies.
pub fn on_overlayfs(path: &Path) -> bool {
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statfs writes only into `buf`; `c` is a valid C string.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == OVERLAYFS_SUPER_MAGIC
    }
}

/// Host-side cleanup shared by the fixtures: each step is best effort and
/// bounded, and reports what it could not undo on stderr rather than
/// panicking in a drop.
pub mod cleanup {
    use super::*;

    /// Processes (other than this one) whose command line names a path in
    /// `dir`: a fixture's private directory appears in the command lines of
    /// the shims and conmons it caused, and in nothing else.
    pub fn pids_mentioning(dir: &Path) -> Vec<i32> {
        // With the slash, a directory whose name extends this one's
        // does not match.
        let mut needle = dir.as_os_str().as_bytes().to_vec();
        needle.push(b'/');
        let me = std::process::id() as i32;
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != me)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmd| cmd.windows(needle.len()).any(|w| w == needle.as_slice()))
            })
            .collect()
    }

    /// Waits up to `grace` for `pids` to go by themselves, then kills what
    /// is left. They are not our children (the engines daemonize them), so
    /// "gone" means no longer in /proc or a zombie for init to reap.
    pub fn end_processes(pids: &[i32], grace: Duration) {
        let alive = |pid: &i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z')))
        };
        let deadline = Instant::now() + grace;
        while pids.iter().any(alive) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in pids.iter().filter(|p| alive(p)) {
            eprintln!("cleanup: killing leftover process {pid}");
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
    }

    /// The directories of cgroup `name` (a path relative to the roots) in
    /// every mounted hierarchy: /sys/fs/cgroup itself on a cgroup v2 host,
    /// /sys/fs/cgroup/<controller> on v1 and hybrid ones.
    pub fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        let mut roots = vec![root.to_path_buf()];
        if let Ok(entries) = std::fs::read_dir(root) {
            roots.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
        }
        roots
            .into_iter()
            .map(|r| r.join(name.trim_start_matches('/')))
            .filter(|d| d.join("cgroup.procs").exists())
            .collect()
    }

    /// Kills every process left in cgroup `name` or below (a container the
    /// engine lost track of), then removes the cgroups, innermost first.
    pub fn remove_cgroup(name: &str) {
        let dirs = cgroup_dirs(name);
        let mut all = Vec::new();
        for dir in &dirs {
            collect_dirs(dir, &mut all);
        }
        let mut pids: Vec<i32> = all
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| s.lines().filter_map(|l| l.parse().ok()).collect::<Vec<_>>())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        if !pids.is_empty() {
            end_processes(&pids, Duration::ZERO);
        }
        // Innermost first; a cgroup empties a moment after its last task
        // is reaped, so each gets a few tries.
        all.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in all {
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Err(e) = std::fs::remove_dir(&dir) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!("cleanup: cannot remove cgroup {}: {e}", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
        out.push(dir.to_path_buf());
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.filter_map(|e| e.ok()) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    collect_dirs(&e.path(), out);
                }
            }
        }
    }

    /// Detaches every mount at or below `dir`, deepest (latest) first:
    /// overlay rootfs mounts, podman's storage mounts, shm mounts.
    pub fn unmount_below(dir: &Path) {
        let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let dir = dir.as_os_str().as_bytes();
        let mut points: Vec<Vec<u8>> = info
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .map(unescape_mountinfo)
            .filter(|p| p.starts_with(dir) && matches!(p.get(dir.len()), None | Some(b'/')))
            .collect();
        points.reverse();
        for point in points {
            let c = CString::new(point.clone()).unwrap();
            // SAFETY: umount2 reads only the C string.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                let e = std::io::Error::last_os_error();
                // A mount under another one goes with its parent.
                if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                    eprintln!("cleanup: cannot unmount {}: {e}", String::from_utf8_lossy(&point));
                }
            }
        }
    }

    /// mountinfo writes space, tab, newline and backslash as \ooo.
    fn unescape_mountinfo(field: &str) -> Vec<u8> {
        let b = field.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
                out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
                i += 4;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    /// Asks `runtime` to force-delete every container whose state is in
    /// `state_root` (runc and skiff keep one directory per container id
    /// there): the containers an engine that died left behind.
    pub fn delete_runtime_state(runtime: &Runtime, state_root: &Path) {
        let Ok(entries) = std::fs::read_dir(state_root) else {
            return;
        };
        for id in entries.filter_map(|e| e.ok()).map(|e| e.file_name()) {
            eprintln!("cleanup: deleting leftover container {id:?}");
            let mut cmd = Command::new(&runtime.path);
            cmd.envs(runtime.env.iter().map(|(k, v)| (k, v)))
                .arg("--root")
                .arg(state_root)
                .args(["delete", "--force"])
                .arg(&id);
            if let Err(e) = output_within(&mut cmd, ENGINE_TIMEOUT) {
                eprintln!("cleanup: {e}");
            }
        }
    }

    /// The paths of the named unix sockets `pids` hold open.
    pub fn unix_sockets_of(pids: &[i32]) -> Vec<PathBuf> {
        let inodes: Vec<String> = pids
            .iter()
            .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter_map(|target| {
                let t = target.to_str()?;
                Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
            })
            .collect();
        let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let (inode, path) = (cols.get(6)?, cols.get(7)?);
                (path.starts_with('/') && inodes.iter().any(|i| i == inode)).then(|| PathBuf::from(path))
            })
            .collect()
    }

    /// Removes a directory tree, saying so if that fails (TempDir's own
    /// drop would stay silent).
    pub fn remove_tree(dir: &Path) {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("cleanup: cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// How many fixtures of this process are alive, and whether the first one
/// had to create /run/containerd: the shims' socket directory there cannot
/// be moved, and removing it while another fixture's shim is about to
/// listen in it would break that fixture.
static RUN_DIR_USERS: Mutex<(usize, bool)> = Mutex::new((0, false));
const CONTAINERD_RUN_DIR: &str = "/run/containerd";

/// A containerd daemon of the test's own.
pub struct Containerd {
    dir: tempfile::TempDir,
    runtime_state: tempfile::TempDir,
    daemon: Option<Child>,
    runtime: Runtime,
    namespace: String,
    snapshotter: &'static str,
}

impl Containerd {
    /// Starts containerd with `runtime`'s variables in its environment:
    /// the runc shim and through it every runtime command inherit
    /// containerd's environment, which is how a host configures skiff for
    /// containerd (a systemd unit's Environment=).
    pub fn start(runtime: &Runtime) -> Containerd {
        let containerd =
            which("containerd").expect("containerd is not installed (scripts/setup.sh installs it)");
        which("ctr").expect("ctr is not installed (it comes with containerd)");
        {
            let mut users = RUN_DIR_USERS.lock().unwrap_or_else(|e| e.into_inner());
            if users.0 == 0 {
                users.1 = !Path::new(CONTAINERD_RUN_DIR).exists();
            }
            users.0 += 1;
        }
        let dir = tempfile::Builder::new().prefix("skiff-ctd-").tempdir().unwrap();
        let snapshotter = if on_overlayfs(dir.path()) {
            "native"
        } else {
            "overlayfs"
        };
        let mut fixture = Containerd {
            dir,
            runtime_state: runtime_state_dir(),
            daemon: None,
            runtime: runtime.clone(),
            namespace: unique_name("skiff-test"),
            snapshotter,
        };
        std::fs::write(fixture.path("config.toml"), fixture.config()).unwrap();
        let log = std::fs::File::create(fixture.log_path()).unwrap();
        let daemon = Command::new(containerd)
            .arg("--config")
            .arg(fixture.path("config.toml"))
            .envs(runtime.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        fixture.daemon = Some(daemon);
        fixture.wait_until_ready();
        fixture
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn address(&self) -> PathBuf {
        self.path("state/containerd.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.path("containerd.log")
    }

    /// Where the shim tells the runtime to keep its state (`--root`):
    /// the runc shim appends the namespace.
    fn runtime_root(&self) -> PathBuf {
        self.runtime_state.path().to_path_buf()
    }

    /// A config with only what `ctr run` needs: no CRI (the slowest plugin
    /// to start, and it would want CNI), no snapshotters but the one used,
    /// no /opt/containerd (the "opt" plugin), no tracing.
    fn config(&self) -> String {
        let q = |p: PathBuf| toml_string(&p);
        let mut disabled = vec![
            "io.containerd.grpc.v1.cri",
            "io.containerd.internal.v1.opt",
            "io.containerd.internal.v1.restart",
            "io.containerd.internal.v1.tracing",
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
        ];
        disabled.push(if self.snapshotter == "native" {
            "io.containerd.snapshotter.v1.overlayfs"
        } else {
            "io.containerd.snapshotter.v1.native"
        });
        let disabled: Vec<String> = disabled.iter().map(|p| format!("\"{p}\"")).collect();
        format!(
            "version = 2\nroot = {}\nstate = {}\ndisabled_plugins = [{}]\n\n[grpc]\n  address = {}\n\n[debug]\n  level = \"debug\"\n",
            q(self.path("root")),
            q(self.path("state")),
            disabled.join(", "),
            q(self.address()),
        )
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(out) = output_within(self.ctr().arg("version"), Duration::from_secs(5)) {
                if out.status.success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.daemon.as_mut().unwrap().try_wait() {
                panic!(
                    "containerd exited ({status}) while starting; its log:\n{}",
                    tail(&self.log_path(), 40)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd did not answer within 30 s; its log:\n{}",
                    tail(&self.log_path(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `ctr` talking to this daemon, in this fixture's namespace.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.address())
            .arg("--namespace")
            .arg(&self.namespace)
            .env("CONTAINERD_SNAPSHOTTER", self.snapshotter);
        c
    }

    /// Runs a ctr command that must succeed.
    fn ctr_ok(&self, args: &[&OsStr]) -> Output {
        let out = output_within(self.ctr().args(args), ENGINE_TIMEOUT)
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e}\n{}", self.diagnosis()));
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n{}",
            describe(&out),
            self.diagnosis()
        );
        out
    }

    /// Imports an OCI archive (rootfs/build-busybox-oci.sh) and unpacks it
    /// into the snapshotter.
    pub fn import(&self, archive: &Path) {
        self.ctr_ok(&[OsStr::new("images"), OsStr::new("import"), archive.as_os_str()]);
    }

    /// The runtime flags of `ctr run`: the runc shim with the runtime under
    /// test as its "runc", state and FIFOs under the fixture's directory
    /// (ctr's default FIFO directory is the fixed /run/containerd/fifo).
    fn run_command(&self) -> Command {
        let mut c = self.ctr();
        c.arg("run")
            .args(["--runtime", "io.containerd.runc.v2"])
            .arg("--runc-binary")
            .arg(&self.runtime.path)
            .arg("--runc-root")
            .arg(self.runtime_root())
            .arg("--fifo-dir")
            .arg(self.path("fifo"));
        c
    }

    /// `ctr run --rm IMAGE ID ARGS...`: the container's output and ctr's
    /// exit status, which is the container process's.
    pub fn run(&self, image: &str, id: &str, args: &[&str]) -> Output {
        let mut c = self.run_command();
        c.arg("--rm").arg(image).arg(id).args(args);
        output_within(&mut c, self.runtime.timeout)
            .unwrap_or_else(|e| panic!("ctr run: {e}\n{}", self.diagnosis()))
    }

    /// `ctr run -d`: returns once the task is running.
    pub fn run_detached(&self, image: &str, id: &str, args: &[&str]) {
        let mut c = self.run_command();
        c.arg("--detach").arg(image).arg(id).args(args);
        let out = output_within(&mut c, self.runtime.timeout)
            .unwrap_or_else(|e| panic!("ctr run -d: {e}\n{}", self.diagnosis()));
        assert!(
            out.status.success(),
            "ctr run -d: {}\n{}",
            describe(&out),
            self.diagnosis()
        );
    }

    /// `ctr task kill --signal SIGNAL ID`.
    pub fn kill(&self, id: &str, signal: &str) {
        self.ctr_ok(&["task", "kill", "--signal", signal, id].map(OsStr::new));
    }

    /// The task's status as `ctr task ls` shows it (RUNNING, STOPPED,
    /// ...), or None when there is no such task.
    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["task", "ls"].map(OsStr::new));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&id))
            .and_then(|cols| cols.get(2).map(|s| s.to_string()))
    }

    /// Polls until the task has `status`; false if it does not within
    /// `timeout`.
    pub fn wait_for_status(&self, id: &str, status: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.task_status(id).as_deref() == Some(status) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Deletes a stopped task and its container; returns what `ctr task
    /// delete` said (it warns of a non-zero exit status).
    pub fn delete(&self, id: &str) -> Output {
        let out = self.ctr_ok(&["task", "delete", id].map(OsStr::new));
        self.ctr_ok(&["containers", "delete", id].map(OsStr::new));
        out
    }

    /// The containers whose state the runtime still keeps; empty once every
    /// container was deleted through the runtime.
    pub fn leftover_runtime_state(&self) -> Vec<String> {
        dir_entries(&self.runtime_root().join(&self.namespace))
    }

    /// The ids of this namespace's containers.
    pub fn containers(&self) -> Vec<String> {
        let out = self.ctr_ok(&["containers", "ls", "--quiet"].map(OsStr::new));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// containerd's log (which includes the shims' and the runtime's
    /// errors) for failure messages.
    pub fn diagnosis(&self) -> String {
        format!(
            "--- containerd log (last lines) ---\n{}",
            tail(&self.log_path(), 60)
        )
    }

    /// Ends what the fixture's containers left, through containerd while
    /// it answers, by force after.
    fn teardown(&mut self) {
        let quick = Duration::from_secs(20);
        if let Ok(out) = output_within(self.ctr().args(["containers", "ls", "--quiet"]), quick) {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                // "delete --force" kills the task first; a task that is
                // already gone only makes it fail.
                let _ = output_within(self.ctr().args(["task", "delete", "--force", id]), quick);
                let _ = output_within(self.ctr().args(["containers", "delete", id]), quick);
            }
        }
        if let Some(mut daemon) = self.daemon.take() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our
            // unreaped child's.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            if wait_within(&mut daemon, Duration::from_secs(10)).is_none() {
                let _ = daemon.kill();
                let _ = daemon.wait();
            }
        }
        // Shims outlive containerd by design; theirs name our socket. A
        // shim removes its own socket (in the fixed /run/containerd/s) when
        // it exits, but not when it has to be killed.
        let shims = cleanup::pids_mentioning(self.dir.path());
        let sockets = cleanup::unix_sockets_of(&shims);
        cleanup::end_processes(&shims, Duration::from_secs(2));
        for socket in sockets.iter().filter(|s| s.starts_with(CONTAINERD_RUN_DIR)) {
            let _ = std::fs::remove_file(socket);
        }
        cleanup::delete_runtime_state(&self.runtime, &self.runtime_root().join(&self.namespace));
        // What the runtime itself left running (skiff's VM monitors) names
        // its state directory.
        cleanup::end_processes(
            &cleanup::pids_mentioning(self.runtime_state.path()),
            Duration::from_secs(5),
        );
        cleanup::remove_cgroup(&self.namespace);
        cleanup::unmount_below(self.dir.path());
        cleanup::remove_tree(self.dir.path());
        cleanup::remove_tree(self.runtime_state.path());
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.teardown();
        let mut users = RUN_DIR_USERS.lock().unwrap_or_else(|e| e.into_inner());
        users.0 -= 1;
        if users.0 == 0 && users.1 {
            // Only empty directories go: a socket left there belongs to a
            // shim that is still shutting down (or to someone else).
            for dir in ["s", "fifo", ""] {
                let _ = std::fs::remove_dir(Path::new(CONTAINERD_RUN_DIR).join(dir));
            }
        }
    }
}

fn toml_string(path: &Path) -> String {
    let s = path.to_str().expect("the fixture's paths are UTF-8");
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

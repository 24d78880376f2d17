//! The agent's side of the protocol: the control loop and the processes
//! it tracks. Starting them is in `start`, reporting their ends in `finish`,
//! signalling and listing all of the container's in `processes`.

mod finish;
mod processes;
mod start;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use skiff_protocol::{
    read_frame, streams_for, write_frame, AgentMessage, ContainerSpec, ExitStatus, HostMessage, Process,
    StreamKind, Timings, INIT_ID,
};

use crate::log::{debug, info};
use crate::procfs::ProcFs;
use crate::relay::ExitFlag;
use crate::spawn::{self, Prepared, SpawnError, Spawned, Stdio};
use crate::transport::Conn;
use crate::{mounts, rootfs, staged};

/// How long `Start` waits for the host to attach a process's streams.
const STREAM_WAIT: Duration = Duration::from_secs(10);
/// How long the end of the container waits for the other processes'
/// reports before it reports its own.
const OTHERS_WAIT: Duration = Duration::from_secs(10);
/// How long the agent waits for `Shutdown` after the container ended.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

pub struct Agent {
    /// Where the container's root is: `None` in the VM, where the agent
    /// mounts it and switches into it.
    hosted_root: Option<PathBuf>,
    control: Mutex<Conn>,
    /// The guest's `/proc` as it was before the switch of root, or why it
    /// could not be opened.
    proc: Result<ProcFs, String>,
    /// Another handle on the control socket, to end the control loop.
    control_wake: Conn,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
enum Container {
    #[default]
    None,
    Running,
    /// Its process ended, or creating it failed.
    Over,
}

#[derive(Default)]
struct State {
    container: Container,
    /// The container's `/` in the agent's view.
    root: PathBuf,
    procs: HashMap<String, Proc>,
    /// Stream connections waiting for their process's `Start`.
    streams: HashMap<(String, StreamKind), Conn>,
    /// Ids whose process is over, so late streams for them are closed.
    finished: HashSet<String>,
    shutdown: bool,
}

struct Proc {
    pid: i32,
    terminal: bool,
    /// The streams `Start` waits for.
    streams: &'static [StreamKind],
    /// The agent's ends of its stdio and its start pipe, until `Start`.
    pending: Option<(File, Stdio)>,
    /// `Start` is waiting for streams; the exit report waits for it.
    starting: bool,
    /// A terminal's master, for `ResizeTerminal`.
    master: Option<File>,
    /// The stdin stream, shut down at the end to wake its relay.
    stdin: Option<Conn>,
    outputs: Vec<JoinHandle<()>>,
    exited: Arc<ExitFlag>,
    /// `Start` failed and said so: no `Exited` follows.
    failed: bool,
}

/// What a process's finisher thread needs.
struct Finish {
    id: String,
    spawned_exit: std::sync::mpsc::Receiver<ExitStatus>,
    failure: spawn::Failure,
    prepared: Prepared,
    exited: Arc<ExitFlag>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| format!("starting thread {name}: {e}"))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn failed(id: &str, error: impl Into<String>, exit_code: i32) -> AgentMessage {
    AgentMessage::Failed {
        id: id.to_string(),
        error: error.into(),
        exit_code,
    }
}

impl Agent {
    pub fn new(control: Conn, hosted_root: Option<PathBuf>) -> Result<Arc<Agent>, String> {
        let control_wake = control
            .try_clone()
            .map_err(|e| format!("dup of the control socket: {e}"))?;
        let proc = ProcFs::open("/proc");
        if let Err(e) = &proc {
            info!("{e}");
        }
        Ok(Arc::new(Agent {
            hosted_root,
            control: Mutex::new(control),
            proc,
            control_wake,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }))
    }

    pub fn send(&self, msg: &AgentMessage) {
        debug!("→ {msg:?}");
        if let Err(e) = write_frame(&mut *lock(&self.control), msg) {
            info!("sending {msg:?}: {e}");
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Waits until `done` holds or `deadline` passes; returns the state, still
    /// locked, and whether `done` held.
    fn wait_until(&self, deadline: Instant, done: impl Fn(&State) -> bool) -> (MutexGuard<'_, State>, bool) {
        let mut state = self.state();
        loop {
            if done(&state) {
                return (state, true);
            }
            let now = Instant::now();
            if now >= deadline {
                return (state, false);
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reads and handles host messages until `Shutdown` or the end of the
    /// control connection.
    pub fn control_loop(self: &Arc<Self>, mut reader: Conn) {
        loop {
            let msg = match read_frame::<_, HostMessage>(&mut reader) {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    info!("the control connection ended");
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    info!("bad message from the host: {e}");
                    self.send(&failed("", e.to_string(), 1));
                    continue;
                }
                Err(e) => {
                    info!("reading the control connection: {e}");
                    return;
                }
            };
            debug!("← {msg:?}");
            match msg {
                HostMessage::Provision { .. } => self.send(&failed(
                    skiff_protocol::PROVISION_ID,
                    "the guest was provisioned already",
                    1,
                )),
                HostMessage::CreateContainer(spec) => self.create_container(spec),
                HostMessage::Exec { id, process } => self.exec(id, process),
                HostMessage::Start { id } => self.start(id),
                HostMessage::Signal {
                    id,
                    signal,
                    all: false,
                } => self.signal(&id, signal),
                HostMessage::Signal {
                    id,
                    signal,
                    all: true,
                } => self.signal_all(&id, signal),
                HostMessage::ListProcesses { id } => self.list_processes(id),
                HostMessage::ResizeTerminal { id, rows, cols } => self.resize(&id, rows, cols),
                HostMessage::Shutdown => {
                    self.state().shutdown = true;
                    self.changed.notify_all();
                    return;
                }
            }
        }
    }

    fn create_container(self: &Arc<Self>, spec: ContainerSpec) {
        if self.state().container != Container::None {
            self.send(&failed(INIT_ID, skiff_protocol::ALREADY_CREATED, 1));
            return;
        }
        self.state().container = Container::Over;
        let mut timings = Timings::default();
        let root = match self.prepare_root(&spec, &mut timings) {
            Ok(root) => root,
            Err(e) => {
                info!("creating the container: {e}");
                self.send(&failed(INIT_ID, e, 1));
                return;
            }
        };
        self.state().root = root;
        if self.create_process(INIT_ID, &spec.process, timings) {
            self.state().container = Container::Running;
        }
    }

    /// Mounts the root and the OCI mounts and switches into it; returns the
    /// container's `/` as the agent then sees it.
    fn prepare_root(&self, spec: &ContainerSpec, timings: &mut Timings) -> Result<PathBuf, String> {
        let began = Instant::now();
        let root = match &self.hosted_root {
            Some(root) => root.clone(),
            None => rootfs::mount_root(&spec.root)?,
        };
        let mounted = Instant::now();
        timings.root_mount_us = micros(mounted - began);
        // Before the mounts, which may bind them. In the VM the staging
        // directory is in the initramfs, reachable until the switch of root
        // and hidden after it.
        match &self.hosted_root {
            Some(root) => {
                staged::write_all(root, &spec.files)?;
                mounts::mount_all(root, &staged::locate_sources(root, &spec.mounts))?;
            }
            None => {
                staged::write_all(Path::new("/"), &spec.files)?;
                mounts::mount_all(&root, &spec.mounts)?;
                rootfs::seal(&spec.root, &root)?;
            }
        }
        let view = match &self.hosted_root {
            Some(root) => {
                // Hosted, the hostname and root are the host's to keep.
                debug!("hosted: no hostname, no switch of root");
                root.clone()
            }
            None => {
                if let Some(name) = spec.hostname.as_deref().filter(|h| !h.is_empty()) {
                    nix::unistd::sethostname(name).map_err(|e| format!("setting hostname {name:?}: {e}"))?;
                }
                rootfs::switch_root(&root)?;
                PathBuf::from("/")
            }
        };
        timings.mounts_us = micros(mounted.elapsed());
        Ok(view)
    }

    fn exec(self: &Arc<Self>, id: String, process: Process) {
        let problem = {
            let state = self.state();
            if state.container != Container::Running {
                Some("the container is not running")
            } else if id == INIT_ID
                || id.is_empty()
                || state.procs.contains_key(&id)
                || state.finished.contains(&id)
            {
                Some("a process with this id exists already")
            } else {
                None
            }
        };
        match problem {
            Some(problem) => self.send(&failed(&id, problem, 1)),
            None => {
                self.create_process(&id, &process, Timings::default());
            }
        }
    }

    /// Creates a process stopped before `execve` and reports it; true if it
    /// was created.
    fn create_process(self: &Arc<Self>, id: &str, process: &Process, mut timings: Timings) -> bool {
        let began = Instant::now();
        let root = self.state().root.clone();
        let created = Prepared::new(&root, process).and_then(|prepared| {
            let spawned = spawn::spawn(&prepared)?;
            Ok((prepared, spawned))
        });
        let (prepared, spawned) = match created {
            Ok(created) => created,
            Err(SpawnError { message, exit_code }) => {
                info!("creating process {id}: {message}");
                self.send(&failed(id, message, exit_code));
                return false;
            }
        };
        timings.process_us = micros(began.elapsed());
        let Spawned {
            pid,
            exit,
            start,
            failure,
            stdio,
        } = spawned;
        let exited = Arc::new(ExitFlag::default());
        let master = match &stdio {
            Stdio::Terminal { master } => master.try_clone().ok(),
            Stdio::Pipes { .. } => None,
        };
        let proc = Proc {
            pid,
            terminal: master.is_some(),
            streams: streams_for(process),
            pending: Some((start, stdio)),
            starting: false,
            master,
            stdin: None,
            outputs: Vec::new(),
            exited: Arc::clone(&exited),
            failed: false,
        };
        self.state().procs.insert(id.to_string(), proc);
        let finish = Finish {
            id: id.to_string(),
            spawned_exit: exit,
            failure,
            prepared,
            exited,
        };
        let agent = Arc::clone(self);
        if let Err(e) = spawn_thread("finish", move || agent.finish(finish)) {
            // Without its finisher nobody would report it; take it back.
            info!("{e}");
            self.state().procs.remove(id);
            // SAFETY: kill on the pid just created, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            self.send(&failed(id, e, 1));
            return false;
        }
        self.send(&AgentMessage::Created {
            id: id.to_string(),
            pid,
            timings,
        });
        true
    }

    fn signal(&self, id: &str, signal: i32) {
        let target = {
            let state = self.state();
            state.procs.get(id).map(|p| (p.pid, p.terminal, p.exited.clone()))
        };
        let Some((pid, terminal, exited)) = target else {
            self.send(&failed(id, "no such process", 1));
            return;
        };
        // The table lock is not held here, but the finisher removes a pid
        // only after its reaping, and the flag says whether that happened:
        // a reaped pid could be someone else's by now.
        if exited.is_set() {
            debug!("signal {signal} for {id}, which has exited already");
            return;
        }
        let target = if terminal { -pid } else { pid };
        // SAFETY: kill has no memory effects.
        if unsafe { libc::kill(target, signal) } < 0 {
            let e = std::io::Error::last_os_error();
            self.send(&failed(id, format!("signal {signal}: {e}"), 1));
        }
    }

    fn resize(&self, id: &str, rows: u16, cols: u16) {
        let state = self.state();
        let Some(proc) = state.procs.get(id) else {
            drop(state);
            self.send(&failed(id, "no such process", 1));
            return;
        };
        let Some(master) = &proc.master else {
            drop(state);
            self.send(&failed(id, "the process has no terminal", 1));
            return;
        };
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the valid pointer.
        let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        drop(state);
        if r < 0 {
            let e = std::io::Error::last_os_error();
            self.send(&failed(id, format!("resizing the terminal: {e}"), 1));
        }
    }
}

//! The monitor: the detached process that owns one container's microVM,
//! from `create` until the container's process exits. It is what runc's
//! container process is to a shim: its pid is the container's pid, it
//! exits with the container's status, signals sent to it reach the
//! container, and commands reach it through a socket in the state
//! directory.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use oci_spec::runtime::Hooks;
use serde::{Deserialize, Serialize};
use skiff_protocol::{
    read_frame, streams_for, write_frame, AgentMessage, ExitStatus, HostMessage, Process, StreamKind, INIT_ID,
};

use super::bundle::Bundle;
use super::control::{self, Request, Response};
use super::error::RuntimeError;
use super::foreground::SignalSource;
use super::hooks::{run_hooks, HookKind};
use super::host_mounts;
use super::image::ImageFormat;
use super::relay;
use super::root;
use super::sandbox::{
    describe_end, garbled_start, message_id, Cancel, ControlSender, Event, Sandbox, SandboxConfig,
    StreamOpener, VmResources, START_RETRIES, START_RETRY_DELAY,
};
use super::state::{self, Container, Status};
use super::template::{self, BootMode, TemplateStore};
use super::terminal::{self, Pty};
use crate::vmm::{ConsoleOutput, PauseHandle};

/// The status the monitor exits with when the VM ends under the container
/// (a guest crash): no process status exists to report.
const VM_LOST_STATUS: i32 = 255;
/// How long a command waits for the guest agent's answer before it fails:
/// far beyond what it takes (seconds, even on software-KVM hosts), so only
/// an agent that lost the request runs into it.
const AGENT_ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the end of the container waits for exec'd processes' callers
/// to be told their status.
const EXEC_ANSWER_GRACE: Duration = Duration::from_secs(2);
/// How often a terminal's window size is looked at for changes.
const RESIZE_POLL: Duration = Duration::from_millis(250);

/// Everything the monitor needs; `create` resolves it.
#[derive(Debug)]
pub struct MonitorOptions {
    pub container: Container,
    pub bundle: PathBuf,
    pub vm: VmResources,
    /// Host CPUs the VM's threads may run on (the spec's cpuset).
    pub cpus: Option<Vec<usize>>,
    pub image_format: ImageFormat,
    pub image_cache: PathBuf,
    pub console_socket: Option<PathBuf>,
    /// Where the guest's console goes; discarded when `None`.
    pub guest_console: Option<PathBuf>,
    pub debug_guest: bool,
    /// Where the VM's template is; `None` boots it cold.
    pub templates: Option<TemplateStore>,
}

/// What the monitor tells `create` on its ready pipe.
#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReadyReport {
    Created,
    Failed { message: String, code: i32 },
}

/// Runs the container to its end; returns the status to exit with.
pub fn run(options: MonitorOptions, mut ready: File, cancel: &Cancel, signals: &mut dyn SignalSource) -> i32 {
    let container = options.container.clone();
    let prepared = prepare(options, cancel);
    let report = match &prepared {
        Ok(_) => ReadyReport::Created,
        Err(e) => ReadyReport::Failed {
            message: e.to_string(),
            code: e.exit_code(),
        },
    };
    let told = serde_json::to_writer(&mut ready, &report)
        .map_err(io::Error::other)
        .and_then(|()| ready.flush());
    drop(ready);
    let monitor = match prepared {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("create failed: {e}");
            return 1;
        }
    };
    if let Err(e) = told {
        // `create` is gone (killed, say): nobody knows of this container.
        tracing::warn!("create went away before the container was ready ({e}); removing it");
        drop(monitor);
        let _ = container.remove();
        return 1;
    }
    let sender = monitor.shared.sender.clone();
    signals.forward(Box::new(move |signal| {
        let _ = sender.send(&HostMessage::Signal {
            id: INIT_ID.into(),
            signal,
            all: false,
        });
    }));
    monitor.serve()
}

/// A created container, its VM booted and its process waiting for `start`.
struct Monitor {
    sandbox: Sandbox,
    shared: Arc<Shared>,
    listener: UnixListener,
    outputs: Vec<JoinHandle<()>>,
}

/// What the threads serving commands share.
struct Shared {
    container: Container,
    sender: ControlSender,
    streams: StreamOpener,
    pause: PauseHandle,
    hooks: Option<Hooks>,
    /// Agent answers awaited by id.
    routes: Mutex<HashMap<String, Sender<AgentMessage>>>,
    next_id: AtomicU64,
    /// Held across status changes, so the status the record ends with is
    /// the last thing that happened.
    lifecycle: Mutex<()>,
    finished: AtomicBool,
    /// Exec'd processes whose callers still wait for their status.
    execs: AtomicUsize,
}

fn prepare(options: MonitorOptions, cancel: &Cancel) -> Result<Monitor, RuntimeError> {
    let t0 = Instant::now();
    let container = options.container;
    let me = std::process::id() as i32;
    let mut record = container.load()?;
    record.pid = me;
    record.pid_start = state::process_start(me).map_or(0, |(start, _)| start);
    container.save(&record)?;
    if let Some(cpus) = &options.cpus {
        pin_to(cpus)?;
    }

    // Socket paths count against a 108-byte limit that a deep `--root` and
    // a 64-character id (containerd's, podman's) exceed: the monitor works
    // in the container's directory and names its sockets relative to it.
    std::env::set_current_dir(&container.dir)
        .map_err(|e| RuntimeError::io(format!("entering {}", container.dir.display()), e))?;
    let bundle = Bundle::load(&options.bundle)?;
    let guest_mounts = host_mounts::for_guest(bundle.spec.mounts().as_deref().unwrap_or(&[]))?;
    let root = root::prepare(&bundle, &options.image_cache, options.image_format)?;
    let templates = match template::boot_mode(&bundle.spec)? {
        BootMode::Template => options.templates.as_ref(),
        BootMode::Cold => None,
    };
    let mut sandbox = template::start(
        SandboxConfig {
            vm: options.vm,
            root: root.guest,
            shares: guest_mounts.shares,
            work_dir: PathBuf::from(state::VM_DIR),
            console: options
                .guest_console
                .map_or(ConsoleOutput::Null, ConsoleOutput::File),
            debug_guest: options.debug_guest,
        },
        templates,
        cancel,
    )?;
    let t_ready = Instant::now();
    let process = bundle.process().clone();
    let terminal = process.terminal().unwrap_or(false);
    sandbox.create_container(bundle.container_spec(root.source, guest_mounts.mounts, guest_mounts.files))?;
    let shared = Arc::new(Shared {
        container: container.clone(),
        sender: sandbox.sender(),
        streams: sandbox.streams(),
        pause: sandbox.pause_handle(),
        hooks: bundle.spec.hooks().clone(),
        routes: Mutex::default(),
        next_id: AtomicU64::new(1),
        lifecycle: Mutex::default(),
        finished: AtomicBool::new(false),
        execs: AtomicUsize::new(0),
    });
    let stdio = match (terminal, &options.console_socket) {
        (true, Some(socket)) => Stdio::Console(socket.clone()),
        _ => Stdio::Inherited,
    };
    let outputs = shared.attach(INIT_ID, &process, stdio)?;

    let state = record.oci_state(Status::Creating);
    shared.hook(HookKind::Prestart, &state)?;
    shared.hook(HookKind::CreateRuntime, &state)?;
    shared.hook(HookKind::CreateContainer, &state)?;

    let socket = container.control_socket();
    let listener = UnixListener::bind(state::CONTROL_SOCKET)
        .map_err(|e| RuntimeError::io(format!("binding {}", socket.display()), e))?;
    container.set_status(Status::Created, None)?;
    tracing::info!(
        boot_to_agent_ready_ms = (t_ready - t0).as_millis() as u64,
        create_ms = t_ready.elapsed().as_millis() as u64,
        "container created"
    );
    Ok(Monitor {
        sandbox,
        shared,
        listener,
        outputs,
    })
}

impl Monitor {
    /// Serves commands until the container's process exits; returns its status.
    fn serve(mut self) -> i32 {
        let shared = self.shared.clone();
        let listener = self.listener.try_clone();
        match listener {
            Ok(listener) => {
                let accept = std::thread::Builder::new().name("control".into()).spawn(move || {
                    for conn in listener.incoming().flatten() {
                        let shared = shared.clone();
                        let _ = std::thread::Builder::new()
                            .name("command".into())
                            .spawn(move || shared.serve_client(conn));
                    }
                });
                if let Err(e) = accept {
                    tracing::error!("starting the control thread: {e}");
                }
            }
            Err(e) => tracing::error!("control socket: {e}"),
        }

        let status = loop {
            match self.sandbox.next_event(None) {
                Some(Event::Agent(AgentMessage::Exited { id, status, error })) if id == INIT_ID => {
                    if let Some(error) = error {
                        tracing::warn!("{error}");
                    }
                    break status.shell_code();
                }
                Some(Event::Agent(msg)) => self.shared.deliver(msg),
                Some(Event::AgentGone(why)) => {
                    tracing::error!("the guest agent went away: {why}");
                    break VM_LOST_STATUS;
                }
                Some(Event::Vm(end)) => {
                    tracing::error!("{} while the container ran", describe_end(&end));
                    break VM_LOST_STATUS;
                }
                None => break VM_LOST_STATUS,
            }
        };
        self.finish(status)
    }

    fn finish(self, status: i32) -> i32 {
        // First, since a command waiting for the guest may hold the
        // lifecycle lock: it hears the container ended and lets go.
        self.shared.close_routes();
        // Output is complete when the agent reports the exit; when the
        // guest went away instead, its streams end with the VM.
        if status == VM_LOST_STATUS {
            self.sandbox.stop_handle().stop();
        }
        for o in self.outputs {
            let _ = o.join();
        }
        {
            let _held = self.shared.lock_lifecycle();
            if let Err(e) = self.shared.container.set_status(Status::Stopped, Some(status)) {
                tracing::error!("recording the exit: {e}");
            }
        }
        // Commands arriving from now on find no one and report the
        // container as not running.
        let _ = std::fs::remove_file(self.shared.container.control_socket());
        // Exec'd processes died with the container; their callers (a shim
        // waits on them) get a status rather than a closed connection.
        let deadline = Instant::now() + EXEC_ANSWER_GRACE;
        while self.shared.execs.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The guest holds nothing the host needs (its root is a read-only
        // image, its writes lived in guest memory): it is stopped, not shut
        // down, so the exit status reaches the caller without waiting.
        drop(self.sandbox);
        tracing::info!(status, "container exited");
        status
    }
}

/// Where a process's stdio comes from.
enum Stdio {
    /// The monitor's own stdin, stdout and stderr (`create`'s).
    Inherited,
    /// A new pty whose master goes to this console socket.
    Console(PathBuf),
    /// Descriptors a command passed: stdin, stdout, stderr.
    Passed(Vec<OwnedFd>),
}

impl Shared {
    fn lock_lifecycle(&self) -> MutexGuard<'_, ()> {
        self.lifecycle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hook(&self, kind: HookKind, state: &state::OciState) -> Result<(), RuntimeError> {
        match &self.hooks {
            Some(hooks) => run_hooks(hooks, kind, state),
            None => Ok(()),
        }
    }

    /// Where the agent's answers about `id` arrive. Once the container has
    /// ended none will: the receiver then reports that at once.
    fn route(&self, id: &str) -> Receiver<AgentMessage> {
        let (tx, rx) = mpsc::channel();
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if !self.finished.load(Ordering::SeqCst) {
            routes.insert(id.to_owned(), tx);
        }
        rx
    }

    /// Tells every command waiting for the guest that it will not answer.
    fn close_routes(&self) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        self.finished.store(true, Ordering::SeqCst);
        routes.clear();
    }

    fn unroute(&self, id: &str) {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    fn deliver(&self, msg: AgentMessage) {
        let Some(id) = message_id(&msg) else {
            return;
        };
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        // A failure naming a request nobody made is a Start whose id the
        // agent read garbled (seen on software-KVM hosts): the Start in
        // flight hears it and sends again, rather than waiting for an
        // answer that will not come. Other waiters are not told.
        if !id.is_empty() && matches!(msg, AgentMessage::Failed { .. }) && !routes.contains_key(id) {
            if let Some(tx) = routes.get(INIT_ID) {
                tracing::warn!(?msg, "the guest agent failed a request nobody made");
                let _ = tx.send(msg);
                return;
            }
        }
        // A failure the agent could not tie to a request: everyone waiting
        // hears it rather than waiting for an answer that will not come.
        if id.is_empty() {
            tracing::warn!(?msg, "the guest agent failed a request it could not identify");
            for tx in routes.values() {
                let _ = tx.send(msg.clone());
            }
            return;
        }
        match routes.get(id) {
            Some(tx) => {
                let _ = tx.send(msg);
            }
            None => tracing::debug!(?msg, "no one waits for this"),
        }
    }

    fn fresh_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn send(&self, msg: &HostMessage) -> Result<(), RuntimeError> {
        self.sender
            .send(msg)
            .map_err(|e| RuntimeError::Agent(format!("sending {msg:?}: {e}")))
    }

    fn serve_client(self: Arc<Self>, mut conn: UnixStream) {
        let fds = match control::recv_fds(&conn) {
            Ok(fds) => fds,
            Err(e) => {
                tracing::debug!("a command's connection: {e}");
                return;
            }
        };
        let request: Request = match read_frame(&mut conn) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                let _ = write_frame(
                    &mut conn,
                    &Response::error(&RuntimeError::io("reading the request", e)),
                );
                return;
            }
        };
        tracing::debug!(?request, "command");
        let response = match request {
            Request::Start => self.start().map(|()| Response::Ok),
            Request::Signal { signal, all, process } => {
                self.signal(signal, all, process).map(|()| Response::Ok)
            }
            Request::Exec {
                process,
                console_socket,
            } => {
                let stdio = match console_socket {
                    Some(socket) if process.terminal().unwrap_or(false) => Stdio::Console(socket),
                    _ => Stdio::Passed(fds),
                };
                return self.exec(conn, *process, stdio);
            }
            Request::Ps => self.ps(),
            Request::Pause => self.pause().map(|()| Response::Ok),
            Request::Resume => self.resume().map(|()| Response::Ok),
        };
        let response = response.unwrap_or_else(|e| Response::error(&e));
        let _ = write_frame(&mut conn, &response);
    }

    fn status(&self) -> Result<Status, RuntimeError> {
        if self.finished.load(Ordering::SeqCst) {
            return Ok(Status::Stopped);
        }
        Ok(self.container.load()?.status)
    }

    fn start(&self) -> Result<(), RuntimeError> {
        let _held = self.lock_lifecycle();
        let record = self.container.load()?;
        match self.status()? {
            Status::Created => {}
            Status::Stopped => return Err(state_error("cannot start a container that has stopped")),
            Status::Running | Status::Paused => {
                return Err(state_error("cannot start an already running container"))
            }
            Status::Creating => {
                return Err(state_error(
                    "cannot start a container that is still being created",
                ))
            }
        }
        self.hook(HookKind::StartContainer, &record.oci_state(Status::Created))?;
        let replies = self.route(INIT_ID);
        let reply = self.send_start(INIT_ID, &replies);
        self.unroute(INIT_ID);
        match reply? {
            AgentMessage::Started { .. } => {}
            AgentMessage::Failed { error, exit_code, .. } => {
                return Err(RuntimeError::Exec {
                    message: error,
                    code: exit_code,
                })
            }
            other => return Err(RuntimeError::Agent(format!("expected Started, got {other:?}"))),
        }
        let record = self.container.set_status(Status::Running, None)?;
        if let Err(e) = self.hook(HookKind::Poststart, &record.oci_state(Status::Running)) {
            // As runc: a container whose poststart failed does not go on.
            let _ = self.signal_now(INIT_ID, libc::SIGKILL, true);
            return Err(e);
        }
        Ok(())
    }

    fn signal(&self, signal: i32, all: bool, process: Option<String>) -> Result<(), RuntimeError> {
        let status = self.status()?;
        if status == Status::Stopped {
            return Err(state_error("container not running"));
        }
        // A frozen guest would hold SIGKILL until resumed: a kill means now.
        if signal == libc::SIGKILL && status == Status::Paused {
            self.resume()?;
        }
        let id = process.as_deref().unwrap_or(INIT_ID);
        self.signal_now(id, signal, all)
    }

    fn signal_now(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        self.send(&HostMessage::Signal {
            id: id.into(),
            signal,
            all,
        })
    }

    fn ps(&self) -> Result<Response, RuntimeError> {
        match self.status()? {
            Status::Stopped => return Err(state_error("container not running")),
            Status::Paused => return Err(state_error("cannot list the processes of a paused container")),
            _ => {}
        }
        let id = self.fresh_id("ps");
        let replies = self.route(&id);
        let reply = self
            .send(&HostMessage::ListProcesses { id: id.clone() })
            .and_then(|()| await_reply(&replies));
        self.unroute(&id);
        match reply? {
            AgentMessage::Processes { processes, .. } => Ok(Response::Processes { processes }),
            AgentMessage::Failed { error, .. } => Err(RuntimeError::Agent(error)),
            other => Err(RuntimeError::Agent(format!("expected Processes, got {other:?}"))),
        }
    }

    fn pause(&self) -> Result<(), RuntimeError> {
        let _held = self.lock_lifecycle();
        match self.status()? {
            Status::Running => {}
            Status::Paused => return Ok(()),
            _ => return Err(state_error("container not running")),
        }
        self.pause
            .pause()
            .map_err(|_| RuntimeError::VmEnded("the VM is gone".into()))?;
        self.container.set_status(Status::Paused, None).map(drop)
    }

    fn resume(&self) -> Result<(), RuntimeError> {
        let _held = self.lock_lifecycle();
        if self.status()? != Status::Paused {
            return Err(state_error("container not paused"));
        }
        self.pause
            .resume()
            .map_err(|_| RuntimeError::VmEnded("the VM is gone".into()))?;
        self.container.set_status(Status::Running, None).map(drop)
    }

    /// Runs a further process, answering `ExecStarted` and later `Exited`
    /// on `conn`. The connection is the process's lifeline: when the caller
    /// goes away before it exits, it is killed.
    fn exec(self: Arc<Self>, conn: UnixStream, process: Process, stdio: Stdio) {
        self.execs.fetch_add(1, Ordering::SeqCst);
        self.clone().run_exec(conn, process, stdio);
        self.execs.fetch_sub(1, Ordering::SeqCst);
    }

    fn run_exec(self: Arc<Self>, mut conn: UnixStream, process: Process, stdio: Stdio) {
        let id = self.fresh_id("exec");
        let replies = self.route(&id);
        let started = self.exec_start(&id, &replies, &process, stdio);
        let outputs = match started {
            Ok(outputs) => outputs,
            Err(e) => {
                self.unroute(&id);
                let _ = write_frame(&mut conn, &Response::error(&e));
                return;
            }
        };
        if write_frame(&mut conn, &Response::ExecStarted { id: id.clone() }).is_err() {
            let _ = self.signal_now(&id, libc::SIGKILL, false);
        }
        let done = Arc::new(AtomicBool::new(false));
        if let Ok(watch) = conn.try_clone() {
            let (me, id, done) = (self.clone(), id.clone(), done.clone());
            let _ = std::thread::Builder::new()
                .name("exec-lifeline".into())
                .spawn(move || {
                    let mut buf = [0u8; 64];
                    while matches!(io::Read::read(&mut &watch, &mut buf), Ok(n) if n > 0) {}
                    if !done.load(Ordering::SeqCst) {
                        tracing::debug!(%id, "the exec's caller went away; killing it");
                        let _ = me.signal_now(&id, libc::SIGKILL, false);
                    }
                });
        }
        let status = loop {
            match replies.recv() {
                Ok(AgentMessage::Exited { status, error, .. }) => {
                    if let Some(error) = error {
                        tracing::warn!(%id, "{error}");
                    }
                    break status.shell_code();
                }
                Ok(_) => {}
                // The container ended and took the process with it.
                Err(_) => break ExitStatus::Signal(libc::SIGKILL).shell_code(),
            }
        };
        done.store(true, Ordering::SeqCst);
        self.unroute(&id);
        for o in outputs {
            let _ = o.join();
        }
        let _ = write_frame(&mut conn, &Response::Exited { status });
    }

    /// Sends `Start` for `id` and waits for the answer on `replies`,
    /// sending it again while the agent's refusal shows it read something
    /// else (see `garbled_start`).
    fn send_start(&self, id: &str, replies: &Receiver<AgentMessage>) -> Result<AgentMessage, RuntimeError> {
        let mut retries = 0;
        loop {
            self.send(&HostMessage::Start { id: id.into() })?;
            let reply = await_reply(replies)?;
            match garbled_start(&reply, id) {
                Some(error) if retries < START_RETRIES => {
                    retries += 1;
                    tracing::warn!(
                        retries,
                        id,
                        "the guest agent refused Start ({error}); sending it again"
                    );
                    std::thread::sleep(START_RETRY_DELAY);
                }
                _ => return Ok(reply),
            }
        }
    }

    fn exec_start(
        self: &Arc<Self>,
        id: &str,
        replies: &Receiver<AgentMessage>,
        process: &Process,
        stdio: Stdio,
    ) -> Result<Vec<JoinHandle<()>>, RuntimeError> {
        match self.status()? {
            Status::Running => {}
            Status::Paused => return Err(state_error("cannot exec in a paused container")),
            Status::Stopped => return Err(state_error("cannot exec in a stopped container")),
            _ => {
                return Err(state_error(
                    "cannot exec in a container that has not been started",
                ))
            }
        }
        self.send(&HostMessage::Exec {
            id: id.into(),
            process: process.clone(),
        })?;
        match await_reply(replies)? {
            AgentMessage::Created { .. } => {}
            AgentMessage::Failed { error, exit_code, .. } => {
                return Err(RuntimeError::Exec {
                    message: error,
                    code: exit_code,
                })
            }
            other => return Err(RuntimeError::Agent(format!("expected Created, got {other:?}"))),
        }
        let outputs = match self.attach(id, process, stdio) {
            Ok(o) => o,
            Err(e) => {
                let _ = self.signal_now(id, libc::SIGKILL, false);
                return Err(e);
            }
        };
        match self.send_start(id, replies)? {
            AgentMessage::Started { .. } => Ok(outputs),
            AgentMessage::Failed { error, exit_code, .. } => Err(RuntimeError::Exec {
                message: error,
                code: exit_code,
            }),
            // It failed to execve and has already exited; the caller gets
            // the status with `Exited`.
            AgentMessage::Exited { status, error, .. } => Err(RuntimeError::Exec {
                message: error.unwrap_or_else(|| "the process exited at once".into()),
                code: status.shell_code(),
            }),
            other => Err(RuntimeError::Agent(format!("expected Started, got {other:?}"))),
        }
    }

    /// Connects process `id`'s guest streams to `stdio`; returns the output
    /// relays to join once it exited.
    fn attach(
        self: &Arc<Self>,
        id: &str,
        process: &Process,
        stdio: Stdio,
    ) -> Result<Vec<JoinHandle<()>>, RuntimeError> {
        let kinds = streams_for(process);
        let streams = self.streams.attach(id, kinds)?;
        let mut outputs = Vec::new();
        match stdio {
            Stdio::Console(socket) => {
                let pty = Pty::open()?;
                terminal::send_console(&socket, pty.master.as_fd())?;
                let slave = File::from(pty.slave);
                self.watch_size(id, slave.try_clone().map_err(|e| RuntimeError::io("pty", e))?);
                for (kind, stream) in kinds.iter().zip(streams) {
                    let end = slave.try_clone().map_err(|e| RuntimeError::io("pty", e))?;
                    match kind {
                        StreamKind::Stdin => relay::input(end, stream)?,
                        _ => outputs.push(relay::output(stream, end, None)?),
                    }
                }
            }
            Stdio::Inherited => {
                if process.terminal().unwrap_or(false) {
                    if let Ok(stdin) = File::open("/proc/self/fd/0") {
                        self.watch_size(id, stdin);
                    }
                }
                for (kind, stream) in kinds.iter().zip(streams) {
                    match kind {
                        StreamKind::Stdin => relay::input(io::stdin(), stream)?,
                        StreamKind::Stdout => outputs.push(relay::output(stream, io::stdout(), None)?),
                        StreamKind::Stderr => outputs.push(relay::output(stream, io::stderr(), None)?),
                    }
                }
            }
            Stdio::Passed(fds) => {
                let mut fds = fds.into_iter().map(File::from);
                let (stdin, stdout) = (fds.next(), fds.next());
                let stderr = fds
                    .next()
                    .or_else(|| stdout.as_ref().and_then(|f| f.try_clone().ok()));
                if process.terminal().unwrap_or(false) {
                    if let Some(f) = stdin.as_ref().and_then(|f| f.try_clone().ok()) {
                        self.watch_size(id, f);
                    }
                }
                let mut ends = [stdin, stdout, stderr];
                for (kind, stream) in kinds.iter().zip(streams) {
                    let slot = match kind {
                        StreamKind::Stdin => 0,
                        StreamKind::Stdout => 1,
                        StreamKind::Stderr => 2,
                    };
                    match (kind, ends[slot].take()) {
                        (StreamKind::Stdin, Some(f)) => relay::input(f, stream)?,
                        // No stdin given: the process reads end of file.
                        (StreamKind::Stdin, None) => drop(stream),
                        (_, Some(f)) => outputs.push(relay::output(stream, f, None)?),
                        (_, None) => outputs.push(relay::output(stream, io::sink(), None)?),
                    }
                }
            }
        }
        Ok(outputs)
    }

    /// Passes the window size of the terminal on `tty` to process `id`'s
    /// terminal whenever it changes, until the container ends.
    fn watch_size(self: &Arc<Self>, id: &str, tty: File) {
        if !terminal::is_terminal(&tty) {
            return;
        }
        let me = self.clone();
        let id = id.to_owned();
        let _ = std::thread::Builder::new().name("winsize".into()).spawn(move || {
            let mut last = None;
            loop {
                let exec_ended = id != INIT_ID
                    && !me
                        .routes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains_key(&id);
                if exec_ended || me.finished.load(Ordering::SeqCst) {
                    return;
                }
                let size = terminal::window_size(tty.as_fd());
                if size.is_some() && size != last {
                    let (rows, cols) = size.unwrap_or_default();
                    let resize = HostMessage::ResizeTerminal {
                        id: id.clone(),
                        rows,
                        cols,
                    };
                    if me.sender.send(&resize).is_err() {
                        return;
                    }
                    last = size;
                }
                std::thread::sleep(RESIZE_POLL);
            }
        });
    }
}

fn await_reply(replies: &Receiver<AgentMessage>) -> Result<AgentMessage, RuntimeError> {
    replies.recv_timeout(AGENT_ANSWER_TIMEOUT).map_err(|e| match e {
        mpsc::RecvTimeoutError::Disconnected => {
            state_error("the container stopped before the guest answered")
        }
        mpsc::RecvTimeoutError::Timeout => RuntimeError::Agent(format!(
            "no answer from the guest within {} s",
            AGENT_ANSWER_TIMEOUT.as_secs()
        )),
    })
}

fn state_error(message: &str) -> RuntimeError {
    RuntimeError::State(message.into())
}

/// Keeps this process (and the vCPU threads it starts) on `cpus`.
fn pin_to(cpus: &[usize]) -> Result<(), RuntimeError> {
    let mut set = nix::sched::CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)
            .map_err(|e| RuntimeError::Bundle(format!("cpu {cpu} in linux.resources.cpu.cpus: {e}")))?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| RuntimeError::io(format!("pinning to cpus {cpus:?}"), e.into()))
}

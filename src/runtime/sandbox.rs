//! A booted microVM with its agent on the line: the host end of the
//! skiff protocol. The OCI commands and `skiff boot --bundle` are built on it.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use skiff_protocol::{
    read_frame, write_frame, AgentMessage, ContainerSpec, HostMessage, Process, StreamHello, StreamKind,
    Timings, ALREADY_CREATED, CONTROL_PORT, PROVISION_ENTROPY_BYTES, PROVISION_ID, ROOT_TAG, STREAM_PORT,
    VERSION,
};

use super::error::RuntimeError;
use super::root::GuestRoot;
use crate::vmm::{
    self, BlockConfig, BootSource, ConsoleOutput, CpuProfile, FsConfig, MemorySize, ShareFlags,
    SnapshotHandle, StopHandle, Vm, VmConfig, VmExit, VsockConfig,
};

/// The guest's vsock CID. Every VM has its own device and host socket, so
/// all of them can use the first unreserved one.
const GUEST_CID: u32 = 3;
/// How often, and how far apart, a `Start` the agent refused without
/// naming the process is sent again.
pub const START_RETRIES: u32 = 20;
pub const START_RETRY_DELAY: Duration = Duration::from_millis(250);
/// How long the agent may take to power the VM off after `Shutdown`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long a restored guest's agent has to reconnect. It takes about
/// 0.1 s even on software KVM; one that has not after this long never
/// will (such a guest has been seen idle with its agent asleep), and the
/// caller boots cold instead.
const RESTORE_RECONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The machine a container gets, whatever it runs.
#[derive(Clone, Debug)]
pub struct VmResources {
    pub kernel: PathBuf,
    /// The agent's initramfs.
    pub initrd: PathBuf,
    pub vcpus: u8,
    pub memory: MemorySize,
    pub cpu_profile: Option<CpuProfile>,
    pub kvm_device: PathBuf,
}

/// What the VM is made of.
#[derive(Debug)]
pub struct SandboxConfig {
    pub vm: VmResources,
    pub root: GuestRoot,
    /// Host directories the container's bind mounts share.
    pub shares: Vec<FsConfig>,
    /// A directory this sandbox creates for its sockets and removes again.
    pub work_dir: PathBuf,
    pub console: ConsoleOutput,
    /// The agent logs every step on the console.
    pub debug_guest: bool,
}

impl SandboxConfig {
    /// The VM's configuration, its vsock device on `uds_path`.
    pub fn into_vm_config(self, uds_path: &Path) -> VmConfig {
        let cmdline = guest_cmdline(self.debug_guest);
        let vm = self.vm;
        let mut vm_config = VmConfig::new(BootSource::Linux {
            kernel: vm.kernel,
            initrd: Some(vm.initrd),
            cmdline,
        });
        vm_config.vcpus = vm.vcpus;
        vm_config.memory = vm.memory;
        vm_config.cpu_profile = vm.cpu_profile;
        vm_config.kvm_device = vm.kvm_device;
        vm_config.console = self.console;
        match self.root {
            GuestRoot::Image(path) => vm_config.block_devices.push(BlockConfig {
                path,
                // One cached image serves every container made from the same
                // rootfs; the guest writes to an overlay instead.
                read_only: true,
                id: "skiff-root".into(),
            }),
            // The container's writes land in the directory; its mounts'
            // mount points are made there too, so it is writable even for
            // a read-only root, which the guest seals after the mounts.
            GuestRoot::Shared(dir) => vm_config.shared_dirs.push(FsConfig {
                tag: ROOT_TAG.into(),
                shared_dir: dir,
                flags: ShareFlags {
                    read_only: false,
                    recursive: true,
                },
            }),
        }
        vm_config.shared_dirs.extend(self.shares);
        vm_config.vsock = Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds_path.to_owned(),
        });
        vm_config
    }

    /// The same configuration again, unless its console is a writer.
    pub fn try_clone(&self) -> Option<SandboxConfig> {
        Some(SandboxConfig {
            vm: self.vm.clone(),
            root: self.root.clone(),
            shares: self.shares.clone(),
            work_dir: self.work_dir.clone(),
            console: self.console.try_clone()?,
            debug_guest: self.debug_guest,
        })
    }
}

/// The guest kernel's command line before the VMM adds the CPU profile's
/// and the devices' arguments.
pub fn guest_cmdline(debug_guest: bool) -> String {
    let mut cmdline = vmm::DEFAULT_CMDLINE.to_owned();
    if debug_guest {
        cmdline.push(' ');
        cmdline.push_str(skiff_protocol::DEBUG_FLAG);
    }
    cmdline
}

/// Something the sandbox has to report.
#[derive(Debug)]
pub enum Event {
    Agent(AgentMessage),
    /// The control connection ended.
    AgentGone(String),
    Vm(Result<VmExit, String>),
}

/// A running microVM whose agent said it is ready.
pub struct Sandbox {
    control: Arc<Mutex<UnixStream>>,
    events: Receiver<Event>,
    /// Events read while waiting for something else, handed out first.
    pending: VecDeque<Event>,
    stop: StopHandle,
    pause: vmm::PauseHandle,
    snapshot: SnapshotHandle,
    vm_thread: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    uds_path: PathBuf,
    work_dir: PathBuf,
    vm_ended: Option<Result<VmExit, String>>,
    /// When the VM started and when the agent said it was ready.
    pub booted_at: Instant,
    pub ready_at: Instant,
    /// The agent's own count of milliseconds since the guest booted.
    pub guest_uptime_ms: u64,
}

/// Cancels a boot in progress from another thread (a signal, say).
#[derive(Clone, Default)]
pub struct Cancel(Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// How the VM comes to be.
#[derive(Debug, Clone)]
pub enum Launch {
    /// The kernel boots.
    Boot,
    /// The snapshot in this directory is restored (see `Sandbox::snapshot`).
    Restore(PathBuf),
}

impl Sandbox {
    /// Boots the VM, waits for its agent, and provisions it.
    pub fn boot(config: SandboxConfig, cancel: &Cancel) -> Result<Sandbox, RuntimeError> {
        let mut sandbox = Sandbox::launch(config, Launch::Boot, cancel)?;
        sandbox.provision()?;
        Ok(sandbox)
    }

    /// Makes the VM and waits for its agent's `Ready`; the agent then
    /// waits for [`provision`](Self::provision), and this is the moment a
    /// template is [snapshotted](Self::snapshot).
    pub fn launch(config: SandboxConfig, launch: Launch, cancel: &Cancel) -> Result<Sandbox, RuntimeError> {
        std::fs::create_dir_all(&config.work_dir)
            .map_err(|e| RuntimeError::io(format!("creating {}", config.work_dir.display()), e))?;
        // From here on a failure must remove the work dir again.
        let guard = WorkDir(Some(config.work_dir.clone()));
        let uds_path = config.work_dir.join("vsock.sock");
        let control_path = port_path(&uds_path, CONTROL_PORT);
        let listener = UnixListener::bind(&control_path)
            .map_err(|e| RuntimeError::io(format!("binding {}", control_path.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| RuntimeError::io("control socket", e))?;

        let vm_config = config.into_vm_config(&uds_path);

        // Before the VM exists: from its start on, nothing may fail
        // between starting it and owning it in a `Sandbox` that stops it.
        let placeholder = placeholder_stream()?;
        let vm = match &launch {
            Launch::Boot => Vm::create(vm_config)?,
            Launch::Restore(dir) => Vm::restore(vm_config, dir)?,
        };
        let booted_at = Instant::now();
        let running = vm.start()?;
        let stop = running.stop_handle();
        let pause = running.pause_handle();
        let snapshot = running.snapshot_handle();
        let (tx, events) = mpsc::channel();
        let vm_tx = tx.clone();
        let vm_thread = std::thread::Builder::new()
            .name("vm-wait".into())
            .spawn(move || {
                let _ = vm_tx.send(Event::Vm(running.wait().map_err(|e| e.to_string())));
            })
            // Dropping the closure (and the VM in it) stops and joins the vCPUs.
            .map_err(|e| RuntimeError::io("starting the VM thread", e))?;
        let mut sandbox = Sandbox {
            control: Arc::new(Mutex::new(placeholder)),
            events,
            pending: VecDeque::new(),
            stop,
            pause,
            snapshot,
            vm_thread: Some(vm_thread),
            reader: None,
            uds_path,
            work_dir: guard.release(),
            vm_ended: None,
            booted_at,
            ready_at: booted_at,
            guest_uptime_ms: 0,
        };
        let deadline = match launch {
            Launch::Boot => None,
            Launch::Restore(_) => Some(Instant::now() + RESTORE_RECONNECT_TIMEOUT),
        };
        let mut control = sandbox.accept_agent(&listener, cancel, deadline)?;
        drop(listener);
        let _ = std::fs::remove_file(&control_path);
        match read_frame::<_, AgentMessage>(&mut control) {
            Ok(Some(AgentMessage::Ready { version, uptime_ms })) if version == VERSION => {
                sandbox.ready_at = Instant::now();
                sandbox.guest_uptime_ms = uptime_ms;
            }
            Ok(Some(AgentMessage::Ready { version, .. })) => {
                return Err(RuntimeError::Agent(format!(
                    "the guest agent speaks protocol version {version}, this skiff speaks {VERSION}: \
                     rebuild the agent initramfs"
                )))
            }
            Ok(other) => return Err(RuntimeError::Agent(format!("expected Ready, got {other:?}"))),
            Err(e) => return Err(RuntimeError::Agent(format!("reading Ready: {e}"))),
        }
        let reader_stream = control
            .try_clone()
            .map_err(|e| RuntimeError::io("control socket", e))?;
        sandbox.control = Arc::new(Mutex::new(control));
        sandbox.reader = Some(
            std::thread::Builder::new()
                .name("agent-control".into())
                .spawn(move || read_agent(reader_stream, tx))
                .map_err(|e| RuntimeError::io("starting the agent reader", e))?,
        );
        Ok(sandbox)
    }

    /// Sends what makes this VM unlike any other from the same snapshot
    /// (fresh entropy, the time) and checks the guest's vsock CID.
    pub fn provision(&mut self) -> Result<(), RuntimeError> {
        let mut entropy = vec![0u8; PROVISION_ENTROPY_BYTES];
        fill_random(&mut entropy)?;
        let realtime_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.send(&HostMessage::Provision { entropy, realtime_ns })?;
        match self.expect(PROVISION_ID)? {
            AgentMessage::Provisioned { cid } if cid == GUEST_CID => Ok(()),
            AgentMessage::Provisioned { cid } => Err(RuntimeError::Agent(format!(
                "the guest's vsock CID is {cid}, not {GUEST_CID}: it did not re-read it"
            ))),
            AgentMessage::Failed { error, .. } => {
                Err(RuntimeError::Agent(format!("provisioning the guest: {error}")))
            }
            other => Err(RuntimeError::Agent(format!(
                "expected Provisioned, got {other:?}"
            ))),
        }
    }

    /// Writes the VM to `dir` (see `vmm::RunningVm::snapshot`) and leaves
    /// it paused.
    pub fn snapshot(&self, dir: &Path) -> Result<(), RuntimeError> {
        self.snapshot.snapshot(dir).map_err(RuntimeError::from)
    }

    fn accept_agent(
        &mut self,
        listener: &UnixListener,
        cancel: &Cancel,
        deadline: Option<Instant>,
    ) -> Result<UnixStream, RuntimeError> {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| RuntimeError::io("control socket", e))?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(RuntimeError::io("accepting the agent's connection", e)),
            }
            if cancel.is_cancelled() {
                return Err(RuntimeError::VmEnded("cancelled while booting".into()));
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(RuntimeError::Agent(format!(
                    "the restored guest's agent did not reconnect within {} s",
                    RESTORE_RECONNECT_TIMEOUT.as_secs()
                )));
            }
            match self.events.recv_timeout(Duration::from_millis(20)) {
                Ok(Event::Vm(end)) => {
                    let what = describe_end(&end);
                    self.vm_ended = Some(end);
                    return Err(RuntimeError::VmEnded(format!(
                        "{what} before its agent connected (the guest console shows why)"
                    )));
                }
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(RuntimeError::VmEnded("the VM thread is gone".into()))
                }
            }
        }
    }

    /// Sends one message on the control connection.
    pub fn send(&self, msg: &HostMessage) -> Result<(), RuntimeError> {
        self.sender()
            .send(msg)
            .map_err(|e| RuntimeError::Agent(format!("sending {msg:?}: {e}")))
    }

    /// A handle that can send messages from another thread (signal forwarding).
    pub fn sender(&self) -> ControlSender {
        ControlSender(self.control.clone())
    }

    /// The next event, or `None` after `timeout`. Once every source of
    /// events is gone, that is reported as the VM's end.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Option<Event> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        let event = match timeout {
            Some(t) => match self.events.recv_timeout(t) {
                Ok(e) => Some(e),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => Some(gone()),
            },
            None => Some(self.events.recv().unwrap_or_else(|_| gone())),
        };
        if let Some(Event::Vm(end)) = &event {
            self.vm_ended = Some(end.clone());
        }
        event
    }

    /// Waits for the agent's answer about `id`, failing if the VM or agent
    /// goes away first. Other messages (exits of other processes, say) are
    /// kept for `next_event`.
    pub fn expect(&mut self, id: &str) -> Result<AgentMessage, RuntimeError> {
        self.answer(id)?.map_err(RuntimeError::Agent)
    }

    /// As `expect`, with the agent's refusal of a request it could not
    /// read (a `Failed` without an id) as the inner error.
    fn answer(&mut self, id: &str) -> Result<Result<AgentMessage, String>, RuntimeError> {
        let mut other = Vec::new();
        let result = loop {
            match self.next_event(None) {
                Some(Event::Agent(msg)) if message_id(&msg) == Some(id) => break Ok(Ok(msg)),
                Some(Event::Agent(AgentMessage::Failed { id, error, .. })) if id.is_empty() => {
                    break Ok(Err(error))
                }
                Some(Event::Agent(msg)) => other.push(Event::Agent(msg)),
                Some(Event::AgentGone(why)) => break Err(RuntimeError::Agent(why)),
                Some(Event::Vm(end)) => break Err(RuntimeError::VmEnded(describe_end(&end))),
                None => break Err(RuntimeError::Agent("no events".into())),
            }
        };
        self.pending.extend(other);
        result
    }

    /// Prepares the container; on success its process waits for `start`.
    pub fn create_container(&mut self, spec: ContainerSpec) -> Result<Created, RuntimeError> {
        self.send(&HostMessage::CreateContainer(spec))?;
        self.created(skiff_protocol::INIT_ID)
    }

    /// Prepares a further process in the running container.
    pub fn exec(&mut self, id: &str, process: Process) -> Result<Created, RuntimeError> {
        self.send(&HostMessage::Exec {
            id: id.into(),
            process,
        })?;
        self.created(id)
    }

    fn created(&mut self, id: &str) -> Result<Created, RuntimeError> {
        match self.expect(id)? {
            AgentMessage::Created { pid, timings, .. } => Ok(Created { pid, timings }),
            AgentMessage::Failed { error, exit_code, .. } => Err(RuntimeError::Exec {
                message: error,
                code: exit_code,
            }),
            other => Err(RuntimeError::Agent(format!(
                "expected Created for {id}, got {other:?}"
            ))),
        }
    }

    /// Opens the stdio streams of process `id`, in the order given.
    pub fn attach(&self, id: &str, kinds: &[StreamKind]) -> Result<Vec<UnixStream>, RuntimeError> {
        self.streams().attach(id, kinds)
    }

    /// Opens stdio streams from any thread.
    pub fn streams(&self) -> StreamOpener {
        StreamOpener {
            uds_path: self.uds_path.clone(),
        }
    }

    /// Lets process `id` run.
    pub fn start(&mut self, id: &str) -> Result<(), RuntimeError> {
        let mut retries = 0;
        let reply = loop {
            self.send(&HostMessage::Start { id: id.into() })?;
            let reply = match self.answer(id)? {
                Ok(msg) => garbled_start(&msg, id).map_or(Ok(msg), Err),
                Err(error) => Err(error),
            };
            match reply {
                Ok(msg) => break msg,
                Err(error) if retries < START_RETRIES => {
                    retries += 1;
                    tracing::warn!(
                        retries,
                        "the guest agent refused Start ({error}); sending it again"
                    );
                    std::thread::sleep(START_RETRY_DELAY);
                }
                Err(error) => return Err(RuntimeError::Agent(error)),
            }
        };
        match reply {
            AgentMessage::Started { .. } => Ok(()),
            AgentMessage::Failed { error, exit_code, .. } => Err(RuntimeError::Exec {
                message: error,
                code: exit_code,
            }),
            // Killed before it started (a forwarded signal): the caller
            // waits for this exit, so it goes back to the front of the line.
            exited @ AgentMessage::Exited { .. } => {
                self.pending.push_front(Event::Agent(exited));
                Ok(())
            }
            other => Err(RuntimeError::Agent(format!(
                "expected Started for {id}, got {other:?}"
            ))),
        }
    }

    /// Tells the agent the host is done, and waits for the VM to end.
    pub fn shutdown(mut self) -> Result<VmExit, RuntimeError> {
        let _ = self.send(&HostMessage::Shutdown);
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while self.vm_ended.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("the guest did not power off after Shutdown; stopping it");
                self.stop.stop();
            }
            let _ = self.next_event(Some(left.max(Duration::from_millis(100))));
        }
        match self.vm_ended.clone().expect("set above") {
            Ok(end) => Ok(end),
            Err(e) => Err(RuntimeError::VmEnded(e)),
        }
    }

    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Pauses and resumes the VM from any thread.
    pub fn pause_handle(&self) -> vmm::PauseHandle {
        self.pause.clone()
    }

    /// Freezes the whole microVM (every process in it, the agent included):
    /// returns once no vCPU runs guest code. Pausing a paused sandbox does
    /// nothing. The agent answers nothing until `resume`.
    pub fn pause(&self) -> Result<(), RuntimeError> {
        self.pause
            .pause()
            .map_err(|_| RuntimeError::VmEnded("it cannot be paused".into()))
    }

    /// Lets a paused microVM go on where it was. Resuming a running sandbox
    /// does nothing.
    pub fn resume(&self) -> Result<(), RuntimeError> {
        self.pause
            .resume()
            .map_err(|_| RuntimeError::VmEnded("it cannot be resumed".into()))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.vm_thread.take() {
            let _ = t.join();
        }
        // The control socket closes with the VM's vsock device; the reader then ends.
        if let Ok(c) = self.control.lock() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

/// Opens a process's stdio streams through the VM's vsock socket.
#[derive(Clone)]
pub struct StreamOpener {
    uds_path: PathBuf,
}

impl StreamOpener {
    /// Opens the stdio streams of process `id`, in the order given.
    pub fn attach(&self, id: &str, kinds: &[StreamKind]) -> Result<Vec<UnixStream>, RuntimeError> {
        kinds
            .iter()
            .map(|&kind| {
                let mut s = connect_guest_port(&self.uds_path, STREAM_PORT)?;
                write_frame(&mut s, &StreamHello { id: id.into(), kind })
                    .map_err(|e| RuntimeError::Agent(format!("opening the {kind:?} stream: {e}")))?;
                Ok(s)
            })
            .collect()
    }
}

/// A process the agent created.
#[derive(Debug, Clone, Copy)]
pub struct Created {
    pub pid: i32,
    pub timings: Timings,
}

/// Sends control messages from any thread.
#[derive(Clone)]
pub struct ControlSender(Arc<Mutex<UnixStream>>);

impl ControlSender {
    pub fn send(&self, msg: &HostMessage) -> io::Result<()> {
        tracing::debug!(?msg, "to the agent");
        let mut control = self.0.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *control, msg)
    }
}

fn read_agent(mut stream: UnixStream, tx: Sender<Event>) {
    loop {
        match read_frame::<_, AgentMessage>(&mut stream) {
            Ok(Some(msg)) => {
                tracing::debug!(?msg, "from the agent");
                if tx.send(Event::Agent(msg)).is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = tx.send(Event::AgentGone("the agent closed the control connection".into()));
                return;
            }
            Err(e) => {
                let _ = tx.send(Event::AgentGone(format!("reading from the agent: {e}")));
                return;
            }
        }
    }
}

fn gone() -> Event {
    Event::Vm(Err("the VM's thread is gone".into()))
}

pub fn message_id(msg: &AgentMessage) -> Option<&str> {
    match msg {
        AgentMessage::Ready { .. } => None,
        AgentMessage::Provisioned { .. } => Some(PROVISION_ID),
        AgentMessage::Created { id, .. }
        | AgentMessage::Started { id }
        | AgentMessage::Failed { id, .. }
        | AgentMessage::Exited { id, .. }
        | AgentMessage::Processes { id, .. } => Some(id),
    }
}

pub fn describe_end(end: &Result<VmExit, String>) -> String {
    match end {
        Ok(VmExit::GuestReset) => "the guest powered off".into(),
        Ok(VmExit::TripleFault) => "the guest crashed (triple fault)".into(),
        Ok(VmExit::GuestPanic) => "the guest kernel panicked".into(),
        Ok(VmExit::Stopped) => "the VM was stopped".into(),
        Err(e) => format!("the VMM failed: {e}"),
    }
}

/// `<socket>_<port>`: where a guest connection to host port `port` arrives.
pub fn port_path(uds: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", uds.display()))
}

/// Connects to a guest port through the vsock device's host socket.
pub fn connect_guest_port(uds: &Path, port: u32) -> Result<UnixStream, RuntimeError> {
    let err = |e: io::Error| RuntimeError::Agent(format!("connecting to guest port {port}: {e}"));
    let mut s = UnixStream::connect(uds).map_err(err)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(err)?;
    // Byte by byte: what follows the line is already the stream.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        match s.read(&mut byte).map_err(err)? {
            0 => {
                return Err(RuntimeError::Agent(format!(
                    "guest port {port} refused the connection (nothing listens there)"
                )))
            }
            _ => line.push(byte[0]),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(RuntimeError::Agent(format!(
            "unexpected answer to CONNECT {port}: {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    Ok(s)
}

/// Whether `reply` to the `Start` of `started` says the agent read
/// something else:
/// right after `create` an agent sometimes reads a garbled request, or the
/// `CreateContainer` before it again, while the process is in fact there
/// and waiting (a defect of software-KVM hosts in the guest's memory); a
/// later `Start` is taken. Returns the refusal.
pub fn garbled_start(reply: &AgentMessage, started: &str) -> Option<String> {
    match reply {
        AgentMessage::Failed { id, error, .. } if id != started || error == ALREADY_CREATED => {
            Some(error.clone())
        }
        _ => None,
    }
}

/// Fills `buf` from the kernel's generator.
fn fill_random(buf: &mut [u8]) -> Result<(), RuntimeError> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom writes at most the given length into the slice.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(RuntimeError::io("getrandom", e));
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

/// A connected-but-unused stream to fill the control slot until the agent connects.
fn placeholder_stream() -> Result<UnixStream, RuntimeError> {
    UnixStream::pair()
        .map(|(a, _)| a)
        .map_err(|e| RuntimeError::io("socketpair", e))
}

/// Removes the directory unless released.
struct WorkDir(Option<PathBuf>);

impl WorkDir {
    fn release(mut self) -> PathBuf {
        self.0.take().expect("released once")
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

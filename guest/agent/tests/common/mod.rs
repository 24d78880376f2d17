//! A fake host: drives an agent running in this process (hosted mode) over
//! Unix sockets with the real protocol.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use skiff_agent::{Address, Config, Mode};
use skiff_protocol::{
    read_frame, write_frame, AgentMessage, ContainerSpec, ExitStatus, HostMessage, Mount, Process,
    ProcessInfo, RootFs, RootSource, StagedFile, StreamHello, StreamKind, INIT_ID,
};

/// Long enough for a loaded machine, short enough that a hang fails.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("skiff-agent-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Host {
    pub dir: TempDir,
    control: UnixStream,
    streams_path: PathBuf,
    agent: Option<JoinHandle<Result<(), String>>>,
    backlog: VecDeque<AgentMessage>,
}

/// A process's streams as the host holds them.
pub struct Streams {
    pub stdin: Option<UnixStream>,
    stdout: JoinHandle<Vec<u8>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Streams {
    pub fn write_stdin(&mut self, data: &[u8]) {
        self.stdin
            .as_mut()
            .expect("stdin is open")
            .write_all(data)
            .unwrap();
    }

    /// End of stdin for the process.
    pub fn close_stdin(&mut self) {
        if let Some(s) = self.stdin.take() {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
    }

    /// Everything the process wrote, once the agent ended the streams.
    pub fn output(self) -> (Vec<u8>, Vec<u8>) {
        let out = self.stdout.join().unwrap();
        let err = self.stderr.map(|h| h.join().unwrap()).unwrap_or_default();
        (out, err)
    }
}

/// How a process went, as the host saw it.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub error: Option<String>,
    pub stdout: String,
    pub stderr: String,
}

pub fn process(args: &[&str]) -> Process {
    let mut p = Process::default();
    p.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
    p.set_capabilities(None);
    p.set_no_new_privileges(None);
    p
}

pub fn sh(script: &str) -> Process {
    process(&["sh", "-c", script])
}

impl Host {
    /// Starts an agent whose container root is `root`.
    pub fn new(root: &Path) -> Host {
        let dir = TempDir::new("host");
        let control_path = dir.path().join("control.sock");
        let streams_path = dir.path().join("streams.sock");
        let listener = UnixListener::bind(&control_path).unwrap();
        let config = Config {
            control: Address::Unix(control_path),
            streams: Address::Unix(streams_path.clone()),
            mode: Mode::Hosted {
                root: root.to_path_buf(),
            },
            debug: std::env::var_os("SKIFF_AGENT_DEBUG").is_some(),
        };
        let agent = std::thread::spawn(move || skiff_agent::run(config));
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let control = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the agent never connected");
                    assert!(!agent.is_finished(), "the agent ended: {:?}", agent.join());
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        control.set_nonblocking(false).unwrap();
        control.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut host = Host {
            dir,
            control,
            streams_path,
            agent: Some(agent),
            backlog: VecDeque::new(),
        };
        match host.recv() {
            AgentMessage::Ready { version, .. } => assert_eq!(version, skiff_protocol::VERSION),
            other => panic!("expected Ready, got {other:?}"),
        }
        host.send(&HostMessage::Provision {
            entropy: vec![7; skiff_protocol::PROVISION_ENTROPY_BYTES],
            realtime_ns: 0,
        });
        match host.recv() {
            // Over a Unix socket there is no CID.
            AgentMessage::Provisioned { cid } => assert_eq!(cid, 0),
            other => panic!("expected Provisioned, got {other:?}"),
        }
        host
    }

    pub fn send(&mut self, msg: &HostMessage) {
        write_frame(&mut self.control, msg).unwrap();
    }

    fn read(&mut self) -> AgentMessage {
        match read_frame(&mut self.control) {
            Ok(Some(msg)) => msg,
            Ok(None) => panic!("the agent closed the control connection"),
            Err(e) => panic!("reading from the agent: {e}"),
        }
    }

    pub fn recv(&mut self) -> AgentMessage {
        self.backlog.pop_front().unwrap_or_else(|| self.read())
    }

    /// The first message `pick` accepts; the others stay queued in order.
    pub fn expect<T>(&mut self, what: &str, pick: impl Fn(&AgentMessage) -> Option<T>) -> T {
        if let Some(i) = self.backlog.iter().position(|m| pick(m).is_some()) {
            let msg = self.backlog.remove(i).unwrap();
            return pick(&msg).unwrap();
        }
        loop {
            let msg = self.read();
            if let Some(found) = pick(&msg) {
                return found;
            }
            eprintln!("(while waiting for {what}: {msg:?})");
            self.backlog.push_back(msg);
        }
    }

    /// Created → Ok(pid), Failed → Err((error, exit_code)).
    fn created(&mut self, id: &str) -> Result<i32, (String, i32)> {
        self.expect(&format!("Created/Failed of {id}"), |m| match m {
            AgentMessage::Created { id: i, pid, .. } if i == id => Some(Ok(*pid)),
            AgentMessage::Failed {
                id: i,
                error,
                exit_code,
            } if i == id => Some(Err((error.clone(), *exit_code))),
            _ => None,
        })
    }

    pub fn create_spec(&mut self, mounts: Vec<Mount>, process: Process) -> Result<i32, (String, i32)> {
        self.create_staged(Vec::new(), mounts, process)
    }

    /// A container whose mounts may bind the staged `files`.
    pub fn create_staged(
        &mut self,
        files: Vec<StagedFile>,
        mounts: Vec<Mount>,
        process: Process,
    ) -> Result<i32, (String, i32)> {
        self.send(&HostMessage::CreateContainer(ContainerSpec {
            root: RootFs {
                source: RootSource::Shared { tag: "unused".into() },
                readonly: false,
            },
            hostname: Some("skiff-test".into()),
            mounts,
            files,
            process,
        }));
        self.created(INIT_ID)
    }

    pub fn create(&mut self, process: Process) -> Result<i32, (String, i32)> {
        self.create_spec(Vec::new(), process)
    }

    pub fn exec(&mut self, id: &str, process: Process) -> Result<i32, (String, i32)> {
        self.send(&HostMessage::Exec {
            id: id.into(),
            process,
        });
        self.created(id)
    }

    fn connect(&self, id: &str, kind: StreamKind) -> UnixStream {
        let mut s = UnixStream::connect(&self.streams_path).unwrap();
        write_frame(&mut s, &StreamHello { id: id.into(), kind }).unwrap();
        s
    }

    /// Opens the process's streams as the host does.
    pub fn attach(&self, id: &str, terminal: bool) -> Streams {
        let stdin = self.connect(id, StreamKind::Stdin);
        let reader = |mut s: UnixStream| {
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).expect("reading an output stream");
                buf
            })
        };
        let stdout = reader(self.connect(id, StreamKind::Stdout));
        let stderr = (!terminal).then(|| reader(self.connect(id, StreamKind::Stderr)));
        Streams {
            stdin: Some(stdin),
            stdout,
            stderr,
        }
    }

    pub fn start(&mut self, id: &str) {
        self.send(&HostMessage::Start { id: id.into() });
        self.expect(&format!("Started of {id}"), |m| match m {
            AgentMessage::Started { id: i } if i == id => Some(()),
            AgentMessage::Failed { id: i, error, .. } if i == id => panic!("Start of {id} failed: {error}"),
            _ => None,
        })
    }

    pub fn exited(&mut self, id: &str) -> (ExitStatus, Option<String>) {
        self.expect(&format!("Exited of {id}"), |m| match m {
            AgentMessage::Exited { id: i, status, error } if i == id => Some((*status, error.clone())),
            _ => None,
        })
    }

    /// The agent's answer to `ListProcesses`.
    pub fn list_processes(&mut self, request: &str) -> Vec<ProcessInfo> {
        self.send(&HostMessage::ListProcesses { id: request.into() });
        self.expect(&format!("Processes of {request}"), |m| match m {
            AgentMessage::Processes { id, processes } if id == request => Some(processes.clone()),
            AgentMessage::Failed { id, error, .. } if id == request => {
                panic!("ListProcesses failed: {error}")
            }
            _ => None,
        })
    }

    /// Attaches, starts, feeds `stdin` and collects everything of a created
    /// process.
    pub fn run(&mut self, id: &str, terminal: bool, stdin: &[u8]) -> Outcome {
        let mut streams = self.attach(id, terminal);
        self.start(id);
        streams.write_stdin(stdin);
        streams.close_stdin();
        let (status, error) = self.exited(id);
        let (out, err) = streams.output();
        Outcome {
            status,
            error,
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
        }
    }

    /// Sends `Shutdown` and waits for the agent to return.
    pub fn shutdown(mut self) {
        self.send(&HostMessage::Shutdown);
        let agent = self.agent.take().unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !agent.is_finished() {
            assert!(Instant::now() < deadline, "the agent did not end after Shutdown");
            std::thread::sleep(Duration::from_millis(5));
        }
        agent.join().unwrap().unwrap();
    }
}

/// Runs `process` as the container's process of a fresh agent rooted at
/// `/` and shuts it down.
pub fn run_init(process: Process, stdin: &[u8]) -> Outcome {
    let mut host = Host::new(Path::new("/"));
    host.create(process).expect("creating the container");
    let outcome = host.run(INIT_ID, false, stdin);
    host.shutdown();
    outcome
}

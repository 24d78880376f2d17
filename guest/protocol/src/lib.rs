//! The protocol between skiff's host runtime and the agent that is PID 1 in
//! the guest. Both sides build against this crate, so a message has exactly
//! one definition.
//!
//! # Connections (virtio-vsock; the host is CID 2)
//! - **control**: at boot the agent connects to host port [`CONTROL_PORT`]
//!   and sends [`AgentMessage::Ready`]. Frames go both ways on it.
//! - **streams**: for every process the host opens one connection per stdio
//!   stream to guest port [`STREAM_PORT`], sends one [`StreamHello`] frame,
//!   and from then on the connection carries that stream's raw bytes. End of
//!   stdin is the host shutting down its writing half; end of output is the
//!   agent shutting down its own.
//!
//! # Life of a container
//! ```text
//! agent → Ready{version}
//! host  → Provision{entropy, realtime_ns}
//! agent → Provisioned{cid} | Failed{id: PROVISION_ID}
//! host  → CreateContainer{root, mounts, files, hostname, process}   (process id INIT_ID)
//! agent → Created{id} | Failed{id, exit_code}
//! host  ⇒ stream connections for INIT_ID (streams_for(process))
//! host  → Start{id}
//! agent → Started{id}
//! host  → Signal{id, signal, all} / Exec{id, process} + streams + Start / ResizeTerminal
//! host  → ListProcesses{id}
//! agent → Processes{id, processes} | Failed{id}
//! agent → Exited{id, status}        (after that process's output is all sent)
//! host  → Shutdown                  (after it has read every stream to its end)
//! ```
//! # Templates
//! A VM may be snapshotted while its agent waits for `Provision`, and
//! restored any number of times. A restored VM's vsock transport is reset:
//! the agent's read of the control connection fails, and it connects again
//! to the host that restored it and says `Ready` anew. What must differ
//! between two VMs restored from one snapshot comes with `Provision`: fresh
//! entropy the guest kernel reseeds its random number generator from, and
//! the wall-clock time; `Provisioned` reports the vsock CID the guest now
//! has. Cold-booted VMs go through the same exchange.
//!
//! The agent powers the VM off after `Shutdown`, or when the control
//! connection ends. Exits of INIT_ID end the container: the agent kills what
//! is left, reports it, and waits for `Shutdown`.
//!
//! Requests that succeed without a result of their own (`Signal`,
//! `ResizeTerminal`) are answered only when they fail. `ListProcesses`
//! always gets an answer under the id the host chose for it.
//!
//! # Staged files
//! The guest has no view of the host's files, yet OCI bind mounts may name
//! small host files (`/etc/hosts`, `/etc/resolv.conf`). The host sends their
//! contents in [`ContainerSpec::files`], each at [`staged_file_path`], and
//! points the mount's source there. The agent writes them before it does the
//! mounts, so such a bind is like any other of a guest-side source.
//!
//! # Framing
//! Each frame is a 4-byte big-endian length followed by that many bytes of
//! JSON. A frame longer than [`MAX_FRAME`] is a protocol error.

mod base64;
pub mod exec_lookup;
pub mod passwd;

use std::io::{self, Read, Write};

pub use oci_spec::runtime::{Mount, Process};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Bumped on any change a peer built from an older copy would misread.
/// 2: `Signal.all`, `ListProcesses`/`Processes`, `ContainerSpec.files`.
/// 3: `ContainerSpec.root` as `RootFs`. 4: `Provision`/`Provisioned`.
pub const VERSION: u32 = 4;
/// vsock's well-known CID of the host.
pub const HOST_CID: u32 = 2;
/// Host port the agent connects to for the control connection.
pub const CONTROL_PORT: u32 = 1024;
/// Guest port the agent accepts stdio stream connections on.
pub const STREAM_PORT: u32 = 1025;
/// The id of the container's own process (OCI `process`); exec'd processes
/// get ids chosen by the host.
pub const INIT_ID: &str = "init";
/// The agent's refusal of a second `CreateContainer`. Hosts also meet it
/// in answer to a `Start` right after create: on software-KVM hosts the
/// agent has been seen to read that `Start` as the `CreateContainer`
/// before it, a defect of guest memory there; the `Start` is sent again.
pub const ALREADY_CREATED: &str = "the container was already created";
/// On the guest kernel's command line: the agent logs every step on the
/// console.
pub const DEBUG_FLAG: &str = "skiff.debug";
/// Largest frame either side accepts: a process spec with a big environment
/// fits many times over, a corrupted length prefix does not.
pub const MAX_FRAME: u32 = 16 << 20;
/// Where staged files go in the agent's own filesystem: outside the
/// container's root, so they are only reachable through the mounts that
/// name them.
pub const STAGED_FILES_DIR: &str = "/run/skiff/files";

/// The path of the `index`th staged file of a container.
pub fn staged_file_path(index: usize) -> String {
    format!("{STAGED_FILES_DIR}/{index}")
}

/// Whether `path` may be a staged file's: a file below [`STAGED_FILES_DIR`]
/// with no `..`, so whatever the host sends, the agent writes nowhere else.
pub fn check_staged_path(path: &str) -> Result<(), String> {
    let rel = std::path::Path::new(path)
        .strip_prefix(STAGED_FILES_DIR)
        .map_err(|_| format!("staged file `{path}` is not under {STAGED_FILES_DIR}"))?;
    if rel.as_os_str().is_empty() {
        return Err(format!("staged file `{path}` names the staging directory itself"));
    }
    // Path::components drops `.` and doubled slashes but keeps `..`.
    let plain = rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(format!("staged file `{path}` must not contain `..`"));
    }
    Ok(())
}

/// The id a failed `Provision` is reported under.
pub const PROVISION_ID: &str = "provision";
/// How many bytes of entropy `Provision` carries: a full reseed of the
/// guest kernel's ChaCha20-based generator takes 32.
pub const PROVISION_ENTROPY_BYTES: usize = 64;

/// What the host asks of the agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    /// The first message after `Ready`: what makes this VM unlike others
    /// restored from the same snapshot. Answered with `Provisioned`.
    Provision {
        /// Mixed into the guest kernel's entropy pool and credited, then
        /// the generator is reseeded at once.
        #[serde(with = "base64")]
        entropy: Vec<u8>,
        /// The host's `CLOCK_REALTIME` in nanoseconds since the epoch.
        realtime_ns: u64,
    },
    /// Mount the root filesystem and the OCI mounts, set the hostname,
    /// switch root, and create the container's process ([`INIT_ID`]) stopped
    /// before `execve`, waiting for `Start`.
    CreateContainer(ContainerSpec),
    /// Create a further process in the running container, waiting for `Start`.
    Exec { id: String, process: Process },
    /// Let a created process `execve`, once its streams are attached.
    Start { id: String },
    /// Deliver a signal to a process (to its process group for a terminal).
    Signal {
        id: String,
        signal: i32,
        /// Deliver it to every process of the container instead, as
        /// `kill --all` does; `id` must still name a process the agent
        /// knows, but that process may have exited already.
        #[serde(default)]
        all: bool,
    },
    /// List the container's processes, as `ps` inside it would, without the
    /// agent and kernel threads. `id` is the host's name for the request;
    /// the answer is `Processes` (or `Failed`) under the same id.
    ListProcesses { id: String },
    /// Set the window size of a process's terminal.
    ResizeTerminal { id: String, rows: u16, cols: u16 },
    /// The host has read everything it wants; the agent may power off.
    Shutdown,
}

/// What the agent tells the host.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First frame on the control connection.
    Ready {
        version: u32,
        /// Guest time since boot (CLOCK_BOOTTIME), for start-up figures.
        uptime_ms: u64,
    },
    /// `Provision` was applied.
    Provisioned {
        /// The guest's vsock CID as the guest sees it now.
        cid: u32,
    },
    /// The process exists and waits for `Start`.
    Created {
        id: String,
        /// Its pid inside the guest.
        pid: i32,
        timings: Timings,
    },
    /// The process was released and is about to `execve`.
    Started { id: String },
    /// A request for `id` could not be carried out; nothing of it is left in
    /// the guest. An empty id means the request itself was malformed.
    Failed {
        id: String,
        error: String,
        /// The status a shell would give for this failure: 127 for an
        /// executable that does not exist, 126 for one that cannot run, 1
        /// otherwise.
        exit_code: i32,
    },
    /// The process ended and every byte of its output has been sent.
    Exited {
        id: String,
        status: ExitStatus,
        /// Why `execve` itself failed, when it did after `Start`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The answer to `ListProcesses`, in order of pid.
    Processes { id: String, processes: Vec<ProcessInfo> },
}

/// One process of the container, from the guest's `/proc`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Its pid inside the guest.
    pub pid: i32,
    pub ppid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// The one-letter state of `/proc/<pid>/stat`: `R`, `S`, `D`, `Z`, `T`...
    pub state: String,
    /// Its arguments joined by spaces, or `[name]` when it has none (a
    /// zombie, say), as `ps` shows them.
    pub command: String,
}

/// A small host file the agent writes into its own filesystem before the
/// OCI mounts, so a bind mount can name it as its source.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StagedFile {
    /// Absolute path in the agent's filesystem, below [`STAGED_FILES_DIR`];
    /// [`staged_file_path`] makes one.
    pub path: String,
    /// Base64 on the wire: a JSON array of numbers would take up to four
    /// times the file's size.
    #[serde(with = "base64")]
    pub contents: Vec<u8>,
    /// Permission bits (`0o644`); file type bits are ignored.
    pub mode: u32,
}

/// How the container's environment is put together in the guest.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub root: RootFs,
    /// OCI `hostname`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// OCI `mounts`, in order, relative to the new root.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Files to write before the mounts, for the binds that name them.
    #[serde(default)]
    pub files: Vec<StagedFile>,
    /// OCI `process`; it runs as [`INIT_ID`].
    pub process: Process,
}

/// The container's root filesystem and where it comes from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RootFs {
    pub source: RootSource,
    /// OCI `root.readonly`.
    pub readonly: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RootSource {
    /// The bundle's rootfs directory itself, shared by virtio-fs: what the
    /// container writes lands there, as under runc.
    Shared { tag: String },
    /// An image of the rootfs on a block device, e.g. `/dev/vda` holding
    /// `erofs`. Always read-only: the host shares one cached image between
    /// containers, so writes go to an overlay whose upper layer is a guest
    /// tmpfs (unless `readonly`, which uses the image as is).
    Block { device: String, fstype: String },
}

/// The virtio-fs tag of the shared root filesystem.
pub const ROOT_TAG: &str = "skiff-root";
/// The mount type of a host directory shared by virtio-fs; its source is
/// the share's tag.
pub const SHARED_MOUNT_TYPE: &str = "virtiofs";

/// The virtio-fs tag of the `index`th shared bind mount.
pub fn share_tag(index: usize) -> String {
    format!("skiff-bind-{index}")
}

/// Which stdio stream a stream connection carries.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// Host → process. With a terminal: into the terminal.
    Stdin,
    /// Process → host. With a terminal: everything the terminal prints.
    Stdout,
    /// Process → host; absent with a terminal.
    Stderr,
}

/// First frame on a stream connection.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StreamHello {
    pub id: String,
    pub kind: StreamKind,
}

/// The streams a process has: a terminal merges stdout and stderr.
pub fn streams_for(process: &Process) -> &'static [StreamKind] {
    if process.terminal().unwrap_or(false) {
        &[StreamKind::Stdin, StreamKind::Stdout]
    } else {
        &[StreamKind::Stdin, StreamKind::Stdout, StreamKind::Stderr]
    }
}

/// How a process ended.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It called `exit` with this code.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The status as a shell reports it: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Where the agent's preparation time went, in microseconds.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Mounting the root filesystem (and overlay).
    pub root_mount_us: u64,
    /// The OCI mounts, hostname and switch of root.
    pub mounts_us: u64,
    /// Forking the process and setting it up, up to where it waits for `Start`.
    pub process_us: u64,
}

/// Writes one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "message too large for one frame"))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    // One write: frames from two threads sharing a socket never interleave
    // as long as each holds the writer's lock for the call.
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame. `Ok(None)` is a clean end of the connection before a
/// frame started; an end in the middle of one is an error.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("malformed frame: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<_, T>(&mut r).unwrap(), Some(msg));
        assert_eq!(read_frame::<_, T>(&mut r).unwrap(), None);
    }

    #[test]
    fn messages_survive_a_round_trip() {
        round_trip(AgentMessage::Ready {
            version: VERSION,
            uptime_ms: 5,
        });
        round_trip(AgentMessage::Exited {
            id: INIT_ID.into(),
            status: ExitStatus::Signal(15),
            error: None,
        });
        round_trip(HostMessage::Signal {
            id: "x".into(),
            signal: 9,
            all: true,
        });
        round_trip(HostMessage::ListProcesses { id: "ps-1".into() });
        round_trip(AgentMessage::Processes {
            id: "ps-1".into(),
            processes: vec![ProcessInfo {
                pid: 7,
                ppid: 1,
                uid: 1000,
                state: "S".into(),
                command: "sleep 1000".into(),
            }],
        });
        round_trip(HostMessage::CreateContainer(ContainerSpec {
            root: RootFs {
                source: RootSource::Shared { tag: ROOT_TAG.into() },
                readonly: false,
            },
            hostname: Some("h".into()),
            mounts: oci_spec::runtime::get_default_mounts(),
            files: vec![
                StagedFile {
                    path: staged_file_path(0),
                    contents: b"127.0.0.1 localhost\n".to_vec(),
                    mode: 0o644,
                },
                StagedFile {
                    path: staged_file_path(1),
                    contents: (0..=255).collect(),
                    mode: 0o600,
                },
            ],
            process: Process::default(),
        }));
        round_trip(StreamHello {
            id: INIT_ID.into(),
            kind: StreamKind::Stderr,
        });
    }

    fn parse<T: DeserializeOwned>(json: &str) -> T {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn frames_without_the_newer_fields_still_parse() {
        let signal: HostMessage = parse(r#"{"type":"signal","id":"init","signal":15}"#);
        assert_eq!(
            signal,
            HostMessage::Signal {
                id: INIT_ID.into(),
                signal: 15,
                all: false,
            }
        );
        let spec = ContainerSpec {
            root: RootFs {
                source: RootSource::Block {
                    device: "/dev/vda".into(),
                    fstype: "ext4".into(),
                },
                readonly: true,
            },
            hostname: None,
            mounts: Vec::new(),
            files: Vec::new(),
            process: Process::default(),
        };
        let mut old = serde_json::to_value(HostMessage::CreateContainer(spec.clone())).unwrap();
        old.as_object_mut().unwrap().remove("files").unwrap();
        let create: HostMessage = serde_json::from_value(old).unwrap();
        assert_eq!(create, HostMessage::CreateContainer(spec));
    }

    #[test]
    fn staged_contents_travel_as_base64() {
        let file = StagedFile {
            path: staged_file_path(3),
            contents: b"foobar".to_vec(),
            mode: 0o644,
        };
        assert_eq!(
            serde_json::to_string(&file).unwrap(),
            r#"{"path":"/run/skiff/files/3","contents":"Zm9vYmFy","mode":420}"#
        );
        let err =
            serde_json::from_str::<StagedFile>(r#"{"path":"/x","contents":"Zm9", "mode":0}"#).unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
    }

    #[test]
    fn staged_paths_stay_in_the_staging_directory() {
        assert_eq!(staged_file_path(0), "/run/skiff/files/0");
        check_staged_path(&staged_file_path(12)).unwrap();
        check_staged_path("/run/skiff/files/dir/hosts").unwrap();
        for bad in [
            "/run/skiff/files",
            "/run/skiff/files/",
            "/run/skiff/files/../root/etc/passwd",
            "/run/skiff/files/a/../../x",
            "/run/skiff/filesx/0",
            "run/skiff/files/0",
            "/etc/hosts",
            "",
        ] {
            assert!(check_staged_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wire_format_is_tagged_json_after_a_big_endian_length() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &HostMessage::Shutdown).unwrap();
        assert_eq!(&buf[..4], &19u32.to_be_bytes());
        assert_eq!(&buf[4..], br#"{"type":"shutdown"}"#);
    }

    #[test]
    fn truncated_oversized_and_garbled_frames_are_errors() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &HostMessage::Shutdown).unwrap();
        let mut short = &buf[..buf.len() - 1];
        assert!(read_frame::<_, HostMessage>(&mut short).is_err());
        let mut half_len = &buf[..2];
        assert!(read_frame::<_, HostMessage>(&mut half_len).is_err());
        let huge = (MAX_FRAME + 1).to_be_bytes();
        let err = read_frame::<_, HostMessage>(&mut &huge[..]).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
        let mut garbled = 3u32.to_be_bytes().to_vec();
        garbled.extend_from_slice(b"{x}");
        let err = read_frame::<_, HostMessage>(&mut &garbled[..]).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    }

    #[test]
    fn exit_status_reads_like_a_shell() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(15).shell_code(), 143);
    }

    #[test]
    fn a_terminal_merges_output() {
        let mut p = Process::default();
        p.set_terminal(Some(true));
        assert_eq!(streams_for(&p), &[StreamKind::Stdin, StreamKind::Stdout]);
        p.set_terminal(Some(false));
        assert_eq!(streams_for(&p).len(), 3);
    }
}

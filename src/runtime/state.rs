//! The state store under `--root`: one directory per container holding its
//! record, its lock and the VMM's control socket.
//!
//! Who writes what: `create` makes the directory and the first record
//! (`creating`); from then on the container's VMM process (the monitor) is
//! the only writer of its status, and every write replaces the file
//! atomically. CLI commands that change a container take its lock, so two
//! of them never interleave. A record is never trusted about liveness: a
//! monitor that is gone (even killed with SIGKILL) means `stopped`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::error::RuntimeError;

const RECORD_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
/// The monitor's socket, in the container's directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Where the VM keeps its sockets, in the container's directory.
pub const VM_DIR: &str = "vm";

/// How old a directory without a record must be to count as left over.
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(10);

/// The spec version skiff's state output follows.
pub const OCI_VERSION: &str = "1.0.2";

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// What the store keeps about a container.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Record {
    pub id: String,
    pub status: Status,
    /// The monitor's pid; 0 until it exists.
    pub pid: i32,
    /// The monitor's start time (clock ticks after boot), so a recycled pid
    /// is not mistaken for it.
    pub pid_start: u64,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339, as runc prints it.
    pub created: String,
    pub owner: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The container process's status as a shell reports it, once it exited.
    #[serde(default)]
    pub exit_status: Option<i32>,
    /// The bundle's hooks, kept for `delete` (poststop) when the bundle
    /// may be gone.
    #[serde(default)]
    pub hooks: Option<oci_spec::runtime::Hooks>,
}

/// The state document of the OCI runtime spec, with the fields runc adds.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    pub oci_version: &'static str,
    pub id: String,
    pub pid: i32,
    pub status: Status,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    pub owner: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Record {
    /// The state as `skiff state` prints it and hooks read it. As in runc,
    /// a stopped container has no pid.
    pub fn oci_state(&self, status: Status) -> OciState {
        OciState {
            oci_version: OCI_VERSION,
            id: self.id.clone(),
            pid: if status == Status::Stopped { 0 } else { self.pid },
            status,
            bundle: self.bundle.clone(),
            rootfs: self.rootfs.clone(),
            created: self.created.clone(),
            owner: self.owner.clone(),
            annotations: self.annotations.clone(),
        }
    }
}

/// All containers under one `--root`.
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn new(root: &Path) -> Store {
        Store {
            root: root.to_owned(),
        }
    }

    /// Claims `id`: its directory is made exclusively, so of two concurrent
    /// creates of one id exactly one wins.
    pub fn create(&self, record: &Record) -> Result<Container, RuntimeError> {
        validate_id(&record.id)?;
        fs::create_dir_all(&self.root)
            .map_err(|e| RuntimeError::io(format!("creating the state root {}", self.root.display()), e))?;
        let dir = self.root.join(&record.id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::State(format!(
                    "container with id exists: {}",
                    record.id
                )))
            }
            Err(e) => return Err(RuntimeError::io(format!("creating {}", dir.display()), e)),
        }
        let container = Container {
            id: record.id.clone(),
            dir,
        };
        if let Err(e) = container.save(record) {
            let _ = fs::remove_dir_all(&container.dir);
            return Err(e);
        }
        Ok(container)
    }

    /// The container `id`, if the store has a record of it.
    pub fn open(&self, id: &str) -> Result<Container, RuntimeError> {
        validate_id(id)?;
        let dir = self.root.join(id);
        if !dir.join(RECORD_FILE).exists() {
            return Err(RuntimeError::NotFound(id.to_owned()));
        }
        Ok(Container {
            id: id.to_owned(),
            dir,
        })
    }

    /// A directory under the root left without a record (a create that died
    /// before writing one); removing it makes the id usable again. One that
    /// is younger than [`LEFTOVER_AGE`] may be a create in progress, which
    /// writes its record right after making it, and is left alone.
    pub fn remove_leftover(&self, id: &str) -> Result<(), RuntimeError> {
        validate_id(id)?;
        let dir = self.root.join(id);
        let young = fs::metadata(&dir)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < LEFTOVER_AGE));
        if young || dir.join(RECORD_FILE).exists() {
            return Ok(());
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::io(format!("removing {}", dir.display()), e)),
        }
    }

    /// Every container with a record, sorted by id.
    pub fn list(&self) -> Result<Vec<Container>, RuntimeError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io(format!("reading {}", self.root.display()), e)),
        };
        let mut out: Vec<Container> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|id| self.open(&id).ok())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

/// One container's directory.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub dir: PathBuf,
}

impl Container {
    /// Holds the container's lock until dropped: commands that change a
    /// container run one at a time.
    pub fn lock(&self) -> Result<Flock<File>, RuntimeError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => RuntimeError::NotFound(self.id.clone()),
                _ => RuntimeError::io(format!("opening {}", path.display()), e),
            })?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| RuntimeError::io(format!("locking {}", path.display()), e.into()))
    }

    pub fn load(&self) -> Result<Record, RuntimeError> {
        let path = self.dir.join(RECORD_FILE);
        let text = fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => RuntimeError::NotFound(self.id.clone()),
            _ => RuntimeError::io(format!("reading {}", path.display()), e),
        })?;
        serde_json::from_slice(&text)
            .map_err(|e| RuntimeError::State(format!("{} is corrupt: {e}", path.display())))
    }

    /// Replaces the record atomically: a reader sees the old or the new one.
    pub fn save(&self, record: &Record) -> Result<(), RuntimeError> {
        let path = self.dir.join(RECORD_FILE);
        let tmp = self.dir.join(format!(".{RECORD_FILE}.{}", std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(record).map_err(io::Error::other)?)?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            RuntimeError::io(format!("writing {}", path.display()), e)
        })
    }

    /// Sets the status (and exit status) in the record.
    pub fn set_status(&self, status: Status, exit_status: Option<i32>) -> Result<Record, RuntimeError> {
        let mut record = self.load()?;
        record.status = status;
        if exit_status.is_some() {
            record.exit_status = exit_status;
        }
        self.save(&record)?;
        Ok(record)
    }

    /// The record with its status as it really is: whatever the record
    /// says, a container whose monitor is gone is stopped.
    pub fn current(&self) -> Result<(Record, Status), RuntimeError> {
        let record = self.load()?;
        let status = match record.status {
            Status::Creating if record.pid == 0 => Status::Creating,
            Status::Stopped => Status::Stopped,
            s if monitor_alive(&record) => s,
            _ => Status::Stopped,
        };
        Ok((record, status))
    }

    pub fn control_socket(&self) -> PathBuf {
        self.dir.join(CONTROL_SOCKET)
    }

    pub fn remove(&self) -> Result<(), RuntimeError> {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::io(format!("removing {}", self.dir.display()), e)),
        }
    }
}

/// runc's rule for container ids: word characters, `+`, `-` and `.`, and
/// not a path component of its own meaning.
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 1024
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::State(format!(
            "invalid container id {id:?}: use letters, digits, _ + - ."
        )))
    }
}

/// Whether the record's monitor still runs: same pid, same start time, and
/// not a zombie waiting for its parent.
pub fn monitor_alive(record: &Record) -> bool {
    record.pid > 0
        && process_start(record.pid).is_some_and(|(start, zombie)| start == record.pid_start && !zombie)
}

/// A process's start time in clock ticks after boot, and whether it is a
/// zombie, from /proc/<pid>/stat.
pub fn process_start(pid: i32) -> Option<(u64, bool)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses; the fields after it do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Counted from field 3 (state): starttime is field 22.
    let state = *fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state == "Z" || state == "X"))
}

/// Now, as runc writes `created`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

/// The user that owns the state, as runc reports it (empty when root).
pub fn owner() -> String {
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        return String::new();
    }
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            id: id.into(),
            status: Status::Creating,
            pid: 0,
            pid_start: 0,
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: now_rfc3339(),
            owner: String::new(),
            annotations: BTreeMap::new(),
            exit_status: None,
            hooks: None,
        }
    }

    #[test]
    fn ids_follow_runc() {
        for ok in ["a", "my-container_1.2+x", "A"] {
            validate_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "ä", "../x"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn create_claims_an_id_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("root"));
        store.create(&record("c1")).unwrap();
        let err = store.create(&record("c1")).unwrap_err().to_string();
        assert_eq!(err, "container with id exists: c1");
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn unknown_ids_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert_eq!(
            store.open("nope").unwrap_err().to_string(),
            "container does not exist"
        );
    }

    #[test]
    fn a_dead_monitor_means_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let c = store.create(&record("c")).unwrap();
        assert_eq!(c.current().unwrap().1, Status::Creating);

        // This very process stands in for a live monitor.
        let me = std::process::id() as i32;
        let mut r = c.load().unwrap();
        r.pid = me;
        r.pid_start = process_start(me).unwrap().0;
        r.status = Status::Running;
        c.save(&r).unwrap();
        assert_eq!(c.current().unwrap().1, Status::Running);

        // Same pid, another start time: the pid was recycled.
        r.pid_start += 1;
        c.save(&r).unwrap();
        assert_eq!(c.current().unwrap().1, Status::Stopped);
        assert_eq!(c.load().unwrap().oci_state(Status::Stopped).pid, 0);
    }

    #[test]
    fn state_output_has_the_spec_fields() {
        let r = record("c");
        let v = serde_json::to_value(r.oci_state(Status::Created)).unwrap();
        for key in [
            "ociVersion",
            "id",
            "status",
            "pid",
            "bundle",
            "rootfs",
            "created",
            "owner",
        ] {
            assert!(v.get(key).is_some(), "{key} missing in {v}");
        }
        assert_eq!(v["status"], "created");
        assert!(v.get("annotations").is_none());
    }

    #[test]
    fn the_lock_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let c = store.create(&record("c")).unwrap();
        let held = c.lock().unwrap();
        let file = OpenOptions::new()
            .write(true)
            .open(c.dir.join(LOCK_FILE))
            .unwrap();
        assert!(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err());
        drop(held);
        let file = OpenOptions::new()
            .write(true)
            .open(c.dir.join(LOCK_FILE))
            .unwrap();
        assert!(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok());
    }
}

//! Templates on disk, one directory each, named by key:
//!
//! ```text
//! <dir>/<key>/template.json   its inputs, when and how fast it was built
//! <dir>/<key>/snapshot/       the VM (see vmm::snapshot)
//! <dir>/<key>/console.log     the template boot's console
//! <dir>/<key>.lock            held while it is built or thrown away
//! <dir>/digests/              kernel and initramfs hashes by file identity
//! <dir>/empty/                what unused shares of a template VM show
//! ```
//! A template is built in a directory of its own and renamed into place
//! whole, so a reader sees all of one or nothing. Restoring takes no lock:
//! a restored VM maps its memory file, which outlives a removal. A
//! template's memory becomes the guest that is handed the container's
//! files, so the store must be this user's alone: it is made mode 0700,
//! and one that others can write is refused.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::key::Inputs;
use super::padded_layout;
use crate::runtime::error::RuntimeError;
use crate::runtime::root::GuestRoot;
use crate::runtime::sandbox::{Cancel, Launch, Sandbox, SandboxConfig, VmResources};
use crate::runtime::state::now_rfc3339;
use crate::vmm::ConsoleOutput;

const INFO: &str = "template.json";
const SNAPSHOT: &str = "snapshot";
const CONSOLE: &str = "console.log";
const DIGESTS: &str = "digests";
const EMPTY: &str = "empty";
const BUILDING: &str = ".build-";
const DISCARDED: &str = ".discarded-";
/// How often a wait for another skiff's build looks at its cancel flag.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// What `template.json` says.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TemplateInfo {
    pub key: String,
    /// Tells one build of a key from the next, so a template found broken
    /// is thrown away only if nobody rebuilt it meanwhile.
    pub build_id: String,
    pub created: String,
    pub inputs: Inputs,
    /// Cold boot to the agent's `Ready`, and writing the snapshot.
    pub boot_ms: u64,
    pub snapshot_ms: u64,
}

/// A built template.
#[derive(Debug, Clone)]
pub struct Template {
    pub info: TemplateInfo,
    pub dir: PathBuf,
}

impl Template {
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join(SNAPSHOT)
    }

    /// Bytes the template takes on disk (its memory file is sparse).
    pub fn disk_bytes(&self) -> u64 {
        disk_usage(&self.dir)
    }
}

/// Where templates are kept.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    dir: PathBuf,
}

impl TemplateStore {
    pub fn new(dir: impl Into<PathBuf>) -> TemplateStore {
        TemplateStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the store if need be, and checks that only this user can
    /// change what is in it.
    fn checked(&self) -> Result<(), RuntimeError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| {
                RuntimeError::io(format!("creating the template store {}", self.dir.display()), e)
            })?;
        let meta = fs::metadata(&self.dir)
            .map_err(|e| RuntimeError::io(format!("the template store {}", self.dir.display()), e))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(RuntimeError::State(format!(
                "the template store {} is owned by uid {} with mode {:o}: it must be this user's (uid {me}) \
                 and writable by nobody else, since its VMs are given containers' files",
                self.dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
        Ok(())
    }

    /// The inputs of a VM with `resources`.
    pub fn inputs(&self, resources: &VmResources, debug_guest: bool) -> Result<Inputs, RuntimeError> {
        self.checked()?;
        Inputs::of(resources, debug_guest, &self.dir.join(DIGESTS))
    }

    /// An empty directory for the shares a container does not use.
    pub fn empty_dir(&self) -> Result<PathBuf, RuntimeError> {
        self.checked()?;
        let dir = self.dir.join(EMPTY);
        fs::create_dir_all(&dir).map_err(|e| RuntimeError::io(format!("creating {}", dir.display()), e))?;
        Ok(dir)
    }

    /// The template for `inputs`, built first if there is none.
    pub fn ensure(
        &self,
        inputs: &Inputs,
        resources: &VmResources,
        debug_guest: bool,
        cancel: &Cancel,
    ) -> Result<Template, RuntimeError> {
        self.checked()?;
        let key = inputs.key();
        if let Some(t) = self.get(&key)? {
            return Ok(t);
        }
        let _lock = self.lock(&key, Some(cancel))?;
        // Whoever held the lock before may have built it.
        if let Some(t) = self.get(&key)? {
            return Ok(t);
        }
        self.build(&key, inputs, resources, debug_guest, cancel)
    }

    /// The template named `key`, if it is built.
    pub fn get(&self, key: &str) -> Result<Option<Template>, RuntimeError> {
        let dir = self.dir.join(key);
        let path = dir.join(INFO);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RuntimeError::io(format!("reading {}", path.display()), e)),
        };
        match serde_json::from_str::<TemplateInfo>(&text) {
            Ok(info) if info.key == key => Ok(Some(Template { info, dir })),
            // Written by another skiff, or damaged: the next build of this
            // key replaces it.
            _ => {
                tracing::warn!(
                    template = key,
                    "{} is unreadable; the template will be rebuilt",
                    path.display()
                );
                Ok(None)
            }
        }
    }

    /// Every built template, by key.
    pub fn list(&self) -> Result<Vec<Template>, RuntimeError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io(format!("reading {}", self.dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if is_key(&name) {
                match self.get(&name) {
                    Ok(Some(t)) => out.push(t),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(template = %name, "{e}"),
                }
            }
        }
        out.sort_by(|a, b| a.info.key.cmp(&b.info.key));
        Ok(out)
    }

    /// Removes the template named `key`. VMs restored from it go on: they
    /// hold their memory file open.
    pub fn remove(&self, key: &str) -> Result<bool, RuntimeError> {
        if !is_key(key) {
            return Err(RuntimeError::Bundle(format!("{key:?} is not a template key")));
        }
        let dir = self.dir.join(key);
        if !dir.exists() {
            return Ok(false);
        }
        let _lock = self.lock(key, None)?;
        if !dir.exists() {
            return Ok(false);
        }
        self.remove_dir(&dir)?;
        Ok(true)
    }

    /// Removes every template, readable or not, and what dead builds left;
    /// a build in progress is left alone. Returns how many went.
    pub fn remove_all(&self) -> Result<usize, RuntimeError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(RuntimeError::io(format!("reading {}", self.dir.display()), e)),
        };
        let mut removed = 0;
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_key(&name) && entry.path().is_dir() {
                if self.remove(&name)? {
                    removed += 1;
                }
            } else if let Some(key) = leftover_key(&name) {
                if let Some(_lock) = self.try_lock(key)? {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(removed)
    }

    /// Throws `template` away after a restore refused it, unless it has
    /// been rebuilt since.
    pub fn discard(&self, template: &Template) -> Result<(), RuntimeError> {
        let _lock = self.lock(&template.info.key, None)?;
        match self.get(&template.info.key)? {
            Some(current) if current.info.build_id == template.info.build_id => self.remove_dir(&current.dir),
            _ => Ok(()),
        }
    }

    fn lock_file(&self, key: &str) -> Result<(File, PathBuf), RuntimeError> {
        self.checked()?;
        let path = self.dir.join(format!("{key}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| RuntimeError::io(format!("opening {}", path.display()), e))?;
        Ok((file, path))
    }

    /// The key's lock, if nobody holds it.
    fn try_lock(&self, key: &str) -> Result<Option<Flock<File>>, RuntimeError> {
        let (file, _) = self.lock_file(key)?;
        Ok(Flock::lock(file, FlockArg::LockExclusiveNonblock).ok())
    }

    /// The key's lock, waiting for whoever holds it (a build takes about a
    /// boot) unless `cancel` says stop.
    fn lock(&self, key: &str, cancel: Option<&Cancel>) -> Result<Flock<File>, RuntimeError> {
        let (mut file, path) = self.lock_file(key)?;
        let mut said = false;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(lock),
                Err((back, nix::errno::Errno::EWOULDBLOCK)) => file = back,
                Err((_, e)) => return Err(RuntimeError::io(format!("locking {}", path.display()), e.into())),
            }
            if !said {
                tracing::info!(template = key, "waiting for another skiff building this template");
                said = true;
            }
            if cancel.is_some_and(Cancel::is_cancelled) {
                return Err(RuntimeError::VmEnded(
                    "cancelled while waiting for a template".into(),
                ));
            }
            std::thread::sleep(LOCK_POLL);
        }
    }

    /// Renamed away first, so no reader finds half a template.
    fn remove_dir(&self, dir: &Path) -> Result<(), RuntimeError> {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("template");
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let away = self.dir.join(format!(
            "{DISCARDED}{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::rename(dir, &away) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(RuntimeError::io(format!("removing {}", dir.display()), e)),
        }
        fs::remove_dir_all(&away).map_err(|e| RuntimeError::io(format!("removing {}", away.display()), e))
    }

    /// Boots a VM with the template layout, snapshots it at its agent's
    /// `Ready`, and moves it into place. Called with the key's lock held.
    fn build(
        &self,
        key: &str,
        inputs: &Inputs,
        resources: &VmResources,
        debug_guest: bool,
        cancel: &Cancel,
    ) -> Result<Template, RuntimeError> {
        // Builds that died (their lock is ours now) leave these, and an
        // unreadable template is in the way.
        self.clear_leftovers(key);
        self.remove_dir(&self.dir.join(key))?;
        self.prune_other_builds();
        let build = self.dir.join(format!("{BUILDING}{key}-{}", std::process::id()));
        fs::create_dir(&build).map_err(|e| RuntimeError::io(format!("creating {}", build.display()), e))?;
        let guard = RemoveOnDrop(Some(build.clone()));
        tracing::info!(
            template = key,
            vcpus = inputs.vcpus,
            memory = inputs.memory_bytes,
            profile = %inputs.cpu_profile,
            "building a template: one cold boot, which later containers of this size skip"
        );
        let built = self.boot_and_snapshot(key, &build, resources, debug_guest, cancel);
        let (boot_ms, snapshot_ms) = match built {
            Ok(times) => times,
            Err(e) => {
                // The build directory goes; what the guest said stays.
                let kept = self.dir.join(format!("{key}.failed-console.log"));
                if fs::rename(build.join(CONSOLE), &kept).is_ok() {
                    tracing::warn!(
                        template = key,
                        "the template boot failed; its console is in {}",
                        kept.display()
                    );
                }
                return Err(e);
            }
        };
        let info = TemplateInfo {
            key: key.to_owned(),
            build_id: format!("{}-{}", std::process::id(), now_rfc3339()),
            created: now_rfc3339(),
            inputs: inputs.clone(),
            boot_ms,
            snapshot_ms,
        };
        let json =
            serde_json::to_vec_pretty(&info).map_err(|e| RuntimeError::io("template.json", e.into()))?;
        fs::write(build.join(INFO), json)
            .map_err(|e| RuntimeError::io(format!("writing {}", build.join(INFO).display()), e))?;
        let dir = self.dir.join(key);
        fs::rename(&build, &dir)
            .map_err(|e| RuntimeError::io(format!("moving {} into place", build.display()), e))?;
        guard.release();
        let _ = fs::remove_file(self.dir.join(format!("{key}.failed-console.log")));
        let template = Template { info, dir };
        tracing::info!(
            template = key,
            boot_ms,
            snapshot_ms,
            disk_mib = template.disk_bytes() >> 20,
            "template built"
        );
        Ok(template)
    }

    /// Boots the template VM into `build` and snapshots it at its agent's
    /// `Ready`; returns how long each took, in ms.
    fn boot_and_snapshot(
        &self,
        key: &str,
        build: &Path,
        resources: &VmResources,
        debug_guest: bool,
        cancel: &Cancel,
    ) -> Result<(u64, u64), RuntimeError> {
        let empty = self.empty_dir()?;
        // Socket paths must stay short whatever the store's path is, and
        // the directory must be this build's own.
        let work_dir =
            nix::unistd::mkdtemp(&std::env::temp_dir().join(format!("skiff-template-{}-XXXXXX", &key[..8])))
                .map_err(|e| RuntimeError::io("making the template boot's directory", e.into()))?;
        let config = SandboxConfig {
            vm: resources.clone(),
            root: GuestRoot::Shared(empty.clone()),
            shares: padded_layout(Vec::new(), &empty),
            work_dir,
            console: ConsoleOutput::File(build.join(CONSOLE)),
            debug_guest,
        };
        let started = Instant::now();
        let sandbox = Sandbox::launch(config, Launch::Boot, cancel)?;
        let boot_ms = started.elapsed().as_millis() as u64;
        let saving = Instant::now();
        sandbox.snapshot(&build.join(SNAPSHOT))?;
        Ok((boot_ms, saving.elapsed().as_millis() as u64))
    }

    /// Templates made by other builds of skiff can never be restored by
    /// this one; they go when this one builds (unless in use by a build).
    fn prune_other_builds(&self) {
        let Ok(templates) = self.list() else {
            return;
        };
        for t in templates {
            if t.info.inputs.skiff_version == crate::BUILD {
                continue;
            }
            if let Ok(Some(_lock)) = self.try_lock(&t.info.key) {
                tracing::info!(template = %t.info.key, build = %t.info.inputs.skiff_version, "removing a template of another skiff build");
                let _ = self.remove_dir(&t.dir);
            }
        }
    }

    fn clear_leftovers(&self, key: &str) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if leftover_key(&name) == Some(key) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The key of a build in progress or a template being removed, by its
/// directory's name.
fn leftover_key(name: &str) -> Option<&str> {
    let rest = name
        .strip_prefix(BUILDING)
        .or_else(|| name.strip_prefix(DISCARDED))?;
    let key = rest.split('-').next()?;
    is_key(key).then_some(key)
}

/// Template directories are named by hex keys; nothing else in the store is.
fn is_key(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let children = fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| disk_usage(&e.path()))
                .sum()
        })
        .unwrap_or(0);
    own + children
}

struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn release(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template as a build leaves it, without a VM.
    fn fake(store: &TemplateStore, key: &str, build_id: &str) -> Template {
        let dir = store.dir.join(key);
        fs::create_dir_all(dir.join(SNAPSHOT)).unwrap();
        let info = TemplateInfo {
            key: key.into(),
            build_id: build_id.into(),
            created: now_rfc3339(),
            inputs: Inputs {
                skiff_version: crate::BUILD.into(),
                snapshot_format: 1,
                kernel: "/k".into(),
                kernel_sha256: "aa".into(),
                initrd: "/i".into(),
                initrd_sha256: "bb".into(),
                cmdline: String::new(),
                cpu_profile: "baseline".into(),
                vcpus: 1,
                memory_bytes: 128 << 20,
                bind_slots: 4,
            },
            boot_ms: 1,
            snapshot_ms: 1,
        };
        fs::write(dir.join(INFO), serde_json::to_vec(&info).unwrap()).unwrap();
        Template { info, dir }
    }

    #[test]
    fn listing_finds_whole_templates_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(tmp.path());
        assert!(store.list().unwrap().is_empty());
        fake(&store, "bbbb", "1");
        fake(&store, "aaaa", "1");
        // Not templates: the store's own directories, a build in progress,
        // and one whose template.json is damaged.
        store.empty_dir().unwrap();
        fs::create_dir_all(tmp.path().join(".build-cccc-1")).unwrap();
        fs::create_dir_all(tmp.path().join("dddd")).unwrap();
        fs::write(tmp.path().join("dddd").join(INFO), b"{").unwrap();
        let keys: Vec<_> = store.list().unwrap().into_iter().map(|t| t.info.key).collect();
        assert_eq!(keys, ["aaaa", "bbbb"]);
        assert!(store.get("dddd").unwrap().is_none());
    }

    #[test]
    fn removal_and_discarding() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(tmp.path());
        let old = fake(&store, "aaaa", "first");
        assert!(store.remove("../etc").is_err());
        assert!(!store.remove("ffff").unwrap());
        // Rebuilt since `old` was refused: the new one stays.
        fake(&store, "aaaa", "second");
        store.discard(&old).unwrap();
        assert_eq!(store.get("aaaa").unwrap().unwrap().info.build_id, "second");
        let current = store.get("aaaa").unwrap().unwrap();
        store.discard(&current).unwrap();
        assert!(store.get("aaaa").unwrap().is_none());
        fake(&store, "aaaa", "third");
        assert!(store.remove("aaaa").unwrap());
        assert!(store.list().unwrap().is_empty());
        // Nothing of them is left but their lock files.
        let mut left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["aaaa.lock"]);
    }
}

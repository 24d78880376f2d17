//! The OCI `mounts` of a container, set up inside its new root before the
//! switch of root.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::Mount;

use crate::log::{debug, info};
use crate::resolve::in_root;

/// An OCI mount's options, split into what `mount(2)` takes as flags and
/// what goes to the filesystem as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    /// Applied one by one after the mount, as propagation changes must be.
    pub propagation: Vec<MsFlags>,
    /// Filesystem-specific options (`mode=0755`, `size=65536k`, ...).
    pub data: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            propagation: Vec::new(),
            data: Vec::new(),
        }
    }
}

impl MountOptions {
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }

    pub fn data_string(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| self.data.join(","))
    }
}

/// The flag options `mount(8)` knows; `true` sets the flag, `false` clears it.
const FLAG_OPTIONS: &[(&str, bool, MsFlags)] = &[
    ("async", false, MsFlags::MS_SYNCHRONOUS),
    ("atime", false, MsFlags::MS_NOATIME),
    ("bind", true, MsFlags::MS_BIND),
    ("dev", false, MsFlags::MS_NODEV),
    ("diratime", false, MsFlags::MS_NODIRATIME),
    ("dirsync", true, MsFlags::MS_DIRSYNC),
    ("exec", false, MsFlags::MS_NOEXEC),
    ("iversion", true, MsFlags::MS_I_VERSION),
    ("lazytime", true, MsFlags::MS_LAZYTIME),
    ("loud", false, MsFlags::MS_SILENT),
    ("mand", true, MsFlags::MS_MANDLOCK),
    ("noatime", true, MsFlags::MS_NOATIME),
    ("nodev", true, MsFlags::MS_NODEV),
    ("nodiratime", true, MsFlags::MS_NODIRATIME),
    ("noexec", true, MsFlags::MS_NOEXEC),
    ("noiversion", false, MsFlags::MS_I_VERSION),
    ("nolazytime", false, MsFlags::MS_LAZYTIME),
    ("nomand", false, MsFlags::MS_MANDLOCK),
    ("norelatime", false, MsFlags::MS_RELATIME),
    ("nostrictatime", false, MsFlags::MS_STRICTATIME),
    ("nosuid", true, MsFlags::MS_NOSUID),
    ("rbind", true, MsFlags::MS_BIND.union(MsFlags::MS_REC)),
    ("relatime", true, MsFlags::MS_RELATIME),
    ("remount", true, MsFlags::MS_REMOUNT),
    ("ro", true, MsFlags::MS_RDONLY),
    ("rw", false, MsFlags::MS_RDONLY),
    ("silent", true, MsFlags::MS_SILENT),
    ("strictatime", true, MsFlags::MS_STRICTATIME),
    ("suid", false, MsFlags::MS_NOSUID),
    ("sync", true, MsFlags::MS_SYNCHRONOUS),
];

const PROPAGATION_OPTIONS: &[(&str, MsFlags)] = &[
    ("private", MsFlags::MS_PRIVATE),
    ("rprivate", MsFlags::MS_PRIVATE.union(MsFlags::MS_REC)),
    ("shared", MsFlags::MS_SHARED),
    ("rshared", MsFlags::MS_SHARED.union(MsFlags::MS_REC)),
    ("slave", MsFlags::MS_SLAVE),
    ("rslave", MsFlags::MS_SLAVE.union(MsFlags::MS_REC)),
    ("unbindable", MsFlags::MS_UNBINDABLE),
    ("runbindable", MsFlags::MS_UNBINDABLE.union(MsFlags::MS_REC)),
];

/// Options that belong to runc rather than to the kernel; passing them on
/// as data would make the mount fail.
const IGNORED_OPTIONS: &[&str] = &["defaults", "tmpcopyup"];

pub fn parse_options(options: &[String]) -> MountOptions {
    let mut parsed = MountOptions::default();
    for option in options {
        let option = option.as_str();
        if let Some(&(_, set, flag)) = FLAG_OPTIONS.iter().find(|(name, _, _)| *name == option) {
            if set {
                parsed.flags.insert(flag);
            } else {
                parsed.flags.remove(flag);
            }
        } else if let Some(&(_, flag)) = PROPAGATION_OPTIONS.iter().find(|(name, _)| *name == option) {
            parsed.propagation.push(flag);
        } else if !IGNORED_OPTIONS.contains(&option) && !option.is_empty() {
            parsed.data.push(option.to_string());
        }
    }
    parsed
}

/// Mounts `mounts` in order under `root`. The error names the mount.
pub fn mount_all(root: &Path, mounts: &[Mount]) -> Result<(), String> {
    for m in mounts {
        mount_one(root, m).map_err(|e| format!("mount `{}`: {e}", m.destination().display()))?;
    }
    Ok(())
}

fn mount_one(root: &Path, m: &Mount) -> Result<(), String> {
    let typ = m.typ().as_deref().unwrap_or("");
    let mut opts = parse_options(m.options().as_deref().unwrap_or(&[]));
    if typ == "bind" {
        opts.flags.insert(MsFlags::MS_BIND);
    }
    let dest = in_root(root, m.destination());
    debug!("mounting {typ} {:?} at {} ({opts:?})", m.source(), dest.display());

    if opts.is_bind() {
        let source = m.source().as_deref().ok_or("a bind mount needs a source")?;
        let meta = fs::metadata(source).map_err(|e| format!("source `{}`: {e}", source.display()))?;
        create_mountpoint(&dest, !meta.is_dir())?;
        bind(source, &dest, &opts)?;
    } else {
        if matches!(typ, "cgroup" | "cgroup2") && !kernel_has_fs(typ) {
            info!(
                "skipping {typ} at {}: the kernel has no {typ}",
                m.destination().display()
            );
            return Ok(());
        }
        create_mountpoint(&dest, false)?;
        let source = m.source().as_deref().unwrap_or(Path::new(typ));
        let data = opts.data_string();
        let flags = opts.flags & !MsFlags::MS_REMOUNT;
        if let Err(e) = mount(Some(source), &dest, Some(typ), flags, data.as_deref()) {
            if matches!(typ, "cgroup" | "cgroup2") {
                info!("skipping {typ} at {}: {e}", m.destination().display());
                return Ok(());
            }
            return Err(format!("mounting {typ}: {e}"));
        }
    }
    for &flag in &opts.propagation {
        mount(None::<&str>, &dest, None::<&str>, flag, None::<&str>)
            .map_err(|e| format!("setting propagation {flag:?}: {e}"))?;
    }
    if typ == "tmpfs" && m.destination() == Path::new("/dev") {
        create_default_devices(&dest)?;
    }
    Ok(())
}

fn bind(source: &Path, dest: &Path, opts: &MountOptions) -> Result<(), String> {
    let bind_flags = opts.flags & (MsFlags::MS_BIND | MsFlags::MS_REC);
    mount(Some(source), dest, None::<&str>, bind_flags, None::<&str>)
        .map_err(|e| format!("binding `{}`: {e}", source.display()))?;
    // The kernel ignores all other flags on the bind itself; only a remount
    // of the new mount applies them.
    let extra = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
    if !extra.is_empty() {
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | extra;
        mount(None::<&str>, dest, None::<&str>, flags, None::<&str>)
            .map_err(|e| format!("remounting with {extra:?}: {e}"))?;
    }
    Ok(())
}

/// A file is bound onto a file, anything else onto a directory.
fn create_mountpoint(dest: &Path, file: bool) -> Result<(), String> {
    let dir = if file { dest.parent().unwrap_or(dest) } else { dest };
    fs::create_dir_all(dir).map_err(|e| format!("creating `{}`: {e}", dir.display()))?;
    if file && !dest.exists() {
        fs::File::create(dest).map_err(|e| format!("creating `{}`: {e}", dest.display()))?;
    }
    Ok(())
}

fn kernel_has_fs(name: &str) -> bool {
    fs::read_to_string("/proc/filesystems")
        .map(|list| list.lines().any(|l| l.split_whitespace().last() == Some(name)))
        .unwrap_or(false)
}

/// The devices runc puts in a tmpfs `/dev`: (name, major, minor).
const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const DEFAULT_LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

pub fn create_default_devices(dev: &Path) -> Result<(), String> {
    for &(name, major, minor) in DEFAULT_DEVICES {
        let path = dev.join(name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(|e| format!("creating device {}: {e}", path.display()))?;
        // mknod's mode went through the agent's umask.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    }
    for &(name, target) in DEFAULT_LINKS {
        let path: PathBuf = dev.join(name);
        symlink(target, &path).map_err(|e| format!("creating link {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> MountOptions {
        parse_options(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_and_data_are_split() {
        let o = opts(&["nosuid", "strictatime", "mode=755", "size=65536k"]);
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME);
        assert_eq!(o.data_string().as_deref(), Some("mode=755,size=65536k"));
        let o = opts(&[
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
            "gid=5",
        ]);
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC);
        assert_eq!(o.data, ["newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]);
        assert!(opts(&[]).data_string().is_none());
    }

    #[test]
    fn later_options_override_earlier_ones() {
        assert_eq!(opts(&["ro", "rw"]).flags, MsFlags::empty());
        assert_eq!(opts(&["rw", "ro"]).flags, MsFlags::MS_RDONLY);
        assert_eq!(
            opts(&["noatime", "atime", "relatime"]).flags,
            MsFlags::MS_RELATIME
        );
        assert_eq!(opts(&["sync", "dirsync", "async"]).flags, MsFlags::MS_DIRSYNC);
    }

    #[test]
    fn binds_and_propagation() {
        let o = opts(&["rbind", "ro", "rprivate", "defaults", "tmpcopyup"]);
        assert!(o.is_bind());
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY);
        assert_eq!(o.propagation, [MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
        assert!(o.data.is_empty());
        let o = opts(&["bind", "slave", "shared"]);
        assert_eq!(o.flags, MsFlags::MS_BIND);
        assert_eq!(o.propagation, [MsFlags::MS_SLAVE, MsFlags::MS_SHARED]);
    }
}

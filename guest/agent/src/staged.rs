//! Staged files: small host files the host sends with the container's spec,
//! written into the agent's own filesystem before the OCI mounts so that a
//! bind mount can name them as its source.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use skiff_protocol::{check_staged_path, Mount, StagedFile, STAGED_FILES_DIR};

use crate::log::debug;
use crate::resolve::in_root;

/// Writes every staged file under `base`, the `/` of the agent's own
/// filesystem: `/` in the VM, where the staging directory is in the
/// initramfs's `/run` and is left behind by the switch of root; the
/// container's root when hosted, so tests keep off the real `/run`.
pub fn write_all(base: &Path, files: &[StagedFile]) -> Result<(), String> {
    // Every path is checked before anything is written: a refused spec
    // leaves nothing behind.
    for file in files {
        check_staged_path(&file.path)?;
    }
    for file in files {
        write_one(base, file).map_err(|e| format!("staged file `{}`: {e}", file.path))?;
    }
    Ok(())
}

fn write_one(base: &Path, file: &StagedFile) -> Result<(), String> {
    let path = in_root(base, Path::new(&file.path));
    if let Some(parent) = path.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| format!("creating `{}`: {e}", parent.display()))?;
    }
    let mode = file.mode & 0o7777;
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        // The directory is the agent's, but a link there is never meant.
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| format!("creating `{}`: {e}", path.display()))?;
    out.write_all(&file.contents)
        .map_err(|e| format!("writing `{}`: {e}", path.display()))?;
    // open's mode went through the umask, and does not apply to a file
    // that was there already.
    out.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod `{}`: {e}", path.display()))?;
    debug!(
        "staged {} bytes at {} ({mode:o})",
        file.contents.len(),
        path.display()
    );
    Ok(())
}

/// `mounts` with the sources that are staged files' looked up under
/// `base`, as [`write_all`] put them there. In the VM (`base` is `/`) they
/// stay as they are.
pub fn locate_sources(base: &Path, mounts: &[Mount]) -> Vec<Mount> {
    mounts
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let Some(source) = m.source().as_deref().filter(|s| s.starts_with(STAGED_FILES_DIR)) {
                let located: PathBuf = in_root(base, source);
                m.set_source(Some(located));
            }
            m
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_protocol::staged_file_path;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("skiff-staged-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn file(path: &str, contents: &[u8], mode: u32) -> StagedFile {
        StagedFile {
            path: path.into(),
            contents: contents.to_vec(),
            mode,
        }
    }

    #[test]
    fn files_land_under_the_base_with_their_mode() {
        let d = scratch("write");
        let files = [
            file(&staged_file_path(0), b"hosts\n", 0o644),
            file(&staged_file_path(1), b"secret", 0o100600),
            file("/run/skiff/files/sub/dir/x", b"", 0o755),
        ];
        write_all(&d.0, &files).unwrap();
        let at = |p: &str| d.0.join(p.trim_start_matches('/'));
        assert_eq!(fs::read(at(&files[0].path)).unwrap(), b"hosts\n");
        let mode = |p: &str| fs::metadata(at(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&files[0].path), 0o644);
        assert_eq!(mode(&files[1].path), 0o600);
        assert_eq!(mode(&files[2].path), 0o755);
        // Written again (a retried spec), the new contents and mode win.
        write_all(&d.0, &[file(&staged_file_path(0), b"new", 0o600)]).unwrap();
        assert_eq!(fs::read(at(&files[0].path)).unwrap(), b"new");
        assert_eq!(mode(&files[0].path), 0o600);
    }

    #[test]
    fn one_bad_path_refuses_them_all() {
        let d = scratch("refuse");
        let files = [
            file(&staged_file_path(0), b"x", 0o644),
            file("/run/skiff/files/../escape", b"x", 0o644),
        ];
        let err = write_all(&d.0, &files).unwrap_err();
        assert!(err.contains("`..`"), "{err}");
        assert!(!d.0.join("run").exists());
    }

    #[test]
    fn only_staged_sources_move_under_the_base() {
        let mut staged = Mount::default();
        staged.set_destination("/etc/hosts".into());
        staged.set_source(Some(staged_file_path(0).into()));
        let mut other = Mount::default();
        other.set_destination("/data".into());
        other.set_source(Some("/srv/data".into()));
        let moved = locate_sources(Path::new("/tmp/root"), &[staged, other.clone()]);
        assert_eq!(
            moved[0].source().as_deref(),
            Some(Path::new("/tmp/root/run/skiff/files/0"))
        );
        assert_eq!(moved[1], other);
        let kept = locate_sources(Path::new("/"), &moved[1..]);
        assert_eq!(kept[0], other);
    }
}

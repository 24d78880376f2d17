//! The bundle's rootfs and bind mounts shared with the guest by virtio-fs,
//! with real microVMs: what the container does to `/` lands in the host's
//! rootfs directory, binds are live both ways, read-only binds and roots
//! refuse writes, and nothing outside the shares can be reached.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::oci::Oci;
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(300);
const SECRET: &str = "the host's secret";

/// A file tree as the test compares it: path → (kind and mode, owner, contents).
type Tree = BTreeMap<PathBuf, (u32, u32, Vec<u8>)>;

fn tree(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let contents = if meta.is_file() {
                std::fs::read(&path).unwrap()
            } else if meta.file_type().is_symlink() {
                std::fs::read_link(&path)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                Vec::new()
            };
            if meta.is_dir() {
                todo.push(path.clone());
            }
            out.insert(
                path.strip_prefix(root).unwrap().to_path_buf(),
                (meta.mode(), meta.uid(), contents),
            );
        }
    }
    out
}

fn bind(destination: &str, source: &Path, options: &[&str]) -> Value {
    json!({"destination": destination, "type": "bind", "source": source, "options": options})
}

/// `skiff run` of `bundle` as `id`, its output captured.
fn spawn_run(oci: &Oci, bundle: &Path, id: &str) -> Child {
    oci.skiff()
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to end, killing it after [`BOOT`].
fn finish(mut child: Child) -> (i32, String, String) {
    let deadline = Instant::now() + BOOT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the container did not end within {BOOT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.code().unwrap_or(-1), out, err)
}

/// One boot: changes to `/` in the guest are exactly the changes on the
/// host; a bind is live both ways while the container runs; a read-only
/// bind answers EROFS; symlinks, `..` and hard links do not leave a share.
#[test]
fn the_root_and_binds_are_the_hosts_directories() {
    let oci = Oci::new();
    oci.retry_on_host_defect(shared_root_and_binds);
    oci.assert_clean();
}

fn shared_root_and_binds(oci: &Oci) {
    let outside = oci.path("outside");
    let live = oci.path("live");
    for dir in [&outside, &live] {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
    }
    let secret = outside.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::write(live.join("read-only-view"), "seen through /ro\n").unwrap();

    // The script checks what only the guest can see and exits with the
    // number of the first check that failed.
    let script = format!(
        r#"set -u
        rm /pre/remove-me || exit 10
        truncate -s 4 /pre/trunc || exit 11
        chmod 750 /pre/chmod-me || exit 12
        echo one > /created || exit 13
        echo two > /to-rename && mv /to-rename /renamed || exit 14
        mkdir /newdir || exit 15
        echo guest-was-here > /live/from-guest || exit 20
        i=0
        while [ ! -e /live/from-host ]; do
            i=$((i + 1)); [ $i -lt 600 ] || exit 21
            sleep 0.2
        done
        cat /live/from-host
        cat /ro/read-only-view || exit 22
        if echo x 2>/dev/null > /ro/new; then exit 23; fi
        echo x 2>&1 > /ro/new | grep -q 'Read-only file system' || exit 24
        for link in /leak-abs /leak-rel; do
            if cat $link 2>/dev/null; then exit 30; fi
        done
        if cat /../../../..{secret} 2>/dev/null; then exit 31; fi
        if ln /live/from-guest /hardlink 2>/dev/null; then exit 32; fi
        echo done"#,
        secret = secret.display()
    );
    // A fresh copy of the rootfs for every attempt.
    let _ = std::fs::remove_dir_all(oci.path("shared"));
    let bundle = oci.bundle("shared", &["sh", "-c", &script], |c| {
        c["root"]["readonly"] = json!(false);
        c["mounts"].as_array_mut().unwrap().extend([
            bind("/live", &live, &["rbind", "rw"]),
            bind("/ro", &live, &["bind", "ro"]),
        ]);
    });
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir(rootfs.join("pre")).unwrap();
    std::fs::write(rootfs.join("pre/keep"), "keep\n").unwrap();
    std::fs::write(rootfs.join("pre/remove-me"), "gone\n").unwrap();
    std::fs::write(rootfs.join("pre/trunc"), "0123456789").unwrap();
    std::fs::write(rootfs.join("pre/chmod-me"), "mode\n").unwrap();
    std::fs::set_permissions(
        rootfs.join("pre/chmod-me"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    for dir in ["live", "ro"] {
        std::fs::create_dir(rootfs.join(dir)).unwrap();
    }
    std::os::unix::fs::symlink(&secret, rootfs.join("leak-abs")).unwrap();
    std::os::unix::fs::symlink(
        "../../../../../../../../../..".to_string() + secret.to_str().unwrap(),
        rootfs.join("leak-rel"),
    )
    .unwrap();
    let before = tree(&rootfs);

    let child = spawn_run(oci, &bundle, "shared");
    let pid = child.id() as i32;
    // The guest's file shows up on the host while the container runs; the
    // host's answer shows up in the guest.
    let deadline = Instant::now() + BOOT;
    // Created before it is written: wait for the whole line.
    while std::fs::read_to_string(live.join("from-guest")).ok().as_deref() != Some("guest-was-here\n") {
        assert!(
            Instant::now() < deadline,
            "the guest's file never reached the host"
        );
        // SAFETY: kill with signal 0 only checks the process exists.
        assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "the container ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        std::fs::read_to_string(live.join("from-guest")).unwrap(),
        "guest-was-here\n"
    );
    std::fs::write(live.join("from-host"), "host-was-here\n").unwrap();
    let (code, out, err) = finish(child);
    assert_eq!(
        code,
        0,
        "stdout:\n{out}\nstderr:\n{err}\nconsole:\n{}",
        oci.console("shared")
    );
    assert_eq!(out, "host-was-here\nseen through /ro\ndone\n", "stderr:\n{err}");
    assert!(!out.contains(SECRET));

    // Exactly the guest's changes, and nothing else, in the host's rootfs.
    let mut expected = before;
    expected.remove(Path::new("pre/remove-me"));
    expected.get_mut(Path::new("pre/trunc")).unwrap().2 = b"0123".to_vec();
    expected.get_mut(Path::new("pre/chmod-me")).unwrap().0 = libc::S_IFREG | 0o750;
    expected.insert("created".into(), (libc::S_IFREG | 0o644, 0, b"one\n".to_vec()));
    expected.insert("renamed".into(), (libc::S_IFREG | 0o644, 0, b"two\n".to_vec()));
    expected.insert("newdir".into(), (libc::S_IFDIR | 0o755, 0, Vec::new()));
    let after = tree(&rootfs);
    let differences: Vec<_> = after
        .keys()
        .chain(expected.keys())
        .filter(|k| after.get(*k) != expected.get(*k))
        .map(|k| {
            format!(
                "{}: host {:?}, expected {:?}",
                k.display(),
                after.get(k),
                expected.get(k)
            )
        })
        .collect();
    assert!(differences.is_empty(), "{differences:#?}");
    // Nothing escaped to, or was linked from, outside the shares.
    assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), SECRET);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    assert!(!live.join("new").exists());
}

/// One boot: `root.readonly` refuses writes to `/` while mounts still work,
/// and files keep their owners and modes both ways.
#[test]
fn a_read_only_root_and_owners() {
    let oci = Oci::new();
    oci.retry_on_host_defect(read_only_root_and_owners);
    oci.assert_clean();
}

fn read_only_root_and_owners(oci: &Oci) {
    let data = oci.path("data");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(1000), Some(1000)).unwrap();
    std::fs::write(data.join("host-file"), "x").unwrap();
    std::os::unix::fs::chown(data.join("host-file"), Some(1234), Some(4321)).unwrap();
    std::fs::set_permissions(data.join("host-file"), std::fs::Permissions::from_mode(0o604)).unwrap();
    let script = r#"set -u
        if touch /nope 2>/dev/null; then exit 10; fi
        touch /nope 2>&1 | grep -q 'Read-only file system' || exit 11
        touch /tmp/fine || exit 12
        stat -c '%u:%g %a' /data/host-file
        umask 027
        echo mine > /data/by-user || exit 13
        echo done"#;
    let _ = std::fs::remove_dir_all(oci.path("readonly"));
    let bundle = oci.bundle("readonly", &["sh", "-c", script], |c| {
        c["root"]["readonly"] = json!(true);
        c["process"]["user"] = json!({"uid": 1000, "gid": 1000});
        c["mounts"].as_array_mut().unwrap().extend([
            bind("/data", &data, &["rbind", "rw"]),
            json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]}),
        ]);
    });
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("data")).unwrap();
    let before = tree(&rootfs);
    let child = spawn_run(oci, &bundle, "readonly");
    let (code, out, err) = finish(child);
    assert_eq!(
        code,
        0,
        "stdout:\n{out}\nstderr:\n{err}\nconsole:\n{}",
        oci.console("readonly")
    );
    assert_eq!(out, "1234:4321 604\ndone\n", "stderr:\n{err}");
    let made = std::fs::metadata(data.join("by-user")).unwrap();
    assert_eq!((made.uid(), made.gid(), made.mode() & 0o777), (1000, 1000, 0o640));
    // The mount points existed; nothing else may have changed.
    assert_eq!(tree(&rootfs), before);
}

/// No VM: bind mounts that cannot work are refused by `create` with the
/// mount named, and nothing is left behind.
#[test]
fn bad_binds_are_refused_before_a_vm() {
    let oci = Oci::new();
    let existing = oci.path("existing");
    std::fs::create_dir_all(&existing).unwrap();
    let cases: [(Value, &str); 4] = [
        (
            bind("/data", &oci.path("missing"), &["rbind"]),
            "mount /data: source",
        ),
        (
            bind("data", &existing, &["rbind"]),
            "mount data: the destination must be an absolute path",
        ),
        (
            bind("/data", &existing, &["rbind", "idmap"]),
            "mount /data: option \"idmap\" is not supported on a bind mount",
        ),
        (
            json!({"destination": "/data", "type": "bind", "source": "relative/dir", "options": ["bind"]}),
            "source relative/dir is not an absolute path",
        ),
    ];
    for (i, (mount, want)) in cases.into_iter().enumerate() {
        let id = format!("bad{i}");
        let bundle = oci.bundle(&id, &["true"], |c| {
            c["mounts"].as_array_mut().unwrap().push(mount.clone());
        });
        let err = oci.fails(&["create", "--bundle", bundle.to_str().unwrap(), &id]);
        assert!(err.contains(want), "{want:?} not in: {err}");
        assert!(oci.console(&id).is_empty(), "a VM was started for {id}");
        assert!(!bundle.join("rootfs/data").exists());
    }
    let err = oci.fails(&[
        "create",
        "--bundle",
        oci.bundle("annot", &["true"], |c| {
            c["annotations"] = json!({"io.skiff.rootfs": "nfs"});
        })
        .to_str()
        .unwrap(),
        "annot",
    ]);
    assert!(err.contains("io.skiff.rootfs"), "{err}");
    oci.assert_clean();
}

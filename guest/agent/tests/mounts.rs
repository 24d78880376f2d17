//! The OCI mounts, set up under a scratch root (hosted, the agent does not
//! switch into it) and taken down again by the test.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{process, sh, Host, TempDir};
use nix::mount::{umount2, MntFlags};
use skiff_protocol::{staged_file_path, ExitStatus, Mount, StagedFile, INIT_ID};

fn mount(destination: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(destination.into());
    m.set_typ(Some(typ.into()));
    m.set_source(Some(source.into()));
    m.set_options(Some(options.iter().map(|o| o.to_string()).collect()));
    m
}

/// Detaches the mounts under a scratch root however the test ends.
struct Mounted(Vec<PathBuf>);

impl Drop for Mounted {
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            let _ = umount2(path, MntFlags::MNT_DETACH);
        }
    }
}

#[test]
fn oci_mounts_are_set_up_in_order_under_the_root() {
    let root = TempDir::new("root");
    let files = TempDir::new("files");
    let config = files.path().join("config");
    std::fs::write(&config, "setting\n").unwrap();
    let mounts = vec![
        // The host's programs, so the container process can run.
        mount("/bin", "bind", "/bin", &["rbind", "ro"]),
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
        mount(
            "/etc/config",
            "none",
            config.to_str().unwrap(),
            &["bind", "ro", "rprivate"],
        ),
        mount("/run", "tmpfs", "tmpfs", &["noexec", "size=1m"]),
    ];
    let r = root.path();
    let _mounted = Mounted(
        ["bin", "proc", "dev", "etc/config", "run"]
            .iter()
            .map(|p| r.join(p))
            .collect(),
    );

    let mut host = Host::new(r);
    host.create_spec(mounts, process(&["true"]))
        .expect("creating the container");
    let o = host.run(INIT_ID, false, b"");
    assert_eq!(o.status, ExitStatus::Code(0));
    host.shutdown();

    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let meta = std::fs::metadata(r.join("dev").join(name)).unwrap();
        assert!(meta.file_type().is_char_device(), "{name}");
        assert_eq!(meta.rdev(), nix::sys::stat::makedev(major, minor), "{name}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o666, "{name}");
    }
    assert_eq!(
        std::fs::read_link(r.join("dev/ptmx")).unwrap(),
        Path::new("pts/ptmx")
    );
    assert_eq!(
        std::fs::read_link(r.join("dev/fd")).unwrap(),
        Path::new("/proc/self/fd")
    );
    assert_eq!(
        std::fs::read_link(r.join("dev/stderr")).unwrap(),
        Path::new("/proc/self/fd/2")
    );
    assert!(r.join("dev/pts/ptmx").exists());
    assert!(r.join("proc/self/status").exists());
    assert_eq!(
        std::fs::read_to_string(r.join("etc/config")).unwrap(),
        "setting\n"
    );
    let err = std::fs::write(r.join("etc/config"), "changed").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = std::fs::write(r.join("bin/new"), "x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    std::fs::write(r.join("run/file"), "x").unwrap();
}

#[test]
fn a_missing_bind_source_fails_the_container_naming_the_mount() {
    let root = TempDir::new("root");
    let mut host = Host::new(root.path());
    let mounts = vec![mount("/data", "bind", "/no/such/source", &["bind"])];
    let (error, code) = host.create_spec(mounts, process(&["true"])).unwrap_err();
    assert_eq!(code, 1);
    assert!(
        error.starts_with("mount `/data`: source `/no/such/source`"),
        "{error}"
    );
    host.shutdown();
}

#[test]
fn a_staged_file_is_bound_like_any_other_source() {
    let root = TempDir::new("root");
    let r = root.path();
    let hosts = b"127.0.0.1 localhost\n10.0.0.2 db\n".to_vec();
    let files = vec![
        StagedFile {
            path: staged_file_path(0),
            contents: hosts.clone(),
            mode: 0o640,
        },
        StagedFile {
            path: staged_file_path(1),
            contents: (0..=255).collect(),
            mode: 0o600,
        },
    ];
    let mounts = vec![
        mount("/bin", "bind", "/bin", &["rbind", "ro"]),
        mount("/etc/hosts", "bind", &staged_file_path(0), &["rbind", "ro"]),
        mount("/data/blob", "bind", &staged_file_path(1), &["bind"]),
    ];
    let _mounted = Mounted(
        ["bin", "etc/hosts", "data/blob"]
            .iter()
            .map(|p| r.join(p))
            .collect(),
    );
    // Hosted, the container's processes see the host's filesystem, the
    // container's root under `r`.
    let script = format!("cat {0}; stat -c %a {0}", r.join("etc/hosts").display());

    let mut host = Host::new(r);
    host.create_staged(files, mounts, sh(&script))
        .expect("creating the container");
    let o = host.run(INIT_ID, false, b"");
    host.shutdown();
    assert_eq!(o.status, ExitStatus::Code(0), "stderr: {}", o.stderr);
    let want = format!("{}640\n", String::from_utf8(hosts).unwrap());
    assert_eq!(o.stdout, want);
    // Hosted, the staging directory is under the container's root, not
    // the host's /run.
    let staged = r.join("run/skiff/files/0");
    assert_eq!(
        std::fs::metadata(&staged).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    let err = std::fs::write(r.join("etc/hosts"), "changed").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let blob = std::fs::read(r.join("data/blob")).unwrap();
    assert_eq!(blob, (0..=255).collect::<Vec<u8>>());
}

#[test]
fn a_staged_file_outside_the_staging_directory_is_refused() {
    let root = TempDir::new("root");
    let mut host = Host::new(root.path());
    let files = vec![StagedFile {
        path: "/run/skiff/files/../../../etc/passwd".into(),
        contents: b"root::0:0::/:/bin/sh\n".to_vec(),
        mode: 0o644,
    }];
    let (error, code) = host
        .create_staged(files, Vec::new(), process(&["true"]))
        .unwrap_err();
    assert_eq!(code, 1);
    assert!(error.contains("must not contain `..`"), "{error}");
    assert!(!root.path().join("etc").exists());
    host.shutdown();

    let mut host = Host::new(root.path());
    let files = vec![StagedFile {
        path: "/etc/hosts".into(),
        contents: Vec::new(),
        mode: 0o644,
    }];
    let (error, _) = host
        .create_staged(files, Vec::new(), process(&["true"]))
        .unwrap_err();
    assert!(error.contains("not under /run/skiff/files"), "{error}");
    host.shutdown();
}

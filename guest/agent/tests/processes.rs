//! The agent's processes, driven as the host drives them, with the host's
//! own /bin/sh and coreutils.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{process, run_init, sh, Host, TempDir};
use oci_spec::runtime::{
    Capabilities, Capability, LinuxCapabilitiesBuilder, PosixRlimitBuilder, PosixRlimitType,
};
use skiff_protocol::{AgentMessage, ExitStatus, HostMessage, INIT_ID};

#[test]
fn output_goes_to_its_stream_and_the_exit_code_comes_back() {
    let o = run_init(sh("echo out; echo err >&2; exit 3"), b"");
    assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("out\n", "err\n"));
    assert_eq!(o.status, ExitStatus::Code(3));
    assert_eq!(o.error, None);
}

#[test]
fn a_process_starts_with_only_its_stdio_and_no_blocked_or_ignored_signals() {
    // The agent keeps many descriptors and ignores SIGPIPE; none of it may
    // reach the process. `ls` lists its own fds: 0-2 and the directory.
    let o = run_init(process(&["ls", "/proc/self/fd"]), b"");
    assert_eq!(o.stdout, "0\n1\n2\n3\n");
    let o = run_init(process(&["cat", "/proc/self/status"]), b"");
    let fields = |name: &str| {
        o.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(fields("SigBlk:"), "0000000000000000", "{}", o.stdout);
    assert_eq!(fields("SigIgn:"), "0000000000000000", "{}", o.stdout);
    assert_eq!(fields("Name:"), "cat");
}

#[test]
fn stdin_reaches_the_process_and_its_end_ends_cat() {
    let o = run_init(process(&["cat"]), b"hello\nworld\n");
    assert_eq!(o.stdout, "hello\nworld\n");
    assert_eq!(o.status, ExitStatus::Code(0));
}

#[test]
fn ten_mib_of_output_arrive_intact() {
    let dir = TempDir::new("bulk");
    let copy = dir.path().join("data");
    let script = format!("head -c 10485760 /dev/urandom | tee {}", copy.display());
    let mut host = Host::new(Path::new("/"));
    host.create(sh(&script)).unwrap();
    let mut streams = host.attach(INIT_ID, false);
    host.start(INIT_ID);
    streams.close_stdin();
    assert_eq!(host.exited(INIT_ID), (ExitStatus::Code(0), None));
    let (out, err) = streams.output();
    assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
    assert_eq!(out.len(), 10 << 20);
    assert!(
        out == std::fs::read(&copy).unwrap(),
        "the bytes differ from what was written"
    );
    host.shutdown();
}

#[test]
fn environment_cwd_and_home_are_the_specs() {
    let mut p = sh("echo $FOO; pwd; echo $HOME");
    p.set_env(Some(vec!["FOO=bar baz".into(), "PATH=/usr/bin:/bin".into()]));
    p.set_cwd("/tmp".into());
    let o = run_init(p, b"");
    assert_eq!(o.stdout, format!("bar baz\n/tmp\n{}\n", home_of(0)));

    let mut p = sh("echo $HOME");
    p.set_env(Some(vec!["HOME=/somewhere".into()]));
    assert_eq!(run_init(p, b"").stdout, "/somewhere\n");
}

/// What the agent should pick as HOME: the host's passwd is the
/// container's here, since the root is `/`.
fn home_of(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[2] == uid.to_string())
        .map_or("/".to_string(), |f| f[5].to_string())
}

#[test]
fn user_groups_umask_and_rlimits_are_the_specs() {
    let mut p = sh("id -u; id -g; id -G; umask; ulimit -n; echo $HOME");
    let user = p.user_mut();
    user.set_uid(1000);
    user.set_gid(1001);
    user.set_additional_gids(Some(vec![10, 20]));
    user.set_umask(Some(0o027));
    let nofile = PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .soft(123u64)
        .hard(456u64)
        .build()
        .unwrap();
    p.set_rlimits(Some(vec![nofile]));
    let o = run_init(p, b"");
    let want = format!("1000\n1001\n1001 10 20\n0027\n123\n{}\n", home_of(1000));
    assert_eq!(o.stdout, want, "stderr: {}", o.stderr);
    assert_eq!(o.status, ExitStatus::Code(0));
}

fn status_fields(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| {
            ["NoNewPrivs", "CapEff", "CapBnd", "CapAmb", "CapPrm"]
                .iter()
                .any(|f| l.starts_with(f))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn capabilities_and_no_new_privileges_are_the_specs() {
    let set: Capabilities = [Capability::Chown, Capability::Kill].into_iter().collect();
    let caps = LinuxCapabilitiesBuilder::default()
        .bounding(set.clone())
        .effective(set.clone())
        .permitted(set.clone())
        .inheritable(set.clone())
        .ambient(set)
        .build()
        .unwrap();
    // CAP_CHOWN is bit 0 and CAP_KILL bit 5.
    let mut p = process(&["cat", "/proc/self/status"]);
    p.set_capabilities(Some(caps.clone()));
    p.set_no_new_privileges(Some(true));
    let fields = status_fields(&run_init(p, b"").stdout);
    assert!(fields.contains(&"NoNewPrivs: 1".to_string()), "{fields:?}");
    assert!(
        fields.contains(&"CapBnd: 0000000000000021".to_string()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"CapEff: 0000000000000021".to_string()),
        "{fields:?}"
    );

    // Not root: only the ambient set carries capabilities across execve.
    let mut p = process(&["cat", "/proc/self/status"]);
    p.set_capabilities(Some(caps));
    p.user_mut().set_uid(1000);
    let fields = status_fields(&run_init(p, b"").stdout);
    assert!(fields.contains(&"NoNewPrivs: 0".to_string()), "{fields:?}");
    assert!(
        fields.contains(&"CapEff: 0000000000000021".to_string()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"CapAmb: 0000000000000021".to_string()),
        "{fields:?}"
    );

    // No capabilities object: a user other than root has none left.
    let mut p = process(&["cat", "/proc/self/status"]);
    p.user_mut().set_uid(1000);
    let fields = status_fields(&run_init(p, b"").stdout);
    assert!(
        fields.contains(&"CapEff: 0000000000000000".to_string()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"CapPrm: 0000000000000000".to_string()),
        "{fields:?}"
    );
}

#[test]
fn a_signal_ends_a_sleeping_process() {
    let mut host = Host::new(Path::new("/"));
    host.create(process(&["sleep", "1000"])).unwrap();
    let streams = host.attach(INIT_ID, false);
    host.start(INIT_ID);
    host.send(&HostMessage::Signal {
        id: INIT_ID.into(),
        signal: 15,
        all: false,
    });
    let (status, _) = host.exited(INIT_ID);
    assert_eq!(status, ExitStatus::Signal(15));
    assert_eq!(status.shell_code(), 143);
    let (out, err) = streams.output();
    assert!(out.is_empty() && err.is_empty());
    host.send(&HostMessage::Signal {
        id: "nobody".into(),
        signal: 15,
        all: false,
    });
    let failed = host.expect("Failed", |m| match m {
        AgentMessage::Failed { id, .. } => Some(id.clone()),
        _ => None,
    });
    assert_eq!(failed, "nobody");
    host.shutdown();
}

#[test]
fn orphans_and_zombies_do_not_hold_up_the_end() {
    // The background sleep keeps stdout open after sh exits; it must not
    // keep the exit from being reported.
    let began = Instant::now();
    let o = run_init(sh("sleep 5 & echo parent"), b"");
    assert_eq!((o.status, o.stdout.as_str()), (ExitStatus::Code(0), "parent\n"));
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "took {:?}",
        began.elapsed()
    );

    // `sleep` never waits for the child it inherited from sh: a zombie
    // until its parent ends and it is reparented to the agent.
    let o = run_init(sh("true & exec sleep 0.3"), b"");
    assert_eq!(o.status, ExitStatus::Code(0));
}

#[test]
fn missing_and_unusable_executables_fail_before_the_process_exists() {
    let mut host = Host::new(Path::new("/"));
    let (error, code) = host.create(process(&["no-such-command-here"])).unwrap_err();
    assert_eq!(code, 127);
    assert_eq!(error, "executable file `no-such-command-here` not found in $PATH");
    host.shutdown();

    let mut host = Host::new(Path::new("/"));
    let (error, code) = host.create(process(&["/no/such/file"])).unwrap_err();
    assert_eq!(
        (error.as_str(), code),
        ("/no/such/file: no such file or directory", 127)
    );
    host.shutdown();

    let dir = TempDir::new("noexec");
    let file = dir.path().join("script");
    std::fs::write(&file, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut host = Host::new(Path::new("/"));
    let (error, code) = host.create(process(&[file.to_str().unwrap()])).unwrap_err();
    assert_eq!(code, 126, "{error}");
    assert!(error.contains("permission denied"), "{error}");
    host.shutdown();

    let mut host = Host::new(Path::new("/"));
    let (error, code) = host.create(process(&[])).unwrap_err();
    assert_eq!(code, 1);
    assert!(error.contains("process.args"), "{error}");
    host.shutdown();
}

#[test]
fn a_failure_after_start_is_reported_with_the_exit() {
    let mut p = process(&["true"]);
    p.set_cwd("/no/such/dir".into());
    let o = run_init(p, b"");
    assert_eq!(o.status, ExitStatus::Code(1));
    let error = o.error.expect("an error");
    assert!(error.starts_with("chdir to `/no/such/dir`"), "{error}");
}

#[test]
fn exec_runs_beside_the_container_process() {
    let mut host = Host::new(Path::new("/"));
    host.create(process(&["cat"])).unwrap();
    let mut init = host.attach(INIT_ID, false);
    host.start(INIT_ID);
    init.write_stdin(b"first\n");

    host.exec("e1", sh("echo from-exec; echo to-err >&2")).unwrap();
    let o = host.run("e1", false, b"");
    assert_eq!(
        (o.stdout.as_str(), o.stderr.as_str()),
        ("from-exec\n", "to-err\n")
    );
    assert_eq!(o.status, ExitStatus::Code(0));
    let (error, _) = host.exec("e1", process(&["true"])).unwrap_err();
    assert!(error.contains("exists"), "{error}");

    init.close_stdin();
    assert_eq!(host.exited(INIT_ID).0, ExitStatus::Code(0));
    assert_eq!(init.output().0, b"first\n");
    host.shutdown();
}

#[test]
fn processes_that_write_and_exit_at_once_lose_nothing() {
    let mut host = Host::new(Path::new("/"));
    host.create(process(&["sleep", "1000"])).unwrap();
    let _init = host.attach(INIT_ID, false);
    host.start(INIT_ID);
    for i in 0..10 {
        let id = format!("quick{i}");
        host.exec(&id, process(&["echo", &id])).unwrap();
        let o = host.run(&id, false, b"");
        assert_eq!(o.stdout, format!("{id}\n"));
    }
    host.exec("burst", sh("head -c 300000 /dev/zero; echo end >&2"))
        .unwrap();
    let o = host.run("burst", false, b"");
    assert_eq!((o.stdout.len(), o.stderr.as_str()), (300000, "end\n"));
    host.shutdown();
}

#[test]
fn the_end_of_the_container_ends_its_other_processes_first() {
    let mut host = Host::new(Path::new("/"));
    host.create(process(&["cat"])).unwrap();
    let mut init = host.attach(INIT_ID, false);
    host.start(INIT_ID);
    host.exec("sleeper", process(&["sleep", "1000"])).unwrap();
    let sleeper = host.attach("sleeper", false);
    host.start("sleeper");
    // Created but never started: killed all the same.
    host.exec("waiting", process(&["sleep", "1000"])).unwrap();
    init.close_stdin();
    let mut ends = Vec::new();
    while ends.len() < 3 {
        if let AgentMessage::Exited { id, status, .. } = host.recv() {
            ends.push((id, status));
        }
    }
    assert_eq!(ends[2], (INIT_ID.to_string(), ExitStatus::Code(0)));
    assert!(
        ends.contains(&("sleeper".into(), ExitStatus::Signal(9))),
        "{ends:?}"
    );
    assert!(
        ends.contains(&("waiting".into(), ExitStatus::Signal(9))),
        "{ends:?}"
    );
    sleeper.output();
    host.send(&HostMessage::Exec {
        id: "late".into(),
        process: process(&["true"]),
    });
    assert!(matches!(host.recv(), AgentMessage::Failed { .. }));
    host.shutdown();
}

#[test]
fn streams_may_attach_after_start() {
    let mut host = Host::new(Path::new("/"));
    host.create(sh("echo late")).unwrap();
    host.send(&HostMessage::Start { id: INIT_ID.into() });
    std::thread::sleep(Duration::from_millis(100));
    let mut streams = host.attach(INIT_ID, false);
    host.expect("Started", |m| {
        matches!(m, AgentMessage::Started { .. }).then_some(())
    });
    streams.close_stdin();
    assert_eq!(host.exited(INIT_ID).0, ExitStatus::Code(0));
    assert_eq!(streams.output().0, b"late\n");
    host.shutdown();
}

#[test]
fn a_terminal_process_gets_a_pty_of_the_requested_size() {
    let mut host = Host::new(Path::new("/"));
    host.create(process(&["sleep", "1000"])).unwrap();
    let _init = host.attach(INIT_ID, false);
    host.start(INIT_ID);

    let mut p = sh("tty; stty size");
    p.set_terminal(Some(true));
    p.set_console_size(Some(
        oci_spec::runtime::BoxBuilder::default()
            .height(24u64)
            .width(80u64)
            .build()
            .unwrap(),
    ));
    host.exec("tty", p).unwrap();
    let o = host.run("tty", true, b"");
    assert_eq!(o.status, ExitStatus::Code(0));
    assert!(o.stdout.starts_with("/dev/pts/"), "{:?}", o.stdout);
    assert!(o.stdout.ends_with("24 80\r\n"), "{:?}", o.stdout);

    let mut p = sh("read line; stty size");
    p.set_terminal(Some(true));
    host.exec("resized", p).unwrap();
    let mut streams = host.attach("resized", true);
    host.start("resized");
    host.send(&HostMessage::ResizeTerminal {
        id: "resized".into(),
        rows: 30,
        cols: 100,
    });
    // Control messages are handled in order: once this one is answered,
    // the resize is done, and stdin (another connection) may go.
    host.send(&HostMessage::Signal {
        id: "barrier".into(),
        signal: 0,
        all: false,
    });
    host.expect("Failed", |m| {
        matches!(m, AgentMessage::Failed { .. }).then_some(())
    });
    streams.write_stdin(b"\n");
    assert_eq!(host.exited("resized").0, ExitStatus::Code(0));
    let out = String::from_utf8(streams.output().0).unwrap();
    assert!(out.ends_with("30 100\r\n"), "{out:?}");
    host.shutdown();
}

/// Waits until `path` holds a pid, as a script writes it.
fn read_pid(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` still runs (a zombie has ended).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn a_signal_to_all_reaches_every_process_and_their_descendants() {
    let dir = TempDir::new("kill-all");
    let ready = dir.path().join("ready");
    let pidfile = dir.path().join("pid");
    let mut host = Host::new(Path::new("/"));
    // The container's process survives the signal, so its end does not
    // kill the others before the signal could.
    let script = format!(
        "trap 'echo got-term' TERM; echo $$ > {}; until read line; do :; done",
        ready.display()
    );
    host.create(sh(&script)).unwrap();
    let mut init = host.attach(INIT_ID, false);
    host.start(INIT_ID);
    read_pid(&ready);
    host.exec("e1", process(&["sleep", "1000"])).unwrap();
    let _e1 = host.attach("e1", false);
    host.start("e1");
    // A grandchild in a session of its own, out of reach of a signal to
    // e2's group.
    let script = format!(
        "setsid sh -c 'echo $$ > {}; exec sleep 1000' </dev/null >/dev/null 2>&1 & wait",
        pidfile.display()
    );
    host.exec("e2", sh(&script)).unwrap();
    let _e2 = host.attach("e2", false);
    host.start("e2");
    let grandchild = read_pid(&pidfile);
    assert!(running(grandchild));

    // Answered like a signal to one process.
    for (id, signal, want) in [("nobody", 15, "no such process"), ("e1", 12345, "signal 12345: ")] {
        host.send(&HostMessage::Signal {
            id: id.into(),
            signal,
            all: true,
        });
        let error = host.expect("Failed", |m| match m {
            AgentMessage::Failed { id: i, error, .. } if i == id => Some(error.clone()),
            _ => None,
        });
        assert!(error.starts_with(want), "{error}");
    }

    host.send(&HostMessage::Signal {
        id: "e1".into(),
        signal: 15,
        all: true,
    });
    assert_eq!(host.exited("e1").0, ExitStatus::Signal(15));
    assert_eq!(host.exited("e2").0, ExitStatus::Signal(15));
    let deadline = Instant::now() + Duration::from_secs(20);
    while running(grandchild) {
        assert!(Instant::now() < deadline, "the grandchild {grandchild} survived");
        std::thread::sleep(Duration::from_millis(10));
    }
    init.write_stdin(b"\n");
    assert_eq!(host.exited(INIT_ID).0, ExitStatus::Code(0));
    assert_eq!(init.output().0, b"got-term\n");
    host.shutdown();
}

#[test]
fn list_processes_shows_the_containers_processes_but_not_the_agent() {
    let mut host = Host::new(Path::new("/"));
    assert_eq!(host.list_processes("before"), []);
    let init = host.create(process(&["sleep", "1000"])).unwrap();
    let _init = host.attach(INIT_ID, false);
    host.start(INIT_ID);
    let mut p = sh("sleep 999 & wait");
    p.user_mut().set_uid(1000);
    host.exec("e1", p).unwrap();
    let _e1 = host.attach("e1", false);
    host.start("e1");

    // `Started` comes just before `execve`: the programs take a moment to
    // show up.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut request = 0;
    let list = loop {
        request += 1;
        let list = host.list_processes(&format!("ps-{request}"));
        let has = |command: &str| list.iter().any(|p| p.command == command);
        if has("sleep 1000") && has("sh -c sleep 999 & wait") && has("sleep 999") {
            break list;
        }
        assert!(Instant::now() < deadline, "{list:#?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let agent = std::process::id() as i32;
    let find = |command: &str| list.iter().find(|p| p.command == command).unwrap();
    let sleeper = find("sleep 1000");
    assert_eq!((sleeper.pid, sleeper.ppid, sleeper.uid), (init, agent, 0));
    assert!(["S", "R"].contains(&sleeper.state.as_str()), "{sleeper:?}");
    let shell = find("sh -c sleep 999 & wait");
    let child = find("sleep 999");
    assert_eq!((shell.ppid, shell.uid), (agent, 1000));
    assert_eq!((child.ppid, child.uid), (shell.pid, 1000));
    assert_eq!(list.len(), 3, "only the agent's own processes: {list:#?}");
    assert!(list.windows(2).all(|w| w[0].pid < w[1].pid), "{list:#?}");
    host.shutdown();
}

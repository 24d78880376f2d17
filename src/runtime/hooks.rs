//! OCI lifecycle hooks (config.json `hooks`): programs run on the host at
//! points of a container's life, each given the container's state on stdin.
//!
//! Here all of them run on the host, in the runtime's namespaces, even
//! those the spec runs in the container's (`createContainer`, and
//! `startContainer`, whose path it also resolves in the container): the
//! container lives in a VM the host cannot enter.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{Hook, Hooks};
use serde::Serialize;

use super::error::RuntimeError;

/// Output kept from each of a hook's stdout and stderr; the rest is read
/// and dropped so the hook never blocks on a full pipe.
const OUTPUT_KEPT: usize = 64 << 10;
/// How long output may still arrive after a hook exited: a process it left
/// running can hold its pipes open indefinitely.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// Upper bound on the pause between checks of a hook with a timeout.
const MAX_POLL: Duration = Duration::from_millis(50);

/// The points of the lifecycle that have hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    /// Deprecated by the spec in favour of the three that follow; runc still
    /// runs them at `createRuntime`'s point, just before those.
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl HookKind {
    pub const ALL: [HookKind; 6] = [
        HookKind::Prestart,
        HookKind::CreateRuntime,
        HookKind::CreateContainer,
        HookKind::StartContainer,
        HookKind::Poststart,
        HookKind::Poststop,
    ];

    /// The name the spec (and config.json) gives it.
    pub fn name(self) -> &'static str {
        match self {
            HookKind::Prestart => "prestart",
            HookKind::CreateRuntime => "createRuntime",
            HookKind::CreateContainer => "createContainer",
            HookKind::StartContainer => "startContainer",
            HookKind::Poststart => "poststart",
            HookKind::Poststop => "poststop",
        }
    }

    fn of(self, hooks: &Hooks) -> &[Hook] {
        #[allow(deprecated)]
        let list = match self {
            HookKind::Prestart => hooks.prestart(),
            HookKind::CreateRuntime => hooks.create_runtime(),
            HookKind::CreateContainer => hooks.create_container(),
            HookKind::StartContainer => hooks.start_container(),
            HookKind::Poststart => hooks.poststart(),
            HookKind::Poststop => hooks.poststop(),
        };
        list.as_deref().unwrap_or_default()
    }
}

impl fmt::Display for HookKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Runs the `kind` hooks in order, each with `state` (the OCI state
/// document) on stdin; the first that fails stops the rest.
pub fn run_hooks(hooks: &Hooks, kind: HookKind, state: &impl Serialize) -> Result<(), RuntimeError> {
    let list = kind.of(hooks);
    if list.is_empty() {
        return Ok(());
    }
    let state = state_json(kind, state)?;
    for hook in list {
        run_hook(kind, hook, &state)?;
    }
    Ok(())
}

/// Runs every `kind` hook, logging failures instead of returning them: the
/// spec's rule for `poststart` and `poststop`, whose failure must not stop
/// the lifecycle.
pub fn run_hooks_logged(hooks: &Hooks, kind: HookKind, state: &impl Serialize) {
    let list = kind.of(hooks);
    if list.is_empty() {
        return;
    }
    let state = match state_json(kind, state) {
        Ok(state) => state,
        Err(e) => {
            tracing::warn!("{e}");
            return;
        }
    };
    for hook in list {
        if let Err(e) = run_hook(kind, hook, &state) {
            tracing::warn!("{e}");
        }
    }
}

fn state_json(kind: HookKind, state: &impl Serialize) -> Result<Vec<u8>, RuntimeError> {
    serde_json::to_vec(state)
        .map_err(|e| RuntimeError::Hook(format!("{kind} hooks: serializing the state: {e}")))
}

/// What a hook wrote, each stream cut at [`OUTPUT_KEPT`] bytes.
#[derive(Debug, Default)]
struct HookOutput {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

fn run_hook(kind: HookKind, hook: &Hook, state: &[u8]) -> Result<HookOutput, RuntimeError> {
    let path = hook.path();
    let fail = |what: &str| RuntimeError::Hook(format!("{kind} hook {}: {what}", path.display()));
    if !path.is_absolute() {
        return Err(fail("the path must be absolute"));
    }
    let timeout = match hook.timeout() {
        None => None,
        Some(secs) if secs > 0 => Some(Duration::from_secs(secs.unsigned_abs())),
        Some(secs) => return Err(fail(&format!("timeout {secs} must be greater than zero"))),
    };
    if !path.exists() {
        return Err(fail("does not exist"));
    }

    let mut command = Command::new(path);
    // args[0] is argv[0], as with execve; without args it is the path.
    if let Some((argv0, rest)) = hook.args().as_deref().and_then(<[String]>::split_first) {
        command.arg0(argv0).args(rest);
    }
    command.env_clear();
    for entry in hook.env().iter().flatten() {
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| fail(&format!("env entry {entry:?} is not KEY=VALUE")))?;
        command.env(key, value);
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0);

    tracing::debug!(hook = %kind, path = %path.display(), "running hook");
    let mut child = command
        .spawn()
        .map_err(|e| fail(&format!("cannot be run: {e}")))?;
    feed(&mut child, state);
    let stdout = capture(child.stdout.take());
    let stderr = capture(child.stderr.take());

    let deadline = timeout.map(|t| Instant::now() + t);
    let status = wait(&mut child, deadline).map_err(|e| fail(&format!("waiting for it: {e}")))?;
    let Some(status) = status else {
        kill(&mut child);
        let secs = timeout.map_or(0, |t| t.as_secs());
        return Err(fail(&format!("timed out after {secs} s and was killed")));
    };

    let output_deadline = Instant::now() + OUTPUT_GRACE;
    let output = HookOutput {
        stdout: stdout.collect(output_deadline),
        stderr: stderr.collect(output_deadline),
    };
    tracing::debug!(
        hook = %kind,
        path = %path.display(),
        %status,
        stdout = %String::from_utf8_lossy(&output.stdout).trim_end(),
        stderr = %String::from_utf8_lossy(&output.stderr).trim_end(),
        "hook finished"
    );
    if !status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        let mut message = format!("{kind} hook {} failed: {}", path.display(), describe(status));
        if !stderr.is_empty() {
            message = format!("{message}: {stderr}");
        }
        return Err(RuntimeError::Hook(message));
    }
    Ok(output)
}

/// Writes the state to the hook's stdin from a thread of its own: a hook
/// that does not read it must not block the runtime, and one that exits
/// without reading it only makes the write fail.
fn feed(child: &mut Child, state: &[u8]) {
    let Some(mut stdin) = child.stdin.take() else {
        return;
    };
    let state = state.to_vec();
    thread::spawn(move || {
        let _ = stdin.write_all(&state);
    });
}

/// A pipe being read to its end by a thread of its own.
struct Captured {
    buffer: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

fn capture(pipe: Option<impl Read + Send + 'static>) -> Captured {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let (tx, done) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        let kept = buffer.clone();
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                let n = match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
                let room = OUTPUT_KEPT.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
            let _ = tx.send(());
        });
    }
    Captured { buffer, done }
}

impl Captured {
    /// What arrived until the pipe ended or `deadline` passed.
    fn collect(self, deadline: Instant) -> Vec<u8> {
        let _ = self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()));
        std::mem::take(&mut *self.buffer.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Waits for the hook to exit; `None` if `deadline` came first.
fn wait(child: &mut Child, deadline: Option<Instant>) -> std::io::Result<Option<ExitStatus>> {
    let Some(deadline) = deadline else {
        return child.wait().map(Some);
    };
    // Polling keeps the child unreaped until it is known to have exited,
    // so a kill after the deadline cannot reach a recycled pid.
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        thread::sleep(pause.min(left));
        pause = (pause * 2).min(MAX_POLL);
    }
}

fn kill(child: &mut Child) {
    let group = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    if let Err(e) = killpg(group, Signal::SIGKILL) {
        tracing::debug!("killing hook process group {group}: {e}");
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// "exit status 3", or "killed by signal 9 (SIGKILL)".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(name) => format!("killed by signal {signal} ({name})"),
            Err(_) => format!("killed by signal {signal}"),
        },
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A hook running `script` in /bin/sh; `"$@"` are `args`.
    fn sh(script: &str, args: &[&str]) -> Hook {
        let mut argv = vec!["sh".to_owned(), "-c".into(), script.into(), "sh".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let mut hook = Hook::default();
        hook.set_path("/bin/sh".into()).set_args(Some(argv));
        hook
    }

    fn hooks(kind: HookKind, list: Vec<Hook>) -> Hooks {
        let mut hooks = Hooks::default();
        #[allow(deprecated)]
        match kind {
            HookKind::Prestart => hooks.set_prestart(Some(list)),
            HookKind::CreateRuntime => hooks.set_create_runtime(Some(list)),
            HookKind::CreateContainer => hooks.set_create_container(Some(list)),
            HookKind::StartContainer => hooks.set_start_container(Some(list)),
            HookKind::Poststart => hooks.set_poststart(Some(list)),
            HookKind::Poststop => hooks.set_poststop(Some(list)),
        };
        hooks
    }

    fn state() -> serde_json::Value {
        serde_json::json!({"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 42, "bundle": "/b"})
    }

    fn run(hook: &Hook) -> Result<HookOutput, RuntimeError> {
        run_hook(
            HookKind::CreateRuntime,
            hook,
            &serde_json::to_vec(&state()).unwrap(),
        )
    }

    fn path_str(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn names_are_the_specs() {
        let names: Vec<_> = HookKind::ALL.iter().map(|k| k.to_string()).collect();
        assert_eq!(
            names,
            [
                "prestart",
                "createRuntime",
                "createContainer",
                "startContainer",
                "poststart",
                "poststop"
            ]
        );
    }

    #[test]
    fn the_state_arrives_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("state");
        let hooks = hooks(
            HookKind::CreateRuntime,
            vec![sh(r#"cat > "$1""#, &[path_str(&out)])],
        );
        run_hooks(&hooks, HookKind::CreateRuntime, &state()).unwrap();
        let got: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(got, state());
    }

    #[test]
    fn the_environment_is_exactly_the_hooks() {
        let mut hook = Hook::default();
        hook.set_path("/usr/bin/env".into())
            .set_env(Some(vec!["A=1".into(), "B=two words=2".into()]));
        let out = run(&hook).unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "A=1\nB=two words=2\n");
        hook.set_env(None);
        assert!(run(&hook).unwrap().stdout.is_empty());
    }

    #[test]
    fn args_start_with_argv0() {
        let mut hook = Hook::default();
        hook.set_path("/bin/sh".into()).set_args(Some(vec![
            "my-argv0".into(),
            "-c".into(),
            r#"tr '\0' '|' < /proc/$$/cmdline; printf '%s;' "$@""#.into(),
            "zero".into(),
            "a b".into(),
            "c".into(),
        ]));
        let out = String::from_utf8(run(&hook).unwrap().stdout).unwrap();
        assert!(out.starts_with("my-argv0|-c|"), "{out}");
        assert!(out.ends_with("a b;c;"), "{out}");
    }

    #[test]
    fn a_failure_names_the_hook_its_status_and_stderr() {
        let hook = sh("echo ignored; echo '  oops: no network ' >&2; exit 3", &[]);
        let e = run(&hook).unwrap_err().to_string();
        assert_eq!(
            e,
            "createRuntime hook /bin/sh failed: exit status 3: oops: no network"
        );
        let e = run(&sh("exit 1", &[])).unwrap_err().to_string();
        assert_eq!(e, "createRuntime hook /bin/sh failed: exit status 1");
        let e = run(&sh("kill -9 $$", &[])).unwrap_err().to_string();
        assert!(e.ends_with("failed: killed by signal 9 (SIGKILL)"), "{e}");
    }

    #[test]
    fn a_timeout_kills_the_hook_and_what_it_started() {
        let mut hook = sh("sleep 30; echo late", &[]);
        hook.set_timeout(Some(1));
        let started = Instant::now();
        let e = run(&hook).unwrap_err().to_string();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        assert!(e.contains("timed out after 1 s"), "{e}");
        // A hook within its timeout is unaffected.
        let mut hook = sh("echo quick", &[]);
        hook.set_timeout(Some(30));
        assert_eq!(run(&hook).unwrap().stdout, b"quick\n");
    }

    #[test]
    fn bad_hooks_are_named() {
        let mut hook = Hook::default();
        hook.set_path("/nonexistent/hook".into());
        let e = run(&hook).unwrap_err().to_string();
        assert_eq!(e, "createRuntime hook /nonexistent/hook: does not exist");
        hook.set_path("bin/hook".into());
        assert!(run(&hook).unwrap_err().to_string().contains("must be absolute"));
        let mut hook = sh("true", &[]);
        hook.set_timeout(Some(0));
        assert!(run(&hook).unwrap_err().to_string().contains("timeout 0"));
        let mut hook = sh("true", &[]);
        hook.set_env(Some(vec!["NOEQUALS".into()]));
        assert!(run(&hook).unwrap_err().to_string().contains("\"NOEQUALS\""));
    }

    #[test]
    fn hooks_run_in_order_and_stop_at_the_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let log = path_str(&log);
        let list = vec![
            sh(r#"echo one >> "$1""#, &[log]),
            sh(r#"echo two >> "$1"; exit 1"#, &[log]),
            sh(r#"echo three >> "$1""#, &[log]),
        ];
        let hooks = hooks(HookKind::Poststop, list);
        // Only the kind asked for runs.
        run_hooks(&hooks, HookKind::CreateRuntime, &state()).unwrap();
        assert!(!Path::new(log).exists());

        let e = run_hooks(&hooks, HookKind::Poststop, &state()).unwrap_err();
        assert!(e.to_string().starts_with("poststop hook /bin/sh failed"), "{e}");
        assert_eq!(std::fs::read_to_string(log).unwrap(), "one\ntwo\n");

        std::fs::remove_file(log).unwrap();
        run_hooks_logged(&hooks, HookKind::Poststop, &state());
        assert_eq!(std::fs::read_to_string(log).unwrap(), "one\ntwo\nthree\n");
    }

    #[test]
    fn a_hook_that_ignores_a_large_state_is_not_blocked() {
        let big = serde_json::json!({"annotations": {"x": "y".repeat(1 << 20)}});
        let hooks = hooks(HookKind::Prestart, vec![sh("exit 0", &[])]);
        run_hooks(&hooks, HookKind::Prestart, &big).unwrap();
    }

    #[test]
    fn output_beyond_the_cap_is_dropped() {
        let out = run(&sh("head -c 200000 /dev/zero", &[])).unwrap();
        assert_eq!(out.stdout.len(), OUTPUT_KEPT);
    }
}

//! Runs a bundle's process in a microVM with this process's stdio, and
//! returns its exit status: `skiff boot --bundle`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use skiff_protocol::{
    streams_for, AgentMessage, ContainerSpec, HostMessage, RootDevice, StreamKind, INIT_ID,
};

use super::bundle::Bundle;
use super::error::RuntimeError;
use super::image::{self, ImageFormat};
use super::sandbox::{describe_end, Cancel, ControlSender, Event, Sandbox, SandboxConfig, VmResources};
use crate::vmm::ConsoleOutput;

/// Everything `run` needs besides the caller's stdio.
#[derive(Debug)]
pub struct RunOptions {
    pub bundle: PathBuf,
    pub vm: VmResources,
    pub image_format: ImageFormat,
    pub image_cache: PathBuf,
    /// Parent of the per-run work directory (sockets).
    pub state_dir: PathBuf,
    /// Where the guest console goes; discarded when `None`.
    pub console: Option<PathBuf>,
    pub debug_guest: bool,
}

/// Signals the caller forwards to the container.
pub trait SignalSource {
    /// Starts forwarding; each signal received goes to `forward`.
    fn forward(&mut self, forward: Box<dyn Fn(i32) + Send>);
}

/// Runs the bundle; returns the status a shell would report for the process.
pub fn run(
    options: RunOptions,
    cancel: &Cancel,
    signals: &mut dyn SignalSource,
) -> Result<i32, RuntimeError> {
    let t0 = Instant::now();
    let bundle = Bundle::load(&options.bundle)?;
    let image = image::prepare(&bundle.rootfs, &options.image_cache, options.image_format)?;
    let t_image = Instant::now();
    tracing::info!(
        image = %image.path.display(),
        reused = image.reused,
        ms = (t_image - t0).as_millis() as u64,
        "root filesystem image ready"
    );

    let work_dir = options
        .state_dir
        .join(format!("run-{}-{}", std::process::id(), t0.elapsed().as_nanos()));
    let mut extra_cmdline = Vec::new();
    if options.debug_guest {
        extra_cmdline.push("skiff.debug".to_owned());
    }
    let mut sandbox = Sandbox::boot(
        SandboxConfig {
            vm: options.vm,
            root_image: image.path.clone(),
            work_dir,
            console: options.console.map_or(ConsoleOutput::Null, ConsoleOutput::File),
            extra_cmdline,
        },
        cancel,
    )?;
    let t_ready = Instant::now();

    let process = bundle.process().clone();
    let spec = ContainerSpec {
        root: RootDevice {
            device: "/dev/vda".into(),
            fstype: image.format.fstype().into(),
            readonly: bundle.readonly_root(),
        },
        hostname: bundle.spec.hostname().clone(),
        mounts: bundle.spec.mounts().clone().unwrap_or_default(),
        process: process.clone(),
    };
    let created = match sandbox.create_container(spec) {
        Ok(c) => c,
        Err(e) => {
            let _ = sandbox.shutdown();
            return Err(e);
        }
    };
    let t_created = Instant::now();

    let kinds = streams_for(&process);
    let streams = sandbox.attach(INIT_ID, kinds)?;
    let meter = Arc::new(OutputMeter::default());
    let mut outputs = Vec::new();
    for (kind, stream) in kinds.iter().zip(streams) {
        match kind {
            StreamKind::Stdin => spawn_stdin(stream)?,
            StreamKind::Stdout => outputs.push(spawn_output(stream, io::stdout(), meter.clone())?),
            StreamKind::Stderr => outputs.push(spawn_output(stream, io::stderr(), meter.clone())?),
        }
    }
    let sender: ControlSender = sandbox.sender();
    signals.forward(Box::new(move |signal| {
        let _ = sender.send(&HostMessage::Signal {
            id: INIT_ID.into(),
            signal,
        });
    }));
    let t_start = Instant::now();
    sandbox.start(INIT_ID)?;

    let status = loop {
        match sandbox.next_event(None) {
            Some(Event::Agent(AgentMessage::Exited { id, status, error })) if id == INIT_ID => {
                if let Some(error) = error {
                    eprintln!("skiff: {error}");
                }
                break status;
            }
            Some(Event::Agent(msg)) => tracing::debug!(?msg, "agent"),
            Some(Event::AgentGone(why)) => return Err(RuntimeError::Agent(why)),
            Some(Event::Vm(end)) => return Err(RuntimeError::VmEnded(describe_end(&end))),
            None => return Err(RuntimeError::Agent("the event channel closed".into())),
        }
    };
    let t_exit = Instant::now();
    // The agent reports the exit only after the output streams ended, so
    // these joins return promptly with everything written.
    for o in outputs {
        let _ = o.join();
    }
    let end = sandbox.shutdown()?;
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
    tracing::info!(
        image_ms = ms(t0, t_image),
        boot_to_agent_ready_ms = ms(t_image, t_ready),
        root_mount_ms = created.timings.root_mount_us as f64 / 1000.0,
        mounts_ms = created.timings.mounts_us as f64 / 1000.0,
        process_ms = created.timings.process_us as f64 / 1000.0,
        create_ms = ms(t_ready, t_created),
        start_to_first_output_ms = meter.first.get().map(|t| ms(t_start, *t)),
        output_bytes = meter.bytes.load(Ordering::Relaxed),
        output_mib_per_s = meter.throughput_mib_s(),
        start_to_exit_ms = ms(t_start, t_exit),
        total_ms = ms(t0, Instant::now()),
        vm_end = ?end,
        "container finished"
    );
    Ok(status.shell_code())
}

fn spawn_stdin(mut stream: UnixStream) -> Result<(), RuntimeError> {
    // Detached: a read of our stdin may block forever, and must not keep
    // the process from exiting once the container has.
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
        })
        .map(drop)
        .map_err(|e| RuntimeError::io("starting the stdin relay", e))
}

/// When the process's output started and ended, and how much there was.
#[derive(Default)]
struct OutputMeter {
    first: OnceLock<Instant>,
    last: Mutex<Option<Instant>>,
    bytes: AtomicU64,
}

impl OutputMeter {
    fn record(&self, n: usize) {
        let now = Instant::now();
        let _ = self.first.set(now);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Output rate between the first and the last byte; only meaningful for
    /// output large enough to take a while.
    fn throughput_mib_s(&self) -> Option<f64> {
        let first = *self.first.get()?;
        let last = (*self.last.lock().unwrap_or_else(|p| p.into_inner()))?;
        let secs = (last - first).as_secs_f64();
        (secs > 0.01).then(|| self.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64 / secs)
    }
}

fn spawn_output(
    mut stream: UnixStream,
    mut to: impl Write + Send + 'static,
    meter: Arc<OutputMeter>,
) -> Result<JoinHandle<()>, RuntimeError> {
    std::thread::Builder::new()
        .name("output".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        meter.record(n);
                        if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                            // Our reader went away; keep draining so the guest is not blocked.
                            continue;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        })
        .map_err(|e| RuntimeError::io("starting an output relay", e))
}

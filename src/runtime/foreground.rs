//! Runs a bundle's process in a microVM with this process's stdio, and
//! returns its exit status: `skiff boot --bundle`.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use skiff_protocol::{streams_for, AgentMessage, HostMessage, StreamKind, INIT_ID};

use super::bundle::Bundle;
use super::error::RuntimeError;
use super::image::ImageFormat;
use super::relay::{self, OutputMeter};
use super::sandbox::{describe_end, Cancel, ControlSender, Event, SandboxConfig, VmResources};
use super::template::{self, BootMode, TemplateStore};
use super::{host_mounts, root};
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
    /// Where the VM's template is; `None` boots it cold.
    pub templates: Option<TemplateStore>,
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
    let guest_mounts = host_mounts::for_guest(bundle.spec.mounts().as_deref().unwrap_or(&[]))?;
    let root = root::prepare(&bundle, &options.image_cache, options.image_format)?;
    let t_image = Instant::now();

    let work_dir = options
        .state_dir
        .join(format!("run-{}-{}", std::process::id(), t0.elapsed().as_nanos()));
    let templates = match template::boot_mode(&bundle.spec)? {
        BootMode::Template => options.templates.as_ref(),
        BootMode::Cold => None,
    };
    let mut sandbox = template::start(
        SandboxConfig {
            vm: options.vm,
            root: root.guest,
            shares: guest_mounts.shares,
            work_dir,
            console: options.console.map_or(ConsoleOutput::Null, ConsoleOutput::File),
            debug_guest: options.debug_guest,
        },
        templates,
        cancel,
    )?;
    let t_ready = Instant::now();

    let process = bundle.process().clone();
    let spec = bundle.container_spec(root.source, guest_mounts.mounts, guest_mounts.files);
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
            StreamKind::Stdin => relay::input(io::stdin(), stream)?,
            StreamKind::Stdout => outputs.push(relay::output(stream, io::stdout(), Some(meter.clone()))?),
            StreamKind::Stderr => outputs.push(relay::output(stream, io::stderr(), Some(meter.clone()))?),
        }
    }
    let sender: ControlSender = sandbox.sender();
    signals.forward(Box::new(move |signal| {
        let _ = sender.send(&HostMessage::Signal {
            id: INIT_ID.into(),
            signal,
            all: false,
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
        output_bytes = meter.bytes(),
        output_mib_per_s = meter.throughput_mib_s(),
        start_to_exit_ms = ms(t_start, t_exit),
        total_ms = ms(t0, Instant::now()),
        vm_end = ?end,
        "container finished"
    );
    Ok(status.shell_code())
}

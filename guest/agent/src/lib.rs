//! The guest agent of skiff: PID 1 of a container's microVM. It mounts the
//! container's root, runs the container's processes as the host asks over
//! the control connection, relays their stdio over stream connections and
//! reports how they end (see `skiff_protocol` for the whole exchange).
//!
//! [`vm_main`] is the agent as the VM's init. [`run`] is the agent proper,
//! which tests drive over Unix sockets with [`Mode::Hosted`].

mod agent;
mod log;
pub mod mounts;
mod passwd;
mod pid1;
mod procfs;
mod provision;
mod reaper;
mod relay;
pub mod resolve;
mod rootfs;
mod spawn;
mod staged;
pub mod transport;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use skiff_protocol::{
    read_frame, write_frame, AgentMessage, HostMessage, CONTROL_PORT, HOST_CID, PROVISION_ID, STREAM_PORT,
    VERSION,
};

use crate::log::{debug, info};
pub use crate::transport::Address;

/// How long the agent tries to reach the host: the VMM may set up its
/// vsock listener a little after the guest started.
const CONNECT_ATTEMPTS: u32 = 100;
const CONNECT_PAUSE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of the VM: mounts the root device, switches root, sets the
    /// hostname, kills every process when the container ends.
    Vm,
    /// Inside an existing system (tests): `root` is the container's root
    /// as is; the OCI mounts and the staged files go under it, but there is
    /// no switch of root, no hostname, and only the agent's own processes
    /// are killed or listed. The calling process becomes a child subreaper.
    Hosted { root: PathBuf },
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the host listens for the control connection.
    pub control: Address,
    /// Where the agent listens for stream connections.
    pub streams: Address,
    pub mode: Mode,
    /// Log every step to stderr.
    pub debug: bool,
}

impl Config {
    /// The agent in the VM: vsock to the host's well-known ports.
    pub fn vm(debug: bool) -> Config {
        Config {
            control: Address::Vsock {
                cid: HOST_CID,
                port: CONTROL_PORT,
            },
            streams: Address::Vsock {
                cid: libc::VMADDR_CID_ANY,
                port: STREAM_PORT,
            },
            mode: Mode::Vm,
            debug,
        }
    }
}

/// Runs the agent until the host sends `Shutdown` or the control
/// connection ends. Errors are those that keep it from talking to the host
/// at all; everything else is reported to the host.
pub fn run(config: Config) -> Result<(), String> {
    if config.debug {
        log::set_debug(true);
    }
    let hosted_root = match config.mode {
        Mode::Vm => None,
        Mode::Hosted { root } => {
            // PID 1 gets orphans by itself; elsewhere the agent has to ask
            // for them so it can reap them.
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
                info!("PR_SET_CHILD_SUBREAPER: {}", std::io::Error::last_os_error());
            }
            Some(root)
        }
    };
    reaper::reaper()?;
    // Listening before saying Ready: the host may connect streams as soon
    // as it has heard from the agent.
    let listener = config.streams.listen().map_err(|e| e.to_string())?;
    let control = handshake(&config.control, hosted_root.is_none())?;
    let reader = control
        .try_clone()
        .map_err(|e| format!("dup of the control socket: {e}"))?;
    let agent = agent::Agent::new(control, hosted_root.clone())?;

    let acceptor_listener = Arc::new(listener);
    let acceptor = {
        let agent = Arc::clone(&agent);
        let listener = Arc::clone(&acceptor_listener);
        std::thread::Builder::new()
            .name("streams".into())
            .spawn(move || agent.accept_streams(&listener))
            .map_err(|e| format!("starting the stream acceptor: {e}"))?
    };
    agent.control_loop(reader);
    if hosted_root.is_some() {
        agent.wind_down();
        acceptor_listener.close_for_accept();
        let _ = acceptor.join();
    }
    Ok(())
}

/// Connects to the host, says `Ready`, and waits for `Provision`. In the VM,
/// a connection that fails before `Provision` came is the transport reset
/// of a restore from a snapshot (see `skiff_protocol`): the host that
/// snapshotted is gone and the one that restored listens, so connect again.
fn handshake(address: &Address, in_vm: bool) -> Result<transport::Conn, String> {
    loop {
        let mut control = address
            .connect(CONNECT_ATTEMPTS, CONNECT_PAUSE)
            .map_err(|e| e.to_string())?;
        debug!("connected to {address}");
        let ready = AgentMessage::Ready {
            version: VERSION,
            uptime_ms: uptime_ms(),
        };
        write_frame(&mut control, &ready).map_err(|e| format!("sending Ready: {e}"))?;
        let (entropy, realtime_ns) = match read_frame::<_, HostMessage>(&mut control) {
            Ok(Some(HostMessage::Provision { entropy, realtime_ns })) => (entropy, realtime_ns),
            Ok(Some(other)) => return Err(format!("expected Provision, got {other:?}")),
            Ok(None) => return Err("the control connection ended before Provision".into()),
            Err(e) if in_vm && e.kind() != std::io::ErrorKind::InvalidData => {
                info!("the control connection was reset ({e}): restored from a snapshot; connecting again");
                continue;
            }
            Err(e) => return Err(format!("waiting for Provision: {e}")),
        };
        // Hosted, the kernel and clock are the host's own, and there is no CID.
        let applied = if in_vm {
            provision::reseed(&entropy)
                .and_then(|()| provision::set_clock(realtime_ns))
                .and_then(|()| provision::local_cid())
        } else {
            Ok(0)
        };
        let answer = match applied {
            Ok(cid) => AgentMessage::Provisioned { cid },
            Err(error) => {
                info!("{error}");
                AgentMessage::Failed {
                    id: PROVISION_ID.into(),
                    error,
                    exit_code: 1,
                }
            }
        };
        write_frame(&mut control, &answer).map_err(|e| format!("answering Provision: {e}"))?;
        return Ok(control);
    }
}

fn uptime_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| (t.tv_sec() as u64) * 1000 + (t.tv_nsec() as u64) / 1_000_000)
        .unwrap_or(0)
}

/// The agent as PID 1 of the VM. Never returns: when the agent is done,
/// the VM powers off.
pub fn vm_main() -> ! {
    // One malloc arena for every thread. On software-KVM hosts a thread's
    // fresh arena (a new 64 MiB mapping) has been seen to read back stale
    // or zero pages: stream threads crashed writing their first heap
    // chunk and the control thread read garbage keys, so requests failed
    // or the agent died. The main arena is mapped and warm before any
    // thread starts; the agent's allocations are few and small.
    // SAFETY: mallopt only sets a malloc tunable; called before any thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    pid1::install_panic_hook();
    pid1::early_setup();
    let debug = pid1::debug_requested();
    log::set_debug(debug);
    debug!("agent {} up", env!("CARGO_PKG_VERSION"));
    let config = Config::vm(debug);
    if let Err(e) = run(config) {
        info!("{e}");
    }
    debug!("powering off");
    pid1::power_off()
}

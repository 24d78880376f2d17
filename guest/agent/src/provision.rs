//! `Provision`: what makes this VM unlike every other VM restored from the
//! same snapshot. Fresh entropy reseeds the guest kernel's random number
//! generator at once (otherwise every copy would hand out the same random
//! numbers until its next scheduled reseed), and the wall clock is set to
//! the host's (a snapshot's clock stopped when it was taken).

use std::fs::File;
use std::os::fd::AsRawFd;

/// `struct rand_pool_info` of `<linux/random.h>` with room for the entropy.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; skiff_protocol::PROVISION_ENTROPY_BYTES],
}

// _IOW('R', 0x03, int[2]) and _IO('R', 0x07), from <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Credits `entropy` to the kernel's pool and reseeds its generator from it.
pub fn reseed(entropy: &[u8]) -> Result<(), String> {
    let mut info = RandPoolInfo {
        entropy_count: 0,
        buf_size: 0,
        buf: [0; skiff_protocol::PROVISION_ENTROPY_BYTES],
    };
    let n = entropy.len().min(info.buf.len());
    if n < 32 {
        return Err(format!("{n} bytes of entropy are too few to reseed from"));
    }
    info.buf[..n].copy_from_slice(&entropy[..n]);
    info.buf_size = n as libc::c_int;
    info.entropy_count = (n * 8) as libc::c_int;
    let random = File::options()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("opening /dev/urandom: {e}"))?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes
    // follow it; `info` holds that many.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) } < 0 {
        return Err(format!("adding entropy: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(format!(
            "reseeding the kernel's generator: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Sets `CLOCK_REALTIME` to `ns` nanoseconds since the epoch.
pub fn set_clock(ns: u64) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec it is given.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(format!("setting the clock: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` of `<linux/vm_sockets.h>`: `_IO(7, 0xb9)`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// The guest's vsock CID as its transport has it now (a socket's own
/// address only says "any").
pub fn local_cid() -> Result<u32, String> {
    let vsock = File::open("/dev/vsock").map_err(|e| format!("opening /dev/vsock: {e}"))?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 through the pointer.
    if unsafe { libc::ioctl(vsock.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) } < 0 {
        return Err(format!(
            "reading the vsock CID: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(cid)
}

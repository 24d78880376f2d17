//! Loading a Linux kernel, its initrd and command line into guest memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, load_cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::zero_page::{self, InitrdPlacement};
use crate::vmm::error::{Error, Result};
use crate::vmm::layout::{self, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, ZERO_PAGE_START};

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// For a vmlinux, which has no header to say otherwise.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Tells a vmlinux from a bzImage by their magic numbers.
pub fn detect_format<R: Read + Seek>(image: &mut R) -> std::result::Result<KernelFormat, String> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    if image.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC {
        return Ok(KernelFormat::Elf);
    }
    image
        .seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
        .map_err(|e| e.to_string())?;
    if image.read_exact(&mut magic).is_ok() && magic == zero_page::KERNEL_HDR_MAGIC.to_le_bytes() {
        return Ok(KernelFormat::BzImage);
    }
    Err("not a kernel: neither an ELF vmlinux nor a bzImage".into())
}

/// Where to start the boot vCPU.
#[derive(Clone, Copy, Debug)]
pub struct LinuxEntry {
    pub entry: u64,
    pub zero_page: u64,
}

/// Loads everything a 64-bit Linux boot needs and returns where to enter it.
pub fn load<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    kernel_path: &Path,
    initrd_path: Option<&Path>,
    cmdline: &str,
) -> Result<LinuxEntry> {
    let kernel_err = |reason: String| Error::Kernel {
        path: kernel_path.to_path_buf(),
        reason,
    };
    let mut kernel = File::open(kernel_path).map_err(|e| kernel_err(e.to_string()))?;
    let format = detect_format(&mut kernel).map_err(kernel_err)?;
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(|e| kernel_err(e.to_string()))?;

    let loaded: KernelLoaderResult = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))),
    }
    .map_err(|e| kernel_err(describe_load_error(&e, mem_size)))?;

    let entry = match format {
        KernelFormat::Elf => loaded.kernel_load.0,
        KernelFormat::BzImage => {
            let xloadflags = loaded.setup_header.map(|h| h.xloadflags).unwrap_or(0);
            if xloadflags & XLF_KERNEL_64 == 0 {
                return Err(kernel_err("this bzImage has no 64-bit entry point".into()));
            }
            loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET
        }
    };

    let initrd = match initrd_path {
        Some(path) => {
            let addr_max = loaded
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|m| *m != 0)
                .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
            let kernel_end = match loaded.setup_header {
                Some(hdr) => decompressed_end(&hdr, loaded.kernel_end),
                None => loaded.kernel_end,
            };
            Some(load_initrd(mem, mem_size, kernel_end, path, addr_max)?)
        }
        None => None,
    };

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(|e| Error::Cmdline(e.to_string()))?;

    let params = zero_page::build(loaded.setup_header, mem_size, cmdline.len() + 1, initrd);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|e| Error::BootSetup(format!("writing the zero page: {e}")))?;

    tracing::debug!(
        ?format,
        entry = format_args!("{entry:#x}"),
        kernel_end = format_args!("{:#x}", loaded.kernel_end),
        ?initrd,
        "kernel loaded"
    );
    Ok(LinuxEntry {
        entry,
        zero_page: ZERO_PAGE_START,
    })
}

/// Where a bzImage's kernel ends once it has decompressed itself: its
/// decompressor writes `init_size` bytes from the load address aligned to
/// `kernel_alignment`, but never below `pref_address` (the kernel's
/// LOAD_PHYSICAL_ADDR), far past the compressed image linux-loader reports.
fn decompressed_end(hdr: &linux_loader::loader::bootparam::setup_header, loaded_end: u64) -> u64 {
    let align = u64::from(hdr.kernel_alignment).max(1);
    let start = u64::from(hdr.code32_start).div_ceil(align) * align;
    let start = start.max(hdr.pref_address);
    loaded_end.max(start.saturating_add(u64::from(hdr.init_size)))
}

fn describe_load_error(e: &linux_loader::loader::Error, mem_size: u64) -> String {
    // linux-loader repeats its own name at every level of the message.
    let text = e.to_string().replace("Kernel Loader: ", "");
    // The loaders report a kernel that runs past the end of RAM as a failed
    // read, the same as a truncated file; say which one it could be.
    if text.contains("read") || text.contains("Read") {
        format!(
            "{text} (truncated file, or larger than the guest's {} MiB)",
            mem_size >> 20
        )
    } else {
        text
    }
}

fn load_initrd<M: GuestMemory>(
    mem: &M,
    mem_size: u64,
    kernel_end: u64,
    path: &Path,
    addr_max: u64,
) -> Result<InitrdPlacement> {
    let err = |reason: String| Error::Initrd {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = file.metadata().map_err(|e| err(e.to_string()))?.len();
    let placement = zero_page::place_initrd(mem_size, kernel_end, size, addr_max).ok_or_else(|| {
        err(format!(
            "{size} bytes do not fit in guest memory between the kernel (ends at {:#x}) and {:#x}",
            kernel_end,
            layout::low_ram_end(mem_size).min(addr_max.saturating_add(1))
        ))
    })?;
    mem.read_exact_volatile_from(GuestAddress(placement.address), &mut file, size as usize)
        .map_err(|e| err(format!("reading it into guest memory: {e}")))?;
    Ok(placement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn detects_elf_and_bzimage() {
        let mut elf = Cursor::new(b"\x7fELF\x02\x01\x01".to_vec());
        assert_eq!(detect_format(&mut elf), Ok(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&mut Cursor::new(bz)), Ok(KernelFormat::BzImage));
    }

    #[test]
    fn bzimage_footprint_is_its_decompressed_size() {
        let hdr = linux_loader::loader::bootparam::setup_header {
            code32_start: 0x10_0000,
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            init_size: 0x200_0000,
            ..Default::default()
        };
        // The compressed image ends at 5 MiB, the kernel at 16 + 32 MiB.
        assert_eq!(decompressed_end(&hdr, 0x50_0000), 0x300_0000);
        let no_info = linux_loader::loader::bootparam::setup_header::default();
        assert_eq!(decompressed_end(&no_info, 0x50_0000), 0x50_0000);
    }

    #[test]
    fn rejects_what_is_neither() {
        assert!(detect_format(&mut Cursor::new(b"#!/bin/sh\necho hi\n".to_vec())).is_err());
        assert!(detect_format(&mut Cursor::new(Vec::new())).is_err());
    }
}

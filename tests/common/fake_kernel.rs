//! Stand-ins for a Linux kernel, in both formats the VMM loads, whose 64-bit
//! entry prints the command line and then the initrd from what the zero page
//! says, and resets. They prove the boot protocol plumbing without a
//! minute-long boot.

use std::path::Path;

/// Loaded and entered at 16 MiB, like an x86_64 vmlinux (CONFIG_PHYSICAL_START).
pub const LOAD_ADDR: u64 = 0x100_0000;

/// The tail of `entry_code` that resets the VM and then parks.
const RESET_AND_PARK: [u8; 8] = [0xb0, 0xfe, 0xe6, 0x64, 0xfa, 0xf4, 0xeb, 0xfd];
/// cli ; hlt ; jmp back to the hlt
const PARK: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

/// The same as `entry_code`, but the guest parks instead of resetting, so
/// the VM runs until the host stops it.
pub fn parked_entry_code() -> Vec<u8> {
    let mut code = entry_code();
    code.truncate(code.len() - RESET_AND_PARK.len());
    code.extend(PARK);
    code
}

/// The entry code: rsi = the zero page.
pub fn entry_code() -> Vec<u8> {
    vec![
        0x8b, 0x9e, 0x28, 0x02, 0x00, 0x00, // mov ebx, [rsi+0x228] ; hdr.cmd_line_ptr
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0x8a, 0x03, // next: mov al, [rbx]
        0x84, 0xc0, // test al, al
        0x74, 0x06, // jz initrd
        0xee, // out dx, al
        0x48, 0xff, 0xc3, // inc rbx
        0xeb, 0xf4, // jmp next
        0x8b, 0x9e, 0x18, 0x02, 0x00, 0x00, // initrd: mov ebx, [rsi+0x218] ; hdr.ramdisk_image
        0x8b, 0x8e, 0x1c, 0x02, 0x00, 0x00, // mov ecx, [rsi+0x21c] ; hdr.ramdisk_size
        0xe3, 0x08, // jrcxz done
        0x8a, 0x03, // copy: mov al, [rbx]
        0xee, // out dx, al
        0x48, 0xff, 0xc3, // inc rbx
        0xe2, 0xf8, // loop copy
    ]
    .into_iter()
    .chain(RESET_AND_PARK) // done: reset through the i8042, then park
    .collect()
}

/// An ELF64 executable with one PT_LOAD segment at `LOAD_ADDR`.
pub fn elf_vmlinux() -> Vec<u8> {
    elf_with_code(entry_code())
}

/// An ELF64 executable with `code` as its one PT_LOAD segment at `LOAD_ADDR`.
pub fn elf_with_code(code: Vec<u8>) -> Vec<u8> {
    const PHOFF: u64 = 64;
    const CODE_OFFSET: u64 = 0x1000;
    let mut f = Vec::new();
    f.extend(b"\x7fELF");
    f.extend([2, 1, 1, 0]); // 64-bit, little endian, version 1, System V
    f.extend([0; 8]);
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend(1u32.to_le_bytes());
    f.extend(LOAD_ADDR.to_le_bytes()); // e_entry
    f.extend(PHOFF.to_le_bytes());
    f.extend(0u64.to_le_bytes()); // e_shoff
    f.extend(0u32.to_le_bytes()); // e_flags
    f.extend(64u16.to_le_bytes()); // e_ehsize
    f.extend(56u16.to_le_bytes()); // e_phentsize
    f.extend(1u16.to_le_bytes()); // e_phnum
    f.extend(64u16.to_le_bytes()); // e_shentsize
    f.extend(0u16.to_le_bytes()); // e_shnum
    f.extend(0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(f.len() as u64, PHOFF);
    f.extend(1u32.to_le_bytes()); // PT_LOAD
    f.extend(5u32.to_le_bytes()); // R+X
    f.extend(CODE_OFFSET.to_le_bytes());
    f.extend((0xffff_ffff_8000_0000u64 + LOAD_ADDR).to_le_bytes()); // p_vaddr
    f.extend(LOAD_ADDR.to_le_bytes()); // p_paddr
    f.extend((code.len() as u64).to_le_bytes());
    f.extend((code.len() as u64).to_le_bytes());
    f.extend(0x1000u64.to_le_bytes());
    f.resize(CODE_OFFSET as usize, 0);
    f.extend(code);
    f
}

/// A bzImage: one setup sector after the boot sector, then the protected-mode
/// code whose 64-bit entry sits at +0x200.
pub fn bzimage() -> Vec<u8> {
    const SETUP_SECTS: u8 = 1;
    let mut f = vec![0u8; (usize::from(SETUP_SECTS) + 1) * 512];
    f[0x1f1] = SETUP_SECTS;
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    f[0x211] = 0x01; // loadflags: LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&(LOAD_ADDR as u32).to_le_bytes()); // code32_start
    f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    f[0x236..0x238].copy_from_slice(&0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    let mut pm = vec![0x90u8; 0x200];
    pm.extend(entry_code());
    f.extend(pm);
    f
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

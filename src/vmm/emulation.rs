//! The emulation assist: instructions KVM's emulator gives up on that the VMM
//! can complete itself. On hosts with hardware virtualization guest code
//! never goes through the emulator and none of this runs.

/// What to do about an instruction KVM could not emulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assist {
    /// Step over it: the instruction has no architectural effect the guest relies on.
    Skip { len: u8 },
    /// Step over it and deliver the exception it raises (a trap, so the
    /// return address is the next instruction).
    SkipAndRaise { len: u8, vector: u8 },
}

const BREAKPOINT_VECTOR: u8 = 3;

/// Decides on the instruction starting at `bytes[0]`; `None` if it is not
/// one the VMM knows how to complete.
pub fn decide(bytes: &[u8]) -> Option<Assist> {
    match bytes.first()? {
        // int3: Linux runs one at boot to test its #BP handler.
        0xcc => Some(Assist::SkipAndRaise {
            len: 1,
            vector: BREAKPOINT_VECTOR,
        }),
        // fwait: waits for pending x87 exceptions, of which an emulated guest
        // never has any; Linux runs it on every exec and exit.
        0x9b => Some(Assist::Skip { len: 1 }),
        _ => None,
    }
}

/// Where KVM put the instruction bytes in a `KVM_INTERNAL_ERROR_EMULATION`
/// exit: `data[0]` holds flags; with `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`
/// set, the low byte of `data[1]` is the number of bytes fetched, which follow.
pub fn instruction_bytes(ndata: u32, data: &[u64; 16]) -> Option<Vec<u8>> {
    const FLAG_INSTRUCTION_BYTES: u64 = 1;
    if ndata < 2 || data[0] & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let raw: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = usize::from(raw[0]).min(15);
    Some(raw[1..=len].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int3_raises_a_breakpoint_after_itself() {
        assert_eq!(
            decide(&[0xcc, 0x90]),
            Some(Assist::SkipAndRaise { len: 1, vector: 3 })
        );
    }

    #[test]
    fn fwait_is_skipped() {
        assert_eq!(decide(&[0x9b, 0xdb, 0xe2]), Some(Assist::Skip { len: 1 }));
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(decide(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]), None);
        assert_eq!(decide(&[0x0f, 0x01, 0xca]), None);
        assert_eq!(decide(&[]), None);
    }

    #[test]
    fn bytes_are_read_after_the_length() {
        let mut data = [0u64; 16];
        data[0] = 1;
        // length 15, then cc 90 90 ...
        data[1] = u64::from_le_bytes([15, 0xcc, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90]);
        data[2] = u64::from_le_bytes([0x90; 8]);
        let bytes = instruction_bytes(3, &data).unwrap();
        assert_eq!(bytes.len(), 15);
        assert_eq!(bytes[0], 0xcc);
    }

    #[test]
    fn no_flag_means_no_bytes() {
        let data = [0u64; 16];
        assert_eq!(instruction_bytes(3, &data), None);
        let mut data = [0u64; 16];
        data[0] = 1;
        assert_eq!(instruction_bytes(1, &data), None);
    }
}

//! How a process that failed before its `execve` tells the agent where and
//! why: a fixed-size record on a close-on-exec pipe, so the failing side
//! needs no allocation and the agent reads end-of-file when `execve` worked.

/// Where a process failed, sent with the errno. The agent turns it into a
/// message with [`super::Prepared::describe_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Stdio,
    Terminal,
    Chdir,
    /// Index into the prepared rlimits.
    Rlimit(u16),
    Groups,
    Gid,
    Uid,
    Bounding,
    Capabilities,
    Ambient,
    NoNewPrivileges,
    Exec,
}

pub const RECORD_LEN: usize = 8;

impl Stage {
    fn code(self) -> u32 {
        match self {
            Stage::Stdio => 1,
            Stage::Terminal => 2,
            Stage::Chdir => 3,
            Stage::Groups => 4,
            Stage::Gid => 5,
            Stage::Uid => 6,
            Stage::Bounding => 7,
            Stage::Capabilities => 8,
            Stage::Ambient => 9,
            Stage::NoNewPrivileges => 10,
            Stage::Exec => 11,
            Stage::Rlimit(i) => 0x1_0000 + u32::from(i),
        }
    }

    pub fn decode(record: [u8; RECORD_LEN]) -> Option<(Stage, i32)> {
        let [a, b, c, d, e, f, g, h] = record;
        let code = u32::from_le_bytes([a, b, c, d]);
        let errno = i32::from_le_bytes([e, f, g, h]);
        let stage = match code {
            1 => Stage::Stdio,
            2 => Stage::Terminal,
            3 => Stage::Chdir,
            4 => Stage::Groups,
            5 => Stage::Gid,
            6 => Stage::Uid,
            7 => Stage::Bounding,
            8 => Stage::Capabilities,
            9 => Stage::Ambient,
            10 => Stage::NoNewPrivileges,
            11 => Stage::Exec,
            c if c >= 0x1_0000 => Stage::Rlimit(u16::try_from(c - 0x1_0000).ok()?),
            _ => return None,
        };
        Some((stage, errno))
    }

    pub fn encode(self, errno: i32) -> [u8; RECORD_LEN] {
        let mut record = [0; RECORD_LEN];
        record[..4].copy_from_slice(&self.code().to_le_bytes());
        record[4..].copy_from_slice(&errno.to_le_bytes());
        record
    }
}

/// The calling thread's errno.
pub fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Writes the record to `report` and exits with `code`.
pub fn fail(report: libc::c_int, stage: Stage, err: i32, code: i32) -> ! {
    let record = stage.encode(err);
    // SAFETY: record is valid for its length; _exit ends the process
    // without running atexit handlers or destructors, which belong to the
    // agent, whose memory the process shares.
    unsafe {
        libc::write(report, record.as_ptr().cast(), record.len());
        libc::_exit(code)
    }
}

/// [`fail`]s with the errno when `result` is negative.
pub fn check(report: libc::c_int, stage: Stage, result: libc::c_int) {
    if result < 0 {
        fail(report, stage, errno(), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_survives_the_record() {
        let stages = [
            Stage::Stdio,
            Stage::Terminal,
            Stage::Chdir,
            Stage::Rlimit(0),
            Stage::Rlimit(7),
            Stage::Groups,
            Stage::Gid,
            Stage::Uid,
            Stage::Bounding,
            Stage::Capabilities,
            Stage::Ambient,
            Stage::NoNewPrivileges,
            Stage::Exec,
        ];
        for stage in stages {
            assert_eq!(
                Stage::decode(stage.encode(libc::EPERM)),
                Some((stage, libc::EPERM))
            );
        }
        assert_eq!(Stage::decode([0xff, 0, 0, 0, 1, 0, 0, 0]), None);
    }
}

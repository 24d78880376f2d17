//! The guest's processes as `/proc` shows them, for `ListProcesses` and for
//! signalling every process of a hosted container.
//!
//! `/proc` is opened once, before the switch of root: afterwards the agent
//! sees the container's `/proc`, which its spec may not mount at all.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use skiff_protocol::ProcessInfo;

/// `PF_KTHREAD` of the kernel's `include/linux/sched.h`, in `stat`'s flags.
const PF_KTHREAD: u32 = 0x0020_0000;
/// kthreadd, the parent of every kernel thread.
const KTHREADD: i32 = 2;

/// The fields of `/proc/<pid>/stat` the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    /// The executable's name, at most 15 bytes, as the kernel keeps it.
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub flags: u32,
}

/// Parses a `stat` line. `comm` may hold anything, spaces and parentheses
/// included, so it runs from the first `(` to the last `)`.
pub fn parse_stat(line: &str) -> Result<Stat, String> {
    let bad = |what: &str| format!("malformed stat line ({what}): {line:?}");
    let open = line.find('(').ok_or_else(|| bad("no `(`"))?;
    let close = line
        .rfind(')')
        .filter(|&c| c > open)
        .ok_or_else(|| bad("no `)`"))?;
    let pid = line[..open].trim().parse().map_err(|_| bad("pid"))?;
    let comm = line[open + 1..close].to_string();
    // Fields 3 on, counted as in proc(5).
    let rest: Vec<&str> = line[close + 1..].split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).copied().ok_or_else(|| bad(&format!("field {n}")));
    let number = |n: usize| field(n).and_then(|f| f.parse::<i64>().map_err(|_| bad(&format!("field {n}"))));
    let mut state = field(3)?.chars();
    let (Some(state), None) = (state.next(), state.next()) else {
        return Err(bad("state"));
    };
    let int = |n: usize| number(n).and_then(|v| i32::try_from(v).map_err(|_| bad(&format!("field {n}"))));
    Ok(Stat {
        pid,
        comm,
        state,
        ppid: int(4)?,
        pgrp: int(5)?,
        session: int(6)?,
        flags: u32::try_from(number(9)?).map_err(|_| bad("flags"))?,
    })
}

/// The effective uid of a `status` file's `Uid:` line (real, effective,
/// saved, filesystem).
pub fn parse_euid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
}

/// What `ps` shows as a command: the arguments joined by spaces, or the
/// name in brackets when there are none (kernel threads, zombies).
pub fn command(cmdline: &[u8], comm: &str) -> String {
    let args: Vec<String> = cmdline
        .strip_suffix(b"\0")
        .unwrap_or(cmdline)
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if cmdline.is_empty() {
        format!("[{comm}]")
    } else {
        args.join(" ")
    }
}

/// One process, read from `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub stat: Stat,
    pub euid: u32,
    pub command: String,
}

impl Entry {
    pub fn is_kernel_thread(&self) -> bool {
        self.stat.flags & PF_KTHREAD != 0 || self.stat.pid == KTHREADD || self.stat.ppid == KTHREADD
    }

    pub fn info(&self) -> ProcessInfo {
        ProcessInfo {
            pid: self.stat.pid,
            ppid: self.stat.ppid,
            uid: self.euid,
            state: self.stat.state.to_string(),
            command: self.command.clone(),
        }
    }
}

/// A handle on a `/proc`, good across the switch of root.
pub struct ProcFs {
    dir: OwnedFd,
}

impl ProcFs {
    pub fn open(path: &str) -> Result<ProcFs, String> {
        let dir = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("opening {path}: {e}"))?;
        Ok(ProcFs { dir })
    }

    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        let fd = openat(&self.dir, path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
        let mut buf = Vec::new();
        File::from(fd).read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn entry(&self, pid: i32) -> io::Result<Entry> {
        let stat = String::from_utf8_lossy(&self.read(&format!("{pid}/stat"))?).into_owned();
        let stat = parse_stat(&stat).map_err(io::Error::other)?;
        let status = String::from_utf8_lossy(&self.read(&format!("{pid}/status"))?).into_owned();
        let euid =
            parse_euid(&status).ok_or_else(|| io::Error::other(format!("no Uid in the status of {pid}")))?;
        let cmdline = self.read(&format!("{pid}/cmdline"))?;
        let command = command(&cmdline, &stat.comm);
        Ok(Entry { stat, euid, command })
    }

    /// Every process there is, kernel threads included, in order of pid.
    /// One that ends while it is read is left out.
    pub fn processes(&self) -> Result<Vec<Entry>, String> {
        let mut dir = Dir::openat(
            &self.dir,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("listing /proc: {e}"))?;
        let mut entries = Vec::new();
        for name in dir.iter() {
            let name = name.map_err(|e| format!("listing /proc: {e}"))?;
            let Some(pid) = name.file_name().to_str().ok().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            match self.entry(pid) {
                Ok(entry) => entries.push(entry),
                // Gone in the meantime: its directory went with it.
                Err(e)
                    if matches!(
                        Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                        Errno::ENOENT | Errno::ESRCH
                    ) => {}
                Err(e) => return Err(format!("reading /proc/{pid}: {e}")),
            }
        }
        entries.sort_by_key(|e| e.stat.pid);
        Ok(entries)
    }
}

/// The pids among `entries` that belong to a set of processes the agent
/// started: the live ones among `roots`, their descendants, and whatever
/// is in their sessions (each started process leads its own), which
/// catches descendants that were orphaned and adopted by someone else.
/// `sessions` may include processes that ended: a session id is not reused
/// while any member of that session lives.
///
/// Parents come before their children, so that signalled in this order, a
/// parent has its signal before it can see a child die of it (and, say,
/// exit normally from `wait` instead).
pub fn members(entries: &[Entry], roots: &[i32], sessions: &[i32]) -> Vec<i32> {
    let mut found: HashSet<i32> = entries
        .iter()
        .filter(|e| roots.contains(&e.stat.pid) || sessions.contains(&e.stat.session))
        .map(|e| e.stat.pid)
        .collect();
    // Parents come before children in pid order mostly but not always
    // (pids wrap), so repeat until nothing is added.
    loop {
        let before = found.len();
        for e in entries {
            if found.contains(&e.stat.ppid) {
                found.insert(e.stat.pid);
            }
        }
        if found.len() == before {
            break;
        }
    }
    let parent: HashMap<i32, i32> = entries.iter().map(|e| (e.stat.pid, e.stat.ppid)).collect();
    // How many of its ancestors are members; bounded, since a table read
    // while pids are reused could in theory hold a cycle.
    let depth = |mut pid: i32| {
        let mut depth = 0;
        while let Some(&up) = parent.get(&pid).filter(|up| found.contains(up)) {
            depth += 1;
            if depth > found.len() {
                break;
            }
            pid = up;
        }
        depth
    };
    let mut ordered: Vec<i32> = found.iter().copied().collect();
    ordered.sort_by_key(|&pid| (depth(pid), pid));
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_spaces_and_parentheses_in_comm() {
        let line = "4242 (a (b) c) d) S 4200 4242 4242 34816 4242 4194560 129 0 0 0 0 0 0 0 20 0 1 0 \
                    12345 8192 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            Stat {
                pid: 4242,
                comm: "a (b) c) d".into(),
                state: 'S',
                ppid: 4200,
                pgrp: 4242,
                session: 4242,
                flags: 4194560,
            }
        );
    }

    #[test]
    fn a_kernel_thread_is_told_by_its_flags_or_parent() {
        let kworker = "37 (kworker/0:1-events) I 2 0 0 0 -1 69238880 0 0 0 0 0 0 0 0 20 0 1 0 40 0 0";
        let stat = parse_stat(kworker).unwrap();
        assert_eq!(
            (stat.comm.as_str(), stat.state, stat.pgrp),
            ("kworker/0:1-events", 'I', 0)
        );
        let entry = |stat: Stat| Entry {
            stat,
            euid: 0,
            command: String::new(),
        };
        assert!(entry(stat.clone()).is_kernel_thread());
        let flagged_only = Stat {
            ppid: 1,
            ..stat.clone()
        };
        assert!(entry(flagged_only).is_kernel_thread());
        let user = Stat {
            ppid: 1,
            flags: 4194560,
            ..stat
        };
        assert!(!entry(user).is_kernel_thread());
    }

    #[test]
    fn malformed_stat_lines_are_errors() {
        for bad in [
            "",
            "12 sleep S 1 1 1",
            "12 (sleep",
            "x (sleep) S 1 1 1 0 0 0",
            "12 (sleep) S 1 1",
            "12 (sleep) SS 1 1 1 0 0 0",
            "12 (sleep) S 1 1 1 0 0 -4",
        ] {
            assert!(parse_stat(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_effective_uid_comes_from_status() {
        let status = "Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t1001\t1002\t1003\nGid:\t0\t0\t0\t0\n";
        assert_eq!(parse_euid(status), Some(1001));
        assert_eq!(parse_euid("Name:\tx\n"), None);
    }

    #[test]
    fn commands_read_like_ps() {
        assert_eq!(command(b"sleep\x001000\0", "sleep"), "sleep 1000");
        assert_eq!(command(b"sh\0-c\0echo a  b\0", "sh"), "sh -c echo a  b");
        // setproctitle overwrites the arguments with one string.
        assert_eq!(command(b"postgres: writer", "postgres"), "postgres: writer");
        assert_eq!(command(b"", "kthreadd"), "[kthreadd]");
    }

    #[test]
    fn members_are_the_roots_their_sessions_and_descendants() {
        let e = |pid, ppid, session| Entry {
            stat: Stat {
                pid,
                comm: String::new(),
                state: 'S',
                ppid,
                pgrp: pid,
                session,
                flags: 0,
            },
            euid: 0,
            command: String::new(),
        };
        let entries = [
            e(1, 0, 1),
            e(10, 1, 10),  // the agent
            e(20, 10, 20), // started by it
            e(21, 20, 20), // its child
            e(5, 21, 5),   // a grandchild in a new session, with a lower pid
            e(30, 1, 25),  // orphaned from a session whose leader ended
            e(40, 1, 40),  // someone else's
            e(41, 40, 40),
        ];
        // By generation: 20 and 30 have no member above them, 21 is a
        // child of 20, 5 a grandchild.
        assert_eq!(members(&entries, &[20], &[20, 25]), [20, 30, 21, 5]);
    }

    #[test]
    fn this_process_is_in_the_live_proc() {
        let proc = ProcFs::open("/proc").unwrap();
        let all = proc.processes().unwrap();
        let me = all
            .iter()
            .find(|e| e.stat.pid == std::process::id() as i32)
            .expect("this test's own process");
        assert_eq!(me.euid, nix::unistd::geteuid().as_raw());
        assert!(!me.is_kernel_thread());
        assert!(me.command.contains("skiff_agent"), "{}", me.command);
    }
}

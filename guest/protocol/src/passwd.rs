//! The container's `/etc/passwd`, read as text: the host checks a process's
//! uid against it before booting and the agent takes HOME from it (a static
//! binary cannot use glibc's NSS, and both want the container's users, not
//! their own).

/// One line of a passwd file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub home: String,
}

/// The entry for `uid` in the text of a passwd file, if it has one;
/// malformed lines are skipped.
pub fn entry_for(text: &str, uid: u32) -> Option<PasswdEntry> {
    text.lines().find_map(|line| {
        // name:password:uid:gid:gecos:home:shell
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7 && f[2].parse() == Ok(uid)).then(|| PasswdEntry {
            name: f[0].to_owned(),
            home: f[5].to_owned(),
        })
    })
}

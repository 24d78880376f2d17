//! The container's `/etc/passwd`, read directly: a static binary cannot use
//! glibc's NSS, and the agent wants the container's users, not its own.

use std::path::Path;

/// Home directory of `uid` in the passwd file at `path`, if it has one.
pub fn home_of(path: &Path, uid: u32) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    home_in(&text, uid)
}

fn home_in(text: &str, uid: u32) -> Option<String> {
    skiff_protocol::passwd::entry_for(text, uid)
        .map(|e| e.home)
        .filter(|home| !home.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_home_of_a_uid() {
        let text = "root:x:0:0:root:/root:/bin/sh\n# odd\nbroken\nuser:x:1000:1000::/home/user:/bin/sh\nnohome:x:7:7:::/bin/sh\n";
        assert_eq!(home_in(text, 0).as_deref(), Some("/root"));
        assert_eq!(home_in(text, 1000).as_deref(), Some("/home/user"));
        assert_eq!(home_in(text, 7), None);
        assert_eq!(home_in(text, 5), None);
    }
}

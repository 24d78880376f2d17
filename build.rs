//! Gives the crate `SKIFF_SOURCE_ID`: a hash of the host-side sources (the
//! protocol crate's included), the manifest and the lock file. Snapshots
//! and templates record it, so a VM saved by one build is never restored
//! by another whose device models may differ, even when both call
//! themselves the same version.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::{Path, PathBuf};

const SOURCES: [&str; 2] = ["src", "guest/protocol/src"];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let mut paths = Vec::new();
    for dir in SOURCES {
        files(Path::new(dir), &mut paths);
    }
    paths.extend(["Cargo.toml", "Cargo.lock"].map(PathBuf::from));
    paths.sort();
    let mut hash = DefaultHasher::new();
    for path in &paths {
        let name = path.to_string_lossy();
        let contents = std::fs::read(path).unwrap_or_default();
        // Lengths first, so no two lists of files hash alike.
        hash.write_usize(name.len());
        hash.write(name.as_bytes());
        hash.write_usize(contents.len());
        hash.write(&contents);
    }
    println!("cargo:rustc-env=SKIFF_SOURCE_ID={:016x}", hash.finish());
    for path in SOURCES.iter().chain(&["Cargo.toml", "Cargo.lock"]) {
        println!("cargo:rerun-if-changed={path}");
    }
}

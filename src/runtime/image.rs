//! Root filesystem images: a bundle's `rootfs/` directory turned into a
//! block-device image (erofs or ext4) that the guest mounts read-only.
//!
//! Images are cached under the digest of what they hold, so starting the
//! same container again, or a second container from the same bundle, costs
//! one walk of the tree instead of an mkfs run.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::time::Instant;

use sha2::{Digest, Sha256};

/// Part of every digest. Bump it whenever what goes into the digest or how
/// an image is built changes (mkfs options, layout), so that images made by
/// an older skiff stop matching instead of being reused.
const FORMAT_VERSION: u32 = 1;

/// How much of a failing tool's stderr goes into the error: enough for the
/// reason, without a full listing when a tool reports every file.
const MAX_STDERR: usize = 8 * 1024;

/// Where the mkfs tools are looked for after `PATH`: a service's or a
/// non-root user's `PATH` often lacks the sbin directories they live in.
const TOOL_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown root image format '{0}' (expected erofs or ext4)")]
    UnknownFormat(String),
    #[error("rootfs {} does not exist", path.display())]
    RootfsMissing { path: PathBuf },
    #[error("rootfs {} is not a directory", path.display())]
    RootfsNotDirectory { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("cannot create the image cache directory {}: {source}", path.display())]
    CacheDir { path: PathBuf, source: io::Error },
    #[error("{} in the image cache: {source}", path.display())]
    Cache { path: PathBuf, source: io::Error },
    #[error("{tool} not found: install the Debian package {package}")]
    ToolMissing { tool: String, package: &'static str },
    #[error("cannot run {tool}: {source}")]
    ToolStart { tool: String, source: io::Error },
    #[error("{tool} failed ({status}): {stderr}")]
    MkfsFailed {
        tool: String,
        status: ExitStatus,
        stderr: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Erofs,
    Ext4,
}

impl ImageFormat {
    /// The type to name when mounting the image.
    pub fn fstype(self) -> &'static str {
        match self {
            ImageFormat::Erofs => "erofs",
            ImageFormat::Ext4 => "ext4",
        }
    }

    fn tool(self) -> &'static str {
        match self {
            ImageFormat::Erofs => "mkfs.erofs",
            ImageFormat::Ext4 => "mkfs.ext4",
        }
    }

    fn package(self) -> &'static str {
        match self {
            ImageFormat::Erofs => "erofs-utils",
            ImageFormat::Ext4 => "e2fsprogs",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.fstype())
    }
}

impl FromStr for ImageFormat {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "erofs" => Ok(ImageFormat::Erofs),
            "ext4" => Ok(ImageFormat::Ext4),
            _ => Err(ImageError::UnknownFormat(s.to_owned())),
        }
    }
}

/// A built (or reused) image, ready to attach to the guest as a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootImage {
    pub path: PathBuf,
    pub format: ImageFormat,
    /// What [`digest`] gives for the tree and format; names the image.
    pub digest: String,
    /// True when the image was already in the cache.
    pub reused: bool,
    /// Length of the image file in bytes (an ext4 image is sparse on disk).
    pub size: u64,
}

/// Returns the image of `rootfs` in `format` from `cache_dir`, building it
/// first if the cache has none. The image is never written again once in
/// place, so any number of guests can attach it read-only at once.
pub fn prepare(rootfs: &Path, cache_dir: &Path, format: ImageFormat) -> Result<RootImage, ImageError> {
    prepare_with(rootfs, cache_dir, format, &Tools::default())
}

/// The digest that names the image of `rootfs` in `format`: SHA-256, in
/// hex, over every entry of the tree (what counts is listed at
/// `Tree::digest`), the format and `FORMAT_VERSION`. Where the tree lives
/// and the entries' timestamps do not count.
pub fn digest(rootfs: &Path, format: ImageFormat) -> Result<String, ImageError> {
    let root = check_rootfs(rootfs)?;
    Ok(Tree::scan(&root)?.digest(format))
}

/// The mkfs programs, by name or path; tests point them elsewhere.
#[derive(Debug, Clone)]
struct Tools {
    erofs: PathBuf,
    ext4: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            erofs: ImageFormat::Erofs.tool().into(),
            ext4: ImageFormat::Ext4.tool().into(),
        }
    }
}

impl Tools {
    fn get(&self, format: ImageFormat) -> &Path {
        match format {
            ImageFormat::Erofs => &self.erofs,
            ImageFormat::Ext4 => &self.ext4,
        }
    }
}

fn prepare_with(
    rootfs: &Path,
    cache_dir: &Path,
    format: ImageFormat,
    tools: &Tools,
) -> Result<RootImage, ImageError> {
    let root = check_rootfs(rootfs)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(cache_dir)
        .map_err(|source| ImageError::CacheDir {
            path: cache_dir.to_owned(),
            source,
        })?;

    let started = Instant::now();
    let tree = Tree::scan(&root)?;
    let digest = tree.digest(format);
    tracing::debug!(rootfs = %root.display(), %digest, entries = tree.entries.len(),
        elapsed_ms = started.elapsed().as_millis() as u64, "digested rootfs");

    let path = cache_dir.join(format!("{digest}.{format}"));
    if let Some(image) = cached(&path, format, &digest)? {
        return Ok(image);
    }

    let lock_path = cache_dir.join(format!("{digest}.lock"));
    let _lock = BuildLock::acquire(&lock_path)?;
    // The builder we may have waited for has published by now.
    if let Some(image) = cached(&path, format, &digest)? {
        return Ok(image);
    }

    let started = Instant::now();
    let tmp_path = cache_dir.join(format!(".{digest}.{format}.tmp"));
    // Holding the lock, no live build owns this name: a file here is what a
    // killed build left.
    remove_if_exists(&tmp_path)?;
    let tmp = TempImage::create(tmp_path)?;
    match format {
        ImageFormat::Erofs => build_erofs(tools.get(format), &root, &tmp.path, &digest)?,
        ImageFormat::Ext4 => build_ext4(tools.get(format), &root, &tmp.path, &digest, &tree)?,
    }
    let size = tmp.publish(&path)?;
    tracing::info!(rootfs = %root.display(), image = %path.display(), %format, size,
        elapsed_ms = started.elapsed().as_millis() as u64, "built root image");
    Ok(RootImage {
        path,
        format,
        digest,
        reused: false,
        size,
    })
}

/// The rootfs as an absolute path with symlinks resolved, so that the walk
/// and the mkfs tools see the same directory.
fn check_rootfs(rootfs: &Path) -> Result<PathBuf, ImageError> {
    let meta = match fs::metadata(rootfs) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(ImageError::RootfsMissing {
                path: rootfs.to_owned(),
            })
        }
        Err(source) => {
            return Err(ImageError::Unreadable {
                path: rootfs.to_owned(),
                source,
            })
        }
    };
    if !meta.is_dir() {
        return Err(ImageError::RootfsNotDirectory {
            path: rootfs.to_owned(),
        });
    }
    fs::canonicalize(rootfs).map_err(|source| ImageError::Unreadable {
        path: rootfs.to_owned(),
        source,
    })
}

fn cached(path: &Path, format: ImageFormat, digest: &str) -> Result<Option<RootImage>, ImageError> {
    match fs::metadata(path) {
        Ok(meta) => {
            tracing::debug!(image = %path.display(), "reusing cached root image");
            Ok(Some(RootImage {
                path: path.to_owned(),
                format,
                digest: digest.to_owned(),
                reused: true,
                size: meta.len(),
            }))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ImageError::Cache {
            path: path.to_owned(),
            source,
        }),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), ImageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(ImageError::Cache {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// One entry of the tree, with everything the digest and the ext4 size
/// estimate need of it.
struct Entry {
    /// Relative to the rootfs; empty for the rootfs itself.
    rel: PathBuf,
    meta: fs::Metadata,
    content: Content,
    /// Sorted by name.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

enum Content {
    None,
    /// SHA-256 of a regular file's bytes.
    File([u8; 32]),
    /// A symlink's target.
    Link(Vec<u8>),
}

/// The rootfs's entries, sorted by path bytes so that the digest does not
/// depend on the order directory listings come in.
struct Tree {
    entries: Vec<Entry>,
}

impl Tree {
    fn scan(root: &Path) -> Result<Tree, ImageError> {
        let mut scanner = Scanner {
            root,
            buf: vec![0; 256 * 1024],
            linked: HashMap::new(),
        };
        let meta = fs::metadata(root).map_err(|source| unreadable(root, source))?;
        let mut entries = vec![scanner.entry(PathBuf::new(), meta)?];
        // An explicit stack rather than recursion: a crafted rootfs can nest
        // deeper than a thread's stack allows.
        let mut dirs = vec![PathBuf::new()];
        while let Some(dir) = dirs.pop() {
            let abs = absolute(root, &dir);
            for item in fs::read_dir(&abs).map_err(|source| unreadable(&abs, source))? {
                let item = item.map_err(|source| unreadable(&abs, source))?;
                let rel = dir.join(item.file_name());
                // Does not follow symlinks, unlike fs::metadata.
                let meta = item
                    .metadata()
                    .map_err(|source| unreadable(&absolute(root, &rel), source))?;
                if meta.is_dir() {
                    dirs.push(rel.clone());
                }
                entries.push(scanner.entry(rel, meta)?);
            }
        }
        entries.sort_unstable_by(|a, b| a.rel.as_os_str().as_bytes().cmp(b.rel.as_os_str().as_bytes()));
        Ok(Tree { entries })
    }

    /// Hashes what an image built from the tree holds: for each entry its
    /// path, type, permission bits (setuid, setgid and sticky included),
    /// owner, group and extended attributes, and a regular file's contents,
    /// a symlink's target or a device's numbers. Every name of an inode but
    /// the first is recorded as a hard link to the first, since both mkfs
    /// tools keep hard links. Timestamps are left out: erofs images get
    /// fixed ones, and copying a tree changes them without changing what it
    /// holds. Variable-length fields are length-prefixed, so two different
    /// trees cannot encode to the same bytes.
    fn digest(&self, format: ImageFormat) -> String {
        let mut h = Sha256::new();
        put_bytes(&mut h, b"skiff-rootfs");
        put_u64(&mut h, FORMAT_VERSION.into());
        put_bytes(&mut h, format.fstype().as_bytes());
        put_u64(&mut h, self.entries.len() as u64);
        let mut first_names: HashMap<(u64, u64), &[u8]> = HashMap::new();
        for entry in &self.entries {
            let meta = &entry.meta;
            let path = entry.rel.as_os_str().as_bytes();
            put_bytes(&mut h, path);
            put_u64(&mut h, type_code(meta).into());
            put_u64(&mut h, (meta.mode() & 0o7777).into());
            put_u64(&mut h, meta.uid().into());
            put_u64(&mut h, meta.gid().into());
            put_u64(&mut h, entry.xattrs.len() as u64);
            for (name, value) in &entry.xattrs {
                put_bytes(&mut h, name);
                put_bytes(&mut h, value);
            }
            if is_hard_linked(meta) {
                if let Some(first) = first_names.get(&(meta.dev(), meta.ino())) {
                    put_u64(&mut h, 1);
                    put_bytes(&mut h, first);
                    continue;
                }
                first_names.insert((meta.dev(), meta.ino()), path);
            }
            put_u64(&mut h, 0);
            match &entry.content {
                Content::File(sum) => {
                    put_u64(&mut h, meta.len());
                    h.update(sum);
                }
                Content::Link(target) => put_bytes(&mut h, target),
                Content::None => {}
            }
            let kind = meta.file_type();
            if kind.is_char_device() || kind.is_block_device() {
                put_u64(&mut h, libc::major(meta.rdev()).into());
                put_u64(&mut h, libc::minor(meta.rdev()).into());
            }
        }
        hex(&h.finalize())
    }
}

struct Scanner<'a> {
    root: &'a Path,
    buf: Vec<u8>,
    /// Content hashes of files with more than one name, so each is read once.
    linked: HashMap<(u64, u64), [u8; 32]>,
}

impl Scanner<'_> {
    fn entry(&mut self, rel: PathBuf, meta: fs::Metadata) -> Result<Entry, ImageError> {
        let abs = absolute(self.root, &rel);
        let kind = meta.file_type();
        let content = if kind.is_file() {
            let key = (meta.dev(), meta.ino());
            let sum = match self.linked.get(&key) {
                Some(sum) => *sum,
                None => {
                    let sum = hash_file(&abs, &mut self.buf).map_err(|source| unreadable(&abs, source))?;
                    if is_hard_linked(&meta) {
                        self.linked.insert(key, sum);
                    }
                    sum
                }
            };
            Content::File(sum)
        } else if kind.is_symlink() {
            let target = fs::read_link(&abs).map_err(|source| unreadable(&abs, source))?;
            Content::Link(target.into_os_string().into_vec())
        } else {
            Content::None
        };
        let xattrs = read_xattrs(&abs).map_err(|source| unreadable(&abs, source))?;
        Ok(Entry {
            rel,
            meta,
            content,
            xattrs,
        })
    }
}

/// `root` joined with `rel`, without the trailing slash `join` adds for
/// an empty `rel`, so that errors name the path as given.
fn absolute(root: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        root.to_owned()
    } else {
        root.join(rel)
    }
}

fn unreadable(path: &Path, source: io::Error) -> ImageError {
    ImageError::Unreadable {
        path: path.to_owned(),
        source,
    }
}

fn is_hard_linked(meta: &fs::Metadata) -> bool {
    !meta.is_dir() && meta.nlink() > 1
}

fn type_code(meta: &fs::Metadata) -> u8 {
    let kind = meta.file_type();
    if kind.is_dir() {
        b'd'
    } else if kind.is_file() {
        b'f'
    } else if kind.is_symlink() {
        b'l'
    } else if kind.is_char_device() {
        b'c'
    } else if kind.is_block_device() {
        b'b'
    } else if kind.is_fifo() {
        b'p'
    } else {
        b's'
    }
}

fn hash_file(path: &Path, buf: &mut [u8]) -> io::Result<[u8; 32]> {
    // The tree can change under the walk: never follow a symlink swapped
    // in out of the rootfs, nor hang opening a FIFO swapped in.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let mut h = Sha256::new();
    loop {
        match file.read(buf) {
            Ok(0) => return Ok(h.finalize().into()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The entry's extended attributes (not following symlinks), sorted by
/// name; none where the filesystem has no support for them.
fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    let names = xattr_buffer(|buf, len| {
        // SAFETY: path is NUL-terminated; buf is null with len 0 (a size
        // query) or points to len writable bytes.
        unsafe { libc::llistxattr(path.as_ptr(), buf.cast(), len) }
    });
    let names = match names {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut xattrs = Vec::new();
    for name in names.split(|&b| b == 0).filter(|name| !name.is_empty()) {
        let cname = CString::new(name)?;
        let value = xattr_buffer(|buf, len| {
            // SAFETY: as for llistxattr above, and cname is NUL-terminated.
            unsafe { libc::lgetxattr(path.as_ptr(), cname.as_ptr(), buf.cast(), len) }
        });
        match value {
            Ok(value) => xattrs.push((name.to_vec(), value)),
            // Removed between listing and reading.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    xattrs.sort();
    Ok(xattrs)
}

/// Calls an xattr syscall first for the size, then with a buffer of that
/// size, again if the value grew in between.
fn xattr_buffer(call: impl Fn(*mut u8, usize) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    loop {
        let len = call(std::ptr::null_mut(), 0);
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; len as usize];
        if buf.is_empty() {
            return Ok(buf);
        }
        let got = call(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

fn put_u64(h: &mut Sha256, v: u64) {
    h.update(v.to_le_bytes());
}

fn put_bytes(h: &mut Sha256, bytes: &[u8]) {
    put_u64(h, bytes.len() as u64);
    h.update(bytes);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A UUID taken from the digest rather than a random one: rebuilding an
/// erofs image gives the same bytes, and the UUID tells which tree an
/// image holds. (ext4 images still differ in timestamps.)
fn uuid_from(digest: &str) -> String {
    let d = &digest[..32];
    format!(
        "{}-{}-{}-{}-{}",
        &d[..8],
        &d[8..12],
        &d[12..16],
        &d[16..20],
        &d[20..32]
    )
}

fn build_erofs(tool: &Path, root: &Path, image: &Path, digest: &str) -> Result<(), ImageError> {
    // -T0: every inode gets the same fixed time, as the digest ignores
    // timestamps. No --all-root: owners are part of the container.
    let args: Vec<OsString> = vec![
        "--quiet".into(),
        "-T0".into(),
        "-U".into(),
        uuid_from(digest).into(),
        image.into(),
        root.into(),
    ];
    run_tool(ImageFormat::Erofs, tool, &args)
}

const EXT4_BLOCK: u64 = 4096;
const EXT4_INODE_SIZE: u64 = 256;

/// Image size in bytes and inode count for an ext4 image of the tree.
///
/// mkfs.ext4 -d cannot grow the filesystem it fills, so the file must be
/// large enough up front. This adds up the blocks the tree needs, with
/// room for directory blocks split half-full by the hashed index, then 10%
/// and 2 MiB on top. The file is sparse, so the headroom costs no disk.
/// The inode count is explicit because mkfs would derive it from the size,
/// too few for a tree of many empty files or symlinks.
fn ext4_geometry(tree: &Tree) -> (u64, u64) {
    // Bytes in each directory: "." and ".." and an 8-byte header plus the
    // name, rounded to 4 bytes, per entry.
    let mut dir_bytes: HashMap<&Path, u64> = HashMap::new();
    let mut inodes_seen = std::collections::HashSet::new();
    let mut blocks = 0u64;
    let mut inodes = 0u64;
    for entry in &tree.entries {
        let meta = &entry.meta;
        if meta.is_dir() {
            dir_bytes.entry(&entry.rel).or_insert(24);
        }
        if let Some(parent) = entry.rel.parent() {
            let name_len = entry.rel.file_name().map_or(0, |n| n.len() as u64);
            *dir_bytes.entry(parent).or_insert(24) += 8 + name_len.div_ceil(4) * 4;
        }
        if !inodes_seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        inodes += 1;
        if meta.is_file() {
            // Data, plus an extent index block for every 4 extents of the
            // longest extent (128 MiB) beyond the 4 the inode holds.
            blocks += meta.len().div_ceil(EXT4_BLOCK) + meta.len() / (512 << 20);
        } else if meta.file_type().is_symlink() && meta.len() >= 60 {
            // Shorter targets live in the inode.
            blocks += 1;
        }
        // Room in a 256-byte inode is about 100 bytes; the rest takes a block.
        let xattr_bytes: usize = entry.xattrs.iter().map(|(n, v)| n.len() + v.len() + 20).sum();
        if xattr_bytes > 90 {
            blocks += (xattr_bytes as u64).div_ceil(EXT4_BLOCK - 32);
        }
    }
    for bytes in dir_bytes.values() {
        // 12 bytes of each block hold its checksum.
        let dir_blocks = bytes.div_ceil(EXT4_BLOCK - 12);
        blocks += if dir_blocks > 1 { 2 * dir_blocks + 1 } else { 1 };
    }
    // The reserved inodes (the first 11) and lost+found with its 4 blocks.
    let inodes = inodes + 16;
    blocks += 4;
    let groups = blocks.div_ceil(32 * 1024);
    // Per group: bitmaps, descriptors, a superblock backup.
    let metadata = groups * 4 * EXT4_BLOCK + inodes * EXT4_INODE_SIZE;
    let needed = blocks * EXT4_BLOCK + metadata;
    let size = (needed + needed / 10 + (2 << 20)).div_ceil(1 << 20) << 20;
    (size.max(4 << 20), inodes)
}

fn build_ext4(tool: &Path, root: &Path, image: &Path, digest: &str, tree: &Tree) -> Result<(), ImageError> {
    let (size, inodes) = ext4_geometry(tree);
    OpenOptions::new()
        .write(true)
        .open(image)
        .and_then(|file| file.set_len(size))
        .map_err(|source| ImageError::Cache {
            path: image.to_owned(),
            source,
        })?;
    let uuid = uuid_from(digest);
    let args: Vec<OsString> = vec![
        "-q".into(),
        "-F".into(),
        "-b".into(),
        EXT4_BLOCK.to_string().into(),
        "-I".into(),
        EXT4_INODE_SIZE.to_string().into(),
        "-N".into(),
        inodes.to_string().into(),
        // No blocks held back for root, no journal, no room to grow: the
        // image is never written after this.
        "-m".into(),
        "0".into(),
        "-O".into(),
        "^has_journal,^resize_inode".into(),
        "-E".into(),
        format!("root_owner=0:0,hash_seed={uuid}").into(),
        "-U".into(),
        uuid.into(),
        "-L".into(),
        "skiff-root".into(),
        "-d".into(),
        root.into(),
        image.into(),
    ];
    run_tool(ImageFormat::Ext4, tool, &args)
}

fn run_tool(format: ImageFormat, tool: &Path, args: &[OsString]) -> Result<(), ImageError> {
    let name = tool.display().to_string();
    let missing = || ImageError::ToolMissing {
        tool: name.clone(),
        package: format.package(),
    };
    let program = find_tool(tool).ok_or_else(missing)?;
    let output = Command::new(&program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| match source.kind() {
            ErrorKind::NotFound => missing(),
            _ => ImageError::ToolStart {
                tool: name.clone(),
                source,
            },
        })?;
    if output.status.success() {
        return Ok(());
    }
    let text = if output.stderr.iter().all(u8::is_ascii_whitespace) {
        &output.stdout
    } else {
        &output.stderr
    };
    // The reason is at the end; what comes before can be a line per file.
    let text = &text[text.len().saturating_sub(MAX_STDERR)..];
    let stderr = String::from_utf8_lossy(text).trim().to_owned();
    Err(ImageError::MkfsFailed {
        tool: name,
        status: output.status,
        stderr,
    })
}

fn find_tool(tool: &Path) -> Option<PathBuf> {
    if tool.components().count() > 1 {
        return tool.exists().then(|| tool.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(TOOL_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| {
            fs::metadata(candidate).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// An exclusive flock on `<digest>.lock`, so that one process builds an
/// image while the others wait for it and then reuse it. The file is
/// removed on release so the cache holds images only; a waiter that then
/// gets the lock on the unlinked file notices and locks the path anew.
struct BuildLock {
    path: PathBuf,
    _file: File,
}

impl BuildLock {
    fn acquire(path: &Path) -> Result<BuildLock, ImageError> {
        let err = |source| ImageError::Cache {
            path: path.to_owned(),
            source,
        };
        loop {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(err)?;
            if let Err(e) = flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                if e.kind() != ErrorKind::WouldBlock {
                    return Err(err(e));
                }
                tracing::info!(lock = %path.display(), "another process is building this image; waiting");
                flock(&file, libc::LOCK_EX).map_err(err)?;
            }
            let held = file.metadata().map_err(err)?;
            match fs::metadata(path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(BuildLock {
                        path: path.to_owned(),
                        _file: file,
                    });
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(err(e)),
            }
        }
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        // Unlinked while still locked (the file closes after this body), so
        // nobody can lock this inode and take it for the current one.
        let _ = fs::remove_file(&self.path);
    }
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock only acts on the descriptor, which `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The image being built, removed unless published: a failed or panicking
/// build leaves nothing behind.
struct TempImage {
    path: PathBuf,
    published: bool,
}

impl TempImage {
    fn create(path: PathBuf) -> Result<TempImage, ImageError> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| ImageError::Cache {
                path: path.clone(),
                source,
            })?;
        Ok(TempImage {
            path,
            published: false,
        })
    }

    /// Makes the image read-only and renames it to `dest`; returns its size.
    fn publish(mut self, dest: &Path) -> Result<u64, ImageError> {
        let err = |path: &Path, source| ImageError::Cache {
            path: path.to_owned(),
            source,
        };
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o444)).map_err(|e| err(&self.path, e))?;
        let file = File::open(&self.path).map_err(|e| err(&self.path, e))?;
        // On disk before the name: after a crash, an image under its final
        // name must be whole, as it would be reused without a check.
        file.sync_all().map_err(|e| err(&self.path, e))?;
        let size = file.metadata().map_err(|e| err(&self.path, e))?.len();
        fs::rename(&self.path, dest).map_err(|e| err(dest, e))?;
        self.published = true;
        if let Some(dir) = dest.parent() {
            if let Err(e) = File::open(dir).and_then(|dir| dir.sync_all()) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot sync the image cache directory");
            }
        }
        Ok(size)
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::os::unix::fs::{chown, lchown, symlink};
    use std::sync::{Arc, Barrier};

    /// A small tree with what the digest must notice: owners, a setuid
    /// file, a symlink, nested and empty directories.
    fn make_tree(dir: &Path) {
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("home/user")).unwrap();
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        fs::write(dir.join("hello"), "hello\n").unwrap();
        // chown clears setuid, so it comes first.
        chown(dir.join("hello"), Some(1000), Some(2000)).unwrap();
        fs::set_permissions(dir.join("hello"), fs::Permissions::from_mode(0o4750)).unwrap();
        symlink("../hello", dir.join("bin/hello")).unwrap();
        chown(dir.join("home/user"), Some(1000), Some(1000)).unwrap();
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        make_tree(dir.path());
        dir
    }

    fn require_tool(tool: &str, package: &str) {
        assert!(
            find_tool(Path::new(tool)).is_some(),
            "{tool} is missing: install the Debian package {package}"
        );
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{cmd:?} failed: {text}");
        text
    }

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// A stand-in mkfs: a shell script with `body`.
    fn fake_tool(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Runs `f` on a thread without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH,
    /// so that file modes bind even root. Capabilities are per thread: the
    /// other tests keep theirs.
    fn without_dac_override<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const DAC_OVERRIDE_AND_READ_SEARCH: u32 = (1 << 1) | (1 << 2);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut header = Header {
                    version: VERSION_3,
                    pid: 0,
                };
                let mut data = [Data::default(); 2];
                // SAFETY: header and data have the kernel's layout for version
                // 3, which takes two data structs; pid 0 is this thread.
                let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
                assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
                data[0].effective &= !DAC_OVERRIDE_AND_READ_SEARCH;
                // SAFETY: as for capget.
                let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
                assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }

    #[test]
    fn format_names_round_trip() {
        for format in [ImageFormat::Erofs, ImageFormat::Ext4] {
            assert_eq!(format.to_string().parse::<ImageFormat>().unwrap(), format);
            assert_eq!(format.to_string(), format.fstype());
        }
        let err = "squashfs".parse::<ImageFormat>().unwrap_err();
        assert!(err.to_string().contains("squashfs"), "{err}");
    }

    #[test]
    fn digest_is_the_same_for_copies_and_differs_by_format() {
        let (a, b) = (tree(), tree());
        let da = digest(a.path(), ImageFormat::Erofs).unwrap();
        assert_eq!(da.len(), 64);
        assert_eq!(da, digest(b.path(), ImageFormat::Erofs).unwrap());
        assert_eq!(da, digest(a.path(), ImageFormat::Erofs).unwrap());
        assert_ne!(da, digest(a.path(), ImageFormat::Ext4).unwrap());
        // Timestamps are not content.
        File::options()
            .write(true)
            .open(b.path().join("hello"))
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        assert_eq!(da, digest(b.path(), ImageFormat::Erofs).unwrap());
    }

    #[test]
    fn digest_changes_with_every_kind_of_change() {
        type Change = fn(&Path);
        let changes: &[(&str, Change)] = &[
            ("content", |d| {
                fs::write(d.join("etc/passwd"), "root:x:0:0:root:/root:/bin/ash\n").unwrap()
            }),
            ("same size content", |d| {
                fs::write(d.join("hello"), "hellO\n").unwrap()
            }),
            ("mode", |d| {
                fs::set_permissions(d.join("etc/passwd"), fs::Permissions::from_mode(0o600)).unwrap()
            }),
            ("setuid", |d| {
                fs::set_permissions(d.join("hello"), fs::Permissions::from_mode(0o750)).unwrap()
            }),
            ("sticky dir", |d| {
                fs::set_permissions(d.join("bin"), fs::Permissions::from_mode(0o1755)).unwrap()
            }),
            ("owner", |d| chown(d.join("etc/passwd"), Some(1), None).unwrap()),
            ("group", |d| chown(d.join("etc/passwd"), None, Some(1)).unwrap()),
            ("symlink owner", |d| {
                lchown(d.join("bin/hello"), Some(1000), None).unwrap()
            }),
            ("root dir owner", |d| chown(d, Some(1000), None).unwrap()),
            ("name", |d| {
                fs::rename(d.join("etc/passwd"), d.join("etc/passwe")).unwrap()
            }),
            ("symlink target", |d| {
                fs::remove_file(d.join("bin/hello")).unwrap();
                symlink("/hello", d.join("bin/hello")).unwrap();
            }),
            ("symlink to file", |d| {
                fs::remove_file(d.join("bin/hello")).unwrap();
                fs::write(d.join("bin/hello"), "../hello").unwrap();
            }),
            ("new empty dir", |d| fs::create_dir(d.join("var")).unwrap()),
            ("new empty file", |d| fs::write(d.join("var"), "").unwrap()),
            ("hard link", |d| {
                fs::hard_link(d.join("etc/passwd"), d.join("etc/passwd-")).unwrap()
            }),
            ("copy", |d| {
                fs::copy(d.join("etc/passwd"), d.join("etc/passwd-")).unwrap();
            }),
            ("device", |d| mknod(&d.join("null"), libc::S_IFCHR | 0o666, 1, 3)),
            ("device number", |d| {
                mknod(&d.join("null"), libc::S_IFCHR | 0o666, 1, 5)
            }),
            ("block device", |d| {
                mknod(&d.join("null"), libc::S_IFBLK | 0o666, 1, 3)
            }),
            ("fifo", |d| mknod(&d.join("null"), libc::S_IFIFO | 0o666, 0, 0)),
        ];
        let base = tree();
        let mut seen = HashMap::new();
        seen.insert(digest(base.path(), ImageFormat::Erofs).unwrap(), "unchanged");
        for (what, change) in changes {
            let dir = tree();
            change(dir.path());
            let d = digest(dir.path(), ImageFormat::Erofs).unwrap();
            if let Some(other) = seen.insert(d, what) {
                panic!("changing the {what} gives the digest of {other}");
            }
        }
    }

    fn mknod(path: &Path, mode: libc::mode_t, major: u32, minor: u32) {
        let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: cpath is a NUL-terminated path.
        let rc = unsafe { libc::mknod(cpath.as_ptr(), mode, libc::makedev(major, minor)) };
        assert_eq!(rc, 0, "mknod {}: {}", path.display(), io::Error::last_os_error());
    }

    #[test]
    fn digest_covers_xattrs() {
        let (a, b) = (tree(), tree());
        let path = CString::new(b.path().join("hello").as_os_str().as_bytes()).unwrap();
        let value = b"yes";
        // SAFETY: NUL-terminated path and name; value points to value.len() bytes.
        let rc = unsafe {
            libc::lsetxattr(
                path.as_ptr(),
                c"user.skiff".as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::ENOTSUP), "lsetxattr: {e}");
            eprintln!("skipped: the temporary directory's filesystem has no user xattrs");
            return;
        }
        assert_ne!(
            digest(a.path(), ImageFormat::Erofs).unwrap(),
            digest(b.path(), ImageFormat::Erofs).unwrap()
        );
    }

    #[test]
    fn rootfs_must_be_an_existing_directory() {
        let dir = tree();
        let missing = dir.path().join("nope");
        let err = digest(&missing, ImageFormat::Erofs).unwrap_err();
        assert!(
            matches!(&err, ImageError::RootfsMissing { path } if *path == missing),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not exist"), "{err}");

        let file = dir.path().join("hello");
        let err = digest(&file, ImageFormat::Erofs).unwrap_err();
        assert!(
            matches!(&err, ImageError::RootfsNotDirectory { path } if *path == file),
            "{err:?}"
        );
        let link = dir.path().join("bin/hello");
        let err = prepare(&link, &dir.path().join("cache"), ImageFormat::Erofs).unwrap_err();
        assert!(
            matches!(&err, ImageError::RootfsNotDirectory { path } if *path == link),
            "{err:?}"
        );
        assert!(err.to_string().contains("is not a directory"), "{err}");
        assert!(!dir.path().join("cache").exists());

        // A symlink to a directory is that directory.
        let other = tempfile::tempdir().unwrap();
        symlink(dir.path(), other.path().join("root")).unwrap();
        assert_eq!(
            digest(&other.path().join("root"), ImageFormat::Erofs).unwrap(),
            digest(dir.path(), ImageFormat::Erofs).unwrap()
        );
    }

    #[test]
    fn unreadable_entries_are_named() {
        let dir = tree();
        let cache = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path().join("hello"), fs::Permissions::from_mode(0o4755)).unwrap();
        let secret = dir.path().join("etc/passwd");
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
        let locked = dir.path().join("home/user");
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
        without_dac_override(|| {
            let err = prepare(dir.path(), cache.path(), ImageFormat::Erofs).unwrap_err();
            let ImageError::Unreadable { path, .. } = &err else {
                panic!("{err:?}")
            };
            assert!(*path == secret || *path == locked, "{err}");
            assert!(err.to_string().contains("cannot read"), "{err}");
        });
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
        without_dac_override(|| {
            let err = digest(dir.path(), ImageFormat::Erofs).unwrap_err();
            assert!(
                matches!(&err, ImageError::Unreadable { path, .. } if *path == locked),
                "{err:?}"
            );
        });
        assert!(dir_names(cache.path()).is_empty());
    }

    #[test]
    fn prepare_builds_once_then_reuses() {
        require_tool("mkfs.erofs", "erofs-utils");
        let dir = tree();
        let cache = tempfile::tempdir().unwrap();
        let cache_dir = cache.path().join("images/root");
        let first = prepare(dir.path(), &cache_dir, ImageFormat::Erofs).unwrap();
        assert!(!first.reused);
        assert_eq!(first.format, ImageFormat::Erofs);
        assert_eq!(first.digest, digest(dir.path(), ImageFormat::Erofs).unwrap());
        assert_eq!(first.path, cache_dir.join(format!("{}.erofs", first.digest)));
        let meta = fs::metadata(&first.path).unwrap();
        assert_eq!(meta.len(), first.size);
        assert_eq!(meta.permissions().mode() & 0o777, 0o444);
        assert_eq!(
            fs::metadata(&cache_dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(dir_names(&cache_dir), [format!("{}.erofs", first.digest)]);

        let second = prepare(dir.path(), &cache_dir, ImageFormat::Erofs).unwrap();
        assert!(second.reused);
        assert_eq!(second.path, first.path);
        assert_eq!(second.size, first.size);
        assert_eq!(
            fs::metadata(&second.path).unwrap().modified().unwrap(),
            meta.modified().unwrap()
        );

        // A copy elsewhere is the same content, so the same image.
        let copy = tree();
        let third = prepare(copy.path(), &cache_dir, ImageFormat::Erofs).unwrap();
        assert!(third.reused);
        assert_eq!(third.path, first.path);
    }

    #[test]
    fn erofs_image_holds_the_tree() {
        require_tool("mkfs.erofs", "erofs-utils");
        let dir = tree();
        let cache = tempfile::tempdir().unwrap();
        let image = prepare(dir.path(), cache.path(), ImageFormat::Erofs).unwrap();
        let out = tempfile::tempdir().unwrap();
        let extracted = out.path().join("x");
        run(Command::new("fsck.erofs")
            .arg(format!("--extract={}", extracted.display()))
            .arg(&image.path));
        assert_eq!(fs::read_to_string(extracted.join("hello")).unwrap(), "hello\n");
        assert_eq!(
            fs::read_link(extracted.join("bin/hello")).unwrap(),
            Path::new("../hello")
        );
        let info = run(Command::new("dump.erofs").arg("--path=/hello").arg(&image.path));
        assert!(info.contains("Uid: 1000") && info.contains("Gid: 2000"), "{info}");
        let info = run(Command::new("dump.erofs").arg("-s").arg(&image.path));
        assert!(info.contains(&uuid_from(&image.digest)), "{info}");
        // dump.erofs shows no setuid bit, so it is read from the inode.
        let nid: u64 = info_field(
            &run(Command::new("dump.erofs").arg("--path=/hello").arg(&image.path)),
            "NID:",
        );
        let bytes = fs::read(&image.path).unwrap();
        let meta_blkaddr = u32::from_le_bytes(bytes[1024 + 40..1024 + 44].try_into().unwrap()) as usize;
        let inode = meta_blkaddr * 4096 + nid as usize * 32;
        let mode = u16::from_le_bytes(bytes[inode + 4..inode + 6].try_into().unwrap());
        assert_eq!(mode & 0o7777, 0o4750);
    }

    fn info_field(text: &str, label: &str) -> u64 {
        let rest = &text[text.find(label).unwrap_or_else(|| panic!("no {label} in {text}")) + label.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    #[test]
    fn ext4_image_holds_the_tree() {
        let dir = tree();
        let cache = tempfile::tempdir().unwrap();
        let image = prepare(dir.path(), cache.path(), ImageFormat::Ext4).unwrap();
        assert!(!image.reused);
        assert_eq!(image.path.extension().unwrap(), "ext4");
        run(Command::new("e2fsck").arg("-fn").arg(&image.path));
        let stat = run(Command::new("debugfs")
            .arg("-R")
            .arg("stat /hello")
            .arg(&image.path));
        assert!(stat.contains("Mode:  04750"), "{stat}");
        assert!(stat.contains("User:  1000   Group:  2000"), "{stat}");
        let cat = run(Command::new("debugfs")
            .arg("-R")
            .arg("cat /hello")
            .arg(&image.path));
        assert!(cat.contains("hello\n"), "{cat}");
        let ls = run(Command::new("debugfs")
            .arg("-R")
            .arg("ls -l /home")
            .arg(&image.path));
        assert!(ls.contains("40755 (2)   1000   1000"), "{ls}");
        let sb = run(Command::new("dumpe2fs").arg("-h").arg(&image.path));
        assert!(
            sb.contains("skiff-root") && sb.contains(&uuid_from(&image.digest)),
            "{sb}"
        );
        assert!(!sb.contains("has_journal"), "{sb}");
    }

    /// The ext4 size estimate must hold for trees unlike the busybox one:
    /// many small files, a large directory, long symlinks, a large file,
    /// hard links, deep nesting.
    #[test]
    fn ext4_size_estimate_fits_unusual_trees() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("many")).unwrap();
        for i in 0..3000 {
            fs::write(
                root.join(format!("many/file-with-a-rather-long-name-{i:05}")),
                [b'x'; 1],
            )
            .unwrap();
        }
        fs::create_dir(root.join("links")).unwrap();
        for i in 0..200 {
            symlink("/a".repeat(100 + i), root.join(format!("links/{i}"))).unwrap();
        }
        let big: Vec<u8> = (0..24 << 20).map(|i: u32| (i % 251) as u8 | 1).collect();
        fs::write(root.join("big"), &big).unwrap();
        fs::create_dir(root.join("empty")).unwrap();
        for i in 0..2000 {
            fs::create_dir(root.join(format!("empty/{i}"))).unwrap();
        }
        for i in 0..50 {
            fs::hard_link(root.join("big"), root.join(format!("big-{i}"))).unwrap();
        }
        let deep: PathBuf = (0..200).map(|_| "d").collect();
        fs::create_dir_all(root.join(&deep)).unwrap();
        fs::write(root.join(&deep).join("f"), "deep").unwrap();

        let cache = tempfile::tempdir().unwrap();
        let image = prepare(root, cache.path(), ImageFormat::Ext4).unwrap();
        run(Command::new("e2fsck").arg("-fn").arg(&image.path));
        // Headroom, not a multiple of the tree.
        assert!(
            image.size < 2 * (big.len() as u64) + (16 << 20),
            "{} bytes",
            image.size
        );
    }

    #[test]
    fn failed_build_leaves_nothing_behind() {
        let dir = tree();
        let cache = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        // Writes into the image it was given, then fails.
        let body = "for a; do case $a in *.tmp) echo junk >\"$a\";; esac; done\necho 'mkfs: disk on fire' >&2\nexit 3";
        let tool = fake_tool(bin.path(), "mkfs.fake", body);
        let tools = Tools {
            erofs: tool.clone(),
            ext4: tool.clone(),
        };
        for format in [ImageFormat::Erofs, ImageFormat::Ext4] {
            let err = prepare_with(dir.path(), cache.path(), format, &tools).unwrap_err();
            let ImageError::MkfsFailed {
                tool: name,
                status,
                stderr,
            } = &err
            else {
                panic!("{err:?}")
            };
            assert_eq!(*name, tool.display().to_string());
            assert_eq!(status.code(), Some(3));
            assert_eq!(stderr, "mkfs: disk on fire");
            assert!(err.to_string().contains("disk on fire"), "{err}");
            assert!(
                dir_names(cache.path()).is_empty(),
                "{:?}",
                dir_names(cache.path())
            );
        }
    }

    #[test]
    fn missing_tool_names_its_package() {
        let dir = tree();
        let cache = tempfile::tempdir().unwrap();
        let tools = Tools {
            erofs: "mkfs.erofs-not-here".into(),
            ext4: "/nonexistent/mkfs.ext4".into(),
        };
        let err = prepare_with(dir.path(), cache.path(), ImageFormat::Erofs, &tools).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::ToolMissing {
                    package: "erofs-utils",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("mkfs.erofs-not-here") && err.to_string().contains("erofs-utils"));
        let err = prepare_with(dir.path(), cache.path(), ImageFormat::Ext4, &tools).unwrap_err();
        assert!(
            err.to_string().contains("install the Debian package e2fsprogs"),
            "{err}"
        );
        assert!(dir_names(cache.path()).is_empty());
    }

    #[test]
    fn leftovers_of_a_killed_build_are_replaced() {
        require_tool("mkfs.erofs", "erofs-utils");
        let dir = tree();
        let cache = tempfile::tempdir().unwrap();
        let d = digest(dir.path(), ImageFormat::Erofs).unwrap();
        fs::write(cache.path().join(format!(".{d}.erofs.tmp")), "half an image").unwrap();
        fs::write(cache.path().join(format!("{d}.lock")), "").unwrap();
        let image = prepare(dir.path(), cache.path(), ImageFormat::Erofs).unwrap();
        assert!(!image.reused);
        assert_eq!(dir_names(cache.path()), [format!("{d}.erofs")]);
    }

    #[test]
    fn concurrent_prepares_build_once() {
        require_tool("mkfs.erofs", "erofs-utils");
        let dir = tree();
        let cache = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        let count = bin.path().join("count");
        // Slow enough that the second caller arrives during the build.
        let body = format!(
            "echo run >>'{}'\nsleep 0.5\nexec mkfs.erofs \"$@\"",
            count.display()
        );
        let tools = Tools {
            erofs: fake_tool(bin.path(), "mkfs.slow", &body),
            ext4: "mkfs.ext4".into(),
        };
        let barrier = Arc::new(Barrier::new(2));
        let images: Vec<RootImage> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let barrier = barrier.clone();
                    let tools = tools.clone();
                    let (root, cache) = (dir.path(), cache.path());
                    s.spawn(move || {
                        barrier.wait();
                        prepare_with(root, cache, ImageFormat::Erofs, &tools).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(fs::read_to_string(&count).unwrap(), "run\n");
        assert_eq!(images.iter().filter(|i| i.reused).count(), 1);
        assert_eq!(images[0].path, images[1].path);
        let names: HashSet<String> = dir_names(cache.path()).into_iter().collect();
        assert_eq!(names, HashSet::from([format!("{}.erofs", images[0].digest)]));
    }
}

//! The FUSE server driven through descriptor chains in guest memory, as a
//! guest driver (or a hostile guest) would.

use std::path::{Path, PathBuf};

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, EntryOut, InitIn, LinkIn, MknodIn, Opcode, OpenIn, OpenOut, ReadIn, KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::*;

const MEM_SIZE: u64 = 4 << 20;
const REQUEST: u64 = 0x10_0000;
const REPLY: u64 = 0x20_0000;
const REPLY_LEN: u32 = 64 << 10;
const ROOT: u64 = 1;

/// A guest's view: memory, a queue and the server of one share.
struct Guest {
    mem: GuestMemoryHost,
    server: FsServer,
    unique: u64,
}

fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
    let flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

impl Guest {
    /// Sends `opcode` for `nodeid` with `body`; returns the error (0 for
    /// success, else a positive errno) and the reply's body.
    fn call(&mut self, opcode: Opcode, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
        self.unique += 1;
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode: opcode as u32,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        let mut request = header.as_slice().to_vec();
        request.extend_from_slice(body);
        self.mem.write_slice(&request, GuestAddress(REQUEST)).unwrap();
        let used = self.send(&[
            desc(REQUEST, request.len() as u32, false),
            desc(REPLY, REPLY_LEN, true),
        ]);
        if used == 0 {
            return (0, Vec::new());
        }
        let out: OutHeader = self.mem.read_obj(GuestAddress(REPLY)).unwrap();
        assert_eq!(out.unique, self.unique);
        assert_eq!(out.len, used);
        let mut reply = vec![0u8; used as usize - std::mem::size_of::<OutHeader>()];
        self.mem
            .read_slice(
                &mut reply,
                GuestAddress(REPLY + std::mem::size_of::<OutHeader>() as u64),
            )
            .unwrap();
        (-out.error, reply)
    }

    fn send(&self, descs: &[RawDescriptor]) -> u32 {
        let queue = MockSplitQueue::new(&self.mem, 16);
        let chain = queue.build_desc_chain(descs).unwrap();
        self.server.handle(&self.mem, chain)
    }

    fn init(&mut self) {
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 128 << 10,
            flags: 0,
        };
        let mut body = init.as_slice().to_vec();
        body.extend_from_slice(&[0u8; 48]);
        let (err, _) = self.call(Opcode::Init, 0, &body);
        assert_eq!(err, 0, "FUSE_INIT");
    }

    fn lookup(&mut self, parent: u64, name: &str) -> std::result::Result<EntryOut, i32> {
        let (err, reply) = self.call(Opcode::Lookup, parent, &cstr(name));
        if err != 0 {
            return Err(err);
        }
        Ok(read_as(&reply))
    }

    fn open(&mut self, nodeid: u64, flags: i32) -> std::result::Result<u64, i32> {
        let open = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        match self.call(Opcode::Open, nodeid, open.as_slice()) {
            (0, reply) => Ok(read_as::<OpenOut>(&reply).fh),
            (err, _) => Err(err),
        }
    }

    fn read(&mut self, nodeid: u64, fh: u64, size: u32) -> std::result::Result<Vec<u8>, i32> {
        let read = ReadIn {
            fh,
            size,
            ..Default::default()
        };
        match self.call(Opcode::Read, nodeid, read.as_slice()) {
            (0, reply) => Ok(reply),
            (err, _) => Err(err),
        }
    }

    fn create(&mut self, parent: u64, name: &str, mode: u32) -> std::result::Result<EntryOut, i32> {
        let create = CreateIn {
            flags: (libc::O_CREAT | libc::O_WRONLY) as u32,
            mode: libc::S_IFREG | mode,
            umask: 0,
            fuse_flags: 0,
        };
        let mut body = create.as_slice().to_vec();
        body.extend_from_slice(&cstr(name));
        match self.call(Opcode::Create, parent, &body) {
            (0, reply) => Ok(read_as(&reply)),
            (err, _) => Err(err),
        }
    }
}

fn cstr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

fn read_as<T: ByteValued>(bytes: &[u8]) -> T {
    T::from_slice(&bytes[..std::mem::size_of::<T>()])
        .copied()
        .expect("reply too short")
}

/// Runs `f` on a thread serving `dir` the way the device's worker does.
fn with_share<T: Send>(dir: &Path, read_only: bool, f: impl FnOnce(&mut Guest) -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let flags = ShareFlags {
                read_only,
                recursive: false,
            };
            let view = confine::enter(dir, &confine::open_dir(dir).unwrap(), flags).unwrap();
            let mut guest = Guest {
                mem: crate::vmm::memory::allocate(MEM_SIZE).unwrap(),
                server: FsServer::new(view).unwrap(),
                unique: 0,
            };
            guest.init();
            f(&mut guest)
        })
        .join()
        .expect("share thread")
    })
}

/// A share and, beside it, a host file the guest must never reach.
struct Layout {
    _tmp: tempfile::TempDir,
    share: PathBuf,
    secret: PathBuf,
}

const SECRET: &[u8] = b"host secret\n";

fn layout() -> Layout {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::write(share.join("hello"), b"hello from the host\n").unwrap();
    std::os::unix::fs::symlink(&secret, share.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", share.join("rel-link")).unwrap();
    Layout {
        _tmp: tmp,
        share,
        secret,
    }
}

#[test]
fn the_config_space_holds_the_tag_and_one_request_queue() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::new(&FsConfig {
        tag: "skiff-root".into(),
        shared_dir: dir.path().into(),
        flags: ShareFlags {
            read_only: false,
            recursive: false,
        },
    })
    .unwrap();
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.queue_max_sizes().len(), 2);
    let mut tag = [0u8; MAX_TAG_LEN];
    fs.read_config(0, &mut tag);
    assert_eq!(&tag[..10], b"skiff-root");
    assert!(tag[10..].iter().all(|&b| b == 0));
    let mut queues = [0u8; 4];
    fs.read_config(MAX_TAG_LEN as u64, &mut queues);
    assert_eq!(u32::from_le_bytes(queues), 1);
}

#[test]
fn bad_shares_are_refused_before_a_vm_exists() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let config = |tag: &str, path: &Path| FsConfig {
        tag: tag.into(),
        shared_dir: path.into(),
        flags: ShareFlags {
            read_only: false,
            recursive: false,
        },
    };
    for (c, want) in [
        (config("", dir.path()), "tag"),
        (config(&"x".repeat(37), dir.path()), "tag"),
        (config("t", Path::new("relative")), "not an absolute path"),
        (config("t", &dir.path().join("missing")), "No such file"),
        (config("t", &file), "not a directory"),
    ] {
        let err = Fs::new(&c).err().expect("refused").to_string();
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn a_guest_reads_and_writes_through_the_share() {
    let l = layout();
    let share = l.share.clone();
    with_share(&l.share, false, |g| {
        let hello = g.lookup(ROOT, "hello").unwrap();
        let fh = g.open(hello.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(g.read(hello.nodeid, fh, 4096).unwrap(), b"hello from the host\n");
        g.create(ROOT, "new", 0o666).unwrap();
    });
    // Created with the guest's mode, not the VMM's umask. (The host's /tmp,
    // where the share lies, is hidden from the serving thread.)
    let meta = std::fs::metadata(share.join("new")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o666
    );
}

#[test]
fn a_read_only_share_refuses_writes_on_the_host() {
    let l = layout();
    with_share(&l.share, true, |g| {
        assert_eq!(g.create(ROOT, "new", 0o644).err(), Some(libc::EROFS));
        let hello = g.lookup(ROOT, "hello").unwrap();
        assert_eq!(g.open(hello.nodeid, libc::O_WRONLY).err(), Some(libc::EROFS));
    });
    assert!(!l.share.join("new").exists());
}

#[test]
fn escapes_from_the_share_fail() {
    let l = layout();
    let share = l.share.clone();
    let host_ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&l.secret).unwrap());
    with_share(&l.share, false, |g| {
        // `..` of the root is the root.
        assert_eq!(g.lookup(ROOT, "..").unwrap().nodeid, ROOT);
        // A name is one component.
        assert_eq!(g.lookup(ROOT, "../outside").err(), Some(libc::EINVAL));
        assert_eq!(g.lookup(ROOT, "../outside/secret").err(), Some(libc::EINVAL));
        // Symlinks are the guest's to resolve, in its own tree: the server
        // never follows one, whether asked to open it or to look through it.
        for link in ["abs-link", "rel-link"] {
            let entry = g.lookup(ROOT, link).unwrap();
            assert!(g.open(entry.nodeid, libc::O_RDONLY).is_err(), "{link} opened");
            assert_eq!(g.lookup(entry.nodeid, "secret").err(), Some(libc::ENOTDIR));
        }
        // Inodes are the server's numbers, not host inode numbers: one never
        // looked up (the secret's host inode, say) is refused.
        for nodeid in [host_ino, 9999, u64::MAX] {
            assert_eq!(g.open(nodeid, libc::O_RDONLY).err(), Some(libc::EBADF));
            let link = LinkIn { oldnodeid: nodeid };
            let mut body = link.as_slice().to_vec();
            body.extend_from_slice(&cstr("stolen"));
            assert_ne!(g.call(Opcode::Link, ROOT, &body).0, 0);
        }
        // A device node the guest makes cannot be opened on the host.
        let mknod = MknodIn {
            mode: libc::S_IFCHR | 0o666,
            rdev: libc::makedev(1, 3) as u32,
            umask: 0,
            padding: 0,
        };
        let mut body = mknod.as_slice().to_vec();
        body.extend_from_slice(&cstr("null"));
        let (err, reply) = g.call(Opcode::Mknod, ROOT, &body);
        assert_eq!(err, 0);
        let node: EntryOut = read_as(&reply);
        // The library refuses to open anything but files and directories
        // (confine's tests show the nodev mount refusing it as well).
        assert_eq!(g.open(node.nodeid, libc::O_RDWR).err(), Some(libc::EBADF));
    });
    assert!(!share.join("stolen").exists());
    assert_eq!(std::fs::read(&l.secret).unwrap(), SECRET);
}

#[test]
fn opcodes_fuse_does_not_define_get_enosys() {
    let l = layout();
    with_share(&l.share, false, |g| {
        for opcode in [0u32, 7, 19, 50, 4096, u32::MAX] {
            g.unique += 1;
            let header = InHeader {
                len: std::mem::size_of::<InHeader>() as u32,
                opcode,
                unique: g.unique,
                nodeid: ROOT,
                ..Default::default()
            };
            g.mem.write_obj(header, GuestAddress(REQUEST)).unwrap();
            let used = g.send(&[desc(REQUEST, header.len, false), desc(REPLY, REPLY_LEN, true)]);
            assert_eq!(used as usize, std::mem::size_of::<OutHeader>(), "opcode {opcode}");
            let out: OutHeader = g.mem.read_obj(GuestAddress(REPLY)).unwrap();
            assert_eq!(out.error, -libc::ENOSYS, "opcode {opcode}");
        }
    });
}

/// xorshift64*: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Malformed chains and requests from a hostile guest: descriptors outside
/// memory, of absurd lengths, overlapping, with no room for a reply; headers
/// whose lengths lie; every opcode with random arguments. The server must
/// neither panic nor write past the writable descriptors, and nothing
/// outside the share may change.
#[test]
fn hostile_chains_and_requests_are_survived() {
    const ROUNDS: usize = 20_000;
    let l = layout();
    let secret = l.secret.clone();
    with_share(&l.share, false, |g| {
        let mut rng = Rng(0x5eed_f00d_cafe_b0ba);
        let lengths = [0u32, 1, 8, 39, 40, 41, 64, 4096, 65_536, 1 << 20, u32::MAX];
        let mut replied = 0;
        for round in 0..ROUNDS {
            // A request: a header whose fields are sometimes true, then noise.
            let opcode = if rng.below(4) == 0 {
                rng.next() as u32
            } else {
                rng.below(52) as u32
            };
            let choices = [0, ROOT, 2, 3, rng.below(64), rng.next()];
            let nodeid = rng.pick(&choices);
            let body_len = rng.pick(&[0usize, 4, 16, 40, 64, 300]);
            let mut body: Vec<u8> = (0..body_len).map(|_| rng.next() as u8).collect();
            if rng.below(2) == 0 && !body.is_empty() {
                // Often a plausible name at the end.
                let n = body.len();
                body[n - 1] = 0;
            }
            let claimed = match rng.below(4) {
                0 => rng.next() as u32,
                _ => (std::mem::size_of::<InHeader>() + body.len()) as u32,
            };
            let header = InHeader {
                len: claimed,
                opcode,
                unique: round as u64,
                nodeid,
                uid: rng.pick(&[0, 1000]),
                gid: rng.pick(&[0, 1000]),
                pid: 1,
                padding: 0,
            };
            let mut request = header.as_slice().to_vec();
            request.extend_from_slice(&body);
            g.mem.write_slice(&request, GuestAddress(REQUEST)).unwrap();
            // Mark the memory just past the reply buffer.
            let reply_len = rng.pick(&[0u32, 8, 16, 100, 4096]);
            g.mem
                .write_slice(&[0xa5; 64], GuestAddress(REPLY + u64::from(reply_len)))
                .unwrap();

            let mut descs = Vec::new();
            let well_formed = rng.below(5);
            match well_formed {
                // Well formed.
                0 | 1 => {
                    descs.push(desc(REQUEST, request.len() as u32, false));
                    descs.push(desc(REPLY, reply_len, true));
                }
                // The request split at a random point.
                2 => {
                    let cut = rng.below(request.len() as u64 + 1) as u32;
                    descs.push(desc(REQUEST, cut, false));
                    descs.push(desc(REQUEST + u64::from(cut), request.len() as u32 - cut, false));
                    descs.push(desc(REPLY, reply_len, true));
                }
                // Anywhere, any length, in any order.
                _ => {
                    for _ in 0..rng.below(4) + 1 {
                        let places = [REQUEST, REPLY, rng.below(MEM_SIZE + (2 << 20)), u64::MAX - 16];
                        let addr = rng.pick(&places);
                        descs.push(desc(addr, rng.pick(&lengths), rng.below(2) == 0));
                    }
                }
            }
            let well_formed = well_formed <= 2;
            let used = g.send(&descs);
            if well_formed {
                assert!(
                    used <= reply_len,
                    "round {round}: {used} bytes used of {reply_len}"
                );
                let mut past = [0u8; 64];
                g.mem
                    .read_slice(&mut past, GuestAddress(REPLY + u64::from(reply_len)))
                    .unwrap();
                assert!(
                    past.iter().all(|&b| b == 0xa5),
                    "round {round}: wrote past the reply buffer"
                );
            }
            if used > 0 {
                replied += 1;
            }
        }
        // The server still works afterwards, as the rules of the game require.
        g.init();
        assert!(g.lookup(ROOT, "..").is_ok());
        assert!(
            replied > ROUNDS / 10,
            "only {replied} replies: the test did not exercise the server"
        );
    });
    assert_eq!(std::fs::read(&secret).unwrap(), SECRET);
    let outside: Vec<_> = std::fs::read_dir(secret.parent().unwrap()).unwrap().collect();
    assert_eq!(outside.len(), 1, "something appeared beside the share");
}

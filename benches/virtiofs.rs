//! The virtio-fs device's request path: a 1 MiB FUSE READ answered from a
//! host file into guest memory through a descriptor chain (what a guest's
//! sequential read costs the host per MiB), against the baseline of one
//! `pread` of the same MiB straight into guest memory.

use std::os::unix::fs::FileExt;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fuse_backend_rs::abi::fuse_abi::{
    EntryOut, InHeader, InitIn, Opcode, OpenIn, OpenOut, OutHeader, ReadIn, KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
};
use skiff::vmm::devices::virtio::fs::FsServer;
use skiff::vmm::memory::{allocate, GuestMemoryHost};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory};

const MIB: u32 = 1 << 20;
const REQUEST: u64 = 0x10_0000;
const REPLY: u64 = 0x40_0000;
const WRITABLE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

/// Sends one request; returns how many bytes of reply the server wrote.
fn send(server: &FsServer, mem: &GuestMemoryHost, opcode: Opcode, nodeid: u64, body: &[u8]) -> usize {
    let header = InHeader {
        len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
        opcode: opcode as u32,
        nodeid,
        unique: 1,
        ..Default::default()
    };
    let request = [header.as_slice(), body].concat();
    mem.write_slice(&request, GuestAddress(REQUEST)).unwrap();
    let queue = MockSplitQueue::new(mem, 4);
    let chain = queue
        .build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(REQUEST, request.len() as u32, 0, 0)),
            RawDescriptor::from(Descriptor::new(REPLY, MIB + 4096, WRITABLE, 0)),
        ])
        .unwrap();
    server.handle(mem, chain) as usize
}

/// Sends one request; returns the reply's body after its header.
fn call(server: &FsServer, mem: &GuestMemoryHost, opcode: Opcode, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let used = send(server, mem, opcode, nodeid, body);
    let out: OutHeader = mem.read_obj(GuestAddress(REPLY)).unwrap();
    assert_eq!(out.error, 0, "{opcode:?} failed");
    let mut reply = vec![0u8; used - std::mem::size_of::<OutHeader>()];
    mem.read_slice(
        &mut reply,
        GuestAddress(REPLY + std::mem::size_of::<OutHeader>() as u64),
    )
    .unwrap();
    reply
}

fn fuse_read(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("data"), &data).unwrap();
    let mem = allocate(16 << 20).unwrap();
    let server = FsServer::new(dir.path()).unwrap();
    let init = InitIn {
        major: KERNEL_VERSION,
        minor: KERNEL_MINOR_VERSION,
        max_readahead: MIB,
        flags: 0,
    };
    call(
        &server,
        &mem,
        Opcode::Init,
        0,
        &[init.as_slice(), &[0u8; 48]].concat(),
    );
    let entry = call(&server, &mem, Opcode::Lookup, 1, b"data\0");
    let node = EntryOut::from_slice(&entry[..std::mem::size_of::<EntryOut>()])
        .unwrap()
        .nodeid;
    let open = OpenIn {
        flags: libc::O_RDONLY as u32,
        fuse_flags: 0,
    };
    let opened = call(&server, &mem, Opcode::Open, node, open.as_slice());
    let fh = OpenOut::from_slice(&opened[..std::mem::size_of::<OpenOut>()])
        .unwrap()
        .fh;

    let mut group = c.benchmark_group("virtiofs_read_1mib");
    group.throughput(Throughput::Bytes(u64::from(MIB)));
    let mut offset = 0u64;
    group.bench_function("fuse_read_through_a_chain", |b| {
        b.iter(|| {
            let read = ReadIn {
                fh,
                offset,
                size: MIB,
                ..Default::default()
            };
            let used = send(&server, &mem, Opcode::Read, node, read.as_slice());
            assert_eq!(used, std::mem::size_of::<OutHeader>() + MIB as usize);
            offset = (offset + u64::from(MIB)) % u64::from(16 * MIB);
        })
    });
    let file = std::fs::File::open(dir.path().join("data")).unwrap();
    let host = mem.get_host_address(GuestAddress(REPLY)).unwrap();
    group.bench_function("baseline_pread_into_guest_memory", |b| {
        b.iter(|| {
            // SAFETY: the range lies inside `mem`'s mapping (REPLY + 1 MiB <
            // 16 MiB), which outlives this closure, and nothing else uses it.
            let buf = unsafe { std::slice::from_raw_parts_mut(host, MIB as usize) };
            assert_eq!(file.read_at(buf, offset).unwrap(), MIB as usize);
            offset = (offset + u64::from(MIB)) % u64::from(16 * MIB);
        })
    });
    group.finish();
}

criterion_group!(benches, fuse_read);
criterion_main!(benches);

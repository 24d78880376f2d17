//! The vsock device's host side: 1 MiB from a host Unix socket into guest
//! packets (4 KiB RX buffers, as a Linux guest posts them, with the credit
//! updates a guest sends), against copying the same MiB through a plain Unix
//! socket pair in 4 KiB reads as the baseline.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use skiff::vmm::devices::virtio::vsock::muxer::Muxer;
use skiff::vmm::devices::virtio::vsock::packet::*;
use vmm_sys_util::epoll::EpollEvent;

const MIB: usize = 1 << 20;
const GUEST_CID: u64 = 3;
const RX_BUFFER: usize = 4096 + HEADER_LEN;

fn guest_header(op: u16, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 5000,
        dst_port: 1024,
        kind: TYPE_STREAM,
        op,
        buf_alloc: 256 << 10,
        fwd_cnt,
        ..Header::default()
    }
}

fn muxer_host_to_guest(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut muxer = Muxer::new(GUEST_CID, &uds, UnixListener::bind(&uds).unwrap()).unwrap();
    let port = UnixListener::bind(format!("{}_1024", uds.display())).unwrap();
    muxer.handle_guest_packet(&guest_header(OP_REQUEST, 0), &[]);
    let mut packet = Vec::new();
    assert!(muxer.next_packet_for_guest(RX_BUFFER, &mut packet));
    let (host, _) = port.accept().unwrap();
    let payload = vec![0x5au8; MIB];
    let mut consumed: u32 = 0;
    let mut events = vec![EpollEvent::default(); 8];

    let mut group = c.benchmark_group("vsock_1MiB_host_to_guest");
    group.throughput(Throughput::Bytes(MIB as u64));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("skiff_muxer", |b| {
        b.iter(|| {
            let mut writer = host.try_clone().unwrap();
            let data = payload.clone();
            let t = std::thread::spawn(move || writer.write_all(&data).unwrap());
            let mut got = 0;
            while got < MIB {
                let n = muxer.epoll().wait(10, &mut events).unwrap();
                for ev in &events[..n] {
                    muxer.handle_event(ev.data(), ev.event_set());
                }
                while muxer.next_packet_for_guest(RX_BUFFER, &mut packet) {
                    let len = packet.len() - HEADER_LEN;
                    got += len;
                    consumed = consumed.wrapping_add(len as u32);
                }
                // The guest's reader consumed everything: say so, as Linux does.
                muxer.handle_guest_packet(&guest_header(OP_CREDIT_UPDATE, consumed), &[]);
            }
            t.join().unwrap();
        })
    });
    group.bench_function("unix_socket_copy", |b| {
        let (mut a, mut z) = UnixStream::pair().unwrap();
        let mut buf = vec![0u8; 4096];
        b.iter(|| {
            let mut writer = a.try_clone().unwrap();
            let data = payload.clone();
            let t = std::thread::spawn(move || writer.write_all(&data).unwrap());
            let mut got = 0;
            while got < MIB {
                got += z.read(&mut buf).unwrap();
            }
            t.join().unwrap();
        });
        let _ = a.flush();
    });
    group.finish();
}

criterion_group!(benches, muxer_host_to_guest);
criterion_main!(benches);

//! Peers see each other's writes through the shared buffers (cpu backend, ranks as threads).

use arfuse_ipc::{Rendezvous, SharedBuffers, ThreadRendezvous};
use arfuse_kernels::api::Cpu;
use arfuse_kernels::{Backend, DevicePtr};
use std::time::Duration;

#[test]
fn peers_see_each_others_receive_areas() {
    let world = 4;
    let group = ThreadRendezvous::group(world, Duration::from_secs(20));
    std::thread::scope(|s| {
        for mut rv in group {
            s.spawn(move || {
                let device = Cpu::open_device(0, 1).expect("cpu");
                let stream = Cpu::create_stream(&device).expect("stream");
                let bufs = SharedBuffers::<Cpu>::create(&device, &mut rv, 1 << 16, 1 << 10).expect("buffers");
                let me = bufs.rank() as u8;
                // SAFETY: our receive area is live and at least 16 bytes long.
                unsafe { Cpu::write(&stream, DevicePtr(bufs.receive_ptrs()[bufs.rank()]), &[me + 1; 16]) }
                    .expect("write");
                rv.all_gather(&[]).expect("barrier");
                for peer in 0..world {
                    let mut got = [0u8; 16];
                    // SAFETY: the peer's receive area is mapped and at least 16 bytes long.
                    unsafe { Cpu::read_back(&stream, DevicePtr(bufs.receive_ptrs()[peer]), &mut got) }.expect("read");
                    assert_eq!(got, [peer as u8 + 1; 16], "rank {me} reading rank {peer}");
                }
                rv.all_gather(&[]).expect("barrier");
            });
        }
    });
}

//! Rank processes meet over the Unix-socket rendezvous and map each other's shared memory.

use arfuse_ipc::{Rendezvous, SharedBuffers, UnixRendezvous};
use arfuse_kernels::api::Cpu;
use arfuse_kernels::{Backend, DevicePtr};
use arfuse_testkit::{assert_ranks_succeeded, child, run_processes, test_path};
use std::time::Duration;

#[test]
fn three_processes_share_buffers() {
    if let Some(me) = child() {
        let mut rv =
            UnixRendezvous::connect(&me.dir, me.rank, me.world_size, Duration::from_secs(30)).expect("connect");
        let device = Cpu::open_device(0, 1).expect("cpu");
        let stream = Cpu::create_stream(&device).expect("stream");
        let bufs = SharedBuffers::<Cpu>::create(&device, &mut rv, 1 << 16, 1 << 10).expect("buffers");
        let pattern = [me.rank as u8 + 7; 32];
        // SAFETY: our scratch is live and at least 32 bytes long.
        unsafe { Cpu::write(&stream, DevicePtr(bufs.scratch_ptrs()[me.rank]), &pattern) }.expect("write");
        rv.all_gather(&[]).expect("barrier");
        for peer in 0..me.world_size {
            let mut got = [0u8; 32];
            // SAFETY: the peer's scratch is mapped and at least 32 bytes long.
            unsafe { Cpu::read_back(&stream, DevicePtr(bufs.scratch_ptrs()[peer]), &mut got) }.expect("read");
            assert_eq!(got, [peer as u8 + 7; 32], "rank {} reading rank {peer}", me.rank);
        }
        rv.all_gather(&[]).expect("barrier");
        return;
    }
    let outcomes =
        run_processes(&test_path!(three_processes_share_buffers), 3, Duration::from_secs(120)).expect("harness");
    assert_ranks_succeeded(&outcomes);
}

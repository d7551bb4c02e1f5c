//! Simulated ranks: each a device handle, a stream, a shared buffer mapped by every peer, and its
//! local tensors; the launch parameters of call number `index`; waiting with a watchdog.

use crate::calls::Call;
use arfuse_kernels::gpu::DeviceBuffer;
use arfuse_kernels::params::{push_region_bytes, receive_area_bytes, PUSH_SENTINEL, SIGNAL_ERROR_OFFSET};
use arfuse_kernels::{DType, DevicePtr, Element, Error, ErrorWord, GpuBackend, KernelId, LaunchParams};
use arfuse_kernels::{MAX_RANKS, SIGNAL_BYTES};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

/// How long a GPU spin may wait for a peer in the conformance tests before the kernel gives up.
pub(crate) const DEADLINE: Duration = Duration::from_secs(5);
/// How long the host waits for a stream before it calls the kernel hung (longer than `DEADLINE`).
pub(crate) const WATCHDOG: Duration = Duration::from_secs(30);
pub(crate) const EPS: f32 = 1e-6;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    /// Bytes of the largest call: of the scratch area and of each push slot (the receive area has
    /// `receive_area_bytes` of it for the most ranks, enough for every world size).
    pub(crate) half: usize,
}

impl Layout {
    /// Signal area, receive area, scratch, then the push region for `world` ranks (slots of `half`).
    pub(crate) fn bytes(self, world: usize) -> usize {
        self.push_offset() + push_region_bytes(world, self.half)
    }
    fn scratch_offset(self) -> usize {
        SIGNAL_BYTES + receive_area_bytes(self.half, MAX_RANKS)
    }
    fn push_offset(self) -> usize {
        self.scratch_offset() + self.half
    }
    fn push(self, base: u64) -> u64 {
        base + self.push_offset() as u64
    }
    fn receive(self, base: u64) -> u64 {
        base + SIGNAL_BYTES as u64
    }
    fn scratch(self, base: u64) -> u64 {
        base + self.scratch_offset() as u64
    }
}

/// Fills the push region of `shared` with the sentinel, as `arfuse_ipc` does before peers map it.
pub(crate) fn arm_push_region<B: GpuBackend>(
    device: &B::Device,
    shared: &B::SharedBuffer,
    layout: Layout,
    world: usize,
) {
    let at = layout.push_offset();
    let bytes = push_region_bytes(world, layout.half);
    B::fill_shared(device, shared, at, bytes, PUSH_SENTINEL).expect("arm push region");
}

/// A local tensor: raw bytes at a device address (the dtype is the case's).
pub(crate) type Bytes<B> = DeviceBuffer<B, u8>;

/// One rank's local tensors.
pub(crate) struct Local<B: GpuBackend> {
    pub(crate) input: Bytes<B>,
    pub(crate) residual: Bytes<B>,
    pub(crate) weight: Bytes<B>,
    pub(crate) out: Bytes<B>,
    pub(crate) residual_out: Bytes<B>,
}

impl<B: GpuBackend> Local<B> {
    /// Five zero-filled tensors of `capacity` bytes each.
    pub(crate) fn zeros(device: &B::Device, capacity: usize) -> Self {
        let buffer = || DeviceBuffer::<B, u8>::zeros(device, capacity).expect("alloc local");
        Local { input: buffer(), residual: buffer(), weight: buffer(), out: buffer(), residual_out: buffer() }
    }
}

pub(crate) struct Rank<B: GpuBackend> {
    pub(crate) rank: usize,
    pub(crate) world: usize,
    pub(crate) device: B::Device,
    pub(crate) stream: B::Stream,
    /// Own shared buffer; kept alive for the peers.
    pub(crate) _shared: B::SharedBuffer,
    /// Peers' shared buffers (own included), kept mapped.
    pub(crate) _peers: Vec<B::PeerMapping>,
    /// Base address of every rank's shared buffer, as this rank sees it.
    pub(crate) bases: [u64; MAX_RANKS],
    pub(crate) layout: Layout,
    pub(crate) local: Local<B>,
}

impl<B: GpuBackend> Rank<B> {
    pub(crate) fn addr(buffer: &Bytes<B>) -> u64 {
        buffer.device_ptr().0
    }

    /// Parameters of call number `index` (0, 1, ...) of this rank's group, on its local tensors at
    /// byte offset `offset`. The call's epoch is `index + 1`: barrier base `2 * epoch` (`params.rs`:
    /// the push rotation is `epoch % PUSH_ROTATIONS`).
    pub(crate) fn params(&self, rows: usize, hidden: usize, offset: usize, index: u64) -> LaunchParams {
        let epoch = index + 1;
        let barrier_base = 2 * epoch;
        let mut p = LaunchParams {
            input: Self::addr(&self.local.input) + offset as u64,
            residual: Self::addr(&self.local.residual) + offset as u64,
            weight: Self::addr(&self.local.weight) + offset as u64,
            out: Self::addr(&self.local.out) + offset as u64,
            residual_out: Self::addr(&self.local.residual_out) + offset as u64,
            barrier_base,
            deadline_ns: DEADLINE.as_nanos() as u64,
            rows: rows as u32,
            hidden: hidden as u32,
            rank: self.rank as u32,
            world_size: self.world as u32,
            eps: EPS,
            push_slot_bytes: self.layout.half as u32,
            ..LaunchParams::default()
        };
        for peer in 0..self.world {
            p.receive[peer] = self.layout.receive(self.bases[peer]);
            p.scratch[peer] = self.layout.scratch(self.bases[peer]);
            p.signals[peer] = self.bases[peer];
            p.push[peer] = self.layout.push(self.bases[peer]);
        }
        p
    }

    pub(crate) fn upload<T: Element>(&self, dst: u64, data: &[T]) {
        // SAFETY: every caller writes inside one of this rank's buffers.
        unsafe { B::write(&self.stream, DevicePtr(dst), bytemuck::cast_slice(data)) }.expect("write");
    }

    pub(crate) fn download<T: Element>(&self, src: u64, len: usize) -> Vec<T> {
        let mut host = vec![T::from_bits_u32(0); len];
        // SAFETY: every caller reads inside one of this rank's buffers.
        unsafe { B::read_back(&self.stream, DevicePtr(src), bytemuck::cast_slice_mut(&mut host)) }.expect("read back");
        host
    }

    /// Writes this rank's share of `inputs` at byte `offset` of its tensors and poisons the outputs.
    pub(crate) fn load<T: Element>(&self, inputs: &crate::calls::Inputs<T>, offset: u64) {
        let elems = inputs.rows * inputs.hidden;
        self.upload(Self::addr(&self.local.input) + offset, &inputs.x[self.rank]);
        self.upload(Self::addr(&self.local.residual) + offset, &inputs.residual);
        self.upload(Self::addr(&self.local.weight) + offset, &inputs.weight);
        self.upload(Self::addr(&self.local.out) + offset, &arfuse_testkit::poisoned::<T>(elems));
        self.upload(Self::addr(&self.local.residual_out) + offset, &arfuse_testkit::poisoned::<T>(elems));
    }

    /// Waits for the stream, failing (instead of hanging) if it does not finish within `WATCHDOG`.
    pub(crate) fn wait(&self, what: &str) {
        let event = B::record_event(&self.stream).expect("record event");
        let start = Instant::now();
        while !B::is_complete(&event).expect("event query") {
            assert!(
                start.elapsed() < WATCHDOG,
                "rank {}: {what} still running after {WATCHDOG:?}: a kernel hangs",
                self.rank
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        B::synchronize(&self.stream).expect("synchronize");
    }

    /// The error word of this rank's signal area.
    pub(crate) fn error_word(&self) -> ErrorWord {
        let mut bytes = [0u8; 8];
        let at = DevicePtr(self.bases[self.rank] + SIGNAL_ERROR_OFFSET as u64);
        // SAFETY: the error word lies inside this rank's shared buffer.
        unsafe { B::read_back(&self.stream, at, &mut bytes) }.expect("read error word");
        ErrorWord(u64::from_le_bytes(bytes))
    }

    /// What lies in the header slots of this rank's push region, per rotation and sender: the
    /// epoch of the last call header the sender wrote there, or `None` where the slot is armed
    /// (the sentinel). Where a failed batch leaves them, they tell which call each peer reached.
    pub(crate) fn headers(&self) -> Vec<Vec<Option<u32>>> {
        let (world, slot) = (self.world, self.layout.half);
        (0..arfuse_kernels::params::PUSH_ROTATIONS)
            .map(|rotation| {
                (0..world)
                    .map(|sender| {
                        let at = self.layout.push(self.bases[self.rank])
                            + arfuse_kernels::params::push_header_offset(world, slot, rotation, sender) as u64;
                        let mut bytes = [0u8; 16];
                        // SAFETY: the header slot lies inside this rank's shared buffer.
                        unsafe { B::read_back(&self.stream, DevicePtr(at), &mut bytes) }.expect("read header");
                        let epoch = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                        (epoch != PUSH_SENTINEL).then_some(epoch)
                    })
                    .collect()
            })
            .collect()
    }

    /// This rank's epoch word: the cross-rank launches with `barrier_base` 0 it completed.
    pub(crate) fn epoch_word(&self) -> u64 {
        let mut bytes = [0u8; 8];
        let at = DevicePtr(self.bases[self.rank] + arfuse_kernels::params::SIGNAL_EPOCH_OFFSET as u64);
        // SAFETY: the epoch word lies inside this rank's shared buffer.
        unsafe { B::read_back(&self.stream, at, &mut bytes) }.expect("read epoch word");
        u64::from_le_bytes(bytes)
    }

    /// Launches the kernels of `call`.
    pub(crate) fn launch(&self, call: Call, dtype: DType, params: &LaunchParams) -> Result<(), Error> {
        for &op in call.kernels() {
            // SAFETY: `params` names this rank's buffers and the peers' mapped shared buffers, sized by
            // the callers for `rows * hidden` elements, all alive until the rank waits for its stream.
            unsafe { B::launch(&self.device, &self.stream, KernelId { op, dtype }, params) }?;
        }
        Ok(())
    }
}

/// Opens `world` ranks on device 0, each in its own thread: device, stream, shared buffer, local
/// tensors of `capacity` bytes each; handles are exchanged through the threads and opened (same
/// process: the raw pointers).
pub(crate) fn open_group<B: GpuBackend>(world: usize, layout: Layout, capacity: usize) -> Vec<Rank<B>> {
    let handles: Mutex<Vec<Option<B::IpcHandle>>> = Mutex::new(vec![None; world]);
    let barrier = Barrier::new(world);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..world)
            .map(|rank| {
                let (handles, barrier) = (&handles, &barrier);
                scope.spawn(move || {
                    let device = B::open_device(0, world).expect("open device 0");
                    // Compile/load before any rank spins (a first load may synchronise the device).
                    B::prepare(&device).expect("load kernels");
                    let stream = B::create_stream(&device).expect("create stream");
                    let shared = B::alloc_shared(&device, layout.bytes(world)).expect("alloc shared");
                    arm_push_region::<B>(&device, &shared, layout, world);
                    let local = Local::zeros(&device, capacity);
                    let handle = B::export_handle(&shared).expect("export");
                    handles.lock().expect("handles")[rank] = Some(handle);
                    barrier.wait();
                    let all: Vec<B::IpcHandle> =
                        handles.lock().expect("handles").iter().map(|h| h.expect("every rank exported")).collect();
                    let mut bases = [0u64; MAX_RANKS];
                    let mut peers = Vec::new();
                    for (peer, handle) in all.iter().enumerate() {
                        let mapping = B::open_handle(&device, handle).expect("open peer handle");
                        assert_eq!(
                            B::peer_ptr(&mapping),
                            B::handle_origin(handle).device_ptr(),
                            "same process: the raw pointer"
                        );
                        assert!(!B::is_ipc(&mapping));
                        bases[peer] = B::peer_ptr(&mapping).0;
                        peers.push(mapping);
                    }
                    assert_eq!(bases[rank], B::shared_ptr(&shared).0);
                    // Nobody launches before every rank has its buffers (allocation and freeing can
                    // wait for the device).
                    barrier.wait();
                    Rank { rank, world, device, stream, _shared: shared, _peers: peers, bases, layout, local }
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("rank setup")).collect()
    })
}

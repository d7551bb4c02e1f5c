//! GPU tests of the `cuda` backend: ranks simulated as threads of this process on one GPU (each
//! with its own stream, the device opened with `co_resident_ranks = world`), every kernel compared
//! bit for bit with the CPU backend running the same ranks as threads.
//!
//! Without libcuda, a device or libnvrtc, each test prints `SKIP cuda: <reason>` and passes, unless
//! `ARFUSE_REQUIRE_BACKENDS` (a comma-separated list of backends) names `cuda`: then it fails.
//! On a GPU host: `ARFUSE_REQUIRE_BACKENDS=cuda <test binary> --test-threads=1 --nocapture`.
//! The tests also take one lock, so they never share the GPU with each other: ranks that spin on
//! each other must all be resident at once.
//!
//! Shared buffer of each rank, as the `ipc` crate lays it out:
//! `[SIGNAL_BYTES signal][staging, parity 0][staging, parity 1][scratch]`, the last three `half` bytes.

#![cfg(feature = "cuda")]

use arfuse_kernels::cpu;
use arfuse_kernels::cuda::{Cuda, CudaBuffer, CudaDevice, CudaIpcHandle, CudaPeerMapping, CudaShared, CudaStream};
use arfuse_kernels::params::SIGNAL_ERROR_OFFSET;
use arfuse_kernels::{
    Backend, DType, DevicePtr, Element, Error, ErrorWord, KernelId, LaunchParams, Op, MAX_RANKS, SIGNAL_BYTES,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;
use std::sync::{Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a GPU spin may wait for a peer in the conformance tests before the kernel gives up.
const DEADLINE: Duration = Duration::from_secs(5);
/// How long the host waits for a stream before it calls the kernel hung (longer than `DEADLINE`).
const WATCHDOG: Duration = Duration::from_secs(30);
const EPS: f32 = 1e-6;
/// NaN in both bf16 and f16, four patterns.
const POISON: [u32; 4] = [0x7fff, 0xffff, 0x7fc1, 0xffc1];

// ---- availability ---------------------------------------------------------------------------

static GPU: Mutex<()> = Mutex::new(());

fn required() -> bool {
    std::env::var("ARFUSE_REQUIRE_BACKENDS")
        .map(|list| list.split([',', ' ', ';', ':']).any(|b| b.trim().eq_ignore_ascii_case("cuda")))
        .unwrap_or(false)
}

fn unavailable<T>(test: &str, reason: String) -> Option<T> {
    if required() {
        panic!("{test}: ARFUSE_REQUIRE_BACKENDS names cuda, but it is unavailable: {reason}");
    }
    println!("SKIP cuda: {reason} ({test})");
    None
}

/// The GPU, locked for one test; `None` (after saying why) where the test cannot run.
fn gpu(test: &str, needs_kernels: bool) -> Option<MutexGuard<'static, ()>> {
    let guard = GPU.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match Cuda::device_count() {
        Ok(0) => return unavailable(test, "no CUDA device is visible".into()),
        Err(err) => return unavailable(test, err.to_string()),
        Ok(_) => {}
    }
    if needs_kernels {
        if let Err(err) = Cuda::nvrtc_version() {
            return unavailable(test, err.to_string());
        }
    }
    Some(guard)
}

// ---- simulated ranks ------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Bytes of each staging area and of the scratch area.
    half: usize,
}

impl Layout {
    /// Signal area, staging halves, scratch, then the push region for `world` ranks (slots of `half`).
    fn bytes(self, world: usize) -> usize {
        SIGNAL_BYTES + 3 * self.half + arfuse_kernels::params::push_region_bytes(world, self.half)
    }
    fn push(self, base: u64) -> u64 {
        base + (SIGNAL_BYTES + 3 * self.half) as u64
    }
    fn staging(self, base: u64, parity: u64) -> u64 {
        base + (SIGNAL_BYTES + parity as usize * self.half) as u64
    }
    fn scratch(self, base: u64) -> u64 {
        base + (SIGNAL_BYTES + 2 * self.half) as u64
    }
}

/// Fills the push region of `shared` with the sentinel, as `arfuse_ipc` does before peers map it.
fn arm_push_region(device: &CudaDevice, shared: &CudaShared, layout: Layout, world: usize) {
    let at = SIGNAL_BYTES + 3 * layout.half;
    let bytes = arfuse_kernels::params::push_region_bytes(world, layout.half);
    Cuda::fill_shared(device, shared, at, bytes, arfuse_kernels::params::PUSH_SENTINEL).expect("arm push region");
}

/// One rank's local tensors (raw bytes; the dtype is the case's).
struct Local {
    input: CudaBuffer<u8>,
    residual: CudaBuffer<u8>,
    weight: CudaBuffer<u8>,
    out: CudaBuffer<u8>,
    residual_out: CudaBuffer<u8>,
}

struct Rank {
    rank: usize,
    world: usize,
    device: CudaDevice,
    stream: CudaStream,
    /// Own shared buffer; kept alive for the peers.
    _shared: CudaShared,
    /// Peers' shared buffers (own included), kept mapped.
    _peers: Vec<CudaPeerMapping>,
    /// Base address of every rank's shared buffer, as this rank sees it.
    bases: [u64; MAX_RANKS],
    layout: Layout,
    local: Local,
}

impl Rank {
    fn addr(buffer: &CudaBuffer<u8>) -> u64 {
        buffer.device_ptr().0
    }

    /// Parameters of call number `index` (0, 1, ...) of this rank's group, on its local tensors at
    /// byte offset `offset`. The call's epoch is `index + 1`: barrier base `2 * epoch` (`params.rs`:
    /// the call-descriptor slot is `epoch % 2`), staging parity `epoch % 2`.
    fn params(&self, rows: usize, hidden: usize, offset: usize, index: u64) -> LaunchParams {
        let epoch = index + 1;
        let (parity, barrier_base) = (epoch % 2, 2 * epoch);
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
            p.staging[peer] = self.layout.staging(self.bases[peer], parity);
            p.scratch[peer] = self.layout.scratch(self.bases[peer]);
            p.signals[peer] = self.bases[peer];
            p.push[peer] = self.layout.push(self.bases[peer]);
        }
        p
    }

    fn upload<T: Element>(&self, dst: u64, data: &[T]) {
        // SAFETY: every caller writes inside one of this rank's buffers.
        unsafe { Cuda::write(&self.stream, DevicePtr(dst), bytemuck::cast_slice(data)) }.expect("write");
    }

    fn download<T: Element>(&self, src: u64, len: usize) -> Vec<T> {
        let mut host = vec![T::from_bits_u32(0); len];
        // SAFETY: every caller reads inside one of this rank's buffers.
        unsafe { Cuda::read_back(&self.stream, DevicePtr(src), bytemuck::cast_slice_mut(&mut host)) }
            .expect("read back");
        host
    }

    /// Waits for the stream, failing (instead of hanging) if it does not finish within `WATCHDOG`.
    fn wait(&self, what: &str) {
        let event = self.stream.record_event().expect("record event");
        let start = Instant::now();
        while !event.is_complete().expect("event query") {
            assert!(
                start.elapsed() < WATCHDOG,
                "rank {}: {what} still running after {WATCHDOG:?}: a kernel hangs",
                self.rank
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        Cuda::synchronize(&self.stream).expect("synchronize");
    }

    /// The error word of this rank's signal area.
    fn error_word(&self) -> ErrorWord {
        let mut bytes = [0u8; 8];
        let at = DevicePtr(self.bases[self.rank] + SIGNAL_ERROR_OFFSET as u64);
        // SAFETY: the error word lies inside this rank's shared buffer.
        unsafe { Cuda::read_back(&self.stream, at, &mut bytes) }.expect("read error word");
        ErrorWord(u64::from_le_bytes(bytes))
    }

    /// Launches the kernels of `call`.
    fn launch(&self, call: Call, dtype: DType, params: &LaunchParams) -> Result<(), Error> {
        for &op in call.kernels() {
            // SAFETY: `params` names this rank's buffers and the peers' mapped shared buffers, sized by
            // the callers for `rows * hidden` elements, all alive until the rank waits for its stream.
            unsafe { Cuda::launch(&self.device, &self.stream, KernelId { op, dtype }, params) }?;
        }
        Ok(())
    }
}

/// Opens `world` ranks on device 0, each in its own thread: device, stream, shared buffer, local
/// tensors of `capacity` bytes each; handles are exchanged through the threads and opened (same
/// process: the raw pointers).
fn open_group(world: usize, layout: Layout, capacity: usize) -> Vec<Rank> {
    let handles: Mutex<Vec<Option<CudaIpcHandle>>> = Mutex::new(vec![None; world]);
    let barrier = Barrier::new(world);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..world)
            .map(|rank| {
                let (handles, barrier) = (&handles, &barrier);
                scope.spawn(move || {
                    let device = Cuda::open_device(0, world).expect("open device 0");
                    // Compile/load before any rank spins (a first load may synchronise the context).
                    device.load_kernels().expect("load kernels");
                    let stream = Cuda::create_stream(&device).expect("create stream");
                    let shared = Cuda::alloc_shared(&device, layout.bytes(world)).expect("alloc shared");
                    arm_push_region(&device, &shared, layout, world);
                    let buffer = || CudaBuffer::<u8>::zeros(&device, capacity).expect("alloc local");
                    let local = Local {
                        input: buffer(),
                        residual: buffer(),
                        weight: buffer(),
                        out: buffer(),
                        residual_out: buffer(),
                    };
                    let handle = Cuda::export_handle(&shared).expect("export");
                    handles.lock().expect("handles")[rank] = Some(handle);
                    barrier.wait();
                    let all: Vec<CudaIpcHandle> =
                        handles.lock().expect("handles").iter().map(|h| h.expect("every rank exported")).collect();
                    let mut bases = [0u64; MAX_RANKS];
                    let mut peers = Vec::new();
                    for (peer, handle) in all.iter().enumerate() {
                        let mapping = Cuda::open_handle(&device, handle).expect("open peer handle");
                        assert_eq!(Cuda::peer_ptr(&mapping), DevicePtr(handle.ptr), "same process: the raw pointer");
                        assert!(!mapping.is_ipc());
                        bases[peer] = Cuda::peer_ptr(&mapping).0;
                        peers.push(mapping);
                    }
                    assert_eq!(bases[rank], Cuda::shared_ptr(&shared).0);
                    // Nobody launches before every rank has its buffers (allocation can serialise).
                    barrier.wait();
                    Rank { rank, world, device, stream, _shared: shared, _peers: peers, bases, layout, local }
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("rank setup")).collect()
    })
}

// ---- calls and data -------------------------------------------------------------------------

/// One operator call as `fusion` makes it: one or two kernels, one barrier base, one parity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    FusedOneStage,
    FusedTwoStage,
    AllReduceOneStage,
    AllReduceTwoStage,
    AddRmsNorm,
}

impl Call {
    const ALL: [Call; 5] =
        [Call::FusedOneStage, Call::FusedTwoStage, Call::AllReduceOneStage, Call::AllReduceTwoStage, Call::AddRmsNorm];

    fn kernels(self) -> &'static [Op] {
        match self {
            Call::FusedOneStage => &[Op::FusedOneStage],
            Call::FusedTwoStage => &[Op::ReduceScatter, Op::ScratchAddRmsNorm],
            Call::AllReduceOneStage => &[Op::AllReduceOneStage],
            Call::AllReduceTwoStage => &[Op::ReduceScatter, Op::AllGather],
            Call::AddRmsNorm => &[Op::AddRmsNorm],
        }
    }

    fn crosses_ranks(self) -> bool {
        self.kernels()[0].crosses_ranks()
    }

    fn writes_residual(self) -> bool {
        matches!(self, Call::FusedOneStage | Call::FusedTwoStage | Call::AddRmsNorm)
    }

    /// The call whose CPU result this one must equal (1-stage and 2-stage agree bit for bit).
    fn reference(self) -> Call {
        match self {
            Call::FusedTwoStage => Call::FusedOneStage,
            Call::AllReduceTwoStage => Call::AllReduceOneStage,
            other => other,
        }
    }
}

/// The inputs of one call: every rank's `x`, the residual (the same on every rank), the weight.
struct Inputs<T> {
    rows: usize,
    hidden: usize,
    x: Vec<Vec<T>>,
    residual: Vec<T>,
    weight: Vec<T>,
}

fn random_inputs<T: Element>(world: usize, rows: usize, hidden: usize, seed: u64) -> Inputs<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let elems = rows * hidden;
    // Random bits in bulk (tens of millions of values per case), one u32 per value: 1 in 64 is -0.0,
    // 1 in 64 is +0.0, the rest uniform in [-scale, scale).
    let mut values = |len: usize, scale: f32| -> Vec<T> {
        let mut bits = vec![0u32; len];
        rng.fill(&mut bits[..]);
        bits.into_iter()
            .map(|b| match b & 63 {
                0 => T::from_bits_u32(T::NEG_ZERO_BITS),
                1 => T::from_f32(0.0),
                _ => T::from_f32(((b >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale),
            })
            .collect()
    };
    let mut x: Vec<Vec<T>> = (0..world).map(|_| values(elems, 2.0)).collect();
    let residual = values(elems, 4.0);
    let weight = values(hidden, 1.5);
    // Some columns of row 0 are -0.0 on every rank (the all-(-0.0) sum of the contract).
    for col in (5..hidden).step_by(97) {
        for xr in &mut x {
            xr[col] = T::from_bits_u32(T::NEG_ZERO_BITS);
        }
    }
    Inputs { rows, hidden, x, residual, weight }
}

fn poison<T: Element>(len: usize) -> Vec<T> {
    (0..len).map(|i| T::from_bits_u32(POISON[i % POISON.len()])).collect()
}

/// What one rank's call produced.
#[derive(Clone, Default)]
struct Outputs<T> {
    out: Vec<T>,
    residual_out: Vec<T>,
}

/// The CPU backend's result of `call` for every rank, its ranks running as threads.
fn cpu_reference<T: Element>(inputs: &Inputs<T>, call: Call) -> Vec<Outputs<T>> {
    let world = inputs.x.len();
    let elems = inputs.rows * inputs.hidden;
    let zero = T::from_bits_u32(0);
    let mut staging = vec![vec![zero; elems]; world];
    let mut scratch = vec![vec![zero; elems]; world];
    let mut signals = vec![vec![0u64; SIGNAL_BYTES / 8]; world];
    let slot_bytes = elems * std::mem::size_of::<T>();
    let push_words = arfuse_kernels::params::push_region_bytes(world, slot_bytes) / 4;
    let mut push = vec![vec![arfuse_kernels::params::PUSH_SENTINEL; push_words]; world];
    let mut outputs = vec![Outputs { out: vec![zero; elems], residual_out: vec![zero; elems] }; world];
    let mut template = LaunchParams {
        residual: inputs.residual.as_ptr() as u64,
        weight: inputs.weight.as_ptr() as u64,
        barrier_base: 2,
        deadline_ns: 120_000_000_000,
        rows: inputs.rows as u32,
        hidden: inputs.hidden as u32,
        world_size: world as u32,
        eps: EPS,
        push_slot_bytes: slot_bytes as u32,
        ..LaunchParams::default()
    };
    for peer in 0..world {
        template.push[peer] = push[peer].as_mut_ptr() as u64;
        template.staging[peer] = staging[peer].as_mut_ptr() as u64;
        template.scratch[peer] = scratch[peer].as_mut_ptr() as u64;
        template.signals[peer] = signals[peer].as_mut_ptr() as u64;
    }
    let params: Vec<LaunchParams> = outputs
        .iter_mut()
        .enumerate()
        .map(|(rank, o)| {
            // (Field by field: struct update syntax here trips a rustc 1.95 ICE.)
            let mut p = template;
            p.rank = rank as u32;
            p.input = inputs.x[rank].as_ptr() as u64;
            p.out = o.out.as_mut_ptr() as u64;
            p.residual_out = o.residual_out.as_mut_ptr() as u64;
            p
        })
        .collect();
    std::thread::scope(|scope| {
        for p in &params {
            scope.spawn(move || {
                for &op in call.kernels() {
                    // SAFETY: every address in `p` is a host vector of `elems` elements (the weight:
                    // `hidden`) or a zeroed signal area, all alive until the scope ends; only the
                    // barrier protocol orders the ranks' accesses to staging and scratch.
                    unsafe { cpu::kernels::run(KernelId { op, dtype: T::DTYPE }, p) }.expect("cpu kernel");
                }
            });
        }
    });
    drop((staging, scratch, signals, push));
    outputs
}

/// `Ok` if `got == want` bit for bit, else a description of the first difference.
fn compare<T: Element>(what: &str, got: &[T], want: &[T], hidden: usize) -> Result<(), String> {
    let mut differ = got.iter().zip(want).enumerate().filter(|(_, (g, w))| g.to_bits_u32() != w.to_bits_u32());
    let Some((first, (g, w))) = differ.next() else { return Ok(()) };
    let count = 1 + differ.count();
    Err(format!(
        "{what}: {count} of {} elements differ; first at row {} col {}: gpu {:#06x} ({}), cpu {:#06x} ({})",
        want.len(),
        first / hidden,
        first % hidden,
        g.to_bits_u32(),
        g.to_f32(),
        w.to_bits_u32(),
        w.to_f32()
    ))
}

/// Runs `calls` (each with its call index) on every rank, on the same inputs: uploads, poisons the
/// outputs, launches, waits, checks the error word, reads back. `[rank][call]`.
fn gpu_calls<T: Element>(
    ranks: &[Rank],
    inputs: &Inputs<T>,
    calls: &[(Call, u64)],
) -> Result<Vec<Vec<Outputs<T>>>, String> {
    let elems = inputs.rows * inputs.hidden;
    std::thread::scope(|scope| {
        let threads: Vec<_> = ranks
            .iter()
            .map(|r| {
                scope.spawn(move || -> Result<Vec<Outputs<T>>, String> {
                    r.upload(Rank::addr(&r.local.input), &inputs.x[r.rank]);
                    r.upload(Rank::addr(&r.local.residual), &inputs.residual);
                    r.upload(Rank::addr(&r.local.weight), &inputs.weight);
                    let mut results = Vec::new();
                    for &(call, index) in calls {
                        r.upload(Rank::addr(&r.local.out), &poison::<T>(elems));
                        r.upload(Rank::addr(&r.local.residual_out), &poison::<T>(elems));
                        let params = r.params(inputs.rows, inputs.hidden, 0, index);
                        r.launch(call, T::DTYPE, &params).map_err(|e| format!("rank {}: {call:?}: {e}", r.rank))?;
                        r.wait(&format!("{call:?}"));
                        let word = r.error_word();
                        if word.kind() != 0 {
                            return Err(format!(
                                "rank {}: {call:?} gave up: error word {:#x} (kind {}, peer {}, barrier {})",
                                r.rank,
                                word.0,
                                word.kind(),
                                word.peer(),
                                word.barrier()
                            ));
                        }
                        let out = r.download(Rank::addr(&r.local.out), elems);
                        let residual_out = if call.writes_residual() {
                            r.download(Rank::addr(&r.local.residual_out), elems)
                        } else {
                            Vec::new()
                        };
                        results.push(Outputs { out, residual_out });
                    }
                    Ok(results)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("rank thread")).collect()
    })
}

/// Checks every rank's GPU result of every call against the CPU's; returns the elements compared.
/// `references` caches the CPU results by call (so callers can reuse them).
fn check_case<T: Element>(
    label: &str,
    inputs: &Inputs<T>,
    calls: &[Call],
    gpu: &[Vec<Outputs<T>>],
    references: &mut Vec<(Call, Vec<Outputs<T>>)>,
    failures: &mut Vec<String>,
) -> usize {
    let mut compared = 0;
    for (k, &call) in calls.iter().enumerate() {
        let wanted = call.reference();
        if !references.iter().any(|(c, _)| *c == wanted) {
            references.push((wanted, cpu_reference(inputs, wanted)));
        }
        let Some((_, cpu)) = references.iter().find(|(c, _)| *c == wanted) else { continue };
        for (rank, per_rank) in gpu.iter().enumerate() {
            let got = &per_rank[k];
            let mut check = |what: &str, g: &[T], w: &[T]| {
                compared += w.len();
                if let Err(e) = compare(&format!("{label} {call:?} rank {rank} {what}"), g, w, inputs.hidden) {
                    failures.push(e);
                }
            };
            check("out", &got.out, &cpu[rank].out);
            if call.writes_residual() {
                check("residual_out", &got.residual_out, &cpu[rank].residual_out);
            }
        }
    }
    // Path invariance on the GPU itself: 1-stage and 2-stage give the same bits.
    for (one, two) in [(Call::FusedOneStage, Call::FusedTwoStage), (Call::AllReduceOneStage, Call::AllReduceTwoStage)] {
        let (Some(a), Some(b)) = (calls.iter().position(|&c| c == one), calls.iter().position(|&c| c == two)) else {
            continue;
        };
        for (rank, per_rank) in gpu.iter().enumerate() {
            if let Err(e) = compare(
                &format!("{label} rank {rank} {one:?} vs {two:?} out"),
                &per_rank[b].out,
                &per_rank[a].out,
                inputs.hidden,
            ) {
                failures.push(e);
            }
        }
    }
    compared
}

// ---- tests ----------------------------------------------------------------------------------

#[test]
fn handle_is_96_plain_bytes() {
    let handle = CudaIpcHandle { pid: 7, ordinal: 1, process_token: 9, ptr: 0x1000, len: 4096, handle: [3; 64] };
    let bytes = bytemuck::bytes_of(&handle);
    assert_eq!(bytes.len(), 96);
    assert_eq!(*bytemuck::from_bytes::<CudaIpcHandle>(bytes), handle);
}

#[test]
fn without_a_gpu_the_backend_says_so() {
    // Must never panic: either devices, none, or a clean "unavailable".
    match Cuda::device_count() {
        Ok(n) => println!("cuda: {n} device(s)"),
        Err(Error::BackendUnavailable { reason, .. }) => println!("cuda unavailable: {reason}"),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

/// (1) The device opens and describes itself; shared memory is zeroed, exports, and opens in the same
/// process as its raw pointer; host round trips and copies are exact; events time a copy.
#[test]
fn device_memory_handles_and_events() {
    let Some(_gpu) = gpu("device_memory_handles_and_events", false) else { return };
    let device = Cuda::open_device(0, 1).expect("open device 0");
    println!("cuda device: {}", Cuda::describe(&device));
    assert!(device.sm_count() > 0 && device.warp_size() > 0);
    let stream = Cuda::create_stream(&device).expect("stream");

    const BYTES: usize = 1 << 20;
    let shared = Cuda::alloc_shared(&device, BYTES).expect("alloc shared");
    let mut host = vec![0xa5u8; BYTES];
    // SAFETY: reads inside the 1 MiB buffer.
    unsafe { Cuda::read_back(&stream, Cuda::shared_ptr(&shared), &mut host) }.expect("read back");
    assert!(host.iter().all(|&b| b == 0), "shared memory starts zeroed");

    let handle = Cuda::export_handle(&shared).expect("export");
    assert!(handle.is_from_this_process());
    assert_eq!((handle.ptr, handle.len), (Cuda::shared_ptr(&shared).0, BYTES as u64));
    let mapping = Cuda::open_handle(&device, &handle).expect("open own handle");
    assert_eq!(Cuda::peer_ptr(&mapping), Cuda::shared_ptr(&shared));
    assert!(!mapping.is_ipc());
    let empty = CudaIpcHandle { pid: 0, ordinal: 0, process_token: 0, ptr: 0, len: 0, handle: [0; 64] };
    assert!(matches!(Cuda::open_handle(&device, &empty), Err(Error::InvalidHandle(_))));

    let mut rng = StdRng::seed_from_u64(1);
    // A quarter of the buffer, so that the device copy to BYTES / 2 below does not overlap it.
    let data: Vec<u8> = (0..BYTES / 4).map(|_| rng.gen()).collect();
    let base = Cuda::shared_ptr(&shared);
    // SAFETY: every access below stays inside the 1 MiB buffer.
    unsafe {
        Cuda::write(&stream, base.add(4096), &data).expect("write");
        Cuda::copy(&stream, base.add(BYTES / 2), base.add(4096), 4096).expect("copy");
        let mut back = vec![0u8; data.len()];
        Cuda::read_back(&stream, base.add(4096), &mut back).expect("read back");
        assert_eq!(back, data, "write/read_back round trip");
        let mut copied = vec![0u8; 4096];
        Cuda::read_back(&stream, base.add(BYTES / 2), &mut copied).expect("read back");
        assert_eq!(copied, data[..4096], "device copy");
    }

    let floats: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let buffer = CudaBuffer::from_slice(&stream, &floats).expect("buffer");
    assert_eq!(buffer.download(&stream).expect("download"), floats);

    const BIG: usize = 64 << 20;
    let src = CudaBuffer::<u8>::zeros(&device, BIG).expect("alloc");
    let dst = CudaBuffer::<u8>::zeros(&device, BIG).expect("alloc");
    let start = Cuda::record_event(&stream).expect("event");
    for _ in 0..4 {
        // SAFETY: both buffers hold `BIG` bytes and outlive the synchronisation below.
        unsafe { Cuda::copy(&stream, dst.device_ptr(), src.device_ptr(), BIG) }.expect("copy");
    }
    let end = Cuda::record_event(&stream).expect("event");
    let elapsed = Cuda::elapsed(&start, &end).expect("elapsed");
    Cuda::synchronize(&stream).expect("synchronize");
    assert!(elapsed > Duration::ZERO);
    println!(
        "cuda: 4 device copies of 64 MiB took {elapsed:?} ({:.0} GB/s read + written)",
        (8 * BIG) as f64 / elapsed.as_secs_f64() / 1e9
    );
    drop(mapping);
    device.check_err().expect("no parked errors");
}

/// (2) Every call, both dtypes, many shapes and world sizes: bit for bit what the CPU backend computes.
#[test]
fn kernels_match_the_cpu_backend() {
    let Some(_gpu) = gpu("kernels_match_the_cpu_backend", true) else { return };
    const HIDDENS: [usize; 4] = [2880, 4096, 8192, 16384];
    const ROWS: [usize; 6] = [1, 4, 80, 81, 128, 1024];
    let mut table = String::new();
    let mut failures = Vec::new();
    let started = Instant::now();
    for world in [2usize, 4, 8, 3, 6] {
        // The 8192 x 4096 case (64 MiB per rank) runs once, at world size 8.
        let big = world == 8;
        let max_elems = if big { 8192 * 4096 } else { 1024 * 16384 };
        let layout = Layout { half: max_elems * 2 };
        let ranks = open_group(world, layout, max_elems * 2);
        if world == 2 {
            println!("cuda conformance on {}", Cuda::describe(&ranks[0].device));
        }
        let (hiddens, rows): (&[usize], &[usize]) =
            if world == 3 || world == 6 { (&[2880, 4096], &[1, 81, 128]) } else { (&HIDDENS, &ROWS) };
        let mut next_call = 0u64;
        'dtypes: for dtype in [DType::Bf16, DType::F16] {
            let mut shapes: Vec<(usize, usize)> =
                hiddens.iter().flat_map(|&h| rows.iter().map(move |&r| (r, h))).collect();
            if big && dtype == DType::Bf16 {
                shapes.push((8192, 4096));
            }
            let (mut cases, mut calls_run, mut compared) = (0usize, 0usize, 0usize);
            let failures_before = failures.len();
            let t0 = Instant::now();
            for (rows, hidden) in shapes {
                // Only calls that cross ranks take an epoch (the descriptor slots rely on every epoch
                // having a barrier); add+RMSNorm reuses the last one, which it ignores.
                let calls: Vec<(Call, u64)> = Call::ALL
                    .iter()
                    .map(|&c| {
                        if c.crosses_ranks() {
                            next_call += 1;
                        }
                        (c, next_call - 1)
                    })
                    .collect();
                let seed = ((world * 1_000_003 + rows * 10_007 + hidden) as u64) ^ ((dtype as u64) << 48);
                let label = format!("world {world} {dtype} {rows}x{hidden}");
                let outcome = match dtype {
                    DType::Bf16 => run_case::<half::bf16>(&ranks, &label, rows, hidden, seed, &calls, &mut failures),
                    _ => run_case::<half::f16>(&ranks, &label, rows, hidden, seed, &calls, &mut failures),
                };
                match outcome {
                    Ok(n) => compared += n,
                    Err(protocol) => {
                        // Flags are now inconsistent: the rest of this world size would only time out.
                        failures.push(format!("{label}: {protocol}; skipping the rest of world size {world}"));
                        break 'dtypes;
                    }
                }
                cases += 1;
                calls_run += calls.len();
            }
            let status = if failures.len() == failures_before { "ok" } else { "FAILED" };
            let _ = writeln!(
                table,
                "{world:>5}  {dtype:<5} {cases:>5} {calls_run:>6} {compared:>14} {:>9.1?}  {status}",
                t0.elapsed()
            );
        }
        for r in &ranks {
            r.device.check_err().expect("no parked errors");
        }
    }
    println!("world  dtype cases  calls  elems-compared      time  result\n{table}total {:.1?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// One shape: GPU calls, CPU references, comparisons. `Err` when the protocol itself failed.
fn run_case<T: Element>(
    ranks: &[Rank],
    label: &str,
    rows: usize,
    hidden: usize,
    seed: u64,
    calls: &[(Call, u64)],
    failures: &mut Vec<String>,
) -> Result<usize, String> {
    let inputs = random_inputs::<T>(ranks.len(), rows, hidden, seed);
    let gpu = gpu_calls(ranks, &inputs, calls)?;
    let kinds: Vec<Call> = calls.iter().map(|&(c, _)| c).collect();
    let mut references = Vec::new();
    let mut compared = check_case(label, &inputs, &kinds, &gpu, &mut references, failures);
    // The CPU's own 2-stage path equals its 1-stage path (checked where cheap).
    if rows * hidden <= 1 << 20 {
        for (two, one) in
            [(Call::FusedTwoStage, Call::FusedOneStage), (Call::AllReduceTwoStage, Call::AllReduceOneStage)]
        {
            let Some((_, b)) = references.iter().find(|(c, _)| *c == one) else { continue };
            let a = cpu_reference(&inputs, two);
            for rank in 0..ranks.len() {
                compared += a[rank].out.len();
                if let Err(e) = compare(
                    &format!("{label} cpu {two:?} vs {one:?} rank {rank} out"),
                    &a[rank].out,
                    &b[rank].out,
                    hidden,
                ) {
                    failures.push(e);
                }
            }
        }
    }
    Ok(compared)
}

/// (3) 1000 calls of changing shapes and paths, launched back to back in batches (no host
/// synchronisation inside a batch), staging parity alternating per call: all exact.
#[test]
fn thousand_back_to_back_calls_stay_exact() {
    let Some(_gpu) = gpu("thousand_back_to_back_calls_stay_exact", true) else { return };
    const WORLD: usize = 4;
    const CALLS: usize = 1000;
    const BATCH: usize = 16;
    const SHAPES: [(usize, usize); 9] =
        [(1, 4096), (3, 2880), (8, 8192), (16, 4096), (80, 2880), (81, 4096), (2, 8192), (128, 4096), (1, 2880)];
    const KINDS: [Call; 4] =
        [Call::FusedOneStage, Call::FusedTwoStage, Call::AllReduceOneStage, Call::AllReduceTwoStage];
    let slot_bytes = 128 * 8192 * 2;
    let layout = Layout { half: slot_bytes };
    let ranks = open_group(WORLD, layout, BATCH * slot_bytes);
    let mut failures = Vec::new();
    let started = Instant::now();
    for batch_start in (0..CALLS).step_by(BATCH) {
        let batch: Vec<(usize, Call, usize, usize)> = (batch_start..(batch_start + BATCH).min(CALLS))
            .map(|index| {
                let (rows, hidden) = SHAPES[(index * 5 + index / 9) % SHAPES.len()];
                (index, KINDS[index % KINDS.len()], rows, hidden)
            })
            .collect();
        let inputs: Vec<Inputs<half::bf16>> = batch
            .iter()
            .map(|&(index, _, rows, hidden)| random_inputs(WORLD, rows, hidden, 77_000 + index as u64))
            .collect();
        let gpu: Vec<Result<Vec<Outputs<half::bf16>>, String>> = std::thread::scope(|scope| {
            let threads: Vec<_> = ranks
                .iter()
                .map(|r| {
                    let (batch, inputs) = (&batch, &inputs);
                    scope.spawn(move || {
                        // Upload and poison every slot, then launch the whole batch without waiting.
                        for (slot, input) in inputs.iter().enumerate() {
                            let offset = (slot * slot_bytes) as u64;
                            let elems = input.rows * input.hidden;
                            r.upload(Rank::addr(&r.local.input) + offset, &input.x[r.rank]);
                            r.upload(Rank::addr(&r.local.residual) + offset, &input.residual);
                            r.upload(Rank::addr(&r.local.weight) + offset, &input.weight);
                            r.upload(Rank::addr(&r.local.out) + offset, &poison::<half::bf16>(elems));
                            r.upload(Rank::addr(&r.local.residual_out) + offset, &poison::<half::bf16>(elems));
                        }
                        for (slot, &(index, call, rows, hidden)) in batch.iter().enumerate() {
                            let params = r.params(rows, hidden, slot * slot_bytes, index as u64);
                            r.launch(call, DType::Bf16, &params)
                                .map_err(|e| format!("rank {} call {index}: {e}", r.rank))?;
                        }
                        r.wait("a batch of calls");
                        let word = r.error_word();
                        if word.kind() != 0 {
                            return Err(format!(
                                "rank {}: error word {:#x} in the batch from call {batch_start}",
                                r.rank, word.0
                            ));
                        }
                        Ok(batch
                            .iter()
                            .enumerate()
                            .map(|(slot, &(_, call, rows, hidden))| {
                                let offset = (slot * slot_bytes) as u64;
                                Outputs {
                                    out: r.download(Rank::addr(&r.local.out) + offset, rows * hidden),
                                    residual_out: if call.writes_residual() {
                                        r.download(Rank::addr(&r.local.residual_out) + offset, rows * hidden)
                                    } else {
                                        Vec::new()
                                    },
                                }
                            })
                            .collect())
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().expect("rank thread")).collect()
        });
        let gpu: Vec<Vec<Outputs<half::bf16>>> = match gpu.into_iter().collect() {
            Ok(gpu) => gpu,
            Err(protocol) => panic!("{protocol}"),
        };
        for (slot, &(index, call, rows, hidden)) in batch.iter().enumerate() {
            let per_rank: Vec<Vec<Outputs<half::bf16>>> = gpu.iter().map(|r| vec![r[slot].clone()]).collect();
            let label = format!("call {index} ({rows}x{hidden})");
            check_case(&label, &inputs[slot], &[call], &per_rank, &mut Vec::new(), &mut failures);
        }
        assert!(failures.is_empty(), "{}", failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n"));
    }
    println!("cuda: {CALLS} back-to-back calls at world size {WORLD}, bf16, exact ({:.1?})", started.elapsed());
}

/// (4) A decode call captured into a CUDA graph and replayed gives the bits of the eager call; a
/// second graph replayed after new inputs were written reads the new inputs.
#[test]
fn graph_replay_matches_eager() {
    let Some(_gpu) = gpu("graph_replay_matches_eager", true) else { return };
    const WORLD: usize = 2;
    let (rows, hidden) = (4usize, 4096usize);
    let elems = rows * hidden;
    let layout = Layout { half: elems * 2 };
    let ranks = open_group(WORLD, layout, elems * 2);
    let first = random_inputs::<half::bf16>(WORLD, rows, hidden, 4);
    let second = random_inputs::<half::bf16>(WORLD, rows, hidden, 5);
    let results: Vec<(Outputs<half::bf16>, Outputs<half::bf16>, Outputs<half::bf16>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = ranks
            .iter()
            .map(|r| {
                let (first, second) = (&first, &second);
                scope.spawn(move || {
                    let run = |what: &str| {
                        r.wait(what);
                        assert_eq!(r.error_word().kind(), 0, "rank {}: {what} gave up", r.rank);
                        Outputs {
                            out: r.download(Rank::addr(&r.local.out), elems),
                            residual_out: r.download(Rank::addr(&r.local.residual_out), elems),
                        }
                    };
                    let set_inputs = |inputs: &Inputs<half::bf16>| {
                        r.upload(Rank::addr(&r.local.input), &inputs.x[r.rank]);
                        r.upload(Rank::addr(&r.local.residual), &inputs.residual);
                        r.upload(Rank::addr(&r.local.weight), &inputs.weight);
                        r.upload(Rank::addr(&r.local.out), &poison::<half::bf16>(elems));
                        r.upload(Rank::addr(&r.local.residual_out), &poison::<half::bf16>(elems));
                    };
                    set_inputs(first);
                    r.launch(Call::FusedOneStage, DType::Bf16, &r.params(rows, hidden, 0, 0)).expect("eager launch");
                    let eager = run("eager call");
                    // Capture two calls (each a graph: a replay repeats its barrier value, so each graph
                    // is replayed once), then replay.
                    let mut graphs = Vec::new();
                    for index in [1, 2] {
                        r.stream.begin_capture().expect("begin capture");
                        let launched = r.launch(Call::FusedOneStage, DType::Bf16, &r.params(rows, hidden, 0, index));
                        let graph = r.stream.end_capture();
                        launched.expect("captured launch");
                        graphs.push(graph.expect("end capture"));
                    }
                    set_inputs(first);
                    // SAFETY: the graph's kernels use this group's buffers, alive until the scope ends.
                    unsafe { graphs[0].launch(&r.stream) }.expect("replay");
                    let replay = run("first graph replay");
                    set_inputs(second);
                    // SAFETY: as above.
                    unsafe { graphs[1].launch(&r.stream) }.expect("replay");
                    let fresh = run("second graph replay");
                    (eager, replay, fresh)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("rank thread")).collect()
    });
    let mut failures = Vec::new();
    let first_cpu = cpu_reference(&first, Call::FusedOneStage);
    let second_cpu = cpu_reference(&second, Call::FusedOneStage);
    for (rank, (eager, replay, fresh)) in results.iter().enumerate() {
        let checks = [
            ("eager out vs cpu", &eager.out, &first_cpu[rank].out),
            ("eager residual_out vs cpu", &eager.residual_out, &first_cpu[rank].residual_out),
            ("replay out vs eager", &replay.out, &eager.out),
            ("replay residual_out vs eager", &replay.residual_out, &eager.residual_out),
            ("second replay out vs cpu", &fresh.out, &second_cpu[rank].out),
            ("second replay residual_out vs cpu", &fresh.residual_out, &second_cpu[rank].residual_out),
        ];
        for (what, got, want) in checks {
            if let Err(e) = compare(&format!("rank {rank} {what}"), got, want, hidden) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!(
        "cuda: graph capture + replay of FusedOneStage {rows}x{hidden} bf16 at world size {WORLD}: same bits as eager"
    );
}

/// (5) World size 2, rank 1 never launches: rank 0's kernel gives up by itself after its deadline,
/// and its error word names a peer timeout on rank 1.
#[test]
fn stalled_peer_times_out() {
    let Some(_gpu) = gpu("stalled_peer_times_out", true) else { return };
    const WORLD: usize = 2;
    let deadline = Duration::from_millis(200);
    let (rows, hidden) = (4usize, 4096usize);
    let layout = Layout { half: rows * hidden * 2 };
    let ranks = open_group(WORLD, layout, rows * hidden * 2);
    let r = &ranks[0];
    let inputs = random_inputs::<half::bf16>(WORLD, rows, hidden, 3);
    r.upload(Rank::addr(&r.local.input), &inputs.x[0]);
    r.upload(Rank::addr(&r.local.residual), &inputs.residual);
    r.upload(Rank::addr(&r.local.weight), &inputs.weight);
    let mut params = r.params(rows, hidden, 0, 0);
    let base = params.barrier_base;
    params.deadline_ns = deadline.as_nanos() as u64;
    let start = Instant::now();
    r.launch(Call::FusedOneStage, DType::Bf16, &params).expect("launch");
    r.wait("the lone rank's kernel");
    let took = start.elapsed();
    let word = r.error_word();
    println!(
        "cuda: lone rank 0 gave up after {took:?} (deadline {deadline:?}): error word {:#x} kind {} peer {} barrier {}",
        word.0,
        word.kind(),
        word.peer(),
        word.barrier()
    );
    assert_eq!(word.kind(), ErrorWord::KIND_PEER_TIMEOUT, "error word {:#x}", word.0);
    assert_eq!(word.peer(), 1, "the missing peer is rank 1");
    assert!((base..base + 2).contains(&word.barrier()), "barrier {} of this call", word.barrier());
    assert!(took >= deadline / 2, "gave up after {took:?}, before the deadline");
    assert!(took < deadline + Duration::from_secs(5), "took {took:?} for a {deadline:?} deadline");
}

// ---- two processes over CUDA IPC ------------------------------------------------------------

const IPC_CHILD_ENV: &str = "ARFUSE_CUDA_IPC_CHILD";
const IPC_TAG: &str = "ARFUSE-IPC";

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn handle_from_hex(hex: &str) -> CudaIpcHandle {
    let bytes: Vec<u8> =
        (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex handle")).collect();
    bytemuck::pod_read_unaligned(&bytes)
}

/// One rank of the two-process test: maps the peer's buffer through CUDA IPC, runs a fused call,
/// compares with the CPU. `send` tells the other process a tagged line, `receive` waits for one.
fn ipc_rank(rank: usize, send: &mut dyn FnMut(&str), receive: &mut dyn FnMut(&str) -> String) -> Result<(), String> {
    const WORLD: usize = 2;
    let (rows, hidden) = (4usize, 4096usize);
    let elems = rows * hidden;
    let layout = Layout { half: elems * 2 };
    let device = Cuda::open_device(0, WORLD).map_err(|e| e.to_string())?;
    device.load_kernels().map_err(|e| e.to_string())?;
    let stream = Cuda::create_stream(&device).map_err(|e| e.to_string())?;
    let shared = Cuda::alloc_shared(&device, layout.bytes(WORLD)).map_err(|e| e.to_string())?;
    arm_push_region(&device, &shared, layout, WORLD);
    let buffer = || CudaBuffer::<u8>::zeros(&device, elems * 2).expect("alloc local");
    let local = Local { input: buffer(), residual: buffer(), weight: buffer(), out: buffer(), residual_out: buffer() };
    let handle = Cuda::export_handle(&shared).map_err(|e| e.to_string())?;
    send(&format!("HANDLE {}", to_hex(bytemuck::bytes_of(&handle))));
    let peer_handle = handle_from_hex(receive("HANDLE").trim());
    let mapping = Cuda::open_handle(&device, &peer_handle).map_err(|e| format!("open the peer's handle: {e}"))?;
    if !mapping.is_ipc() {
        return Err("the peer's handle was taken for this process's own".into());
    }
    let mut bases = [0u64; MAX_RANKS];
    bases[rank] = Cuda::shared_ptr(&shared).0;
    bases[1 - rank] = Cuda::peer_ptr(&mapping).0;
    let r = Rank { rank, world: WORLD, device, stream, _shared: shared, _peers: Vec::new(), bases, layout, local };
    let inputs = random_inputs::<half::bf16>(WORLD, rows, hidden, 2024);
    r.upload(Rank::addr(&r.local.input), &inputs.x[rank]);
    r.upload(Rank::addr(&r.local.residual), &inputs.residual);
    r.upload(Rank::addr(&r.local.weight), &inputs.weight);
    r.upload(Rank::addr(&r.local.out), &poison::<half::bf16>(elems));
    r.upload(Rank::addr(&r.local.residual_out), &poison::<half::bf16>(elems));
    let started = Instant::now();
    r.launch(Call::FusedOneStage, DType::Bf16, &r.params(rows, hidden, 0, 0)).map_err(|e| e.to_string())?;
    r.wait("the fused call across processes");
    let took = started.elapsed();
    let word = r.error_word();
    let outcome = if word.kind() != 0 {
        Err(format!("rank {rank}: error word {:#x} (kind {}, peer {})", word.0, word.kind(), word.peer()))
    } else {
        let cpu = cpu_reference(&inputs, Call::FusedOneStage);
        compare(
            &format!("rank {rank} out"),
            &r.download::<half::bf16>(Rank::addr(&r.local.out), elems),
            &cpu[rank].out,
            hidden,
        )
        .and_then(|()| {
            let got = r.download::<half::bf16>(Rank::addr(&r.local.residual_out), elems);
            compare(&format!("rank {rank} residual_out"), &got, &cpu[rank].residual_out, hidden)
        })
    };
    println!("cuda ipc: rank {rank} (pid {}): fused call over IPC took {took:?}", std::process::id());
    // Close our mapping of the peer's buffer before the peer frees it, and keep ours until the peer
    // has closed its mapping of it.
    drop(mapping);
    send("CLOSED");
    receive("CLOSED");
    r.device.check_err().map_err(|e| e.to_string())?;
    drop(r);
    outcome
}

/// (6) Two processes (this test binary starts itself again as rank 1) on one GPU: each opens the
/// other's shared buffer with `cuIpcOpenMemHandle`, the fused call is exact, handles close cleanly.
#[test]
fn ipc_two_processes() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    if std::env::var_os(IPC_CHILD_ENV).is_some() {
        // Rank 1: tagged lines on stdout, the parent's on stdin.
        let Some(_gpu) = gpu("ipc_two_processes (child)", true) else { return };
        let stdin = std::io::stdin();
        let mut send = |line: &str| {
            println!("\n{IPC_TAG} {line}");
            let _ = std::io::stdout().flush();
        };
        let mut receive = |tag: &str| -> String {
            let mut line = String::new();
            loop {
                line.clear();
                let n = stdin.lock().read_line(&mut line).expect("read from the parent");
                assert!(n > 0, "the parent closed the pipe while we waited for {tag}");
                if let Some(rest) = line.trim().strip_prefix(tag) {
                    return rest.to_string();
                }
            }
        };
        if let Err(e) = ipc_rank(1, &mut send, &mut receive) {
            panic!("rank 1: {e}");
        }
        return;
    }
    let Some(_gpu) = gpu("ipc_two_processes", true) else { return };
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args(["ipc_two_processes", "--exact", "--nocapture", "--test-threads=1"])
        .env(IPC_CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the rank 1 process");
    let mut to_child = child.stdin.take().expect("child stdin");
    let from_child = child.stdout.take().expect("child stdout");
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(from_child).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut send = |line: &str| {
        writeln!(to_child, "{line}").expect("write to rank 1");
        to_child.flush().expect("flush to rank 1");
    };
    let mut receive = |tag: &str| -> String {
        let wanted = format!("{IPC_TAG} {tag}");
        loop {
            match lines.recv_timeout(WATCHDOG) {
                Ok(line) => {
                    if let Some(at) = line.find(&wanted) {
                        return line[at + wanted.len()..].to_string();
                    }
                    if !line.trim().is_empty() {
                        println!("[rank 1] {line}");
                    }
                }
                Err(e) => panic!("no {tag} line from rank 1 ({e}); see its output above"),
            }
        }
    };
    let outcome = ipc_rank(0, &mut send, &mut receive);
    drop(to_child);
    let status = child.wait().expect("wait for rank 1");
    outcome.unwrap_or_else(|e| panic!("rank 0: {e}"));
    assert!(status.success(), "rank 1 failed: {status}");
    println!("cuda ipc: two processes, FusedOneStage bf16 4x4096 over cuIpcOpenMemHandle: exact");
}

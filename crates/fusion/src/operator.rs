//! The operator users call: [`AllReduceRmsNorm`], one per rank, created collectively.

use crate::alias::{self, Span, Spans};
use crate::config::Config;
#[cfg(feature = "test-hooks")]
use crate::config::Fault;
use crate::dispatch::{choose_path, AllReduce, Path, Request};
use crate::vendor::{self, VendorFallback};
use crate::{Error, Result};
use arfuse_ipc::{Rendezvous, SharedBuffers};
use arfuse_kernels::collective::{CollectiveBackend, Communicator};
use arfuse_kernels::contract::{Epilogue, Quant, Scaling, QUANT_GROUP};
use arfuse_kernels::params::epilogue_bits;
use arfuse_kernels::params::{push_header_offset, FLAG_REFUSED, PUSH_ROTATIONS, SIGNAL_ERROR_OFFSET};
use arfuse_kernels::{
    Backend, DevicePtr, DeviceSlice, DeviceSliceMut, Element, ErrorWord, KernelId, LaunchParams, Op, StreamOrder,
    StreamOrderMut, MAX_RANKS, PACK_BYTES,
};
use std::marker::PhantomData;

/// Ties a tensor argument to its borrow and its backend without owning either.
type Borrow<B, R> = PhantomData<(R, fn() -> B)>;

/// A read-only tensor argument: device address and length, borrowed for the call.
#[derive(Clone, Copy)]
pub struct TensorRef<'a, B: Backend, T: Element> {
    pub(crate) ptr: DevicePtr,
    pub(crate) len: usize,
    /// How the call orders its reads with the tensor's other users (cudarc's slices), if it must.
    pub(crate) order: Option<&'a dyn StreamOrder<B>>,
    _borrow: Borrow<B, &'a [T]>,
}

impl<B: Backend, T: Element> std::fmt::Debug for TensorRef<'_, B, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let order = self.order.is_some();
        f.debug_struct("TensorRef").field("ptr", &self.ptr).field("len", &self.len).field("ordered", &order).finish()
    }
}

impl<'a, B: Backend, T: Element> TensorRef<'a, B, T> {
    /// Borrows a slice of `B`'s memory: an arfuse buffer, host memory on the cpu backend, or (with
    /// the `cuda` feature) cudarc's `CudaSlice`, `CudaView` or `CudaViewMut`, whose use the call
    /// orders the way cudarc's own launches do.
    pub fn new<S: DeviceSlice<B, Elem = T> + ?Sized>(slice: &'a S) -> Self {
        TensorRef { ptr: slice.device_ptr(), len: slice.len(), order: slice.stream_order(), _borrow: PhantomData }
    }
    /// A tensor from a raw device address (e.g. a framework's tensor).
    ///
    /// # Safety
    /// `ptr` must point to `len` elements of `T` in `B`'s memory that stay valid and unwritten
    /// until the work of the call has executed on its stream.
    pub unsafe fn from_raw(ptr: DevicePtr, len: usize) -> Self {
        TensorRef { ptr, len, order: None, _borrow: PhantomData }
    }
}

/// A written tensor argument: device address and length, exclusively borrowed for the call.
pub struct TensorMut<'a, B: Backend, T: Element> {
    pub(crate) ptr: DevicePtr,
    pub(crate) len: usize,
    /// How the call orders its writes with the tensor's other users (cudarc's slices), if it must.
    pub(crate) order: Option<&'a mut dyn StreamOrderMut<B>>,
    _borrow: Borrow<B, &'a mut [T]>,
}

impl<B: Backend, T: Element> std::fmt::Debug for TensorMut<'_, B, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let order = self.order.is_some();
        f.debug_struct("TensorMut").field("ptr", &self.ptr).field("len", &self.len).field("ordered", &order).finish()
    }
}

impl<'a, B: Backend, T: Element> TensorMut<'a, B, T> {
    /// Borrows a slice of `B`'s memory exclusively (see [`TensorRef::new`] for what it may be).
    pub fn new<S: DeviceSliceMut<B, Elem = T> + ?Sized>(slice: &'a mut S) -> Self {
        let (ptr, len) = (slice.device_ptr(), slice.len());
        TensorMut { ptr, len, order: slice.stream_order_mut(), _borrow: PhantomData }
    }
    /// A tensor from a raw device address.
    ///
    /// # Safety
    /// As [`TensorRef::from_raw`], and nothing else may read or write the memory until the call's
    /// work has executed.
    pub unsafe fn from_raw(ptr: DevicePtr, len: usize) -> Self {
        TensorMut { ptr, len, order: None, _borrow: PhantomData }
    }
}

/// The arguments of one call of [`AllReduceRmsNorm::forward`].
#[derive(Debug)]
pub struct Args<'a, B: Backend, T: Element> {
    /// This rank's partial output, `[rows, hidden]`.
    pub input: TensorRef<'a, B, T>,
    /// The residual (the same on every rank), `[rows, hidden]`.
    pub residual: TensorRef<'a, B, T>,
    /// The RMSNorm weight, `[hidden]`: its length defines the hidden size.
    pub weight: TensorRef<'a, B, T>,
    /// Receives the normalised output, `[rows, hidden]`.
    pub out: TensorMut<'a, B, T>,
    /// Receives the residual output (`sum + residual`), `[rows, hidden]`.
    pub residual_out: TensorMut<'a, B, T>,
    /// RMSNorm epsilon.
    pub eps: f32,
}

impl<'a, B: Backend, T: Element> Args<'a, B, T> {
    /// The in-place call, without `unsafe`: `out` is written over `hidden_states` (this rank's
    /// partial output, the input) and `residual_out` over `residual`, bit-identical to the call out
    /// of place (the two overlaps the operator allows).
    pub fn in_place<S, W>(hidden_states: &'a mut S, residual: &'a mut S, weight: &'a W, eps: f32) -> Self
    where
        S: DeviceSliceMut<B, Elem = T> + ?Sized,
        W: DeviceSlice<B, Elem = T> + ?Sized,
    {
        // The read side of each pair is ordered by its write side (a written tensor waits for
        // every pending use of its memory), as cudarc does for a `&mut` argument.
        let as_read = |t: &TensorMut<'a, B, T>| TensorRef { ptr: t.ptr, len: t.len, order: None, _borrow: PhantomData };
        let out = TensorMut::new(hidden_states);
        let residual_out = TensorMut::new(residual);
        Args {
            input: as_read(&out),
            residual: as_read(&residual_out),
            weight: TensorRef::new(weight),
            out,
            residual_out,
            eps,
        }
    }

    /// Orders the call's stream after every pending use of the tensors whose owners track them
    /// (cudarc's slices; nothing for the others). An error leaves nothing to undo: the waits
    /// already enqueued only delay the stream.
    fn order_before(&mut self, stream: &B::Stream) -> Result<()> {
        for t in [&self.input, &self.residual, &self.weight] {
            if let Some(order) = t.order {
                order.before_read(stream)?;
            }
        }
        for t in [&mut self.out, &mut self.residual_out] {
            if let Some(order) = t.order.as_deref_mut() {
                order.before_write(stream)?;
            }
        }
        Ok(())
    }

    /// Tells the tracking owners that the call's stream uses their tensors up to its current end.
    fn order_after(&mut self, stream: &B::Stream) {
        for t in [&self.input, &self.residual, &self.weight] {
            if let Some(order) = t.order {
                order.after_read(stream);
            }
        }
        for t in [&mut self.out, &mut self.residual_out] {
            if let Some(order) = t.order.as_deref_mut() {
                order.after_write(stream);
            }
        }
    }
}

/// A written byte tensor (the FP8 codes of [`QuantOut`]), exclusively borrowed for the call.
#[derive(Debug)]
pub struct BytesMut<'a, B: Backend> {
    pub(crate) ptr: DevicePtr,
    pub(crate) len: usize,
    _borrow: Borrow<B, &'a mut [u8]>,
}

impl<'a, B: Backend> BytesMut<'a, B> {
    /// Borrows the bytes of a slice of `B`'s memory exclusively, whatever its element type (the
    /// FP8 codes need no [`Element`] of their own: an f32 buffer of `n / 4` elements holds `n`).
    pub fn new<S: DeviceSliceMut<B> + ?Sized>(slice: &'a mut S) -> Self {
        let len = slice.len() * std::mem::size_of::<S::Elem>();
        BytesMut { ptr: slice.device_ptr(), len, _borrow: PhantomData }
    }

    /// A byte tensor from a raw device address.
    ///
    /// # Safety
    /// As [`TensorMut::from_raw`]: `len` bytes at `ptr` in `B`'s memory, valid, and untouched by
    /// anything else until the call's work has executed.
    pub unsafe fn from_raw(ptr: DevicePtr, len: usize) -> Self {
        BytesMut { ptr, len, _borrow: PhantomData }
    }
}

impl<'a> BytesMut<'a, arfuse_kernels::api::Cpu> {
    /// Borrows host bytes (the cpu backend's memory is host memory).
    pub fn host(bytes: &'a mut [u8]) -> Self {
        BytesMut { ptr: DevicePtr(bytes.as_mut_ptr() as u64), len: bytes.len(), _borrow: PhantomData }
    }
}

/// An FP8 copy of `out` ([`Variant::quant`]): `codes` receives `[rows, hidden]` codes of
/// `quant.format`, `scales` the dynamic scales (f32 `[rows]` per token, `[rows, hidden / 128]`
/// per group, row major; `None` per tensor). Exact by contract (`arfuse_kernels::contract`,
/// "Epilogues"); `out` itself is written too (the unquantised side output).
#[derive(Debug)]
pub struct QuantOut<'a, B: Backend> {
    /// Format and scaling.
    pub quant: Quant,
    /// The codes, `rows * hidden` bytes, 16-byte aligned.
    pub codes: BytesMut<'a, B>,
    /// The dynamic scales (4-byte aligned), `None` for per-tensor scaling.
    pub scales: Option<TensorMut<'a, B, f32>>,
}

/// What a call may add to [`Args`] ([`AllReduceRmsNorm::forward_with`]); the default is the plain
/// call.
#[derive(Debug)]
pub struct Variant<'a, B: Backend> {
    /// No residual (TensorRT-LLM's `RMS_NORM`): `out = RMSNorm(Σ x_r)`; [`Args::residual`] and
    /// [`Args::residual_out`] must then be empty (length 0): nothing is read or written there.
    pub no_residual: bool,
    /// An FP8 copy of `out`.
    pub quant: Option<QuantOut<'a, B>>,
}

impl<'a, B: Backend> QuantOut<'a, B> {
    /// The stream-order hook of the scales, where their owner tracks them (cudarc's slices; the
    /// codes are raw bytes): what a fused FP8 call and [`crate::quantize_fp8`] order.
    pub(crate) fn scales_order(&mut self) -> Option<&mut (dyn StreamOrderMut<B> + 'a)> {
        self.scales.as_mut().and_then(|s| s.order.as_deref_mut())
    }
}

impl<B: Backend> Variant<'_, B> {
    /// Orders the call's stream after every pending use of the FP8 scales, as [`Args`]' tensors are.
    fn order_before(&mut self, stream: &B::Stream) -> Result<()> {
        if let Some(order) = self.quant.as_mut().and_then(QuantOut::scales_order) {
            order.before_write(stream)?;
        }
        Ok(())
    }

    /// Tells the scales' tracking owner that the call's stream writes them up to its current end.
    fn order_after(&mut self, stream: &B::Stream) {
        if let Some(order) = self.quant.as_mut().and_then(QuantOut::scales_order) {
            order.after_write(stream);
        }
    }
}

impl<B: Backend> Default for Variant<'_, B> {
    fn default() -> Self {
        Variant { no_residual: false, quant: None }
    }
}

/// A validated call: shapes known, nothing launched yet.
#[derive(Clone, Copy, Debug)]
struct Call {
    rows: usize,
    hidden: usize,
    request: Request,
    /// The contract's epilogue (plain unless the config or the call's [`Variant`] asks).
    epilogue: Epilogue,
    /// The FP8 codes and scales (0 when not quantised / not dynamic).
    out_q: u64,
    scales: u64,
}

/// The fused all-reduce + residual add + RMSNorm of one rank.
///
/// Created once per rank, collectively ([`AllReduceRmsNorm::new`] must be called by every rank of the
/// group); every call of [`forward`](Self::forward) must likewise be made by every rank, with the
/// same shapes, in the same order. On the CPU backend a call has finished when it returns; on GPU
/// backends it is enqueued on the given stream, and a peer failure inside a kernel surfaces at
/// [`check`](Self::check).
///
/// The vendor collective library (NCCL/RCCL) is the fallback for what our kernels cannot take
/// (calls above `max_size / 2`, no peer access, several hosts): an operator made with
/// [`with_collective`](Self::with_collective) or [`with_communicator`](Self::with_communicator)
/// holds a [`Communicator`] and dispatches there; one made with [`new`](Self::new) has none, and
/// refuses the vendor path with [`Error::VendorUnavailable`] (see [`crate::vendor`]).
///
/// # What a newcomer needs to know
/// - **Devices and streams** come from the backend: `Cpu::open_device(0, 1)`,
///   `Cuda::open_device(ordinal, ranks_sharing_it)`, `B::create_stream(&device)`; or the stream is
///   the engine's own: `CudaStream::from_cudarc(&device, its_cudarc_stream)` (shared),
///   `CudaStream::from_raw` / `HipStream::from_raw` (a borrowed raw handle, never destroyed).
///   Tensors may be the engine's cudarc `CudaSlice`/`CudaView`/`CudaViewMut` (`TensorRef::new`,
///   no `unsafe`), ordered with cudarc's own event tracking. The
///   **rendezvous** comes from [`crate::ipc`]: `ThreadRendezvous::group` for ranks that are threads,
///   `UnixRendezvous::connect` for rank processes, or your own `Rendezvous` over your engine's
///   channel (whatever it returns is validated).
/// - **Shapes come from lengths**: `hidden = weight.len()`, `rows = input.len() / hidden`; a
///   hidden size must be a multiple of 16 bytes (8 bf16/f16 elements).
/// - **Every tensor starts on a 16-byte boundary**, or the call is refused (`Misaligned`).
/// - **Aliasing**: `out` may be the input and `residual_out` the residual (the in-place forms,
///   bit-identical to out of place; [`Args::in_place`] builds them without `unsafe`); any other
///   overlap is refused (`Aliasing`).
/// - **Memory**: each rank allocates `64 KiB + max_size` of shared memory (the 2-stage path's
///   receive area and scratch, `max_size / 2` each; 128 MiB by default) plus the push region,
///   `3 x world x push slot` (the 1-stage threshold of the world size: 12 MiB at 2 ranks), all at
///   creation.
/// - **Graphs**: calls captured into a CUDA/HIP graph replay correctly with nothing registered
///   (no path reads a peer's tensor: every rank pushes its data into its peers' buffers).
/// - **Configuration**: [`Config::default`] is the library's defaults; [`Config::from_env`] applies
///   the `ARFUSE_*` variables on top ([`crate::config`] lists them).
/// - **Numerics**: `residual_out = round(round(Σ x_r) + residual)`, ranks summed in f32 in rank
///   order; `out = round(w · round(residual_out · inv))`, normalise, round, then scale (the Hugging
///   Face order), with `var` in f32 ([`arfuse_kernels::contract`] has the domain).
///
/// ```
/// use arfuse_fusion::ipc::{Rendezvous, ThreadRendezvous};
/// use arfuse_fusion::kernels::{api::Cpu, Backend};
/// use arfuse_fusion::{AllReduceRmsNorm, Args, Config, Path, TensorMut, TensorRef};
/// use half::bf16;
/// use std::time::Duration;
///
/// let group = ThreadRendezvous::group(2, Duration::from_secs(30));
/// std::thread::scope(|scope| {
///     for mut rendezvous in group {
///         scope.spawn(move || {
///             let device = Cpu::open_device(0, 1).unwrap();
///             let stream = Cpu::create_stream(&device).unwrap();
///             let mut op = AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, Config::default()).unwrap();
///             let x = vec![bf16::from_f32(rendezvous.rank() as f32 + 1.0); 2 * 64]; // 2 rows of 64
///             let residual = vec![bf16::from_f32(0.5); 2 * 64];
///             let weight = vec![bf16::ONE; 64];
///             let (mut out, mut residual_out) = (vec![bf16::ZERO; 2 * 64], vec![bf16::ZERO; 2 * 64]);
///             let path = op
///                 .forward(&stream, Args {
///                     input: TensorRef::new(&x[..]),
///                     residual: TensorRef::new(&residual[..]),
///                     weight: TensorRef::new(&weight[..]),
///                     out: TensorMut::new(&mut out[..]),
///                     residual_out: TensorMut::new(&mut residual_out[..]),
///                     eps: 1e-6,
///                 })
///                 .unwrap();
///             assert_eq!(path, Path::OneStage);
///             assert!(residual_out.iter().all(|v| v.to_f32() == 3.5)); // 1 + 2 + 0.5
///             assert!(out.iter().all(|v| v.to_f32() == 1.0)); // a constant row normalises to 1
///         });
///     }
/// });
/// ```
pub struct AllReduceRmsNorm<B: Backend> {
    device: B::Device,
    buffers: SharedBuffers<B>,
    config: Config,
    poisoned: Option<String>,
    vendor: Option<VendorFallback<B>>,
    last_path: Option<Path>,
}

impl<B: Backend> std::fmt::Debug for AllReduceRmsNorm<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllReduceRmsNorm")
            .field("backend", &B::KIND)
            .field("rank", &self.buffers.rank())
            .field("world_size", &self.buffers.world_size())
            .field("config", &self.config)
            .field("vendor", &self.vendor.as_ref().map(|v| &v.comm))
            .field("last_path", &self.last_path)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> AllReduceRmsNorm<B> {
    /// Creates the operator of this rank: allocates and exchanges the shared buffers through
    /// `rendezvous`. Every rank of the group must call it with the same configuration.
    ///
    /// It has no vendor collective library: `config.policy.vendor_available` is set to `false`, and
    /// a call the dispatcher sends to the vendor library fails with [`Error::VendorUnavailable`].
    pub fn new(device: &B::Device, rendezvous: &mut dyn Rendezvous, mut config: Config) -> Result<Self> {
        let span = tracing::debug_span!(
            "AllReduceRmsNorm::new",
            backend = %B::KIND,
            rank = rendezvous.rank(),
            world_size = rendezvous.world_size()
        );
        let _entered = span.enter();
        let started = std::time::Instant::now();
        config.policy.vendor_available = false;
        config.validate()?;
        let world_size = rendezvous.world_size();
        if world_size == 0 || world_size > MAX_RANKS {
            return Err(Error::WorldSizeUnsupported { world_size, supported: "1..=8 ranks on one host" });
        }
        // Load the kernels before the last meeting of the ranks: no rank launches before all have.
        B::prepare(device)?;
        let push_slot_bytes = config.policy.push_slot_bytes_for(world_size);
        let buffers = SharedBuffers::<B>::create(device, rendezvous, config.policy.max_size, push_slot_bytes)?;
        tracing::debug!(
            max_size = config.policy.max_size,
            push_slot_bytes,
            elapsed = ?started.elapsed(),
            "operator created"
        );
        Ok(AllReduceRmsNorm { device: device.clone(), buffers, config, poisoned: None, vendor: None, last_path: None })
    }

    /// As [`new`](Self::new), plus a communicator of the vendor collective library (NCCL/RCCL,
    /// loaded at run time, see [`arfuse_kernels::collective`]) created over the same ranks through
    /// `rendezvous` ([`vendor::create_communicator`]); `config.policy.vendor_available` is then
    /// `true`. Fails with the library's error if any rank cannot load it.
    pub fn with_collective(device: &B::Device, rendezvous: &mut dyn Rendezvous, config: Config) -> Result<Self>
    where
        B: CollectiveBackend,
    {
        let op = Self::new(device, rendezvous, config)?;
        let comm = vendor::create_communicator::<B>(device, rendezvous)?;
        Ok(op.attach(comm))
    }

    /// As [`new`](Self::new), with a communicator the caller already has (e.g. one wrapping an
    /// engine's `ncclComm_t`, [`Communicator::from_raw`]). Its rank and world size must be this
    /// rank's and the group's.
    pub fn with_communicator(
        device: &B::Device,
        rendezvous: &mut dyn Rendezvous,
        config: Config,
        comm: Communicator,
    ) -> Result<Self>
    where
        B: CollectiveBackend,
    {
        let (rank, world) = (rendezvous.rank(), rendezvous.world_size());
        if comm.rank() != rank || comm.world_size() != world {
            return Err(Error::Config(format!(
                "communicator is rank {} of {}, the rendezvous rank {rank} of {world}",
                comm.rank(),
                comm.world_size()
            )));
        }
        Ok(Self::new(device, rendezvous, config)?.attach(comm))
    }

    fn attach(mut self, comm: Communicator) -> Self
    where
        B: CollectiveBackend,
    {
        self.vendor = Some(VendorFallback::new(comm));
        self.config.policy.vendor_available = true;
        self
    }

    /// [`crate::quantize_fp8`] on this operator's device: the separate FP8 quantisation of a
    /// local `[rows, hidden]` tensor (e.g. the `out` of a plain call), bit-identical to the fused
    /// FP8 output. A local kernel: it involves no peer and works on a poisoned operator too.
    pub fn quantize_fp8<T: Element>(
        &self,
        stream: &B::Stream,
        input: TensorRef<'_, B, T>,
        hidden: usize,
        out: QuantOut<'_, B>,
    ) -> Result<()> {
        crate::quantize::quantize_fp8::<B, T>(&self.device, stream, input, hidden, out)
    }

    /// The vendor library's communicator, if this operator has one.
    pub fn communicator(&self) -> Option<&Communicator> {
        self.vendor.as_ref().map(|v| &v.comm)
    }

    /// The path of the last call that was enqueued successfully (`None` before the first).
    pub fn last_path(&self) -> Option<Path> {
        self.last_path
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.buffers.rank()
    }
    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.buffers.world_size()
    }
    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The path a call of `rows` x `hidden` elements of `T` would take.
    pub fn plan<T: Element>(&self, rows: usize, hidden: usize) -> Path {
        choose_path(&self.request::<T>(rows, hidden), &self.config.policy)
    }

    fn request<T: Element>(&self, rows: usize, hidden: usize) -> Request {
        Request { rows, hidden, dtype: T::DTYPE, world_size: self.world_size() }
    }

    /// Runs one call on the path the dispatcher picks; returns that path.
    ///
    /// A call this rank refuses (bad input: a typed error) reads and writes none of the caller's
    /// tensors, but still takes part in the group's count of calls: it sends its peers a header
    /// saying it refused, so that a peer that made the call gets [`Error::CallMismatch`] instead
    /// of pairing it with this rank's next call. (A poisoned operator sends nothing.)
    pub fn forward<T: Element>(&mut self, stream: &B::Stream, args: Args<'_, B, T>) -> Result<Path> {
        self.forward_with(stream, args, Variant::default())
    }

    /// [`forward`](Self::forward) with a [`Variant`]: no residual and/or an FP8 copy of `out`.
    /// Bad combinations (per-group scaling of a hidden size not a multiple of 128, a scales
    /// buffer of the wrong length, a bad static scale, a non-empty residual with `no_residual`)
    /// are typed errors, refused like any other bad input, with nothing launched.
    pub fn forward_with<T: Element>(
        &mut self,
        stream: &B::Stream,
        mut args: Args<'_, B, T>,
        mut variant: Variant<'_, B>,
    ) -> Result<Path> {
        let admitted = self.validate(&args, &variant).map(|call| {
            let path = choose_path(&call.request, &self.config.policy);
            (call, path)
        });
        let admitted = admitted.and_then(|admitted| args.order_before(stream).map(|()| admitted));
        let admitted = admitted.and_then(|admitted| variant.order_before(stream).map(|()| admitted));
        let (call, path) = admitted.inspect_err(|err| self.refuse::<T>(stream, &args, err))?;
        self.trace_path::<T>(path, &call, false);
        let ran = self.run(stream, path, call, &args);
        args.order_after(stream);
        variant.order_after(stream);
        ran?;
        self.last_path = Some(path);
        Ok(path)
    }

    /// Runs one call on `path` (tests and benchmarks compare paths on the same input). A fused path
    /// must fit (`bytes <= max_size / 2`); every rank must force the same path.
    ///
    /// Only with the `test-hooks` feature: an engine lets the dispatcher choose
    /// ([`forward`](Self::forward)) and steers it through [`Config::policy`].
    #[cfg(feature = "test-hooks")]
    pub fn forward_on<T: Element>(&mut self, stream: &B::Stream, path: Path, args: Args<'_, B, T>) -> Result<Path> {
        self.forward_on_with(stream, path, args, Variant::default())
    }

    /// [`forward_on`](Self::forward_on) with a [`Variant`] (feature `test-hooks`).
    #[cfg(feature = "test-hooks")]
    pub fn forward_on_with<T: Element>(
        &mut self,
        stream: &B::Stream,
        path: Path,
        mut args: Args<'_, B, T>,
        mut variant: Variant<'_, B>,
    ) -> Result<Path> {
        let call = self
            .validate(&args, &variant)
            .and_then(|call| self.check_forced(path, &call).map(|()| call))
            .and_then(|call| args.order_before(stream).map(|()| call))
            .and_then(|call| variant.order_before(stream).map(|()| call))
            .inspect_err(|err| self.refuse::<T>(stream, &args, err))?;
        self.trace_path::<T>(path, &call, true);
        let ran = self.run(stream, path, call, &args);
        args.order_after(stream);
        variant.order_after(stream);
        ran?;
        self.last_path = Some(path);
        Ok(path)
    }

    /// The per-call event: the path (`trace`), or why the call was not fused (`debug`). With no
    /// subscriber that wants either, it costs one load and compare of tracing's global level filter
    /// (the guard below; the macros would each check it again, and the code for the events stays
    /// out of line).
    #[inline]
    fn trace_path<T: Element>(&self, path: Path, call: &Call, forced: bool) {
        use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
        if STATIC_MAX_LEVEL < LevelFilter::DEBUG || LevelFilter::current() < LevelFilter::DEBUG {
            return;
        }
        self.trace_path_slow::<T>(path, call, forced);
    }

    #[cold]
    #[inline(never)]
    fn trace_path_slow<T: Element>(&self, path: Path, call: &Call, forced: bool) {
        match path {
            Path::Unfused { all_reduce, reason } => tracing::debug!(
                rank = self.rank(),
                rows = call.rows,
                hidden = call.hidden,
                dtype = %T::DTYPE,
                path = %path,
                ?all_reduce,
                ?reason,
                forced,
                "call not fused"
            ),
            _ => tracing::trace!(
                rank = self.rank(),
                rows = call.rows,
                hidden = call.hidden,
                dtype = %T::DTYPE,
                path = %path,
                forced,
                "call"
            ),
        }
    }

    /// Refuses a forced fused path the call does not fit: more than `max_size / 2` (the 2-stage
    /// receive area), or for 1-stage more than the push protocol's receive slot.
    #[cfg(feature = "test-hooks")]
    fn check_forced(&self, path: Path, call: &Call) -> Result<()> {
        let bytes = call.request.bytes();
        let half = (self.config.policy.max_size / 2) as u64;
        if matches!(path, Path::OneStage | Path::TwoStage) && bytes > half {
            return Err(Error::Config(format!("{path} forced for {bytes} bytes, above max_size / 2 = {half}")));
        }
        let push_slot = self.buffers.push_slot_bytes() as u64;
        if path == Path::OneStage && bytes > push_slot {
            return Err(Error::Config(format!(
                "{path} forced for {bytes} bytes, above the push protocol's receive slot of {push_slot} bytes \
                 (Policy::push_slot_bytes)"
            )));
        }
        Ok(())
    }

    /// The launches of the unfused path's custom all-reduce over `rows` rows of `row_bytes`: in
    /// chunks of at most `max_size / 2` bytes (what the 2-stage receive area takes), each `(first row, rows, all-reduce kernel)` — 1-stage up to
    /// the policy's threshold, else reduce-scatter (then all-gather).
    fn chunks(&self, rows: usize, row_bytes: usize) -> impl Iterator<Item = (usize, usize, Op)> {
        let chunk_rows = (self.config.policy.max_size / 2 / row_bytes.max(1)).max(1);
        let one_stage_max = self.config.policy.one_stage_max_bytes_for(self.world_size());
        (0..rows).step_by(chunk_rows).map(move |row| {
            let n = chunk_rows.min(rows - row);
            let op = if n * row_bytes <= one_stage_max { Op::AllReduceOneStage } else { Op::ReduceScatter };
            (row, n, op)
        })
    }

    /// Waits for the stream and reports a peer failure a GPU kernel recorded in the signal area, or
    /// an error the vendor library recorded asynchronously.
    pub fn check(&mut self, stream: &B::Stream) -> Result<()> {
        if let Some(why) = &self.poisoned {
            return Err(Error::Poisoned(why.clone()));
        }
        B::synchronize(stream)?;
        let mut word = [0u8; 8];
        let at = DevicePtr(self.buffers.own_signal_ptr()).add(SIGNAL_ERROR_OFFSET);
        // SAFETY: the error word lies inside this rank's live signal area.
        unsafe { B::read_back(stream, at, &mut word)? };
        let error = ErrorWord(u64::from_le_bytes(word));
        let headers = match error.kind() {
            ErrorWord::KIND_CALL_MISMATCH => self.mismatched_headers(stream, error),
            _ => None,
        };
        if let Some(err) = error.to_error_with(self.rank() as u32, self.config.deadline, headers) {
            return Err(self.poison(err.into()));
        }
        if let Some(vendor) = &mut self.vendor {
            if let Err(e) = vendor.comm.async_error() {
                return Err(self.poison(e.into()));
            }
        }
        Ok(())
    }

    /// The two headers of the call mismatch `error` reports, where they lie in the push regions
    /// (nothing re-arms them once this rank has failed): `[what the peer sent us, what we sent
    /// the peer]`, for the error's description; `None` where they cannot be read.
    fn mismatched_headers(&self, stream: &B::Stream, error: ErrorWord) -> Option<[u32; 8]> {
        let (rank, peer, world) = (self.rank(), error.peer() as usize, self.world_size());
        if peer >= world || peer == rank {
            return None;
        }
        let rotation = (error.barrier() / 2) as usize % PUSH_ROTATIONS;
        let slot = self.buffers.push_slot_bytes();
        let push = self.buffers.push_ptrs();
        let mut words = [0u32; 8];
        for (i, (region, sender)) in [(rank, peer), (peer, rank)].into_iter().enumerate() {
            let mut bytes = [0u8; 16];
            let at = DevicePtr(push[region]).add(push_header_offset(world, slot, rotation, sender));
            // SAFETY: a header slot of a live push region (ours, or a peer's mapped one), 16 bytes.
            unsafe { B::read_back(stream, at, &mut bytes) }.ok()?;
            for (w, chunk) in bytes.chunks_exact(4).enumerate() {
                words[4 * i + w] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        Some(words)
    }

    /// Checks everything about a call before anything is launched.
    fn validate<T: Element>(&self, args: &Args<'_, B, T>, variant: &Variant<'_, B>) -> Result<Call> {
        if let Some(why) = &self.poisoned {
            return Err(Error::Poisoned(why.clone()));
        }
        let hidden = args.weight.len;
        check_hidden::<T>(hidden)?;
        let elems = args.input.len;
        let rows = whole_rows(elems, hidden)?;
        let residual_elems = if variant.no_residual { 0 } else { elems };
        for (what, len, expected) in [
            ("residual", args.residual.len, residual_elems),
            ("out", args.out.len, elems),
            ("residual_out", args.residual_out.len, residual_elems),
        ] {
            if len != expected {
                return Err(Error::ShapeMismatch { what, expected, got: len });
            }
        }
        if !args.eps.is_finite() || args.eps < 0.0 {
            return Err(Error::BadEps { eps: args.eps });
        }
        let size = T::DTYPE.size();
        alias::check(&Spans {
            input: Span::elems(args.input.ptr.0, args.input.len, size),
            residual: Span::elems(args.residual.ptr.0, args.residual.len, size),
            weight: Span::elems(args.weight.ptr.0, args.weight.len, size),
            out: Span::elems(args.out.ptr.0, args.out.len, size),
            residual_out: Span::elems(args.residual_out.ptr.0, args.residual_out.len, size),
        })?;
        for (what, ptr) in [
            ("input", args.input.ptr),
            ("residual", args.residual.ptr),
            ("weight", args.weight.ptr),
            ("out", args.out.ptr),
            ("residual_out", args.residual_out.ptr),
        ] {
            let empty = variant.no_residual && (what == "residual" || what == "residual_out");
            if ptr.0 % PACK_BYTES as u64 != 0 && elems > 0 && !empty {
                return Err(Error::Misaligned { what, ptr: ptr.0, align: PACK_BYTES });
            }
        }
        let row_bytes = hidden * T::DTYPE.size();
        if row_bytes > self.config.policy.max_size / 2 {
            return Err(Error::HiddenUnsupported { hidden, max: self.config.policy.max_size / 2 / T::DTYPE.size() });
        }
        let (epilogue, out_q, scales) = self.validate_variant(args, variant, rows, hidden)?;
        Ok(Call { rows, hidden, request: self.request::<T>(rows, hidden), epilogue, out_q, scales })
    }

    /// The epilogue of a call (the config's norm, the variant's residual and quantisation) and its
    /// FP8 outputs' addresses, after checking them against the call's shape and tensors.
    fn validate_variant<T: Element>(
        &self,
        args: &Args<'_, B, T>,
        variant: &Variant<'_, B>,
        rows: usize,
        hidden: usize,
    ) -> Result<(Epilogue, u64, u64)> {
        let mut epilogue = Epilogue { norm: self.config.norm, no_residual: variant.no_residual, quant: None };
        let Some(q) = &variant.quant else { return Ok((epilogue, 0, 0)) };
        // The FP8 outputs overlap nothing: not each other, not any tensor of the call.
        let size = T::DTYPE.size() as u64;
        let scales = check_quant_out(
            q,
            rows,
            hidden,
            &[
                ("input", args.input.ptr.0, args.input.len as u64 * size),
                ("residual", args.residual.ptr.0, args.residual.len as u64 * size),
                ("weight", args.weight.ptr.0, args.weight.len as u64 * size),
                ("out", args.out.ptr.0, args.out.len as u64 * size),
                ("residual_out", args.residual_out.ptr.0, args.residual_out.len as u64 * size),
            ],
        )?;
        epilogue.quant = Some(q.quant);
        Ok((epilogue, q.codes.ptr.0, scales))
    }

    /// Parameters shared by every launch of a call.
    fn params<T: Element>(&self, call: &Call, args: &Args<'_, B, T>) -> LaunchParams {
        let (epilogue, quant_scale) = epilogue_bits(&call.epilogue);
        let no_residual = call.epilogue.no_residual;
        LaunchParams {
            input: args.input.ptr.0,
            // With no residual the kernels read none (the 1-stage kernel's early loads still
            // name a pack of it: the input is valid memory of the same extent).
            residual: if no_residual { args.input.ptr.0 } else { args.residual.ptr.0 },
            weight: args.weight.ptr.0,
            out: args.out.ptr.0,
            residual_out: if no_residual { 0 } else { args.residual_out.ptr.0 },
            rows: call.rows as u32,
            hidden: call.hidden as u32,
            eps: args.eps,
            out_q: call.out_q,
            scales: call.scales,
            quant_scale,
            epilogue,
            ..self.group_params()
        }
    }

    /// What every launch of this rank gets whatever the call: the group's buffers, the rank, the
    /// deadline.
    fn group_params(&self) -> LaunchParams {
        LaunchParams {
            signals: self.buffers.signal_ptrs(),
            receive: self.buffers.receive_ptrs(),
            scratch: self.buffers.scratch_ptrs(),
            push: self.buffers.push_ptrs(),
            push_slot_bytes: self.buffers.push_slot_bytes() as u32,
            deadline_ns: self.config.deadline.as_nanos().min(u64::MAX as u128) as u64,
            rank: self.rank() as u32,
            world_size: self.world_size() as u32,
            ..LaunchParams::default()
        }
    }

    /// Launches a kernel that crosses ranks. Its epoch (barrier values, push rotation) comes from
    /// the rank's epoch word in device memory (`barrier_base` 0), so the same launch captured in a
    /// graph takes a fresh epoch on every replay.
    fn launch_cross(&mut self, stream: &B::Stream, kernel: KernelId, mut params: LaunchParams) -> Result<()> {
        params.barrier_base = 0;
        self.launch(stream, kernel, &params)
    }

    fn launch(&mut self, stream: &B::Stream, kernel: KernelId, params: &LaunchParams) -> Result<()> {
        // SAFETY: `validate` checked every user tensor's extent against the call's shape and the
        // shared buffers' receive area and scratch are sized for calls of `max_size / 2` bytes,
        // which `run` never exceeds.
        let res = unsafe { B::launch(&self.device, stream, kernel, params) };
        res.map_err(|e| self.poison(e.into()))
    }

    /// Marks the operator unusable after `err` (a failed launch or a peer failure leaves the shared
    /// buffers in an unknown state) and returns it. Cold and out of line: the call path stays small.
    #[cold]
    #[inline(never)]
    fn poison(&mut self, err: Error) -> Error {
        tracing::warn!(rank = self.rank(), error = %err, "operator poisoned: later calls are refused");
        self.poisoned = Some(err.to_string());
        err
    }

    fn run<T: Element>(&mut self, stream: &B::Stream, path: Path, call: Call, args: &Args<'_, B, T>) -> Result<()> {
        // The epilogue kernels where the call has one (the plain ones carry none of its code).
        let epilogue = !call.epilogue.is_plain();
        let kernel = |op: Op| KernelId { op: if epilogue { op.with_epilogue() } else { op }, dtype: T::DTYPE };
        let params = self.params(&call, args);
        match path {
            // No data: the header exchange alone (1-stage kernel, zero rows) keeps the ranks in step.
            Path::Noop => self.launch_cross(stream, kernel(Op::FusedOneStage), LaunchParams { rows: 0, ..params }),
            Path::OneStage => self.launch_cross(stream, kernel(Op::FusedOneStage), params),
            Path::TwoStage => {
                self.launch_cross(stream, kernel(Op::FusedTwoStage), params)?;
                self.inject_between_stages();
                self.launch(stream, kernel(Op::ScratchAddRmsNorm), &params)
            }
            Path::Unfused { all_reduce: AllReduce::Vendor, reason } => {
                let Some(vendor) = self.vendor.as_mut() else {
                    return Err(Error::VendorUnavailable { reason: format!("{reason:?}") });
                };
                // The library's sum goes to `out` (never onto the caller's input, which is only
                // borrowed), and add+RMSNorm reads it from there in place, as on the custom path.
                let enqueued = (vendor.make_current)(&self.device).and_then(|()| {
                    let raw_stream = (vendor.raw_stream)(stream);
                    // SAFETY: `validate` checked that `input` and `out` hold `rows * hidden`
                    // elements of `T` and are distinct borrows (`&` and `&mut`); `raw_stream` is
                    // the live stream of this rank's device, which `make_current` made current.
                    unsafe {
                        vendor.comm.all_reduce_sum(
                            DevicePtr(params.input),
                            DevicePtr(params.out),
                            call.rows * call.hidden,
                            T::DTYPE,
                            raw_stream,
                        )
                    }
                });
                if let Err(e) = enqueued {
                    return Err(self.poison(e.into()));
                }
                let norm = LaunchParams { input: params.out, ..params };
                self.launch(stream, kernel(Op::AddRmsNorm), &norm)
            }
            Path::Unfused { all_reduce: AllReduce::Custom, .. } => {
                // The all-reduced sum goes to `out`, and add+RMSNorm reads it from there in place
                // (each element is read before it is overwritten): no buffer to allocate mid-run,
                // which on a GPU could wait for a peer's spinning kernel.
                let sum = DevicePtr(args.out.ptr.0);
                self.all_reduce_chunks::<T>(stream, &call, params, sum)?;
                let norm = LaunchParams { input: sum.0, ..params };
                self.launch(stream, kernel(Op::AddRmsNorm), &norm)
            }
        }
    }

    /// Takes part in the group's call as a refusal (see [`forward`](Self::forward)): a header-only
    /// launch whose header says this rank refused. Touches none of the caller's tensors. Nothing is
    /// sent by a poisoned operator (its peers fail on their own), and a failure to send poisons it.
    fn refuse<T: Element>(&mut self, stream: &B::Stream, args: &Args<'_, B, T>, why: &Error) {
        if self.poisoned.is_some() || matches!(why, Error::Poisoned(_)) {
            return;
        }
        tracing::debug!(rank = self.rank(), error = %why, "call refused; its peers are told");
        let params = LaunchParams { eps: args.eps, flags: FLAG_REFUSED, ..self.group_params() };
        // The error of this launch (a peer that made the call, seen as a mismatch on the CPU
        // backend) poisons the operator; the caller gets the refusal itself.
        let _ = self.launch_cross(stream, KernelId { op: Op::FusedOneStage, dtype: T::DTYPE }, params);
    }

    /// Fires [`Config::fault`] (feature `test-hooks`), once.
    #[cfg(feature = "test-hooks")]
    fn inject_between_stages(&mut self) {
        match self.config.fault.take() {
            Some(Fault::AbortBetweenStages) => std::process::abort(),
            Some(Fault::StallBetweenStages(stall)) => std::thread::sleep(stall),
            None => {}
        }
    }

    /// Without the `test-hooks` feature there is no fault to inject.
    #[cfg(not(feature = "test-hooks"))]
    #[inline(always)]
    fn inject_between_stages(&mut self) {}

    /// The custom all-reduce of the unfused path into `sum`, in row chunks of at most `max_size / 2`
    /// bytes.
    fn all_reduce_chunks<T: Element>(
        &mut self,
        stream: &B::Stream,
        call: &Call,
        params: LaunchParams,
        sum: DevicePtr,
    ) -> Result<()> {
        let row_bytes = call.hidden * T::DTYPE.size();
        for (row, rows, op) in self.chunks(call.rows, row_bytes) {
            let offset = (row * row_bytes) as u64;
            let chunk = LaunchParams { rows: rows as u32, input: params.input + offset, out: sum.0 + offset, ..params };
            self.launch_cross(stream, KernelId { op, dtype: T::DTYPE }, chunk)?;
            if op == Op::ReduceScatter {
                self.launch(stream, KernelId { op: Op::AllGather, dtype: T::DTYPE }, &chunk)?;
            }
        }
        Ok(())
    }
}

/// The hidden size's checks of a call (and of [`crate::quantize_fp8`]): not zero, whole 16-byte
/// packs, within the kernels' limit for `T`.
pub(crate) fn check_hidden<T: Element>(hidden: usize) -> Result<()> {
    let pack = T::DTYPE.pack_elems();
    let max = arfuse_kernels::max_hidden(T::DTYPE);
    if hidden == 0 {
        return Err(Error::HiddenUnsupported { hidden, max });
    }
    if hidden % pack != 0 {
        return Err(Error::HiddenNotMultipleOfPack { hidden, pack, dtype: T::DTYPE });
    }
    if hidden > max {
        return Err(Error::HiddenUnsupported { hidden, max });
    }
    Ok(())
}

/// The rows of an input of `elems` elements, refused unless it is whole rows of `hidden`.
pub(crate) fn whole_rows(elems: usize, hidden: usize) -> Result<usize> {
    if elems % hidden != 0 {
        return Err(Error::ShapeMismatch {
            what: "input (not a whole number of rows)",
            expected: elems.next_multiple_of(hidden),
            got: elems,
        });
    }
    Ok(elems / hidden)
}

/// The checks of an FP8 output for `rows x hidden` elements (the scaling's static scale and
/// group, the lengths of codes and scales, their alignment), and that codes and scales overlap
/// neither each other nor any of `others` (`(name, address, bytes)`). Returns the scales'
/// address (0 without scales).
pub(crate) fn check_quant_out<B: Backend>(
    q: &QuantOut<'_, B>,
    rows: usize,
    hidden: usize,
    others: &[(&'static str, u64, u64)],
) -> Result<u64> {
    let elems = rows * hidden;
    match q.quant.scaling {
        Scaling::PerTensor(scale) if !scale.is_finite() || scale <= 0.0 => {
            return Err(Error::BadQuantScale { scale });
        }
        Scaling::PerGroup if hidden % QUANT_GROUP != 0 => {
            return Err(Error::QuantGroupUnsupported { hidden, group: QUANT_GROUP });
        }
        _ => {}
    }
    if q.codes.len != elems {
        return Err(Error::ShapeMismatch { what: "codes", expected: elems, got: q.codes.len });
    }
    let want_scales = rows * q.quant.scaling.scales_per_row(hidden);
    let scales = q.scales.as_ref().map_or((0, 0), |t| (t.ptr.0, t.len));
    if scales.1 != want_scales {
        return Err(Error::ShapeMismatch { what: "scales", expected: want_scales, got: scales.1 });
    }
    if q.codes.ptr.0 % PACK_BYTES as u64 != 0 && elems > 0 {
        return Err(Error::Misaligned { what: "codes", ptr: q.codes.ptr.0, align: PACK_BYTES });
    }
    if scales.0 % 4 != 0 && want_scales > 0 {
        return Err(Error::Misaligned { what: "scales", ptr: scales.0, align: 4 });
    }
    let mut spans = others.to_vec();
    spans.push(("codes", q.codes.ptr.0, elems as u64));
    spans.push(("scales", scales.0, want_scales as u64 * 4));
    let overlap = |a: (u64, u64), b: (u64, u64)| {
        a.1 > 0
            && b.1 > 0
            && u128::from(a.0) < u128::from(b.0) + u128::from(b.1)
            && u128::from(b.0) < u128::from(a.0) + u128::from(a.1)
    };
    for (i, &(a, pa, la)) in spans.iter().enumerate().skip(others.len()) {
        for &(b, pb, lb) in &spans[..i] {
            if overlap((pa, la), (pb, lb)) {
                return Err(Error::Aliasing { a: b, b: a, identical: pa == pb && la == lb });
            }
        }
    }
    Ok(scales.0)
}

//! The `cuda` backend: NVIDIA GPUs through the CUDA driver API and NVRTC, by `cudarc`. With the
//! default features cudarc loads both at run time (`cuda-dynamic-loading`), so the crate builds on
//! machines without CUDA; an engine with its own cudarc picks the linking and CUDA version through
//! the pass-through features (`cuda-dynamic-linking`, `cuda-12080`, ...; see the crate's Cargo.toml).
//!
//! | concept | here |
//! |---|---|
//! | a rank's device (primary context, attributes, kernels) | [`CudaDevice`] |
//! | ordered queue of work, stream capture | [`CudaStream`] (arfuse's own, the engine's cudarc stream, or a borrowed `CUstream`), [`CudaGraphExec`] |
//! | the engine's cudarc tensors (`CudaSlice`, `CudaView`, `CudaViewMut`) | `DeviceSlice`/`DeviceSliceMut` impls (the `tensors` module), ordered with cudarc's event tracking |
//! | timing point | [`CudaEvent`] |
//! | memory peers map (`cuMemAlloc_v2`, never pool memory) | [`CudaShared`] |
//! | what peers receive | [`CudaIpcHandle`] (`Pod`) |
//! | a peer's buffer here: raw pointer (same process) or `cuIpcOpenMemHandle` | [`CudaPeerMapping`] |
//! | a typed local allocation (the shared [`crate::gpu::DeviceBuffer`]) | [`CudaBuffer`] |
//!
//! Layers, as in cudarc: `result` (one checked call each → [`crate::Error::Driver`] naming the call),
//! then the RAII types above, each holding its [`CudaDevice`]; `Drop` never panics, it parks a
//! failure on the device, surfaced by the next [`CudaDevice::check_err`] or stream synchronisation.
//! What both GPU backends need the same way (typed buffers, the IPC handle's origin, shared IPC
//! opens, the disk cache's format, the function table, parked errors) is [`crate::gpu`]'s.
//! cudarc's safe layer is used where it fits (context, stream, event, module); NVRTC is driven through
//! its `sys` level because cudarc's compiler wrapper yields PTX only.
//!
//! Every entry point first checks that `libcuda` loads (cudarc panics when it cannot), and the first
//! compilation that `libnvrtc` loads (cudarc tries `libnvrtc.so`, `libnvrtc.so.13`, ...): a machine
//! without them gets [`crate::Error::BackendUnavailable`].
//!
//! # Safety model
//! Launches and copies are `unsafe`: their callers promise the device addresses. Everything else is
//! safe: handles are owned, bound to their context before each call, and released once.

mod device;
mod memory;
mod module;
mod result;
mod stream;
mod tensors;

/// The cudarc this backend is built with (the same crate as an engine's own `cudarc`, when their
/// versions are compatible), for engines and tests that name its types beside arfuse's.
pub use cudarc;

pub use device::CudaDevice;
pub use memory::{CudaBuffer, CudaIpcHandle, CudaPeerMapping, CudaShared};
pub use module::{compile_offline, OfflineImage};
pub use stream::{CudaEvent, CudaGraphExec, CudaStream};

use crate::gpu::HandleOrigin;
use crate::{Backend, BackendKind, DevicePtr, Error, GpuBackend, KernelId, LaunchParams, Result};
use result::CallExt;
use std::ffi::c_void;
use std::time::Duration;

/// The CUDA backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cuda;

impl Cuda {
    /// Whether the driver library loads and initialises on this machine (no device is opened).
    pub fn check_available() -> Result<()> {
        device::probe_driver()
    }

    /// The NVRTC version, e.g. `(13, 0)`; [`Error::BackendUnavailable`] if `libnvrtc` cannot be loaded.
    pub fn nvrtc_version() -> Result<(i32, i32)> {
        if !result::nvrtc::present() {
            return Err(Error::BackendUnavailable {
                backend: BackendKind::Cuda,
                reason: format!("NVRTC could not be loaded (tried {})", result::library_candidates("nvrtc")),
            });
        }
        result::nvrtc::version()
    }
}

/// NCCL enqueues on the driver's `CUstream` (a `cudaStream_t` is the same handle) and creates
/// communicators on the current context's device.
impl crate::collective::CollectiveBackend for Cuda {
    const VENDOR: crate::collective::Vendor = crate::collective::Vendor::Nccl;

    fn raw_stream(stream: &CudaStream) -> *mut c_void {
        stream.cu_stream().cast()
    }

    fn make_current(device: &CudaDevice) -> Result<()> {
        device.bind()
    }
}

impl Backend for Cuda {
    const KIND: BackendKind = BackendKind::Cuda;
    type Device = CudaDevice;
    type Stream = CudaStream;
    type Event = CudaEvent;
    type SharedBuffer = CudaShared;
    type IpcHandle = CudaIpcHandle;
    type PeerMapping = CudaPeerMapping;

    fn device_count() -> Result<usize> {
        if !result::driver_present() {
            return device::probe_driver().map(|()| 0);
        }
        match result::init() {
            Ok(()) => cudarc::driver::result::device::get_count().call("cuDeviceGetCount").map(|n| n.max(0) as usize),
            // A driver without a GPU (or with all of them hidden) has no devices, rather than no backend.
            Err(err) if err.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
            Err(_) => device::probe_driver().map(|()| 0),
        }
    }

    fn open_device(ordinal: usize, co_resident_ranks: usize) -> Result<CudaDevice> {
        CudaDevice::open(ordinal, co_resident_ranks)
    }

    fn describe(device: &CudaDevice) -> String {
        device.to_string()
    }

    fn prepare(device: &CudaDevice) -> Result<()> {
        device.load_kernels()
    }

    fn create_stream(device: &CudaDevice) -> Result<CudaStream> {
        CudaStream::new(device)
    }

    fn alloc_shared(device: &CudaDevice, bytes: usize) -> Result<CudaShared> {
        CudaShared::new(device, bytes)
    }

    fn shared_len(buffer: &CudaShared) -> usize {
        buffer.len()
    }
    fn shared_ptr(buffer: &CudaShared) -> DevicePtr {
        buffer.ptr()
    }

    fn export_handle(buffer: &CudaShared) -> Result<CudaIpcHandle> {
        buffer.export()
    }

    fn open_handle(device: &CudaDevice, handle: &CudaIpcHandle) -> Result<CudaPeerMapping> {
        CudaPeerMapping::open(device, handle)
    }

    fn peer_ptr(mapping: &CudaPeerMapping) -> DevicePtr {
        mapping.ptr()
    }

    unsafe fn copy(stream: &CudaStream, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { stream.copy(dst, src, bytes) }
    }

    /// Grid and block come from [`crate::source::launch_config`] for the multiprocessors of one rank
    /// ([`CudaDevice::sms_per_rank`]); the [`LaunchParams`] go by value as the kernel's one argument.
    /// A grid of 0 blocks launches nothing.
    unsafe fn launch(device: &CudaDevice, stream: &CudaStream, kernel: KernelId, params: &LaunchParams) -> Result<()> {
        debug_assert_eq!(device.ordinal(), stream.device().ordinal(), "{kernel}: stream of another device");
        let function = device.kernels()?.function(kernel)?;
        let config = crate::source::launch_config(kernel, params, device.sms_per_rank(), device.warp_size());
        if config.grid == 0 {
            return Ok(());
        }
        debug_assert!(config.block > 0, "{kernel}: launch config with empty blocks");
        if config.shared_bytes > function.max_dynamic_shared() {
            return Err(Error::Driver {
                backend: BackendKind::Cuda,
                call: "cuLaunchKernel",
                code: cudarc::driver::sys::CUresult::CUDA_ERROR_INVALID_VALUE as i32,
                message: format!(
                    "{kernel} asks for {} bytes of dynamic shared memory; this device allows {}",
                    config.shared_bytes,
                    function.max_dynamic_shared()
                ),
            });
        }
        device.bind()?;
        let mut argument = *params;
        let mut arguments = [(&mut argument as *mut LaunchParams).cast::<c_void>()];
        if config.programmatic && device.compute_capability().0 >= 9 {
            // SAFETY: as below.
            return unsafe {
                result::launch::programmatic(
                    function.raw(),
                    config.grid,
                    config.block,
                    config.shared_bytes,
                    stream.cu_stream(),
                    &mut arguments,
                )
            };
        }
        let (grid, block) = ((config.grid, 1, 1), (config.block, 1, 1));
        // SAFETY: the function is live (the module outlives `device`), its one parameter is a
        // `LaunchParams` by value (the C++ mirror of the struct, pinned by a layout test), the driver
        // copies `argument` before returning, and the caller guarantees every pointer in it.
        unsafe {
            cudarc::driver::result::launch_kernel(
                function.raw(),
                grid,
                block,
                config.shared_bytes,
                stream.cu_stream(),
                &mut arguments,
            )
        }
        .call("cuLaunchKernel")
    }

    unsafe fn read_back(stream: &CudaStream, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { stream.read_back(src, dst) }
    }

    unsafe fn write(stream: &CudaStream, dst: DevicePtr, src: &[u8]) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { stream.write(dst, src) }
    }

    fn synchronize(stream: &CudaStream) -> Result<()> {
        stream.synchronize()
    }

    fn record_event(stream: &CudaStream) -> Result<CudaEvent> {
        stream.record_event()
    }

    fn elapsed(start: &CudaEvent, end: &CudaEvent) -> Result<Duration> {
        end.elapsed_since(start)
    }
}

impl GpuBackend for Cuda {
    type Graph = CudaGraphExec;

    fn alloc_zeroed(device: &CudaDevice, bytes: usize) -> Result<DevicePtr> {
        memory::alloc_zeroed(device, bytes).map(DevicePtr)
    }

    unsafe fn free(device: &CudaDevice, ptr: DevicePtr) {
        memory::free(device, ptr.0)
    }

    fn begin_capture(stream: &CudaStream) -> Result<()> {
        stream.begin_capture()
    }

    /// `cuStreamEndCapture`, `cuGraphInstantiateWithFlags`, then `cuGraphUpload`.
    fn end_capture(stream: &CudaStream) -> Result<CudaGraphExec> {
        let graph = stream.end_capture()?;
        graph.upload(stream)?;
        Ok(graph)
    }

    unsafe fn replay(graph: &CudaGraphExec, stream: &CudaStream) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { graph.launch(stream) }
    }

    fn is_complete(event: &CudaEvent) -> Result<bool> {
        event.is_complete()
    }

    fn check_err(device: &CudaDevice) -> Result<()> {
        device.check_err()
    }

    fn memory_info(device: &CudaDevice) -> Result<(usize, usize)> {
        device.memory_info()
    }

    fn stream_device(stream: &CudaStream) -> &CudaDevice {
        stream.device()
    }

    fn multiprocessors(device: &CudaDevice) -> u32 {
        device.sm_count()
    }

    fn warp_size(device: &CudaDevice) -> u32 {
        device.warp_size()
    }

    fn handle_origin(handle: &CudaIpcHandle) -> &HandleOrigin {
        &handle.origin
    }

    fn is_ipc(mapping: &CudaPeerMapping) -> bool {
        mapping.is_ipc()
    }

    /// NVRTC loads (the backend compiles its kernels at run time).
    fn kernels_available() -> Result<()> {
        Cuda::nvrtc_version().map(|_| ())
    }
}

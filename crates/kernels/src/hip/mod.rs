//! The `hip` backend: AMD GPUs (MI250 gfx90a, MI300 gfx942, MI350 gfx950) through the HIP runtime,
//! with kernels from offline-built code objects or hipRTC.
//!
//! | concept | here |
//! |---|---|
//! | a rank's device (attributes, architecture, kernels) | [`HipDevice`] |
//! | ordered queue of work, stream capture | [`HipStream`], [`HipGraphExec`] |
//! | timing point | [`HipEvent`] |
//! | memory peers map (uncached, `hipExtMallocWithFlags`) | [`HipShared`] |
//! | what peers receive | [`HipIpcHandle`] (`Pod`, 104 bytes) |
//! | a peer's buffer here: raw pointer (same process) or `hipIpcOpenMemHandle` | [`HipPeerMapping`] |
//! | a typed local allocation (the shared [`crate::gpu::DeviceBuffer`]) | [`HipBuffer`] |
//!
//! Layers, as in cudarc: `sys` (the C interface as declared here, and the hipRTC symbol table),
//! `result` (one checked call each → [`crate::Error::Driver`] naming the call; the only file that
//! calls into HIP or hipRTC), then the RAII types above, each holding its
//! [`HipDevice`]; `Drop` never panics, it parks a failure on the device, surfaced by the next
//! [`HipDevice::check_err`] or stream synchronisation. What both GPU backends need the same way
//! (typed buffers, the IPC handle's origin, shared IPC opens, the disk cache's format, the function
//! table, parked errors) is [`crate::gpu`]'s.
//!
//! # Building
//! `hip-runtime-sys` links `libamdhip64` at build time: its build script needs
//! `$HIP_PATH/include/hip/hip_runtime_api.h` (`HIP_PATH`, `ROCM_PATH`, `hipconfig -p` or
//! `/opt/rocm`), and the linker needs `libamdhip64.so` (the unversioned development link) in
//! `$HIP_PATH/lib` or the default search path. On Debian 12: `apt-get install libamdhip64-dev`,
//! then `HIP_PATH=/usr cargo build --features hip`. The binary then needs, at run time, the
//! runtime it was linked against (`libamdhip64.so.5` from Debian, `.so.6`/`.so.7` from ROCm), so
//! build on (or for) the ROCm host, preferably with the `hip-bindgen` feature.
//!
//! # ABI
//! Only calls whose C signature is the same from HIP 5.2 to ROCm 7 are made, each declared by
//! `sys` with integer status codes (never read as `hip-runtime-sys`'s Rust `enum`, for which an
//! unknown code would be undefined behaviour); `hipGetDeviceProperties` is never called. See
//! `sys.rs` for the details, `device.rs` for how the architecture is found (`ARFUSE_HIP_ARCH`,
//! else the KFD topology in sysfs), `module.rs` for where code objects come from
//! (`ARFUSE_KERNEL_DIR`, the disk cache, hipRTC).
//!
//! # Safety model
//! Launches and copies are `unsafe`: their callers promise the device addresses. Everything else is
//! safe: handles are owned, the device is made current before each call, and each handle is
//! released once.

mod device;
mod memory;
mod module;
mod result;
mod stream;
mod sys;
#[cfg(test)]
mod tests;

pub use device::{ArchSource, HipDevice, ARCH_ENV};
pub use memory::{HipBuffer, HipIpcHandle, HipPeerMapping, HipShared};
pub use module::{offline_image_path, rtc_options, KERNEL_DIR_ENV};
pub use stream::{HipEvent, HipGraphExec, HipStream};

use crate::gpu::HandleOrigin;
use crate::{Backend, BackendKind, DevicePtr, Error, GpuBackend, KernelId, LaunchParams, Result};
use std::ffi::c_void;
use std::time::Duration;

/// The HIP backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hip;

impl Hip {
    /// Whether the HIP runtime initialises on this machine (no device is opened). A machine without
    /// an AMD GPU gets [`Error::BackendUnavailable`].
    pub fn check_available() -> Result<()> {
        device::probe_runtime()
    }

    /// The loaded runtime's version, `(major, minor, patch)`, e.g. `(6, 2, 41134)`. Needs no device.
    pub fn runtime_version() -> Result<(i32, i32, i32)> {
        result::runtime_version().map(result::split_version)
    }

    /// The hipRTC library this process compiles with (found at run time next to the HIP runtime,
    /// or on the loader's path), or [`Error::BackendUnavailable`] listing what was tried.
    pub fn hiprtc_library() -> Result<String> {
        module::rtc_library_path()
    }
}

/// RCCL enqueues on a `hipStream_t` and creates communicators on the current device.
impl crate::collective::CollectiveBackend for Hip {
    const VENDOR: crate::collective::Vendor = crate::collective::Vendor::Rccl;

    fn raw_stream(stream: &HipStream) -> *mut c_void {
        stream.raw().cast()
    }

    fn make_current(device: &HipDevice) -> Result<()> {
        device.bind()
    }
}

impl Backend for Hip {
    const KIND: BackendKind = BackendKind::Hip;
    type Device = HipDevice;
    type Stream = HipStream;
    type Event = HipEvent;
    type SharedBuffer = HipShared;
    type IpcHandle = HipIpcHandle;
    type PeerMapping = HipPeerMapping;

    fn device_count() -> Result<usize> {
        device::count()
    }

    fn open_device(ordinal: usize, co_resident_ranks: usize) -> Result<HipDevice> {
        HipDevice::open(ordinal, co_resident_ranks)
    }

    fn describe(device: &HipDevice) -> String {
        device.to_string()
    }

    fn prepare(device: &HipDevice) -> Result<()> {
        device.load_kernels()
    }

    fn create_stream(device: &HipDevice) -> Result<HipStream> {
        HipStream::new(device)
    }

    fn alloc_shared(device: &HipDevice, bytes: usize) -> Result<HipShared> {
        HipShared::new(device, bytes)
    }

    fn shared_len(buffer: &HipShared) -> usize {
        buffer.len()
    }
    fn shared_ptr(buffer: &HipShared) -> DevicePtr {
        buffer.ptr()
    }

    fn export_handle(buffer: &HipShared) -> Result<HipIpcHandle> {
        buffer.export()
    }

    fn open_handle(device: &HipDevice, handle: &HipIpcHandle) -> Result<HipPeerMapping> {
        HipPeerMapping::open(device, handle)
    }

    fn peer_ptr(mapping: &HipPeerMapping) -> DevicePtr {
        mapping.ptr()
    }

    unsafe fn copy(stream: &HipStream, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { stream.copy(dst, src, bytes) }
    }

    /// Grid and block come from [`crate::source::launch_config`] for the compute units of one rank
    /// ([`HipDevice::cus_per_rank`]) and the device's wavefront size; the [`LaunchParams`] go by
    /// value as the kernel's one argument. A grid of 0 blocks launches nothing.
    unsafe fn launch(device: &HipDevice, stream: &HipStream, kernel: KernelId, params: &LaunchParams) -> Result<()> {
        debug_assert_eq!(device.ordinal(), stream.device().ordinal(), "{kernel}: stream of another device");
        let function = device.kernels()?.function(kernel)?;
        let config = crate::source::launch_config(kernel, params, device.cus_per_rank(), device.warp_size());
        if config.grid == 0 {
            return Ok(());
        }
        debug_assert!(config.block > 0, "{kernel}: launch config with empty blocks");
        if config.shared_bytes > device.max_shared_bytes_per_block() {
            return Err(Error::Driver {
                backend: BackendKind::Hip,
                call: "hipModuleLaunchKernel",
                code: result::code::INVALID_VALUE,
                message: format!(
                    "{kernel} asks for {} bytes of dynamic shared memory; this device allows {} per block",
                    config.shared_bytes,
                    device.max_shared_bytes_per_block()
                ),
            });
        }
        device.bind()?;
        let mut argument = *params;
        let mut arguments = [(&mut argument as *mut LaunchParams).cast::<c_void>()];
        // SAFETY: the function is live (the module outlives `device`), its one parameter is a
        // `LaunchParams` by value (the C++ mirror of the struct, pinned by a layout test), the runtime
        // copies `argument` before returning, and the caller guarantees every pointer in it.
        unsafe {
            result::module::launch_kernel(
                function.raw(),
                config.grid,
                config.block,
                config.shared_bytes,
                stream.raw(),
                &mut arguments,
            )
        }
    }

    unsafe fn read_back(stream: &HipStream, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { stream.read_back(src, dst) }
    }

    unsafe fn write(stream: &HipStream, dst: DevicePtr, src: &[u8]) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { stream.write(dst, src) }
    }

    fn synchronize(stream: &HipStream) -> Result<()> {
        stream.synchronize()
    }

    fn record_event(stream: &HipStream) -> Result<HipEvent> {
        stream.record_event()
    }

    fn elapsed(start: &HipEvent, end: &HipEvent) -> Result<Duration> {
        end.elapsed_since(start)
    }
}

impl GpuBackend for Hip {
    type Graph = HipGraphExec;

    fn alloc_zeroed(device: &HipDevice, bytes: usize) -> Result<DevicePtr> {
        memory::alloc_zeroed(device, bytes).map(DevicePtr)
    }

    unsafe fn free(device: &HipDevice, ptr: DevicePtr) {
        memory::free(device, ptr.0)
    }

    fn begin_capture(stream: &HipStream) -> Result<()> {
        stream.begin_capture()
    }

    /// `hipStreamEndCapture`, then `hipGraphInstantiate` (HIP has no separate upload step).
    fn end_capture(stream: &HipStream) -> Result<HipGraphExec> {
        stream.end_capture()
    }

    unsafe fn replay(graph: &HipGraphExec, stream: &HipStream) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { graph.launch(stream) }
    }

    fn is_complete(event: &HipEvent) -> Result<bool> {
        event.is_complete()
    }

    fn check_err(device: &HipDevice) -> Result<()> {
        device.check_err()
    }

    fn memory_info(device: &HipDevice) -> Result<(usize, usize)> {
        device.memory_info()
    }

    fn stream_device(stream: &HipStream) -> &HipDevice {
        stream.device()
    }

    fn multiprocessors(device: &HipDevice) -> u32 {
        device.cu_count()
    }

    fn warp_size(device: &HipDevice) -> u32 {
        device.warp_size()
    }

    fn handle_origin(handle: &HipIpcHandle) -> &HandleOrigin {
        &handle.origin
    }

    fn is_ipc(mapping: &HipPeerMapping) -> bool {
        mapping.is_ipc()
    }

    /// Code objects in `ARFUSE_KERNEL_DIR`, or hipRTC loads.
    fn kernels_available() -> Result<()> {
        if std::env::var_os(KERNEL_DIR_ENV).is_some_and(|dir| !dir.is_empty()) {
            return Ok(());
        }
        Hip::hiprtc_library().map(|_| ())
    }
}

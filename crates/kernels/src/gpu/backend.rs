//! [`GpuBackend`]: what a GPU runtime has beyond [`Backend`], so that code generic over the GPU
//! backends (the benchmark runner, the conformance suites of `arfuse-kernels` and `arfuse-fusion`)
//! needs no per-backend impls of its own. Its typed buffers are [`DeviceBuffer`]s.

#[cfg(doc)]
use super::DeviceBuffer;
use super::HandleOrigin;
use crate::{Backend, DevicePtr, Result};

/// A GPU backend: [`Backend`] plus plain device allocations (owned and typed as [`DeviceBuffer`]),
/// stream capture into graphs and their replay, and the device queries that generic tests and
/// benchmarks make. Implemented by `cuda::Cuda` and `hip::Hip`.
pub trait GpuBackend: Backend<Stream: Sync> {
    /// An instantiated graph of captured work; graph and executable are destroyed on drop.
    type Graph: Send;

    /// Allocates `bytes` (at least 1) of plain device memory on `device` (`cuMemAlloc_v2`,
    /// `hipMalloc`: exportable, never from a stream-ordered pool), zero-filled. What
    /// [`DeviceBuffer`] is made of.
    fn alloc_zeroed(device: &Self::Device, bytes: usize) -> Result<DevicePtr>;

    /// Frees memory from [`GpuBackend::alloc_zeroed`], parking a failure on `device` (reported by
    /// its next check).
    ///
    /// # Safety
    /// `ptr` must come from `alloc_zeroed` on `device`, not be freed yet, and no queued work may
    /// still use it.
    unsafe fn free(device: &Self::Device, ptr: DevicePtr);

    /// Starts capturing the work enqueued on `stream` into a graph (thread-local capture mode:
    /// ranks that are other threads of the process go on working eagerly). Load the kernels first
    /// ([`Backend::prepare`]): loading is not something to capture.
    fn begin_capture(stream: &Self::Stream) -> Result<()>;

    /// Ends the capture begun by [`GpuBackend::begin_capture`], instantiates the graph and, where
    /// the runtime can, uploads it ahead of its first replay.
    fn end_capture(stream: &Self::Stream) -> Result<Self::Graph>;

    /// Enqueues one replay of `graph` on `stream`. The captured launches replay with the arguments
    /// they were captured with.
    ///
    /// # Safety
    /// Every pointer the captured work uses must be valid, as [`Backend::launch`] requires, until
    /// the stream has executed the replay.
    unsafe fn replay(graph: &Self::Graph, stream: &Self::Stream) -> Result<()>;

    /// Whether the work before `event` has finished (does not wait).
    fn is_complete(event: &Self::Event) -> Result<bool>;

    /// Returns (and clears) the first error a `Drop` parked on `device` since the last check.
    fn check_err(device: &Self::Device) -> Result<()>;

    /// Free and total device memory in bytes, as `device` sees them.
    fn memory_info(device: &Self::Device) -> Result<(usize, usize)>;

    /// The device `stream` belongs to.
    fn stream_device(stream: &Self::Stream) -> &Self::Device;

    /// Multiprocessors (NVIDIA SMs, AMD compute units) on `device`.
    fn multiprocessors(device: &Self::Device) -> u32;

    /// Threads per warp (wavefront) of `device`: read from the device, never assumed.
    fn warp_size(device: &Self::Device) -> u32;

    /// Who exported `handle`, and the allocation it names (the handle's first 32 bytes).
    fn handle_origin(handle: &Self::IpcHandle) -> &HandleOrigin;

    /// Whether `mapping` was opened through the runtime's IPC (the buffer belongs to another
    /// process), rather than taken as a pointer of this process.
    fn is_ipc(mapping: &Self::PeerMapping) -> bool;

    /// Whether this process can get the kernels for launches (a run-time compiler, or offline
    /// images where the backend reads them), or why not. Needs no device.
    fn kernels_available() -> Result<()>;
}

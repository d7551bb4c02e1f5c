//! [`GpuBackend`]: what a GPU runtime has beyond [`Backend`], so that code generic over the GPU
//! backends (the benchmark runner, the conformance suites of `arfuse-kernels` and `arfuse-fusion`)
//! needs no per-backend impls of its own.

use crate::{Backend, DevicePtr, DeviceSlice, DeviceSliceMut, Element, Result};

/// Who exported an IPC handle: the first fields of every GPU backend's [`Backend::IpcHandle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandleOrigin {
    /// The exporting process's id.
    pub pid: u32,
    /// The exporting process's ordinal of the device the memory lives on.
    pub ordinal: u32,
    /// A random number of the exporting process (tells two processes with one pid apart).
    pub process_token: u64,
    /// The device address in the exporting process.
    pub ptr: DevicePtr,
    /// The size of the exported allocation in bytes.
    pub len: u64,
    /// Whether this process exported the handle.
    pub from_this_process: bool,
}

/// A GPU backend: [`Backend`] plus owned typed buffers, stream capture into graphs and their
/// replay, and the device queries that generic tests and benchmarks make. Implemented by
/// `cuda::Cuda` and `hip::Hip`.
pub trait GpuBackend: Backend {
    /// An owned device allocation of `T` (plain device memory, zero-filled when made), freed on drop.
    type Buffer<T: Element>: DeviceSliceMut<Self, Elem = T> + Send + Sync + std::fmt::Debug;
    /// An instantiated graph of captured work; graph and executable are destroyed on drop.
    type Graph: Send;

    /// `len` zero-filled elements on `device`.
    fn zeros<T: Element>(device: &Self::Device, len: usize) -> Result<Self::Buffer<T>>;

    /// A buffer holding a copy of `data`, uploaded through `stream` (finished on return).
    fn from_slice<T: Element>(stream: &Self::Stream, data: &[T]) -> Result<Self::Buffer<T>> {
        let mut buffer = Self::zeros(Self::stream_device(stream), data.len())?;
        Self::upload(&mut buffer, stream, data)?;
        Ok(buffer)
    }

    /// Copies `data` into `buffer` after all work queued on `stream`; done when this returns.
    ///
    /// # Panics
    /// If `data.len()` differs from the buffer's length (a bug in the caller).
    fn upload<T: Element>(buffer: &mut Self::Buffer<T>, stream: &Self::Stream, data: &[T]) -> Result<()> {
        assert_eq!(data.len(), buffer.len(), "GpuBackend::upload: length mismatch");
        // SAFETY: the buffer holds exactly `size_of_val(data)` bytes of this backend's memory, and
        // `write` returns only once the copy has run.
        unsafe { Self::write(stream, buffer.device_ptr(), bytemuck::cast_slice(data)) }
    }

    /// Copies `buffer` to the host after all work queued on `stream`.
    fn download<T: Element>(buffer: &Self::Buffer<T>, stream: &Self::Stream) -> Result<Vec<T>> {
        let mut host = vec![T::zeroed(); buffer.len()];
        // SAFETY: the buffer holds exactly `size_of_val(host)` bytes of this backend's memory.
        unsafe { Self::read_back(stream, buffer.device_ptr(), bytemuck::cast_slice_mut(&mut host))? };
        Ok(host)
    }

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

    /// Who exported `handle`, and the allocation it names.
    fn handle_origin(handle: &Self::IpcHandle) -> HandleOrigin;

    /// Whether `mapping` was opened through the runtime's IPC (the buffer belongs to another
    /// process), rather than taken as a pointer of this process.
    fn is_ipc(mapping: &Self::PeerMapping) -> bool;

    /// Whether this process can get the kernels for launches (a run-time compiler, or offline
    /// images where the backend reads them), or why not. Needs no device.
    fn kernels_available() -> Result<()>;
}

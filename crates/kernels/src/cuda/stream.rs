//! Ordered work on a device: [`CudaStream`] (with stream capture), [`CudaEvent`], [`CudaGraphExec`].

use super::device::CudaDevice;
use super::result::CallExt;
use crate::{DevicePtr, Error, Result, StreamOwnership};
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use std::sync::Arc;
use std::time::Duration;

/// `CU_STREAM_PER_THREAD` of `cuda.h` (`((CUstream)0x2)`), which cudarc's bindings do not define.
const CU_STREAM_PER_THREAD: usize = 0x2;

/// A stream on one device, through cudarc's `CudaStream`. Who destroys the handle is explicit
/// ([`CudaStream::ownership`]):
///
/// - [`CudaStream::new`] (what `Backend::create_stream` gives): a non-blocking stream arfuse
///   created (it does not synchronise with the legacy default stream), destroyed on drop
///   ([`StreamOwnership::Owned`]);
/// - [`CudaStream::from_cudarc`]: the engine's own cudarc stream, shared (`Arc`): cudarc destroys
///   it when its last clone goes, if cudarc created it ([`StreamOwnership::Shared`]);
/// - [`CudaStream::from_raw`]: a `CUstream` the caller owns (PyTorch's, an engine's own binding),
///   never destroyed by arfuse ([`StreamOwnership::Borrowed`]).
///
/// `Send` and `Sync` (cudarc's `CudaStream` is both): a `CUstream` is a process-wide driver object
/// that any thread may enqueue on, and the driver serialises calls on one stream. The per-thread
/// default stream, whose meaning depends on the calling thread, is refused by `from_raw`.
#[derive(Debug)]
pub struct CudaStream {
    inner: Arc<cudarc::driver::CudaStream>,
    device: CudaDevice,
    ownership: StreamOwnership,
}

impl CudaStream {
    /// Creates a stream on `device`.
    pub fn new(device: &CudaDevice) -> Result<CudaStream> {
        device.bind()?;
        let inner = device.0.ctx.new_stream().call("cuStreamCreate")?;
        Ok(CudaStream { inner, device: device.clone(), ownership: StreamOwnership::Owned })
    }

    /// The engine's own cudarc stream, shared: arfuse's calls on the returned stream are ordered
    /// with the engine's work on `stream`, with no event between them, and a graph the engine
    /// captures on `stream` records them. The stream must belong to `device`'s context (the device's
    /// primary context, which `cudarc::driver::CudaContext::new(ordinal)` also retains), else
    /// [`Error::BadStream`].
    ///
    /// cudarc's slices used on it keep their own use tracking: see the `DeviceSlice` impls of
    /// this module for `CudaSlice`, `CudaView` and `CudaViewMut`.
    pub fn from_cudarc(device: &CudaDevice, stream: Arc<cudarc::driver::CudaStream>) -> Result<CudaStream> {
        let theirs = stream.context().cu_ctx();
        let ours = device.0.ctx.cu_ctx();
        if theirs != ours {
            return Err(Error::BadStream {
                backend: crate::BackendKind::Cuda,
                reason: format!(
                    "the cudarc stream belongs to context {theirs:?} (device {}), not to cuda:{}'s primary context {ours:?}",
                    stream.context().ordinal(),
                    device.ordinal()
                ),
            });
        }
        Ok(CudaStream { inner: stream, device: device.clone(), ownership: StreamOwnership::Shared })
    }

    /// Wraps a `CUstream` (a `cudaStream_t` is the same handle) that the caller owns, such as an
    /// engine's or PyTorch's current stream. arfuse never destroys it: dropping the returned value
    /// leaves the stream as it was. The null handle (the legacy default stream) is accepted;
    /// `CU_STREAM_PER_THREAD` is refused ([`Error::BadStream`]: it names a different stream on
    /// every thread, so a value that can move between threads cannot hold it), as is a stream of
    /// another context than `device`'s.
    ///
    /// # Safety
    /// `raw` must be a live stream (or the null/legacy handle) and stay alive, undestroyed, while
    /// the returned value, anything made from it (a graph captured on it), and the work enqueued
    /// through it live. Ordering arfuse's work on it with work the owner enqueues elsewhere is the
    /// owner's business, as with any stream it hands out.
    pub unsafe fn from_raw(device: &CudaDevice, raw: sys::CUstream) -> Result<CudaStream> {
        let refuse = |reason: String| Error::BadStream { backend: crate::BackendKind::Cuda, reason };
        if raw as usize == CU_STREAM_PER_THREAD {
            return Err(refuse(
                "CU_STREAM_PER_THREAD names another stream on every thread; pass the thread's real stream".into(),
            ));
        }
        device.bind()?;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `raw` is a live stream (or the legacy handle, which names the current context's,
        // bound above), as the caller guarantees; `ctx` is a valid out-pointer.
        unsafe { sys::cuStreamGetCtx(raw, &mut ctx) }.result().call("cuStreamGetCtx")?;
        let ours = device.0.ctx.cu_ctx();
        if ctx != ours {
            return Err(refuse(format!(
                "the stream belongs to context {ctx:?}, not to cuda:{}'s primary context {ours:?}",
                device.ordinal()
            )));
        }
        // SAFETY: `raw` belongs to this context (checked above) and outlives the wrapper, as the
        // caller guarantees; cudarc's borrowed wrapper never destroys it.
        let inner = unsafe { device.0.ctx.wrap_borrowed_stream(raw) };
        Ok(CudaStream { inner, device: device.clone(), ownership: StreamOwnership::Borrowed })
    }

    /// Who destroys the handle.
    pub fn ownership(&self) -> StreamOwnership {
        self.ownership
    }

    /// The cudarc stream underneath (for cudarc calls the engine makes on it, e.g. copies or a
    /// capture of its own).
    pub fn cudarc(&self) -> &Arc<cudarc::driver::CudaStream> {
        &self.inner
    }

    /// The device the stream belongs to.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }

    /// The raw handle (valid while `self` lives).
    pub fn cu_stream(&self) -> sys::CUstream {
        self.inner.cu_stream()
    }

    /// Whether a capture is under way on this stream (`cuStreamIsCapturing`).
    pub fn is_capturing(&self) -> Result<bool> {
        self.device.bind()?;
        // SAFETY: the stream is live (owned, shared or borrowed, as `self`'s constructor requires).
        let status = unsafe { cu::stream::is_capturing(self.cu_stream()) }.call("cuStreamIsCapturing")?;
        Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// Waits for all work queued so far, then reports any error parked on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        self.sync()?;
        self.device.check_err()
    }

    /// `cuStreamSynchronize` (without the parked-error check of [`CudaStream::synchronize`]).
    fn sync(&self) -> Result<()> {
        // SAFETY: the stream is live (owned, shared or borrowed: `self`'s constructors require it).
        unsafe { cu::stream::synchronize(self.cu_stream()) }.call("cuStreamSynchronize")
    }

    /// Records an event (with timing) at the current end of the stream.
    pub fn record_event(&self) -> Result<CudaEvent> {
        self.device.bind()?;
        let event = self.device.0.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).call("cuEventCreate")?;
        event.record(&self.inner).call("cuEventRecord")?;
        Ok(CudaEvent { inner: event, device: self.device.clone() })
    }

    /// Enqueues a device-to-device copy (`cuMemcpyDtoDAsync_v2`; peer memory included).
    ///
    /// # Safety
    /// Both ranges must be valid for `bytes` bytes until the stream has executed the copy.
    pub unsafe fn copy(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.device.bind()?;
        // SAFETY: guaranteed by the caller.
        unsafe { cu::memcpy_dtod_async(dst.0, src.0, bytes, self.cu_stream()) }.call("cuMemcpyDtoDAsync_v2")
    }

    /// Copies `dst.len()` bytes at `src` to the host after all queued work, and waits for it
    /// (`cuMemcpyDtoHAsync_v2`, then a stream synchronisation).
    ///
    /// # Safety
    /// `src` must be valid device memory for `dst.len()` bytes.
    pub unsafe fn read_back(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.device.bind()?;
        // SAFETY: guaranteed by the caller for `src`; `dst` is not touched until the synchronisation
        // below has returned.
        unsafe { cu::memcpy_dtoh_async(dst, src.0, self.cu_stream()) }.call("cuMemcpyDtoHAsync_v2")?;
        self.sync()
    }

    /// Copies `src` to `dst` after all queued work, and waits for it (`cuMemcpyHtoDAsync_v2`, then a
    /// stream synchronisation: the caller may reuse `src` at once, pinned memory or not).
    ///
    /// # Safety
    /// `dst` must be valid device memory for `src.len()` bytes.
    pub unsafe fn write(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.device.bind()?;
        // SAFETY: guaranteed by the caller for `dst`; `src` outlives the synchronisation below.
        unsafe { cu::memcpy_htod_async(dst.0, src, self.cu_stream()) }.call("cuMemcpyHtoDAsync_v2")?;
        self.sync()
    }

    /// Starts capturing this stream's work into a graph instead of running it.
    ///
    /// Thread-local capture mode: the calls CUDA forbids during a capture (synchronous copies and
    /// memsets, allocations, synchronisations, ...) are refused only on *this* thread, where they
    /// would break the capture; other threads go on working. Global mode would refuse them on every
    /// thread, so one rank capturing would break the eager work of ranks that are threads of the
    /// same process; relaxed mode would not refuse them even on this thread.
    ///
    /// Launch each kernel once before capturing (or call [`CudaDevice::load_kernels`]): compiling
    /// and loading is not something to capture.
    pub fn begin_capture(&self) -> Result<()> {
        self.device.bind()?;
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: the stream is live (owned, shared or borrowed: `self`'s constructors require it).
        unsafe { cu::stream::begin_capture(self.cu_stream(), mode) }.call("cuStreamBeginCapture")
    }

    /// Ends the capture begun by [`CudaStream::begin_capture`] and instantiates the graph.
    pub fn end_capture(&self) -> Result<CudaGraphExec> {
        self.device.bind()?;
        // SAFETY: the stream is live (owned, shared or borrowed: `self`'s constructors require it).
        let graph = unsafe { cu::stream::end_capture(self.cu_stream()) }.call("cuStreamEndCapture")?;
        if graph.is_null() {
            return Err(Error::Driver {
                backend: crate::BackendKind::Cuda,
                call: "cuStreamEndCapture",
                code: sys::CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED as i32,
                message: "the capture produced no graph".into(),
            });
        }
        let flags = sys::CUgraphInstantiate_flags(0);
        // SAFETY: `graph` was just returned by the driver and is live.
        match unsafe { cu::graph::instantiate(graph, flags) }.call("cuGraphInstantiateWithFlags") {
            Ok(exec) => Ok(CudaGraphExec { graph, exec, device: self.device.clone() }),
            Err(err) => {
                // SAFETY: the graph is ours, not instantiated, and destroyed once.
                self.device.record_err(unsafe { cu::graph::destroy(graph) }.call("cuGraphDestroy"));
                Err(err)
            }
        }
    }
}

/// A recorded point in a stream, for timing and completion queries. Destroyed on drop.
#[derive(Debug)]
pub struct CudaEvent {
    inner: cudarc::driver::CudaEvent,
    device: CudaDevice,
}

impl CudaEvent {
    /// Whether the work before the event has finished (`cuEventQuery`, does not wait).
    pub fn is_complete(&self) -> Result<bool> {
        self.device.bind()?;
        self.inner.try_is_complete().call("cuEventQuery")
    }

    /// Waits for the work before the event.
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        self.inner.synchronize().call("cuEventSynchronize")
    }

    /// Time from `start` to `self` (waits for both; `cuEventElapsedTime`, about 0.5 µs resolution).
    pub fn elapsed_since(&self, start: &CudaEvent) -> Result<Duration> {
        self.device.bind()?;
        let ms = start.inner.elapsed_ms(&self.inner).call("cuEventElapsedTime")?;
        Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
    }
}

/// An instantiated CUDA graph, from [`CudaStream::end_capture`]. Graph and executable are
/// destroyed on drop.
#[derive(Debug)]
pub struct CudaGraphExec {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    device: CudaDevice,
}

// SAFETY: graph handles are not bound to the thread that made them; CUDA requires only that calls on
// one graph object be serialised, which holds because `CudaGraphExec` is not `Sync` (a shared
// reference cannot be used from two threads) and every method takes `&self` or `&mut self`.
unsafe impl Send for CudaGraphExec {}

impl CudaGraphExec {
    /// Enqueues one replay of the graph on `stream` (`cuGraphLaunch`).
    ///
    /// The captured launches replay with the arguments they were captured with, a barrier value in
    /// their [`crate::LaunchParams`] included: the same value on every replay.
    ///
    /// # Safety
    /// Every pointer the captured launches use must be valid, as [`crate::Backend::launch`] requires,
    /// until the stream has executed the replay.
    pub unsafe fn launch(&self, stream: &CudaStream) -> Result<()> {
        self.device.bind()?;
        // SAFETY: `exec` is live (owned), `stream` is live (borrowed); the memory the captured
        // kernels use is valid as the caller guarantees.
        unsafe { cu::graph::launch(self.exec, stream.cu_stream()) }.call("cuGraphLaunch")
    }

    /// Uploads the graph's resources ahead of its first launch (`cuGraphUpload`).
    pub fn upload(&self, stream: &CudaStream) -> Result<()> {
        self.device.bind()?;
        // SAFETY: both handles are live.
        unsafe { cu::graph::upload(self.exec, stream.cu_stream()) }.call("cuGraphUpload")
    }
}

impl Drop for CudaGraphExec {
    fn drop(&mut self) {
        let res = self.device.bind().and_then(|()| {
            // SAFETY: both handles are owned, live and destroyed once, the executable first.
            unsafe {
                cu::graph::exec_destroy(self.exec)
                    .call("cuGraphExecDestroy")
                    .and_then(|()| cu::graph::destroy(self.graph).call("cuGraphDestroy"))
            }
        });
        self.device.record_err(res);
    }
}

//! Ordered work on a device: [`HipStream`] (with stream capture), [`HipEvent`], [`HipGraphExec`].

use super::device::HipDevice;
use super::result::{self, event, graph, mem};
use super::sys;
use crate::{DevicePtr, Error, Result, StreamOwnership};
use std::time::Duration;

/// `hipStreamPerThread` of `hip_runtime_api.h` (`((hipStream_t)2)`).
const HIP_STREAM_PER_THREAD: usize = 0x2;

/// A stream on one device. Who destroys the handle is explicit ([`HipStream::ownership`]):
/// [`HipStream::new`] (what `Backend::create_stream` gives) creates a non-blocking stream
/// (`hipStreamNonBlocking`: it does not synchronise with the null stream), destroyed on drop
/// ([`StreamOwnership::Owned`]); [`HipStream::from_raw`] wraps a `hipStream_t` the caller owns
/// (an engine's or PyTorch's), never destroyed by arfuse ([`StreamOwnership::Borrowed`]).
#[derive(Debug)]
pub struct HipStream {
    raw: sys::hipStream_t,
    device: HipDevice,
    ownership: StreamOwnership,
}

// SAFETY: a `hipStream_t` is a process-wide runtime object, not bound to the thread that created
// it; the runtime serialises the calls made on one stream internally, so it may be used and
// dropped from any thread, and from several at once (the order of their work is theirs to decide).
// This holds for a borrowed handle too; `hipStreamPerThread`, whose meaning depends on the calling
// thread, is refused by `from_raw`.
unsafe impl Send for HipStream {}
// SAFETY: as above; every method takes `&self` and only passes the handle to the runtime.
unsafe impl Sync for HipStream {}

impl HipStream {
    /// Creates a stream on `device`.
    pub fn new(device: &HipDevice) -> Result<HipStream> {
        device.bind()?;
        let raw = result::stream::create_non_blocking()?;
        Ok(HipStream { raw, device: device.clone(), ownership: StreamOwnership::Owned })
    }

    /// Wraps a `hipStream_t` that the caller owns, such as an engine's or PyTorch's current stream;
    /// arfuse's calls on it are ordered with the owner's work there, and a graph the owner captures
    /// on it records them. arfuse never destroys it: dropping the returned value leaves the stream
    /// as it was. The null stream is accepted; `hipStreamPerThread` is refused
    /// ([`Error::BadStream`]: it names a different stream on every thread, so a value that can
    /// move between threads cannot hold it).
    ///
    /// # Safety
    /// `raw` must be a live stream of `device` (or the null stream) and stay alive, undestroyed,
    /// while the returned value, anything made from it (a graph captured on it) and the work
    /// enqueued through it live. (This HIP has no `hipStreamGetDevice` to check the device with.)
    pub unsafe fn from_raw(device: &HipDevice, raw: sys::hipStream_t) -> Result<HipStream> {
        if raw as usize == HIP_STREAM_PER_THREAD {
            return Err(Error::BadStream {
                backend: crate::BackendKind::Hip,
                reason: "hipStreamPerThread names another stream on every thread; pass the thread's real stream".into(),
            });
        }
        Ok(HipStream { raw, device: device.clone(), ownership: StreamOwnership::Borrowed })
    }

    /// Who destroys the handle.
    pub fn ownership(&self) -> StreamOwnership {
        self.ownership
    }

    /// The device the stream belongs to.
    pub fn device(&self) -> &HipDevice {
        &self.device
    }

    /// The raw handle (valid while `self` lives).
    pub fn raw(&self) -> sys::hipStream_t {
        self.raw
    }

    /// Waits for all work queued so far, then reports any error parked on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: the stream is live (owned, or borrowed and kept alive as `from_raw` requires).
        unsafe { result::stream::synchronize(self.raw) }?;
        self.device.check_err()
    }

    /// Records an event (with timing) at the current end of the stream.
    pub fn record_event(&self) -> Result<HipEvent> {
        self.device.bind()?;
        let event = HipEvent { raw: event::create()?, device: self.device.clone() };
        // SAFETY: both handles are live.
        unsafe { event::record(event.raw, self.raw) }?;
        Ok(event)
    }

    /// Enqueues a device-to-device copy (`hipMemcpyAsync`; peer memory included).
    ///
    /// # Safety
    /// Both ranges must be valid for `bytes` bytes until the stream has executed the copy.
    pub unsafe fn copy(&self, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.device.bind()?;
        // SAFETY: guaranteed by the caller; the stream is live.
        unsafe { mem::copy_dtod_async(dst.0, src.0, bytes, self.raw) }
    }

    /// Copies `dst.len()` bytes at `src` to the host after all queued work, and waits for it
    /// (`hipMemcpyDtoHAsync`, then a stream synchronisation).
    ///
    /// # Safety
    /// `src` must be valid device memory for `dst.len()` bytes.
    pub unsafe fn read_back(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.device.bind()?;
        // SAFETY: guaranteed by the caller for `src`; `dst` is not touched until the
        // synchronisation below has returned.
        unsafe { mem::copy_dtoh_async(dst, src.0, self.raw)? };
        // SAFETY: the stream is live.
        unsafe { result::stream::synchronize(self.raw) }
    }

    /// Copies `src` to `dst` after all queued work, and waits for it (`hipMemcpyHtoDAsync`, then a
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
        unsafe { mem::copy_htod_async(dst.0, src, self.raw)? };
        // SAFETY: the stream is live.
        unsafe { result::stream::synchronize(self.raw) }
    }

    /// Starts capturing this stream's work into a graph instead of running it.
    ///
    /// Thread-local capture mode: the calls HIP forbids during a capture (synchronous copies,
    /// synchronisations, ...) are refused only on *this* thread, where they would break the capture;
    /// ranks that are other threads of the process go on working eagerly.
    ///
    /// Call [`HipDevice::load_kernels`] (or launch each kernel once) before capturing: compiling and
    /// loading code objects is not something to capture.
    pub fn begin_capture(&self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: the stream is live.
        unsafe { result::stream::begin_capture(self.raw) }
    }

    /// Ends the capture begun by [`HipStream::begin_capture`] and instantiates the graph.
    pub fn end_capture(&self) -> Result<HipGraphExec> {
        self.device.bind()?;
        // SAFETY: the stream is live.
        let graph = unsafe { result::stream::end_capture(self.raw) }?;
        if graph.is_null() {
            return Err(Error::Driver {
                backend: crate::BackendKind::Hip,
                call: "hipStreamEndCapture",
                code: result::code::STREAM_CAPTURE_INVALIDATED,
                message: "the capture produced no graph".into(),
            });
        }
        // SAFETY: `graph` was just returned by the runtime and is live.
        match unsafe { graph::instantiate(graph) } {
            Ok(exec) => Ok(HipGraphExec { graph, exec, device: self.device.clone() }),
            Err(err) => {
                // SAFETY: the graph is ours, not instantiated, and destroyed once.
                self.device.record_err(unsafe { graph::destroy(graph) });
                Err(err)
            }
        }
    }
}

impl Drop for HipStream {
    fn drop(&mut self) {
        if self.ownership != StreamOwnership::Owned {
            // Borrowed: the caller owns the handle and destroys it.
            return;
        }
        let res = self.device.bind().and_then(|()| {
            // SAFETY: the stream is owned, live and destroyed once; the runtime finishes its queued
            // work first.
            unsafe { result::stream::destroy(self.raw) }
        });
        self.device.record_err(res);
    }
}

/// A recorded point in a stream, for timing and completion queries. Destroyed on drop.
#[derive(Debug)]
pub struct HipEvent {
    raw: sys::hipEvent_t,
    device: HipDevice,
}

// SAFETY: a `hipEvent_t` is a process-wide runtime object usable from any thread; the runtime
// synchronises calls on it internally.
unsafe impl Send for HipEvent {}
// SAFETY: as above; every method takes `&self` and only passes the handle to the runtime.
unsafe impl Sync for HipEvent {}

impl HipEvent {
    /// Whether the work before the event has finished (`hipEventQuery`, does not wait).
    pub fn is_complete(&self) -> Result<bool> {
        self.device.bind()?;
        // SAFETY: the event is live (owned).
        unsafe { event::query(self.raw) }
    }

    /// Waits for the work before the event.
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: the event is live (owned).
        unsafe { event::synchronize(self.raw) }
    }

    /// Time from `start` to `self` (waits for both; `hipEventElapsedTime`).
    pub fn elapsed_since(&self, start: &HipEvent) -> Result<Duration> {
        start.synchronize()?;
        self.synchronize()?;
        // SAFETY: both events are live and complete.
        let ms = unsafe { event::elapsed_ms(start.raw, self.raw) }?;
        Ok(Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3))
    }
}

impl Drop for HipEvent {
    fn drop(&mut self) {
        let res = self.device.bind().and_then(|()| {
            // SAFETY: the event is owned, live and destroyed once.
            unsafe { event::destroy(self.raw) }
        });
        self.device.record_err(res);
    }
}

/// An instantiated HIP graph, from [`HipStream::end_capture`]. Graph and executable are destroyed
/// on drop.
#[derive(Debug)]
pub struct HipGraphExec {
    graph: sys::hipGraph_t,
    exec: sys::hipGraphExec_t,
    device: HipDevice,
}

// SAFETY: graph handles are not bound to the thread that made them; HIP requires only that calls on
// one graph object be serialised, which holds because `HipGraphExec` is not `Sync` (a shared
// reference cannot be used from two threads at once).
unsafe impl Send for HipGraphExec {}

impl HipGraphExec {
    /// Enqueues one replay of the graph on `stream` (`hipGraphLaunch`).
    ///
    /// The captured launches replay with the arguments they were captured with, a barrier value in
    /// their [`crate::LaunchParams`] included: the same value on every replay.
    ///
    /// # Safety
    /// Every pointer the captured launches use must be valid, as [`crate::Backend::launch`] requires,
    /// until the stream has executed the replay.
    pub unsafe fn launch(&self, stream: &HipStream) -> Result<()> {
        self.device.bind()?;
        // SAFETY: `exec` is live (owned), `stream` is live (borrowed); the memory the captured
        // kernels use is valid as the caller guarantees.
        unsafe { graph::launch(self.exec, stream.raw()) }
    }
}

impl Drop for HipGraphExec {
    fn drop(&mut self) {
        let res = self.device.bind().and_then(|()| {
            // SAFETY: both handles are owned, live and destroyed once, the executable first.
            unsafe { graph::exec_destroy(self.exec).and_then(|()| graph::destroy(self.graph)) }
        });
        self.device.record_err(res);
    }
}

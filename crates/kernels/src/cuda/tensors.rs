//! cudarc's tensors as arfuse tensors: [`DeviceSlice`] for `CudaSlice<T>`, `CudaView<T>` and
//! `CudaViewMut<T>`, [`DeviceSliceMut`] for `CudaSlice<T>` and `CudaViewMut<T>`, so that an engine on
//! cudarc passes its tensors to the operator without `unsafe`.
//!
//! cudarc tracks the uses of a slice itself: while its context manages synchronisation across
//! streams (event tracking on, the default, and more than one stream created through it), every
//! allocation carries a read and a write event, each of cudarc's launches makes its stream wait for
//! the events it must ([`cudarc::driver::DevicePtr::device_ptr`]) and records them after its work,
//! and dropping the slice waits for both before freeing. The [`StreamOrder`] impls here do what a
//! cudarc launch on the call's stream does, through the same public calls, so cudarc's bookkeeping
//! stays true: before the call, its stream waits for the slice's pending writes (and reads, for a
//! written tensor); after it is enqueued, the slice's read (write) event is recorded at its end.
//!
//! cudarc decides whether to wait and record by the context object of the stream it is handed, so
//! the call's stream is handed to it as a (borrowed) stream of the slice's own context object: an
//! arfuse stream's context object does not track, the engine's does. A slice of another CUDA
//! context than the call's stream (the device's primary context) is refused with
//! [`Error::BadStream`]: its memory is not the kernels'.
//!
//! While the call's stream is capturing a graph, nothing runs, so there is no use to track: the
//! impls then neither wait nor record (a wait on an event recorded outside the capture is not
//! allowed in one, and an event recorded inside it becomes a captured event, which cudarc's drop
//! of the slice could no longer wait on once the graph is gone: cudarc issue #590). The replays
//! are ordered by the stream they are launched on, as for any graph the engine launches.
//!
//! When the context does not manage synchronisation (one stream only, or event tracking turned
//! off, as candle does), cudarc's launches order nothing, and neither do these impls, except in the
//! one case cudarc cannot see: the call runs on a stream other than the slice's own (an arfuse
//! stream from `Backend::create_stream`, which cudarc's context does not count). Then the call's
//! stream is joined to the slice's stream before the call and the slice's stream to the call's
//! after it (an event each way), so that the slice's own stream (where cudarc frees it) stays
//! ordered after the call. Such a join cannot be captured (it would pull the slice's stream into
//! the capture): during a capture it is refused with [`Error::BadStream`]. Capture on the tensors'
//! own stream ([`CudaStream::from_cudarc`]), where nothing needs joining.
//!
//! The address itself ([`DeviceSlice::device_ptr`]) is read through cudarc's `device_ptr` too (the
//! only public way), with its guard disarmed. Where the context tracks uses, that call also makes
//! the stream it is given wait for the slice's last write; it is given the calling thread's
//! per-thread default stream, which carries none of the call's work (nor, unless the engine
//! captures on that stream itself, a capture), so the wait changes nothing that matters.

use super::{Cuda, CudaStream};
use crate::{DevicePtr, DeviceSlice, DeviceSliceMut, Element, Error, Result, StreamOrder, StreamOrderMut};
use cudarc::driver::{self as cudarc_driver, SyncOnDrop};
use std::sync::Arc;

/// Disarms a guard of cudarc's `device_ptr`/`device_ptr_mut` without recording its event: the
/// address is only being read (the event is recorded after the call, in `after_*`).
fn disarm(mut guard: SyncOnDrop<'_>) {
    match &mut guard {
        SyncOnDrop::Record(target) => *target = None,
        SyncOnDrop::Sync(target) => *target = None,
    }
}

/// Whether the slice's context tracks its uses with events (cudarc's own condition).
fn tracked(slice_stream: &cudarc_driver::CudaStream) -> bool {
    slice_stream.context().is_managing_stream_synchronization()
}

/// Whether a capture is under way on `stream` (nothing it is given runs now).
fn capturing(stream: &cudarc_driver::CudaStream) -> std::result::Result<bool, cudarc_driver::DriverError> {
    let status = stream.capture_status()?;
    Ok(status != cudarc_driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// Whether two cudarc streams are one (same handle in the same context).
fn same_stream(a: &cudarc_driver::CudaStream, b: &cudarc_driver::CudaStream) -> bool {
    a.cu_stream() == b.cu_stream() && a.context().cu_ctx() == b.context().cu_ctx()
}

/// The call's stream as a cudarc stream of the slice's own context object: cudarc decides whether
/// to wait and record by the context of the stream it is given, which must be the one that tracks
/// the slice (an arfuse stream's context object does not track). `None` when the slice belongs to
/// another CUDA context than the call's stream (its memory is not this device context's).
fn in_slice_context(
    slice_stream: &cudarc_driver::CudaStream,
    call: &CudaStream,
) -> Option<Arc<cudarc_driver::CudaStream>> {
    let ctx = slice_stream.context();
    if Arc::ptr_eq(ctx, call.cudarc().context()) {
        return Some(Arc::clone(call.cudarc()));
    }
    if ctx.cu_ctx() != call.cudarc().context().cu_ctx() {
        return None;
    }
    // SAFETY: the handle is `call`'s live stream, of this same CUDA context (checked above); the
    // borrowed wrapper never destroys it, and it lives only for the hook that made it, while `call`
    // is borrowed.
    Some(unsafe { ctx.wrap_borrowed_stream(call.cu_stream()) })
}

/// A tensor of another CUDA context than the call's stream.
fn foreign_context() -> Error {
    Error::BadStream {
        backend: crate::BackendKind::Cuda,
        reason: "a cudarc tensor of another CUDA context than the call's stream (the device's primary context)".into(),
    }
}

/// The tracked case before the call: the call's stream in the slice's context, or `None` while it
/// captures (nothing to order then).
fn track_before(
    slice_stream: &cudarc_driver::CudaStream,
    call: &CudaStream,
) -> Result<Option<Arc<cudarc_driver::CudaStream>>> {
    use super::result::CallExt;
    let stream = in_slice_context(slice_stream, call).ok_or_else(foreign_context)?;
    let capturing = capturing(call.cudarc()).call("cuStreamIsCapturing")?;
    Ok((!capturing).then_some(stream))
}

/// The tracked case after the call: as [`track_before`]; a failure to tell whether the stream
/// captures is parked on the slice's context, and nothing is recorded.
fn track_after(slice_stream: &cudarc_driver::CudaStream, call: &CudaStream) -> Option<Arc<cudarc_driver::CudaStream>> {
    let stream = in_slice_context(slice_stream, call)?;
    match capturing(call.cudarc()) {
        Ok(capturing) => (!capturing).then_some(stream),
        Err(err) => {
            slice_stream.context().record_err::<()>(Err(err));
            None
        }
    }
}

/// The untracked case on another stream than the slice's: `call` waits for the slice's stream.
fn join_before(slice_stream: &Arc<cudarc_driver::CudaStream>, call: &CudaStream) -> Result<()> {
    if same_stream(slice_stream, call.cudarc()) {
        return Ok(());
    }
    if slice_stream.context().cu_ctx() != call.cudarc().context().cu_ctx() {
        return Err(foreign_context());
    }
    if call.is_capturing()? {
        return Err(Error::BadStream {
            backend: crate::BackendKind::Cuda,
            reason: "a cudarc tensor of another stream cannot be ordered with a capture on this one (its \
                     context does not track uses with events); capture on the tensor's own stream \
                     (CudaStream::from_cudarc)"
                .into(),
        });
    }
    use super::result::CallExt;
    call.cudarc().join(slice_stream).call("cuStreamWaitEvent")
}

/// The untracked case on another stream than the slice's: the slice's stream waits for `call`
/// (where cudarc will free it), the failure parked on the slice's context.
fn join_after(slice_stream: &Arc<cudarc_driver::CudaStream>, call: &CudaStream) {
    if !same_stream(slice_stream, call.cudarc()) {
        slice_stream.context().record_err(slice_stream.join(call.cudarc()));
    }
}

/// One impl of the read side for a type with cudarc's `DevicePtr` and `stream()`.
macro_rules! read_side {
    ($ty:ty) => {
        impl<T: Element> StreamOrder<Cuda> for $ty {
            fn before_read(&self, stream: &CudaStream) -> Result<()> {
                let own = cudarc_driver::DeviceSlice::stream(self);
                if tracked(own) {
                    if let Some(call) = track_before(own, stream)? {
                        // Waits for the slice's last write on the call's stream; the read event is
                        // recorded after the call (`after_read`), not now.
                        let (_, guard) = cudarc_driver::DevicePtr::device_ptr(self, &call);
                        disarm(guard);
                    }
                    Ok(())
                } else {
                    join_before(own, stream)
                }
            }

            fn after_read(&self, stream: &CudaStream) {
                let own = cudarc_driver::DeviceSlice::stream(self);
                if tracked(own) {
                    if let Some(call) = track_after(own, stream) {
                        // The guard records the read event at the call stream's current end (its
                        // wait for the last write is already satisfied there).
                        let (_, guard) = cudarc_driver::DevicePtr::device_ptr(self, &call);
                        drop(guard);
                    }
                } else {
                    join_after(own, stream)
                }
            }
        }

        // SAFETY: cudarc's slice (or view of one) holds `len()` elements of `T` at this address in
        // device memory of its context, which `CudaStream::from_cudarc`/`from_raw` require to be
        // the device's; it stays allocated while borrowed, and the work using it is ordered with
        // its other users and its free by `stream_order` (the read and write events cudarc checks
        // before it frees, or a join with its own stream).
        unsafe impl<T: Element> DeviceSlice<Cuda> for $ty {
            type Elem = T;

            /// The address, read without ordering anything (see the module documentation): the
            /// guard of cudarc's `device_ptr` is disarmed, and where the context tracks uses the
            /// wait that call makes is put on the calling thread's per-thread default stream.
            fn device_ptr(&self) -> DevicePtr {
                let own = cudarc_driver::DeviceSlice::stream(self);
                let ptr = if tracked(own) {
                    let waiter = own.context().per_thread_stream();
                    let (ptr, guard) = cudarc_driver::DevicePtr::device_ptr(self, &waiter);
                    disarm(guard);
                    ptr
                } else {
                    let (ptr, guard) = cudarc_driver::DevicePtr::device_ptr(self, own);
                    disarm(guard);
                    ptr
                };
                DevicePtr(ptr)
            }

            fn len(&self) -> usize {
                cudarc_driver::DeviceSlice::len(self)
            }

            fn stream_order(&self) -> Option<&dyn StreamOrder<Cuda>> {
                Some(self)
            }
        }
    };
}

/// One impl of the write side for a type with cudarc's `DevicePtrMut`.
macro_rules! write_side {
    ($ty:ty) => {
        impl<T: Element> StreamOrderMut<Cuda> for $ty {
            fn before_write(&mut self, stream: &CudaStream) -> Result<()> {
                let own = Arc::clone(cudarc_driver::DeviceSlice::stream(self));
                if tracked(&own) {
                    if let Some(call) = track_before(&own, stream)? {
                        // Waits for the slice's last read and write on the call's stream.
                        let (_, guard) = cudarc_driver::DevicePtrMut::device_ptr_mut(self, &call);
                        disarm(guard);
                    }
                    Ok(())
                } else {
                    join_before(&own, stream)
                }
            }

            fn after_write(&mut self, stream: &CudaStream) {
                let own = Arc::clone(cudarc_driver::DeviceSlice::stream(self));
                if tracked(&own) {
                    if let Some(call) = track_after(&own, stream) {
                        // Records the write event at the call stream's current end.
                        let (_, guard) = cudarc_driver::DevicePtrMut::device_ptr_mut(self, &call);
                        drop(guard);
                    }
                } else {
                    join_after(&own, stream)
                }
            }
        }

        // SAFETY: as the `DeviceSlice` impl; a `&mut` of cudarc's slice or mutable view is the only
        // live view of its elements (cudarc's borrows), and `stream_order_mut` orders the call's
        // writes after every pending use.
        unsafe impl<T: Element> DeviceSliceMut<Cuda> for $ty {
            fn stream_order_mut(&mut self) -> Option<&mut dyn StreamOrderMut<Cuda>> {
                Some(self)
            }
        }
    };
}

read_side!(cudarc_driver::CudaSlice<T>);
read_side!(cudarc_driver::CudaView<'_, T>);
read_side!(cudarc_driver::CudaViewMut<'_, T>);
write_side!(cudarc_driver::CudaSlice<T>);
write_side!(cudarc_driver::CudaViewMut<'_, T>);

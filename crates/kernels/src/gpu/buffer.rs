//! [`DeviceBuffer`]: an owned, typed allocation of plain device memory on any GPU backend
//! (`CudaBuffer<T>` and `HipBuffer<T>` are this type), zero-filled when made, freed on drop.

use super::GpuBackend;
use crate::{DevicePtr, DeviceSlice, DeviceSliceMut, Element, Result};
use std::fmt;
use std::marker::PhantomData;

/// `len` elements of `T` in `B`'s device memory (`cuMemAlloc_v2`, `hipMalloc`: never pool memory,
/// so it can be exported), zero-filled when allocated; freed on drop (a failure is parked on the
/// device). Kernels take it as a [`DeviceSlice`] when `T` is an [`Element`].
pub struct DeviceBuffer<B: GpuBackend, T: bytemuck::Pod> {
    ptr: DevicePtr,
    len: usize,
    device: B::Device,
    _elem: PhantomData<T>,
}

impl<B: GpuBackend, T: bytemuck::Pod> DeviceBuffer<B, T> {
    /// Allocates `len` zero-filled elements on `device`.
    pub fn zeros(device: &B::Device, len: usize) -> Result<Self> {
        // An impossible size saturates and fails in the runtime as out of memory.
        let ptr = B::alloc_zeroed(device, len.saturating_mul(std::mem::size_of::<T>()))?;
        Ok(DeviceBuffer { ptr, len, device: device.clone(), _elem: PhantomData })
    }

    /// Allocates a buffer holding a copy of `data` (uploaded through `stream`, finished on return).
    pub fn from_slice(stream: &B::Stream, data: &[T]) -> Result<Self> {
        let mut buffer = Self::zeros(B::stream_device(stream), data.len())?;
        buffer.upload(stream, data)?;
        Ok(buffer)
    }

    /// Copies `data` into the buffer, after all work queued on `stream`; done when this returns.
    ///
    /// # Panics
    /// If `data.len()` differs from the buffer's length (a bug in the caller).
    pub fn upload(&mut self, stream: &B::Stream, data: &[T]) -> Result<()> {
        assert_eq!(data.len(), self.len, "DeviceBuffer::upload: length mismatch");
        // SAFETY: the buffer holds exactly `size_of_val(data)` bytes of `B`'s memory, and `write`
        // returns only once the copy has run.
        unsafe { B::write(stream, self.ptr, bytemuck::cast_slice(data)) }
    }

    /// Copies the buffer to the host, after all work queued on `stream`.
    pub fn download(&self, stream: &B::Stream) -> Result<Vec<T>> {
        let mut host = vec![T::zeroed(); self.len];
        // SAFETY: the buffer holds exactly `size_of_val(host)` bytes of `B`'s memory.
        unsafe { B::read_back(stream, self.ptr, bytemuck::cast_slice_mut(&mut host))? };
        Ok(host)
    }

    /// The device address of the first element.
    pub fn device_ptr(&self) -> DevicePtr {
        self.ptr
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device it lives on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }
}

impl<B: GpuBackend, T: bytemuck::Pod> Drop for DeviceBuffer<B, T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` on `device` and is freed once, here; the buffer's
        // users keep it alive while queued work uses it (the `Backend` contract).
        unsafe { B::free(&self.device, self.ptr) }
    }
}

impl<B: GpuBackend, T: bytemuck::Pod> fmt::Debug for DeviceBuffer<B, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("backend", &B::KIND)
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("elem", &std::any::type_name::<T>())
            .finish()
    }
}

// SAFETY: the buffer owns `len` initialised (zero-filled, then written) elements of `T` in `B`'s
// device memory until it is dropped.
unsafe impl<B: GpuBackend, T: Element> DeviceSlice<B> for DeviceBuffer<B, T> {
    type Elem = T;
    fn device_ptr(&self) -> DevicePtr {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

// SAFETY: a `&mut DeviceBuffer` is the only handle on its allocation.
unsafe impl<B: GpuBackend, T: Element> DeviceSliceMut<B> for DeviceBuffer<B, T> {}

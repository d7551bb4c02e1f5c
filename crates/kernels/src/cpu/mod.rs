//! The `cpu` backend: host memory, POSIX shared memory as "IPC memory", and the kernels in Rust.
//!
//! Streams are synchronous: a launch or copy has finished when the call returns. It is a real
//! backend (tensor parallelism across CPU processes works), and the reference the GPU backends
//! are compared against.

pub mod kernels;
pub mod shm;
mod signal;
#[cfg(test)]
mod tests;

use crate::{
    Backend, BackendKind, DevicePtr, DeviceSlice, DeviceSliceMut, Element, Error, KernelId, LaunchParams, Result,
};
use shm::{CpuShm, CpuShmMapping, SHM_NAME_MAX};
use std::time::{Duration, Instant};

/// The CPU backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// The host, as a device.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuDevice;

/// A CPU stream: work runs on the calling thread, in order.
#[derive(Debug, Default)]
pub struct CpuStream;

/// A CPU event: the instant it was recorded.
#[derive(Clone, Copy, Debug)]
pub struct CpuEvent(Instant);

/// The handle of a shared-memory segment: its name and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct CpuIpcHandle {
    /// Segment length in bytes.
    pub len: u64,
    /// NUL-padded segment name.
    pub name: [u8; 56],
}

impl CpuIpcHandle {
    fn name(&self) -> Result<&str> {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        let name = std::str::from_utf8(&self.name[..end]).map_err(|e| Error::InvalidHandle(e.to_string()))?;
        if !name.starts_with("/arfuse-") || name.len() > SHM_NAME_MAX || name[1..].contains('/') {
            return Err(Error::InvalidHandle(format!("not an arfuse segment name: {name:?}")));
        }
        Ok(name)
    }
}

impl Backend for Cpu {
    const KIND: BackendKind = BackendKind::Cpu;
    type Device = CpuDevice;
    type Stream = CpuStream;
    type Event = CpuEvent;
    type SharedBuffer = CpuShm;
    type IpcHandle = CpuIpcHandle;
    type PeerMapping = CpuShmMapping;

    fn device_count() -> Result<usize> {
        Ok(1)
    }
    fn open_device(_ordinal: usize, _co_resident_ranks: usize) -> Result<CpuDevice> {
        Ok(CpuDevice)
    }
    fn describe(_device: &CpuDevice) -> String {
        format!("host CPU ({} threads)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }
    fn create_stream(_device: &CpuDevice) -> Result<CpuStream> {
        Ok(CpuStream)
    }
    fn alloc_shared(_device: &CpuDevice, bytes: usize) -> Result<CpuShm> {
        CpuShm::create(bytes)
    }
    fn shared_len(buffer: &CpuShm) -> usize {
        buffer.len()
    }
    fn shared_ptr(buffer: &CpuShm) -> DevicePtr {
        DevicePtr(buffer.as_ptr() as u64)
    }
    fn export_handle(buffer: &CpuShm) -> Result<CpuIpcHandle> {
        let mut handle = CpuIpcHandle { len: buffer.len() as u64, name: [0; 56] };
        let name = buffer.name().as_bytes();
        handle.name[..name.len()].copy_from_slice(name);
        Ok(handle)
    }
    fn open_handle(_device: &CpuDevice, handle: &CpuIpcHandle) -> Result<CpuShmMapping> {
        CpuShmMapping::open(handle.name()?, handle.len as usize)
    }
    fn peer_ptr(mapping: &CpuShmMapping) -> DevicePtr {
        DevicePtr(mapping.as_ptr() as u64)
    }
    fn peers_attached(buffer: &CpuShm) -> Result<()> {
        buffer.unlink()
    }

    unsafe fn copy(_stream: &CpuStream, dst: DevicePtr, src: DevicePtr, bytes: usize) -> Result<()> {
        // SAFETY: the caller guarantees both ranges are valid; `copy` tolerates overlap.
        unsafe { std::ptr::copy(src.0 as *const u8, dst.0 as *mut u8, bytes) };
        Ok(())
    }
    unsafe fn launch(_device: &CpuDevice, _stream: &CpuStream, kernel: KernelId, params: &LaunchParams) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { kernels::run(kernel, params) }
    }
    unsafe fn read_back(_stream: &CpuStream, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        // SAFETY: the caller guarantees `src` is valid for `dst.len()` bytes.
        unsafe { std::ptr::copy(src.0 as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    unsafe fn write(_stream: &CpuStream, dst: DevicePtr, src: &[u8]) -> Result<()> {
        // SAFETY: the caller guarantees `dst` is valid for `src.len()` bytes.
        unsafe { std::ptr::copy(src.as_ptr(), dst.0 as *mut u8, src.len()) };
        Ok(())
    }
    fn synchronize(_stream: &CpuStream) -> Result<()> {
        Ok(())
    }
    fn record_event(_stream: &CpuStream) -> Result<CpuEvent> {
        Ok(CpuEvent(Instant::now()))
    }
    fn elapsed(start: &CpuEvent, end: &CpuEvent) -> Result<Duration> {
        Ok(end.0.saturating_duration_since(start.0))
    }
}

// SAFETY: a slice's address and length describe exactly its initialised elements in host memory,
// the CPU backend's memory space, for as long as it is borrowed.
unsafe impl<T: Element> DeviceSlice<Cpu> for [T] {
    type Elem = T;
    fn device_ptr(&self) -> DevicePtr {
        DevicePtr(self.as_ptr() as u64)
    }
    fn len(&self) -> usize {
        <[T]>::len(self)
    }
}

// SAFETY: a `&mut [T]` is exclusive, so kernels may write through it.
unsafe impl<T: Element> DeviceSliceMut<Cpu> for [T] {}

// SAFETY: as for `[T]`; a vector's buffer holds `len()` initialised elements.
unsafe impl<T: Element> DeviceSlice<Cpu> for Vec<T> {
    type Elem = T;
    fn device_ptr(&self) -> DevicePtr {
        DevicePtr(self.as_ptr() as u64)
    }
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

// SAFETY: as for `[T]`.
unsafe impl<T: Element> DeviceSliceMut<Cpu> for Vec<T> {}

//! Device memory: [`CudaShared`] (what peers map), [`CudaIpcHandle`] (how they find it),
//! [`CudaPeerMapping`] (a peer's buffer here), and [`CudaBuffer`] (a typed local allocation, the
//! backends' shared [`DeviceBuffer`]).
//!
//! Every allocation comes from `cuMemAlloc_v2`: memory from a stream-ordered pool
//! (`cuMemAllocAsync`) cannot be exported with `cuIpcGetMemHandle`.

use super::device::CudaDevice;
use super::result::{self, ipc, mem, CallExt};
use super::Cuda;
use crate::gpu::opens::SharedOpens;
use crate::gpu::DeviceBuffer;
use crate::gpu::HandleOrigin;
use crate::{DevicePtr, Error, Result};
use cudarc::driver::result as cu;
use cudarc::driver::sys;

/// Allocates `bytes` (at least 1) of device memory on `device`, zero-filled.
pub(super) fn alloc_zeroed(device: &CudaDevice, bytes: usize) -> Result<sys::CUdeviceptr> {
    device.bind()?;
    // SAFETY: a context is current (bound above); `cuMemAlloc_v2` memory, exportable with
    // `cuIpcGetMemHandle` (unlike pool memory).
    let ptr = unsafe { cu::malloc_sync(bytes.max(1)) }.call("cuMemAlloc_v2")?;
    // SAFETY: `ptr` was just allocated with at least `bytes.max(1)` bytes.
    if let Err(err) = unsafe { mem::memset_d8_sync(ptr, 0, bytes.max(1)) } {
        // SAFETY: `ptr` is ours, unused, and freed once.
        device.record_err(unsafe { cu::free_sync(ptr) }.call("cuMemFree_v2"));
        return Err(err);
    }
    Ok(ptr)
}

/// Frees an allocation from [`alloc_zeroed`], parking a failure on `device`.
pub(super) fn free(device: &CudaDevice, ptr: sys::CUdeviceptr) {
    let res = device.bind().and_then(|()| {
        // SAFETY: the owner calls this once, from `Drop`; its documentation makes the caller
        // responsible for queued work that still uses the memory.
        unsafe { cu::free_sync(ptr) }.call("cuMemFree_v2")
    });
    device.record_err(res);
}

/// A rank's shared buffer: plain device memory (`cuMemAlloc_v2`), zero-filled, that peers map
/// through its [`CudaIpcHandle`]. Freed on drop (`cuMemFree_v2`, which may wait for the device:
/// drop it only when no kernel uses it and peers have closed their mappings).
#[derive(Debug)]
pub struct CudaShared {
    ptr: sys::CUdeviceptr,
    len: usize,
    device: CudaDevice,
}

impl CudaShared {
    /// Allocates `bytes` of zero-filled device memory.
    pub fn new(device: &CudaDevice, bytes: usize) -> Result<CudaShared> {
        let ptr = alloc_zeroed(device, bytes)?;
        Ok(CudaShared { ptr, len: bytes, device: device.clone() })
    }
    /// The device address.
    pub fn ptr(&self) -> DevicePtr {
        DevicePtr(self.ptr)
    }
    /// The size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the size is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device it lives on.
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }
    /// The handle peers use to map this buffer (`cuIpcGetMemHandle`).
    pub fn export(&self) -> Result<CudaIpcHandle> {
        self.device.bind()?;
        let handle = ipc::get_mem_handle(self.ptr)?;
        Ok(CudaIpcHandle { origin: HandleOrigin::here(self.device.ordinal(), self.ptr, self.len as u64), handle })
    }
}

impl Drop for CudaShared {
    fn drop(&mut self) {
        free(&self.device, self.ptr);
    }
}

/// What a rank sends its peers so they can map its [`CudaShared`]: plain bytes (`Pod`), 96 of them.
///
/// A peer in the exporting process uses `origin.ptr` directly (opening a handle of one's own process
/// fails with `CUDA_ERROR_INVALID_CONTEXT`); a peer in another process opens `handle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct CudaIpcHandle {
    /// Who exported it, and the allocation.
    pub origin: HandleOrigin,
    /// The driver's `CUipcMemHandle`.
    pub handle: [u8; 64],
}

/// `cuDevicePrimaryCtxRelease_v2` of the reference a [`CudaPeerMapping`] took on `peer_device`.
fn release_primary(peer_device: sys::CUdevice) -> Result<()> {
    // SAFETY: `peer_device` came from `cuDeviceGet`; the mapping owns one reference, released once.
    unsafe { cu::primary_ctx::release(peer_device) }.call("cuDevicePrimaryCtxRelease")
}

/// IPC mappings open in this process (see [`SharedOpens`]): every [`CudaPeerMapping`] of one handle
/// on one device shares one `cuIpcOpenMemHandle`, closed with its last user.
static OPENED: SharedOpens = SharedOpens::new();

/// How a peer's buffer became reachable, and what to undo on drop.
#[derive(Debug)]
enum Reach {
    /// Same process, same device: the pointer as is.
    Local,
    /// Same process, another device: peer access enabled from our context to the peer's primary
    /// context, which this mapping keeps retained (released on drop). Peer access stays enabled: other
    /// mappings may rely on it.
    Peer { peer_device: sys::CUdevice },
    /// Another process: a shared open of `cuIpcOpenMemHandle` (see [`OPENED`]), closed with its
    /// last user.
    Ipc { handle: [u8; 64] },
}

/// A peer's [`CudaShared`] as seen from this rank (see [`CudaIpcHandle`]).
#[derive(Debug)]
pub struct CudaPeerMapping {
    ptr: sys::CUdeviceptr,
    len: usize,
    reach: Reach,
    device: CudaDevice,
}

impl CudaPeerMapping {
    /// Maps the buffer behind `handle` into `device`'s address space.
    pub fn open(device: &CudaDevice, handle: &CudaIpcHandle) -> Result<CudaPeerMapping> {
        let origin = &handle.origin;
        if origin.is_empty() {
            return Err(Error::InvalidHandle(format!("empty CUDA IPC handle: {handle:?}")));
        }
        device.bind()?;
        let len = origin.len as usize;
        if !origin.is_from_this_process() {
            let ptr = OPENED.open(device.ordinal(), &handle.handle, || ipc::open_mem_handle(&handle.handle))?;
            let reach = Reach::Ipc { handle: handle.handle };
            return Ok(CudaPeerMapping { ptr, len, reach, device: device.clone() });
        }
        let peer_ordinal = origin.ordinal as usize;
        if peer_ordinal == device.ordinal() {
            return Ok(CudaPeerMapping { ptr: origin.ptr, len, reach: Reach::Local, device: device.clone() });
        }
        let peer_device = cu::device::get(peer_ordinal as i32).call("cuDeviceGet")?;
        if !result::device::can_access_peer(device.cu_device(), peer_device)? {
            return Err(Error::Driver {
                backend: crate::BackendKind::Cuda,
                call: "cuDeviceCanAccessPeer",
                code: sys::CUresult::CUDA_ERROR_PEER_ACCESS_UNSUPPORTED as i32,
                message: format!("device {} cannot access the memory of device {peer_ordinal}", device.ordinal()),
            });
        }
        // SAFETY: `peer_device` came from `cuDeviceGet`; the reference is released on drop (or below).
        let peer_context = unsafe { cu::primary_ctx::retain(peer_device) }.call("cuDevicePrimaryCtxRetain")?;
        let enabled = device.bind().and_then(|()| result::ctx::enable_peer_access(peer_context));
        if let Err(err) = enabled {
            device.record_err(release_primary(peer_device));
            return Err(err);
        }
        Ok(CudaPeerMapping { ptr: origin.ptr, len, reach: Reach::Peer { peer_device }, device: device.clone() })
    }

    /// The peer buffer's address in this rank's address space.
    pub fn ptr(&self) -> DevicePtr {
        DevicePtr(self.ptr)
    }
    /// The size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the size is 0 (never, for a mapping that opened).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether the buffer was opened through CUDA IPC (it belongs to another process).
    pub fn is_ipc(&self) -> bool {
        matches!(self.reach, Reach::Ipc { .. })
    }
}

impl Drop for CudaPeerMapping {
    fn drop(&mut self) {
        match &self.reach {
            Reach::Local => {}
            Reach::Peer { peer_device } => self.device.record_err(release_primary(*peer_device)),
            Reach::Ipc { handle } => {
                let res = OPENED.close(self.device.ordinal(), handle, |ptr| {
                    self.device.bind()?;
                    // SAFETY: opened by `CudaPeerMapping::open` and closed only here, once, by its last
                    // user; users keep their mapping alive while kernels use it (the `Backend` contract).
                    unsafe { ipc::close_mem_handle(ptr) }
                });
                self.device.record_err(res);
            }
        }
    }
}

/// An owned device allocation of `len` elements of `T` (`cuMemAlloc_v2`), zero-filled; freed on drop.
pub type CudaBuffer<T> = DeviceBuffer<Cuda, T>;

#[cfg(test)]
mod tests {
    use super::{CudaIpcHandle, HandleOrigin};

    #[test]
    fn handle_is_96_plain_bytes() {
        let origin = HandleOrigin { pid: 7, ordinal: 1, process_token: 9, ptr: 0x1000, len: 4096 };
        let handle = CudaIpcHandle { origin, handle: [3; 64] };
        let bytes = bytemuck::bytes_of(&handle);
        assert_eq!(bytes.len(), 96);
        assert_eq!(*bytemuck::from_bytes::<CudaIpcHandle>(bytes), handle);
    }
}

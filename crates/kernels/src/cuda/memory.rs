//! Device memory: [`CudaShared`] (what peers map), [`CudaIpcHandle`] (how they find it),
//! [`CudaPeerMapping`] (a peer's buffer here), and [`CudaBuffer`] (a typed local allocation).
//!
//! Every allocation comes from `cuMemAlloc_v2`: memory from a stream-ordered pool
//! (`cuMemAllocAsync`) cannot be exported with `cuIpcGetMemHandle`.

use super::device::CudaDevice;
use super::result::{self, ipc, mem};
use super::stream::CudaStream;
use super::Cuda;
use crate::gpu::opens::SharedOpens;
use crate::{DevicePtr, DeviceSlice, DeviceSliceMut, Element, Error, Result};
use cudarc::driver::sys;
use std::hash::{BuildHasher, Hasher};
use std::marker::PhantomData;
use std::sync::OnceLock;

/// A random number fixed for the life of this process, so that a handle can tell "exported by this
/// process" apart from "exported by another process that happens to have our pid" (containers with
/// their own pid namespaces). Never 0.
fn process_token() -> u64 {
    static TOKEN: OnceLock<u64> = OnceLock::new();
    *TOKEN.get_or_init(|| {
        // `RandomState` is seeded from the operating system's randomness.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish() | 1
    })
}

/// Allocates `bytes` (at least 1) of device memory on `device`, zero-filled.
fn alloc_zeroed(device: &CudaDevice, bytes: usize) -> Result<sys::CUdeviceptr> {
    device.bind()?;
    let ptr = mem::alloc(bytes.max(1))?;
    // SAFETY: `ptr` was just allocated with at least `bytes.max(1)` bytes.
    if let Err(err) = unsafe { mem::memset_d8_sync(ptr, 0, bytes.max(1)) } {
        // SAFETY: `ptr` is ours, unused, and freed once.
        device.record_err(unsafe { mem::free(ptr) });
        return Err(err);
    }
    Ok(ptr)
}

/// Frees an allocation from [`alloc_zeroed`], parking a failure on `device`.
fn free(device: &CudaDevice, ptr: sys::CUdeviceptr) {
    let res = device.bind().and_then(|()| {
        // SAFETY: the owner calls this once, from `Drop`; its documentation makes the caller
        // responsible for queued work that still uses the memory.
        unsafe { mem::free(ptr) }
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
        Ok(CudaIpcHandle {
            pid: std::process::id(),
            ordinal: self.device.ordinal() as u32,
            process_token: process_token(),
            ptr: self.ptr,
            len: self.len as u64,
            handle,
        })
    }
}

/// The handle of the allocation (`cuMemAlloc_v2`, e.g. a framework's tensor) that holds `ptr`,
/// and `ptr`'s byte offset in it: what peers need to read a user's tensor in place (graph inputs
/// registered after capture). Memory from a stream-ordered pool or the virtual memory API cannot
/// be exported this way; the driver's error says so.
pub(super) fn export_allocation(device: &CudaDevice, ptr: DevicePtr) -> Result<(CudaIpcHandle, u64)> {
    device.bind()?;
    let (base, len) = mem::address_range(ptr.0)?;
    let handle = ipc::get_mem_handle(base)?;
    let exported = CudaIpcHandle {
        pid: std::process::id(),
        ordinal: device.ordinal() as u32,
        process_token: process_token(),
        ptr: base,
        len: len as u64,
        handle,
    };
    Ok((exported, ptr.0 - base))
}

impl Drop for CudaShared {
    fn drop(&mut self) {
        free(&self.device, self.ptr);
    }
}

/// What a rank sends its peers so they can map its [`CudaShared`]: plain bytes (`Pod`), 96 of them.
///
/// A peer in the exporting process uses `ptr` directly (opening a handle of one's own process fails
/// with `CUDA_ERROR_INVALID_CONTEXT`); a peer in another process opens `handle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct CudaIpcHandle {
    /// The exporting process's id.
    pub pid: u32,
    /// The exporting process's ordinal of the device the memory lives on.
    pub ordinal: u32,
    /// A random number of the exporting process (tells two processes with one pid apart).
    pub process_token: u64,
    /// The device address in the exporting process.
    pub ptr: u64,
    /// The size in bytes.
    pub len: u64,
    /// The driver's `CUipcMemHandle`.
    pub handle: [u8; 64],
}

impl CudaIpcHandle {
    /// Whether this process exported the handle.
    pub fn is_from_this_process(&self) -> bool {
        self.pid == std::process::id() && self.process_token == process_token()
    }
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
        if handle.ptr == 0 || handle.len == 0 || handle.process_token == 0 {
            return Err(Error::InvalidHandle(format!("empty CUDA IPC handle: {handle:?}")));
        }
        device.bind()?;
        let len = handle.len as usize;
        if !handle.is_from_this_process() {
            let ptr = OPENED.open(device.ordinal(), &handle.handle, || ipc::open_mem_handle(&handle.handle))?;
            let reach = Reach::Ipc { handle: handle.handle };
            return Ok(CudaPeerMapping { ptr, len, reach, device: device.clone() });
        }
        let peer_ordinal = handle.ordinal as usize;
        if peer_ordinal == device.ordinal() {
            return Ok(CudaPeerMapping { ptr: handle.ptr, len, reach: Reach::Local, device: device.clone() });
        }
        let peer_device = result::device::get(peer_ordinal)?;
        if !result::device::can_access_peer(device.cu_device(), peer_device)? {
            return Err(Error::Driver {
                backend: crate::BackendKind::Cuda,
                call: "cuDeviceCanAccessPeer",
                code: sys::CUresult::CUDA_ERROR_PEER_ACCESS_UNSUPPORTED as i32,
                message: format!("device {} cannot access the memory of device {peer_ordinal}", device.ordinal()),
            });
        }
        let peer_context = result::ctx::retain_primary(peer_device)?;
        let enabled = device.bind().and_then(|()| result::ctx::enable_peer_access(peer_context));
        if let Err(err) = enabled {
            device.record_err(result::ctx::release_primary(peer_device));
            return Err(err);
        }
        Ok(CudaPeerMapping { ptr: handle.ptr, len, reach: Reach::Peer { peer_device }, device: device.clone() })
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
            Reach::Peer { peer_device } => self.device.record_err(result::ctx::release_primary(*peer_device)),
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
#[derive(Debug)]
pub struct CudaBuffer<T: bytemuck::Pod> {
    ptr: sys::CUdeviceptr,
    len: usize,
    device: CudaDevice,
    _elem: PhantomData<T>,
}

impl<T: bytemuck::Pod> CudaBuffer<T> {
    /// Allocates `len` zero-filled elements.
    pub fn zeros(device: &CudaDevice, len: usize) -> Result<CudaBuffer<T>> {
        // An impossible size saturates and fails in the driver as out of memory.
        let ptr = alloc_zeroed(device, len.saturating_mul(std::mem::size_of::<T>()))?;
        Ok(CudaBuffer { ptr, len, device: device.clone(), _elem: PhantomData })
    }

    /// Allocates a buffer holding a copy of `data` (uploaded through `stream`, finished on return).
    pub fn from_slice(stream: &CudaStream, data: &[T]) -> Result<CudaBuffer<T>> {
        let mut buffer = CudaBuffer::zeros(stream.device(), data.len())?;
        buffer.upload(stream, data)?;
        Ok(buffer)
    }

    /// Copies `data` into the buffer, after all work queued on `stream`; done when this returns.
    ///
    /// # Panics
    /// If `data.len()` differs from the buffer's length.
    pub fn upload(&mut self, stream: &CudaStream, data: &[T]) -> Result<()> {
        assert_eq!(data.len(), self.len, "CudaBuffer::upload: length mismatch");
        // SAFETY: the buffer holds exactly `size_of_val(data)` bytes, and `write` returns only once
        // the copy has run.
        unsafe { stream.write(self.device_ptr(), bytemuck::cast_slice(data)) }
    }

    /// Copies the buffer to the host, after all work queued on `stream`.
    pub fn download(&self, stream: &CudaStream) -> Result<Vec<T>> {
        let mut host = vec![T::zeroed(); self.len];
        // SAFETY: the buffer holds exactly `size_of_val(host)` bytes.
        unsafe { stream.read_back(self.device_ptr(), bytemuck::cast_slice_mut(&mut host))? };
        Ok(host)
    }

    /// The device address of the first element.
    pub fn device_ptr(&self) -> DevicePtr {
        DevicePtr(self.ptr)
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
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }
}

impl<T: bytemuck::Pod> Drop for CudaBuffer<T> {
    fn drop(&mut self) {
        free(&self.device, self.ptr);
    }
}

// SAFETY: the buffer owns `len` initialised (zero-filled, then written) elements of `T` in device
// memory from `cuMemAlloc_v2`, the cuda backend's memory space, until it is dropped.
unsafe impl<T: Element> DeviceSlice<Cuda> for CudaBuffer<T> {
    type Elem = T;
    fn device_ptr(&self) -> DevicePtr {
        DevicePtr(self.ptr)
    }
    fn len(&self) -> usize {
        self.len
    }
}

// SAFETY: a `&mut CudaBuffer` is the only handle on its allocation.
unsafe impl<T: Element> DeviceSliceMut<Cuda> for CudaBuffer<T> {}

#[cfg(test)]
mod tests {
    use super::CudaIpcHandle;

    #[test]
    fn handle_is_96_plain_bytes() {
        let handle = CudaIpcHandle { pid: 7, ordinal: 1, process_token: 9, ptr: 0x1000, len: 4096, handle: [3; 64] };
        let bytes = bytemuck::bytes_of(&handle);
        assert_eq!(bytes.len(), 96);
        assert_eq!(*bytemuck::from_bytes::<CudaIpcHandle>(bytes), handle);
    }
}

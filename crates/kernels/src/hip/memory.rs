//! Device memory: [`HipShared`] (what peers map), [`HipIpcHandle`] (how they find it),
//! [`HipPeerMapping`] (a peer's buffer here), and [`HipBuffer`] (a typed local allocation, the
//! backends' shared [`DeviceBuffer`]).
//!
//! Shared buffers carry the cross-rank flags, so they come from `hipExtMallocWithFlags` with
//! `hipDeviceMallocUncached` where the runtime has it (HIP ≥ 5.5), as AITER and vLLM allocate
//! theirs: the GPU does not cache that memory, so a peer's store is seen by the next load. A
//! runtime that refuses the flag gets plain `hipMalloc` memory, and the handle says so
//! ([`HipIpcHandle::is_uncached`]). Nothing shared comes from a stream-ordered pool.
//!
//! `hipFree` waits for every stream of the device first (clr `ihipFree`), so dropping device
//! memory while a co-resident rank's kernel spins on a peer waits for that kernel.

use super::device::HipDevice;
use super::result::{self, flags, ipc, mem};
use super::Hip;
use crate::gpu::opens::SharedOpens;
use crate::gpu::DeviceBuffer;
use crate::gpu::HandleOrigin;
use crate::{DevicePtr, Error, Result};

/// Zero-fills `bytes` at `ptr`; on failure frees `ptr` (parking that failure) and returns the error.
fn zero_or_free(device: &HipDevice, ptr: u64, bytes: usize) -> Result<u64> {
    // SAFETY: `ptr` was just allocated on `device` with at least `bytes` bytes.
    match unsafe { mem::memset_sync(ptr, 0, bytes) } {
        Ok(()) => Ok(ptr),
        Err(err) => {
            // SAFETY: `ptr` is ours, unused, and freed once.
            device.record_err(unsafe { mem::free(ptr) });
            Err(err)
        }
    }
}

/// Allocates `bytes` (at least 1) of plain device memory on `device`, zero-filled.
pub(super) fn alloc_zeroed(device: &HipDevice, bytes: usize) -> Result<u64> {
    device.bind()?;
    let ptr = mem::malloc(bytes.max(1))?;
    zero_or_free(device, ptr, bytes.max(1))
}

/// Frees an allocation of this module, parking a failure on `device`.
pub(super) fn free(device: &HipDevice, ptr: u64) {
    let res = device.bind().and_then(|()| {
        // SAFETY: the owner calls this once, from `Drop`; its documentation makes the caller
        // responsible for queued work that still uses the memory.
        unsafe { mem::free(ptr) }
    });
    device.record_err(res);
}

/// Bit 0 of [`HipIpcHandle::memory`]: the buffer is uncached (`hipDeviceMallocUncached`).
const MEMORY_UNCACHED: u32 = 1;

/// A rank's shared buffer: device memory, zero-filled, that peers map through its
/// [`HipIpcHandle`]. Uncached where the runtime allows (see the module documentation). Freed on
/// drop (`hipFree`, which waits for the device's streams: drop it only when no kernel uses it and
/// peers have closed their mappings).
#[derive(Debug)]
pub struct HipShared {
    ptr: u64,
    len: usize,
    uncached: bool,
    device: HipDevice,
}

impl HipShared {
    /// Allocates `bytes` of zero-filled device memory, uncached if the runtime allows (what
    /// [`crate::Backend::alloc_shared`] does).
    pub fn new(device: &HipDevice, bytes: usize) -> Result<HipShared> {
        device.bind()?;
        let size = bytes.max(1);
        let (ptr, uncached) = match mem::ext_malloc_with_flags(size, flags::DEVICE_MALLOC_UNCACHED) {
            Ok(ptr) => (ptr, true),
            // HIP < 5.5 does not know the flag (hipErrorInvalidValue); out of memory is final.
            Err(Error::Driver { code, .. }) if code != result::code::OUT_OF_MEMORY => (mem::malloc(size)?, false),
            Err(err) => return Err(err),
        };
        let ptr = zero_or_free(device, ptr, size)?;
        Ok(HipShared { ptr, len: bytes, uncached, device: device.clone() })
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
    /// Whether the memory is uncached (`hipDeviceMallocUncached`), as cross-GPU flags want it.
    pub fn is_uncached(&self) -> bool {
        self.uncached
    }
    /// The device it lives on.
    pub fn device(&self) -> &HipDevice {
        &self.device
    }
    /// The handle peers use to map this buffer (`hipIpcGetMemHandle`).
    pub fn export(&self) -> Result<HipIpcHandle> {
        self.device.bind()?;
        let handle = ipc::get_mem_handle(self.ptr)?;
        Ok(HipIpcHandle {
            origin: HandleOrigin::here(self.device.ordinal(), self.ptr, self.len as u64),
            memory: if self.uncached { MEMORY_UNCACHED } else { 0 },
            reserved: 0,
            handle,
        })
    }
}

impl Drop for HipShared {
    fn drop(&mut self) {
        free(&self.device, self.ptr);
    }
}

/// What a rank sends its peers so they can map its [`HipShared`]: plain bytes (`Pod`), 104 of them.
///
/// A peer in the exporting process uses `origin.ptr` directly (with peer access when it drives another
/// device); a peer in another process opens `handle` with `hipIpcOpenMemHandle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct HipIpcHandle {
    /// Who exported it, and the allocation.
    pub origin: HandleOrigin,
    /// Bit 0: the memory is uncached (`hipDeviceMallocUncached`). Other bits zero.
    pub memory: u32,
    /// Zero.
    pub reserved: u32,
    /// The runtime's `hipIpcMemHandle_t` (64 opaque bytes).
    pub handle: [u8; 64],
}

impl HipIpcHandle {
    /// Whether the exported memory is uncached.
    pub fn is_uncached(&self) -> bool {
        self.memory & MEMORY_UNCACHED != 0
    }
}

/// IPC mappings open in this process (see [`SharedOpens`]): every [`HipPeerMapping`] of one handle
/// on one device shares one `hipIpcOpenMemHandle`, closed with its last user.
static OPENED: SharedOpens = SharedOpens::new();

/// How a peer's buffer became reachable, and what to undo on drop.
#[derive(Debug)]
enum Reach {
    /// Same process, same device: the pointer as is.
    Local,
    /// Same process, another device: peer access enabled from our device to it. It stays enabled
    /// (other mappings may rely on it; HIP keeps no count).
    Peer,
    /// Another process: a shared open of `hipIpcOpenMemHandle` (see [`OPENED`]).
    Ipc { handle: [u8; 64] },
}

/// A peer's [`HipShared`] as seen from this rank (see [`HipIpcHandle`]).
#[derive(Debug)]
pub struct HipPeerMapping {
    ptr: u64,
    len: usize,
    uncached: bool,
    reach: Reach,
    device: HipDevice,
}

impl HipPeerMapping {
    /// Maps the buffer behind `handle` into `device`'s address space.
    pub fn open(device: &HipDevice, handle: &HipIpcHandle) -> Result<HipPeerMapping> {
        let origin = &handle.origin;
        if origin.is_empty() {
            return Err(Error::InvalidHandle(format!("empty HIP IPC handle: {handle:?}")));
        }
        let len = origin.len as usize;
        let uncached = handle.is_uncached();
        let mapping = |ptr, reach| HipPeerMapping { ptr, len, uncached, reach, device: device.clone() };
        if !origin.is_from_this_process() {
            let ptr = open_shared(device, &handle.handle)?;
            return Ok(mapping(ptr, Reach::Ipc { handle: handle.handle }));
        }
        let peer = origin.ordinal as usize;
        if peer == device.ordinal() {
            return Ok(mapping(origin.ptr, Reach::Local));
        }
        if !result::device::can_access_peer(device.ordinal(), peer)? {
            return Err(Error::Driver {
                backend: crate::BackendKind::Hip,
                call: "hipDeviceCanAccessPeer",
                code: result::code::PEER_ACCESS_UNSUPPORTED,
                message: format!("device {} cannot access the memory of device {peer}", device.ordinal()),
            });
        }
        device.bind()?;
        result::device::enable_peer_access(peer)?;
        Ok(mapping(origin.ptr, Reach::Peer))
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
    /// Whether the buffer was opened through HIP IPC (it belongs to another process).
    pub fn is_ipc(&self) -> bool {
        matches!(self.reach, Reach::Ipc { .. })
    }
    /// Whether the peer allocated the buffer uncached.
    pub fn is_uncached(&self) -> bool {
        self.uncached
    }
}

/// Opens `handle` on `device`, or shares the open this process already has.
fn open_shared(device: &HipDevice, handle: &[u8; 64]) -> Result<u64> {
    OPENED.open(device.ordinal(), handle, || {
        device.bind()?;
        let (major, _, _) = result::split_version(device.runtime_version());
        ipc::open_mem_handle(handle, major)
    })
}

/// Drops one user of the open of `handle` on `device`, closing it with the last.
fn close_shared(device: &HipDevice, handle: &[u8; 64]) {
    let res = OPENED.close(device.ordinal(), handle, |ptr| {
        device.bind()?;
        // SAFETY: opened by `open_shared` and closed only here, once, by its last user; users keep
        // their mapping alive while kernels use it (the `Backend` contract).
        unsafe { ipc::close_mem_handle(ptr) }
    });
    device.record_err(res);
}

impl Drop for HipPeerMapping {
    fn drop(&mut self) {
        if let Reach::Ipc { handle } = &self.reach {
            close_shared(&self.device, handle);
        }
    }
}

/// An owned device allocation of `len` elements of `T` (`hipMalloc`), zero-filled; freed on drop.
pub type HipBuffer<T> = DeviceBuffer<Hip, T>;

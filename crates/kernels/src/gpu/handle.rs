//! [`HandleOrigin`]: the first 32 bytes of every GPU backend's IPC handle — who exported it and
//! which allocation it names — and the process token that tells this process from another with
//! the same pid.

use crate::DevicePtr;

/// Who exported an IPC handle and the allocation it names; plain bytes (`Pod`), 32 of them, at the
/// start of `CudaIpcHandle` and `HipIpcHandle`.
///
/// A peer in the exporting process uses `ptr` directly (opening a handle of one's own process
/// fails on CUDA, and maps the memory a second time on HIP); a peer in another process opens the
/// runtime's handle that follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct HandleOrigin {
    /// The exporting process's id.
    pub pid: u32,
    /// The exporting process's ordinal of the device the memory lives on.
    pub ordinal: u32,
    /// A random number of the exporting process (tells two processes with one pid apart).
    pub process_token: u64,
    /// The device address in the exporting process.
    pub ptr: u64,
    /// The size of the exported allocation in bytes.
    pub len: u64,
}

impl HandleOrigin {
    /// An allocation of `len` bytes at `ptr` on device `ordinal`, exported by this process.
    #[cfg(any(feature = "cuda", feature = "hip"))]
    pub(crate) fn here(ordinal: usize, ptr: u64, len: u64) -> Self {
        HandleOrigin { pid: std::process::id(), ordinal: ordinal as u32, process_token: process_token(), ptr, len }
    }

    /// Whether this process exported the handle.
    pub fn is_from_this_process(&self) -> bool {
        self.pid == std::process::id() && self.process_token == process_token()
    }

    /// The device address in the exporting process.
    pub fn device_ptr(&self) -> DevicePtr {
        DevicePtr(self.ptr)
    }

    /// Whether the handle names nothing (no address, no size, or no token: never exported).
    pub fn is_empty(&self) -> bool {
        self.ptr == 0 || self.len == 0 || self.process_token == 0
    }
}

/// A random number fixed for the life of this process, so that a handle can tell "exported by
/// this process" apart from "exported by another process that happens to have our pid" (containers
/// with their own pid namespaces). Never 0.
fn process_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static TOKEN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TOKEN.get_or_init(|| {
        // `RandomState` is seeded from the operating system's randomness.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish() | 1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_is_32_plain_bytes_and_knows_its_process() {
        assert_eq!(std::mem::size_of::<HandleOrigin>(), 32);
        let foreign = HandleOrigin { pid: std::process::id(), ordinal: 0, process_token: 0, ptr: 0x1000, len: 64 };
        assert!(!foreign.is_from_this_process(), "same pid, another token");
        assert!(foreign.is_empty());
        let ours = HandleOrigin { process_token: process_token(), ..foreign };
        assert!(ours.is_from_this_process() && !ours.is_empty());
        assert_eq!(ours.device_ptr(), DevicePtr(0x1000));
    }
}

//! POSIX shared memory: the CPU backend's "device memory that peers can map".
//!
//! The creating rank owns a named segment ([`CpuShm`]); peers open it by name ([`CpuShmMapping`]).
//! The name is unlinked as soon as every peer has mapped it ([`CpuShm::unlink`]), so a crashed
//! job leaves nothing behind in `/dev/shm`; failing that, the owner unlinks it on drop.

use crate::{Error, Result};
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Longest segment name, including the leading `/` (portable limit, NUL not counted).
pub const SHM_NAME_MAX: usize = 47;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A mapping of `len` bytes at `ptr`, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; the owner hands out raw addresses only, and all
// concurrent access to it goes through atomics or is ordered by the barrier protocol.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` exposes nothing but the address and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(fd: libc::c_int, len: usize) -> Result<Self> {
        // SAFETY: a fresh shared read/write mapping of an open descriptor; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os("mmap"));
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and the mapping is unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

fn close(fd: libc::c_int) {
    // SAFETY: `fd` is a descriptor this module opened and closes exactly once.
    unsafe {
        libc::close(fd);
    }
}

/// A shared-memory segment this process created.
#[derive(Debug)]
pub struct CpuShm {
    map: Mapping,
    name: CString,
    unlinked: AtomicBool,
}

impl CpuShm {
    /// Creates a zero-filled segment of `len` bytes with a fresh private name (mode 0600).
    pub fn create(len: usize) -> Result<Self> {
        let len = len.max(1);
        let name = format!(
            "/arfuse-{}-{}-{:x}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
        );
        debug_assert!(name.len() <= SHM_NAME_MAX);
        let cname = CString::new(name).map_err(|e| Error::InvalidHandle(e.to_string()))?;
        // SAFETY: `cname` is a valid NUL-terminated string; O_EXCL guarantees a new segment.
        let fd = unsafe { libc::shm_open(cname.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600) };
        if fd < 0 {
            return Err(Error::last_os("shm_open"));
        }
        let unlink_now = |err: Error| {
            close(fd);
            // SAFETY: the name was created just above by this process.
            unsafe { libc::shm_unlink(cname.as_ptr()) };
            err
        };
        // SAFETY: `fd` is open for writing.
        if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            return Err(unlink_now(Error::last_os("ftruncate")));
        }
        let map = match Mapping::map(fd, len) {
            Ok(m) => m,
            Err(e) => return Err(unlink_now(e)),
        };
        close(fd);
        Ok(CpuShm { map, name: cname, unlinked: AtomicBool::new(false) })
    }

    /// The segment's name (what peers open).
    pub fn name(&self) -> &str {
        self.name.to_str().unwrap_or_default()
    }
    /// Address of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }
    /// Whether the segment is empty (never: segments have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Removes the name (idempotent); existing mappings stay valid.
    pub fn unlink(&self) -> Result<()> {
        if self.unlinked.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // SAFETY: the name belongs to this segment and is unlinked at most once.
        if unsafe { libc::shm_unlink(self.name.as_ptr()) } != 0 {
            return Err(Error::last_os("shm_unlink"));
        }
        Ok(())
    }
}

impl Drop for CpuShm {
    fn drop(&mut self) {
        // A failure here (name already gone) leaves nothing to clean up.
        let _ = self.unlink();
    }
}

/// A peer's segment mapped into this process.
#[derive(Debug)]
pub struct CpuShmMapping {
    map: Mapping,
}

impl CpuShmMapping {
    /// Opens the segment `name`, which must be exactly `len` bytes long.
    pub fn open(name: &str, len: usize) -> Result<Self> {
        let cname = CString::new(name).map_err(|e| Error::InvalidHandle(e.to_string()))?;
        // SAFETY: `cname` is a valid NUL-terminated string.
        let fd = unsafe { libc::shm_open(cname.as_ptr(), libc::O_RDWR, 0) };
        if fd < 0 {
            return Err(Error::last_os("shm_open"));
        }
        // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open and `st` is a valid out-pointer.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            let e = Error::last_os("fstat");
            close(fd);
            return Err(e);
        }
        if st.st_size as u64 != len as u64 {
            close(fd);
            return Err(Error::InvalidHandle(format!("segment {name} is {} bytes, the handle says {len}", st.st_size)));
        }
        let map = Mapping::map(fd, len);
        close(fd);
        Ok(CpuShmMapping { map: map? })
    }
    /// Address of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.ptr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_see_each_others_writes_and_names_are_removed() {
        let shm = CpuShm::create(4096).expect("create");
        let peer = CpuShmMapping::open(shm.name(), 4096).expect("open");
        // SAFETY: both mappings are 4096 bytes long and nothing else touches them.
        unsafe {
            shm.as_ptr().add(100).write(42);
            assert_eq!(peer.as_ptr().add(100).read(), 42);
        }
        shm.unlink().expect("unlink");
        assert!(CpuShmMapping::open(shm.name(), 4096).is_err(), "name must be gone after unlink");
    }

    #[test]
    fn wrong_length_is_refused() {
        let shm = CpuShm::create(4096).expect("create");
        assert!(matches!(CpuShmMapping::open(shm.name(), 8192), Err(Error::InvalidHandle(_))));
    }
}

//! POSIX shared memory: the CPU backend's "device memory that peers can map".
//!
//! The creating rank owns a named segment ([`CpuShm`]); peers open it by name ([`CpuShmMapping`]).
//! The name is unlinked as soon as every peer has mapped it ([`CpuShm::unlink`]), so a crashed
//! job leaves nothing behind in `/dev/shm`; failing that, the owner unlinks it on drop.
//! Creation reserves the segment's memory (`posix_fallocate`), so a `/dev/shm` too small for it
//! is [`Error::ShmTooSmall`] from [`CpuShm::create`], not a `SIGBUS` in a later call.

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

/// Where glibc's `shm_open` creates its segments.
pub const SHM_DIR: &str = "/dev/shm";

/// Reserves the memory of the first `len` bytes of `fd`, so that no later touch of the mapping
/// can fault for lack of memory (tmpfs backs a truncated file lazily: without this, a short
/// `/dev/shm` is a `SIGBUS` at the first page that cannot be backed, long after creation).
/// `ENOSPC`/`EFBIG` become [`Error::ShmTooSmall`]; `EINTR` (a signal during a large
/// reservation) is retried, which is harmless because reserving a reserved range does nothing.
fn reserve(fd: libc::c_int, len: usize) -> Result<()> {
    loop {
        // SAFETY: `fd` is an open, writable descriptor; posix_fallocate reads nothing from us.
        // It returns the error number instead of setting errno.
        let rc = unsafe { libc::posix_fallocate(fd, 0, len as libc::off_t) };
        match rc {
            0 => return Ok(()),
            libc::EINTR => continue,
            libc::ENOSPC | libc::EFBIG => {
                return Err(Error::ShmTooSmall {
                    requested: len as u64,
                    available: free_bytes(fd),
                    path: SHM_DIR,
                    source: std::io::Error::from_raw_os_error(rc),
                })
            }
            _ => return Err(Error::Os { call: "posix_fallocate", source: std::io::Error::from_raw_os_error(rc) }),
        }
    }
}

/// Bytes free for an unprivileged user on the filesystem of `fd`, if `fstatvfs` says.
fn free_bytes(fd: libc::c_int) -> Option<u64> {
    // SAFETY: an all-zero `statvfs` is a valid value for fstatvfs to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is a valid out-pointer.
    if unsafe { libc::fstatvfs(fd, &mut st) } != 0 {
        return None;
    }
    (st.f_bavail as u64).checked_mul(st.f_frsize as u64)
}

/// A shared-memory segment this process created.
#[derive(Debug)]
pub struct CpuShm {
    map: Mapping,
    name: CString,
    unlinked: AtomicBool,
}

impl CpuShm {
    /// Creates a zero-filled segment of `len` bytes with a fresh private name (mode 0600), its
    /// memory reserved: a shared-memory filesystem without room for it is
    /// [`Error::ShmTooSmall`] here, never a `SIGBUS` later.
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
        if let Err(e) = reserve(fd, len) {
            return Err(unlink_now(e));
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

    /// Blocks of 512 bytes the filesystem has allocated to segment `name`.
    fn allocated_bytes(name: &str) -> u64 {
        let cname = CString::new(name).expect("name");
        // SAFETY: `cname` is NUL-terminated; the descriptor is closed below.
        let fd = unsafe { libc::shm_open(cname.as_ptr(), libc::O_RDONLY, 0) };
        assert!(fd >= 0, "shm_open {name}: {}", std::io::Error::last_os_error());
        // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open and `st` is a valid out-pointer.
        let rc = unsafe { libc::fstat(fd, &mut st) };
        close(fd);
        assert_eq!(rc, 0, "fstat {name}");
        st.st_blocks as u64 * 512
    }

    #[test]
    fn segment_memory_is_reserved_at_creation() {
        // A truncated tmpfs file has no pages until touched; a reserved one has all of them.
        let len = 3 << 20;
        let shm = CpuShm::create(len).expect("create");
        assert!(allocated_bytes(shm.name()) >= len as u64, "{} of {len} bytes allocated", allocated_bytes(shm.name()));
    }

    /// Set in the child that [`short_dev_shm_is_a_typed_error_at_creation`] starts in a private
    /// mount namespace with a 1 MiB tmpfs on `/dev/shm`.
    const SMALL_SHM_CHILD: &str = "ARFUSE_KERNELS_SMALL_SHM_CHILD";
    /// What that child prints when all of its checks passed.
    const SMALL_SHM_DONE: &str = "small-shm child: all checks passed";

    /// The child's half: `/dev/shm` is a fresh, empty 1 MiB tmpfs of its own.
    fn small_shm_checks() {
        let empty = |why: &str| {
            let left: Vec<_> = std::fs::read_dir(SHM_DIR).expect("read /dev/shm").collect();
            assert!(left.is_empty(), "{why}: /dev/shm holds {left:?}");
        };
        empty("at the start");
        // 4 MiB cannot be reserved: a typed error naming the size, nothing left behind.
        let err = CpuShm::create(4 << 20).expect_err("4 MiB in a 1 MiB /dev/shm");
        match &err {
            Error::ShmTooSmall { requested, available, path, source } => {
                assert_eq!(*requested, 4 << 20);
                assert_eq!(*path, SHM_DIR);
                assert!(available.is_some_and(|a| a <= 1 << 20), "available {available:?}");
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
            }
            other => panic!("expected ShmTooSmall, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("4194304 bytes") && text.contains(SHM_DIR), "{text}");
        empty("after the refusal");
        // The reservation is real: 768 KiB fits, then 512 KiB more does not (sparse segments
        // would both "fit"), and every byte of the first can be written without a fault.
        let big = CpuShm::create(768 << 10).expect("768 KiB in a 1 MiB /dev/shm");
        // SAFETY: the mapping is `big.len()` bytes long and nothing else touches it.
        unsafe { std::ptr::write_bytes(big.as_ptr(), 0xa5, big.len()) };
        assert!(matches!(CpuShm::create(512 << 10), Err(Error::ShmTooSmall { requested: 524288, .. })));
        drop(big);
        empty("after drop");
        println!("{SMALL_SHM_DONE}");
    }

    #[test]
    fn short_dev_shm_is_a_typed_error_at_creation() {
        use std::os::unix::process::CommandExt;
        if std::env::var_os(SMALL_SHM_CHILD).is_some() {
            small_shm_checks();
            return;
        }
        let module = module_path!();
        let test = format!(
            "{}::short_dev_shm_is_a_typed_error_at_creation",
            &module[module.find("::").map_or(0, |i| i + 2)..]
        );
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = std::process::Command::new(exe);
        child.args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"]).env(SMALL_SHM_CHILD, "1");
        // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
        // (unshare, mount) on static NUL-terminated strings, and allocates nothing.
        unsafe {
            child.pre_exec(|| {
                let ok = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
                ok(libc::unshare(libc::CLONE_NEWNS))?;
                // Private, so that the tmpfs below never shows in the parent's namespace.
                ok(libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                ok(libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/dev/shm".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    c"size=1m,mode=1777".as_ptr().cast(),
                ))
            });
        }
        let output = match child.output() {
            Ok(output) => output,
            Err(e) => {
                println!("SKIP {test}: cannot mount a private 1 MiB tmpfs on /dev/shm (needs root, CAP_SYS_ADMIN and unshare(CLONE_NEWNS)): {e}");
                return;
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "child {}:\n{stdout}\n{stderr}", output.status);
        assert!(stdout.contains(SMALL_SHM_DONE), "the child did not run its checks:\n{stdout}\n{stderr}");
    }

    #[test]
    fn wrong_length_is_refused() {
        let shm = CpuShm::create(4096).expect("create");
        assert!(matches!(CpuShmMapping::open(shm.name(), 8192), Err(Error::InvalidHandle(_))));
    }
}

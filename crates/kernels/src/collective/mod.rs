//! The vendor collective library — NCCL on NVIDIA, RCCL on AMD — as the operator's fallback
//! all-reduce: a thin binding loaded at run time, nothing more.
//!
//! | concept | here |
//! |---|---|
//! | which library family a backend uses | [`Vendor`], [`CollectiveBackend::VENDOR`] |
//! | the loaded library and its entry points | [`Library`] |
//! | what rank 0 generates and every rank needs to join | [`UniqueId`] (128 bytes) |
//! | one rank's membership of a group | [`Communicator`] (destroyed on drop unless borrowed) |
//!
//! # Loading
//! No link-time dependency: [`Library::open`] `dlopen`s, in order, the path in
//! `ARFUSE_NCCL_LIBRARY` if that variable is set (and then only it: an explicit choice that fails
//! is an error, not a reason to pick another library silently), else `libnccl.so.2`, `libnccl.so`
//! (NVIDIA) or `librccl.so.1`, `librccl.so` (AMD). PyPI's `nvidia-nccl-cu*` wheels ship only
//! `libnccl.so.2`, hence the versioned name first. A machine without the library gets
//! [`Error::CollectiveUnavailable`] naming every candidate and why it failed; a library that lacks
//! an entry point is refused the same way. Every call that fails gives [`Error::Collective`]
//! with the library's own description of the code (`ncclGetErrorString`, and `ncclGetLastError`
//! where the library has it).
//!
//! # Backend neutrality
//! This module knows no device runtime: it takes device addresses ([`DevicePtr`]) and a raw
//! stream pointer (`cudaStream_t` / `hipStream_t`, i.e. the driver's `CUstream`, as `*mut c_void`).
//! [`CollectiveBackend`] is what a backend provides so that the operator can call it: the raw
//! stream of its streams and a way to make a device current (NCCL takes the calling thread's
//! current device when a communicator is created).
//!
//! # Numerics
//! The library sums in its own order (ring or tree, chunked, chosen at run time), so its sum is
//! not bit-identical to the contract's rank-order sum for three ranks or more, and it does not
//! map `-0.0` to `+0.0`. What stays exact is everything after the sum: the operator's add+RMSNorm
//! kernel reads the library's sum like any other, so `residual_out` is bit-exact against the
//! contract's steps 2-3 applied to the library's own sum (see ARCHITECTURE.md, "Vendor collective
//! fallback").
//!
//! # Safety model
//! The entry points are copied out of the library as typed function pointers whose prototypes
//! transcribe `nccl.h` (the private `sys` module); they are used only while the [`Library`] that resolved them is
//! alive (every [`Communicator`] holds an `Arc` of it). [`Communicator::all_reduce_sum`] is `unsafe`:
//! its caller promises the device addresses and the stream.

mod sys;

pub use sys::UNIQUE_ID_BYTES;

use crate::{Backend, DType, DevicePtr, Error, Result};
use std::ffi::{c_int, c_void, CStr, OsStr, OsString};
use std::fmt;
use std::sync::Arc;

/// The environment variable naming the library to load instead of the default names.
pub const LIBRARY_ENV: &str = "ARFUSE_NCCL_LIBRARY";

/// Which vendor's collective library.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vendor {
    /// NVIDIA's NCCL.
    Nccl,
    /// AMD's RCCL (the same C interface).
    Rccl,
}

impl Vendor {
    /// The file names tried, in order, when [`LIBRARY_ENV`] is not set.
    pub const fn library_names(self) -> &'static [&'static str] {
        match self {
            Vendor::Nccl => &["libnccl.so.2", "libnccl.so"],
            Vendor::Rccl => &["librccl.so.1", "librccl.so"],
        }
    }

    /// `NCCL` or `RCCL`.
    pub const fn name(self) -> &'static str {
        match self {
            Vendor::Nccl => "NCCL",
            Vendor::Rccl => "RCCL",
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend whose streams the vendor collective library can enqueue work on.
pub trait CollectiveBackend: Backend {
    /// The library family of this backend's devices.
    const VENDOR: Vendor;
    /// The stream as the library takes it (`cudaStream_t` / `hipStream_t`); valid while `stream` lives.
    fn raw_stream(stream: &Self::Stream) -> *mut c_void;
    /// Makes `device` current on the calling thread (the library creates communicators on, and
    /// launches for, the current device).
    fn make_current(device: &Self::Device) -> Result<()>;
}

/// A loaded collective library and its entry points. Shared ([`Arc`]) by the communicators made
/// with it; unloaded when the last one is dropped.
pub struct Library {
    api: sys::Api,
    path: String,
    version: i32,
    // Declared last: dropped (unloaded) after everything that may call into it.
    _lib: libloading::Library,
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor, patch) = self.version();
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("version", &format_args!("{major}.{minor}.{patch}"))
            .finish()
    }
}

impl Library {
    /// Loads `vendor`'s library: the path in [`LIBRARY_ENV`] if set, else [`Vendor::library_names`].
    pub fn open(vendor: Vendor) -> Result<Arc<Library>> {
        match std::env::var_os(LIBRARY_ENV).filter(|v| !v.is_empty()) {
            Some(path) => Self::open_first(&[path]),
            None => Self::open_first(&vendor.library_names().iter().map(OsString::from).collect::<Vec<_>>()),
        }
    }

    /// Loads the library at `path` (a file name searched as `dlopen` does, or a path).
    pub fn open_path(path: impl AsRef<OsStr>) -> Result<Arc<Library>> {
        Self::open_first(&[path.as_ref().to_owned()])
    }

    /// The first of `candidates` that loads and has every entry point.
    fn open_first(candidates: &[OsString]) -> Result<Arc<Library>> {
        let mut tried = Vec::with_capacity(candidates.len());
        for name in candidates {
            let shown = name.to_string_lossy().into_owned();
            // SAFETY: loading runs the library's initialisers. A collective library's have no
            // preconditions; a library that is not one is refused below before anything is called.
            let lib = match unsafe { libloading::Library::new(name) } {
                Ok(lib) => lib,
                Err(e) => {
                    tried.push(format!("{shown}: {e}"));
                    continue;
                }
            };
            // SAFETY: a library that exports these names is NCCL or RCCL (or a shim of them),
            // whose symbols have the prototypes of `nccl.h` that `sys::Api` transcribes.
            let api = match unsafe { sys::Api::resolve(&lib) } {
                Ok(api) => api,
                Err(why) => {
                    tried.push(format!("{shown}: {why}"));
                    continue;
                }
            };
            let mut version: c_int = 0;
            // SAFETY: `ncclGetVersion` writes one int through a valid pointer.
            let code = unsafe { (api.get_version)(&mut version) };
            if code != sys::SUCCESS {
                tried.push(format!("{shown}: ncclGetVersion returned {code}"));
                continue;
            }
            return Ok(Arc::new(Library { api, path: shown, version, _lib: lib }));
        }
        let why = if candidates.len() == 1 {
            "the library could not be loaded".to_string()
        } else {
            "none of the candidate libraries could be loaded".to_string()
        };
        Err(Error::CollectiveUnavailable { tried, why })
    }

    /// The name or path it was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The raw `ncclGetVersion` code.
    pub fn version_code(&self) -> i32 {
        self.version
    }

    /// `(major, minor, patch)`, decoded as `nccl.h`'s `NCCL_VERSION` encodes it (`X*10000 + Y*100 + Z`
    /// since 2.9, `X*1000 + Y*100 + Z` before).
    pub fn version(&self) -> (u32, u32, u32) {
        decode_version(self.version)
    }

    /// The library's description of `code`.
    fn describe(&self, code: sys::NcclResult, comm: sys::RawComm) -> String {
        // SAFETY: `ncclGetErrorString` takes any code and returns a static NUL-terminated string
        // (or null, handled).
        let text = unsafe { c_string((self.api.get_error_string)(code)) };
        let last = match self.api.get_last_error {
            // SAFETY: `ncclGetLastError` accepts a null or live communicator and returns a
            // NUL-terminated string owned by the library (or null), read before any other call.
            Some(last_error) => unsafe { c_string(last_error(comm)) },
            None => String::new(),
        };
        match (text.is_empty(), last.is_empty()) {
            (_, true) => text,
            (true, false) => last,
            (false, false) => format!("{text}: {last}"),
        }
    }

    /// `Ok` for `ncclSuccess`, else [`Error::Collective`] naming `call`.
    fn check(&self, call: &'static str, code: sys::NcclResult, comm: sys::RawComm) -> Result<()> {
        if code == sys::SUCCESS {
            Ok(())
        } else {
            Err(Error::Collective { call, code, message: self.describe(code, comm) })
        }
    }
}

/// `NCCL_VERSION`'s encoding undone: `X*10000 + Y*100 + Z` since 2.9, `X*1000 + Y*100 + Z` before.
fn decode_version(code: i32) -> (u32, u32, u32) {
    let code = code.max(0) as u32;
    if code >= 10_000 {
        (code / 10_000, code / 100 % 100, code % 100)
    } else {
        (code / 1000, code / 100 % 10, code % 100)
    }
}

/// Reads a C string the library returned; empty for null.
///
/// # Safety
/// `ptr` must be null or point to a NUL-terminated string that stays valid during the call.
unsafe fn c_string(ptr: *const std::ffi::c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned()
}

/// The identity of a group about to be created: generated by one rank (rank 0), sent to every
/// other rank (through the caller's rendezvous), passed by all to [`Communicator::init_rank`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId([u8; UNIQUE_ID_BYTES]);

impl fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UniqueId(..)")
    }
}

impl UniqueId {
    /// A new id (`ncclGetUniqueId`: it also starts the library's bootstrap listener in this process).
    pub fn new(library: &Library) -> Result<UniqueId> {
        let mut raw = sys::RawUniqueId { internal: [0; UNIQUE_ID_BYTES] };
        // SAFETY: `ncclGetUniqueId` writes one `ncclUniqueId` through a valid pointer.
        let code = unsafe { (library.api.get_unique_id)(&mut raw) };
        library.check("ncclGetUniqueId", code, std::ptr::null_mut())?;
        Ok(UniqueId(raw.internal.map(|c| c as u8)))
    }

    /// The bytes to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; UNIQUE_ID_BYTES] {
        &self.0
    }

    /// An id received from another rank; [`Error::InvalidHandle`] if it is not 128 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<UniqueId> {
        let bytes: [u8; UNIQUE_ID_BYTES] = bytes.try_into().map_err(|_| {
            Error::InvalidHandle(format!("a collective unique id has {UNIQUE_ID_BYTES} bytes, got {}", bytes.len()))
        })?;
        Ok(UniqueId(bytes))
    }

    fn raw(&self) -> sys::RawUniqueId {
        sys::RawUniqueId { internal: self.0.map(|b| b as std::ffi::c_char) }
    }
}

/// One rank's communicator (`ncclComm_t`). An owned one is destroyed on drop (`ncclCommDestroy`,
/// or `ncclCommAbort` after a failure); a borrowed one ([`Communicator::from_raw`]) is left to its owner.
///
/// Not `Sync`: the library does not allow concurrent calls on one communicator.
pub struct Communicator {
    raw: sys::RawComm,
    rank: usize,
    world_size: usize,
    owned: bool,
    failed: bool,
    library: Arc<Library>,
}

// SAFETY: a communicator is a process-wide library object, usable from any thread (one at a time,
// which `&mut self` on every call that enqueues or queries ensures, and `!Sync` keeps).
unsafe impl Send for Communicator {}

impl fmt::Debug for Communicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("owned", &self.owned)
            .field("library", &self.library)
            .finish()
    }
}

impl Communicator {
    /// Joins the group `id` as `rank` of `world_size` (`ncclCommInitRank`). Blocks until every rank
    /// has joined; every rank must call it with the same id and world size, each from its own
    /// thread or process, with its device current ([`CollectiveBackend::make_current`]). NCCL
    /// refuses two ranks of one group on the same GPU.
    pub fn init_rank(library: &Arc<Library>, id: &UniqueId, rank: usize, world_size: usize) -> Result<Communicator> {
        if world_size == 0 || rank >= world_size || world_size > c_int::MAX as usize {
            return Err(Error::Collective {
                call: "ncclCommInitRank",
                code: -1,
                message: format!("rank {rank} of world size {world_size} is not a valid rank"),
            });
        }
        let mut raw: sys::RawComm = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the id is passed by value as `nccl.h` declares.
        let code = unsafe { (library.api.comm_init_rank)(&mut raw, world_size as c_int, id.raw(), rank as c_int) };
        library.check("ncclCommInitRank", code, raw)?;
        Ok(Communicator { raw, rank, world_size, owned: true, failed: false, library: library.clone() })
    }

    /// Wraps a communicator the caller created (e.g. an engine's process group), without taking
    /// ownership: it is not destroyed on drop. Rank and world size are read from it.
    ///
    /// # Safety
    /// `raw` must be a live `ncclComm_t` created by `library` (the same loaded copy: two copies of
    /// NCCL in one process do not share communicators), and it must outlive the returned value.
    /// The caller must not use it concurrently with the returned value.
    pub unsafe fn from_raw(library: &Arc<Library>, raw: *mut c_void) -> Result<Communicator> {
        let (mut count, mut rank): (c_int, c_int) = (0, 0);
        // SAFETY: `raw` is live (caller); both calls write one int through a valid pointer.
        let code = unsafe { (library.api.comm_count)(raw, &mut count) };
        library.check("ncclCommCount", code, raw)?;
        // SAFETY: as above.
        let code = unsafe { (library.api.comm_user_rank)(raw, &mut rank) };
        library.check("ncclCommUserRank", code, raw)?;
        Ok(Communicator {
            raw,
            rank: rank.max(0) as usize,
            world_size: count.max(0) as usize,
            owned: false,
            failed: false,
            library: library.clone(),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    /// Whether dropping it destroys the library's communicator.
    pub fn is_owned(&self) -> bool {
        self.owned
    }
    /// The library it calls.
    pub fn library(&self) -> &Arc<Library> {
        &self.library
    }
    /// The raw `ncclComm_t` (valid while `self` lives).
    pub fn as_raw(&self) -> *mut c_void {
        self.raw
    }

    /// Enqueues the sum over ranks of `count` elements of `dtype` at `send` into `recv` on
    /// `stream` (`ncclAllReduce` with `ncclSum`). Every rank must make the same call in the same
    /// order. A failure marks the communicator failed (it is aborted, not destroyed, on drop).
    ///
    /// # Safety
    /// `send` and `recv` must be device memory of the communicator's device valid for
    /// `count * dtype.size()` bytes until the stream has executed the call, either disjoint or equal
    /// (in place); `stream` must be a live stream of that device (`cudaStream_t` / `hipStream_t`).
    pub unsafe fn all_reduce_sum(
        &mut self,
        send: DevicePtr,
        recv: DevicePtr,
        count: usize,
        dtype: DType,
        stream: *mut c_void,
    ) -> Result<()> {
        let datatype = match dtype {
            DType::Bf16 => sys::BFLOAT16,
            DType::F16 => sys::FLOAT16,
            DType::F32 => sys::FLOAT32,
        };
        // SAFETY: the communicator is live (owned, or guaranteed by `from_raw`'s caller); the
        // addresses and the stream are guaranteed by this function's caller.
        let code = unsafe {
            (self.library.api.all_reduce)(
                send.0 as *const c_void,
                recv.0 as *mut c_void,
                count,
                datatype,
                sys::SUM,
                self.raw,
                stream,
            )
        };
        let res = self.library.check("ncclAllReduce", code, self.raw);
        self.failed |= res.is_err();
        res
    }

    /// An error the library recorded asynchronously (a peer gone, a network failure), as
    /// `ncclCommGetAsyncError` reports it; `Ok` while none (or while a non-blocking call is still
    /// in progress). After an error the communicator is aborted on drop.
    pub fn async_error(&mut self) -> Result<()> {
        let mut state: sys::NcclResult = sys::SUCCESS;
        // SAFETY: the communicator is live; one int is written through a valid pointer.
        let code = unsafe { (self.library.api.comm_get_async_error)(self.raw, &mut state) };
        self.library.check("ncclCommGetAsyncError", code, self.raw)?;
        if state == sys::SUCCESS || state == sys::IN_PROGRESS {
            return Ok(());
        }
        self.failed = true;
        Err(Error::Collective {
            call: "ncclCommGetAsyncError",
            code: state,
            message: self.library.describe(state, self.raw),
        })
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if !self.owned || self.raw.is_null() {
            return;
        }
        let api = &self.library.api;
        let teardown = if self.failed { api.comm_abort } else { api.comm_destroy };
        // SAFETY: the communicator is owned and live, and destroyed exactly once, here. A failure
        // cannot be reported from `drop`; the library has released what it could.
        let _ = unsafe { teardown(self.raw) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bogus_path_is_a_clear_error() {
        let path = "/nonexistent/arfuse/libnccl-bogus.so.2";
        let err = Library::open_path(path).expect_err("no library there");
        let text = err.to_string();
        match &err {
            Error::CollectiveUnavailable { tried, .. } => {
                assert_eq!(tried.len(), 1, "{tried:?}");
                assert!(tried[0].starts_with(path), "{tried:?}");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(text.contains(path) && text.contains("unavailable"), "{text}");
    }

    #[test]
    fn a_library_that_is_not_nccl_is_refused_naming_the_symbol() {
        // The C library loads everywhere this crate builds, and exports none of NCCL's names.
        let err = Library::open_path("libc.so.6").expect_err("libc is no collective library");
        let text = err.to_string();
        assert!(text.contains("libc.so.6") && text.contains("ncclGetVersion"), "{text}");
    }

    /// Where the library is installed (or named by `ARFUSE_NCCL_LIBRARY`), the binding works
    /// without a GPU: the version, and a unique id (NCCL's bootstrap needs no device). Skips loudly
    /// elsewhere.
    #[test]
    fn the_installed_library_loads_and_makes_unique_ids() {
        let library = match Library::open(Vendor::Nccl).or_else(|_| Library::open(Vendor::Rccl)) {
            Ok(library) => library,
            Err(e) => {
                arfuse_testkit::require_backend(
                    "nccl",
                    "collective::tests::the_installed_library_loads_and_makes_unique_ids",
                    Err(e),
                );
                return;
            }
        };
        let (major, minor, _) = library.version();
        assert!(major >= 2 && minor < 100, "{library:?}");
        match UniqueId::new(&library) {
            Ok(a) => {
                let b = UniqueId::new(&library).expect("a second id");
                assert_ne!(a, b, "two ids of one process must differ");
                // A group of one on the current device: created and destroyed where there is a GPU,
                // a typed error naming the call where there is none.
                match Communicator::init_rank(&library, &a, 0, 1) {
                    Ok(comm) => assert_eq!((comm.rank(), comm.world_size(), comm.is_owned()), (0, 1, true)),
                    Err(e @ Error::Collective { call: "ncclCommInitRank", .. }) => {
                        println!("no communicator here: {e}")
                    }
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            // Some builds initialise CUDA in `ncclGetUniqueId`; without a driver that is a typed error.
            Err(e @ Error::Collective { call: "ncclGetUniqueId", .. }) => println!("no unique id here: {e}"),
            Err(e) => panic!("unexpected {e:?}"),
        }
        println!("{library:?}");
    }

    #[test]
    fn default_names_are_the_versioned_ones_first() {
        assert_eq!(Vendor::Nccl.library_names(), ["libnccl.so.2", "libnccl.so"]);
        assert_eq!(Vendor::Rccl.library_names(), ["librccl.so.1", "librccl.so"]);
    }

    #[test]
    fn unique_id_round_trips_and_refuses_other_lengths() {
        let bytes: Vec<u8> = (0..UNIQUE_ID_BYTES as u8).collect();
        let id = UniqueId::from_bytes(&bytes).expect("128 bytes");
        assert_eq!(&id.as_bytes()[..], &bytes[..]);
        assert!(matches!(UniqueId::from_bytes(&bytes[1..]), Err(Error::InvalidHandle(_))));
        // The C struct is exactly the bytes.
        assert_eq!(std::mem::size_of::<sys::RawUniqueId>(), UNIQUE_ID_BYTES);
        assert_eq!(id.raw().internal.map(|c| c as u8), *id.as_bytes());
    }

    #[test]
    fn version_codes_decode_both_encodings() {
        assert_eq!(decode_version(22_703), (2, 27, 3));
        assert_eq!(decode_version(2804), (2, 8, 4));
    }
}

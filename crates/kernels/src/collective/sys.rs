//! The C interface of `nccl.h` (and RCCL's copy of it) that [`super`] uses: types, the enum
//! values, and the table of entry points resolved from the loaded library.
//!
//! Enums travel as `c_int` (a C enum is an `int` here), never as Rust enums: a library newer than
//! this table may return a code it lacks, which must be data, not undefined behaviour.

use std::ffi::{c_char, c_int, c_void};

/// `ncclResult_t`.
pub(super) type NcclResult = c_int;
/// `ncclSuccess`.
pub(super) const SUCCESS: NcclResult = 0;
/// `ncclInProgress` (a non-blocking communicator still initialising or finishing a call).
pub(super) const IN_PROGRESS: NcclResult = 7;

/// `ncclComm_t`, an opaque pointer.
pub(super) type RawComm = *mut c_void;

/// `ncclRedOp_t::ncclSum`.
pub(super) const SUM: c_int = 0;
/// `ncclDataType_t::ncclFloat16` (`ncclHalf`).
pub(super) const FLOAT16: c_int = 6;
/// `ncclDataType_t::ncclFloat32` (`ncclFloat`).
pub(super) const FLOAT32: c_int = 7;
/// `ncclDataType_t::ncclBfloat16` (NCCL >= 2.10; RCCL has the same value).
pub(super) const BFLOAT16: c_int = 9;

/// `NCCL_UNIQUE_ID_BYTES`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: `struct { char internal[NCCL_UNIQUE_ID_BYTES]; }`, passed by value to
/// `ncclCommInitRank`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct RawUniqueId {
    pub(super) internal: [c_char; UNIQUE_ID_BYTES],
}

/// The entry points, resolved once per loaded library. Each type is the C prototype of `nccl.h`.
#[derive(Clone, Copy)]
pub(super) struct Api {
    /// `ncclResult_t ncclGetVersion(int* version)`.
    pub(super) get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    /// `ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId)`.
    pub(super) get_unique_id: unsafe extern "C" fn(*mut RawUniqueId) -> NcclResult,
    /// `ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank)`.
    pub(super) comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, RawUniqueId, c_int) -> NcclResult,
    /// `ncclResult_t ncclCommDestroy(ncclComm_t comm)`.
    pub(super) comm_destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    /// `ncclResult_t ncclCommAbort(ncclComm_t comm)`.
    pub(super) comm_abort: unsafe extern "C" fn(RawComm) -> NcclResult,
    /// `ncclResult_t ncclCommCount(const ncclComm_t comm, int* count)`.
    pub(super) comm_count: unsafe extern "C" fn(RawComm, *mut c_int) -> NcclResult,
    /// `ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank)`.
    pub(super) comm_user_rank: unsafe extern "C" fn(RawComm, *mut c_int) -> NcclResult,
    /// `ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* asyncError)`.
    pub(super) comm_get_async_error: unsafe extern "C" fn(RawComm, *mut NcclResult) -> NcclResult,
    /// `ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
    /// ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream)`.
    pub(super) all_reduce:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, *mut c_void) -> NcclResult,
    /// `const char* ncclGetErrorString(ncclResult_t result)`.
    pub(super) get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    /// `const char* ncclGetLastError(ncclComm_t comm)` (NCCL >= 2.13; absent from older libraries).
    pub(super) get_last_error: Option<unsafe extern "C" fn(RawComm) -> *const c_char>,
}

impl Api {
    /// Resolves every entry point of `lib`; `Err(name)` names the first required symbol missing.
    ///
    /// # Safety
    /// `lib` must be an NCCL-compatible library: every symbol of these names must have the C
    /// prototype written on its field.
    pub(super) unsafe fn resolve(lib: &libloading::Library) -> Result<Api, String> {
        macro_rules! required {
            ($name:literal) => {{
                // SAFETY: the caller guarantees that the symbol has the field's prototype; the
                // pointer is copied out and used only while `lib` stays loaded (the `Library`
                // that holds this table also holds `lib`).
                let symbol = unsafe { lib.get(concat!($name, "\0").as_bytes()) };
                *symbol.map_err(|e| format!("symbol {} missing: {e}", $name))?
            }};
        }
        // SAFETY: as in `required!`; an absent symbol is `None`.
        let get_last_error = unsafe { lib.get(b"ncclGetLastError\0") }.ok().map(|s| *s);
        Ok(Api {
            get_version: required!("ncclGetVersion"),
            get_unique_id: required!("ncclGetUniqueId"),
            comm_init_rank: required!("ncclCommInitRank"),
            comm_destroy: required!("ncclCommDestroy"),
            comm_abort: required!("ncclCommAbort"),
            comm_count: required!("ncclCommCount"),
            comm_user_rank: required!("ncclCommUserRank"),
            comm_get_async_error: required!("ncclCommGetAsyncError"),
            all_reduce: required!("ncclAllReduce"),
            get_error_string: required!("ncclGetErrorString"),
            get_last_error,
        })
    }
}

//! The `sys` level of the hip backend (cudarc's `sys` → `result` → safe types): the C interface of
//! the HIP runtime and of hipRTC as this backend declares it — the runtime's entry points, the
//! status, attribute and flag numbers, and the table of hipRTC entry points resolved at run time.
//! Nothing here is called directly except through [`super::result`].
//!
//! # What `hip-runtime-sys` is used for, and why the entry points are declared here
//! `hip-runtime-sys` (0.1.2, the dependency our user chose) does two jobs for this backend: its
//! build script finds and links `libamdhip64` (`links = "amdhip64"`), and it provides the
//! ABI-stable opaque types re-exported below (stream, event, graph, module and function handles,
//! the 64-byte IPC handle). Its functions are not called: its bindings (generated from HIP 5.4)
//! return `hipError_t` as a Rust `enum`, and a runtime newer than those headers may return a code
//! the enum lacks; reading an integer that is no variant of a Rust enum is undefined behaviour —
//! not a wrong error message, but licence for the optimiser to assume it cannot happen. So the ~40
//! functions used are declared once more below with the C ABI's view of an enum (a 32-bit
//! integer), enum *parameters* (device attributes, copy kinds, capture modes) likewise pass as
//! `c_int` with our own constants, and the unit tests compare those constants with the bindings'
//! enums (so a `hip-bindgen` build on a ROCm host checks them against that host's headers).
//!
//! Every function declared here exists, with this signature, in HIP 5.2 (Debian's
//! `libamdhip64.so.5`, checked with `nm -D`), and in ROCm 6.x/7.x (`hip_runtime_api.h`): the
//! binary is linked with full RELRO (`-z now`), so one missing symbol would stop it loading.
//! `hipGetDeviceProperties` is deliberately absent: `hipDeviceProp_t` changed layout in ROCm 6.
//!
//! hipRTC is not linked: it is a separate library since ROCm 6 (`libhiprtc.so.6`/`.7`) and lived
//! inside `libamdhip64` before. [`RtcApi`] is its table of entry points, resolved from the library
//! [`super::result::rtc`] finds at run time, as `collective/` resolves NCCL's.

use std::ffi::{c_char, c_int, c_uint, c_void};

pub(crate) use hip_runtime_sys::{
    hipEvent_t, hipFunction_t, hipGraphExec_t, hipGraphNode_t, hipGraph_t, hipIpcMemHandle_t, hipModule_t, hipStream_t,
};

#[link(name = "amdhip64", kind = "dylib")]
extern "C" {
    pub(super) fn hipInit(flags: c_uint) -> c_int;
    pub(super) fn hipGetDeviceCount(count: *mut c_int) -> c_int;
    pub(super) fn hipSetDevice(device: c_int) -> c_int;
    pub(super) fn hipDeviceGetAttribute(value: *mut c_int, attribute: c_int, device: c_int) -> c_int;
    pub(super) fn hipDeviceGetName(name: *mut c_char, len: c_int, device: c_int) -> c_int;
    pub(super) fn hipRuntimeGetVersion(version: *mut c_int) -> c_int;
    pub(super) fn hipGetErrorName(code: c_int) -> *const c_char;
    pub(super) fn hipGetErrorString(code: c_int) -> *const c_char;
    pub(super) fn hipDeviceCanAccessPeer(can_access: *mut c_int, device: c_int, peer: c_int) -> c_int;
    pub(super) fn hipDeviceEnablePeerAccess(peer: c_int, flags: c_uint) -> c_int;

    pub(super) fn hipMalloc(ptr: *mut *mut c_void, bytes: usize) -> c_int;
    pub(super) fn hipExtMallocWithFlags(ptr: *mut *mut c_void, bytes: usize, flags: c_uint) -> c_int;
    pub(super) fn hipFree(ptr: *mut c_void) -> c_int;
    pub(super) fn hipMemset(dst: *mut c_void, value: c_int, bytes: usize) -> c_int;
    pub(super) fn hipMemGetInfo(free: *mut usize, total: *mut usize) -> c_int;
    pub(super) fn hipMemcpyAsync(
        dst: *mut c_void,
        src: *const c_void,
        bytes: usize,
        kind: c_int,
        stream: hipStream_t,
    ) -> c_int;
    pub(super) fn hipMemcpyDtoHAsync(dst: *mut c_void, src: *mut c_void, bytes: usize, stream: hipStream_t) -> c_int;
    pub(super) fn hipMemcpyHtoDAsync(dst: *mut c_void, src: *mut c_void, bytes: usize, stream: hipStream_t) -> c_int;

    pub(super) fn hipIpcGetMemHandle(handle: *mut hipIpcMemHandle_t, ptr: *mut c_void) -> c_int;
    pub(super) fn hipIpcOpenMemHandle(ptr: *mut *mut c_void, handle: hipIpcMemHandle_t, flags: c_uint) -> c_int;
    pub(super) fn hipIpcCloseMemHandle(ptr: *mut c_void) -> c_int;

    pub(super) fn hipStreamCreateWithFlags(stream: *mut hipStream_t, flags: c_uint) -> c_int;
    pub(super) fn hipStreamDestroy(stream: hipStream_t) -> c_int;
    pub(super) fn hipStreamSynchronize(stream: hipStream_t) -> c_int;
    pub(super) fn hipStreamBeginCapture(stream: hipStream_t, mode: c_int) -> c_int;
    pub(super) fn hipStreamEndCapture(stream: hipStream_t, graph: *mut hipGraph_t) -> c_int;

    pub(super) fn hipEventCreate(event: *mut hipEvent_t) -> c_int;
    pub(super) fn hipEventRecord(event: hipEvent_t, stream: hipStream_t) -> c_int;
    pub(super) fn hipEventQuery(event: hipEvent_t) -> c_int;
    pub(super) fn hipEventSynchronize(event: hipEvent_t) -> c_int;
    pub(super) fn hipEventElapsedTime(ms: *mut f32, start: hipEvent_t, stop: hipEvent_t) -> c_int;
    pub(super) fn hipEventDestroy(event: hipEvent_t) -> c_int;

    pub(super) fn hipGraphInstantiate(
        exec: *mut hipGraphExec_t,
        graph: hipGraph_t,
        error_node: *mut hipGraphNode_t,
        log: *mut c_char,
        log_size: usize,
    ) -> c_int;
    pub(super) fn hipGraphLaunch(exec: hipGraphExec_t, stream: hipStream_t) -> c_int;
    pub(super) fn hipGraphExecDestroy(exec: hipGraphExec_t) -> c_int;
    pub(super) fn hipGraphDestroy(graph: hipGraph_t) -> c_int;

    pub(super) fn hipModuleLoadData(module: *mut hipModule_t, image: *const c_void) -> c_int;
    pub(super) fn hipModuleUnload(module: hipModule_t) -> c_int;
    pub(super) fn hipModuleGetFunction(function: *mut hipFunction_t, module: hipModule_t, name: *const c_char)
        -> c_int;
    pub(super) fn hipModuleLaunchKernel(
        function: hipFunction_t,
        grid_x: c_uint,
        grid_y: c_uint,
        grid_z: c_uint,
        block_x: c_uint,
        block_y: c_uint,
        block_z: c_uint,
        shared_bytes: c_uint,
        stream: hipStream_t,
        params: *mut *mut c_void,
        extra: *mut *mut c_void,
    ) -> c_int;
}

// ---- status codes, attributes, flags ------------------------------------------------------------

/// The `hipError_t` codes this backend tests for. The values are fixed in the header (`= N`), the
/// same in HIP 5.x, 6.x and 7.x; the unit tests compare them with `hip-runtime-sys`.
pub(crate) mod code {
    /// `hipSuccess`.
    pub(crate) const SUCCESS: i32 = 0;
    /// `hipErrorInvalidValue`.
    pub(crate) const INVALID_VALUE: i32 = 1;
    /// `hipErrorOutOfMemory`.
    pub(crate) const OUT_OF_MEMORY: i32 = 2;
    /// `hipErrorNoDevice`: what `hipGetDeviceCount` returns on a machine without a GPU.
    pub(crate) const NO_DEVICE: i32 = 100;
    /// `hipErrorInvalidDevice`: what `hipInit` returns on a machine without a GPU (HIP 5.2).
    pub(crate) const INVALID_DEVICE: i32 = 101;
    /// `hipErrorPeerAccessUnsupported`.
    pub(crate) const PEER_ACCESS_UNSUPPORTED: i32 = 217;
    /// `hipErrorNotFound` (e.g. a function the module does not define).
    pub(crate) const NOT_FOUND: i32 = 500;
    /// `hipErrorNotReady`: an event or stream query whose work is still running.
    pub(crate) const NOT_READY: i32 = 600;
    /// `hipErrorPeerAccessAlreadyEnabled`: counts as success.
    pub(crate) const PEER_ACCESS_ALREADY_ENABLED: i32 = 704;
    /// `hipErrorStreamCaptureInvalidated`.
    pub(crate) const STREAM_CAPTURE_INVALIDATED: i32 = 901;
}

/// `hipDeviceAttribute_t` numbers. The enum is implicitly numbered; these positions are the same
/// in HIP 5.2, 5.4, 6.0–6.2 and ROCm 7 (`rocm-systems` `hip_runtime_api.h`): entries were only
/// renamed (`Name`→`Unused1`, `Uuid`→`Unused2`) or appended after `WarpSize`. The unit tests compare
/// them with `hip-runtime-sys`.
pub(crate) mod attr {
    /// `hipDeviceAttributeComputeCapabilityMajor` (the ISA major on AMD: 9 for gfx9xx).
    pub(crate) const COMPUTE_CAPABILITY_MAJOR: i32 = 23;
    /// `hipDeviceAttributeComputeCapabilityMinor` (the ISA minor: 4 for gfx942, 5 for gfx950).
    pub(crate) const COMPUTE_CAPABILITY_MINOR: i32 = 61;
    /// `hipDeviceAttributeMultiprocessorCount`: compute units.
    pub(crate) const MULTIPROCESSOR_COUNT: i32 = 63;
    /// `hipDeviceAttributePciBusId`.
    pub(crate) const PCI_BUS_ID: i32 = 67;
    /// `hipDeviceAttributePciDeviceId` (the PCI device/slot number, not the product id).
    pub(crate) const PCI_DEVICE_ID: i32 = 68;
    /// `hipDeviceAttributePciDomainID`.
    pub(crate) const PCI_DOMAIN_ID: i32 = 69;
    /// `hipDeviceAttributeMaxSharedMemoryPerBlock`: LDS bytes a block may use.
    pub(crate) const MAX_SHARED_MEMORY_PER_BLOCK: i32 = 74;
    /// `hipDeviceAttributeWarpSize`: 64 on gfx9 (CDNA), 32 on RDNA.
    pub(crate) const WARP_SIZE: i32 = 87;
}

/// Flag and enum values passed as integers (see the module documentation: enum parameters pass as `c_int`).
pub(crate) mod flags {
    /// `hipStreamNonBlocking`: the stream does not synchronise with the null stream.
    pub(crate) const STREAM_NON_BLOCKING: u32 = 0x1;
    /// `hipDeviceMallocUncached` (HIP ≥ 5.5): fine-grained memory the GPU does not cache, where
    /// AITER keeps its cross-GPU flags.
    pub(crate) const DEVICE_MALLOC_UNCACHED: u32 = 0x3;
    /// `hipMemcpyDeviceToDevice` (`hipMemcpyKind`, explicitly numbered in every version).
    pub(crate) const MEMCPY_DEVICE_TO_DEVICE: i32 = 3;
    /// `hipStreamCaptureModeThreadLocal` (`hipStreamCaptureMode`, explicitly numbered).
    pub(crate) const CAPTURE_MODE_THREAD_LOCAL: i32 = 1;

    /// `hipIpcMemLazyEnablePeerAccess` as the loaded runtime expects it: the header defined it as
    /// `0` up to HIP 5.7 and as `0x01` from 6.0, and the runtime checks
    /// `flags != hipIpcMemLazyEnablePeerAccess` (clr `hip_memory.cpp`, 5.6 to 6.2).
    pub(crate) fn ipc_lazy_enable_peer_access(runtime_major: i32) -> u32 {
        if runtime_major >= 6 {
            0x1
        } else {
            0x0
        }
    }
}

// ---- hipRTC --------------------------------------------------------------------------------------

/// `hiprtcResult`: `HIPRTC_SUCCESS`.
pub(crate) const RTC_SUCCESS: c_int = 0;

/// An opaque `hiprtcProgram`.
pub(crate) type RtcProgram = *mut c_void;

/// The hipRTC entry points, resolved once per loaded library. Each type is the C prototype of
/// `hiprtc.h` (unchanged from ROCm 4 to 7); enum results and parameters are C `int`s.
#[derive(Clone, Copy)]
pub(crate) struct RtcApi {
    /// `hiprtcResult hiprtcCreateProgram(hiprtcProgram* prog, const char* src, const char* name,
    /// int numHeaders, const char** headers, const char** includeNames)`.
    pub(crate) create_program: unsafe extern "C" fn(
        *mut RtcProgram,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    /// `hiprtcResult hiprtcCompileProgram(hiprtcProgram prog, int numOptions, const char** options)`.
    pub(crate) compile_program: unsafe extern "C" fn(RtcProgram, c_int, *const *const c_char) -> c_int,
    /// `hiprtcResult hiprtcGetProgramLogSize(hiprtcProgram prog, size_t* logSizeRet)`.
    pub(crate) get_program_log_size: unsafe extern "C" fn(RtcProgram, *mut usize) -> c_int,
    /// `hiprtcResult hiprtcGetProgramLog(hiprtcProgram prog, char* log)`.
    pub(crate) get_program_log: unsafe extern "C" fn(RtcProgram, *mut c_char) -> c_int,
    /// `hiprtcResult hiprtcGetCodeSize(hiprtcProgram prog, size_t* codeSizeRet)`.
    pub(crate) get_code_size: unsafe extern "C" fn(RtcProgram, *mut usize) -> c_int,
    /// `hiprtcResult hiprtcGetCode(hiprtcProgram prog, char* code)`.
    pub(crate) get_code: unsafe extern "C" fn(RtcProgram, *mut c_char) -> c_int,
    /// `hiprtcResult hiprtcDestroyProgram(hiprtcProgram* prog)`.
    pub(crate) destroy_program: unsafe extern "C" fn(*mut RtcProgram) -> c_int,
    /// `const char* hiprtcGetErrorString(hiprtcResult result)`.
    pub(crate) get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

impl RtcApi {
    /// Resolves every entry point of `lib`; `Err` names the first symbol missing.
    ///
    /// # Safety
    /// `lib` must be a hipRTC library: every symbol of these names must have the C prototype
    /// written on its field.
    pub(crate) unsafe fn resolve(lib: &libloading::Library) -> Result<RtcApi, String> {
        macro_rules! symbol {
            ($name:literal) => {{
                // SAFETY: the caller guarantees that the symbol has the field's prototype; the
                // pointer is copied out and used only while `lib` stays loaded (the `Rtc` that
                // holds this table also holds `lib`, and is never dropped).
                let symbol = unsafe { lib.get(concat!($name, "\0").as_bytes()) };
                *symbol.map_err(|e| format!("no symbol {}: {e}", $name))?
            }};
        }
        Ok(RtcApi {
            create_program: symbol!("hiprtcCreateProgram"),
            compile_program: symbol!("hiprtcCompileProgram"),
            get_program_log_size: symbol!("hiprtcGetProgramLogSize"),
            get_program_log: symbol!("hiprtcGetProgramLog"),
            get_code_size: symbol!("hiprtcGetCodeSize"),
            get_code: symbol!("hiprtcGetCode"),
            destroy_program: symbol!("hiprtcDestroyProgram"),
            get_error_string: symbol!("hiprtcGetErrorString"),
        })
    }
}

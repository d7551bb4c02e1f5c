//! Thin, checked wrappers over the HIP runtime and hipRTC calls this backend makes (the `result`
//! level of cudarc's three: `sys` → `result` → safe types); the only file of the backend that calls
//! into either library, through the declarations of [`super::sys`].
//!
//! Each function makes one call (or a fixed pair, such as a size query and a fetch) and turns its
//! status into [`Error::Driver`] naming the call, with the runtime's own name and description of
//! the code (`hipGetErrorName`, `hipGetErrorString`; a code the runtime does not know is reported
//! by number). Grouped by subject. Nothing here owns anything; the RAII types of the sibling
//! modules do. hipRTC is found at run time ([`rtc`]), next to the HIP runtime first.

use super::sys;
use crate::{BackendKind, Error, Result};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::OnceLock;

// ---- status codes -----------------------------------------------------------------------------

pub(crate) use super::sys::{attr, code, flags};

/// A static, NUL-terminated string from the runtime, or `None` for a null pointer.
///
/// # Safety
/// `text` must be null or point to a NUL-terminated string that lives for the whole process.
unsafe fn static_str(text: *const c_char) -> Option<String> {
    // SAFETY: guaranteed by the caller.
    (!text.is_null()).then(|| unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned())
}

/// The runtime's own description of `code` (`hipGetErrorString`), if it has one beyond "unknown"
/// (HIP 5.2 answers an unknown code with "hipErrorUnknown", clr 6.x with "unknown error").
fn runtime_description(code: i32) -> Option<String> {
    // SAFETY: `hipGetErrorString` takes any integer (its `switch` has a default case that returns
    // a static "unknown error") and returns a pointer to a static string; it does not initialise
    // the runtime.
    let text = unsafe { static_str(sys::hipGetErrorString(code)) }?;
    let unknown = text.is_empty() || text == "unknown error" || (text == "hipErrorUnknown" && code != 999);
    (!unknown).then_some(text)
}

/// The runtime's name for `code` (`hipGetErrorName`, e.g. `hipErrorOutOfMemory`), or `None` for a
/// code the loaded runtime does not know.
pub(crate) fn code_name(code: i32) -> Option<String> {
    // SAFETY: as for `hipGetErrorString` (default case: a static "hipErrorUnknown").
    let name = unsafe { static_str(sys::hipGetErrorName(code)) }?;
    (name != "hipErrorUnknown" || code == 999).then_some(name)
}

/// How a status code reads in an error message: the runtime's name, or a sentence with the number
/// for a code the runtime does not know.
pub(crate) fn describe_code(code: i32) -> String {
    code_name(code).unwrap_or_else(|| format!("HIP status {code} (unknown to the loaded runtime)"))
}

/// The error of `call` that returned `code`.
pub(crate) fn error(call: &'static str, code: i32) -> Error {
    let name = describe_code(code);
    let message = match runtime_description(code) {
        Some(text) => format!("{name}: {text}"),
        None => name,
    };
    Error::Driver { backend: BackendKind::Hip, call, code, message }
}

/// `Ok` for `hipSuccess`, else the error of `call`.
pub(crate) fn check(call: &'static str, code: i32) -> Result<()> {
    if code == code::SUCCESS {
        Ok(())
    } else {
        Err(error(call, code))
    }
}

/// `hipInit(0)`, once per process; later calls return the first status again (0 on success).
pub(crate) fn init() -> i32 {
    static INIT: OnceLock<i32> = OnceLock::new();
    // SAFETY: `hipInit` takes flags that must be 0 and may be called from any thread.
    *INIT.get_or_init(|| unsafe { sys::hipInit(0) })
}

/// `hipRuntimeGetVersion`: `HIP_VERSION` of the loaded runtime, `major * 10_000_000 +
/// minor * 100_000 + patch` (e.g. 50221153 for Debian's 5.2.21153). Works without a device.
pub(crate) fn runtime_version() -> Result<i32> {
    let mut version: c_int = 0;
    // SAFETY: the out-pointer is a live local.
    check("hipRuntimeGetVersion", unsafe { sys::hipRuntimeGetVersion(&mut version) })?;
    Ok(version)
}

/// `(major, minor, patch)` of a `HIP_VERSION` number.
pub(crate) fn split_version(version: i32) -> (i32, i32, i32) {
    (version / 10_000_000, (version / 100_000) % 100, version % 100_000)
}

/// The file the HIP runtime was loaded from (`dladdr` of `hipInit`), e.g.
/// `/opt/rocm/lib/libamdhip64.so.6`. hipRTC is looked for beside it first.
pub(crate) fn runtime_library_path() -> Option<PathBuf> {
    let symbol = sys::hipInit as unsafe extern "C" fn(c_uint) -> c_int;
    object_file(symbol as *const c_void)
}

/// The shared object that contains `address` (`dladdr`), with symbolic links resolved.
fn object_file(address: *const c_void) -> Option<PathBuf> {
    let mut info = MaybeUninit::<libc::Dl_info>::uninit();
    // SAFETY: `dladdr` only compares the address with the loaded objects and fills the out-struct.
    let found = unsafe { libc::dladdr(address, info.as_mut_ptr()) };
    if found == 0 {
        return None;
    }
    // SAFETY: `dladdr` succeeded, so it filled the struct.
    let info = unsafe { info.assume_init() };
    // SAFETY: `dli_fname` is null or a NUL-terminated path owned by the loader while the object is
    // loaded; every caller passes the address of a library that is never unloaded (the linked
    // runtime, or a hipRTC that is never closed), and the string is copied at once.
    let path = unsafe { static_str(info.dli_fname) }?;
    let path = PathBuf::from(path);
    Some(std::fs::canonicalize(&path).unwrap_or(path))
}

/// Device queries and selection (`hipGetDeviceCount`, `hipSetDevice`, `hipDeviceGet*`).
pub(crate) mod device {
    use super::*;

    /// `hipGetDeviceCount` with its raw status (for telling "no device" from a broken runtime).
    pub(crate) fn count_raw() -> (i32, usize) {
        let mut count: c_int = 0;
        // SAFETY: the out-pointer is a live local.
        let status = unsafe { sys::hipGetDeviceCount(&mut count) };
        (status, count.max(0) as usize)
    }

    /// `hipSetDevice`: makes `ordinal` the calling thread's current device.
    pub(crate) fn set(ordinal: usize) -> Result<()> {
        // SAFETY: plain value argument; the runtime validates the ordinal.
        check("hipSetDevice", unsafe { sys::hipSetDevice(ordinal as c_int) })
    }

    /// `hipDeviceGetAttribute` with one of the [`attr`] numbers.
    pub(crate) fn attribute(ordinal: usize, attribute: i32) -> Result<i32> {
        let mut value: c_int = 0;
        // SAFETY: the out-pointer is a live local; the runtime validates attribute and ordinal
        // (an attribute it does not know is `hipErrorInvalidValue`).
        check("hipDeviceGetAttribute", unsafe { sys::hipDeviceGetAttribute(&mut value, attribute, ordinal as c_int) })?;
        Ok(value)
    }

    /// `hipDeviceGetName`.
    pub(crate) fn name(ordinal: usize) -> Result<String> {
        let mut name = [0 as c_char; 256];
        // SAFETY: the runtime writes at most `len` bytes, NUL included, into the live buffer.
        check("hipDeviceGetName", unsafe {
            sys::hipDeviceGetName(name.as_mut_ptr(), name.len() as c_int, ordinal as c_int)
        })?;
        let bytes: Vec<u8> = name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    }

    /// `hipDeviceCanAccessPeer`: whether `ordinal` can map memory of `peer`.
    pub(crate) fn can_access_peer(ordinal: usize, peer: usize) -> Result<bool> {
        let mut can: c_int = 0;
        // SAFETY: the out-pointer is a live local; the runtime validates both ordinals.
        check("hipDeviceCanAccessPeer", unsafe {
            sys::hipDeviceCanAccessPeer(&mut can, ordinal as c_int, peer as c_int)
        })?;
        Ok(can != 0)
    }

    /// `hipDeviceEnablePeerAccess` from the current device to `peer`; "already enabled" is success.
    pub(crate) fn enable_peer_access(peer: usize) -> Result<()> {
        // SAFETY: plain value arguments (flags must be 0).
        match unsafe { sys::hipDeviceEnablePeerAccess(peer as c_int, 0) } {
            code::SUCCESS | code::PEER_ACCESS_ALREADY_ENABLED => Ok(()),
            status => Err(error("hipDeviceEnablePeerAccess", status)),
        }
    }
}

/// Device memory (`hipMalloc`, `hipExtMallocWithFlags`, `hipFree`, `hipMemset`, `hipMemcpy*`).
pub(crate) mod mem {
    use super::*;

    /// `hipMalloc`: plain (coarse-grained) device memory on the current device.
    pub(crate) fn malloc(bytes: usize) -> Result<u64> {
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: the out-pointer is a live local.
        check("hipMalloc", unsafe { sys::hipMalloc(&mut ptr, bytes) })?;
        Ok(ptr as u64)
    }

    /// `hipMemGetInfo`: free and total memory of the current device, in bytes.
    pub(crate) fn info() -> Result<(usize, usize)> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: the out-pointers are live locals.
        check("hipMemGetInfo", unsafe { sys::hipMemGetInfo(&mut free, &mut total) })?;
        Ok((free, total))
    }

    /// `hipExtMallocWithFlags` on the current device.
    pub(crate) fn ext_malloc_with_flags(bytes: usize, flags: u32) -> Result<u64> {
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: the out-pointer is a live local; the runtime validates the flags.
        check("hipExtMallocWithFlags", unsafe { sys::hipExtMallocWithFlags(&mut ptr, bytes, flags) })?;
        Ok(ptr as u64)
    }

    /// `hipFree`. The runtime first waits for every stream of the device the memory belongs to
    /// (clr `ihipFree`: `SyncAllStreams`).
    ///
    /// # Safety
    /// `ptr` must come from [`malloc`] or [`ext_malloc_with_flags`], not be freed yet, and no
    /// queued work may still use it.
    pub(crate) unsafe fn free(ptr: u64) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipFree", unsafe { sys::hipFree(ptr as *mut c_void) })
    }

    /// `hipMemset` (synchronous: done on return) followed by a synchronisation of the null stream,
    /// which waits for no non-blocking stream (a peer's spinning kernel included).
    ///
    /// # Safety
    /// `ptr` must be device memory valid for `bytes` bytes.
    pub(crate) unsafe fn memset_sync(ptr: u64, value: u8, bytes: usize) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipMemset", unsafe { sys::hipMemset(ptr as *mut c_void, c_int::from(value), bytes) })?;
        // SAFETY: the null stream is always valid.
        check("hipStreamSynchronize", unsafe { sys::hipStreamSynchronize(std::ptr::null_mut()) })
    }

    /// `hipMemcpyAsync` device to device (peer memory included: unified addressing).
    ///
    /// # Safety
    /// Both ranges must be valid for `bytes` bytes until the stream executes the copy.
    pub(crate) unsafe fn copy_dtod_async(dst: u64, src: u64, bytes: usize, stream: sys::hipStream_t) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipMemcpyAsync", unsafe {
            sys::hipMemcpyAsync(dst as *mut c_void, src as *const c_void, bytes, flags::MEMCPY_DEVICE_TO_DEVICE, stream)
        })
    }

    /// `hipMemcpyDtoHAsync`.
    ///
    /// # Safety
    /// `src` must be valid for `dst.len()` bytes, and `dst` must not be touched until the stream
    /// has executed the copy.
    pub(crate) unsafe fn copy_dtoh_async(dst: &mut [u8], src: u64, stream: sys::hipStream_t) -> Result<()> {
        // SAFETY: guaranteed by the caller; `dst` is a live host buffer of `dst.len()` bytes.
        check("hipMemcpyDtoHAsync", unsafe {
            sys::hipMemcpyDtoHAsync(dst.as_mut_ptr().cast::<c_void>(), src as *mut c_void, dst.len(), stream)
        })
    }

    /// `hipMemcpyHtoDAsync` (the header's `src` is `void*`, but the runtime only reads it).
    ///
    /// # Safety
    /// `dst` must be valid for `src.len()` bytes, and `src` must stay alive and unchanged until the
    /// stream has executed the copy.
    pub(crate) unsafe fn copy_htod_async(dst: u64, src: &[u8], stream: sys::hipStream_t) -> Result<()> {
        // SAFETY: guaranteed by the caller; the runtime does not write through `src`.
        check("hipMemcpyHtoDAsync", unsafe {
            sys::hipMemcpyHtoDAsync(dst as *mut c_void, src.as_ptr() as *mut c_void, src.len(), stream)
        })
    }
}

/// Inter-process memory handles (`hipIpc*MemHandle`).
pub(crate) mod ipc {
    use super::*;

    /// `hipIpcGetMemHandle` of the allocation that starts at `ptr`.
    pub(crate) fn get_mem_handle(ptr: u64) -> Result<[u8; 64]> {
        let mut handle = sys::hipIpcMemHandle_t { reserved: [0; 64] };
        // SAFETY: the out-pointer is a live local; the runtime validates `ptr`.
        check("hipIpcGetMemHandle", unsafe { sys::hipIpcGetMemHandle(&mut handle, ptr as *mut c_void) })?;
        Ok(handle.reserved.map(|b| b as u8))
    }

    /// `hipIpcOpenMemHandle` with `hipIpcMemLazyEnablePeerAccess` as the runtime of major version
    /// `runtime_major` spells it; if the runtime refuses that flag value (`hipErrorInvalidValue`),
    /// the other spelling is tried once before the first error is returned.
    pub(crate) fn open_mem_handle(handle: &[u8; 64], runtime_major: i32) -> Result<u64> {
        let first = flags::ipc_lazy_enable_peer_access(runtime_major);
        match open_with(handle, first) {
            Err(code::INVALID_VALUE) => {
                open_with(handle, first ^ 1).map_err(|_| error("hipIpcOpenMemHandle", code::INVALID_VALUE))
            }
            other => other.map_err(|status| error("hipIpcOpenMemHandle", status)),
        }
    }

    fn open_with(handle: &[u8; 64], flags: u32) -> std::result::Result<u64, i32> {
        let raw = sys::hipIpcMemHandle_t { reserved: handle.map(|b| b as c_char) };
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: the out-pointer is a live local; the handle is passed by value (64 bytes); the
        // runtime validates its contents.
        match unsafe { sys::hipIpcOpenMemHandle(&mut ptr, raw, flags) } {
            code::SUCCESS if !ptr.is_null() => Ok(ptr as u64),
            code::SUCCESS => Err(code::INVALID_VALUE),
            status => Err(status),
        }
    }

    /// `hipIpcCloseMemHandle`.
    ///
    /// # Safety
    /// `ptr` must come from [`open_mem_handle`], not be closed yet, and no queued work may still
    /// use it.
    pub(crate) unsafe fn close_mem_handle(ptr: u64) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipIpcCloseMemHandle", unsafe { sys::hipIpcCloseMemHandle(ptr as *mut c_void) })
    }
}

/// Streams (`hipStream*`).
pub(crate) mod stream {
    use super::*;

    /// `hipStreamCreateWithFlags(hipStreamNonBlocking)` on the current device.
    pub(crate) fn create_non_blocking() -> Result<sys::hipStream_t> {
        let mut stream: sys::hipStream_t = std::ptr::null_mut();
        // SAFETY: the out-pointer is a live local.
        check("hipStreamCreateWithFlags", unsafe {
            sys::hipStreamCreateWithFlags(&mut stream, flags::STREAM_NON_BLOCKING)
        })?;
        Ok(stream)
    }

    /// `hipStreamDestroy`.
    ///
    /// # Safety
    /// `stream` must be live and not used afterwards.
    pub(crate) unsafe fn destroy(stream: sys::hipStream_t) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipStreamDestroy", unsafe { sys::hipStreamDestroy(stream) })
    }

    /// `hipStreamSynchronize`.
    ///
    /// # Safety
    /// `stream` must be live.
    pub(crate) unsafe fn synchronize(stream: sys::hipStream_t) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipStreamSynchronize", unsafe { sys::hipStreamSynchronize(stream) })
    }

    /// `hipStreamBeginCapture` in thread-local mode.
    ///
    /// # Safety
    /// `stream` must be live.
    pub(crate) unsafe fn begin_capture(stream: sys::hipStream_t) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipStreamBeginCapture", unsafe { sys::hipStreamBeginCapture(stream, flags::CAPTURE_MODE_THREAD_LOCAL) })
    }

    /// `hipStreamEndCapture`: the captured graph (null if nothing was captured).
    ///
    /// # Safety
    /// `stream` must be live.
    pub(crate) unsafe fn end_capture(stream: sys::hipStream_t) -> Result<sys::hipGraph_t> {
        let mut graph: sys::hipGraph_t = std::ptr::null_mut();
        // SAFETY: guaranteed by the caller; the out-pointer is a live local.
        check("hipStreamEndCapture", unsafe { sys::hipStreamEndCapture(stream, &mut graph) })?;
        Ok(graph)
    }
}

/// Events (`hipEvent*`).
pub(crate) mod event {
    use super::*;

    /// `hipEventCreate` (default flags: timing enabled) on the current device.
    pub(crate) fn create() -> Result<sys::hipEvent_t> {
        let mut event: sys::hipEvent_t = std::ptr::null_mut();
        // SAFETY: the out-pointer is a live local.
        check("hipEventCreate", unsafe { sys::hipEventCreate(&mut event) })?;
        Ok(event)
    }

    /// `hipEventRecord`.
    ///
    /// # Safety
    /// `event` and `stream` must be live.
    pub(crate) unsafe fn record(event: sys::hipEvent_t, stream: sys::hipStream_t) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipEventRecord", unsafe { sys::hipEventRecord(event, stream) })
    }

    /// `hipEventQuery`: whether the work before the event has finished.
    ///
    /// # Safety
    /// `event` must be live.
    pub(crate) unsafe fn query(event: sys::hipEvent_t) -> Result<bool> {
        // SAFETY: guaranteed by the caller.
        match unsafe { sys::hipEventQuery(event) } {
            code::SUCCESS => Ok(true),
            code::NOT_READY => Ok(false),
            status => Err(error("hipEventQuery", status)),
        }
    }

    /// `hipEventSynchronize`.
    ///
    /// # Safety
    /// `event` must be live.
    pub(crate) unsafe fn synchronize(event: sys::hipEvent_t) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipEventSynchronize", unsafe { sys::hipEventSynchronize(event) })
    }

    /// `hipEventElapsedTime` in milliseconds (both events must have completed).
    ///
    /// # Safety
    /// Both events must be live.
    pub(crate) unsafe fn elapsed_ms(start: sys::hipEvent_t, end: sys::hipEvent_t) -> Result<f32> {
        let mut ms = 0f32;
        // SAFETY: guaranteed by the caller; the out-pointer is a live local.
        check("hipEventElapsedTime", unsafe { sys::hipEventElapsedTime(&mut ms, start, end) })?;
        Ok(ms)
    }

    /// `hipEventDestroy`.
    ///
    /// # Safety
    /// `event` must be live and not used afterwards.
    pub(crate) unsafe fn destroy(event: sys::hipEvent_t) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipEventDestroy", unsafe { sys::hipEventDestroy(event) })
    }
}

/// HIP graphs (`hipGraph*`).
pub(crate) mod graph {
    use super::*;

    /// `hipGraphInstantiate` (no error node or log requested).
    ///
    /// # Safety
    /// `graph` must be a live graph.
    pub(crate) unsafe fn instantiate(graph: sys::hipGraph_t) -> Result<sys::hipGraphExec_t> {
        let mut exec: sys::hipGraphExec_t = std::ptr::null_mut();
        // SAFETY: guaranteed by the caller; the out-pointer is a live local; null error node and
        // log buffer (size 0) are allowed.
        check("hipGraphInstantiate", unsafe {
            sys::hipGraphInstantiate(&mut exec, graph, std::ptr::null_mut(), std::ptr::null_mut(), 0)
        })?;
        Ok(exec)
    }

    /// `hipGraphLaunch`.
    ///
    /// # Safety
    /// `exec` and `stream` must be live, and what the graph's kernels access must be valid.
    pub(crate) unsafe fn launch(exec: sys::hipGraphExec_t, stream: sys::hipStream_t) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipGraphLaunch", unsafe { sys::hipGraphLaunch(exec, stream) })
    }

    /// `hipGraphExecDestroy`.
    ///
    /// # Safety
    /// `exec` must be live and not used afterwards.
    pub(crate) unsafe fn exec_destroy(exec: sys::hipGraphExec_t) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipGraphExecDestroy", unsafe { sys::hipGraphExecDestroy(exec) })
    }

    /// `hipGraphDestroy`.
    ///
    /// # Safety
    /// `graph` must be live and not used afterwards.
    pub(crate) unsafe fn destroy(graph: sys::hipGraph_t) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipGraphDestroy", unsafe { sys::hipGraphDestroy(graph) })
    }
}

/// Code objects and launches (`hipModule*`).
pub(crate) mod module {
    use super::*;

    /// `hipModuleLoadData` onto the current device: a code object (ELF) or a clang offload bundle.
    ///
    /// # Safety
    /// `image` must be a whole code object or bundle (the runtime reads its length from its headers).
    pub(crate) unsafe fn load_data(image: &[u8]) -> Result<sys::hipModule_t> {
        let mut module: sys::hipModule_t = std::ptr::null_mut();
        // SAFETY: guaranteed by the caller; the runtime copies what it needs before returning.
        check("hipModuleLoadData", unsafe { sys::hipModuleLoadData(&mut module, image.as_ptr().cast::<c_void>()) })?;
        Ok(module)
    }

    /// `hipModuleUnload`.
    ///
    /// # Safety
    /// `module` must be live, and neither it nor its functions used afterwards.
    pub(crate) unsafe fn unload(module: sys::hipModule_t) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("hipModuleUnload", unsafe { sys::hipModuleUnload(module) })
    }

    /// `hipModuleGetFunction`; `Ok(None)` when the module has no such symbol (`hipErrorNotFound`).
    ///
    /// # Safety
    /// `module` must be live.
    pub(crate) unsafe fn get_function(module: sys::hipModule_t, name: &CStr) -> Result<Option<sys::hipFunction_t>> {
        let mut function: sys::hipFunction_t = std::ptr::null_mut();
        // SAFETY: guaranteed by the caller; the name is NUL-terminated; the out-pointer is a live local.
        match unsafe { sys::hipModuleGetFunction(&mut function, module, name.as_ptr()) } {
            code::SUCCESS if !function.is_null() => Ok(Some(function)),
            code::SUCCESS | code::NOT_FOUND => Ok(None),
            status => Err(error("hipModuleGetFunction", status)),
        }
    }

    /// `hipModuleLaunchKernel` of a 1-D grid; `params` points at each kernel argument (the runtime
    /// copies them before returning, also when the stream is being captured).
    ///
    /// # Safety
    /// `function` and `stream` must be live, `params` must match the kernel's parameter list, and
    /// whatever memory the arguments name must stay valid until the stream has executed the kernel.
    pub(crate) unsafe fn launch_kernel(
        function: sys::hipFunction_t,
        grid: u32,
        block: u32,
        shared_bytes: u32,
        stream: sys::hipStream_t,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: guaranteed by the caller; `extra` is null (the arguments go through `params`).
        check("hipModuleLaunchKernel", unsafe {
            sys::hipModuleLaunchKernel(
                function,
                grid,
                1,
                1,
                block,
                1,
                1,
                shared_bytes,
                stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

/// hipRTC, loaded at run time (`libloading`, its entry points in one [`sys::RtcApi`] table): ROCm ≥ 6 ships it as `libhiprtc.so.N`; ROCm 5 exported it
/// from `libamdhip64` itself. `hiprtcVersion` is not used to identify it: clr hard-codes it to
/// 9.0 in every release (hiprtc.cpp: "TODO add actual version"); [`Rtc::path`] and the runtime's
/// `HIP_VERSION` identify the compiler instead.
pub(crate) mod rtc {
    use super::*;
    use std::ffi::CString;

    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    use sys::{RtcApi, RtcProgram as Program, RTC_SUCCESS as SUCCESS};

    /// One loaded hipRTC library and its entry points. Never closed (it lives in a `static`).
    pub(crate) struct Rtc {
        path: String,
        file: Option<PathBuf>,
        api: RtcApi,
        /// Keeps the entry points of `api` loaded.
        _lib: libloading::Library,
    }

    /// The libraries tried, in order: beside the HIP runtime (same ROCm) with its major version,
    /// then the loader's search path, then the HIP runtime itself (ROCm 5 bundles hipRTC).
    pub(crate) fn candidates(
        runtime_dir: Option<&std::path::Path>,
        runtime_file: Option<&std::path::Path>,
        major: Option<i32>,
    ) -> Vec<String> {
        let mut names = Vec::new();
        let versioned = major.filter(|&m| m > 0).map(|m| format!("libhiprtc.so.{m}"));
        if let Some(dir) = runtime_dir {
            for name in versioned.iter().map(String::as_str).chain(["libhiprtc.so"]) {
                names.push(dir.join(name).to_string_lossy().into_owned());
            }
        }
        names.extend(versioned);
        for name in ["libhiprtc.so", "libhiprtc.so.7", "libhiprtc.so.6", "libhiprtc.so.5"] {
            names.push(name.to_string());
        }
        if let Some(file) = runtime_file {
            names.push(file.to_string_lossy().into_owned());
        }
        let mut seen = std::collections::HashSet::new();
        names.retain(|name| seen.insert(name.clone()));
        names
    }

    /// The loaded hipRTC, or [`Error::BackendUnavailable`] listing what was tried. Probed once.
    pub(crate) fn library() -> Result<&'static Rtc> {
        static LIBRARY: OnceLock<std::result::Result<Rtc, String>> = OnceLock::new();
        LIBRARY.get_or_init(probe).as_ref().map_err(|tried| Error::BackendUnavailable {
            backend: BackendKind::Hip,
            reason: format!(
                "hipRTC could not be loaded (tried {tried}); install ROCm's hiprtc package, or build \
                 the kernels offline with `cargo xtask kernels --emit DIR` and set ARFUSE_KERNEL_DIR"
            ),
        })
    }

    fn probe() -> std::result::Result<Rtc, String> {
        let runtime_file = runtime_library_path();
        let runtime_dir = runtime_file.as_deref().and_then(std::path::Path::parent);
        let major = runtime_version().ok().map(|v| split_version(v).0);
        let mut tried = Vec::new();
        for name in candidates(runtime_dir, runtime_file.as_deref(), major) {
            match open(&name) {
                Ok(rtc) => return Ok(rtc),
                Err(why) => tried.push(format!("{name}: {why}")),
            }
        }
        Err(tried.join("; "))
    }

    fn open(name: &str) -> std::result::Result<Rtc, String> {
        // SAFETY: loading runs the library's initialisers, which the ROCm libraries are built to
        // have run this way (hipRTC is meant to be loaded at run time).
        let lib = unsafe { Library::open(Some(name), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| e.to_string())?;
        let lib = libloading::Library::from(lib);
        // SAFETY: a library of one of hipRTC's names exports hipRTC's functions, whose prototypes
        // `RtcApi` transcribes from `hiprtc.h`.
        let api = unsafe { RtcApi::resolve(&lib) }?;
        let file = object_file(api.create_program as *const c_void);
        Ok(Rtc { path: name.to_string(), file, api, _lib: lib })
    }

    impl Rtc {
        /// The library name it was loaded by (a path or a soname).
        pub(crate) fn path(&self) -> &str {
            &self.path
        }

        /// The file the loader resolved it to, if it can tell.
        pub(crate) fn file(&self) -> Option<PathBuf> {
            self.file.clone()
        }

        fn error(&self, call: &'static str, status: c_int) -> Error {
            // SAFETY: `hiprtcGetErrorString` maps any integer to a static string (or null).
            let text = unsafe { static_str((self.api.get_error_string)(status)) };
            let message = text.unwrap_or_else(|| format!("hipRTC status {status}"));
            Error::Driver { backend: BackendKind::Hip, call, code: status, message }
        }

        fn check(&self, call: &'static str, status: c_int) -> Result<()> {
            if status == SUCCESS {
                Ok(())
            } else {
                Err(self.error(call, status))
            }
        }

        /// Compiles `source` with `options` and returns the code object, or the failing call's
        /// error together with the compiler's log.
        pub(crate) fn compile(
            &self,
            source: &CStr,
            name: &CStr,
            options: &[CString],
        ) -> std::result::Result<Vec<u8>, (Error, String)> {
            let mut program: Program = std::ptr::null_mut();
            // SAFETY: the strings are NUL-terminated and outlive the call (hipRTC copies them); no
            // headers are passed.
            let created = unsafe {
                (self.api.create_program)(
                    &mut program,
                    source.as_ptr(),
                    name.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
            if created != SUCCESS || program.is_null() {
                return Err((self.error("hiprtcCreateProgram", created), String::new()));
            }
            let pointers: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
            // SAFETY: the program is live; `pointers` holds `len` NUL-terminated strings that outlive
            // the call.
            let compiled = unsafe { (self.api.compile_program)(program, pointers.len() as c_int, pointers.as_ptr()) };
            let log = self.log(program).unwrap_or_else(|err| format!("(no log: {err})"));
            let result = self
                .check("hiprtcCompileProgram", compiled)
                .and_then(|()| self.code(program))
                .map_err(|err| (err, log));
            // SAFETY: the program is live and not used again. A failure leaks host memory only.
            let _ = unsafe { (self.api.destroy_program)(&mut program) };
            result
        }

        fn log(&self, program: Program) -> Result<String> {
            let mut size = 0usize;
            // SAFETY: the program is live; the out-pointer is a live local.
            self.check("hiprtcGetProgramLogSize", unsafe { (self.api.get_program_log_size)(program, &mut size) })?;
            let mut log = vec![0u8; size.max(1) + 1];
            // SAFETY: `log` has room for the `size` bytes the call writes.
            self.check("hiprtcGetProgramLog", unsafe { (self.api.get_program_log)(program, log.as_mut_ptr().cast()) })?;
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Ok(String::from_utf8_lossy(&log[..end]).into_owned())
        }

        fn code(&self, program: Program) -> Result<Vec<u8>> {
            let mut size = 0usize;
            // SAFETY: the program is live; the out-pointer is a live local.
            self.check("hiprtcGetCodeSize", unsafe { (self.api.get_code_size)(program, &mut size) })?;
            let mut code = vec![0u8; size];
            if size > 0 {
                // SAFETY: `code` has room for the `size` bytes the call writes.
                self.check("hiprtcGetCode", unsafe { (self.api.get_code)(program, code.as_mut_ptr().cast()) })?;
            }
            Ok(code)
        }
    }
}

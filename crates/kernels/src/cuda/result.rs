//! The CUDA driver and NVRTC calls this backend makes that cudarc's result layer does not have
//! (IPC handles, peer access, address ranges, finishing a function's loading, NVRTC's CUBIN), each
//! turned into [`Error::Driver`] naming the call; the rest the backend calls from
//! `cudarc::driver::result` directly, naming the call with [`CallExt::call`]. Also how the
//! libraries are found: before the first call into a library, [`driver_present`] /
//! [`nvrtc::present`] must have returned `true` (cudarc panics, it does not return an error, when
//! it cannot load a library or a symbol).

use crate::{BackendKind, Error, Result};
use cudarc::driver::{result as cu, sys, DriverError};
use std::ffi::{c_int, CStr};
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Turns a driver error into ours, naming the call.
pub(crate) fn driver_error(call: &'static str, err: DriverError) -> Error {
    let name = err.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", err.0));
    let message = match err.error_string() {
        Ok(text) => format!("{name}: {}", text.to_string_lossy()),
        Err(_) => name,
    };
    Error::Driver { backend: BackendKind::Cuda, call, code: err.0 as i32, message }
}

/// `Result<T, DriverError>` → `Result<T>` with the call's name.
pub(crate) trait CallExt<T> {
    /// Maps the error to [`Error::Driver`] for `call`.
    fn call(self, call: &'static str) -> Result<T>;
}

impl<T> CallExt<T> for Result<T, DriverError> {
    fn call(self, call: &'static str) -> Result<T> {
        self.map_err(|err| driver_error(call, err))
    }
}

fn check(call: &'static str, status: sys::CUresult) -> Result<()> {
    status.result().call(call)
}

/// Whether the driver library (`libcuda`) can be loaded. Probed once per process.
pub(crate) fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| linkage::present("cuda"))
}

/// The file names tried for a library stem (`cuda`, `nvrtc`), for error messages.
pub(crate) fn library_candidates(stem: &str) -> String {
    let mut names = linkage::candidates(stem);
    let mut seen = std::collections::HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
    names.join(", ")
}

/// How cudarc reaches libcuda and libnvrtc, as far as our pass-through features say (cudarc's own
/// features are invisible to this crate, and `is_culib_present` exists only with its
/// `dynamic-loading`).
mod linkage {
    /// `cuda-dynamic-loading`: cudarc's own probe, over the names cudarc will open.
    #[cfg(feature = "cuda-dynamic-loading")]
    pub(super) fn present(stem: &str) -> bool {
        // SAFETY: `is_culib_present` only dlopens (and closes again) the candidate library names,
        // which runs the library's initialisers; libcuda and libnvrtc are made to be loaded this way.
        unsafe {
            match stem {
                "cuda" => cudarc::driver::sys::is_culib_present(),
                _ => cudarc::nvrtc::sys::is_culib_present(),
            }
        }
    }

    /// The names cudarc tries.
    #[cfg(feature = "cuda-dynamic-loading")]
    pub(super) fn candidates(stem: &str) -> Vec<String> {
        cudarc::get_lib_name_candidates(stem)
    }

    /// `cuda-dynamic-linking`: both libraries are linked at build time, so a process that runs has them.
    #[cfg(all(feature = "cuda-dynamic-linking", not(feature = "cuda-dynamic-loading")))]
    pub(super) fn present(_stem: &str) -> bool {
        true
    }

    /// The library cudarc linked.
    #[cfg(all(feature = "cuda-dynamic-linking", not(feature = "cuda-dynamic-loading")))]
    pub(super) fn candidates(stem: &str) -> Vec<String> {
        use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
        vec![format!("{DLL_PREFIX}{stem}{DLL_SUFFIX} (linked at build time)")]
    }

    /// Neither feature: the linking is chosen elsewhere (the engine's cudarc, or cudarc's
    /// `fallback-dynamic-loading`). Probe the usual names ourselves; a linked library is already
    /// in the process under one of them, so it is found too.
    #[cfg(not(any(feature = "cuda-dynamic-loading", feature = "cuda-dynamic-linking")))]
    pub(super) fn present(stem: &str) -> bool {
        candidates(stem).iter().any(|name| {
            // SAFETY: as for cudarc's probe: dlopen (closed again on drop) runs the library's
            // initialisers; libcuda and libnvrtc are made to be loaded this way.
            unsafe { libloading::Library::new(name) }.is_ok()
        })
    }

    /// Names cudarc tries too (all of them in its list for a CUDA 13 build; all but `.so.13` for
    /// CUDA 12), so that what this finds, cudarc finds as well.
    #[cfg(not(any(feature = "cuda-dynamic-loading", feature = "cuda-dynamic-linking")))]
    pub(super) fn candidates(stem: &str) -> Vec<String> {
        use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
        let stem = if cfg!(windows) && stem == "cuda" { "nvcuda" } else { stem };
        let mut names = vec![format!("{DLL_PREFIX}{stem}{DLL_SUFFIX}")];
        if !cfg!(windows) {
            names.extend(["1", "13", "12"].map(|major| format!("{DLL_PREFIX}{stem}{DLL_SUFFIX}.{major}")));
        }
        names
    }
}

/// `cuInit(0)`, once per process (later calls return the first status again).
pub(crate) fn init() -> Result<(), DriverError> {
    static INIT: OnceLock<Result<(), DriverError>> = OnceLock::new();
    *INIT.get_or_init(cu::init)
}

/// Device queries cudarc's result layer lacks (`cuDeviceCanAccessPeer`, `cuDriverGetVersion`).
pub(crate) mod device {
    use super::*;

    /// `cuDeviceCanAccessPeer`: whether `device` can map memory of `peer`.
    pub(crate) fn can_access_peer(device: sys::CUdevice, peer: sys::CUdevice) -> Result<bool> {
        let mut can = 0 as c_int;
        // SAFETY: the out-pointer is a live local; the devices came from `cuDeviceGet`.
        check("cuDeviceCanAccessPeer", unsafe { sys::cuDeviceCanAccessPeer(&mut can, device, peer) })?;
        Ok(can != 0)
    }

    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    pub(crate) fn driver_version() -> Result<i32> {
        let mut version = 0 as c_int;
        // SAFETY: the out-pointer is a live local.
        check("cuDriverGetVersion", unsafe { sys::cuDriverGetVersion(&mut version) })?;
        Ok(version)
    }
}

/// Contexts: binding one only when it is not current, and peer access (which cudarc lacks).
pub(crate) mod ctx {
    use super::*;

    /// Makes `context` current on the calling thread unless it already is
    /// (`cuCtxGetCurrent`, `cuCtxSetCurrent`).
    pub(crate) fn bind(context: sys::CUcontext) -> Result<()> {
        match cu::ctx::get_current().call("cuCtxGetCurrent")? {
            Some(current) if current == context => Ok(()),
            // SAFETY: callers pass a context they keep retained (a `CudaContext`'s primary context).
            _ => unsafe { cu::ctx::set_current(context) }.call("cuCtxSetCurrent"),
        }
    }

    /// `cuCtxEnablePeerAccess` from the current context to `peer`; already enabled counts as success.
    pub(crate) fn enable_peer_access(peer: sys::CUcontext) -> Result<()> {
        // SAFETY: `peer` is a retained primary context; flags must be 0.
        match unsafe { sys::cuCtxEnablePeerAccess(peer, 0) } {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
            status => check("cuCtxEnablePeerAccess", status),
        }
    }
}

/// Device memory beyond cudarc's result layer: address ranges, and a memset finished for every stream.
pub(crate) mod mem {
    use super::*;

    /// `cuMemsetD8_v2` followed by a synchronisation of the legacy default stream, so the bytes are
    /// set before the call returns whatever stream uses them next. Our streams are non-blocking,
    /// so this waits for no kernel of theirs (a peer's spinning kernel included).
    ///
    /// # Safety
    /// `ptr` must be device memory valid for `bytes` bytes.
    pub(crate) unsafe fn memset_d8_sync(ptr: sys::CUdeviceptr, value: u8, bytes: usize) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("cuMemsetD8_v2", unsafe { sys::cuMemsetD8_v2(ptr, value, bytes) })?;
        // SAFETY: the null stream is always valid in the current context.
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(std::ptr::null_mut()) })
    }
}

/// Inter-process memory handles (`cuIpc*MemHandle`).
pub(crate) mod ipc {
    use super::*;

    /// `cuIpcGetMemHandle` of the allocation that starts at `ptr`.
    pub(crate) fn get_mem_handle(ptr: sys::CUdeviceptr) -> Result<[u8; 64]> {
        let mut handle = MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: the out-pointer is a live local; the driver validates `ptr`.
        check("cuIpcGetMemHandle", unsafe { sys::cuIpcGetMemHandle(handle.as_mut_ptr(), ptr) })?;
        // SAFETY: the call succeeded, so it wrote the handle.
        let handle = unsafe { handle.assume_init() };
        Ok(handle.reserved.map(|b| b as u8))
    }

    /// `cuIpcOpenMemHandle_v2` with `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`. Fails with
    /// `CUDA_ERROR_INVALID_CONTEXT` on a handle exported by this same process.
    pub(crate) fn open_mem_handle(handle: &[u8; 64]) -> Result<sys::CUdeviceptr> {
        let raw = sys::CUipcMemHandle { reserved: handle.map(|b| b as std::ffi::c_char) };
        let mut ptr: sys::CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: the out-pointer is a live local; the driver validates the handle bytes.
        check("cuIpcOpenMemHandle", unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, raw, flags) })?;
        Ok(ptr)
    }

    /// `cuIpcCloseMemHandle`.
    ///
    /// # Safety
    /// `ptr` must come from [`open_mem_handle`], not be closed yet, and no queued work may still use it.
    pub(crate) unsafe fn close_mem_handle(ptr: sys::CUdeviceptr) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("cuIpcCloseMemHandle", unsafe { sys::cuIpcCloseMemHandle(ptr) })
    }
}

/// Functions of a loaded module: `cuFuncLoad`, which cudarc lacks.
pub(crate) mod function {
    use super::*;

    /// `cuFuncLoad`: finishes loading a function now (a no-op when loaded). Lazy loading
    /// (`CUDA_MODULE_LOADING=LAZY`, the default since CUDA 12.2) would otherwise load it at its first
    /// launch, which may synchronise the context and so deadlock against a peer's spinning kernel.
    /// Needs a CUDA 12.4 driver; callers check the version first.
    ///
    /// # Safety
    /// `function` must belong to a loaded, live module.
    pub(crate) unsafe fn load(function: sys::CUfunction) -> Result<()> {
        // SAFETY: guaranteed by the caller.
        check("cuFuncLoad", unsafe { sys::cuFuncLoad(function) })
    }
}

/// Launches with attributes: `cuLaunchKernelEx`, which cudarc's result layer lacks.
pub(crate) mod launch {
    use super::*;
    use std::ffi::c_void;

    /// `cuLaunchKernelEx` of `function` with programmatic stream serialisation allowed: the
    /// kernel may start before the kernel ahead of it in `stream` has finished (it must wait for
    /// it itself, `griddepcontrol.wait`). Captured into a graph, the two become a programmatic
    /// edge. Needs sm_90 or later to have an effect; callers check.
    ///
    /// # Safety
    /// As `cuLaunchKernel`: `function` belongs to a live module, `arguments` point at values of the
    /// kernel's parameter types, and everything the kernel reads or writes stays valid until it
    /// has run.
    pub(crate) unsafe fn programmatic(
        function: sys::CUfunction,
        grid: u32,
        block: u32,
        shared_bytes: u32,
        stream: sys::CUstream,
        arguments: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: an all-zero attribute is a valid C value (id 0 = ignored, value a plain union).
        let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attribute.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared_bytes,
            hStream: stream,
            attrs: &mut attribute,
            numAttrs: 1,
        };
        // SAFETY: `config` and `attribute` live across the call (the driver copies them), the rest
        // is guaranteed by the caller.
        check("cuLaunchKernelEx", unsafe {
            sys::cuLaunchKernelEx(&config, function, arguments.as_mut_ptr(), std::ptr::null_mut())
        })
    }
}

/// The run-time compiler (`nvrtc*`).
pub(crate) mod nvrtc {
    use super::*;
    use cudarc::nvrtc::sys as nv;

    /// Whether `libnvrtc` can be loaded (cudarc tries, among others, `libnvrtc.so` and
    /// `libnvrtc.so.13`). Probed once per process.
    pub(crate) fn present() -> bool {
        static PRESENT: OnceLock<bool> = OnceLock::new();
        *PRESENT.get_or_init(|| super::linkage::present("nvrtc"))
    }

    fn nvrtc_error(call: &'static str, status: nv::nvrtcResult) -> Error {
        // SAFETY: `nvrtcGetErrorString` returns a pointer to a static NUL-terminated string.
        let text = unsafe { nv::nvrtcGetErrorString(status) };
        let message = if text.is_null() {
            format!("{status:?}")
        } else {
            // SAFETY: non-null, static and NUL-terminated (see above).
            unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
        };
        Error::Driver { backend: BackendKind::Cuda, call, code: status as i32, message }
    }

    fn check(call: &'static str, status: nv::nvrtcResult) -> Result<()> {
        match status {
            nv::nvrtcResult::NVRTC_SUCCESS => Ok(()),
            status => Err(nvrtc_error(call, status)),
        }
    }

    /// `nvrtcVersion`: (major, minor).
    pub(crate) fn version() -> Result<(i32, i32)> {
        let (mut major, mut minor) = (0 as c_int, 0 as c_int);
        // SAFETY: the out-pointers are live locals.
        check("nvrtcVersion", unsafe { nv::nvrtcVersion(&mut major, &mut minor) })?;
        Ok((major, minor))
    }

    /// `nvrtcGetSupportedArchs`: the real architectures this NVRTC can compile for (90 = sm_90).
    pub(crate) fn supported_archs() -> Result<Vec<i32>> {
        let mut count = 0 as c_int;
        // SAFETY: the out-pointer is a live local.
        check("nvrtcGetNumSupportedArchs", unsafe { nv::nvrtcGetNumSupportedArchs(&mut count) })?;
        let mut archs = vec![0 as c_int; count.max(0) as usize];
        // SAFETY: `archs` has room for the `count` entries the call writes.
        check("nvrtcGetSupportedArchs", unsafe { nv::nvrtcGetSupportedArchs(archs.as_mut_ptr()) })?;
        Ok(archs)
    }

    /// An NVRTC program, destroyed on drop.
    pub(crate) struct Program {
        raw: nv::nvrtcProgram,
    }

    impl Program {
        /// `nvrtcCreateProgram` with no headers.
        pub(crate) fn create(source: &CStr, name: &CStr) -> Result<Program> {
            let mut raw = MaybeUninit::<nv::nvrtcProgram>::uninit();
            // SAFETY: the strings are NUL-terminated and outlive the call (NVRTC copies them);
            // no headers are passed.
            check("nvrtcCreateProgram", unsafe {
                nv::nvrtcCreateProgram(
                    raw.as_mut_ptr(),
                    source.as_ptr(),
                    name.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            })?;
            // SAFETY: the call succeeded, so it wrote the program handle.
            Ok(Program { raw: unsafe { raw.assume_init() } })
        }

        /// `nvrtcCompileProgram`. On a compile error the status comes back as an error; the log
        /// is read separately with [`Program::log`].
        pub(crate) fn compile(&self, options: &[std::ffi::CString]) -> Result<()> {
            let pointers: Vec<*const std::ffi::c_char> = options.iter().map(|o| o.as_ptr()).collect();
            // SAFETY: the program is live; `pointers` holds `len` NUL-terminated strings that
            // outlive the call.
            check("nvrtcCompileProgram", unsafe {
                nv::nvrtcCompileProgram(self.raw, pointers.len() as c_int, pointers.as_ptr())
            })
        }

        /// The compiler's log (`nvrtcGetProgramLogSize`, `nvrtcGetProgramLog`).
        pub(crate) fn log(&self) -> Result<String> {
            let mut size = 0usize;
            // SAFETY: the program is live; the out-pointer is a live local.
            check("nvrtcGetProgramLogSize", unsafe { nv::nvrtcGetProgramLogSize(self.raw, &mut size) })?;
            let mut log = vec![0u8; size.max(1)];
            // SAFETY: `log` has room for the `size` bytes the call writes.
            check("nvrtcGetProgramLog", unsafe { nv::nvrtcGetProgramLog(self.raw, log.as_mut_ptr().cast()) })?;
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Ok(String::from_utf8_lossy(&log[..end]).into_owned())
        }

        /// The CUBIN (`nvrtcGetCUBINSize`, `nvrtcGetCUBIN`); empty when compiled for a virtual arch.
        pub(crate) fn cubin(&self) -> Result<Vec<u8>> {
            let mut size = 0usize;
            // SAFETY: the program is live; the out-pointer is a live local.
            check("nvrtcGetCUBINSize", unsafe { nv::nvrtcGetCUBINSize(self.raw, &mut size) })?;
            if size == 0 {
                return Ok(Vec::new());
            }
            let mut cubin = vec![0u8; size];
            // SAFETY: `cubin` has room for the `size` bytes the call writes.
            check("nvrtcGetCUBIN", unsafe { nv::nvrtcGetCUBIN(self.raw, cubin.as_mut_ptr().cast()) })?;
            Ok(cubin)
        }

        /// The PTX, NUL-terminated (`nvrtcGetPTXSize`, `nvrtcGetPTX`).
        pub(crate) fn ptx(&self) -> Result<Vec<u8>> {
            let mut size = 0usize;
            // SAFETY: the program is live; the out-pointer is a live local.
            check("nvrtcGetPTXSize", unsafe { nv::nvrtcGetPTXSize(self.raw, &mut size) })?;
            let mut ptx = vec![0u8; size.max(1)];
            // SAFETY: `ptx` has room for the `size` bytes the call writes.
            check("nvrtcGetPTX", unsafe { nv::nvrtcGetPTX(self.raw, ptx.as_mut_ptr().cast()) })?;
            if ptx.last() != Some(&0) {
                ptx.push(0);
            }
            Ok(ptx)
        }
    }

    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: the program is live and never used again. A failure here leaks host memory
            // only, and there is no device to park it on: it is ignored.
            let _ = unsafe { nv::nvrtcDestroyProgram(&mut self.raw) };
        }
    }
}

//! The kernels on a CUDA device: NVRTC compilation of the portable source, the on-disk cache of
//! compiled images, and the loaded module with one finished-loading function per [`KernelId`].
//!
//! - One image per process and target (compiled once; concurrent ranks wait for the first).
//! - The target is the device's real architecture (`sm_XY`, a CUBIN: no JIT at load time) when this
//!   NVRTC supports it, else PTX for the newest virtual architecture it has below the device's
//!   (`compute_XY`, JIT-compiled by the driver).
//! - On disk under `$XDG_CACHE_HOME/arfuse/cuda/<target>/` (else `~/.cache/...`), keyed by the
//!   source hash, a hash of the options and the NVRTC version; best effort: a file that fails its
//!   checksum, or that the driver refuses, is recompiled and rewritten.
//! - One module per process and device (the ranks that share a GPU share its primary context, so
//!   they share the module): every function is resolved and finished loading (`cuFuncLoad`) and its
//!   dynamic shared memory limit raised to the device's opt-in maximum when the module loads, so a
//!   launch never makes a call that could wait for another rank's spinning kernel; where ranks
//!   share the GPU, every function prefers the same shared memory carveout, so that a block of one
//!   never waits for blocks of another to leave a multiprocessor ([`SHARED_CARVEOUT_PERCENT`]).

use super::device::CudaDevice;
use super::result::{self, nvrtc, CallExt};
use crate::gpu::cache::DiskCache;
use crate::gpu::functions::FunctionTable;
use crate::{BackendKind, Error, KernelId, Result};
use cudarc::driver::result as cu;
use cudarc::driver::{sys, CudaFunction, CudaModule};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

/// The program name NVRTC reports in its log.
const PROGRAM_NAME: &str = "arfuse.cu";
/// What [`Error::Compile`] names: the module holds every kernel.
const MODULE_NAME: &str = "arfuse.cu (all kernels)";
/// Dynamic shared memory every function may use without opting in.
const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;
/// The shared memory carveout every function prefers where ranks share the GPU
/// (`CU_SHAREDMEM_CARVEOUT_MAX_SHARED`, in percent of the most an SM has): one and the same for
/// all our kernels. A multiprocessor runs blocks of one L1/shared split at a time; left to the
/// driver, a kernel with 4 bytes of shared memory (the 1-stage all-reduce) and one with 1 KiB (a
/// local row kernel) get different splits, and a block of the second then waits until every block
/// of the first has left its multiprocessor. With ranks sharing a GPU, a lagging rank's local
/// kernel so waited for peers' spinning cross-rank blocks that covered every SM, until they timed
/// out (measured on an H200: docs/reliability.md). No kernel of ours needs more than the largest
/// split, so none gets another. It costs the bandwidth-bound 2-stage call about 7% (the L1 left
/// is 28 KiB of 256 on sm_90; docs/performance.md), so a rank alone on its GPU, which no peer's
/// kernel can keep off a multiprocessor, keeps the driver's choice.
const SHARED_CARVEOUT_PERCENT: i32 = 100;

/// The kernel source and its compile options (from `crate::source`).
mod kernel_source {
    pub(super) fn text() -> String {
        crate::source::full_source()
    }
    pub(super) fn hash() -> u64 {
        crate::source::source_hash()
    }
    pub(super) fn nvrtc_options(arch: &str) -> Vec<String> {
        crate::source::nvrtc_options(arch)
    }
}

/// What a compiled image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ImageKind {
    /// Machine code for one real architecture.
    Cubin,
    /// PTX (NUL-terminated), compiled by the driver at load time.
    Ptx,
}

impl ImageKind {
    fn extension(self) -> &'static str {
        match self {
            ImageKind::Cubin => "cubin",
            ImageKind::Ptx => "ptx",
        }
    }
    fn tag(self) -> u32 {
        match self {
            ImageKind::Cubin => 1,
            ImageKind::Ptx => 2,
        }
    }
}

/// The architecture NVRTC compiles for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    /// `sm_90` (real: a CUBIN) or `compute_90` (virtual: PTX).
    name: String,
    real: bool,
}

/// A compiled kernel image.
struct Image {
    bytes: Vec<u8>,
    kind: ImageKind,
    target: Target,
    /// Read from the disk cache (not compiled by this process).
    from_disk: bool,
}

/// (Device compute capability, source hash).
type ImageKey = ((i32, i32), u64);

/// Images compiled (or read) by this process.
static IMAGES: Mutex<BTreeMap<ImageKey, Arc<Image>>> = parking_lot::const_mutex(BTreeMap::new());
/// Loaded modules by device ordinal (the primary context is per device, so is the module).
static MODULES: Mutex<BTreeMap<usize, Weak<LoadedModule>>> = parking_lot::const_mutex(BTreeMap::new());

/// A loaded function and the dynamic shared memory it may use.
pub(crate) struct LoadedFunction {
    function: CudaFunction,
    max_dynamic_shared: u32,
}

impl LoadedFunction {
    /// The raw handle (valid while the module lives).
    pub(crate) fn raw(&self) -> sys::CUfunction {
        self.function.cu_function()
    }
    /// The most dynamic shared memory a launch may ask for, in bytes.
    pub(crate) fn max_dynamic_shared(&self) -> u32 {
        self.max_dynamic_shared
    }
}

/// The module of every kernel, loaded into one device's primary context.
pub(crate) struct LoadedModule {
    /// Every kernel's function (`None` where the source has no such kernel, e.g. an f32 variant).
    functions: FunctionTable<LoadedFunction>,
    kind: ImageKind,
    target: Target,
    /// Whether every function prefers [`SHARED_CARVEOUT_PERCENT`] (set once ranks share the GPU;
    /// held while it is set, so that no rank launches before every function has it).
    carveout_pinned: Mutex<bool>,
    /// Unloaded (`cuModuleUnload`) when the last device using it drops it; after the functions.
    _module: Arc<CudaModule>,
}

impl LoadedModule {
    /// Makes every function prefer [`SHARED_CARVEOUT_PERCENT`], once: what ranks sharing the GPU
    /// need (a device opened with `co_resident_ranks > 1` asks for it when it loads the kernels,
    /// before any rank spins). `-DARFUSE_EXP_DEFAULT_CARVEOUT` in `ARFUSE_KERNEL_DEFINES` leaves
    /// the driver's choice, to measure what the pin changes.
    fn pin_carveout(&self) -> Result<()> {
        let mut pinned = self.carveout_pinned.lock();
        if *pinned || crate::source::experiment_defines().iter().any(|d| d == "-DARFUSE_EXP_DEFAULT_CARVEOUT") {
            return Ok(());
        }
        self.functions.iter().try_for_each(|function| {
            // SAFETY: the function belongs to this module, which is loaded while `self` lives.
            unsafe {
                cu::function::set_function_attribute(
                    function.raw(),
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    SHARED_CARVEOUT_PERCENT,
                )
            }
            .call("cuFuncSetAttribute")
        })?;
        *pinned = true;
        Ok(())
    }

    /// The function of `kernel`, or a clear error if the source does not define it.
    pub(crate) fn function(&self, kernel: KernelId) -> Result<&LoadedFunction> {
        self.functions.get(kernel, &self.target.name, || self.describe())
    }

    /// E.g. `sm_90 cubin`.
    pub(crate) fn describe(&self) -> String {
        format!("{} {}", self.target.name, self.kind.extension())
    }
}

/// The module for `device`, shared with every other open of the same device in this process.
/// Where ranks share the device, its functions prefer the shared carveout first.
pub(crate) fn load(device: &CudaDevice) -> Result<Arc<LoadedModule>> {
    let module = shared_module(device)?;
    if device.co_resident_ranks() > 1 {
        module.pin_carveout()?;
    }
    Ok(module)
}

fn shared_module(device: &CudaDevice) -> Result<Arc<LoadedModule>> {
    let mut modules = MODULES.lock();
    if let Some(module) = modules.get(&device.ordinal()).and_then(Weak::upgrade) {
        return Ok(module);
    }
    let cached = image(device.compute_capability(), false)?;
    let module = match load_image(device, &cached) {
        Ok(module) => module,
        // A cached file the driver refuses: compile afresh, replace the file, try once more.
        Err(err) if cached.from_disk => {
            tracing::warn!(error = %err, "cuda: the driver refused the cached kernel image; recompiling");
            load_image(device, &*image(device.compute_capability(), true)?)?
        }
        Err(err) => return Err(err),
    };
    modules.retain(|_, module| module.strong_count() > 0);
    modules.insert(device.ordinal(), Arc::downgrade(&module));
    Ok(module)
}

fn load_image(device: &CudaDevice, image: &Image) -> Result<Arc<LoadedModule>> {
    device.bind()?;
    let ctx = &device.0.ctx;
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.bytes.clone())).call("cuModuleLoadData")?;
    // cuFuncLoad exists from CUDA 12.4 on; older drivers load eagerly unless told otherwise.
    let can_finish_loading = device.driver_version() >= 12040;
    let optin = device.max_shared_bytes_per_block();
    let functions = FunctionTable::resolve(|kernel| {
        let function = match module.load_function(&kernel.symbol()) {
            Ok(function) => function,
            Err(err) if err.0 == sys::CUresult::CUDA_ERROR_NOT_FOUND => return Ok(None),
            Err(err) => return Err(result::driver_error("cuModuleGetFunction", err)),
        };
        let raw = function.cu_function();
        use sys::CUfunction_attribute as F;
        // SAFETY: `raw` belongs to `module`, which is loaded and alive for this whole block.
        let max_dynamic_shared = unsafe {
            if can_finish_loading {
                result::function::load(raw)?;
            }
            let static_shared = cu::function::get_function_attribute(raw, F::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .call("cuFuncGetAttribute")?;
            let limit = optin.max(DEFAULT_SHARED_LIMIT).saturating_sub(static_shared.max(0) as u32);
            if optin > DEFAULT_SHARED_LIMIT {
                cu::function::set_function_attribute(
                    raw,
                    F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    limit as i32,
                )
                .call("cuFuncSetAttribute")?;
            }
            limit
        };
        Ok(Some(LoadedFunction { function, max_dynamic_shared }))
    })?;
    Ok(Arc::new(LoadedModule {
        functions,
        kind: image.kind,
        target: image.target.clone(),
        carveout_pinned: Mutex::new(false),
        _module: module,
    }))
}

/// The image for a device of compute capability `cc`: from this process's cache, the disk cache,
/// or NVRTC. `refresh` skips both caches and overwrites them.
fn image(cc: (i32, i32), refresh: bool) -> Result<Arc<Image>> {
    if !nvrtc::present() {
        return Err(Error::BackendUnavailable {
            backend: BackendKind::Cuda,
            reason: format!(
                "NVRTC could not be loaded (tried {}); the cuda backend compiles its kernels at run time \
                 and needs libnvrtc 13.0 on the library path",
                result::library_candidates("nvrtc")
            ),
        });
    }
    let source_hash = kernel_source::hash();
    let mut images = IMAGES.lock();
    if !refresh {
        if let Some(image) = images.get(&(cc, source_hash)) {
            return Ok(image.clone());
        }
    }
    let version = nvrtc::version()?;
    let target = choose_target(cc, &nvrtc::supported_archs()?, version)?;
    let options = compile_options(&target);
    let path = cache_path(&target, source_hash, &options, version);
    let cached = match (&path, refresh) {
        (Some(path), false) => read_cache(path),
        _ => None,
    };
    let image = match cached {
        Some((kind, bytes)) => {
            tracing::debug!(arch = %target.name, path = ?path, bytes = bytes.len(), "cuda: kernel image from the disk cache");
            Image { bytes, kind, target, from_disk: true }
        }
        None => {
            let started = std::time::Instant::now();
            let (kind, bytes) = compile(&target, &options, &kernel_source::text())?;
            tracing::info!(arch = %target.name, nvrtc = ?version, elapsed = ?started.elapsed(), bytes = bytes.len(), cache = ?path, "cuda: kernels compiled with NVRTC");
            if let Some(path) = &path {
                write_cache(path, kind, &bytes);
            }
            Image { bytes, kind, target, from_disk: false }
        }
    };
    let image = Arc::new(image);
    images.insert((cc, source_hash), image.clone());
    Ok(image)
}

fn choose_target(cc: (i32, i32), supported: &[i32], version: (i32, i32)) -> Result<Target> {
    let arch = cc.0 * 10 + cc.1;
    if supported.contains(&arch) {
        return Ok(Target { name: format!("sm_{arch}"), real: true });
    }
    match supported.iter().copied().filter(|&a| a <= arch).max() {
        Some(best) => Ok(Target { name: format!("compute_{best}"), real: false }),
        None => Err(Error::Compile {
            kernel: MODULE_NAME.into(),
            arch: format!("sm_{arch}"),
            log: format!(
                "NVRTC {}.{} targets {:?} only; none of them runs on this sm_{arch} device",
                version.0, version.1, supported
            ),
        }),
    }
}

/// The source's options for `target`, with the architecture added if the source did not name it,
/// and `--fmad=false` (the numerics contract forbids contracted multiply-adds) if it said nothing
/// about contraction.
fn compile_options(target: &Target) -> Vec<String> {
    let mut options = kernel_source::nvrtc_options(&target.name);
    let names_arch =
        options.iter().any(|o| o.starts_with("--gpu-architecture") || o.starts_with("-arch") || o.starts_with("-gpu"));
    if !names_arch {
        options.push(format!("--gpu-architecture={}", target.name));
    }
    if !options.iter().any(|o| o.starts_with("--fmad") || o.starts_with("-fmad") || o.contains("fast-math")) {
        options.push("--fmad=false".into());
    }
    options.extend(crate::source::experiment_defines());
    options
}

/// The kernel source compiled by NVRTC ahead of time, as [`compile_offline`] returns it.
#[derive(Clone, Debug)]
pub struct OfflineImage {
    /// The architecture compiled for: `sm_90` (a CUBIN) or `compute_90` (PTX).
    pub arch: String,
    /// The NVRTC options used: [`crate::source::nvrtc_options`] then the caller's extra ones.
    pub options: Vec<String>,
    /// The NVRTC version, e.g. `(13, 0)`.
    pub nvrtc_version: (i32, i32),
    /// A CUBIN for a real architecture, NUL-terminated PTX for a virtual one; what
    /// `cuModuleLoadData` takes.
    pub image: Vec<u8>,
    /// NVRTC's log (warnings; ptxas's resource usage when an extra option asks for it, e.g.
    /// `--ptxas-options=-v`).
    pub log: String,
}

/// Compiles the kernel source with NVRTC for `arch` (`sm_XY`: CUBIN, `compute_XY`: PTX) with
/// exactly [`crate::source::nvrtc_options`] followed by `extra_options`, without a device: what
/// `cargo xtask kernels` uses to check, report on and emit the NVIDIA images. The run-time path
/// (the module loader above) compiles the same source with the same options.
///
/// [`Error::BackendUnavailable`] when libnvrtc cannot be loaded; [`Error::Compile`] (naming `arch`,
/// with NVRTC's log) when the source does not compile or a real architecture yields no CUBIN.
pub fn compile_offline(arch: &str, extra_options: &[String]) -> Result<OfflineImage> {
    let nvrtc_version = super::Cuda::nvrtc_version()?;
    let target = Target { name: arch.to_string(), real: arch.starts_with("sm_") };
    let mut options = kernel_source::nvrtc_options(arch);
    options.extend(extra_options.iter().cloned());
    let (kind, image, log) = compile_logged(&target, &options, &kernel_source::text())?;
    if target.real && kind != ImageKind::Cubin {
        return Err(Error::Compile {
            kernel: MODULE_NAME.into(),
            arch: arch.into(),
            log: format!("NVRTC produced no CUBIN for the real architecture {arch}\n{log}"),
        });
    }
    Ok(OfflineImage { arch: arch.into(), options, nvrtc_version, image, log })
}

fn compile(target: &Target, options: &[String], source: &str) -> Result<(ImageKind, Vec<u8>)> {
    compile_logged(target, options, source).map(|(kind, bytes, _)| (kind, bytes))
}

/// [`compile`], also returning NVRTC's log of the successful compilation.
fn compile_logged(target: &Target, options: &[String], source: &str) -> Result<(ImageKind, Vec<u8>, String)> {
    let compile_error = |log: String| Error::Compile { kernel: MODULE_NAME.into(), arch: target.name.clone(), log };
    let source = CString::new(source).map_err(|_| compile_error("the kernel source contains a NUL byte".into()))?;
    let c_options = options
        .iter()
        .map(|o| CString::new(o.as_str()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| compile_error(format!("an NVRTC option contains a NUL byte: {options:?}")))?;
    let name = CString::new(PROGRAM_NAME).map_err(|_| compile_error("bad program name".into()))?;
    let program = nvrtc::Program::create(&source, &name)?;
    if let Err(err) = program.compile(&c_options) {
        let log = program.log().unwrap_or_else(|log_err| format!("(no log: {log_err})"));
        return Err(compile_error(format!("{log}\n{err}\noptions: {options:?}")));
    }
    let log = program.log().unwrap_or_else(|log_err| format!("(no log: {log_err})"));
    if target.real {
        let cubin = program.cubin()?;
        if !cubin.is_empty() {
            return Ok((ImageKind::Cubin, cubin, log));
        }
    }
    Ok((ImageKind::Ptx, program.ptx()?, log))
}

// ---- the disk cache -------------------------------------------------------------------------

/// The disk cache: kind tag 1 (CUBIN) or 2 (PTX), see [`ImageKind::tag`].
const CACHE: DiskCache = DiskCache { magic: b"ARFCUDA1", backend: "cuda" };

fn cache_path(target: &Target, source_hash: u64, options: &[String], version: (i32, i32)) -> Option<PathBuf> {
    let options_hash = crate::source::fnv1a(options.join("\u{1f}").as_bytes());
    let file = format!(
        "{source_hash:016x}-{:08x}-nvrtc{}.{}.{}",
        options_hash as u32,
        version.0,
        version.1,
        if target.real { "cubin" } else { "ptx" }
    );
    Some(CACHE.root()?.join(&target.name).join(file))
}

/// A cache file's payload if it is whole and plausible; `None` otherwise (then it is recompiled).
fn read_cache(path: &Path) -> Option<(ImageKind, Vec<u8>)> {
    let (tag, payload) = CACHE.read(path)?;
    let kind = [ImageKind::Cubin, ImageKind::Ptx].into_iter().find(|kind| kind.tag() == tag)?;
    let plausible = match kind {
        ImageKind::Cubin => payload.starts_with(b"\x7fELF"),
        ImageKind::Ptx => payload.last() == Some(&0),
    };
    plausible.then_some((kind, payload))
}

/// Writes a cache file (best effort, see [`DiskCache::write`]).
fn write_cache(path: &Path, kind: ImageKind, payload: &[u8]) {
    CACHE.write(path, kind.tag(), payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_prefer_the_real_architecture() {
        let supported = [75, 80, 86, 89, 90, 100, 120];
        assert_eq!(choose_target((9, 0), &supported, (13, 0)).ok(), Some(Target { name: "sm_90".into(), real: true }));
        // A device newer than this NVRTC: PTX for the newest virtual architecture below it.
        assert_eq!(
            choose_target((12, 1), &supported, (13, 0)).ok(),
            Some(Target { name: "compute_120".into(), real: false })
        );
        assert!(choose_target((7, 0), &supported, (13, 0)).is_err());
    }

    /// Runs where libnvrtc loads (CI installs PyPI's nvidia-cuda-nvrtc 13.0); skipped elsewhere.
    #[test]
    fn nvrtc_builds_cubin_and_ptx() {
        let available = if nvrtc::present() { Ok(()) } else { Err("libnvrtc not found") };
        if !arfuse_testkit::require_compiler("nvrtc", "cuda::module::tests::nvrtc_builds_cubin_and_ptx", available) {
            return;
        }
        let version = nvrtc::version().expect("nvrtc version");
        let archs = nvrtc::supported_archs().expect("supported archs");
        println!("nvrtc {version:?} targets {archs:?}");
        let source = "extern \"C\" __global__ void twice(float* x) { x[threadIdx.x] *= 2.0f; }";
        let real = choose_target((9, 0), &archs, version).expect("sm_90 target");
        let options = vec![format!("--gpu-architecture={}", real.name)];
        let (kind, cubin) = compile(&real, &options, source).expect("compile for sm_90");
        assert_eq!(kind, ImageKind::Cubin);
        assert!(cubin.starts_with(b"\x7fELF"));
        let virtual_target = Target { name: "compute_90".into(), real: false };
        let options = vec!["--gpu-architecture=compute_90".to_string()];
        let (kind, ptx) = compile(&virtual_target, &options, source).expect("compile for compute_90");
        assert_eq!(kind, ImageKind::Ptx);
        assert_eq!(ptx.last(), Some(&0));
        assert!(String::from_utf8_lossy(&ptx).contains(".entry twice"));
        match compile(&real, &[], "__global__ void broken( {") {
            Err(Error::Compile { arch, log, .. }) => {
                assert_eq!(arch, "sm_90");
                assert!(log.contains("error"), "{log}");
            }
            other => panic!("expected a compile error, got {:?}", other.map(|(kind, _)| kind)),
        }
        // The offline entry point names the architecture it failed for.
        match compile_offline("sm_1", &[]) {
            Err(Error::Compile { arch, .. }) => assert_eq!(arch, "sm_1"),
            other => panic!("expected a compile error for sm_1, got {:?}", other.map(|image| image.arch)),
        }
    }

    /// The CI compile check for NVIDIA: the arfuse source builds with NVRTC for sm_80, sm_90 and
    /// sm_100, every kernel symbol is there, and the hot loops use 128-bit global loads/stores.
    /// Skipped (loudly) without libnvrtc unless `ARFUSE_REQUIRE_COMPILERS` names `nvrtc`.
    #[test]
    fn arfuse_kernels_compile_for_every_nvidia_arch() {
        let available = if nvrtc::present() {
            Ok(())
        } else {
            Err("libnvrtc not found (set LD_LIBRARY_PATH to PyPI nvidia-cuda-nvrtc's lib)")
        };
        let test = "cuda::module::tests::arfuse_kernels_compile_for_every_nvidia_arch";
        if !arfuse_testkit::require_compiler("nvrtc", test, available) {
            return;
        }
        let source = crate::source::full_source();
        for arch in ["sm_80", "sm_90", "sm_100"] {
            let real = Target { name: arch.into(), real: true };
            let (kind, cubin) = compile(&real, &crate::source::nvrtc_options(arch), &source)
                .unwrap_or_else(|e| panic!("compiling the kernels for {arch}: {e}"));
            assert_eq!(kind, ImageKind::Cubin);
            for op in crate::Op::ALL {
                for dtype in crate::DType::ALL {
                    let symbol = crate::KernelId { op, dtype }.symbol();
                    assert!(cubin.windows(symbol.len()).any(|w| w == symbol.as_bytes()), "{arch}: no {symbol}");
                }
            }
            let virtual_arch = arch.replace("sm_", "compute_");
            let target = Target { name: virtual_arch.clone(), real: false };
            let (_, ptx) = compile(&target, &crate::source::nvrtc_options(&virtual_arch), &source).expect("ptx");
            let ptx = String::from_utf8_lossy(&ptx);
            let wide_loads = ptx.matches("ld.global.v4.u32").count();
            let wide_stores = ptx.matches("st.global.v4.u32").count();
            println!(
                "nvrtc {arch}: cubin {} bytes; PTX has {wide_loads} 128-bit global loads, {wide_stores} stores",
                cubin.len()
            );
            assert!(wide_loads >= 18 && wide_stores >= 18, "{arch}: hot loops are not 16-byte global accesses");
        }
    }

    #[test]
    fn cache_files_round_trip_and_reject_damage() {
        let dir = std::env::temp_dir().join(format!("arfuse-cuda-cache-test-{}", std::process::id()));
        let path = dir.join("sm_90").join("x.cubin");
        let payload = b"\x7fELF and some machine code".to_vec();
        write_cache(&path, ImageKind::Cubin, &payload);
        assert_eq!(read_cache(&path), Some((ImageKind::Cubin, payload.clone())));
        // Truncated, then one flipped bit: both refused.
        let mut file = std::fs::read(&path).unwrap_or_default();
        std::fs::write(&path, &file[..file.len() - 1]).ok();
        assert_eq!(read_cache(&path), None);
        let last = file.len() - 1;
        file[last] ^= 1;
        std::fs::write(&path, &file).ok();
        assert_eq!(read_cache(&path), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The kernels on an AMD device: where the code object comes from, the on-disk cache of compiled
//! ones, and the loaded module with one function per [`KernelId`].
//!
//! The code object for a device of architecture `<arch>` (see [`super::device`]) is, in order:
//! 1. `$ARFUSE_KERNEL_DIR/<arch>/arfuse-<source hash, 16 hex digits>.hsaco` if that file exists —
//!    what `cargo xtask kernels --emit DIR` writes ([`offline_image_path`]); a file that is there
//!    but does not load is an error, never silently replaced;
//! 2. the disk cache, `$XDG_CACHE_HOME/arfuse/hip/<arch>/` (else `~/.cache/...`), keyed by the
//!    source hash, a hash of the hipRTC options, the runtime's `HIP_VERSION` and the hipRTC library
//!    file (`hiprtcVersion` says 9.0 on every ROCm, so it cannot key anything); best effort: a file
//!    that fails its checksum, or that the runtime refuses, is compiled afresh and rewritten;
//! 3. hipRTC, on the full portable source, with `--offload-arch=<arch>` and the flags of
//!    [`crate::source`]'s clang command line that hipRTC takes ([`rtc_options`]).
//!
//! One image per process, architecture and source; one module per process and device (loaded with
//! that device current), its functions resolved up front, so a launch makes no call that could
//! wait for another rank's spinning kernel.

use super::device::HipDevice;
use super::result::{self, rtc};
use super::sys;
use crate::gpu::cache::DiskCache;
use crate::gpu::functions::FunctionTable;
use crate::source::fnv1a;
use crate::{Error, KernelId, Result};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

/// The environment variable naming a directory of offline-built code objects.
pub const KERNEL_DIR_ENV: &str = "ARFUSE_KERNEL_DIR";
/// The program name hipRTC reports in its log.
const PROGRAM_NAME: &str = "arfuse.hip";
/// What [`Error::Compile`] names: the module holds every kernel.
const MODULE_NAME: &str = "arfuse.hip (all kernels)";

/// The kernel source and its compile flags (from `crate::source`).
mod kernel_source {
    pub(super) fn text() -> String {
        crate::source::full_source()
    }
    pub(super) fn hash() -> u64 {
        crate::source::source_hash()
    }
    pub(super) fn clang_args(arch: &str) -> Vec<String> {
        crate::source::clang_hip_args(arch)
    }
}

/// Where `cargo xtask kernels --emit DIR` puts the code object of `arch` for the source whose
/// [`crate::source`] hash is `source_hash`: `DIR/<arch>/arfuse-<hash as 16 hex digits>.hsaco`.
pub fn offline_image_path(dir: &Path, arch: &str, source_hash: u64) -> PathBuf {
    dir.join(arch).join(format!("arfuse-{source_hash:016x}.hsaco"))
}

/// The hipRTC options for `arch` from a clang command line for the same source: `--offload-arch`,
/// then the flags that change the code and that hipRTC takes (`-O*`, `-std=*`, `-D*`, `-U*`,
/// `-ffp-contract=*`, `-f[no-]gpu-flush-denormals-to-zero`). The rest is about clang's driver
/// (`-x hip`, `--cuda-device-only`, `-nogpuinc`, `-nogpulib`, `-c`, `-o`, code-object version:
/// hipRTC emits what its own runtime loads) and is dropped.
pub fn rtc_options(clang_args: &[String], arch: &str) -> Vec<String> {
    let mut options = vec![format!("--offload-arch={arch}")];
    let mut args = clang_args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-D" | "-U" => options.extend(args.next().map(|value| format!("{arg}{value}"))),
            // Options whose value is the next argument; dropped with it.
            "-x" | "-o" | "-I" | "-include" | "-Xclang" | "-mllvm" | "-Xarch_device" | "-target" => {
                args.next();
            }
            other
                if other.starts_with("-O")
                    || other.starts_with("-std=")
                    || other.starts_with("-D")
                    || other.starts_with("-U")
                    || other.starts_with("-ffp-contract=")
                    || other == "-fgpu-flush-denormals-to-zero"
                    || other == "-fno-gpu-flush-denormals-to-zero" =>
            {
                options.push(other.to_string())
            }
            _ => {}
        }
    }
    options
}

/// Where a code object came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// `ARFUSE_KERNEL_DIR`.
    KernelDir(PathBuf),
    /// The disk cache (compiled by hipRTC in an earlier process).
    DiskCache(PathBuf),
    /// Compiled by hipRTC in this process, with the library at this path.
    Compiled(String),
}

/// A code object.
struct Image {
    bytes: Vec<u8>,
    arch: String,
    origin: Origin,
}

/// Code objects of this process by (architecture, source hash).
static IMAGES: Mutex<BTreeMap<(String, u64), Arc<Image>>> = parking_lot::const_mutex(BTreeMap::new());
/// Loaded modules by device ordinal.
static MODULES: Mutex<BTreeMap<usize, Weak<LoadedModule>>> = parking_lot::const_mutex(BTreeMap::new());

/// A kernel function of a loaded module.
pub(crate) struct LoadedFunction {
    raw: sys::hipFunction_t,
}

impl LoadedFunction {
    /// The raw handle (valid while the module lives).
    pub(crate) fn raw(&self) -> sys::hipFunction_t {
        self.raw
    }
}

/// The module of every kernel, loaded onto one device; unloaded (`hipModuleUnload`) when the last
/// device using it drops it.
pub(crate) struct LoadedModule {
    /// Every kernel's function (`None` where the source has no such kernel, e.g. an f32 variant).
    functions: FunctionTable<LoadedFunction>,
    raw: sys::hipModule_t,
    arch: String,
    origin: Origin,
}

// SAFETY: module and function handles are process-wide runtime objects, usable from any thread
// (the runtime locks its module tables); `LoadedModule` never mutates them after construction and
// unloads the module once, in `Drop`, when no reference is left.
unsafe impl Send for LoadedModule {}
// SAFETY: as above: shared references only read the handles.
unsafe impl Sync for LoadedModule {}

impl LoadedModule {
    /// The function of `kernel`, or a clear error if the code object does not define it.
    pub(crate) fn function(&self, kernel: KernelId) -> Result<&LoadedFunction> {
        self.functions.get(kernel, &self.arch, || self.describe())
    }

    /// E.g. `gfx942 from /opt/arfuse/kernels/gfx942/arfuse-….hsaco`.
    pub(crate) fn describe(&self) -> String {
        match &self.origin {
            Origin::KernelDir(path) => format!("{} from {}", self.arch, path.display()),
            Origin::DiskCache(path) => format!("{} hipRTC, cached in {}", self.arch, path.display()),
            Origin::Compiled(library) => format!("{} hipRTC ({library})", self.arch),
        }
    }
}

impl Drop for LoadedModule {
    fn drop(&mut self) {
        // SAFETY: the module is owned, live, unloaded once, and its functions (dropped with it) are
        // no longer used: every device that launched them held this module. A failure to unload
        // leaks device memory only, and no device is left to park it on: it is ignored.
        let _ = unsafe { result::module::unload(self.raw) };
    }
}

/// The module for `device`, shared with every other open of the same device in this process.
pub(crate) fn load(device: &HipDevice) -> Result<Arc<LoadedModule>> {
    let mut modules = MODULES.lock();
    if let Some(module) = modules.get(&device.ordinal()).and_then(Weak::upgrade) {
        return Ok(module);
    }
    let Some(arch) = device.arch() else {
        return Err(Error::Compile {
            kernel: MODULE_NAME.into(),
            arch: "unknown".into(),
            log: format!(
                "the architecture of HIP device {} ({}, compute capability {:?}) could not be determined; \
                 set {}=gfx942 (or whichever gfx target it is)",
                device.ordinal(),
                device.name(),
                device.compute_capability(),
                super::device::ARCH_ENV
            ),
        });
    };
    let image = image(arch, device.runtime_version(), false)?;
    let module = match load_image(device, &image) {
        Ok(module) => module,
        // A cached file the runtime refuses: compile afresh, replace the file, try once more.
        Err(err) if matches!(image.origin, Origin::DiskCache(_)) => {
            tracing::warn!(error = %err, "hip: the runtime refused the cached code object; recompiling");
            load_image(device, &*self::image(arch, device.runtime_version(), true)?)?
        }
        Err(err) => return Err(err),
    };
    modules.retain(|_, module| module.strong_count() > 0);
    modules.insert(device.ordinal(), Arc::downgrade(&module));
    Ok(module)
}

fn load_image(device: &HipDevice, image: &Image) -> Result<Arc<LoadedModule>> {
    let located = |err: String| Error::Compile {
        kernel: MODULE_NAME.into(),
        arch: image.arch.clone(),
        log: match &image.origin {
            Origin::KernelDir(path) | Origin::DiskCache(path) => format!("{}: {err}", path.display()),
            Origin::Compiled(library) => format!("code object from {library}: {err}"),
        },
    };
    check_image(&image.bytes).map_err(located)?;
    device.bind()?;
    // SAFETY: `check_image` verified that every header, segment and section the runtime reads lies
    // inside `bytes`.
    let raw = unsafe { result::module::load_data(&image.bytes) }.map_err(|err| located(err.to_string()))?;
    // From here on the module is owned by `loaded` (unloaded on drop, also on an early return).
    let mut loaded =
        LoadedModule { functions: FunctionTable::empty(), raw, arch: image.arch.clone(), origin: image.origin.clone() };
    loaded.functions = FunctionTable::resolve(|kernel| {
        let name = CString::new(kernel.symbol()).map_err(|_| located("a symbol contains NUL".into()))?;
        // SAFETY: the module is live (owned by `loaded`).
        let function = unsafe { result::module::get_function(raw, &name) }?;
        Ok(function.map(|raw| LoadedFunction { raw }))
    })?;
    Ok(Arc::new(loaded))
}

/// The code object for `arch`: from this process, `ARFUSE_KERNEL_DIR`, the disk cache or hipRTC.
/// `refresh` skips the caches (not the kernel directory's file) and overwrites them.
fn image(arch: &str, runtime_version: i32, refresh: bool) -> Result<Arc<Image>> {
    let source_hash = kernel_source::hash();
    let key = (arch.to_string(), source_hash);
    let mut images = IMAGES.lock();
    let offline = std::env::var_os(KERNEL_DIR_ENV)
        .filter(|dir| !dir.is_empty())
        .map(|dir| offline_image_path(Path::new(&dir), arch, source_hash));
    if !refresh {
        if let Some(image) = images.get(&key) {
            return Ok(image.clone());
        }
        if let Some(path) = offline.as_ref().filter(|path| path.is_file()) {
            let bytes = std::fs::read(path).map_err(|source| Error::Os { call: "read", source })?;
            tracing::debug!(arch, path = %path.display(), bytes = bytes.len(), "hip: code object from ARFUSE_KERNEL_DIR");
            let image = Arc::new(Image { bytes, arch: arch.into(), origin: Origin::KernelDir(path.clone()) });
            images.insert(key, image.clone());
            return Ok(image);
        }
    }
    let library = rtc::library().map_err(|err| match (err, &offline) {
        (Error::BackendUnavailable { backend, reason }, Some(path)) => Error::BackendUnavailable {
            backend,
            reason: format!("{reason}; {KERNEL_DIR_ENV} names no {}", path.display()),
        },
        (err, _) => err,
    })?;
    let options = rtc_options(&kernel_source::clang_args(arch), arch);
    let path = cache_path(arch, source_hash, &options, runtime_version, library);
    let cached = match (&path, refresh) {
        (Some(path), false) => read_cache(path),
        _ => None,
    };
    let image = match (cached, path) {
        (Some(bytes), Some(path)) => {
            tracing::debug!(arch, path = %path.display(), bytes = bytes.len(), "hip: code object from the disk cache");
            Image { bytes, arch: arch.into(), origin: Origin::DiskCache(path) }
        }
        (_, path) => {
            let started = std::time::Instant::now();
            let bytes = compile(library, arch, &options, &kernel_source::text())?;
            tracing::info!(arch, library = library.path(), elapsed = ?started.elapsed(), bytes = bytes.len(), cache = ?path, "hip: kernels compiled with hipRTC");
            if let Some(path) = &path {
                write_cache(path, &bytes);
            }
            Image { bytes, arch: arch.into(), origin: Origin::Compiled(library.path().to_string()) }
        }
    };
    let image = Arc::new(image);
    images.insert(key, image.clone());
    Ok(image)
}

/// Compiles `source` for `arch` with hipRTC; a failure is [`Error::Compile`] with the log.
pub(crate) fn compile(library: &rtc::Rtc, arch: &str, options: &[String], source: &str) -> Result<Vec<u8>> {
    let compile_error = |log: String| Error::Compile { kernel: MODULE_NAME.into(), arch: arch.into(), log };
    let source = CString::new(source).map_err(|_| compile_error("the kernel source contains a NUL byte".into()))?;
    let c_options = options
        .iter()
        .map(|o| CString::new(o.as_str()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| compile_error(format!("a hipRTC option contains a NUL byte: {options:?}")))?;
    let name = CString::new(PROGRAM_NAME).map_err(|_| compile_error("bad program name".into()))?;
    match library.compile(&source, &name, &c_options) {
        Ok(code) if code.is_empty() => Err(compile_error(format!(
            "hipRTC ({}) returned an empty code object; options: {options:?}",
            library.path()
        ))),
        Ok(code) => Ok(code),
        Err((err, log)) => {
            Err(compile_error(format!("{log}\n{err}\noptions: {options:?}\nhipRTC: {}", library.path())))
        }
    }
}

// ---- code object checks ---------------------------------------------------------------------------

/// The magic of an (uncompressed) clang offload bundle.
const BUNDLE_MAGIC: &[u8] = b"__CLANG_OFFLOAD_BUNDLE__";

/// `Ok` if `bytes` is a whole ELF64 code object or uncompressed clang offload bundle: every table,
/// segment and section (bundle entry) the runtime reads lies inside `bytes`. `hipModuleLoadData`
/// takes no length, so a truncated or foreign file must be stopped here.
pub(crate) fn check_image(bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.starts_with(b"\x7fELF") {
        check_elf(bytes)
    } else if bytes.starts_with(BUNDLE_MAGIC) {
        check_bundle(bytes)
    } else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Err(format!(
            "not a code object: starts with [{}], neither an ELF file nor an uncompressed clang offload bundle",
            head.join(" ")
        ))
    }
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u16::from_le_bytes(bytes.get(at..at.checked_add(2)?)?.try_into().ok()?)))
}
fn read_u32(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?)))
}
fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// Whether `offset + count * size` bytes fit in `len`.
fn fits(len: usize, offset: u64, count: u64, size: u64) -> bool {
    count.checked_mul(size).and_then(|n| n.checked_add(offset)).is_some_and(|end| end <= len as u64)
}

fn check_elf(bytes: &[u8]) -> std::result::Result<(), String> {
    const EM_AMDGPU: u64 = 0xe0;
    let len = bytes.len();
    let truncated = || format!("truncated or malformed ELF file ({len} bytes)");
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let machine = read_u16(bytes, 0x12).ok_or_else(truncated)?;
    if machine != EM_AMDGPU {
        return Err(format!("an ELF file for machine {machine:#x}, not AMDGPU (0xe0)"));
    }
    let (phoff, shoff) = (read_u64(bytes, 0x20).ok_or_else(truncated)?, read_u64(bytes, 0x28).ok_or_else(truncated)?);
    let (phentsize, phnum) =
        (read_u16(bytes, 0x36).ok_or_else(truncated)?, read_u16(bytes, 0x38).ok_or_else(truncated)?);
    let (shentsize, shnum) =
        (read_u16(bytes, 0x3a).ok_or_else(truncated)?, read_u16(bytes, 0x3c).ok_or_else(truncated)?);
    if (phnum > 0 && phentsize < 56) || (shnum > 0 && shentsize < 64) {
        return Err(truncated());
    }
    if !fits(len, phoff, phnum, phentsize) || !fits(len, shoff, shnum, shentsize) {
        return Err(truncated());
    }
    for i in 0..phnum {
        let at = (phoff + i * phentsize) as usize;
        let (offset, size) =
            (read_u64(bytes, at + 8).ok_or_else(truncated)?, read_u64(bytes, at + 32).ok_or_else(truncated)?);
        if !fits(len, offset, 1, size) {
            return Err(truncated());
        }
    }
    const SHT_NOBITS: u64 = 8;
    for i in 0..shnum {
        let at = (shoff + i * shentsize) as usize;
        let kind = read_u32(bytes, at + 4).ok_or_else(truncated)?;
        let (offset, size) =
            (read_u64(bytes, at + 24).ok_or_else(truncated)?, read_u64(bytes, at + 32).ok_or_else(truncated)?);
        if kind != SHT_NOBITS && !fits(len, offset, 1, size) {
            return Err(truncated());
        }
    }
    Ok(())
}

fn check_bundle(bytes: &[u8]) -> std::result::Result<(), String> {
    let len = bytes.len();
    let truncated = || format!("truncated or malformed clang offload bundle ({len} bytes)");
    let mut at = BUNDLE_MAGIC.len();
    let entries = read_u64(bytes, at).ok_or_else(truncated)?;
    at += 8;
    if entries == 0 || entries > 1024 {
        return Err(truncated());
    }
    for _ in 0..entries {
        let (offset, size, triple) = (
            read_u64(bytes, at).ok_or_else(truncated)?,
            read_u64(bytes, at + 8).ok_or_else(truncated)?,
            read_u64(bytes, at + 16).ok_or_else(truncated)?,
        );
        at += 24;
        if !fits(len, offset, 1, size) || !fits(len, at as u64, 1, triple) {
            return Err(truncated());
        }
        at += triple as usize;
    }
    Ok(())
}

// ---- the disk cache ------------------------------------------------------------------------------

/// The disk cache (kind tag 0: a code object).
const CACHE: DiskCache = DiskCache { magic: b"ARFHIP01", backend: "hip" };

/// A fingerprint of the hipRTC library: its resolved file, size and modification time.
fn library_fingerprint(library: &rtc::Rtc) -> u64 {
    let file = library.file().unwrap_or_else(|| PathBuf::from(library.path()));
    let mut identity = file.to_string_lossy().into_owned();
    if let Ok(meta) = std::fs::metadata(&file) {
        let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        identity.push_str(&format!("\u{1f}{}\u{1f}{:?}", meta.len(), modified.map(|d| d.as_secs())));
    }
    fnv1a(identity.as_bytes())
}

/// `<cache>/arfuse/hip/<arch>/<source hash>-<options hash>-hip<HIP_VERSION>-<hipRTC file hash>.hsaco`.
fn cache_path(
    arch: &str,
    source_hash: u64,
    options: &[String],
    runtime_version: i32,
    library: &rtc::Rtc,
) -> Option<PathBuf> {
    let options_hash = fnv1a(options.join("\u{1f}").as_bytes());
    let file = format!(
        "{source_hash:016x}-{:08x}-hip{runtime_version}-{:08x}.hsaco",
        options_hash as u32,
        library_fingerprint(library) as u32
    );
    Some(CACHE.root()?.join(arch).join(file))
}

/// A cache file's payload if it is whole and a plausible code object; `None` otherwise (then it
/// is recompiled).
pub(crate) fn read_cache(path: &Path) -> Option<Vec<u8>> {
    let (tag, payload) = CACHE.read(path)?;
    (tag == 0 && check_image(&payload).is_ok()).then_some(payload)
}

/// Writes a cache file (best effort, see [`DiskCache::write`]).
pub(crate) fn write_cache(path: &Path, payload: &[u8]) {
    CACHE.write(path, 0, payload);
}

/// Whether hipRTC loads here, and from where (for diagnostics and tests).
pub(crate) fn rtc_library_path() -> Result<String> {
    rtc::library().map(|library| library.path().to_string())
}

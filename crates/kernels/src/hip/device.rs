//! [`HipDevice`]: one rank's handle on an AMD GPU — the attributes kernels are sized by, the
//! architecture its code objects are built for, its loaded kernels, and the errors parked by
//! `Drop` implementations.
//!
//! # Which architecture (`gfx942`, ...) a device has
//! The ABI-stable queries cannot name it: `hipDeviceGetAttribute` has no string attributes (the
//! old `hipDeviceAttributeGcnArchName` is `Unused5` since ROCm 6), compute capability 9.0 is gfx900,
//! gfx906, gfx908 and gfx90a alike, and `hipGetDeviceProperties` (whose `gcnArchName` would say)
//! changed layout in ROCm 6. So, in order:
//! 1. `ARFUSE_HIP_ARCH` (e.g. `gfx942`), for every device of the process;
//! 2. the kernel's own topology: the `/sys/class/kfd/kfd/topology/nodes/*/properties` node whose
//!    PCI location (`domain`, `location_id` = bus << 8 | device << 3 | function) is the device's
//!    (`hipDeviceAttributePci{Domain,Bus,Device}Id`), its `gfx_target_version` (major · 10000 +
//!    minor · 100 + stepping: 90402 → gfx942, 90010 → gfx90a). This is where the HIP runtime itself
//!    gets the ISA (through ROCr), it needs no ROCm library, and matching by PCI location is immune
//!    to `HIP_VISIBLE_DEVICES`/`ROCR_VISIBLE_DEVICES` renumbering. Nodes of one partitioned GPU
//!    share the location and the ISA;
//! 3. compute capability 9.4 → gfx942 and 9.5 → gfx950 (MI300 and MI350 series; unambiguous on the
//!    ROCm versions that support those GPUs). Otherwise the architecture is unknown: the device
//!    opens, and loading kernels fails with an error that names `ARFUSE_HIP_ARCH`.

use super::module::{self, LoadedModule};
use super::result::{self, attr};
use crate::gpu::parked::Parked;
use crate::{BackendKind, Error, Result};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The environment variable that names the architecture of every device (see the module docs).
pub const ARCH_ENV: &str = "ARFUSE_HIP_ARCH";
/// Where the kernel driver describes its GPUs.
const KFD_TOPOLOGY: &str = "/sys/class/kfd/kfd/topology/nodes";

/// How a device's architecture was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchSource {
    /// From `ARFUSE_HIP_ARCH`.
    Environment,
    /// From the KFD topology in sysfs, matched by PCI location.
    KfdTopology,
    /// Inferred from the compute capability (9.4 → gfx942, 9.5 → gfx950).
    ComputeCapability,
}

/// A GPU opened for one rank: the attributes launches are sized by, its architecture, and the
/// kernels (compiled and loaded on first use, or by [`HipDevice::load_kernels`]). Cheap to clone.
///
/// HIP has no contexts to retain: a device is made current per thread (`hipSetDevice`) before each
/// call that needs one, so the type holds no runtime handle of its own.
#[derive(Clone)]
pub struct HipDevice(pub(crate) Arc<DeviceInner>);

pub(crate) struct DeviceInner {
    pub(crate) ordinal: usize,
    name: String,
    arch: Option<(String, ArchSource)>,
    compute_capability: (i32, i32),
    pci: PciLocation,
    cu_count: u32,
    warp_size: u32,
    max_shared_per_block: u32,
    co_resident_ranks: usize,
    runtime_version: i32,
    kernels: OnceLock<Arc<LoadedModule>>,
    parked: Parked,
}

/// A PCI location as HIP reports it; `domain` is `None` where the runtime does not answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PciLocation {
    pub(crate) domain: Option<u32>,
    pub(crate) bus: u32,
    pub(crate) device: u32,
}

/// Initialises the runtime (once) and reports whether it works: the first step of every entry
/// point. A machine without a GPU gets [`Error::BackendUnavailable`].
pub(crate) fn probe_runtime() -> Result<()> {
    match result::init() {
        result::code::SUCCESS => Ok(()),
        status => Err(Error::BackendUnavailable {
            backend: BackendKind::Hip,
            reason: format!("hipInit failed: {}", result::error("hipInit", status)),
        }),
    }
}

/// Number of visible devices; 0 (not an error) where the runtime finds no GPU.
pub(crate) fn count() -> Result<usize> {
    match result::init() {
        result::code::SUCCESS => {}
        // HIP 5.2 answers hipInit with "invalid device" and hipGetDeviceCount with "no device"
        // on a machine without a GPU (or without /dev/kfd access).
        result::code::NO_DEVICE | result::code::INVALID_DEVICE => return Ok(0),
        _ => return probe_runtime().map(|()| 0),
    }
    match result::device::count_raw() {
        (result::code::SUCCESS, n) => Ok(n),
        (result::code::NO_DEVICE, _) => Ok(0),
        (status, _) => Err(result::error("hipGetDeviceCount", status)),
    }
}

impl HipDevice {
    /// Opens device `ordinal` (see [`crate::Backend::open_device`]).
    pub(crate) fn open(ordinal: usize, co_resident_ranks: usize) -> Result<HipDevice> {
        let visible = count()?;
        if ordinal >= visible {
            return Err(Error::BackendUnavailable {
                backend: BackendKind::Hip,
                reason: format!("HIP device {ordinal} was asked for, but {visible} device(s) are visible"),
            });
        }
        probe_runtime()?;
        result::device::set(ordinal)?;
        let attribute = |number| result::device::attribute(ordinal, number);
        let compute_capability =
            (attribute(attr::COMPUTE_CAPABILITY_MAJOR)?, attribute(attr::COMPUTE_CAPABILITY_MINOR)?);
        let cu_count = attribute(attr::MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let warp_size = attribute(attr::WARP_SIZE)?.max(1) as u32;
        let max_shared_per_block = attribute(attr::MAX_SHARED_MEMORY_PER_BLOCK)?.max(0) as u32;
        let pci = PciLocation {
            // Optional: older runtimes may not answer it; bus and device still locate the GPU.
            domain: attribute(attr::PCI_DOMAIN_ID).ok().map(|d| d.max(0) as u32),
            bus: attribute(attr::PCI_BUS_ID)?.max(0) as u32,
            device: attribute(attr::PCI_DEVICE_ID)?.max(0) as u32,
        };
        let name = result::device::name(ordinal)?;
        let runtime_version = result::runtime_version()?;
        let arch =
            find_arch(std::env::var(ARCH_ENV).ok().as_deref(), Path::new(KFD_TOPOLOGY), pci, compute_capability)?;
        Ok(HipDevice(Arc::new(DeviceInner {
            ordinal,
            name,
            arch,
            compute_capability,
            pci,
            cu_count,
            warp_size,
            max_shared_per_block,
            co_resident_ranks: co_resident_ranks.max(1),
            runtime_version,
            kernels: OnceLock::new(),
            parked: Parked::default(),
        })))
    }

    /// The device ordinal (as this process numbers devices, after `HIP_VISIBLE_DEVICES`).
    pub fn ordinal(&self) -> usize {
        self.0.ordinal
    }
    /// The name the runtime reports, e.g. `AMD Instinct MI300X`.
    pub fn name(&self) -> &str {
        &self.0.name
    }
    /// The architecture code objects are built for, e.g. `gfx942`; `None` where it could not be
    /// determined (see the module documentation; set `ARFUSE_HIP_ARCH`).
    pub fn arch(&self) -> Option<&str> {
        self.0.arch.as_ref().map(|(arch, _)| arch.as_str())
    }
    /// How [`HipDevice::arch`] was found.
    pub fn arch_source(&self) -> Option<ArchSource> {
        self.0.arch.as_ref().map(|&(_, source)| source)
    }
    /// The compute capability HIP reports: the ISA major and minor version, e.g. `(9, 4)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.0.compute_capability
    }
    /// Compute units on the device.
    pub fn cu_count(&self) -> u32 {
        self.0.cu_count
    }
    /// Threads per wavefront (64 on gfx90a/gfx942/gfx950; read, never assumed).
    pub fn warp_size(&self) -> u32 {
        self.0.warp_size
    }
    /// How many ranks drive this device at once (see [`crate::Backend::open_device`]).
    pub fn co_resident_ranks(&self) -> usize {
        self.0.co_resident_ranks
    }
    /// The compute units one rank's kernels may fill: `cu_count / co_resident_ranks`, at least 1.
    pub fn cus_per_rank(&self) -> u32 {
        (self.0.cu_count / self.0.co_resident_ranks as u32).max(1)
    }
    /// The most shared memory (LDS) a block may use, in bytes.
    pub fn max_shared_bytes_per_block(&self) -> u32 {
        self.0.max_shared_per_block
    }
    /// The runtime's `HIP_VERSION`, e.g. 60241134 for 6.2.41134.
    pub fn runtime_version(&self) -> i32 {
        self.0.runtime_version
    }

    /// Compiles (or takes from the caches) and loads every kernel now. Launches do this on first
    /// use; call it first where that first use must not stall: before ranks that share this GPU
    /// start spinning on each other, and before stream capture.
    pub fn load_kernels(&self) -> Result<()> {
        self.kernels().map(|_| ())
    }

    /// Where the loaded kernels came from, once loaded: e.g. `Some("gfx942 hipRTC (cached)")`.
    pub fn kernel_origin(&self) -> Option<String> {
        self.0.kernels.get().map(|k| k.describe())
    }

    /// Returns (and clears) the first error parked by a `Drop` since the last check.
    pub fn check_err(&self) -> Result<()> {
        self.0.parked.take()
    }

    /// Free and total device memory in bytes (`hipMemGetInfo`).
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        result::mem::info()
    }

    /// Makes this device current on the calling thread (`hipSetDevice`; thread-local, cheap).
    pub(crate) fn bind(&self) -> Result<()> {
        result::device::set(self.0.ordinal)
    }

    /// Keeps the first failure of a call that cannot return one (a `Drop`).
    pub(crate) fn record_err(&self, res: Result<()>) {
        self.0.parked.record(res);
    }

    /// The loaded kernels, loading them on first use.
    pub(crate) fn kernels(&self) -> Result<&Arc<LoadedModule>> {
        if let Some(kernels) = self.0.kernels.get() {
            return Ok(kernels);
        }
        let loaded = module::load(self)?;
        // A racing thread may have set it first; both hold the same process-wide module.
        let _ = self.0.kernels.set(loaded);
        self.0.kernels.get().ok_or_else(|| Error::BackendUnavailable {
            backend: BackendKind::Hip,
            reason: "kernel module vanished after loading".into(),
        })
    }
}

impl fmt::Debug for HipDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HipDevice")
            .field("ordinal", &self.0.ordinal)
            .field("name", &self.0.name)
            .field("arch", &self.0.arch)
            .field("pci", &self.0.pci)
            .field("co_resident_ranks", &self.0.co_resident_ranks)
            .finish()
    }
}

impl fmt::Display for HipDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor, patch) = result::split_version(self.0.runtime_version);
        let arch = match &self.0.arch {
            Some((arch, ArchSource::Environment)) => format!("{arch} from {ARCH_ENV}"),
            Some((arch, ArchSource::KfdTopology)) => arch.clone(),
            Some((arch, ArchSource::ComputeCapability)) => format!("{arch} inferred"),
            None => format!("unknown arch, set {ARCH_ENV}"),
        };
        write!(
            f,
            "{} (hip:{}, {arch}, {} CUs, wavefront {}, HIP {major}.{minor}.{patch}",
            if self.0.name.is_empty() { "AMD GPU" } else { &self.0.name },
            self.0.ordinal,
            self.0.cu_count,
            self.0.warp_size,
        )?;
        if self.0.co_resident_ranks > 1 {
            write!(f, "; {} CUs per rank, {} ranks share it", self.cus_per_rank(), self.0.co_resident_ranks)?;
        }
        if let Some(origin) = self.kernel_origin() {
            write!(f, "; kernels: {origin}")?;
        }
        f.write_str(")")
    }
}

// ---- architecture -----------------------------------------------------------------------------

/// The architecture of the device at `pci` (see the module documentation for the order).
/// `Err` only for a malformed `ARFUSE_HIP_ARCH`.
pub(crate) fn find_arch(
    env: Option<&str>,
    topology: &Path,
    pci: PciLocation,
    compute_capability: (i32, i32),
) -> Result<Option<(String, ArchSource)>> {
    if let Some(value) = env.map(str::trim).filter(|v| !v.is_empty()) {
        return match parse_arch_name(value) {
            Some(arch) => Ok(Some((arch, ArchSource::Environment))),
            None => Err(Error::BackendUnavailable {
                backend: BackendKind::Hip,
                reason: format!("{ARCH_ENV}={value:?} is not an AMD GPU architecture such as gfx942"),
            }),
        };
    }
    if let Some(arch) = arch_from_topology(topology, pci) {
        return Ok(Some((arch, ArchSource::KfdTopology)));
    }
    Ok(arch_from_compute_capability(compute_capability).map(|arch| (arch.to_string(), ArchSource::ComputeCapability)))
}

/// `gfx942`, `gfx90a`, `gfx1100` (a target id's features, `gfx942:sramecc+:xnack-`, are dropped:
/// a code object built without them runs with either setting).
pub(crate) fn parse_arch_name(value: &str) -> Option<String> {
    let processor = value.split(':').next()?.trim().to_ascii_lowercase();
    let digits = processor.strip_prefix("gfx")?;
    let valid = (3..=5).contains(&digits.len())
        && digits.starts_with(|c: char| c.is_ascii_digit())
        && digits.chars().all(|c| c.is_ascii_hexdigit());
    valid.then_some(processor)
}

/// `gfx_target_version` (major · 10000 + minor · 100 + stepping) as an architecture name.
pub(crate) fn arch_from_target_version(version: u64) -> Option<String> {
    let (major, minor, stepping) = (version / 10_000, (version / 100) % 100, version % 100);
    (major > 0 && minor < 16 && stepping < 16).then(|| format!("gfx{major}{minor:x}{stepping:x}"))
}

/// The `key value` lines of a KFD node's `properties` file.
pub(crate) fn parse_kfd_properties(text: &str) -> Vec<(&str, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next()?;
            let value = words.next()?.parse().ok()?;
            Some((key, value))
        })
        .collect()
}

/// The architecture of the KFD node(s) at `pci`, if every matching GPU node agrees on one.
fn arch_from_topology(topology: &Path, pci: PciLocation) -> Option<String> {
    let mut found: Option<String> = None;
    for entry in std::fs::read_dir(topology).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("properties")) else { continue };
        let Some(arch) = node_arch_at(&parse_kfd_properties(&text), pci) else { continue };
        match &found {
            Some(previous) if *previous != arch => return None,
            _ => found = Some(arch),
        }
    }
    found
}

/// The architecture of one KFD node if it is a GPU at `pci`.
pub(crate) fn node_arch_at(properties: &[(&str, u64)], pci: PciLocation) -> Option<String> {
    let get = |key: &str| properties.iter().find(|&&(k, _)| k == key).map(|&(_, v)| v);
    let version = get("gfx_target_version").filter(|&v| v > 0)?;
    let location = get("location_id")?;
    let (bus, device) = ((location >> 8) & 0xff, (location >> 3) & 0x1f);
    if bus != u64::from(pci.bus) || device != u64::from(pci.device) {
        return None;
    }
    if let (Some(domain), Some(theirs)) = (pci.domain, get("domain")) {
        if u64::from(domain) != theirs {
            return None;
        }
    }
    arch_from_target_version(version)
}

/// The architectures a compute capability names unambiguously.
pub(crate) fn arch_from_compute_capability(cc: (i32, i32)) -> Option<&'static str> {
    match cc {
        (9, 4) => Some("gfx942"),
        (9, 5) => Some("gfx950"),
        _ => None,
    }
}

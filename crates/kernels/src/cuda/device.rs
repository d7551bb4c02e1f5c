//! [`CudaDevice`]: one rank's handle on a GPU — its primary context, the attributes kernels are
//! sized by, its loaded kernels, and the errors parked by `Drop` implementations.

use super::module::{self, LoadedModule};
use super::result::{self, CallExt};
use crate::gpu::parked::Parked;
use crate::{BackendKind, Error, Result};
use cudarc::driver::result as cu;
use cudarc::driver::{sys, CudaContext};
use std::fmt;
use std::sync::{Arc, OnceLock};

/// A GPU opened for one rank: its primary context (retained while any clone lives, released on
/// drop), the attributes launches are sized by, and the kernels (compiled and loaded on first use,
/// or by [`CudaDevice::load_kernels`]). Cheap to clone.
#[derive(Clone)]
pub struct CudaDevice(pub(crate) Arc<DeviceInner>);

pub(crate) struct DeviceInner {
    /// The device's primary context (cudarc retains it in `CudaContext::new` and releases it on drop).
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    sm_count: u32,
    warp_size: u32,
    max_shared_optin: u32,
    co_resident_ranks: usize,
    driver_version: i32,
    kernels: OnceLock<Arc<LoadedModule>>,
    parked: Parked,
}

/// Checks that the driver library loads and initialises; the first step of every entry point.
pub(crate) fn probe_driver() -> Result<()> {
    if !result::driver_present() {
        return Err(Error::BackendUnavailable {
            backend: BackendKind::Cuda,
            reason: format!(
                "the CUDA driver library could not be loaded (tried {}); is an NVIDIA driver installed?",
                result::library_candidates("cuda")
            ),
        });
    }
    result::init().map_err(|err| Error::BackendUnavailable {
        backend: BackendKind::Cuda,
        reason: format!("cuInit failed: {}", result::driver_error("cuInit", err)),
    })
}

impl CudaDevice {
    /// Opens device `ordinal` (see [`crate::Backend::open_device`]).
    pub(crate) fn open(ordinal: usize, co_resident_ranks: usize) -> Result<CudaDevice> {
        probe_driver()?;
        let count = cu::device::get_count().call("cuDeviceGetCount")?.max(0) as usize;
        if ordinal >= count {
            return Err(Error::BackendUnavailable {
                backend: BackendKind::Cuda,
                reason: format!("CUDA device {ordinal} was asked for, but {count} device(s) are visible"),
            });
        }
        let ctx = CudaContext::new(ordinal).call("cuDevicePrimaryCtxRetain")?;
        // SAFETY: cudarc's event tracking only concerns its `CudaSlice` type, which this backend never
        // creates; turning it off keeps `new_stream` from synchronising the whole context (which
        // would wait for a peer rank's spinning kernel on the same GPU).
        unsafe { ctx.disable_event_tracking() };
        let cu_device = ctx.cu_device();
        // SAFETY: `cu_device` is the device of a live primary context, as `cuDeviceGetAttribute` requires.
        let attribute =
            |attribute| unsafe { cu::device::get_attribute(cu_device, attribute) }.call("cuDeviceGetAttribute");
        use sys::CUdevice_attribute as A;
        let compute_capability = (
            attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let sm_count = attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        let warp_size = attribute(A::CU_DEVICE_ATTRIBUTE_WARP_SIZE)?.max(1) as u32;
        let max_shared_optin = attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as u32;
        let name = ctx.name().call("cuDeviceGetName")?;
        let driver_version = result::device::driver_version()?;
        Ok(CudaDevice(Arc::new(DeviceInner {
            ctx,
            ordinal,
            name,
            compute_capability,
            sm_count,
            warp_size,
            max_shared_optin,
            co_resident_ranks: co_resident_ranks.max(1),
            driver_version,
            kernels: OnceLock::new(),
            parked: Parked::default(),
        })))
    }

    /// The device ordinal (as this process numbers devices, after `CUDA_VISIBLE_DEVICES`).
    pub fn ordinal(&self) -> usize {
        self.0.ordinal
    }
    /// The marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> &str {
        &self.0.name
    }
    /// The compute capability, e.g. `(9, 0)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.0.compute_capability
    }
    /// The real architecture name, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        let (major, minor) = self.0.compute_capability;
        format!("sm_{major}{minor}")
    }
    /// Streaming multiprocessors on the device.
    pub fn sm_count(&self) -> u32 {
        self.0.sm_count
    }
    /// Threads per warp (32 on every NVIDIA GPU so far; read, never assumed).
    pub fn warp_size(&self) -> u32 {
        self.0.warp_size
    }
    /// How many ranks drive this device at once (see [`crate::Backend::open_device`]).
    pub fn co_resident_ranks(&self) -> usize {
        self.0.co_resident_ranks
    }
    /// The multiprocessors one rank's kernels may fill: `sm_count / co_resident_ranks`, at least 1.
    pub fn sms_per_rank(&self) -> u32 {
        (self.0.sm_count / self.0.co_resident_ranks as u32).max(1)
    }
    /// The most shared memory a block may opt in to, in bytes.
    pub fn max_shared_bytes_per_block(&self) -> u32 {
        self.0.max_shared_optin
    }
    /// The driver's CUDA version, e.g. 13000 for 13.0.
    pub fn driver_version(&self) -> i32 {
        self.0.driver_version
    }

    /// Compiles (or takes from the caches) and loads every kernel now, and finishes loading each
    /// function. Launches do this on first use; call it first where that first use must not
    /// stall: before ranks that share this GPU start spinning on each other, and before stream
    /// capture.
    pub fn load_kernels(&self) -> Result<()> {
        self.kernels().map(|_| ())
    }

    /// What the kernels were built for once loaded: e.g. `Some("sm_90 cubin")`, or
    /// `Some("compute_90 ptx")` when NVRTC could not target the device's architecture itself.
    pub fn kernel_target(&self) -> Option<String> {
        self.0.kernels.get().map(|k| k.describe())
    }

    /// Returns (and clears) the first error parked by a `Drop` since the last check.
    pub fn check_err(&self) -> Result<()> {
        self.0.parked.take()?;
        self.0.ctx.check_err().call("(an earlier cudarc drop)")
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`), as this context sees them.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        cu::mem_get_info().call("cuMemGetInfo")
    }

    /// Makes this device's context current on the calling thread.
    pub(crate) fn bind(&self) -> Result<()> {
        result::ctx::bind(self.0.ctx.cu_ctx())
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
            backend: BackendKind::Cuda,
            reason: "kernel module vanished after loading".into(),
        })
    }

    pub(crate) fn cu_device(&self) -> sys::CUdevice {
        self.0.ctx.cu_device()
    }
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.0.ordinal)
            .field("name", &self.0.name)
            .field("arch", &self.arch())
            .field("co_resident_ranks", &self.0.co_resident_ranks)
            .finish()
    }
}

impl fmt::Display for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let version = self.0.driver_version;
        write!(
            f,
            "{} (cuda:{}, {}, {} SMs, warp {}, driver CUDA {}.{}",
            self.0.name,
            self.0.ordinal,
            self.arch(),
            self.0.sm_count,
            self.0.warp_size,
            version / 1000,
            (version % 1000) / 10
        )?;
        if self.0.co_resident_ranks > 1 {
            write!(f, "; {} SMs per rank, {} ranks share it", self.sms_per_rank(), self.0.co_resident_ranks)?;
        }
        if let Some(target) = self.kernel_target() {
            write!(f, "; kernels: {target}")?;
        }
        f.write_str(")")
    }
}

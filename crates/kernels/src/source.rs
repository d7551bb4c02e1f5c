//! The portable kernel source (one text for CUDA and HIP) and how to compile it.
//!
//! INTERFACE STUB: the GPU-kernel work fills this in (see `gpu/`).

use crate::{KernelId, LaunchParams};

/// How to launch one kernel: grid and block sizes and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks in the grid (x dimension only).
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
}

/// The launch configuration of `kernel` for `params` on a device with `sm_count` multiprocessors
/// (compute units) and a warp (wavefront) of `warp_size` threads.
pub fn launch_config(kernel: KernelId, params: &LaunchParams, sm_count: u32, warp_size: u32) -> LaunchConfig {
    let _ = (kernel, params, sm_count, warp_size);
    LaunchConfig { grid: 1, block: 256, shared_bytes: 0 }
}

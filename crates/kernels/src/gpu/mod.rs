//! What the GPU backends (`cuda`, `hip`) share, so that each writes only what its runtime needs:
//!
//! | piece | here |
//! |---|---|
//! | plain device memory, graph capture and replay, the queries generic tests make | [`GpuBackend`] |
//! | an owned typed allocation (`CudaBuffer<T>`, `HipBuffer<T>`) | [`DeviceBuffer`] |
//! | who exported an IPC handle (its first 32 bytes) and the process token | [`HandleOrigin`] |
//! | IPC opens shared by every mapping of one handle on one device | `opens` |
//! | compiled images on disk (format, location, checksum) | `cache` |
//! | the loaded function of every kernel, by [`crate::KernelId`] | `functions` |
//! | errors parked by `Drop`, reported by the next check | `parked` |
//!
//! No generic driver trait: as in cubecl, the CUDA and HIP runtimes stay separate modules with
//! their own FFI; only what they would both write the same way lives here. The folder also holds
//! the portable kernel source (`kernels.cu`, `arfuse.h`), which [`crate::source`] embeds.

mod backend;
mod buffer;
#[cfg(any(feature = "cuda", feature = "hip"))]
pub(crate) mod cache;
#[cfg(any(feature = "cuda", feature = "hip"))]
pub(crate) mod functions;
mod handle;
#[cfg(any(feature = "cuda", feature = "hip"))]
pub(crate) mod opens;
#[cfg(any(feature = "cuda", feature = "hip"))]
pub(crate) mod parked;

pub use backend::GpuBackend;
pub use buffer::DeviceBuffer;
pub use handle::HandleOrigin;

//! What the GPU backends (`cuda`, `hip`) share: the [`GpuBackend`] trait (owned typed buffers,
//! graph capture and replay, the queries tests and benchmarks make), [`HandleOrigin`] (the part of
//! an IPC handle that says who exported it), and the pieces both backends would otherwise write
//! twice (the table of IPC opens). The folder also holds the portable kernel source (`kernels.cu`,
//! `arfuse.h`), which [`crate::source`] embeds.

mod backend;
#[cfg(any(feature = "cuda", feature = "hip"))]
pub(crate) mod opens;

pub use backend::{GpuBackend, HandleOrigin};

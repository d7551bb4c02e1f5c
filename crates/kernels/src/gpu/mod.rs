//! What the GPU backends (`cuda`, `hip`) share: the [`GpuBackend`] trait (owned typed buffers,
//! graph capture and replay, the queries tests and benchmarks make) and [`HandleOrigin`], the
//! part of an IPC handle that says who exported it. The folder also holds the portable kernel
//! source (`kernels.cu`, `arfuse.h`), which [`crate::source`] embeds.

mod backend;

pub use backend::{GpuBackend, HandleOrigin};

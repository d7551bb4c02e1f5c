//! # arfuse-kernels
//!
//! The device runtime under arfuse: backends, shared memory, the kernel source and launchers.
//! It knows nothing about ranks or rendezvous (that is `arfuse-ipc`), nor about user input
//! validation (that is `arfuse-fusion`).
//!
//! | concept | here |
//! |---|---|
//! | backend (cpu, cuda, hip) | [`Backend`], [`cpu::Cpu`] |
//! | what the GPU backends add: owned buffers, captured graphs | [`GpuBackend`] |
//! | device memory peers can map | [`Backend::SharedBuffer`], exported as [`Backend::IpcHandle`] |
//! | a peer's buffer in our address space | [`Backend::PeerMapping`] |
//! | one kernel, its arguments | [`KernelId`], [`LaunchParams`] |
//! | the numerics contract | [`contract`] |
//! | the vendor collective library (NCCL/RCCL), the fallback | [`collective`] |
//!
//! Design choices:
//! - One static trait, no `dyn` on the hot path; every launch is `unsafe` with its extents documented.
//!   (One `dyn` pointer per tensor whose owner tracks its uses, cudarc's slices:
//!   [`DeviceSlice::stream_order`], called twice per call.)
//! - Streams say who destroys them ([`StreamOwnership`]): arfuse's own, the engine's cudarc stream
//!   shared, or a raw handle borrowed and never destroyed.
//! - The CPU backend is a real backend (POSIX shared memory between processes) running the same
//!   algorithms and barrier protocol as the GPU kernels.
//! - One [`LaunchParams`] struct for every kernel and backend, mirrored in the C++ header.
//!
//! # Safety model
//! FFI lives in `cpu/` (shared memory, raw views), in the GPU backends' wrappers (`cuda/`, `hip/`)
//! and in `collective/` (the vendor library's entry points, loaded at run time); the GPU core
//! (`gpu/`) and [`Backend::fill_shared`] only call the trait's unsafe copies on memory they own or
//! bounds-checked (ARCHITECTURE.md's invariant, checked by tidy).
//! Callers of [`Backend::launch`] promise the pointer extents; the barrier protocol promises that
//! no rank writes memory a peer is still reading.

pub mod backend;
pub mod collective;
pub mod contract;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod gpu;
#[cfg(feature = "hip")]
pub mod hip;
pub mod kernel_id;
pub mod params;
pub mod source;

pub use backend::{
    Backend, BackendKind, DevicePtr, DeviceSlice, DeviceSliceMut, StreamOrder, StreamOrderMut, StreamOwnership,
};
pub use collective::CollectiveBackend;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use gpu::{DeviceBuffer, GpuBackend};
pub use kernel_id::{KernelId, Op};
pub use params::{ErrorWord, LaunchParams, MAX_BLOCKS, MAX_RANKS, PACK_BYTES, SIGNAL_BYTES};
pub use source::{max_hidden, MAX_ROW_PACKS};

/// Backends by name: `api::{Cpu, Cuda, Hip}`.
pub mod api {
    pub use crate::cpu::Cpu;
    #[cfg(feature = "cuda")]
    pub use crate::cuda::Cuda;
    #[cfg(feature = "hip")]
    pub use crate::hip::Hip;
}

//! # arfuse-fusion
//!
//! The operator an inference engine calls at the end of every tensor-parallel layer:
//! all-reduce of the ranks' partial outputs, residual add, RMSNorm — fused, across the ranks of
//! one host. [`AllReduceRmsNorm`] is created once per rank from a rendezvous; its
//! [`forward`](AllReduceRmsNorm::forward) validates the call (nothing is launched on bad input),
//! picks a [`Path`] with the pure [`choose_path`], and runs it.
//!
//! | concept | here |
//! |---|---|
//! | one rank's operator | [`AllReduceRmsNorm`] |
//! | the call's tensors (the engine's own, cudarc's included) | [`Args`], [`Args::in_place`], [`TensorRef`], [`TensorMut`] |
//! | the call's stream (arfuse's, or the engine's: shared or borrowed) | `B::Stream`; `CudaStream::from_cudarc`, `from_raw` |
//! | which path runs | [`choose_path`], [`Policy`], [`Path`] |
//! | configuration, `ARFUSE_*` variables | [`Config`] |
//! | the vendor collective fallback (NCCL/RCCL) | [`vendor`], [`AllReduceRmsNorm::with_collective`] |
//! | FP8 out fused ([`Variant`], [`QuantOut`]), or as a separate kernel | [`quantize_fp8`] |
//!
//! Features: `cuda` (default) and `hip` choose the GPU backends (the cpu backend is always there);
//! `test-hooks` adds `AllReduceRmsNorm::forward_on` (a call forced onto a path) and
//! `Config::fault` (a rank that aborts or stalls itself), for tests and benchmarks only.
//!
//! Numerics: the contract of `arfuse_kernels::contract`, on every path — `residual_out` is bit-identical between the
//! 1-stage, 2-stage and unfused paths, and `out` too (the same row routine on every path). The
//! vendor path ([`AllReduce::Vendor`]) is the exception: its sum is the library's, in the library's
//! order; everything after the sum follows the contract (see [`vendor`]).

// Which tensors may overlap; called by the operator's validation.
pub(crate) mod alias;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod operator;
pub mod quantize;
pub mod tune;
pub mod vendor;

pub use arfuse_ipc as ipc;
pub use arfuse_kernels as kernels;
pub use arfuse_kernels::contract::{Fp8Format, Norm, Quant, Scaling};
pub use config::Config;
#[cfg(feature = "test-hooks")]
pub use config::Fault;
pub use dispatch::{choose_path, AllReduce, FallbackReason, Path, Policy, Request};
pub use error::{Error, Result};
pub use operator::{AllReduceRmsNorm, Args, BytesMut, QuantOut, TensorMut, TensorRef, Variant};
pub use quantize::quantize_fp8;
pub use tune::TuneTable;

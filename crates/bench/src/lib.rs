//! # arfuse-bench
//!
//! The `arfuse-demo` and `arfuse-bench` binaries and what they share: running cases on rank
//! processes, checking them against the reference, and printing tables.

pub mod bench;
pub mod demo;
pub mod report;
#[cfg(any(feature = "cuda", feature = "hip"))]
pub mod runner;

//! # arfuse-bench
//!
//! The `arfuse-demo` and `arfuse-bench` binaries and what they share: running cases on rank
//! processes, checking them against the reference, and printing tables and SVG plots.

pub mod bench;
pub mod demo;
pub mod plot;
pub mod report;
#[cfg(any(feature = "cuda", feature = "hip"))]
pub mod runner;

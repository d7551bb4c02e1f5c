//! arfuse-bench.

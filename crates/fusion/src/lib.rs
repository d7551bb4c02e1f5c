//! arfuse-fusion.

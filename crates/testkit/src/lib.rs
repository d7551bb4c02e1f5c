//! Test fixtures for arfuse.

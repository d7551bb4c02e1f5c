//! The crate's error type: what can fail for reasons outside the test (processes, directories).

use std::path::PathBuf;

/// Why a rank harness could not run, or which ranks failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// A private directory could not be created.
    #[error("creating a private directory {path}: {source}")]
    PrivateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The path of the running test binary is unknown.
    #[error("locating the running test binary: {0}")]
    CurrentExe(#[source] std::io::Error),
    /// A rank process could not be started.
    #[error("starting rank process {rank} of {world_size}: {source}")]
    Spawn {
        /// The rank.
        rank: usize,
        /// The world size.
        world_size: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A rank thread could not be started.
    #[error("starting the thread of rank {rank}: {source}")]
    SpawnThread {
        /// The rank.
        rank: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for (or stopping) a rank process failed.
    #[error("waiting for rank process {rank}: {source}")]
    Wait {
        /// The rank.
        rank: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `run_processes` was called inside a child rank (the harness does not nest).
    #[error("run_processes called inside child rank {rank} of {world_size}: the process harness does not nest")]
    Nested {
        /// The child's rank.
        rank: usize,
        /// The child's world size.
        world_size: usize,
    },
    /// A world of zero ranks was asked for.
    #[error("world size 0: a harness needs at least one rank")]
    EmptyWorld,
    /// Some ranks failed, timed out or did not run their test.
    #[error("{failed} of {world_size} ranks failed:\n{report}")]
    RanksFailed {
        /// How many ranks failed.
        failed: usize,
        /// The world size.
        world_size: usize,
        /// One paragraph per failed rank: status, panic message, tail of its stderr.
        report: String,
    },
}

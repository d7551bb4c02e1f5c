//! The error type of `arfuse-kernels`.

use crate::BackendKind;

/// Everything that can go wrong below the operator: driver calls, compilation, shared memory,
/// and the cross-rank signal protocol inside a kernel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A driver or runtime call returned an error code.
    #[error("{backend} call {call} failed with code {code}: {message}")]
    Driver {
        /// The backend whose runtime failed.
        backend: BackendKind,
        /// The name of the failing call, e.g. `cuIpcOpenMemHandle`.
        call: &'static str,
        /// The vendor's numeric error code.
        code: i32,
        /// The vendor's description of the code.
        message: String,
    },
    /// The backend's runtime library could not be loaded on this machine.
    #[error("{backend} backend unavailable: {reason}")]
    BackendUnavailable {
        /// The backend that was asked for.
        backend: BackendKind,
        /// Why it is not available (library not found, no device, ...).
        reason: String,
    },
    /// A kernel failed to compile.
    #[error("compiling kernel {kernel} for {arch} failed:\n{log}")]
    Compile {
        /// The kernel (or module) being compiled.
        kernel: String,
        /// The target architecture, e.g. `sm_90` or `gfx942`.
        arch: String,
        /// The compiler's log.
        log: String,
    },
    /// An operating-system call failed (shared memory, mapping, files).
    #[error("{call} failed: {source}")]
    Os {
        /// The failing call, e.g. `shm_open`.
        call: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The shared-memory filesystem has no room for a segment: reserving its memory at creation
    /// failed with `ENOSPC` or `EFBIG`. Nothing was left behind (the segment was removed).
    ///
    /// The memory is reserved when the segment is created so that a short filesystem is this
    /// error, not a `SIGBUS` at the first touch of a page that cannot be backed.
    #[error(
        "shared memory too small: reserving a segment of {requested} bytes in {path} failed ({source}); {path} has {} free",
        free_bytes(*.available)
    )]
    ShmTooSmall {
        /// Bytes the segment needs.
        requested: u64,
        /// Bytes the filesystem had free for this user when it refused, where known.
        available: Option<u64>,
        /// The shared-memory filesystem, `/dev/shm`.
        path: &'static str,
        /// The refusal (`ENOSPC` or `EFBIG`).
        #[source]
        source: std::io::Error,
    },
    /// A peer did not reach a barrier within the deadline.
    #[error("rank {rank}: peer rank {peer} did not reach barrier {barrier} within {deadline_ms} ms")]
    PeerTimeout {
        /// The rank that waited.
        rank: u32,
        /// The first peer that was missing.
        peer: u32,
        /// The barrier value that was awaited.
        barrier: u64,
        /// The deadline, in milliseconds.
        deadline_ms: u64,
    },
    /// Peers disagree about the call they are executing.
    #[error("rank {rank}: peer rank {peer} runs a different call: ours {ours}, theirs {theirs}")]
    CallMismatch {
        /// The rank that detected the mismatch.
        rank: u32,
        /// The peer that differs.
        peer: u32,
        /// Our call descriptor.
        ours: String,
        /// The peer's call descriptor.
        theirs: String,
    },
    /// The vendor collective library (NCCL/RCCL) could not be loaded, or lacks an entry point.
    #[error("vendor collective library unavailable: {why} (tried: {})", .tried.join("; "))]
    CollectiveUnavailable {
        /// Every library tried, each with why it was refused.
        tried: Vec<String>,
        /// The conclusion.
        why: String,
    },
    /// A call of the vendor collective library failed.
    #[error("collective library call {call} failed with code {code}: {message}")]
    Collective {
        /// The failing call, e.g. `ncclAllReduce`.
        call: &'static str,
        /// The library's `ncclResult_t` (or -1 for a call refused before reaching the library).
        code: i32,
        /// The library's description of the code.
        message: String,
    },
    /// A handle received from a peer is not valid for this backend.
    #[error("invalid IPC handle: {0}")]
    InvalidHandle(String),
    /// A byte range outside a buffer (or not in whole 32-bit words) was asked for.
    #[error("{what}: {bytes} bytes at offset {offset} do not fit a buffer of {len} bytes in whole 32-bit words")]
    OutOfRange {
        /// The operation.
        what: &'static str,
        /// Start of the range.
        offset: usize,
        /// Length of the range.
        bytes: usize,
        /// Size of the buffer.
        len: usize,
    },
    /// A stream handed to arfuse cannot carry its work: another device's or context's, a handle
    /// whose meaning depends on the calling thread, or tensors a capture cannot order with it.
    #[error("{backend} stream refused: {reason}")]
    BadStream {
        /// The backend.
        backend: crate::BackendKind,
        /// What is wrong with it.
        reason: String,
    },
    /// The backend cannot do what was asked (e.g. export memory it did not allocate).
    #[error("{backend} backend: {what} is not supported")]
    Unsupported {
        /// The backend.
        backend: crate::BackendKind,
        /// What was asked.
        what: &'static str,
    },
}

/// `n bytes`, or `an unknown number of bytes`.
fn free_bytes(available: Option<u64>) -> String {
    match available {
        Some(n) => format!("{n} bytes"),
        None => "an unknown number of bytes".to_owned(),
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps the last OS error of `call`.
    pub(crate) fn last_os(call: &'static str) -> Self {
        Error::Os { call, source: std::io::Error::last_os_error() }
    }
}

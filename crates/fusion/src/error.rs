//! The error type of `arfuse-fusion`: what a user of the operator sees.

use arfuse_kernels::DType;
use std::time::Duration;

/// Everything a call or the construction of an operator can refuse or report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two tensors of one call have different lengths.
    #[error("shape mismatch: {what} has {got} elements, expected {expected}")]
    ShapeMismatch {
        /// Which tensor.
        what: &'static str,
        /// Elements expected.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// The hidden size is not a multiple of the 16-byte pack.
    #[error("hidden size {hidden} is not a multiple of the pack ({pack} elements of {dtype})")]
    HiddenNotMultipleOfPack {
        /// The hidden size (the weight's length).
        hidden: usize,
        /// Elements per pack.
        pack: usize,
        /// The dtype.
        dtype: DType,
    },
    /// The hidden size is zero or beyond every kernel.
    #[error("hidden size {hidden} unsupported (1..={max})")]
    HiddenUnsupported {
        /// The hidden size.
        hidden: usize,
        /// The largest supported.
        max: usize,
    },
    /// A tensor is not aligned to 16 bytes.
    #[error("{what} at {ptr:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// Which tensor.
        what: &'static str,
        /// Its address.
        ptr: u64,
        /// The required alignment.
        align: usize,
    },
    /// The world size is outside what this operator supports.
    #[error("world size {world_size} unsupported ({supported})")]
    WorldSizeUnsupported {
        /// The world size.
        world_size: usize,
        /// What is supported.
        supported: &'static str,
    },
    /// epsilon is NaN, infinite or negative.
    #[error("eps {eps} must be finite and non-negative")]
    BadEps {
        /// The value given.
        eps: f32,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The path needs the vendor collective library, which is not available.
    #[error("path needs the vendor collective library ({reason}), which is not available")]
    VendorUnavailable {
        /// Why the vendor library was needed.
        reason: String,
    },
    /// A peer did not arrive within the deadline; the operator is unusable afterwards.
    #[error("rank {rank}: peer rank {peer} did not respond within {deadline:?}")]
    PeerTimeout {
        /// This rank.
        rank: u32,
        /// The missing peer.
        peer: u32,
        /// The deadline.
        deadline: Duration,
    },
    /// A peer runs a different call (another shape, path or dtype, or it skipped a call).
    #[error("rank {rank}: peer rank {peer} runs a different call ({detail})")]
    CallMismatch {
        /// This rank.
        rank: u32,
        /// The peer that differs.
        peer: u32,
        /// Both calls, as the kernels described them.
        detail: String,
    },
    /// Graph capture with in-place inputs was misused (begun twice, registered without a
    /// capture, ranks that recorded different launches, a backend without graphs, inputs that
    /// cannot be exported).
    #[error("graph inputs: {0}")]
    GraphCapture(String),
    /// The graph-input table is full: the call was refused and nothing was launched.
    #[error(
        "graph-input table full: the call needs {needed} slots, {free} of {capacity} are free (Config::graph_slots)"
    )]
    GraphSlotsExhausted {
        /// Slots the call needs (one per cross-rank launch).
        needed: usize,
        /// Slots left.
        free: usize,
        /// The table's size.
        capacity: usize,
    },
    /// A captured graph was replayed before its inputs were registered; the kernels read and wrote
    /// nothing, and the operator is unusable afterwards.
    #[error("rank {rank}: a captured graph ran before register_graph_inputs (barrier {barrier})")]
    NotRegistered {
        /// This rank.
        rank: u32,
        /// The epoch's barrier value.
        barrier: u64,
    },
    /// An earlier call failed in a way that leaves the shared buffers in an unknown state.
    #[error("operator unusable after an earlier failure ({0}); drop it and create a new group")]
    Poisoned(String),
    /// An error of the device runtime.
    #[error(transparent)]
    Kernels(#[from] arfuse_kernels::Error),
    /// An error of the rendezvous or the shared buffers.
    #[error(transparent)]
    Ipc(#[from] arfuse_ipc::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

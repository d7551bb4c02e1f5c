//! The launch parameters every kernel takes, and the layout of a rank's signal area.
//!
//! [`LaunchParams`] is `#[repr(C)]` and mirrored field for field by `struct LaunchParams` in
//! `gpu/arfuse.h`; a test pins its size and offsets. The CPU backend reads the same struct, with
//! host addresses in the pointer fields.

/// The largest world size the kernels support.
pub const MAX_RANKS: usize = 8;
/// Barrier slots per rank: one per thread block a kernel may launch.
pub const MAX_BLOCKS: usize = 256;
/// Bytes per vector access in every hot loop.
pub const PACK_BYTES: usize = 16;

/// Byte offset of the barrier flags inside a signal area: `u64 flags[MAX_BLOCKS][MAX_RANKS]`.
/// Rank `r` writes barrier value `v` for block `b` into `flags[b][r]` of every peer's area.
pub const SIGNAL_FLAGS_OFFSET: usize = 0;
/// Byte offset of the error word: 0 while healthy; a kernel that gives up writes an [`ErrorWord`].
pub const SIGNAL_ERROR_OFFSET: usize = MAX_BLOCKS * MAX_RANKS * 8;
/// Byte offset of the epoch word: cross-rank launches (with `barrier_base == 0`) this rank completed.
pub const SIGNAL_EPOCH_OFFSET: usize = SIGNAL_ERROR_OFFSET + 8;
/// Byte offset of the count of blocks that finished the current launch (the last one advances the epoch).
pub const SIGNAL_DONE_OFFSET: usize = SIGNAL_ERROR_OFFSET + 16;
/// Byte offset of the call descriptors: `u64 calls[2][MAX_RANKS][CALL_WORDS]`. Before its first
/// barrier, a cross-rank launch of epoch `e` (`barrier_base = 2e`) publishes its [`CallDescriptor`]
/// into `calls[e % 2][rank]` of every peer's area; after the barrier each rank compares its peers'
/// descriptors with its own. Two slots, because a fast peer may already publish epoch `e + 1`
/// while a slow rank still reads epoch `e`; it cannot reach `e + 2` before the slow rank arrives.
pub const SIGNAL_CALLS_OFFSET: usize = SIGNAL_ERROR_OFFSET + 64;
/// Words per call descriptor.
pub const CALL_WORDS: usize = 4;
/// Total size of a signal area, rounded up to 64 KiB.
pub const SIGNAL_BYTES: usize = 64 * 1024;
const _: () = assert!(SIGNAL_CALLS_OFFSET + 2 * MAX_RANKS * CALL_WORDS * 8 <= SIGNAL_BYTES);

/// Parameters of one kernel launch (all pointers are device addresses of the launching rank's
/// device, or host addresses on the CPU backend).
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct LaunchParams {
    /// Each rank's input staging area for this call (peer pointers; `[rank]` is ours).
    pub staging: [u64; MAX_RANKS],
    /// Each rank's 2-stage scratch area (reduced chunks are stored here).
    pub scratch: [u64; MAX_RANKS],
    /// Each rank's signal area.
    pub signals: [u64; MAX_RANKS],
    /// This rank's input. Cross-rank kernels first copy it into `staging[rank]` (each block the part
    /// its peers' same-numbered blocks will read), unless it already *is* `staging[rank]` (a
    /// registered buffer); add+RMSNorm reads the all-reduced sum from it.
    pub input: u64,
    /// The residual, `[rows, hidden]`.
    pub residual: u64,
    /// The RMSNorm weight, `[hidden]`.
    pub weight: u64,
    /// The normalised output (all-reduce kernels: the reduced sum), `[rows, hidden]`.
    pub out: u64,
    /// The residual output, `[rows, hidden]`.
    pub residual_out: u64,
    /// The barrier value of this call's first barrier (later barriers add 1), and with it the
    /// call-descriptor slot. 0: the kernel takes the next epoch `e` from its rank's epoch word
    /// (barrier value `2e`, staging half `e % 2` at `staging[r] + (e % 2) * staging_half_bytes`)
    /// and advances the word when it ends — what makes a captured graph safe to replay.
    pub barrier_base: u64,
    /// How long a spin on a peer's flag may last before the kernel gives up, in nanoseconds.
    pub deadline_ns: u64,
    /// Tokens (rows).
    pub rows: u32,
    /// Hidden size (elements per row).
    pub hidden: u32,
    /// This rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Bytes between the two staging halves (used when `barrier_base` is 0).
    pub staging_half_bytes: u32,
    /// 0, or (with `barrier_base` 0) the device address of `u64[MAX_RANKS]`: every rank's input
    /// for this call in this rank's address space, registered after a graph capture
    /// ([`GRAPH_SLOT_BYTES`] per captured launch). Cross-rank kernels then read peers' inputs in
    /// place instead of through the staging halves (nothing is copied), and end with a barrier
    /// (value `barrier_base + 1`) so that no rank returns, and lets its user overwrite its input,
    /// while a peer still reads it. A table with a zero entry (not registered yet) makes the
    /// kernel leave [`ErrorWord::KIND_NOT_REGISTERED`] and return before any barrier.
    pub inputs: u64,
}

/// Bytes of one entry of a graph-input table (see [`LaunchParams::inputs`]).
pub const GRAPH_SLOT_BYTES: usize = MAX_RANKS * 8;

/// What a cross-rank launch publishes so that peers can check they run the same call:
/// `[barrier_base, op | dtype << 8 | world_size << 16, rows, hidden]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallDescriptor(pub [u64; CALL_WORDS]);

impl CallDescriptor {
    /// The descriptor of launching `op_code` (the index of the op in [`crate::Op::ALL`]) with `params`.
    pub fn new(op_code: u64, dtype: crate::DType, params: &LaunchParams) -> Self {
        CallDescriptor([
            params.barrier_base,
            op_code | (dtype as u64) << 8 | u64::from(params.world_size) << 16,
            u64::from(params.rows),
            u64::from(params.hidden),
        ])
    }
}

impl std::fmt::Display for CallDescriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [barrier, code, rows, hidden] = self.0;
        let op = crate::Op::ALL.get((code & 0xff) as usize).map(|op| op.stem()).unwrap_or("?");
        let dtype = crate::DType::ALL.get(((code >> 8) & 0xff) as usize).map(|d| d.name()).unwrap_or("?");
        write!(f, "call #{} {op} {rows}x{hidden} {dtype} world {}", barrier / 2, code >> 16)
    }
}

/// The error word a kernel leaves in its rank's signal area when it gives up:
/// bits 0..8 the kind (`KIND_*`), 8..16 the peer, 16..64 the low bits of the barrier value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorWord(pub u64);

impl ErrorWord {
    /// A spin on `peer`'s flag for barrier `barrier` ran past its deadline.
    pub const KIND_PEER_TIMEOUT: u64 = 1;
    /// `peer` published a different call descriptor for barrier `barrier`.
    pub const KIND_CALL_MISMATCH: u64 = 2;
    /// A launch with a graph-input table ran before the table was filled (a captured graph
    /// replayed before its inputs were registered); `barrier` is the epoch's barrier value.
    pub const KIND_NOT_REGISTERED: u64 = 3;

    /// Encodes a call mismatch.
    pub fn call_mismatch(peer: u32, barrier: u64) -> Self {
        ErrorWord(Self::KIND_CALL_MISMATCH | (u64::from(peer & 0xff) << 8) | (barrier << 16))
    }

    /// Encodes an empty graph-input table met at barrier value `barrier`.
    pub fn not_registered(barrier: u64) -> Self {
        ErrorWord(Self::KIND_NOT_REGISTERED | (barrier << 16))
    }

    /// Encodes a peer timeout.
    pub fn peer_timeout(peer: u32, barrier: u64) -> Self {
        ErrorWord(Self::KIND_PEER_TIMEOUT | (u64::from(peer & 0xff) << 8) | (barrier << 16))
    }
    /// The kind (0 = no error).
    pub fn kind(self) -> u64 {
        self.0 & 0xff
    }
    /// The peer that was awaited.
    pub fn peer(self) -> u32 {
        ((self.0 >> 8) & 0xff) as u32
    }
    /// The low 48 bits of the barrier value that was awaited.
    pub fn barrier(self) -> u64 {
        self.0 >> 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// These numbers are repeated in `gpu/arfuse.h` (`static_assert`s there check the same).
    #[test]
    fn layout_matches_the_kernel_header() {
        assert_eq!(offset_of!(LaunchParams, staging), 0);
        assert_eq!(offset_of!(LaunchParams, scratch), 64);
        assert_eq!(offset_of!(LaunchParams, signals), 128);
        assert_eq!(offset_of!(LaunchParams, input), 192);
        assert_eq!(offset_of!(LaunchParams, barrier_base), 232);
        assert_eq!(offset_of!(LaunchParams, deadline_ns), 240);
        assert_eq!(offset_of!(LaunchParams, rows), 248);
        assert_eq!(offset_of!(LaunchParams, eps), 264);
        assert_eq!(offset_of!(LaunchParams, inputs), 272);
        assert_eq!(size_of::<LaunchParams>(), 280);
    }

    #[test]
    fn error_word_round_trips() {
        let w = ErrorWord::peer_timeout(5, 1234);
        assert_eq!((w.kind(), w.peer(), w.barrier()), (ErrorWord::KIND_PEER_TIMEOUT, 5, 1234));
    }
}

//! The dispatch policy: which path a call takes. A pure function of the request and the policy,
//! tested at its inclusive boundaries.
//!
//! Rules:
//! 1. An empty tensor does nothing ([`Path::Noop`]).
//! 2. A world size above [`MAX_RANKS`], no peer access, or ranks on several hosts: the vendor
//!    collective library's all-reduce, then our add+RMSNorm ([`Path::Unfused`] with
//!    [`AllReduce::Vendor`]).
//! 3. Fusion disabled, or `bytes > max_size / 2`: the unfused path (our custom all-reduce — in row chunks of at most `max_size / 2` when the
//!    tensor is larger — or the vendor library for sizes beyond the buffers where one is available).
//! 4. Otherwise fused: 1-stage iff `bytes <= one_stage_max_bytes` (inclusive; the measured
//!    threshold of the world size where a tune table gives one, see [`crate::tune`]), unless the
//!    override says otherwise; a call larger than a push slot goes 2-stage.
//!
//! The hidden size is not a path decision: every path runs the same row routine, so a hidden size
//! the kernels cannot take (not a multiple of the 16-byte pack, or beyond
//! [`arfuse_kernels::max_hidden`], the kernels' own limit) is refused by the operator before
//! dispatch ([`crate::Error::HiddenNotMultipleOfPack`], [`crate::Error::HiddenUnsupported`]).

use arfuse_kernels::{DType, MAX_RANKS, PACK_BYTES};
use std::fmt;

/// What a call asks for, as the dispatcher sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Tokens.
    pub rows: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Storage dtype.
    pub dtype: DType,
    /// Ranks in the group.
    pub world_size: usize,
}

impl Request {
    /// Bytes of one rank's input.
    pub fn bytes(&self) -> u64 {
        self.rows as u64 * self.hidden as u64 * self.dtype.size() as u64
    }
}

/// The knobs of the dispatcher. Defaults are AITER's/SGLang's, measured thresholds may replace them.
///
/// `#[non_exhaustive]`: start from [`Policy::default`] and change what you need with the `with_*`
/// methods (or by assigning the public fields).
///
/// ```
/// use arfuse_fusion::kernels::DType;
/// use arfuse_fusion::{choose_path, Path, Policy, Request};
///
/// let policy = Policy::default().with_one_stage_max_bytes(128 << 10);
/// let request = Request { rows: 64, hidden: 4096, dtype: DType::Bf16, world_size: 2 }; // 512 KiB
/// assert_eq!(choose_path(&request, &policy), Path::TwoStage);
/// assert_eq!(choose_path(&request, &policy.with_force_one_stage(Some(true))), Path::TwoStage); // slot too small
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Policy {
    /// Fusion enabled at all.
    pub enabled: bool,
    /// Bytes of the 2-stage buffers per rank (a receive area and a scratch of `max_size / 2` each);
    /// fused iff `bytes <= max_size / 2`.
    pub max_size: usize,
    /// 1-stage iff `bytes <= one_stage_max_bytes` (unless a measured threshold for the world
    /// size replaces it, below). 0 (the default): [`default_one_stage_max_bytes`] of the world size.
    pub one_stage_max_bytes: usize,
    /// Measured 1-stage thresholds by world size (index = world size; 0 = not measured, use
    /// `one_stage_max_bytes`), from a [`crate::TuneTable`].
    pub one_stage_max_bytes_by_world: [usize; MAX_RANKS + 1],
    /// `Some(true)`: always 1-stage (where the kernel can); `Some(false)`: always 2-stage.
    pub force_one_stage: Option<bool>,
    /// Bytes of each receive slot of the push protocol (one per peer, three rotations), which is
    /// the largest input a 1-stage call can carry. 0 (the default): the 1-stage threshold of the
    /// group's world size ([`Policy::push_slot_bytes_for`]). A rank allocates
    /// `3 x world x push slot` bytes for them.
    pub push_slot_bytes: usize,
    /// Whether every pair of ranks can access each other's memory.
    pub peer_access: bool,
    /// Whether every rank is on this host.
    pub single_host: bool,
    /// Whether the vendor collective library is loaded and a communicator exists. The operator
    /// sets it (true iff it holds a communicator, see [`crate::AllReduceRmsNorm::with_collective`]);
    /// a configured value is overwritten.
    pub vendor_available: bool,
}

/// Default `max_size`: 128 MiB (AITER's `max_size`), calls up to 64 MiB on our kernels.
pub const DEFAULT_MAX_SIZE: usize = 128 << 20;
/// AITER's 1-stage threshold, 128 KiB: what [`Policy::one_stage_max_bytes`] was by default before
/// the push protocol.
pub const AITER_ONE_STAGE_MAX_BYTES: usize = 128 << 10;

/// The default 1-stage threshold for `world_size` ranks, with the push protocol: 2 MiB up to 2
/// ranks (measured on one H200 with two ranks sharing it, 2026-12-01: 1-stage faster than 2-stage
/// on every decode shape up to 128 x 8192 bf16 = 2 MiB, slower at 64 MiB; docs/performance.md),
/// 1 MiB up to 4 and 512 KiB up to 8 (a 1-stage push moves `(P - 1) x` the input per rank; these
/// two follow vLLM's one-shot limits at TP 4 / 8 until measured on several GPUs).
pub const fn default_one_stage_max_bytes(world_size: usize) -> usize {
    match world_size {
        0..=2 => 2 << 20,
        3..=4 => 1 << 20,
        _ => 512 << 10,
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            enabled: true,
            max_size: DEFAULT_MAX_SIZE,
            one_stage_max_bytes: 0,
            one_stage_max_bytes_by_world: [0; MAX_RANKS + 1],
            force_one_stage: None,
            push_slot_bytes: 0,
            peer_access: true,
            single_host: true,
            vendor_available: false,
        }
    }
}

impl Policy {
    /// `self` with fusion enabled or not ([`Policy::enabled`]; `false`: always the unfused path).
    #[must_use]
    pub fn with_fusion_enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// `self` with 2-stage buffers of `max_size` bytes per rank ([`Policy::max_size`]).
    #[must_use]
    pub fn with_max_size(mut self, max_size: usize) -> Self {
        self.max_size = max_size;
        self
    }

    /// `self` with the 1-stage threshold `bytes` ([`Policy::one_stage_max_bytes`]; 0: by world size).
    #[must_use]
    pub fn with_one_stage_max_bytes(mut self, bytes: usize) -> Self {
        self.one_stage_max_bytes = bytes;
        self
    }

    /// `self` with the measured thresholds of `table` ([`Policy::apply`]).
    #[must_use]
    pub fn with_tune_table(mut self, table: &crate::TuneTable) -> Self {
        self.apply(table);
        self
    }

    /// `self` with the override of the 1-stage/2-stage choice ([`Policy::force_one_stage`]).
    #[must_use]
    pub fn with_force_one_stage(mut self, force: Option<bool>) -> Self {
        self.force_one_stage = force;
        self
    }

    /// `self` with push receive slots of `bytes` ([`Policy::push_slot_bytes`]; 0: the threshold).
    #[must_use]
    pub fn with_push_slot_bytes(mut self, bytes: usize) -> Self {
        self.push_slot_bytes = bytes;
        self
    }

    /// `self` saying whether every pair of ranks can access each other's memory.
    #[must_use]
    pub fn with_peer_access(mut self, peer_access: bool) -> Self {
        self.peer_access = peer_access;
        self
    }

    /// `self` saying whether every rank is on this host.
    #[must_use]
    pub fn with_single_host(mut self, single_host: bool) -> Self {
        self.single_host = single_host;
        self
    }

    /// `self` saying whether a vendor communicator exists, for callers of [`choose_path`] (the
    /// operator overwrites it, see [`Policy::vendor_available`]).
    #[must_use]
    pub fn with_vendor_available(mut self, vendor_available: bool) -> Self {
        self.vendor_available = vendor_available;
        self
    }

    /// The 1-stage threshold for `world_size` ranks: the measured one if the tune table has it.
    pub fn one_stage_max_bytes_for(&self, world_size: usize) -> usize {
        match self.one_stage_max_bytes_by_world.get(world_size) {
            Some(&measured) if measured > 0 => measured,
            _ if self.one_stage_max_bytes > 0 => self.one_stage_max_bytes,
            _ => default_one_stage_max_bytes(world_size),
        }
    }

    /// The receive slot of the push protocol for `world_size` ranks: [`Policy::push_slot_bytes`],
    /// or the 1-stage threshold, in whole 16-byte packs, never above `max_size / 2`.
    pub fn push_slot_bytes_for(&self, world_size: usize) -> usize {
        let wanted =
            if self.push_slot_bytes > 0 { self.push_slot_bytes } else { self.one_stage_max_bytes_for(world_size) };
        wanted.clamp(PACK_BYTES, (self.max_size / 2).max(PACK_BYTES)).next_multiple_of(PACK_BYTES)
    }

    /// Takes the thresholds of `table` (world sizes it lacks keep theirs).
    pub fn apply(&mut self, table: &crate::TuneTable) {
        for &(world, bytes) in &table.one_stage_max_bytes {
            if let Some(slot) = self.one_stage_max_bytes_by_world.get_mut(world) {
                *slot = bytes.max(1);
            }
        }
    }
}

/// Which all-reduce the unfused path runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AllReduce {
    /// Our custom all-reduce over the shared buffers (in row chunks when the tensor is larger).
    Custom,
    /// The vendor collective library (NCCL/RCCL).
    Vendor,
}

/// Why a call is not fused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FallbackReason {
    /// Fusion is disabled by configuration.
    Disabled,
    /// `bytes > max_size / 2`.
    TooLarge,
    /// The world size is beyond the kernels.
    WorldSizeUnsupported,
    /// Some ranks cannot access each other's memory.
    NoPeerAccess,
    /// The ranks span several hosts.
    MultiHost,
}

/// The path a call takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// No data to move (empty tensor): the call still exchanges its header with the peers, so it
    /// counts as a call on every rank (a peer with a real call reports a mismatch).
    Noop,
    /// Fused, one stage.
    OneStage,
    /// Fused, two stages (reduce-scatter with cross-device stores, then local add+RMSNorm).
    TwoStage,
    /// All-reduce, then the add+RMSNorm kernel.
    Unfused {
        /// Which all-reduce.
        all_reduce: AllReduce,
        /// Why not fused.
        reason: FallbackReason,
    },
}

impl Path {
    /// A short name for tables and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Path::Noop => "noop",
            Path::OneStage => "fused-1stage",
            Path::TwoStage => "fused-2stage",
            Path::Unfused { all_reduce: AllReduce::Custom, .. } => "unfused",
            Path::Unfused { all_reduce: AllReduce::Vendor, .. } => "vendor",
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Chooses the path of a call. Pure: no I/O, no environment.
pub fn choose_path(req: &Request, policy: &Policy) -> Path {
    let bytes = req.bytes();
    if bytes == 0 {
        return Path::Noop;
    }
    let vendor = |reason| Path::Unfused { all_reduce: AllReduce::Vendor, reason };
    let custom = |reason| Path::Unfused { all_reduce: AllReduce::Custom, reason };
    if req.world_size > MAX_RANKS {
        return vendor(FallbackReason::WorldSizeUnsupported);
    }
    if !policy.single_host {
        return vendor(FallbackReason::MultiHost);
    }
    if !policy.peer_access {
        return vendor(FallbackReason::NoPeerAccess);
    }
    if !policy.enabled {
        return custom(FallbackReason::Disabled);
    }
    if bytes > (policy.max_size / 2) as u64 {
        return if policy.vendor_available {
            vendor(FallbackReason::TooLarge)
        } else {
            custom(FallbackReason::TooLarge)
        };
    }
    let one_stage_fits = bytes <= policy.push_slot_bytes_for(req.world_size) as u64;
    let wants_one_stage =
        policy.force_one_stage.unwrap_or(bytes <= policy.one_stage_max_bytes_for(req.world_size) as u64);
    if wants_one_stage && one_stage_fits {
        Path::OneStage
    } else {
        Path::TwoStage
    }
}

#[cfg(test)]
mod tests;

//! Names of the kernels and their symbols.

use crate::DType;
use std::fmt;

/// The operations the kernel source provides (the same list on every backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Fused all-reduce + residual + RMSNorm, one stage: every rank reads every peer's staged input.
    FusedOneStage,
    /// Fused, stage 1: reduce-scatter, storing each reduced chunk into every peer's scratch.
    ReduceScatter,
    /// Fused, stage 2: local residual add + RMSNorm from the scratch (after stage 1's barrier).
    ScratchAddRmsNorm,
    /// Custom all-reduce, one stage (`out` = rounded sum).
    AllReduceOneStage,
    /// Custom all-reduce, stage 2 of the two-stage variant: every rank copies the reduced scratch to `out`.
    AllGather,
    /// Add + RMSNorm of a local tensor (`input` = the all-reduced sum): the unfused path's second kernel.
    AddRmsNorm,
}

impl Op {
    /// Every op, in a fixed order.
    pub const ALL: [Op; 6] = [
        Op::FusedOneStage,
        Op::ReduceScatter,
        Op::ScratchAddRmsNorm,
        Op::AllReduceOneStage,
        Op::AllGather,
        Op::AddRmsNorm,
    ];

    /// The symbol stem in the kernel source.
    pub const fn stem(self) -> &'static str {
        match self {
            Op::FusedOneStage => "fused_ar_rmsnorm_1stage",
            Op::ReduceScatter => "reduce_scatter",
            Op::ScratchAddRmsNorm => "scratch_add_rmsnorm",
            Op::AllReduceOneStage => "allreduce_1stage",
            Op::AllGather => "allgather",
            Op::AddRmsNorm => "add_rmsnorm",
        }
    }

    /// The op's index in [`Op::ALL`] (its code in call descriptors and the kernel source).
    pub fn code(self) -> u64 {
        Op::ALL.iter().position(|&op| op == self).unwrap_or(0) as u64
    }

    /// Whether the kernel synchronises with peers (takes part in barriers).
    pub const fn crosses_ranks(self) -> bool {
        !matches!(self, Op::AddRmsNorm | Op::ScratchAddRmsNorm | Op::AllGather)
    }
}

/// One kernel: an op instantiated for a dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelId {
    /// What it computes.
    pub op: Op,
    /// The storage dtype.
    pub dtype: DType,
}

impl KernelId {
    /// The `extern "C"` symbol, `{op}_{dtype}`, e.g. `fused_ar_rmsnorm_1stage_bf16`.
    pub fn symbol(self) -> String {
        format!("{}_{}", self.op.stem(), self.dtype.name())
    }
}

impl fmt::Display for KernelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.symbol())
    }
}

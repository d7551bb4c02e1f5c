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
    /// [`Op::FusedOneStage`] with the epilogue [`LaunchParams::epilogue`](crate::LaunchParams::epilogue)
    /// selects (Gemma's norm, no residual, FP8 out: `contract`'s "Epilogues"). A kernel of its
    /// own, so that the plain kernels carry none of its code.
    FusedOneStageEpilogue,
    /// [`Op::ScratchAddRmsNorm`] with the epilogue (2-stage's second kernel).
    ScratchAddRmsNormEpilogue,
    /// [`Op::AddRmsNorm`] with the epilogue (the unfused path's second kernel).
    AddRmsNormEpilogue,
    /// FP8 quantisation of a local tensor (`input`, `[rows, hidden]`) into `out_q` and `scales`,
    /// exactly as the epilogue kernels quantise their `out` (`contract::quantise_row`; the scaling
    /// and format bits of [`LaunchParams::epilogue`](crate::LaunchParams::epilogue) and
    /// `quant_scale`): the separate quantisation kernel an unfused FP8 pipeline runs after the
    /// plain call. Crosses no ranks.
    QuantizeFp8,
}

impl Op {
    /// Every op, in a fixed order.
    pub const ALL: [Op; 10] = [
        Op::FusedOneStage,
        Op::ReduceScatter,
        Op::ScratchAddRmsNorm,
        Op::AllReduceOneStage,
        Op::AllGather,
        Op::AddRmsNorm,
        Op::FusedOneStageEpilogue,
        Op::ScratchAddRmsNormEpilogue,
        Op::AddRmsNormEpilogue,
        Op::QuantizeFp8,
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
            Op::FusedOneStageEpilogue => "fused_ar_rmsnorm_1stage_epi",
            Op::ScratchAddRmsNormEpilogue => "scratch_add_rmsnorm_epi",
            Op::AddRmsNormEpilogue => "add_rmsnorm_epi",
            Op::QuantizeFp8 => "quantize_fp8",
        }
    }

    /// The op without an epilogue (itself for the plain ops).
    pub const fn plain(self) -> Op {
        match self {
            Op::FusedOneStageEpilogue => Op::FusedOneStage,
            Op::ScratchAddRmsNormEpilogue => Op::ScratchAddRmsNorm,
            Op::AddRmsNormEpilogue => Op::AddRmsNorm,
            op => op,
        }
    }

    /// The op with the epilogue, for the three ops that normalise (the others are returned as
    /// they are: their output is the sum).
    pub const fn with_epilogue(self) -> Op {
        match self {
            Op::FusedOneStage => Op::FusedOneStageEpilogue,
            Op::ScratchAddRmsNorm => Op::ScratchAddRmsNormEpilogue,
            Op::AddRmsNorm => Op::AddRmsNormEpilogue,
            op => op,
        }
    }

    /// Whether this is one of the epilogue kernels.
    pub const fn has_epilogue(self) -> bool {
        matches!(self, Op::FusedOneStageEpilogue | Op::ScratchAddRmsNormEpilogue | Op::AddRmsNormEpilogue)
    }

    /// The op's index in [`Op::ALL`] (its code in call descriptors and the kernel source).
    pub fn code(self) -> u64 {
        Op::ALL.iter().position(|&op| op == self).unwrap_or(0) as u64
    }

    /// Whether the kernel synchronises with peers (takes part in barriers).
    pub const fn crosses_ranks(self) -> bool {
        !matches!(self.plain(), Op::AddRmsNorm | Op::ScratchAddRmsNorm | Op::AllGather | Op::QuantizeFp8)
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

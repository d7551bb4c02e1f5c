//! Names of the kernels and their symbols.

use crate::DType;
use std::fmt;

/// The operations the kernel source provides (the same list on every backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Fused all-reduce + residual + RMSNorm, one stage: every rank pushes its input into every
    /// peer's push region and reduces every row.
    FusedOneStage,
    /// The unfused path's 2-stage all-reduce, stage 1: reduce-scatter by packs (each rank pushes
    /// its part of every chunk into the chunk owner's receive area), storing each reduced chunk
    /// into every rank's scratch.
    ReduceScatter,
    /// Fused 2-stage, stage 2: residual add + RMSNorm of the rows the other ranks own, from the
    /// sums they pushed into this rank's scratch (after stage 1's closing barrier; local).
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
    /// Fused 2-stage, stage 1: reduce-scatter by rows (each rank pushes its rows of every chunk
    /// into the chunk owner's receive area), then each rank sums its own rows, pushes the sums
    /// into every peer's scratch and runs the row routine on them (its outputs of its rows);
    /// [`Op::ScratchAddRmsNorm`] does the other rows.
    FusedTwoStage,
    /// [`Op::FusedTwoStage`] with the epilogue.
    FusedTwoStageEpilogue,
}

impl Op {
    /// Every op, in a fixed order.
    pub const ALL: [Op; 12] = [
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
        Op::FusedTwoStage,
        Op::FusedTwoStageEpilogue,
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
            Op::FusedTwoStage => "fused_ar_rmsnorm_2stage",
            Op::FusedTwoStageEpilogue => "fused_ar_rmsnorm_2stage_epi",
        }
    }

    /// The op without an epilogue (itself for the plain ops).
    pub const fn plain(self) -> Op {
        match self {
            Op::FusedOneStageEpilogue => Op::FusedOneStage,
            Op::ScratchAddRmsNormEpilogue => Op::ScratchAddRmsNorm,
            Op::AddRmsNormEpilogue => Op::AddRmsNorm,
            Op::FusedTwoStageEpilogue => Op::FusedTwoStage,
            op => op,
        }
    }

    /// The op with the epilogue, for the four ops that normalise (the others are returned as
    /// they are: their output is the sum).
    pub const fn with_epilogue(self) -> Op {
        match self {
            Op::FusedOneStage => Op::FusedOneStageEpilogue,
            Op::ScratchAddRmsNorm => Op::ScratchAddRmsNormEpilogue,
            Op::AddRmsNorm => Op::AddRmsNormEpilogue,
            Op::FusedTwoStage => Op::FusedTwoStageEpilogue,
            op => op,
        }
    }

    /// Whether this is one of the epilogue kernels.
    pub const fn has_epilogue(self) -> bool {
        matches!(
            self,
            Op::FusedOneStageEpilogue
                | Op::ScratchAddRmsNormEpilogue
                | Op::AddRmsNormEpilogue
                | Op::FusedTwoStageEpilogue
        )
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

//! The numerics contract (DESIGN.md), as the scalar building blocks every backend uses.
//!
//! 1. `s = round(Σ_r f32(canon(x_r)))`, ranks summed in order `0..P`, `canon` maps `-0.0` to `+0.0`
//!    (the push protocol uses `-0.0` as its "not arrived" sentinel, so it can never be data).
//! 2. `residual_out = round(f32(s) + f32(residual))`.
//! 3. `var = row_sum_squares(residual_out) / n`, `inv = 1 / sqrt(var + eps)` (IEEE sqrt and division),
//!    `out = round(f32(weight) * f32(round(f32(residual_out) * inv)))`.
//!
//! The row reduction uses one fixed tree, independent of how a kernel is launched: each 16-byte
//! pack's squares are summed left to right, then the pack partials are added pairwise
//! (`a[i] += a[i + s]` for `s` = half the next power of two, down to 1). The GPU kernels build the
//! same tree in shared memory and finish it with shuffles, so `out` does not depend on the path or
//! on which other tokens are in the batch. No operation is contracted into a fused multiply-add
//! (NVRTC `--fmad=false`, clang `-ffp-contract=off`).

use crate::Element;

/// Sum over ranks of one element, in rank order, inputs canonicalised; rounded to storage.
#[inline]
pub fn sum_ranks<T: Element>(values: impl IntoIterator<Item = T>) -> T {
    let mut acc = 0.0f32;
    let mut first = true;
    for v in values {
        let v = v.canonical_zero().to_f32();
        // The first term is taken as is (0.0 + x would turn an all-(-0.0) sum into +0.0 anyway,
        // but a NaN payload or exact value must pass through unchanged).
        acc = if first { v } else { acc + v };
        first = false;
    }
    T::from_f32(acc)
}

/// `round(f32(sum) + f32(residual))`.
#[inline]
pub fn add_residual<T: Element>(sum: T, residual: T) -> T {
    T::from_f32(sum.to_f32() + residual.to_f32())
}

/// Sum of squares of one row by the canonical tree (see the module docs). `pack` is the number
/// of elements per 16-byte pack for the row's dtype.
pub fn row_sum_squares<T: Element>(row: &[T], pack: usize) -> f32 {
    let n_packs = row.len().div_ceil(pack);
    let mut partials: Vec<f32> = row
        .chunks(pack)
        .map(|p| {
            let mut acc = 0.0f32;
            for (j, v) in p.iter().enumerate() {
                let f = v.to_f32();
                let sq = f * f;
                acc = if j == 0 { sq } else { acc + sq };
            }
            acc
        })
        .collect();
    let mut stride = n_packs.next_power_of_two() / 2;
    while stride >= 1 {
        for i in 0..stride {
            if i + stride < n_packs {
                partials[i] += partials[i + stride];
            }
        }
        stride /= 2;
    }
    partials.first().copied().unwrap_or(0.0)
}

/// `1 / sqrt(sum_squares / n + eps)` in f32 with IEEE-rounded sqrt and division.
#[inline]
pub fn inv_rms(sum_squares: f32, n: usize, eps: f32) -> f32 {
    1.0f32 / (sum_squares / n as f32 + eps).sqrt()
}

/// `round(f32(weight) * f32(round(f32(residual_out) * inv)))`.
#[inline]
pub fn normalise<T: Element>(residual_out: T, weight: T, inv: f32) -> T {
    let normed = T::from_f32(residual_out.to_f32() * inv);
    T::from_f32(weight.to_f32() * normed.to_f32())
}

/// Add+RMSNorm of one row: given the all-reduced `sum` row, writes `residual_out` and `out`.
pub fn add_rmsnorm_row<T: Element>(
    sum: &[T],
    residual: &[T],
    weight: &[T],
    eps: f32,
    residual_out: &mut [T],
    out: &mut [T],
) {
    for ((ro, &s), &r) in residual_out.iter_mut().zip(sum).zip(residual) {
        *ro = add_residual(s, r);
    }
    let inv = inv_rms(row_sum_squares(residual_out, T::DTYPE.pack_elems()), sum.len(), eps);
    for ((o, &ro), &w) in out.iter_mut().zip(residual_out.iter()).zip(weight) {
        *o = normalise(ro, w, inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn tree_matches_hand_computed_order() {
        // 3 packs of 1 element: tree over next_pow2(3) = 4 slots: stride 2: a0 += a2; stride 1: a0 += a1.
        let row = [1.0f32, 1e8, -1e8 + 3.0];
        let sq: Vec<f32> = row.iter().map(|v| v * v).collect();
        let expected = (sq[0] + sq[2]) + sq[1];
        assert_eq!(row_sum_squares(&row, 1).to_bits(), expected.to_bits());
    }

    #[test]
    fn all_negative_zero_sums_to_positive_zero() {
        let nz = bf16::from_bits(0x8000);
        assert_eq!(sum_ranks([nz, nz, nz]).to_bits(), 0);
        assert_eq!(sum_ranks([nz]).to_bits(), 0);
    }

    #[test]
    fn sum_is_rounded_once_in_rank_order() {
        // In f32: (1 + 2^-24) loses the small term, order matters.
        let big = 1.0f32;
        let tiny = f32::powi(2.0, -24);
        assert_eq!(sum_ranks([big, tiny, tiny]).to_bits(), 1.0f32.to_bits());
        assert_eq!(sum_ranks([tiny, tiny, big]).to_bits(), (1.0f32 + f32::powi(2.0, -23)).to_bits());
    }
}

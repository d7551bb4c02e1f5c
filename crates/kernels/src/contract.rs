//! The numerics contract, as the scalar building blocks every backend uses.
//!
//! 1. `s = round(Σ_r f32(canon(x_r)))`, ranks summed in order `0..P`, `canon` maps `-0.0` to `+0.0`
//!    (the push protocol uses `-0.0` as its "not arrived" sentinel, so it can never be data).
//! 2. `residual_out = round(f32(s) + f32(residual))`.
//! 3. `var = row_sum_squares(residual_out) / n`, `inv = 1 / sqrt(var + eps)` (IEEE sqrt and division),
//!    `out = round(f32(weight) * f32(round(f32(residual_out) * inv)))`.
//!
//! The row reduction uses one fixed tree, independent of how a kernel is launched: each 16-byte
//! pack's squares are summed left to right; the pack partials of each group of
//! [`TREE_GROUP`] consecutive packs are added pairwise (`a[i] += a[i + s]`, `s` = 16, 8, 4, 2, 1,
//! packs past the row's end counting as `+0.0`); the group sums (at most [`TREE_GROUPS`]) are
//! added pairwise the same way (`s` = 64 down to 1). Adding `+0.0` to a sum of squares (never
//! `-0.0`) changes nothing, so the padding is exact. The GPU kernels compute the first level with a
//! 32-lane butterfly of shuffles (which groups lanes the same way on 32- and 64-wide warps) and the
//! second in one warp, so `out` does not depend on the path, the launch or the batch. No operation is contracted into a fused multiply-add
//! (NVRTC `--fmad=false`, clang `-ffp-contract=off`).
//!
//! ## Domain
//!
//! `var` is computed in f32, as Hugging Face's `LlamaRMSNorm` does, and the contract keeps that:
//! `out` follows RMSNorm while `v = fl(fl(ss / n) + eps)` is finite and nonzero, where
//! `ss = row_sum_squares(residual_out)` and `n` is the hidden size. At the two edges the steps
//! above give exactly the following (`residual_out` never depends on `ss`, so it is unaffected;
//! `x` is an element of the row's `residual_out`, `w` its weight, `⊕` the sign's xor):
//!
//! - **Overflow, `v = +inf`**: `ss` is `+inf` when any `|x| >= 2^64 ≈ 1.8e19` (its square
//!   overflows), when the squares add up past `f32::MAX ≈ 3.4e38` (at hidden 4096, an RMS above
//!   ≈ 2.9e17), or when an `x` is ±inf. Then `inv = 1 / sqrt(+inf) = +0` and `out` is a zero of
//!   sign `sign(w) ⊕ sign(x)` where `x` and `w` are finite, NaN where either is ±inf
//!   (`inf · 0`). The f64 reference gives ≈ `±w` there.
//! - **Underflow with `eps = 0`, `v = +0`**: `fl(ss / n) = 0` exactly when `ss <= n · 2^-150`,
//!   in particular when every square underflows (every `|x| <= 2^-75 ≈ 2.6e-23`, an all-zero row
//!   included). Then `inv = 1 / sqrt(+0) = +inf` and `out` is an infinity of sign
//!   `sign(w) ⊕ sign(x)` where `x` and `w` are nonzero, NaN where either is ±0 (`0 · inf`).
//!   Any `eps > 0` removes this edge (`v >= eps`). Short of it, squares in f32's subnormal range
//!   (`|x| < 2^-63`, with eps 0 or an eps below them) lose precision: a row whose every `x` is
//!   `1.1171875 · 2^-74` has squares `2^-148` (not `1.248 · 2^-148`) and gives
//!   `out = round(1.1171875 · w)`, not `w`.
//! - A NaN anywhere in the row's `residual_out` makes `ss`, `inv` and every `out` of the row NaN.
//!
//! f16 values reach the overflow edge only through ±inf in `residual_out` (`|x| <= 65504`) and
//! the underflow edge only with an all-zero row (the squares of f16 subnormals are normal f32s).
//! Which NaN comes out is the platform's (payload and sign are not part of the contract); zeros and
//! infinities, signs included, are.

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

/// Packs per group of the first level of the sum-of-squares tree.
pub const TREE_GROUP: usize = 32;
/// Group slots of the second level (`MAX_ROW_PACKS / TREE_GROUP`).
pub const TREE_GROUPS: usize = crate::source::MAX_ROW_PACKS / TREE_GROUP;

/// `a[0]` after `a[i] += a[i + s]` for `s` = `a.len() / 2` down to 1 (`a.len()` a power of two).
fn pairwise(a: &mut [f32]) -> f32 {
    let mut stride = a.len() / 2;
    while stride >= 1 {
        for i in 0..stride {
            a[i] += a[i + stride];
        }
        stride /= 2;
    }
    a[0]
}

/// Sum of squares of one row by the canonical tree (see the module docs). `pack` is the number
/// of elements per 16-byte pack for the row's dtype.
pub fn row_sum_squares<T: Element>(row: &[T], pack: usize) -> f32 {
    let pack_sums: Vec<f32> = row
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
    let mut groups = [0.0f32; TREE_GROUPS];
    for (slot, packs) in groups.iter_mut().zip(pack_sums.chunks(TREE_GROUP)) {
        let mut lanes = [0.0f32; TREE_GROUP];
        lanes[..packs.len()].copy_from_slice(packs);
        *slot = pairwise(&mut lanes);
    }
    debug_assert!(pack_sums.len() <= TREE_GROUP * TREE_GROUPS, "row longer than MAX_ROW_PACKS packs");
    pairwise(&mut groups)
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
        // 3 packs of 1 element in one group of 32 slots (the rest +0.0): s = 2 gives a0 + a2,
        // s = 1 adds a1; the other levels add +0.0.
        let row = [1.0f32, 1e8, -1e8 + 3.0];
        let sq: Vec<f32> = row.iter().map(|v| v * v).collect();
        let expected = (sq[0] + sq[2]) + sq[1];
        assert_eq!(row_sum_squares(&row, 1).to_bits(), expected.to_bits());
    }

    /// One bf16 row through [`add_rmsnorm_row`] with a zero residual (so `residual_out == sum`).
    fn bf16_row(sum: &[bf16], weight: &[bf16], eps: f32) -> (Vec<bf16>, Vec<bf16>) {
        let zeros = vec![bf16::ZERO; sum.len()];
        let mut residual_out = vec![bf16::from_bits(0x7fc1); sum.len()];
        let mut out = vec![bf16::from_bits(0x7fc1); sum.len()];
        add_rmsnorm_row(sum, &zeros, weight, eps, &mut residual_out, &mut out);
        (residual_out, out)
    }

    /// 64 elements (8 packs) of magnitude `m`, signs `+ - + + - ...` (every square the same, so
    /// the sum of squares does not depend on the reduction tree).
    fn row_of(m: f32) -> Vec<bf16> {
        (0..64).map(|i| bf16::from_f32(if i % 3 == 1 { -m } else { m })).collect()
    }

    /// Weights with both signs, a zero of each sign, and an infinity.
    fn weights() -> Vec<bf16> {
        (0..64)
            .map(|i| match i {
                5 => bf16::ZERO,
                6 => bf16::NEG_ZERO,
                7 => bf16::INFINITY,
                _ => bf16::from_f32(if i % 4 == 2 { -1.5 } else { 0.75 }),
            })
            .collect()
    }

    /// A zero, infinity or NaN of the sign `sign(a) xor sign(b)`: the expected `out` at an edge.
    fn signed(a: bf16, b: bf16, magnitude: bf16) -> u16 {
        magnitude.to_bits() | ((a.to_bits() ^ b.to_bits()) & 0x8000)
    }

    #[test]
    fn overflowing_sum_of_squares_gives_signed_zeros() {
        let w = weights();
        // Each square overflows (|x| >= 2^64), and, with no square overflowing, the squares sum
        // past f32::MAX (64 x 2^124 = 2^130; every partial is exact, so any tree overflows).
        for m in [3.0e38f32, 2f32.powi(64), 2f32.powi(62)] {
            let sum = row_of(m);
            assert_eq!(row_sum_squares(&sum, 8), f32::INFINITY, "m = {m:e}");
            assert_eq!(inv_rms(f32::INFINITY, 64, 1e-6).to_bits(), 0);
            let (residual_out, out) = bf16_row(&sum, &w, 1e-6);
            for i in 0..64 {
                assert_eq!(residual_out[i].to_bits(), sum[i].to_bits(), "m = {m:e}, residual_out[{i}]");
                if w[i].is_infinite() {
                    assert!(out[i].is_nan(), "m = {m:e}, out[{i}] = {} (inf x 0)", out[i]);
                } else {
                    assert_eq!(out[i].to_bits(), signed(sum[i], w[i], bf16::ZERO), "m = {m:e}, out[{i}]");
                }
            }
        }
    }

    #[test]
    fn infinite_residual_out_gives_nan_there_and_signed_zeros_elsewhere() {
        // sum + residual = 2 x bf16::MAX overflows to +inf in elements 0..8; the rest are finite.
        let sum: Vec<bf16> = (0..64).map(|i| if i < 8 { bf16::MAX } else { bf16::from_f32(-2.0) }).collect();
        let residual: Vec<bf16> = (0..64).map(|i| if i < 8 { bf16::MAX } else { bf16::ZERO }).collect();
        let w = vec![bf16::from_f32(0.5); 64];
        let mut residual_out = vec![bf16::ZERO; 64];
        let mut out = vec![bf16::ZERO; 64];
        add_rmsnorm_row(&sum, &residual, &w, 1e-6, &mut residual_out, &mut out);
        for i in 0..64 {
            if i < 8 {
                assert_eq!(residual_out[i].to_bits(), bf16::INFINITY.to_bits(), "residual_out[{i}]");
                assert!(out[i].is_nan(), "out[{i}] = {}", out[i]);
            } else {
                assert_eq!(residual_out[i].to_bits(), bf16::from_f32(-2.0).to_bits(), "residual_out[{i}]");
                assert_eq!(out[i].to_bits(), bf16::NEG_ZERO.to_bits(), "out[{i}]");
            }
        }
    }

    #[test]
    fn a_nan_in_the_row_makes_every_out_nan() {
        let mut sum = row_of(1.0);
        sum[17] = bf16::NAN;
        let (residual_out, out) = bf16_row(&sum, &[bf16::ONE; 64], 1e-6);
        assert!(residual_out[17].is_nan());
        assert_eq!(residual_out.iter().filter(|v| v.is_nan()).count(), 1, "residual_out is per element");
        assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
    }

    #[test]
    fn underflowing_sum_of_squares_with_eps_zero_gives_signed_infinities() {
        let w = weights();
        // 2^-75: the square is 2^-150, half the least subnormal, which rounds (to even) to 0.
        // 2^-80 underflows further; an exact zero row is the degenerate case of the same edge.
        for m in [2f32.powi(-75), 2f32.powi(-80), 0.0] {
            let mut sum = row_of(m);
            sum[9] = bf16::ZERO; // an exact zero in the row: 0 x inf
            assert_eq!(row_sum_squares(&sum, 8).to_bits(), 0, "m = {m:e}");
            assert_eq!(inv_rms(0.0, 64, 0.0), f32::INFINITY);
            let (residual_out, out) = bf16_row(&sum, &w, 0.0);
            for i in 0..64 {
                // -0.0 + 0.0 is +0.0: a zero x is +0 in residual_out.
                let x = if sum[i].to_f32() == 0.0 { 0 } else { sum[i].to_bits() };
                assert_eq!(residual_out[i].to_bits(), x, "m = {m:e}, residual_out[{i}]");
                if sum[i].to_f32() == 0.0 || w[i].to_f32() == 0.0 {
                    assert!(out[i].is_nan(), "m = {m:e}, out[{i}] = {} (0 x inf)", out[i]);
                } else {
                    assert_eq!(out[i].to_bits(), signed(sum[i], w[i], bf16::INFINITY), "m = {m:e}, out[{i}]");
                }
            }
            // Any eps > 0 removes the edge: eps = 2^-148 gives inv = 2^74 exactly, so a row of
            // 2^-75 normalises to 0.5 and out = 0.5 w.
            if m == 2f32.powi(-75) {
                let (_, out) = bf16_row(&sum, &w, 2f32.powi(-148));
                for i in (0..64).filter(|&i| i != 9 && !w[i].is_infinite()) {
                    let want = bf16::from_f32(w[i].to_f32() * if sum[i].to_f32() < 0.0 { -0.5 } else { 0.5 });
                    assert_eq!(out[i].to_bits(), want.to_bits(), "eps 2^-148, out[{i}]");
                }
            }
        }
    }

    #[test]
    fn subnormal_squares_lose_precision_but_stay_finite() {
        let w: Vec<bf16> = (0..64).map(|i| bf16::from_f32(if i % 2 == 0 { 1.0 } else { -0.5 })).collect();
        // Every element equal, so x / rms = 1 exactly and out = w in exact arithmetic.
        // (2^-74)^2 = 2^-148 is exact: out = w.
        // (1.1171875 x 2^-74)^2 = 1.248 x 2^-148 = 2.496 x 2^-149 rounds to 2^-148: var = 2^-148,
        // inv = 2^74 still, and out = 1.1171875 w (exact in bf16 for these weights), not w.
        for (m, scale) in [(2f32.powi(-74), 1.0f32), (1.1171875 * 2f32.powi(-74), 1.1171875)] {
            let sum = vec![bf16::from_f32(m); 64];
            assert_eq!(sum[0].to_f32(), m, "m = {m:e} is a bf16");
            assert_eq!(row_sum_squares(&sum, 8).to_bits(), 2f32.powi(-142).to_bits(), "m = {m:e}");
            let (_, out) = bf16_row(&sum, &w, 0.0);
            for (i, o) in out.iter().enumerate() {
                let want = w[i].to_f32() * scale;
                assert_eq!(bf16::from_f32(want).to_f32(), want, "{want} is a bf16");
                assert_eq!(o.to_bits(), bf16::from_f32(want).to_bits(), "m = {m:e}, out[{i}]");
            }
        }
    }

    #[test]
    fn groups_are_reduced_before_the_group_sums() {
        // 49 packs of 1 element: squares a0 = 1, a16 = a48 = 2^-24, the rest 0. The tree is
        // (a0 + a16) + (a32 + a48) = (1 + 2^-24) + 2^-24 = 1 (each addition a tie to even); a flat
        // pairwise tree over 64 slots would give (a0 + a32) + (a16 + a48) = 1 + 2^-23.
        let tiny = f32::powi(2.0, -12);
        let mut row = vec![0.0f32; 49];
        row[0] = 1.0;
        row[16] = tiny;
        row[48] = tiny;
        assert_eq!(row_sum_squares(&row, 1).to_bits(), 1.0f32.to_bits());
        let flat = (1.0f32 + 0.0) + (tiny * tiny + tiny * tiny);
        assert_eq!(flat.to_bits(), (1.0f32 + f32::powi(2.0, -23)).to_bits());
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

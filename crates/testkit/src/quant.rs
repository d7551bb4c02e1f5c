//! The contract's epilogues (Gemma's norm, no residual, FP8 out) computed bit for bit,
//! independently of `arfuse_kernels::contract`.
//!
//! [`crate::Reference`] checks `out` against an f64 RMSNorm with a rounding window, which cannot
//! say which FP8 code a dynamic scale leads to. Quantised outputs are exact by contract, so this
//! module evaluates the contract's f32 sequence itself, from its description in
//! `arfuse_kernels::contract`'s module docs: the rank sum and residual add as
//! [`crate::reference`] does, the sum of squares by the fixed pack tree (written here again), the
//! f32 `inv`, step 3 in f32 with this crate's own rounding ([`crate::float`]), and the FP8
//! encoding as a *search*: the nearest of the format's decoded codes (ties to the even code),
//! which shares nothing with the bit-shifting encoder the backends use. It borrows only the
//! description types (`Epilogue`, `Quant`, `Fp8Format`, `Scaling`, `Norm`) from the contract.

use crate::fixtures::Fixture;
use crate::float::{round_to, to_f64};
use crate::reference::{add_residual_element, reduce_element};
use arfuse_kernels::contract::{Epilogue, Fp8Format, Norm, Quant, Scaling};
use arfuse_kernels::Element;

/// This module's own description of an FP8 format: `(bias, largest finite value, NaN code)`.
fn layout(format: Fp8Format) -> (i32, f64, u8) {
    match format {
        Fp8Format::E4m3Fn => (7, 448.0, 0x7f),
        Fp8Format::E4m3Fnuz => (8, 240.0, 0x80),
    }
}

/// The value of `code` in `format`, `None` for a NaN code.
pub fn fp8_value(format: Fp8Format, code: u8) -> Option<f64> {
    let (bias, _, _) = layout(format);
    let negative = code >= 128;
    let e = i32::from(code / 8 % 16);
    let m = f64::from(code % 8);
    match format {
        Fp8Format::E4m3Fn if code % 128 == 127 => return None,
        Fp8Format::E4m3Fnuz if code == 128 => return None,
        _ => {}
    }
    let magnitude = if e == 0 { m / 8.0 * 2f64.powi(1 - bias) } else { (1.0 + m / 8.0) * 2f64.powi(e - bias) };
    Some(if negative { -magnitude } else { magnitude })
}

/// `v` encoded in `format` by searching the non-negative codes for the nearest value: ties to the
/// even code, `|v| >=` the largest value (infinities included) saturating, NaN to the format's
/// NaN, the sign put back (a zero keeps it in e4m3fn; e4m3fnuz has no `-0`).
pub fn fp8_encode(format: Fp8Format, v: f32) -> u8 {
    let (_, max, nan) = layout(format);
    if v.is_nan() {
        return nan;
    }
    let x = f64::from(v).abs();
    let mut best = 0u8;
    let mut best_distance = f64::INFINITY;
    for code in 0u8..128 {
        let Some(value) = fp8_value(format, code) else { continue };
        let d = (value - x.min(max)).abs();
        if d < best_distance || (d == best_distance && code % 2 == 0) {
            best = code;
            best_distance = d;
        }
    }
    let negative = v.is_sign_negative();
    match format {
        Fp8Format::E4m3Fnuz if best == 0 => 0,
        _ if negative => best | 0x80,
        _ => best,
    }
}

/// `1 / (fmax * 512)`, the floor of dynamic scales, rounded to f32 from the exact value.
pub fn fp8_min_scale(format: Fp8Format) -> f32 {
    let (_, max, _) = layout(format);
    (1.0 / (max * 512.0)) as f32
}

/// The dynamic scale of a group of `ys`: `max(amax / fmax, min_scale)` in f32, NaN skipped.
pub fn dynamic_scale(format: Fp8Format, ys: &[f32]) -> f32 {
    let (_, max, _) = layout(format);
    let mut amax = 0.0f32;
    for y in ys {
        if !y.is_nan() && y.abs() > amax {
            amax = y.abs();
        }
    }
    let s = amax / max as f32;
    if s > fp8_min_scale(format) {
        s
    } else {
        fp8_min_scale(format)
    }
}

/// The contract's sum of squares of one row, by its fixed tree: squares summed left to right per
/// pack of `pack` elements; each group of 32 pack partials (missing ones `+0.0`) reduced pairwise
/// with strides 16..1; the group sums (128 slots) likewise with strides 64..1.
pub fn tree_sum_squares(row: &[f32], pack: usize) -> f32 {
    let partials: Vec<f32> =
        row.chunks(pack).map(|p| p.iter().skip(1).fold(p[0] * p[0], |acc, v| acc + v * v)).collect();
    let halve = |slots: &mut Vec<f32>| {
        while slots.len() > 1 {
            let half = slots.len() / 2;
            let (lo, hi) = slots.split_at_mut(half);
            for (a, b) in lo.iter_mut().zip(hi.iter()) {
                *a += *b;
            }
            slots.truncate(half);
        }
        slots[0]
    };
    let mut groups: Vec<f32> = partials
        .chunks(32)
        .map(|g| {
            let mut slots = g.to_vec();
            slots.resize(32, 0.0);
            halve(&mut slots)
        })
        .collect();
    assert!(groups.len() <= 128, "a row of more than 4096 packs");
    groups.resize(128, 0.0);
    halve(&mut groups)
}

/// Every output of one fixture under an epilogue, exact (rank 0's; every rank's are the same).
#[derive(Clone, Debug)]
pub struct ExactOutputs<T: Element> {
    /// `residual_out` (empty with no residual).
    pub residual_out: Vec<T>,
    /// `out`, bit for bit.
    pub out: Vec<T>,
    /// The FP8 codes of `out` (empty without quantisation).
    pub codes: Vec<u8>,
    /// The scales (per token `[rows]`, per group `[rows, hidden / 128]`; empty per tensor or
    /// without quantisation).
    pub scales: Vec<f32>,
}

impl<T: Element> ExactOutputs<T> {
    /// Computes the outputs of `fixture` under `epilogue`.
    pub fn compute(fixture: &Fixture<T>, epilogue: &Epilogue) -> Self {
        let (rows, hidden) = (fixture.problem.rows, fixture.problem.hidden);
        let pack = 16 / std::mem::size_of::<T>();
        let eps = fixture.problem.eps;
        let mut result =
            ExactOutputs { residual_out: Vec::new(), out: Vec::new(), codes: Vec::new(), scales: Vec::new() };
        for row in 0..rows {
            let base = row * hidden;
            let x: Vec<T> = (base..base + hidden)
                .map(|i| {
                    let s = reduce_element(fixture.inputs.iter().map(|rank| rank[i]));
                    if epilogue.no_residual {
                        s
                    } else {
                        add_residual_element(s, fixture.residual[i])
                    }
                })
                .collect();
            if !epilogue.no_residual {
                result.residual_out.extend_from_slice(&x);
            }
            let xf: Vec<f32> = x.iter().map(|&v| to_f64(v) as f32).collect();
            let inv = 1.0f32 / (tree_sum_squares(&xf, pack) / hidden as f32 + eps).sqrt();
            let out: Vec<T> = xf
                .iter()
                .zip(&fixture.weight)
                .map(|(&xv, &w)| {
                    let normed = to_f64(round_to::<T>(f64::from(xv * inv))) as f32;
                    let w = to_f64(w) as f32;
                    let y = match epilogue.norm {
                        Norm::Standard => w * normed,
                        Norm::GemmaOffset => normed * (w + 1.0),
                    };
                    round_to::<T>(f64::from(y))
                })
                .collect();
            if let Some(quant) = epilogue.quant {
                let (codes, scales) = quantize_exact(&out, hidden, quant);
                result.codes.extend(codes);
                result.scales.extend(scales);
            }
            result.out.extend(out);
        }
        result
    }
}

/// The FP8 codes and scales of `values` (`[rows, hidden]`, `y = f32(value)`) under `quant`, by
/// this module's own sequence: what the epilogue writes for an `out` of these values, and what the
/// separate quantisation kernel (`Op::QuantizeFp8`) must write for them.
pub fn quantize_exact<T: Element>(values: &[T], hidden: usize, quant: Quant) -> (Vec<u8>, Vec<f32>) {
    assert!(hidden > 0 && values.len() % hidden == 0, "values are not whole rows of {hidden}");
    let (mut codes, mut scales) = (Vec::with_capacity(values.len()), Vec::new());
    for row in values.chunks(hidden) {
        let ys: Vec<f32> = row.iter().map(|&v| to_f64(v) as f32).collect();
        let group = match quant.scaling {
            Scaling::PerTensor(_) | Scaling::PerToken => hidden,
            Scaling::PerGroup => 128,
        };
        for g in ys.chunks(group) {
            let scale = match quant.scaling {
                Scaling::PerTensor(s) => s,
                _ => {
                    let s = dynamic_scale(quant.format, g);
                    scales.push(s);
                    s
                }
            };
            codes.extend(g.iter().map(|&y| fp8_encode(quant.format, y / scale)));
        }
    }
    (codes, scales)
}

/// Every quantisation the contract defines: each format × scaling (`static_scale` per tensor).
pub fn all_quants(static_scale: f32) -> Vec<Quant> {
    let mut all = Vec::new();
    for format in Fp8Format::ALL {
        for scaling in [Scaling::PerTensor(static_scale), Scaling::PerToken, Scaling::PerGroup] {
            all.push(Quant { format, scaling });
        }
    }
    all
}

/// Every epilogue the contract defines: both norms, with and without residual, unquantised and
/// each format × scaling (`static_scale` for per tensor).
pub fn all_epilogues(static_scale: f32) -> Vec<Epilogue> {
    let quants = std::iter::once(None).chain(all_quants(static_scale).into_iter().map(Some));
    let mut all = Vec::new();
    for quant in quants {
        for norm in [Norm::Standard, Norm::GemmaOffset] {
            for no_residual in [false, true] {
                all.push(Epilogue { norm, no_residual, quant });
            }
        }
    }
    all
}

/// A static scale that saturates part of a generated fixture's `out` (|out| above `~0.9 fmax ×
/// scale`, i.e. above ~0.9 for this scale: a few percent of normalised activations).
pub fn saturating_scale(format: Fp8Format) -> f32 {
    1.0 / layout(format).1 as f32
}

/// [`Fixture::generate`] with the quantisation edges planted (rows that exist only):
/// row 1 all zeros (amax 0: every scale `min_scale`); row 2 a NaN in rank 0's input (a NaN
/// `residual_out`, the whole row's `out` NaN); row 3 `+inf` in rank 1's input (an infinite
/// `residual_out`: the row's `out` zeros and one NaN); row 4 its second group of 128 all zeros
/// and its first multiplied up to overflow 8-bit ranges (hidden >= 256); row 5 `-0.0` everywhere.
pub fn quant_fixture<T: Element>(problem: &crate::Problem) -> Fixture<T> {
    let mut f = Fixture::<T>::generate(problem);
    let hidden = problem.hidden;
    let zero = round_to::<T>(0.0);
    let neg_zero = round_to::<T>(-0.0);
    let set_row = |f: &mut Fixture<T>, row: usize, value: T, cols: std::ops::Range<usize>| {
        if row >= problem.rows {
            return;
        }
        for rank in 0..problem.world_size {
            for c in cols.clone() {
                f.inputs[rank][row * hidden + c] = value;
            }
        }
        for c in cols {
            f.residual[row * hidden + c] = value;
        }
    };
    set_row(&mut f, 1, zero, 0..hidden);
    set_row(&mut f, 5, neg_zero, 0..hidden);
    if hidden >= 256 {
        set_row(&mut f, 4, zero, 128..256);
    }
    if problem.rows > 2 {
        f.inputs[0][2 * hidden + 3] = round_to::<T>(f64::NAN);
    }
    if problem.rows > 3 {
        f.inputs[problem.world_size - 1][3 * hidden + 5] = round_to::<T>(f64::INFINITY);
    }
    f
}

/// A `[rows, hidden]` tensor to quantise directly (the separate quantisation kernel's input),
/// rank 0's generated input of `problem` with the edges planted (rows that exist only): row 1 all
/// zeros (amax 0); row 2 a NaN at column 3; row 3 `+inf` at column 5 and `-inf` at column 6; row 4
/// its first group of 128 at `±1000` (saturating any scale below `1000 / fmax`) and its second
/// all zeros (hidden >= 256); row 5 `-0.0` everywhere; row 6 scaled by `2^-20` (tiny codes,
/// subnormal f16).
pub fn quant_input<T: Element>(problem: &crate::Problem) -> Vec<T> {
    let mut v = Fixture::<T>::generate(problem).inputs.swap_remove(0);
    let (rows, hidden) = (problem.rows, problem.hidden);
    let mut set = |row: usize, col: usize, value: f64| {
        if row < rows && col < hidden {
            v[row * hidden + col] = round_to::<T>(value);
        }
    };
    for c in 0..hidden {
        set(1, c, 0.0);
        set(5, c, -0.0);
    }
    set(2, 3, f64::NAN);
    set(3, 5, f64::INFINITY);
    set(3, 6, f64::NEG_INFINITY);
    if hidden >= 256 {
        for c in 0..128 {
            set(4, c, if c % 3 == 0 { -1000.0 } else { 1000.0 });
            set(4, 128 + c, 0.0);
        }
    }
    if rows > 6 {
        for c in 0..hidden {
            let x = to_f64(v[6 * hidden + c]);
            v[6 * hidden + c] = round_to::<T>(x * 2f64.powi(-20));
        }
    }
    v
}

/// Indices where two code tensors differ, with both codes (for a failure message), at most 16.
pub fn code_mismatches(want: &[u8], got: &[u8]) -> Vec<(usize, u8, u8)> {
    assert_eq!(want.len(), got.len(), "code tensors of different lengths");
    want.iter().zip(got).enumerate().filter(|(_, (a, b))| a != b).map(|(i, (&a, &b))| (i, a, b)).take(16).collect()
}

/// Panics with the first differences unless `got` equals `want` bit for bit.
pub fn assert_codes_exact(what: &str, want: &[u8], got: &[u8]) {
    let diff = code_mismatches(want, got);
    assert!(diff.is_empty(), "{what}: FP8 codes differ (index, want, got): {diff:x?}");
}

/// Panics unless `got` equals `want` bit for bit (f32 scales; NaN never expected).
pub fn assert_scales_exact(what: &str, want: &[f32], got: &[f32]) {
    assert_eq!(want.len(), got.len(), "{what}: scale count");
    let diff: Vec<_> =
        want.iter().zip(got).enumerate().filter(|(_, (a, b))| a.to_bits() != b.to_bits()).take(16).collect();
    assert!(diff.is_empty(), "{what}: scales differ (index, want, got): {diff:?}");
}

/// Panics unless `got` equals `want` bit for bit, NaN matching any NaN.
pub fn assert_exact<T: Element>(what: &str, want: &[T], got: &[T]) {
    assert_eq!(want.len(), got.len(), "{what}: length");
    let diff: Vec<_> = want
        .iter()
        .zip(got)
        .enumerate()
        .filter(|(_, (&a, &b))| {
            !(a.to_bits_u32() == b.to_bits_u32() || (crate::float::is_nan(a) && crate::float::is_nan(b)))
        })
        .map(|(i, (&a, &b))| (i, a, b))
        .take(16)
        .collect();
    assert!(diff.is_empty(), "{what}: differs (index, want, got): {diff:?}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use arfuse_kernels::contract;

    /// The independent encoder and the contract's agree on every code and a sweep of f32s.
    #[test]
    fn search_encoder_matches_the_contract_encoder() {
        for f in Fp8Format::ALL {
            for code in 0..=255u8 {
                match fp8_value(f, code) {
                    None => assert!(contract::Fp8Format::decode(f, code).is_nan()),
                    Some(v) => assert_eq!(f64::from(f.decode(code)), v, "{} {code:#04x}", f.name()),
                }
            }
            let mut bits = 0u32;
            loop {
                let v = f32::from_bits(bits);
                assert_eq!(fp8_encode(f, v), f.encode(v), "{} {v:e} ({bits:#010x})", f.name());
                match bits.checked_add(0x1003) {
                    Some(b) => bits = b,
                    None => break,
                }
            }
            assert_eq!(fp8_min_scale(f), f.min_scale());
        }
    }

    #[test]
    fn tree_matches_the_contract() {
        let row: Vec<f32> = (0..8192).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1.37e-3).collect();
        for pack in [4, 8] {
            for len in [8, 64, 1000, 4096, 8192] {
                let len = len / pack * pack;
                assert_eq!(
                    tree_sum_squares(&row[..len], pack).to_bits(),
                    contract::row_sum_squares(&row[..len], pack).to_bits(),
                    "pack {pack} len {len}"
                );
            }
        }
    }

    /// The contract's `epilogue_row` (what the CPU backend runs) and this module agree on every
    /// output of every epilogue, edges planted, for every dtype.
    #[test]
    fn exact_outputs_match_the_contract_rows() {
        crate::with_dtype!(arfuse_kernels::DType::Bf16, T => check::<T>());
        crate::with_dtype!(arfuse_kernels::DType::F16, T => check::<T>());
        crate::with_dtype!(arfuse_kernels::DType::F32, T => check::<T>());
        fn check<T: Element>() {
            let problem = crate::Problem::new(3, 7, 512, T::DTYPE);
            let fixture = quant_fixture::<T>(&problem);
            for format in Fp8Format::ALL {
                for e in all_epilogues(saturating_scale(format)) {
                    let want = ExactOutputs::compute(&fixture, &e);
                    let hidden = problem.hidden;
                    let per_row = e.quant.map_or(0, |q| q.scaling.scales_per_row(hidden));
                    let mut got = ExactOutputs::<T> {
                        residual_out: vec![T::from_bits_u32(0x7fc1); if e.no_residual { 0 } else { problem.elems() }],
                        out: vec![T::from_bits_u32(0x7fc1); problem.elems()],
                        codes: vec![0x55; if e.quant.is_some() { problem.elems() } else { 0 }],
                        scales: vec![f32::NAN; per_row * problem.rows],
                    };
                    for row in 0..problem.rows {
                        let r = row * hidden..(row + 1) * hidden;
                        let sum: Vec<T> =
                            r.clone().map(|i| contract::sum_ranks(fixture.inputs.iter().map(|x| x[i]))).collect();
                        let (ro, codes): (&mut [T], &mut [u8]) = (
                            if e.no_residual { &mut [] } else { &mut got.residual_out[r.clone()] },
                            if e.quant.is_some() { &mut got.codes[r.clone()] } else { &mut [] },
                        );
                        contract::epilogue_row(
                            &e,
                            &sum,
                            &fixture.residual[r.clone()],
                            &fixture.weight,
                            problem.eps,
                            ro,
                            &mut got.out[r],
                            codes,
                            &mut got.scales[row * per_row..(row + 1) * per_row],
                        );
                    }
                    let what = format!("{:?} {e:?}", T::DTYPE);
                    assert_exact(&format!("{what} residual_out"), &want.residual_out, &got.residual_out);
                    assert_exact(&format!("{what} out"), &want.out, &got.out);
                    assert_codes_exact(&what, &want.codes, &got.codes);
                    assert_scales_exact(&what, &want.scales, &got.scales);
                    if let Some(q) = e.quant {
                        // The planted edges are there: saturated codes, zero-row scales, NaNs.
                        let max = q.format.max_code();
                        if matches!(q.scaling, Scaling::PerTensor(_)) {
                            assert!(want.codes.iter().any(|&c| c & 0x7f == max), "{what}: nothing saturates");
                        } else {
                            assert_eq!(want.scales[per_row], q.format.min_scale(), "{what}: the zero row");
                        }
                        assert!(want.codes[2 * hidden..3 * hidden].iter().all(|&c| q.format.is_nan(c)), "{what}");
                    }
                }
            }
        }
    }
}

//! The reference of the numerics contract (`arfuse_kernels::contract`), written independently of `arfuse-kernels`.
//!
//! # What it computes
//! For every element `i` of a [`Fixture`] (`P` ranks, `[rows, hidden]`):
//! 1. `sum[i] = RNE_T(Σ_{r=0..P-1} f32(canon(x_r[i])))`, the f32 additions performed in rank
//!    order, `canon` mapping `-0.0` to `+0.0` (so an all-`-0.0` sum is `+0.0`).
//! 2. `residual_out[i] = RNE_T(f32(sum[i]) + f32(residual[i]))` (one f32 addition).
//! 3. Per row, in `f64`: `var = Σ_j ro_j² / hidden`, `inv = 1 / sqrt(var + eps)`,
//!    `normed = ro * inv`; then `out[i] = RNE_T(w * RNE_T(normed))`, each `RNE_T` taken directly
//!    from the exact `f64` value (see [`crate::float`]).
//!
//! `RNE_T` is round-to-nearest-even into the storage type, by this crate's own code. Decoding,
//! canonicalisation and rounding do not use `arfuse_kernels::contract` nor `half`'s conversions.
//!
//! # What it guarantees
//! - `sum` and `residual_out` are **exact**: the contract fixes every operation of steps 1-2
//!   (f32 additions in rank order, one storage rounding each), and IEEE f32 addition is
//!   deterministic, so a correct implementation matches them bit for bit, signs of zeros included.
//! - `out` is the contract evaluated with an exact `inv` (the `f64` error, ~2^-50 relative, is
//!   far below every rounding decision that matters). Implementations compute `inv` in f32 by a
//!   fixed reduction tree, which is off by up to ~2^-20 relative. That can move `normed` across a
//!   rounding boundary of `T` when it lies close to one, so the reference accepts, for each
//!   element, **every** `out` value that any `normed'` within `|normed| * w_T + 2^-150` of `normed`
//!   leads to, where the window `w_T` is [`rounding_window`] (2^-16 for bf16/f16, 2^-19 for f32;
//!   the absolute 2^-150 covers f32 products that round in the subnormal range). For bf16/f16
//!   that is one value or two neighbours; the accepted set is a contiguous range of `T`.
//!   [`Reference::out_max_ulp`] is the distance to that range, so a correct implementation
//!   scores **0**, and the contract's "within 1 ulp" leaves one ulp of slack on top.
//! - NaN: where the reference is NaN (only if a fixture holds infinities or NaNs, which generated
//!   fixtures never do), any NaN is accepted; a NaN where the reference has a number is at
//!   distance `u32::MAX`.
//!
//! Assumptions: `eps` is not so small that an f32 sum of squares underflowing (rows of values
//! below ~1e-19) changes `var + eps` noticeably; all generated fixtures satisfy this.

use crate::fixtures::{Fixture, Problem};
use crate::float::{exact_decimal_of, hex_bits_of, round_to, to_f64, Format};
use crate::ulp::{ordered_key, ulp_distance_to_range};
use arfuse_kernels::{DType, Element};
use std::fmt;

/// Half-width, relative to `|normed|`, of the band around `normed` in which both roundings are accepted.
///
/// bf16/f16: 2^-16 (the f32 `inv` of an implementation is good to ~2^-20; the storage spacing is
/// 2^-8..2^-11, so the band marks only elements that truly sit on a boundary). f32: 2^-19, since
/// the storage spacing is itself 2^-24 (a correct implementation is then accepted by a margin of
/// ~2x, and an error above ~2^-19 relative is still caught).
pub const fn rounding_window(dtype: DType) -> f64 {
    match dtype {
        DType::Bf16 | DType::F16 => 1.0 / 65536.0,
        DType::F32 => 1.0 / 524_288.0,
    }
}

/// Absolute slack of the band: half the smallest f32 subnormal, the largest error of an f32
/// product that rounds in the subnormal range.
const SUBNORMAL_SLACK: f64 = 7.006_492_321_624_085e-46; // 2^-150

/// `+0.0` for `-0.0`, else the exact value as f32 (every storage value is an f32).
#[inline]
fn canonical_f32<T: Element>(value: T) -> f32 {
    let bits = value.to_bits_u32();
    if bits == Format::of(T::DTYPE).sign_bit() {
        0.0
    } else {
        to_f64(value) as f32
    }
}

/// Step 1 for one element: inputs canonicalised, summed in f32 in the iterator's order, rounded to `T`.
/// An empty iterator gives `+0.0`.
pub fn reduce_element<T: Element>(values: impl IntoIterator<Item = T>) -> T {
    let mut values = values.into_iter();
    let Some(first) = values.next() else { return T::from_bits_u32(0) };
    let sum = values.fold(canonical_f32(first), |acc, v| acc + canonical_f32(v));
    round_to(f64::from(sum))
}

/// Step 2 for one element: `RNE_T(f32(sum) + f32(residual))`.
#[inline]
pub fn add_residual_element<T: Element>(sum: T, residual: T) -> T {
    let total = to_f64(sum) as f32 + to_f64(residual) as f32;
    round_to(f64::from(total))
}

/// Elements whose accepted `out` is a range wider than the nearest value.
#[derive(Clone, Copy, Debug)]
struct Alternative<T> {
    index: usize,
    lo: T,
    hi: T,
}

/// The contract's outputs for one fixture (every rank's outputs are the same).
#[derive(Clone, Debug)]
pub struct Reference<T: Element> {
    /// The problem the fixture was made for.
    pub problem: Problem,
    /// Step 1, the all-reduced sum (what the unfused path stores between its kernels), exact.
    pub sum: Vec<T>,
    /// Step 2, exact.
    pub residual_out: Vec<T>,
    /// Step 3 with an exact `inv`: the nearest value of the accepted range.
    pub out: Vec<T>,
    /// `1 / sqrt(var + eps)` of each row, in f64.
    pub inv_rms: Vec<f64>,
    /// Sorted by index: elements where more than one `out` is accepted.
    alternatives: Vec<Alternative<T>>,
}

impl<T: Element> Reference<T> {
    /// Computes the reference of `fixture`.
    pub fn compute(fixture: &Fixture<T>) -> Self {
        let problem = fixture.problem.clone();
        let (rows, hidden) = (problem.rows, problem.hidden);
        let elems = rows * hidden;
        let window = rounding_window(T::DTYPE);
        let mut sum = Vec::with_capacity(elems);
        let mut residual_out = Vec::with_capacity(elems);
        let mut out = Vec::with_capacity(elems);
        let mut inv_rms = Vec::with_capacity(rows);
        let mut alternatives = Vec::new();
        for row in 0..rows {
            let base = row * hidden;
            for i in base..base + hidden {
                let s = reduce_element(fixture.inputs.iter().map(|rank| rank[i]));
                sum.push(s);
                residual_out.push(add_residual_element(s, fixture.residual[i]));
            }
            let row_out = &residual_out[base..base + hidden];
            let sum_squares: f64 = row_out.iter().map(|&v| to_f64(v) * to_f64(v)).sum();
            let var = sum_squares / hidden as f64;
            let inv = 1.0 / (var + f64::from(problem.eps)).sqrt();
            inv_rms.push(inv);
            for (col, (&ro, &w)) in row_out.iter().zip(&fixture.weight).enumerate() {
                let weight = to_f64(w);
                let normed = to_f64(ro) * inv;
                let nearest: T = round_to(weight * to_f64(round_to::<T>(normed)));
                out.push(nearest);
                let slack = normed.abs() * window + SUBNORMAL_SLACK;
                let low: T = round_to(weight * to_f64(round_to::<T>(normed - slack)));
                let high: T = round_to(weight * to_f64(round_to::<T>(normed + slack)));
                if let (Some(kn), Some(kl), Some(kh)) = (ordered_key(nearest), ordered_key(low), ordered_key(high)) {
                    if kl != kn || kh != kn {
                        // Multiplying by `weight` is monotone, so the accepted outputs lie between these.
                        let (lo, hi) = if kl <= kh { (low, high) } else { (high, low) };
                        alternatives.push(Alternative { index: base + col, lo, hi });
                    }
                }
            }
        }
        Reference { problem, sum, residual_out, out, inv_rms, alternatives }
    }

    /// The accepted range `(lo, hi)` of `out[index]` (ordered; equal to `(out[index], out[index])`
    /// where the rounding is unambiguous).
    pub fn accepted(&self, index: usize) -> (T, T) {
        match self.alternatives.binary_search_by_key(&index, |a| a.index) {
            Ok(k) => (self.alternatives[k].lo, self.alternatives[k].hi),
            Err(_) => (self.out[index], self.out[index]),
        }
    }

    /// How many elements accept more than one `out` value.
    pub fn ambiguous_count(&self) -> usize {
        self.alternatives.len()
    }

    /// Ulp distance of `got` (for element `index`) to its accepted range.
    pub fn out_ulp(&self, index: usize, got: T) -> u32 {
        let (lo, hi) = self.accepted(index);
        ulp_distance_to_range(got, lo, hi)
    }

    /// Calls `f(index, ulp distance to the accepted range)` for every element of `out`.
    fn for_each_out_ulp(&self, what: &str, out: &[T], mut f: impl FnMut(usize, u32)) {
        check_len(what, out.len(), self.out.len());
        let mut alternatives = self.alternatives.iter().peekable();
        for (index, &got) in out.iter().enumerate() {
            let (lo, hi) = match alternatives.next_if(|a| a.index == index) {
                Some(a) => (a.lo, a.hi),
                None => (self.out[index], self.out[index]),
            };
            f(index, ulp_distance_to_range(got, lo, hi));
        }
    }

    /// The largest ulp distance of `out` to the accepted ranges: 0 for a correct implementation;
    /// the contract allows 1.
    ///
    /// # Panics
    /// If `out` does not have `rows * hidden` elements (a broken test).
    pub fn out_max_ulp(&self, out: &[T]) -> u32 {
        let mut max = 0;
        self.for_each_out_ulp("out", out, |_, ulp| max = max.max(ulp));
        max
    }

    /// The elements of `out` further than `max_ulp` from their accepted range.
    ///
    /// # Panics
    /// If `out` does not have `rows * hidden` elements (a broken test).
    pub fn out_violations(&self, out: &[T], max_ulp: u32) -> Mismatches {
        let mut report = Mismatches::new(T::DTYPE, self.problem.hidden, out.len());
        self.for_each_out_ulp("out", out, |index, ulp| {
            if ulp > max_ulp {
                let (lo, hi) = self.accepted(index);
                report.push(index, self.out[index], (lo, hi), out[index], ulp);
            }
        });
        report
    }

    /// The elements of `got` that are not bit-identical to [`Reference::residual_out`].
    ///
    /// # Panics
    /// If `got` does not have `rows * hidden` elements (a broken test).
    pub fn residual_out_mismatches(&self, got: &[T]) -> Mismatches {
        exact_mismatches("residual_out", &self.residual_out, got, self.problem.hidden)
    }

    /// The elements of `got` that are not bit-identical to [`Reference::sum`] (for all-reduce kernels).
    ///
    /// # Panics
    /// If `got` does not have `rows * hidden` elements (a broken test).
    pub fn sum_mismatches(&self, got: &[T]) -> Mismatches {
        exact_mismatches("sum", &self.sum, got, self.problem.hidden)
    }

    /// Panics (the intended test failure) unless `got` is bit-identical to `residual_out`.
    #[track_caller]
    pub fn assert_residual_out_exact(&self, what: &str, got: &[T]) {
        let report = self.residual_out_mismatches(got);
        if !report.is_empty() {
            panic!("{what}: residual_out is not bit-exact vs the reference ({}):\n{report}", self.problem);
        }
    }

    /// Panics (the intended test failure) unless `got` is bit-identical to the all-reduced `sum`.
    #[track_caller]
    pub fn assert_sum_exact(&self, what: &str, got: &[T]) {
        let report = self.sum_mismatches(got);
        if !report.is_empty() {
            panic!("{what}: the all-reduced sum is not bit-exact vs the reference ({}):\n{report}", self.problem);
        }
    }

    /// Panics (the intended test failure) if an element of `got` is more than `max_ulp` from its
    /// accepted range (the contract: `max_ulp = 1`).
    #[track_caller]
    pub fn assert_out_within(&self, what: &str, got: &[T], max_ulp: u32) {
        let report = self.out_violations(got, max_ulp);
        if !report.is_empty() {
            panic!("{what}: out is more than {max_ulp} ulp from the f64 reference ({}):\n{report}", self.problem);
        }
    }
}

#[track_caller]
fn check_len(what: &str, got: usize, expected: usize) {
    assert_eq!(got, expected, "{what}: got {got} elements, the reference has {expected}");
}

fn exact_mismatches<T: Element>(what: &str, expected: &[T], got: &[T], hidden: usize) -> Mismatches {
    check_len(what, got.len(), expected.len());
    let mut report = Mismatches::new(T::DTYPE, hidden, got.len());
    for (index, (&e, &g)) in expected.iter().zip(got).enumerate() {
        if e.to_bits_u32() != g.to_bits_u32() {
            report.push(index, e, (e, e), g, crate::ulp::ulp_distance(e, g));
        }
    }
    report
}

/// One element that failed a comparison, as raw bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Flat index.
    pub index: usize,
    /// Row (token).
    pub row: usize,
    /// Column (hidden index).
    pub col: usize,
    /// The reference's value.
    pub expected: u32,
    /// The accepted range `(lo, hi)`; both equal `expected` where only one value is accepted.
    pub accepted: (u32, u32),
    /// What the implementation wrote.
    pub got: u32,
    /// Ulp distance to the accepted range (`u32::MAX`: NaN against a number).
    pub ulp: u32,
}

/// The result of comparing a buffer with the reference: how many elements failed, and the first few.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatches {
    /// The dtype of the compared elements.
    pub dtype: DType,
    /// Elements per row (to turn indices into rows and columns).
    pub hidden: usize,
    /// Elements compared.
    pub compared: usize,
    /// Elements that failed.
    pub total: usize,
    /// The first [`Mismatches::KEPT`] failures, by index.
    pub first: Vec<Mismatch>,
}

impl Mismatches {
    /// How many failures are kept for the report.
    pub const KEPT: usize = 8;

    fn new(dtype: DType, hidden: usize, compared: usize) -> Self {
        Mismatches { dtype, hidden, compared, total: 0, first: Vec::new() }
    }

    fn push<T: Element>(&mut self, index: usize, expected: T, accepted: (T, T), got: T, ulp: u32) {
        self.total += 1;
        if self.first.len() < Self::KEPT {
            let hidden = self.hidden.max(1);
            self.first.push(Mismatch {
                index,
                row: index / hidden,
                col: index % hidden,
                expected: expected.to_bits_u32(),
                accepted: (accepted.0.to_bits_u32(), accepted.1.to_bits_u32()),
                got: got.to_bits_u32(),
                ulp,
            });
        }
    }

    /// No element failed.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The flat indices of the kept failures.
    pub fn indices(&self) -> Vec<usize> {
        self.first.iter().map(|m| m.index).collect()
    }
}

impl fmt::Display for Mismatches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "all {} elements match", self.compared);
        }
        write!(f, "{} of {} elements differ", self.total, self.compared)?;
        if self.total > self.first.len() {
            write!(f, " (first {} shown)", self.first.len())?;
        }
        let value = |bits: u32| format!("{} = {}", hex_bits_of(self.dtype, bits), exact_decimal_of(self.dtype, bits));
        for m in &self.first {
            write!(f, "\n  [{}] row {} col {}: expected {}", m.index, m.row, m.col, value(m.expected))?;
            if m.accepted != (m.expected, m.expected) {
                write!(
                    f,
                    " (accepted {}..={})",
                    hex_bits_of(self.dtype, m.accepted.0),
                    hex_bits_of(self.dtype, m.accepted.1)
                )?;
            }
            write!(f, ", got {}", value(m.got))?;
            if m.ulp == u32::MAX {
                write!(f, " (NaN against a number)")?;
            } else {
                write!(f, " ({} ulp)", m.ulp)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

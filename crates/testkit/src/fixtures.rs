//! Seeded inputs for P ranks, spread like real activations, with the values that break kernels.
//!
//! [`Fixture::generate`] draws, for a [`Problem`]:
//! - **inputs** (one `[rows, hidden]` tensor per rank): mostly `N(0, σ)` with `σ` varying per row
//!   (10^-2.5..10^0.5, times a per-rank factor 0.5..1.5, as tensor-parallel partial outputs are);
//!   0.2% outliers (|x| from 64 up to [`outlier_bound`]: 1e4 for bf16/f32, 2000 for f16, so that
//!   eight ranks plus the residual stay far below f16's 65504); 1% tiny magnitudes (1e-9..1e-5,
//!   f16: 1e-7..1e-4, i.e. many f16 subnormals); 0.2% subnormal bit patterns of the storage type
//!   (negative ones included: an FTZ compare mistakes them for the `-0.0` sentinel); 0.5% `+0.0`;
//!   0.5% `-0.0`; 5% short dyadic values (`k * 2^-j`, `k < 128`) whose sums land on rounding ties;
//! - **residual**: the same mix with a larger per-row `σ` (10^-2..10^1.3);
//! - **weight**: `|w| = exp(0.45 N(0,1))` clamped to 0.2..3, 2% exactly 1, 3% negative;
//! - then **special elements** at random positions (about one per 512 elements of each kind,
//!   at least one): columns where every rank holds `-0.0` (the first also with residual `-0.0`,
//!   so `-0.0` is guaranteed in every rank's input and in the residual) or a mix of `±0.0`;
//!   two ranks whose f32 sum is exactly half an ulp of the storage type (a tie, world ≥ 2);
//!   `[a, h, t, t]` columns (world ≥ 4; `[a, h, t]` for 3) whose storage value depends on the
//!   sum being taken in f32 **in rank order** (a tree or a reversed order rounds them the other
//!   way); large-value cancellations `[B, x, -B]` (world ≥ 3); and residuals that make
//!   `sum + residual` an exact tie of the storage type;
//! - with 4 rows or more, one row of only `±0.0` (variance 0, `eps` alone); with 8 or more, one
//!   row far below `eps` (variance ~1e-8).
//!
//! The same [`Problem`] (seed included) gives the same bits on every machine: every part comes
//! from its own `StdRng` stream derived from the seed, so generating ranks in parallel changes nothing.

use crate::float::{round_to, to_f64, Format};
use crate::reference::reduce_element;
use crate::seeds;
use arfuse_kernels::{DType, Element};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::fmt;
use std::ops::Range;

/// The shape, dtype and seed of one test case.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// Number of ranks.
    pub world_size: usize,
    /// Tokens.
    pub rows: usize,
    /// Elements per token.
    pub hidden: usize,
    /// Storage dtype.
    pub dtype: DType,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Seed of every random draw.
    pub seed: u64,
}

impl Problem {
    /// The epsilon of [`Problem::new`] (Llama/Qwen use 1e-5 or 1e-6).
    pub const DEFAULT_EPS: f32 = 1e-6;

    /// A problem with [`Problem::DEFAULT_EPS`] and a seed derived from the shape and dtype.
    pub fn new(world_size: usize, rows: usize, hidden: usize, dtype: DType) -> Self {
        let shape = ((world_size as u64) << 48) ^ ((rows as u64) << 24) ^ hidden as u64 ^ ((dtype as u64) << 60);
        Problem {
            world_size,
            rows,
            hidden,
            dtype,
            eps: Self::DEFAULT_EPS,
            seed: seeds::derive(seeds::BASE_SEED, shape),
        }
    }

    /// The same problem with another seed.
    pub fn with_seed(self, seed: u64) -> Self {
        Problem { seed, ..self }
    }

    /// The same problem with another epsilon.
    pub fn with_eps(self, eps: f32) -> Self {
        Problem { eps, ..self }
    }

    /// Elements of one rank's input (`rows * hidden`).
    pub fn elems(&self) -> usize {
        self.rows * self.hidden
    }

    /// Bytes of one rank's input (what the dispatcher compares with its thresholds).
    pub fn bytes(&self) -> usize {
        self.elems() * self.dtype.size()
    }

    /// A short name for file names and snapshot names: `w4-16x4096-bf16`.
    pub fn name(&self) -> String {
        format!("w{}-{}x{}-{}", self.world_size, self.rows, self.hidden, self.dtype)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}x{} {}, world {}, eps {:e}, seed {:#x}",
            self.rows, self.hidden, self.dtype, self.world_size, self.eps, self.seed
        )
    }
}

/// The largest outlier magnitude [`Fixture::generate`] draws for a dtype.
pub const fn outlier_bound(dtype: DType) -> f32 {
    match dtype {
        DType::Bf16 | DType::F32 => 1.0e4,
        DType::F16 => 2000.0,
    }
}

/// The magnitude range of "tiny" draws.
const fn tiny_range(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::Bf16 | DType::F32 => (1.0e-9, 1.0e-5),
        DType::F16 => (1.0e-7, 1.0e-4),
    }
}

/// The inputs of one test case: every rank's input, the shared residual and weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Fixture<T: Element> {
    /// What the fixture was made for. For a fixture cut from a larger one ([`Fixture::rows`]),
    /// `rows` is the new count and `seed` the original's (the data cannot be regenerated from it).
    pub problem: Problem,
    /// `inputs[rank]`, each `[rows, hidden]` row-major.
    pub inputs: Vec<Vec<T>>,
    /// `[rows, hidden]`, the same on every rank.
    pub residual: Vec<T>,
    /// `[hidden]`.
    pub weight: Vec<T>,
}

/// Generation beyond this many elements (all ranks and the residual) runs one thread per tensor.
const PARALLEL_ELEMS: usize = 1 << 20;

// Stream tags: each part of a fixture draws from its own generator.
const TAG_ROWS: u64 = 1;
const TAG_RESIDUAL: u64 = 2;
const TAG_WEIGHT: u64 = 3;
const TAG_SPECIAL: u64 = 4;
const TAG_RANK: u64 = 0x100;

fn stream(seed: u64, tag: u64) -> StdRng {
    StdRng::seed_from_u64(seeds::derive(seed, tag))
}

impl<T: Element> Fixture<T> {
    /// Draws the fixture of `problem` (see the module docs for what it contains).
    ///
    /// # Panics
    /// If `problem.dtype` is not `T`'s dtype or `problem.world_size` is 0 (a broken test).
    pub fn generate(problem: &Problem) -> Self {
        check_problem::<T>(problem);
        let (rows, hidden) = (problem.rows, problem.hidden);
        let mut row_rng = stream(problem.seed, TAG_ROWS);
        let input_sigma: Vec<f32> = (0..rows).map(|_| 10f32.powf(row_rng.gen_range(-2.5..0.5))).collect();
        let residual_sigma: Vec<f32> = (0..rows).map(|_| 10f32.powf(row_rng.gen_range(-2.0..1.3))).collect();
        let rank_tensor = |rank: usize| {
            let mut rng = stream(problem.seed, TAG_RANK + rank as u64);
            let mut values = Vec::with_capacity(rows * hidden);
            for &sigma in &input_sigma {
                let sigma = sigma * rng.gen_range(0.5f32..1.5);
                values.extend((0..hidden).map(|_| activation::<T>(&mut rng, sigma)));
            }
            values
        };
        let residual_tensor = || {
            let mut rng = stream(problem.seed, TAG_RESIDUAL);
            let mut values = Vec::with_capacity(rows * hidden);
            for &sigma in &residual_sigma {
                values.extend((0..hidden).map(|_| activation::<T>(&mut rng, sigma)));
            }
            values
        };
        let (inputs, residual) = if problem.elems() * (problem.world_size + 1) >= PARALLEL_ELEMS {
            std::thread::scope(|scope| {
                let rank_tensor = &rank_tensor;
                let handles: Vec<_> =
                    (0..problem.world_size).map(|rank| scope.spawn(move || rank_tensor(rank))).collect();
                let residual = residual_tensor();
                let inputs = handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                    .collect();
                (inputs, residual)
            })
        } else {
            ((0..problem.world_size).map(rank_tensor).collect(), residual_tensor())
        };
        let mut weight_rng = stream(problem.seed, TAG_WEIGHT);
        let weight = (0..hidden).map(|_| weight_value::<T>(&mut weight_rng)).collect();
        let mut fixture = Fixture { problem: problem.clone(), inputs, residual, weight };
        fixture.add_special_values();
        fixture
    }

    /// A fixture from explicit tensors.
    ///
    /// # Panics
    /// If the dtype, the number of ranks or a tensor's length does not match `problem` (a broken test).
    pub fn from_parts(problem: &Problem, inputs: Vec<Vec<T>>, residual: Vec<T>, weight: Vec<T>) -> Self {
        check_problem::<T>(problem);
        let elems = problem.elems();
        assert_eq!(inputs.len(), problem.world_size, "one input per rank");
        for (rank, input) in inputs.iter().enumerate() {
            assert_eq!(input.len(), elems, "input of rank {rank}: {} elements, expected rows * hidden", input.len());
        }
        assert_eq!(residual.len(), elems, "residual: {} elements, expected rows * hidden", residual.len());
        assert_eq!(weight.len(), problem.hidden, "weight: {} elements, expected hidden", weight.len());
        Fixture { problem: problem.clone(), inputs, residual, weight }
    }

    /// A fixture from closures: `input(rank, row, col)`, `residual(row, col)`, `weight(col)`.
    ///
    /// # Panics
    /// As [`Fixture::from_parts`].
    pub fn from_fn(
        problem: &Problem,
        input: impl Fn(usize, usize, usize) -> T,
        residual: impl Fn(usize, usize) -> T,
        weight: impl Fn(usize) -> T,
    ) -> Self {
        let (rows, hidden) = (problem.rows, problem.hidden);
        let grid = |f: &dyn Fn(usize, usize) -> T| -> Vec<T> {
            (0..rows).flat_map(|row| (0..hidden).map(move |col| (row, col))).map(|(row, col)| f(row, col)).collect()
        };
        let inputs = (0..problem.world_size).map(|rank| grid(&|row, col| input(rank, row, col))).collect();
        Self::from_parts(problem, inputs, grid(&residual), (0..hidden).map(weight).collect())
    }

    /// The fixture of the tokens `range` alone (same weight, same per-token values), for
    /// batch-invariance tests: a token's output must not depend on the rest of its batch.
    ///
    /// # Panics
    /// If `range` is not within `0..rows`.
    pub fn rows(&self, range: Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= self.problem.rows, "rows {range:?} of {}", self.problem.rows);
        let hidden = self.problem.hidden;
        let span = range.start * hidden..range.end * hidden;
        Fixture {
            problem: Problem { rows: range.len(), ..self.problem.clone() },
            inputs: self.inputs.iter().map(|input| input[span.clone()].to_vec()).collect(),
            residual: self.residual[span].to_vec(),
            weight: self.weight.clone(),
        }
    }

    /// The fixture of token `row` alone (see [`Fixture::rows`]).
    ///
    /// # Panics
    /// If `row >= rows`.
    pub fn single_token(&self, row: usize) -> Self {
        self.rows(row..row + 1)
    }

    /// Rank `rank`'s input for token `row`.
    pub fn input_row(&self, rank: usize, row: usize) -> &[T] {
        let hidden = self.problem.hidden;
        &self.inputs[rank][row * hidden..(row + 1) * hidden]
    }

    /// The residual of token `row`.
    pub fn residual_row(&self, row: usize) -> &[T] {
        let hidden = self.problem.hidden;
        &self.residual[row * hidden..(row + 1) * hidden]
    }

    /// Writes the special elements and rows (see the module docs).
    fn add_special_values(&mut self) {
        let (rows, hidden, world) = (self.problem.rows, self.problem.hidden, self.problem.world_size);
        let elems = rows * hidden;
        if elems == 0 {
            return;
        }
        let mut rng = stream(self.problem.seed, TAG_SPECIAL);
        let format = Format::of(T::DTYPE);
        let signed_zero = |rng: &mut StdRng| T::from_bits_u32(if rng.gen() { format.sign_bit() } else { 0 });

        // Special rows first; the element patterns below leave them alone.
        let zero_row = (rows >= 4).then(|| rng.gen_range(0..rows));
        let quiet_row = (rows >= 8).then(|| (zero_row.unwrap_or(0) + 1 + rng.gen_range(0..rows - 1)) % rows);
        if let Some(row) = zero_row {
            for i in row * hidden..(row + 1) * hidden {
                for input in &mut self.inputs {
                    input[i] = signed_zero(&mut rng);
                }
                self.residual[i] = signed_zero(&mut rng);
            }
        }
        if let Some(row) = quiet_row {
            for i in row * hidden..(row + 1) * hidden {
                for input in &mut self.inputs {
                    input[i] = T::from_f32(1e-4 * rng.sample::<f32, _>(StandardNormal));
                }
                self.residual[i] = T::from_f32(1e-4 * rng.sample::<f32, _>(StandardNormal));
            }
        }
        let protected = [zero_row, quiet_row];
        let count = (elems / 512).clamp(1, 2048);
        let pick = |rng: &mut StdRng| loop {
            let i = rng.gen_range(0..elems);
            if !protected.contains(&Some(i / hidden)) {
                break i;
            }
        };
        let zero_other_ranks = |inputs: &mut Vec<Vec<T>>, i: usize, rng: &mut StdRng| {
            for input in inputs.iter_mut() {
                input[i] = signed_zero(rng);
            }
        };

        // Exact ties of the storage type in the f32 sum of two ranks.
        if world >= 2 {
            for _ in 0..count {
                let i = pick(&mut rng);
                let a = random_storage_value::<T>(&mut rng);
                let half_ulp = format.ulp(a) / 2.0;
                let toward = if rng.gen_range(0..4) == 0 { -1.0 } else { 1.0 };
                let h = toward * half_ulp * a.signum();
                zero_other_ranks(&mut self.inputs, i, &mut rng);
                let first = rng.gen_range(0..world);
                let second = (first + 1 + rng.gen_range(0..world - 1)) % world;
                self.inputs[first][i] = round_to(a);
                self.inputs[second][i] = round_to(h);
                self.residual[i] = signed_zero(&mut rng);
            }
        }

        // Columns whose storage value depends on the f32 sum being taken in rank order.
        if world >= 3 {
            let exponents = if T::DTYPE == DType::F16 { 0..=9 } else { -12..=12 };
            for _ in 0..count {
                let i = pick(&mut rng);
                let k: i32 = rng.gen_range(exponents.clone());
                let sign = if rng.gen() { -1.0 } else { 1.0 };
                let a = sign * (1.0 + f64::from(rng.gen_range(0..4u8)) / 4.0) * crate::float::pow2(k);
                let h = sign * crate::float::pow2(k - format.precision() as i32); // half a storage ulp of a
                let t = sign * crate::float::pow2(k - 24); // half an f32 ulp of a
                let pattern: &[f64] = if world >= 4 { &[a, h, t, t] } else { &[a, h, t] };
                zero_other_ranks(&mut self.inputs, i, &mut rng);
                let mut ranks: Vec<usize> = (0..world).collect();
                while ranks.len() > pattern.len() {
                    ranks.remove(rng.gen_range(0..ranks.len()));
                }
                for (&rank, &value) in ranks.iter().zip(pattern) {
                    self.inputs[rank][i] = round_to(value);
                }
                self.residual[i] = signed_zero(&mut rng);
            }
        }

        // Cancellation of large values: the small term survives only as far as f32 lets it.
        if world >= 3 {
            let big = f64::from(outlier_bound(T::DTYPE));
            for _ in 0..count {
                let i = pick(&mut rng);
                let sign = if rng.gen() { -1.0 } else { 1.0 };
                let small = f64::from(rng.sample::<f32, _>(StandardNormal)) * 10f64.powf(rng.gen_range(-4.0..-1.0));
                zero_other_ranks(&mut self.inputs, i, &mut rng);
                let first = rng.gen_range(0..world - 2);
                let second = rng.gen_range(first + 1..world - 1);
                let third = rng.gen_range(second + 1..world);
                self.inputs[first][i] = round_to(sign * big);
                self.inputs[second][i] = round_to(small);
                self.inputs[third][i] = round_to(-sign * big);
            }
        }

        // Residuals that make `sum + residual` an exact tie of the storage type.
        for _ in 0..count {
            let i = pick(&mut rng);
            let sum = to_f64(reduce_element(self.inputs.iter().map(|input| input[i])));
            if sum == 0.0 || !sum.is_finite() {
                continue;
            }
            let half_ulp = format.ulp(sum) / 2.0;
            if half_ulp < format.min_positive() {
                continue;
            }
            let sign = if rng.gen_range(0..4) == 0 { -1.0 } else { 1.0 };
            self.residual[i] = round_to(sign * half_ulp * sum.signum());
        }

        // Signed zeros: all ranks -0.0 (the first column with residual -0.0 too), or a mix.
        let negative_zero = T::from_bits_u32(format.sign_bit());
        for n in 0..count {
            let i = pick(&mut rng);
            let all_negative = n == 0 || rng.gen();
            for input in &mut self.inputs {
                input[i] = if all_negative { negative_zero } else { signed_zero(&mut rng) };
            }
            self.residual[i] = match (n, rng.gen_range(0..3)) {
                (0, _) | (_, 0) => negative_zero,
                (_, 1) => T::from_bits_u32(0),
                _ => activation::<T>(&mut rng, 1.0),
            };
        }
    }
}

#[track_caller]
fn check_problem<T: Element>(problem: &Problem) {
    assert_eq!(problem.dtype, T::DTYPE, "a Fixture<{}> for a {} problem", T::DTYPE, problem.dtype);
    assert!(problem.world_size >= 1, "world size 0");
}

/// A storage value, roughly N(0,1) * 10^(-2..1.5), as f64 (exact), whose half ulp is itself a
/// storage value (so it is above the lowest binade) and below the outlier bound.
fn random_storage_value<T: Element>(rng: &mut StdRng) -> f64 {
    let format = Format::of(T::DTYPE);
    let smallest = crate::float::pow2(format.min_normal_exp() + 1);
    loop {
        let x = f64::from(rng.sample::<f32, _>(StandardNormal)) * 10f64.powf(rng.gen_range(-2.0..1.5));
        let v = to_f64(round_to::<T>(x));
        if v.abs() >= smallest && v.abs() < f64::from(outlier_bound(T::DTYPE)) {
            return v;
        }
    }
}

/// One activation-like value (see the module docs for the mix).
fn activation<T: Element>(rng: &mut StdRng, sigma: f32) -> T {
    let format = Format::of(T::DTYPE);
    let category = rng.gen_range(0..10_000u32);
    let negative: bool = rng.gen();
    let sign = if negative { -1.0f32 } else { 1.0 };
    let magnitude = match category {
        0..=19 => log_uniform(rng, 64.0, outlier_bound(T::DTYPE)),
        20..=119 => {
            let (lo, hi) = tiny_range(T::DTYPE);
            log_uniform(rng, lo, hi)
        }
        120..=139 => {
            let mantissa = rng.gen_range(1..=format.mantissa_mask());
            let sign_bit = if negative { format.sign_bit() } else { 0 };
            return T::from_bits_u32(sign_bit | mantissa);
        }
        140..=189 => return T::from_bits_u32(0),
        190..=239 => return T::from_bits_u32(format.sign_bit()),
        240..=739 => rng.gen_range(1..128u8) as f32 * 2f32.powi(rng.gen_range(-9..=-3)),
        _ => sigma * rng.sample::<f32, _>(StandardNormal).abs(),
    };
    T::from_f32(sign * magnitude)
}

/// A weight: around 1, 0.2..3, a few exactly 1 and a few negative.
fn weight_value<T: Element>(rng: &mut StdRng) -> T {
    if rng.gen_range(0..100) < 2 {
        return T::from_f32(1.0);
    }
    let magnitude = (0.45 * rng.sample::<f32, _>(StandardNormal)).exp().clamp(0.2, 3.0);
    let sign = if rng.gen_range(0..100) < 3 { -1.0 } else { 1.0 };
    T::from_f32(sign * magnitude)
}

fn log_uniform(rng: &mut StdRng, lo: f32, hi: f32) -> f32 {
    (rng.gen_range(lo.ln()..hi.ln())).exp()
}

#[cfg(test)]
mod tests;

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
//!
//! ## Epilogues (issue 17)
//!
//! Three independent choices change step 3 or what it writes; with none of them the steps above
//! are unchanged (the plain kernels do not even contain the code below).
//!
//! - **Gemma's RMSNorm** ([`Norm::GemmaOffset`], weights stored as offsets from 1):
//!   `out = round(f32(round(f32(residual_out) * inv)) * (f32(weight) + 1.0))`, the `+ 1.0` one f32
//!   addition (exact for every bf16/f16 weight in [-1, 2^8)), the product one f32 multiplication.
//! - **No residual**: step 2 is skipped: `x = s` (the rounded all-reduced sum, used as is: no
//!   `+ 0.0`, so a sum that rounded to `-0.0` stays `-0.0`), `residual` is not read and
//!   `residual_out` not written; step 3 runs on `x` with the same tree.
//! - **FP8 out** ([`Quant`]): `y = f32(out)`, the value of `out` *after* its storage rounding (so
//!   quantising the stored `out` afterwards gives the same bits, and the unquantised `out`, which
//!   every path writes anyway, is the side output). Then, per element, in f32:
//!   `q = encode(y / scale)` (one IEEE division, not a multiplication by a reciprocal), where
//!   `encode` is [`Fp8Format::encode`]: round to nearest, ties to even, with saturation:
//!   - NaN → the format's NaN (`0x7f` for e4m3fn, `0x80` for e4m3fnuz), whatever its sign;
//!   - `|v| >= fmax` (±inf included) → `±fmax` (`0x7e`/`0xfe` for e4m3fn, `0x7f`/`0xff` for
//!     e4m3fnuz): saturation, never NaN for a number;
//!   - otherwise the nearest code, ties to the even code (mantissa bit 0 clear), subnormals
//!     included; a result of zero keeps the sign in e4m3fn (`0x80` is `-0`) and is `0x00` in
//!     e4m3fnuz, which has no `-0` (`0x80` is its NaN).
//!
//!   The scale, by [`Scaling`]:
//!   - per tensor, static: the caller's `scale` (finite, `> 0`), nothing written;
//!   - per token, dynamic: `amax = max(+0, |y_j| over the row)` (a NaN `y` is skipped: it never
//!     compares greater; an infinite one makes `amax = +inf`), `scale = max(amax / fmax,
//!     min_scale)` (one IEEE division, then the larger), written as f32 `scales[row]`;
//!   - per group of [`QUANT_GROUP`] = 128 consecutive elements of a row (hidden a multiple of
//!     128): the same with `amax` over the group; `scales` is f32 `[rows, hidden / 128]`, row
//!     major: the scale of elements `g * 128 .. (g + 1) * 128` of row `r` at `r * (hidden / 128) +
//!     g` (the layout of DeepSeek-style block-FP8 checkpoints' activations, K-major).
//!
//!   `min_scale` is `1 / (fmax * 512)` rounded to f32 ([`Fp8Format::min_scale`], as vLLM's
//!   dynamic quantisation uses): a row of zeros (amax 0) gets `scale = min_scale` and codes `+0`
//!   (`-0` stays `0x80` in e4m3fn). The consequences at the edges follow from IEEE arithmetic
//!   and are part of the contract: `amax = +inf` gives `scale = +inf`, so every finite `y` of the
//!   row (group) encodes as a zero of its sign and every infinite `y` as NaN (`inf / inf`); a
//!   NaN `y` encodes as NaN and does not change the scale. A row whose `out` is all NaN (a NaN in
//!   its `residual_out`, see above) gets `scale = min_scale` and NaN codes.
//!   Per-tensor with `y = ±inf` saturates to `±fmax` (`inf / scale = inf`).

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

/// Add+RMSNorm of one row: given the all-reduced `sum` row, writes `residual_out` and `out`
/// ([`epilogue_row`] with the plain [`Epilogue`]: residual added, standard norm, nothing quantised).
pub fn add_rmsnorm_row<T: Element>(
    sum: &[T],
    residual: &[T],
    weight: &[T],
    eps: f32,
    residual_out: &mut [T],
    out: &mut [T],
) {
    epilogue_row(&Epilogue::default(), sum, residual, weight, eps, residual_out, out, &mut [], &mut []);
}

/// How step 3 applies the weight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Norm {
    /// `out = round(w · round(x · inv))` (Llama and most models).
    #[default]
    Standard,
    /// Gemma's: `out = round(round(x · inv) · (w + 1))`, the weights stored as offsets from 1.
    GemmaOffset,
}

/// `round(f32(round(f32(residual_out) * inv)) * (f32(weight) + 1.0))`: Gemma's step 3.
#[inline]
pub fn normalise_gemma<T: Element>(residual_out: T, weight: T, inv: f32) -> T {
    let normed = T::from_f32(residual_out.to_f32() * inv);
    T::from_f32(normed.to_f32() * (weight.to_f32() + 1.0))
}

/// Step 3 of one element under `norm`.
#[inline]
pub fn normalise_with<T: Element>(norm: Norm, residual_out: T, weight: T, inv: f32) -> T {
    match norm {
        Norm::Standard => normalise(residual_out, weight, inv),
        Norm::GemmaOffset => normalise_gemma(residual_out, weight, inv),
    }
}

/// Elements per group of [`Scaling::PerGroup`].
pub const QUANT_GROUP: usize = 128;

/// The two FP8 formats of quantised outputs: 1 sign bit, 4 exponent bits, 3 mantissa bits, no
/// infinities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// OCP `E4M3FN` (NVIDIA, gfx950): bias 7, max 448 (`0x7e`), NaN `0x7f`/`0xff`, a `-0` (`0x80`).
    E4m3Fn,
    /// `E4M3FNUZ` (gfx942): bias 8, max 240 (`0x7f`), NaN `0x80` only, no `-0`.
    E4m3Fnuz,
}

impl Fp8Format {
    /// Both formats.
    pub const ALL: [Fp8Format; 2] = [Fp8Format::E4m3Fn, Fp8Format::E4m3Fnuz];

    /// Exponent bias.
    pub const fn bias(self) -> i32 {
        match self {
            Fp8Format::E4m3Fn => 7,
            Fp8Format::E4m3Fnuz => 8,
        }
    }

    /// The largest finite value.
    pub const fn max(self) -> f32 {
        match self {
            Fp8Format::E4m3Fn => 448.0,
            Fp8Format::E4m3Fnuz => 240.0,
        }
    }

    /// The code of `+max` (`-max` is it with bit 7 set).
    pub const fn max_code(self) -> u8 {
        match self {
            Fp8Format::E4m3Fn => 0x7e,
            Fp8Format::E4m3Fnuz => 0x7f,
        }
    }

    /// The NaN every NaN encodes as.
    pub const fn nan_code(self) -> u8 {
        match self {
            Fp8Format::E4m3Fn => 0x7f,
            Fp8Format::E4m3Fnuz => 0x80,
        }
    }

    /// The floor of dynamic scales, `fl(1 / (max * 512))`.
    pub fn min_scale(self) -> f32 {
        1.0f32 / (self.max() * 512.0)
    }

    /// Name as in `torch.float8_*`.
    pub const fn name(self) -> &'static str {
        match self {
            Fp8Format::E4m3Fn => "e4m3fn",
            Fp8Format::E4m3Fnuz => "e4m3fnuz",
        }
    }

    /// Whether `code` is a NaN.
    pub const fn is_nan(self, code: u8) -> bool {
        match self {
            Fp8Format::E4m3Fn => code & 0x7f == 0x7f,
            Fp8Format::E4m3Fnuz => code == 0x80,
        }
    }

    /// The value of `code` (exact in f32).
    pub fn decode(self, code: u8) -> f32 {
        if self.is_nan(code) {
            return f32::NAN;
        }
        let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
        let exp = i32::from((code >> 3) & 0xf);
        let mant = f32::from(code & 7);
        let magnitude = if exp == 0 {
            mant * 2f32.powi(1 - self.bias() - 3)
        } else {
            (8.0 + mant) * 2f32.powi(exp - self.bias() - 3)
        };
        sign * magnitude
    }

    /// `v` rounded to nearest, ties to even, saturated to `±max`; NaN to [`Self::nan_code`]; a
    /// zero result keeps the sign in e4m3fn and is `0x00` in e4m3fnuz (the module docs). The
    /// branch-free sequence every backend uses: both candidates are computed, then one selected. A
    /// normal code is the f32 bits re-biased with 20 mantissa bits rounded off to nearest even
    /// (a carry moves into the exponent, which is the next code up); a subnormal one is
    /// `|v| × 2^(2 + bias)` (exact) rounded to an integer by adding `2^23` in f32 (round to
    /// nearest even at 1; a result of 8 is the least normal code, `0x08`).
    pub fn encode(self, v: f32) -> u8 {
        let bits = v.to_bits();
        let sign = (bits >> 24) & 0x80;
        let a = bits & 0x7fff_ffff;
        let bias = self.bias() as u32;
        let x = a.wrapping_sub((127 - bias) << 23);
        let normal = x.wrapping_add(0x7_ffff + ((x >> 20) & 1)) >> 20;
        let t = f32::from_bits(a) * f32::from_bits((129 + bias) << 23) + 8_388_608.0;
        let subnormal = t.to_bits().wrapping_sub(0x4b00_0000);
        let mut code = if a < (128 - bias) << 23 { subnormal } else { normal };
        if a >= self.max().to_bits() {
            code = u32::from(self.max_code());
        }
        let code = match self {
            Fp8Format::E4m3Fnuz if code == 0 => 0,
            _ => sign | code,
        };
        if a > 0x7f80_0000 {
            self.nan_code()
        } else {
            code as u8
        }
    }
}

/// How a quantised output is scaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scaling {
    /// One static scale for the whole tensor, the caller's (finite, `> 0`).
    PerTensor(f32),
    /// One dynamic scale per row, `scales: f32 [rows]`.
    PerToken,
    /// One dynamic scale per [`QUANT_GROUP`] elements of a row, `scales: f32 [rows, hidden / 128]`.
    PerGroup,
}

impl Scaling {
    /// Name as in `arfuse-demo --fp8` (`per-tensor` without its scale).
    pub const fn name(self) -> &'static str {
        match self {
            Scaling::PerTensor(_) => "per-tensor",
            Scaling::PerToken => "per-token",
            Scaling::PerGroup => "per-group",
        }
    }

    /// Scales written per row of `hidden` elements.
    pub const fn scales_per_row(self, hidden: usize) -> usize {
        match self {
            Scaling::PerTensor(_) => 0,
            Scaling::PerToken => 1,
            Scaling::PerGroup => hidden / QUANT_GROUP,
        }
    }
}

/// A quantised output: its format and scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quant {
    /// The FP8 format.
    pub format: Fp8Format,
    /// The scaling.
    pub scaling: Scaling,
}

/// `max(+0, |y| over ys)`, NaN skipped (it never compares greater).
#[inline]
pub fn amax(ys: impl IntoIterator<Item = f32>) -> f32 {
    ys.into_iter().fold(0.0f32, |acc, y| if y.abs() > acc { y.abs() } else { acc })
}

/// `max(amax / fmax, min_scale)` (IEEE division; the larger of the two, `+inf` staying `+inf`).
#[inline]
pub fn dynamic_scale(format: Fp8Format, amax: f32) -> f32 {
    let s = amax / format.max();
    let floor = format.min_scale();
    if s > floor {
        s
    } else {
        floor
    }
}

/// `encode(y / scale)`.
#[inline]
pub fn quantise(format: Fp8Format, y: f32, scale: f32) -> u8 {
    format.encode(y / scale)
}

/// Quantises one row of `out` (`y = f32(out)`): writes `codes` (`out.len()`) and `scales`
/// ([`Scaling::scales_per_row`] of them).
pub fn quantise_row<T: Element>(quant: Quant, out: &[T], codes: &mut [u8], scales: &mut [f32]) {
    let f = quant.format;
    match quant.scaling {
        Scaling::PerTensor(scale) => {
            for (c, &y) in codes.iter_mut().zip(out) {
                *c = quantise(f, y.to_f32(), scale);
            }
        }
        Scaling::PerToken | Scaling::PerGroup => {
            let group = if quant.scaling == Scaling::PerToken { out.len().max(1) } else { QUANT_GROUP };
            for ((ys, cs), s) in out.chunks(group).zip(codes.chunks_mut(group)).zip(scales.iter_mut()) {
                *s = dynamic_scale(f, amax(ys.iter().map(|y| y.to_f32())));
                for (c, &y) in cs.iter_mut().zip(ys) {
                    *c = quantise(f, y.to_f32(), *s);
                }
            }
        }
    }
}

/// Everything about step 3 and its outputs beyond the plain contract: the [`Norm`], whether the
/// residual is added, and an optional quantised output.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Epilogue {
    /// How the weight is applied.
    pub norm: Norm,
    /// `false`: no residual (step 2 skipped, `residual_out` not written).
    pub no_residual: bool,
    /// A quantised copy of `out`, if any.
    pub quant: Option<Quant>,
}

impl Epilogue {
    /// The plain contract (what the plain kernels compute).
    pub fn is_plain(&self) -> bool {
        *self == Epilogue::default()
    }
}

/// Add+RMSNorm of one row under `epilogue`: `residual` and `residual_out` are ignored (may be
/// empty) with `no_residual`; `codes`/`scales` are written when `epilogue.quant` is set.
#[allow(clippy::too_many_arguments)]
pub fn epilogue_row<T: Element>(
    epilogue: &Epilogue,
    sum: &[T],
    residual: &[T],
    weight: &[T],
    eps: f32,
    residual_out: &mut [T],
    out: &mut [T],
    codes: &mut [u8],
    scales: &mut [f32],
) {
    let x: &[T] = if epilogue.no_residual {
        sum
    } else {
        for ((ro, &s), &r) in residual_out.iter_mut().zip(sum).zip(residual) {
            *ro = add_residual(s, r);
        }
        residual_out
    };
    let inv = inv_rms(row_sum_squares(x, T::DTYPE.pack_elems()), sum.len(), eps);
    for ((o, &xv), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = normalise_with(epilogue.norm, xv, w, inv);
    }
    if let Some(quant) = epilogue.quant {
        quantise_row(quant, out, codes, scales);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// kernels.cu `quotient_route`, replayed: `y / scale` from the rounded reciprocal and an FMA
    /// correction, or `q0 = y * inv` itself where |q0| is outside [2^-13, 2^10); and whether it
    /// is the corrected one.
    fn quotient_route(y: f32, scale: f32) -> (f32, bool) {
        let inv = 1.0 / scale;
        let q0 = y * inv;
        let q = (-q0).mul_add(scale, y).mul_add(inv, q0);
        let a = q0.to_bits() & 0x7fff_ffff;
        let corrected = a.wrapping_sub(0x3900_0000) < 0x4480_0000 - 0x3900_0000;
        (if corrected { q } else { q0 }, corrected)
    }

    /// The GPU kernels' FP8 codes without a division (kernels.cu `store_codes`): for bf16 and
    /// f16 values and scales in [2^-60, 2^60] the route gives the IEEE quotient's code in both
    /// formats, and the quotient itself wherever it returns the corrected one. Every bf16 and f16
    /// significand (the route was checked against every scale significand too, 2^30 and 2^33
    /// pairs, outside the test suite) against a seeded sample of scale significands, at random
    /// exponents of both (so that |q0| falls on both sides of the route's range), both signs.
    #[test]
    fn quotient_without_division() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0fd1_u64);
        let mut checked = 0u64;
        for (bits, samples) in [(7u32, 4096), (10, 512)] {
            for significand in 0..1u32 << bits {
                for _ in 0..samples {
                    let scale = f32::from_bits((rng.gen_range(67u32..=187) << 23) | rng.gen_range(0..1u32 << 23));
                    // A bf16 / f16 value as f32: its significand, any normal exponent, either sign.
                    let y_bits = (rng.gen_range(0u32..2) << 31)
                        | (rng.gen_range(1u32..=254) << 23)
                        | (significand << (23 - bits));
                    let y = f32::from_bits(y_bits);
                    let ((route, corrected), exact) = (quotient_route(y, scale), y / scale);
                    if corrected {
                        assert_eq!(route.to_bits(), exact.to_bits(), "{y:e} / {scale:e}");
                    }
                    for format in Fp8Format::ALL {
                        assert_eq!(format.encode(route), format.encode(exact), "{format:?} {y:e} / {scale:e}");
                    }
                    checked += 1;
                }
            }
        }
        // Infinities, NaN and zeros keep their codes too.
        for y in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0] {
            for scale in [f32::from_bits(0x2180_0000), 1.0, f32::from_bits(0x5d80_0000)] {
                for format in Fp8Format::ALL {
                    assert_eq!(format.encode(quotient_route(y, scale).0), format.encode(y / scale), "{y} / {scale}");
                }
            }
        }
        assert!(checked > 500_000);
    }

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

    #[test]
    fn every_fp8_code_round_trips() {
        for f in Fp8Format::ALL {
            let mut finite = 0;
            for code in 0..=255u8 {
                let v = f.decode(code);
                if f.is_nan(code) {
                    assert!(v.is_nan(), "{} {code:#04x}", f.name());
                    assert_eq!(f.encode(v), f.nan_code());
                    continue;
                }
                finite += 1;
                assert!(v.is_finite() && v.abs() <= f.max(), "{} {code:#04x} = {v}", f.name());
                assert_eq!(f.encode(v), code, "{} {code:#04x} = {v:e}", f.name());
                assert_eq!(f.encode(-v) & 0x7f, code & 0x7f, "{} -{v:e}", f.name());
            }
            // e4m3fn: 254 numbers (two NaNs); e4m3fnuz: 255 (one NaN, 0x00 the only zero).
            assert_eq!(finite, if f == Fp8Format::E4m3Fn { 254 } else { 255 });
        }
    }

    #[test]
    fn fp8_known_values() {
        let fnz = Fp8Format::E4m3Fn;
        let uz = Fp8Format::E4m3Fnuz;
        for (v, a, b) in [
            (1.0f32, 0x38u8, 0x40u8),
            (0.5, 0x30, 0x38),
            (-2.0, 0xc0, 0xc8),
            (240.0, 0x77, 0x7f),
            (448.0, 0x7e, 0x7f),
            (2f32.powi(-6), 0x08, 0x10),
            (2f32.powi(-9), 0x01, 0x02),
            (2f32.powi(-10), 0x00, 0x01),
            (0.0, 0x00, 0x00),
            (-0.0, 0x80, 0x00),
        ] {
            assert_eq!(fnz.encode(v), a, "e4m3fn {v:e}");
            assert_eq!(uz.encode(v), b, "e4m3fnuz {v:e}");
        }
        assert_eq!(fnz.decode(0x7e), 448.0);
        assert_eq!(uz.decode(0x7f), 240.0);
        assert_eq!(fnz.decode(0x01), 2f32.powi(-9));
        assert_eq!(uz.decode(0x01), 2f32.powi(-10));
        assert_eq!(fnz.decode(0x80).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn fp8_ties_go_to_the_even_code() {
        for f in Fp8Format::ALL {
            // Every midpoint between neighbouring positive codes (exact in f32: 5 significant bits).
            for code in 0..f.max_code() {
                let (lo, hi) = (f.decode(code), f.decode(code + 1));
                let mid = (lo + hi) / 2.0;
                assert_eq!(f64::from(mid), (f64::from(lo) + f64::from(hi)) / 2.0);
                let even = if code % 2 == 0 { code } else { code + 1 };
                assert_eq!(f.encode(mid), even, "{} tie {lo:e}..{hi:e}", f.name());
                // Just off the tie, the nearest.
                assert_eq!(f.encode(f32::from_bits(mid.to_bits() - 1)), code, "{} below {mid:e}", f.name());
                assert_eq!(f.encode(f32::from_bits(mid.to_bits() + 1)), code + 1, "{} above {mid:e}", f.name());
                let neg = if f == Fp8Format::E4m3Fnuz && even == 0 { 0 } else { even | 0x80 };
                assert_eq!(f.encode(-mid), neg, "{} tie -{mid:e}", f.name());
            }
        }
    }

    #[test]
    fn fp8_saturates_and_keeps_nan() {
        for f in Fp8Format::ALL {
            let m = f.max_code();
            for v in [f.max(), f.max() * 1.0625, f.max() * 1.5, 1e30, f32::MAX, f32::INFINITY] {
                assert_eq!(f.encode(v), m, "{} {v:e}", f.name());
                assert_eq!(f.encode(-v), m | 0x80, "{} -{v:e}", f.name());
            }
            for nan in [f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001), f32::from_bits(0xffc0_1234)] {
                assert_eq!(f.encode(nan), f.nan_code(), "{}", f.name());
            }
            // Below half the least subnormal (f32 subnormals included): a zero.
            for v in [f.decode(1) / 2.0, f.decode(1) / 3.0, f32::from_bits(1), 1e-30] {
                assert_eq!(f.encode(v), 0, "{} {v:e}", f.name());
                assert_eq!(f.encode(-v), if f == Fp8Format::E4m3Fn { 0x80 } else { 0 }, "{} -{v:e}", f.name());
            }
        }
    }

    #[test]
    fn fp8_encode_is_the_nearest_code_over_a_sweep() {
        // Every 2^12-th f32 bit pattern below 2 * max: the encoding is the nearest of the codes.
        for f in Fp8Format::ALL {
            let codes: Vec<(u8, f64)> = (0..=f.max_code()).map(|c| (c, f64::from(f.decode(c)))).collect();
            let top = (2.0 * f.max()).to_bits();
            for bits in (0..top).step_by(4096) {
                let v = f32::from_bits(bits);
                let got = f.encode(v);
                let d = (f64::from(f.decode(got)) - f64::from(v)).abs();
                let best = codes.iter().map(|&(_, c)| (c - f64::from(v)).abs()).fold(f64::INFINITY, f64::min);
                if v < f.max() {
                    assert_eq!(d, best, "{} {v:e} -> {got:#04x}", f.name());
                } else {
                    assert_eq!(got, f.max_code());
                }
            }
        }
    }

    #[test]
    fn dynamic_scales_follow_the_stated_rules() {
        for f in Fp8Format::ALL {
            assert_eq!(f.min_scale(), 1.0 / (f.max() * 512.0));
            assert_eq!(amax([0.0, -0.0]), 0.0);
            assert_eq!(amax([1.0, f32::NAN, -3.0]), 3.0);
            assert_eq!(amax([f32::NAN]), 0.0);
            assert_eq!(dynamic_scale(f, 0.0), f.min_scale());
            assert_eq!(dynamic_scale(f, f32::INFINITY), f32::INFINITY);
            assert_eq!(dynamic_scale(f, f.max() * 2.0), 2.0);
            // amax's element encodes as max exactly.
            let row = [half::bf16::from_f32(-3.0), half::bf16::from_f32(1.5), half::bf16::ZERO];
            let q = Quant { format: f, scaling: Scaling::PerToken };
            let (mut codes, mut scales) = ([0u8; 3], [0f32; 1]);
            quantise_row(q, &row, &mut codes, &mut scales);
            assert_eq!(scales[0], 3.0 / f.max());
            assert_eq!(codes[0], f.max_code() | 0x80);
            assert_eq!(codes[2], 0);
            // An infinite y: scale inf, finite ys become zeros of their sign, the infinity NaN.
            let row = [f32::INFINITY, -1.0, 2.0];
            quantise_row(q, &row, &mut codes, &mut scales);
            assert_eq!(scales[0], f32::INFINITY);
            assert_eq!(codes, [f.nan_code(), if f == Fp8Format::E4m3Fn { 0x80 } else { 0 }, 0]);
        }
    }
}

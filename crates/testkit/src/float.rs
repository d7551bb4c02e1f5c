//! Storage formats decoded, rounded and printed by hand: the reference's own arithmetic.
//!
//! The reference must not share code with what it checks, and it must round from `f64` in one
//! step. `half` cannot be used for the latter: `half::bf16::from_f64` drops the low 32 bits of
//! the `f64` mantissa before rounding (so a value just above a tie is taken for the tie), and
//! `half::f16::from_f64` goes through `f32` on hosts with F16C (double rounding). [`Format::round`]
//! rounds any finite `f64` to nearest, ties to even, directly, subnormals and overflow included.

use arfuse_kernels::{DType, Element};

/// The layout of a binary floating-point storage format (IEEE 754 style, with subnormals).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    /// Total width in bits (16 or 32).
    pub total_bits: u32,
    /// Stored mantissa bits (the implicit leading bit not counted).
    pub mantissa_bits: u32,
    /// Exponent bits.
    pub exponent_bits: u32,
}

impl Format {
    /// bfloat16: 8 exponent bits, 7 mantissa bits.
    pub const BF16: Format = Format { total_bits: 16, mantissa_bits: 7, exponent_bits: 8 };
    /// IEEE binary16: 5 exponent bits, 10 mantissa bits.
    pub const F16: Format = Format { total_bits: 16, mantissa_bits: 10, exponent_bits: 5 };
    /// IEEE binary32: 8 exponent bits, 23 mantissa bits.
    pub const F32: Format = Format { total_bits: 32, mantissa_bits: 23, exponent_bits: 8 };

    /// The format of a dtype.
    pub const fn of(dtype: DType) -> Format {
        match dtype {
            DType::Bf16 => Format::BF16,
            DType::F16 => Format::F16,
            DType::F32 => Format::F32,
        }
    }

    /// Significand precision in bits, the implicit bit included.
    pub const fn precision(self) -> u32 {
        self.mantissa_bits + 1
    }

    /// Exponent bias.
    pub const fn bias(self) -> i32 {
        (1 << (self.exponent_bits - 1)) - 1
    }

    /// Exponent of the smallest normal number (`2^min_normal_exp`).
    pub const fn min_normal_exp(self) -> i32 {
        1 - self.bias()
    }

    /// Exponent of the largest binade.
    pub const fn max_exp(self) -> i32 {
        self.bias()
    }

    /// The sign bit.
    pub const fn sign_bit(self) -> u32 {
        1 << (self.total_bits - 1)
    }

    /// The exponent field's mask.
    pub const fn exponent_mask(self) -> u32 {
        ((1 << self.exponent_bits) - 1) << self.mantissa_bits
    }

    /// The mantissa field's mask.
    pub const fn mantissa_mask(self) -> u32 {
        (1 << self.mantissa_bits) - 1
    }

    /// The quiet NaN this module produces when asked to round a NaN.
    pub const fn quiet_nan(self) -> u32 {
        self.exponent_mask() | 1 << (self.mantissa_bits - 1)
    }

    /// Whether `bits` encode a NaN.
    pub const fn is_nan(self, bits: u32) -> bool {
        bits & self.exponent_mask() == self.exponent_mask() && bits & self.mantissa_mask() != 0
    }

    /// The smallest positive (subnormal) value, as an `f64`.
    pub fn min_positive(self) -> f64 {
        pow2(self.min_normal_exp() - self.mantissa_bits as i32)
    }

    /// The largest finite value, as an `f64`.
    pub fn max_finite(self) -> f64 {
        (2.0 - pow2(-(self.mantissa_bits as i32))) * pow2(self.max_exp())
    }

    /// The exact value of `bits` (the low `total_bits` are used).
    pub fn decode(self, bits: u32) -> f64 {
        let sign = if bits & self.sign_bit() != 0 { -1.0 } else { 1.0 };
        let exponent = (bits & self.exponent_mask()) >> self.mantissa_bits;
        let mantissa = bits & self.mantissa_mask();
        if exponent == self.exponent_mask() >> self.mantissa_bits {
            return if mantissa == 0 { sign * f64::INFINITY } else { f64::NAN };
        }
        let magnitude = if exponent == 0 {
            f64::from(mantissa) * self.min_positive()
        } else {
            let significand = mantissa | 1 << self.mantissa_bits;
            f64::from(significand) * pow2(exponent as i32 - self.bias() - self.mantissa_bits as i32)
        };
        sign * magnitude
    }

    /// Rounds `x` to this format, to nearest with ties to even, in one step (no intermediate
    /// format). Overflow gives infinity (IEEE: when the result rounded with an unbounded exponent
    /// exceeds the largest finite value); the sign of zero is kept; NaN gives [`Format::quiet_nan`].
    pub fn round(self, x: f64) -> u32 {
        if x.is_nan() {
            return self.quiet_nan();
        }
        let sign = if x.is_sign_negative() { self.sign_bit() } else { 0 };
        let magnitude = x.abs();
        // max_finite + half an ulp: from here on (the tie included, it goes to the "even" 2^(emax+1)) → ∞.
        let overflow = (2.0 - pow2(-(self.precision() as i32))) * pow2(self.max_exp());
        if magnitude >= overflow {
            return sign | self.exponent_mask();
        }
        let mut exponent = floor_log2(magnitude).max(self.min_normal_exp());
        let quantum = exponent - self.mantissa_bits as i32;
        // `magnitude / 2^quantum` is exact (a power-of-two scaling of a finite f64 that stays normal).
        let mut significand = (magnitude * pow2(-quantum)).round_ties_even() as u64;
        if significand == 1 << self.precision() {
            significand >>= 1;
            exponent += 1;
        }
        let biased = if significand >> self.mantissa_bits != 0 { (exponent + self.bias()) as u32 } else { 0 };
        sign | biased << self.mantissa_bits | (significand as u32 & self.mantissa_mask())
    }

    /// The spacing of this format's values at `|x|` (the ulp of the binade `x` lies in; the
    /// subnormal spacing below the normal range). `x` must be finite.
    pub fn ulp(self, x: f64) -> f64 {
        let exponent = floor_log2(x.abs()).max(self.min_normal_exp());
        pow2(exponent - self.mantissa_bits as i32)
    }
}

/// `2^k` for `k` in the normal `f64` range `[-1022, 1023]`, built from its bits (exact).
pub(crate) fn pow2(k: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&k), "2^{k} is outside the normal f64 range");
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// `floor(log2(a))` for finite `a > 0`; `f64` subnormals and zero give -1075 (below every format here).
fn floor_log2(a: f64) -> i32 {
    let biased = ((a.to_bits() >> 52) & 0x7ff) as i32;
    if biased == 0 {
        -1075
    } else {
        biased - 1023
    }
}

/// The exact value of a storage element (decoded from its bits by [`Format::decode`]).
#[inline]
pub fn to_f64<T: Element>(value: T) -> f64 {
    Format::of(T::DTYPE).decode(value.to_bits_u32())
}

/// `x` rounded to `T`, to nearest with ties to even, in one step (see [`Format::round`]).
#[inline]
pub fn round_to<T: Element>(x: f64) -> T {
    T::from_bits_u32(Format::of(T::DTYPE).round(x))
}

/// Whether a storage element is a NaN.
#[inline]
pub fn is_nan<T: Element>(value: T) -> bool {
    Format::of(T::DTYPE).is_nan(value.to_bits_u32())
}

/// The raw bits as fixed-width hex: `0x3f80` for 16-bit types, `0x3f800000` for `f32`.
pub fn hex_bits<T: Element>(value: T) -> String {
    hex_bits_of(T::DTYPE, value.to_bits_u32())
}

/// [`hex_bits`] from a dtype and raw bits.
pub fn hex_bits_of(dtype: DType, bits: u32) -> String {
    match dtype.size() {
        2 => format!("{bits:#06x}"),
        _ => format!("{bits:#010x}"),
    }
}

/// The exact decimal value of a storage element: every binary float is a finite decimal, and all
/// its digits are printed (`1.0078125`, `-0`, `0.000000059604644775390625`, `inf`, `NaN`).
pub fn exact_decimal<T: Element>(value: T) -> String {
    exact_decimal_of(T::DTYPE, value.to_bits_u32())
}

/// [`exact_decimal`] from a dtype and raw bits.
pub fn exact_decimal_of(dtype: DType, bits: u32) -> String {
    let format = Format::of(dtype);
    let negative = bits & format.sign_bit() != 0;
    let sign = if negative { "-" } else { "" };
    let exponent_field = (bits & format.exponent_mask()) >> format.mantissa_bits;
    let mantissa = bits & format.mantissa_mask();
    if exponent_field == format.exponent_mask() >> format.mantissa_bits {
        return if mantissa == 0 { format!("{sign}inf") } else { "NaN".to_string() };
    }
    // value = significand * 2^exponent, exactly.
    let (mut significand, mut exponent) = if exponent_field == 0 {
        (u128::from(mantissa), format.min_normal_exp() - format.mantissa_bits as i32)
    } else {
        (
            u128::from(mantissa | 1 << format.mantissa_bits),
            exponent_field as i32 - format.bias() - format.mantissa_bits as i32,
        )
    };
    if significand == 0 {
        return format!("{sign}0");
    }
    while significand % 2 == 0 && exponent < 0 {
        significand /= 2;
        exponent += 1;
    }
    if exponent >= 0 {
        // At most 2^24 * 2^104 = 2^128 - ... for f32: fits u128.
        return format!("{sign}{}", significand << exponent);
    }
    // significand * 2^-k = significand * 5^k / 10^k.
    let fraction_digits = (-exponent) as usize;
    let mut digits = BigDecimal::from_u128(significand);
    for _ in 0..fraction_digits {
        digits.mul_small(5);
    }
    let text = digits.to_string();
    let (int_part, frac_part) = if text.len() > fraction_digits {
        let (a, b) = text.split_at(text.len() - fraction_digits);
        (a.to_string(), b.to_string())
    } else {
        ("0".to_string(), format!("{}{text}", "0".repeat(fraction_digits - text.len())))
    };
    format!("{sign}{int_part}.{frac_part}")
}

/// A non-negative integer in base 10^9 limbs, little-endian: just enough for [`exact_decimal`].
struct BigDecimal(Vec<u32>);

impl BigDecimal {
    const BASE: u64 = 1_000_000_000;

    fn from_u128(mut value: u128) -> Self {
        let mut limbs = Vec::new();
        while value > 0 {
            limbs.push((value % u128::from(Self::BASE)) as u32);
            value /= u128::from(Self::BASE);
        }
        BigDecimal(limbs)
    }

    fn mul_small(&mut self, factor: u32) {
        let mut carry = 0u64;
        for limb in &mut self.0 {
            let product = u64::from(*limb) * u64::from(factor) + carry;
            *limb = (product % Self::BASE) as u32;
            carry = product / Self::BASE;
        }
        while carry > 0 {
            self.0.push((carry % Self::BASE) as u32);
            carry /= Self::BASE;
        }
    }
}

impl std::fmt::Display for BigDecimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut limbs = self.0.iter().rev();
        match limbs.next() {
            None => f.write_str("0"),
            Some(top) => {
                write!(f, "{top}")?;
                limbs.try_for_each(|limb| write!(f, "{limb:09}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};

    /// The next f64 above a positive finite value (`f64::next_up` is newer than our MSRV).
    fn up(x: f64) -> f64 {
        f64::from_bits(x.to_bits() + 1)
    }

    /// The next f64 below a positive value.
    fn down(x: f64) -> f64 {
        f64::from_bits(x.to_bits() - 1)
    }

    fn all_16bit<T: Element>() -> impl Iterator<Item = T> {
        (0..=u16::MAX).map(|bits| T::from_bits_u32(u32::from(bits)))
    }

    fn decode_matches_widening<T: Element>() {
        for v in all_16bit::<T>() {
            let ours = to_f64(v);
            let widened = f64::from(v.to_f32());
            if widened.is_nan() {
                assert!(ours.is_nan(), "{}", hex_bits(v));
            } else {
                assert_eq!(ours.to_bits(), widened.to_bits(), "decode {}", hex_bits(v));
            }
        }
    }

    #[test]
    fn decode_is_exact_for_every_16bit_pattern() {
        decode_matches_widening::<bf16>();
        decode_matches_widening::<f16>();
    }

    /// Every value round-trips; every midpoint between neighbours goes to the even one; a hair
    /// above or below a midpoint goes to the nearer one (what a one-step rounding must do).
    fn rounding_is_exact_at_every_boundary<T: Element>() {
        let format = Format::of(T::DTYPE);
        // The last pair (max finite, infinity) is covered by `overflow_underflow_and_specials`.
        for bits in 0..format.exponent_mask() - 1 {
            let v = format.decode(bits);
            assert_eq!(format.round(v), bits, "round trip {bits:#x}");
            assert_eq!(format.round(-v), bits | format.sign_bit(), "round trip -{bits:#x}");
            let next = format.decode(bits + 1);
            let mid = (v + next) / 2.0;
            let even = if bits % 2 == 0 { bits } else { bits + 1 };
            assert_eq!(format.round(mid), even, "tie between {bits:#x} and {:#x}", bits + 1);
            assert_eq!(format.round(-mid), even | format.sign_bit(), "negative tie at {bits:#x}");
            assert_eq!(format.round(up(mid)), bits + 1, "just above the tie at {bits:#x}");
            assert_eq!(format.round(down(mid)), bits, "just below the tie at {bits:#x}");
        }
    }

    #[test]
    fn rounding_from_f64_is_correct_at_every_16bit_boundary() {
        rounding_is_exact_at_every_boundary::<bf16>();
        rounding_is_exact_at_every_boundary::<f16>();
    }

    #[test]
    fn overflow_underflow_and_specials() {
        for format in [Format::BF16, Format::F16, Format::F32] {
            let max = format.max_finite();
            let max_bits = format.exponent_mask() - 1;
            assert_eq!(format.decode(max_bits), max);
            let half_ulp = format.ulp(max) / 2.0;
            assert_eq!(format.round(max + half_ulp), format.exponent_mask(), "the tie above max overflows");
            assert_eq!(format.round(down(max + half_ulp)), max_bits);
            assert_eq!(format.round(f64::INFINITY), format.exponent_mask());
            assert_eq!(format.round(f64::NEG_INFINITY), format.exponent_mask() | format.sign_bit());
            assert!(format.is_nan(format.round(f64::NAN)));
            let tiny = format.min_positive();
            assert_eq!(format.round(tiny / 2.0), 0, "tie between 0 and the smallest subnormal goes to 0");
            assert_eq!(format.round(up(tiny / 2.0)), 1);
            assert_eq!(format.round(-tiny / 4.0), format.sign_bit(), "underflow keeps the sign");
            assert_eq!(format.round(-0.0), format.sign_bit());
            assert_eq!(format.round(f64::MIN_POSITIVE / 4.0), 0, "f64 subnormals");
        }
    }

    /// Rounding from f32 (exact in f64) must agree with the kernels' `Element::from_f32` (half's
    /// RNE conversion from f32) for random bit patterns of every class.
    fn agrees_with_from_f32<T: Element>(samples: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for i in 0..samples {
            let x = f32::from_bits(if i % 4 == 0 { rng.gen::<u32>() & 0x807f_ffff } else { rng.gen() });
            let ours: T = round_to(f64::from(x));
            let theirs = T::from_f32(x);
            if x.is_nan() {
                assert!(is_nan(ours) && is_nan(theirs));
            } else {
                assert_eq!(ours.to_bits_u32(), theirs.to_bits_u32(), "{x:e} ({:#x})", x.to_bits());
            }
        }
    }

    #[test]
    fn rounding_agrees_with_half_from_f32() {
        agrees_with_from_f32::<bf16>(300_000);
        agrees_with_from_f32::<f16>(300_000);
        agrees_with_from_f32::<f32>(10_000);
    }

    /// Values just above a tie of the storage type whose excess is below f32's precision: going
    /// through f32 first makes them exact ties (wrong); one-step rounding goes up (right).
    /// `half::bf16::from_f64` and `half::f16::from_f64` (on F16C hosts) get these wrong.
    #[test]
    fn no_double_rounding() {
        let x = 1.0 + pow2(-8) + pow2(-40);
        assert_eq!(round_to::<bf16>(x).to_bits(), 0x3f81);
        assert_eq!(bf16::from_f32(x as f32).to_bits(), 0x3f80, "through f32 the excess is lost");
        let y = 1.0 + pow2(-11) + pow2(-40);
        assert_eq!(round_to::<f16>(y).to_bits(), 0x3c01);
        assert_eq!(f16::from_f32(y as f32).to_bits(), 0x3c00);
        let z = 1.0 + pow2(-24) + pow2(-50);
        assert_eq!(round_to::<f32>(z).to_bits(), 0x3f80_0001);
    }

    #[test]
    fn exact_decimals() {
        assert_eq!(exact_decimal(bf16::from_bits(0x3f81)), "1.0078125");
        assert_eq!(exact_decimal(bf16::from_bits(0x8000)), "-0");
        assert_eq!(exact_decimal(f16::from_bits(0x0001)), "0.000000059604644775390625");
        assert_eq!(exact_decimal(f16::from_bits(0x7bff)), "65504");
        assert_eq!(exact_decimal(f16::from_bits(0xfc00)), "-inf");
        assert_eq!(exact_decimal(f16::from_bits(0x7e00)), "NaN");
        assert_eq!(exact_decimal(0.1f32), "0.100000001490116119384765625");
        assert_eq!(exact_decimal(-1.5e10f32), "-15000000512");
        assert_eq!(exact_decimal(f32::MAX), "340282346638528859811704183484516925440");
        let min_subnormal = exact_decimal(f32::from_bits(1));
        assert!(min_subnormal.starts_with("0.0000000000000000000000000000000000000000000014012984643"));
        assert_eq!(min_subnormal.len(), 2 + 149);
        // Round-trips through Rust's parser.
        for x in [0.1f32, 3.0e-41, -7.25, 1.0e30] {
            assert_eq!(exact_decimal(x).parse::<f32>().map(f32::to_bits), Ok(x.to_bits()));
        }
    }

    #[test]
    fn hex_widths() {
        assert_eq!(hex_bits(bf16::from_bits(0x3f80)), "0x3f80");
        assert_eq!(hex_bits(1.0f32), "0x3f800000");
        assert_eq!(hex_bits(f16::from_bits(0x0001)), "0x0001");
    }
}

//! Distance in units in the last place, over the ordered bit representation.
//!
//! Every non-NaN value of a storage format maps to an integer key: `+x` to its magnitude bits,
//! `-x` to minus its magnitude bits. Neighbouring values differ by 1, the smallest subnormals of
//! opposite signs by 2, the largest finite value and infinity by 1. **`+0.0` and `-0.0` share
//! key 0, so their distance is 0**: ulp distance measures numeric closeness; whether the sign of
//! a zero is right is a bit-exactness question, answered by the `residual_out` comparison and
//! by the digests of [`crate::NumericsSummary`]. Two NaNs (any payloads) are at distance 0; a
//! NaN and a number are at `u32::MAX`.

use crate::float::Format;
use arfuse_kernels::Element;

/// The ordered key of a value, or `None` for a NaN (see the module docs).
#[inline]
pub fn ordered_key<T: Element>(value: T) -> Option<i64> {
    ordered_key_of(Format::of(T::DTYPE), value.to_bits_u32())
}

/// [`ordered_key`] from a format and raw bits.
#[inline]
pub(crate) fn ordered_key_of(format: Format, bits: u32) -> Option<i64> {
    if format.is_nan(bits) {
        return None;
    }
    let magnitude = i64::from(bits & !format.sign_bit());
    Some(if bits & format.sign_bit() != 0 { -magnitude } else { magnitude })
}

/// Ulp distance between two values of one storage type (see the module docs for zeros and NaN).
#[inline]
pub fn ulp_distance<T: Element>(a: T, b: T) -> u32 {
    match (ordered_key(a), ordered_key(b)) {
        (None, None) => 0,
        (Some(ka), Some(kb)) => ka.abs_diff(kb).try_into().unwrap_or(u32::MAX),
        _ => u32::MAX,
    }
}

/// Ulp distance from `value` to the closed range `[lo, hi]` of ordered keys (0 inside it).
/// A NaN `value` is at distance 0 when the range is NaN too, else `u32::MAX`.
#[inline]
pub(crate) fn ulp_distance_to_range<T: Element>(value: T, lo: T, hi: T) -> u32 {
    match (ordered_key(value), ordered_key(lo), ordered_key(hi)) {
        (Some(k), Some(lo), Some(hi)) => {
            let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
            let distance = if k < lo {
                lo - k
            } else if k > hi {
                k - hi
            } else {
                0
            };
            u32::try_from(distance).unwrap_or(u32::MAX)
        }
        (None, None, _) | (None, _, None) => 0,
        _ => u32::MAX,
    }
}

/// The largest [`ulp_distance`] between corresponding elements (0 for empty slices).
///
/// # Panics
/// If the slices differ in length (a broken test).
pub fn max_ulp<T: Element>(a: &[T], b: &[T]) -> u32 {
    assert_eq!(a.len(), b.len(), "max_ulp: slices of different lengths");
    a.iter().zip(b).map(|(&x, &y)| ulp_distance(x, y)).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn neighbours_zeros_and_infinities() {
        let one = bf16::from_bits(0x3f80);
        assert_eq!(ulp_distance(one, bf16::from_bits(0x3f81)), 1);
        assert_eq!(ulp_distance(bf16::from_bits(0x3f81), one), 1);
        assert_eq!(ulp_distance(one, one), 0);
        assert_eq!(ulp_distance(bf16::from_bits(0x0000), bf16::from_bits(0x8000)), 0, "+0 and -0");
        assert_eq!(ulp_distance(f16::from_bits(0x0001), f16::from_bits(0x8001)), 2, "across zero");
        assert_eq!(ulp_distance(f16::from_bits(0x7bff), f16::from_bits(0x7c00)), 1, "max to inf");
        assert_eq!(ulp_distance(f32::MIN, f32::MAX), 2 * 0x7f7f_ffff);
        assert_eq!(ulp_distance(f32::NEG_INFINITY, f32::INFINITY), 0xff00_0000);
    }

    #[test]
    fn nan() {
        let nan = f16::from_bits(0x7e00);
        let other_nan = f16::from_bits(0xfd01);
        assert_eq!(ulp_distance(nan, other_nan), 0);
        assert_eq!(ulp_distance(nan, f16::from_bits(0)), u32::MAX);
        assert_eq!(ulp_distance(f32::NAN, 1.0), u32::MAX);
        assert_eq!(ulp_distance(f16::from_bits(0x7c00), nan), u32::MAX, "inf is not NaN");
    }

    #[test]
    fn ranges() {
        let k = |bits: u16| bf16::from_bits(bits);
        assert_eq!(ulp_distance_to_range(k(0x3f81), k(0x3f80), k(0x3f82)), 0);
        assert_eq!(ulp_distance_to_range(k(0x3f85), k(0x3f82), k(0x3f80)), 3, "range given backwards");
        assert_eq!(ulp_distance_to_range(k(0x8001), k(0x0000), k(0x0001)), 1);
        assert_eq!(ulp_distance_to_range(k(0x7fc0), k(0x7fc0), k(0x7fc0)), 0, "NaN where NaN is expected");
        assert_eq!(ulp_distance_to_range(k(0x7fc0), k(0x3f80), k(0x3f80)), u32::MAX);
        assert_eq!(ulp_distance_to_range(k(0x3f80), k(0x7fc0), k(0x7fc0)), u32::MAX);
    }

    #[test]
    fn max_over_slices() {
        assert_eq!(max_ulp::<f32>(&[], &[]), 0);
        assert_eq!(max_ulp(&[1.0f32, 2.0], &[1.0, f32::from_bits(2.0f32.to_bits() + 3)]), 3);
    }
}

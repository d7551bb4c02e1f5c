//! Output poisoning: fill outputs with a NaN no kernel produces, then find what was never written.
//!
//! The patterns are `0x7fa5` (bf16, f16) and `0x7fa5a5a5` (f32): NaNs with a payload that no
//! arithmetic yields (computed NaNs are the canonical quiet NaNs `0x7fc0`/`0x7e00`/`0x7fc00000`,
//! or `0x7fff` from some bf16 intrinsics) and that no input of a [`crate::Fixture`] contains. So
//! an element that still carries it was never written (or was computed from one that was never
//! written: on the CPU a NaN payload can survive arithmetic, which points at the same bug).

use arfuse_kernels::{DType, Element};
use std::ops::Range;

/// The poison bit pattern of a dtype.
pub const fn poison_bits(dtype: DType) -> u32 {
    match dtype {
        DType::Bf16 | DType::F16 => 0x7fa5,
        DType::F32 => 0x7fa5_a5a5,
    }
}

/// The poison value of `T`.
#[inline]
pub fn poison_value<T: Element>() -> T {
    T::from_bits_u32(poison_bits(T::DTYPE))
}

/// Whether `value` carries the poison pattern, bit for bit.
#[inline]
pub fn is_poison<T: Element>(value: T) -> bool {
    value.to_bits_u32() == poison_bits(T::DTYPE)
}

/// Fills `buf` with the poison pattern.
pub fn poison<T: Element>(buf: &mut [T]) {
    buf.fill(poison_value());
}

/// `len` elements of the poison pattern: what a test uploads into an output before a call.
pub fn poisoned<T: Element>(len: usize) -> Vec<T> {
    vec![poison_value(); len]
}

/// Indices of the elements still carrying the poison pattern.
pub fn unwritten<T: Element>(buf: &[T]) -> Vec<usize> {
    buf.iter().enumerate().filter(|(_, &v)| is_poison(v)).map(|(i, _)| i).collect()
}

/// The unwritten elements as maximal runs of consecutive indices (a skipped block shows as one range).
pub fn unwritten_ranges<T: Element>(buf: &[T]) -> Vec<Range<usize>> {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for (i, &v) in buf.iter().enumerate() {
        if !is_poison(v) {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if last.end == i => last.end = i + 1,
            _ => ranges.push(i..i + 1),
        }
    }
    ranges
}

/// Panics (the intended test failure) if any element of `buf` still carries the poison pattern,
/// naming `name`, the count, and the first unwritten ranges.
#[track_caller]
pub fn assert_all_written<T: Element>(name: &str, buf: &[T]) {
    let ranges = unwritten_ranges(buf);
    if ranges.is_empty() {
        return;
    }
    const SHOWN: usize = 8;
    let count: usize = ranges.iter().map(ExactSizeIterator::len).sum();
    let shown: Vec<String> = ranges.iter().take(SHOWN).map(|r| format!("{}..{}", r.start, r.end)).collect();
    let more =
        if ranges.len() > SHOWN { format!(" (first {SHOWN} of {} ranges)", ranges.len()) } else { String::new() };
    panic!(
        "{name}: {count} of {} elements never written (still the poison pattern {}): {}{more}",
        buf.len(),
        crate::float::hex_bits_of(T::DTYPE, poison_bits(T::DTYPE)),
        shown.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::float::is_nan;
    use half::{bf16, f16};

    fn is_a_nan_that_arithmetic_does_not_make<T: Element>() {
        let p = poison_value::<T>();
        assert!(is_nan(p));
        assert!(!is_poison(T::from_f32(f32::NAN)));
        assert!(!is_poison(T::from_f32(f32::NAN * 0.0)));
        let infinity = std::hint::black_box(f32::INFINITY);
        assert!(!is_poison(T::from_f32(infinity - f32::INFINITY)));
    }

    #[test]
    fn poison_is_distinctive() {
        is_a_nan_that_arithmetic_does_not_make::<bf16>();
        is_a_nan_that_arithmetic_does_not_make::<f16>();
        is_a_nan_that_arithmetic_does_not_make::<f32>();
    }

    #[test]
    fn finds_unwritten_runs() {
        let mut buf = vec![bf16::from_f32(1.0); 20];
        poison(&mut buf);
        assert_eq!(unwritten(&buf).len(), 20);
        assert!(poisoned::<bf16>(20).iter().zip(&buf).all(|(a, b)| a.to_bits() == b.to_bits()));
        for v in &mut buf[3..17] {
            *v = bf16::from_f32(0.0);
        }
        buf[9] = poison_value();
        assert_eq!(unwritten(&buf), vec![0, 1, 2, 9, 17, 18, 19]);
        assert_eq!(unwritten_ranges(&buf), vec![0..3, 9..10, 17..20]);
        for v in &mut buf {
            *v = bf16::from_bits(0x7fc0);
        }
        assert_all_written("all NaN but written", &buf);
    }

    #[test]
    #[should_panic(expected = "out: 3 of 8 elements never written (still the poison pattern 0x7fa5a5a5): 2..4, 7..8")]
    fn assert_names_the_buffer_and_the_ranges() {
        let mut buf = vec![0.0f32; 8];
        poison(&mut buf[2..4]);
        poison(&mut buf[7..]);
        assert_all_written("out", &buf);
    }
}

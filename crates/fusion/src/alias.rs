//! Which overlaps of a call's five tensors are allowed: a pure check on their byte ranges, run by
//! the operator's validation before anything is launched.
//!
//! Allowed, each only as the *identical* range (same start, same length):
//! - `residual_out == residual`: the residual updated in place;
//! - `out == input`: the normalised output written over this rank's partial input.
//!
//! Every other overlap of `input`, `residual`, `weight`, `out` and `residual_out` is refused with
//! [`Error::Aliasing`], and so is any *partial* overlap of the two allowed pairs (a shifted or
//! shorter range would make a row read what another row already wrote). A zero-length tensor
//! overlaps nothing. Ranges are compared exactly (in 128-bit arithmetic, so a range that runs
//! past the end of the address space is compared as such, not wrapped).

use crate::{Error, Result};

/// The bytes `[start, start + len)` of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    /// Address of the first byte.
    pub(crate) start: u64,
    /// Length in bytes.
    pub(crate) len: u64,
}

impl Span {
    /// The bytes of `count` elements of `elem_bytes` bytes each at address `ptr`. A length that
    /// does not fit in `u64` saturates (such a range overlaps everything, so it is refused).
    pub(crate) fn elems(ptr: u64, count: usize, elem_bytes: usize) -> Span {
        let len = (count as u64).saturating_mul(elem_bytes as u64);
        Span { start: ptr, len }
    }

    fn end(self) -> u128 {
        u128::from(self.start) + u128::from(self.len)
    }

    /// Whether the two ranges share at least one byte.
    fn overlaps(self, other: Span) -> bool {
        self.len != 0 && other.len != 0 && u128::from(self.start) < other.end() && u128::from(other.start) < self.end()
    }
}

/// The byte ranges of one call's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Spans {
    /// This rank's partial output (read).
    pub(crate) input: Span,
    /// The residual (read).
    pub(crate) residual: Span,
    /// The RMSNorm weight (read).
    pub(crate) weight: Span,
    /// The normalised output (written).
    pub(crate) out: Span,
    /// The residual output (written).
    pub(crate) residual_out: Span,
}

/// The overlaps allowed, each as the identical range: `(a, b)` in the order of [`Spans`].
const ALLOWED: [(&str, &str); 2] = [("input", "out"), ("residual", "residual_out")];

/// `Ok` if the tensors overlap only in the allowed forms (see the module documentation), else
/// [`Error::Aliasing`] naming the first offending pair, in the order input, residual, weight,
/// out, residual_out.
pub(crate) fn check(spans: &Spans) -> Result<()> {
    let named = [
        ("input", spans.input),
        ("residual", spans.residual),
        ("weight", spans.weight),
        ("out", spans.out),
        ("residual_out", spans.residual_out),
    ];
    for (i, &(a, sa)) in named.iter().enumerate() {
        for &(b, sb) in &named[i + 1..] {
            if !sa.overlaps(sb) {
                continue;
            }
            let identical = sa == sb;
            if identical && ALLOWED.contains(&(a, b)) {
                continue;
            }
            return Err(Error::Aliasing { a, b, identical });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

//! A compact, stable text of a case's numerics, for `insta` snapshots.
//!
//! [`NumericsSummary::invariant`] holds what must be identical on every path and backend: case,
//! shape, FNV-1a 64 digests of the raw bits of `residual_out` and `out`, and a few sampled
//! elements as hex bits with their exact decimal value (never a rounded `{:.6}`). Snapshot it
//! under `insta::allow_duplicates!` for every path × backend: the first one is the gold master.
//! [`NumericsSummary::backend_specific`] holds the comparison with the f64 reference (max ulp of
//! `out`, whether `residual_out` is bit-exact), for a snapshot with `snapshot_suffix = backend`.
//! `Display` prints both.

use crate::float::{exact_decimal_of, hex_bits_of};
use crate::reference::Reference;
use crate::ulp::ordered_key;
use arfuse_kernels::source::{fnv1a_extend, FNV_OFFSET};
use arfuse_kernels::{DType, Element};
use std::fmt;

/// FNV-1a 64 of a byte string (the workspace's one hash, `arfuse_kernels::source::fnv1a`).
pub fn fnv1a64_bytes(bytes: &[u8]) -> u64 {
    arfuse_kernels::source::fnv1a(bytes)
}

/// FNV-1a 64 of the raw bits of `values`, each element as its storage width in little-endian
/// byte order (so the digest does not depend on the host).
pub fn fnv1a64<T: Element>(values: &[T]) -> u64 {
    let width = T::DTYPE.size();
    values.iter().fold(FNV_OFFSET, |hash, v| fnv1a_extend(hash, &v.to_bits_u32().to_le_bytes()[..width]))
}

/// One sampled element of both outputs, as raw bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Flat index.
    pub index: usize,
    /// Row (token).
    pub row: usize,
    /// Column.
    pub col: usize,
    /// `residual_out[index]`.
    pub residual_out: u32,
    /// `out[index]`.
    pub out: u32,
}

/// The numerics of one case, for snapshots (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumericsSummary {
    /// The case's name.
    pub case: String,
    /// Tokens.
    pub rows: usize,
    /// Elements per token.
    pub hidden: usize,
    /// Storage dtype.
    pub dtype: DType,
    /// Number of ranks.
    pub world_size: usize,
    /// [`fnv1a64`] of `residual_out`.
    pub residual_out_digest: u64,
    /// [`fnv1a64`] of `out`.
    pub out_digest: u64,
    /// [`Reference::out_max_ulp`] of `out`.
    pub out_max_ulp: u32,
    /// `residual_out` is bit-identical to the reference.
    pub residual_out_exact: bool,
    /// Sampled elements (positions chosen from the reference alone, see [`sample_indices`]).
    pub samples: Vec<Sample>,
}

/// The sampled positions: the first element, the largest `|residual_out|` of the reference (an
/// outlier), one in the middle, the last; duplicates dropped.
pub fn sample_indices<T: Element>(reference: &Reference<T>) -> Vec<usize> {
    let elems = reference.residual_out.len();
    if elems == 0 {
        return Vec::new();
    }
    let largest = reference
        .residual_out
        .iter()
        .enumerate()
        .max_by_key(|(i, &v)| (ordered_key(v).map_or(0, i64::abs), std::cmp::Reverse(*i)))
        .map_or(0, |(i, _)| i);
    let mut indices = Vec::with_capacity(4);
    for i in [0, largest, elems / 2, elems - 1] {
        if !indices.contains(&i) {
            indices.push(i);
        }
    }
    indices
}

impl NumericsSummary {
    /// Summarises one rank's outputs of a case against its reference.
    ///
    /// # Panics
    /// If an output does not have `rows * hidden` elements (a broken test).
    pub fn new<T: Element>(case: impl Into<String>, reference: &Reference<T>, residual_out: &[T], out: &[T]) -> Self {
        let problem = &reference.problem;
        let hidden = problem.hidden.max(1);
        let samples = sample_indices(reference)
            .into_iter()
            .map(|index| Sample {
                index,
                row: index / hidden,
                col: index % hidden,
                residual_out: residual_out[index].to_bits_u32(),
                out: out[index].to_bits_u32(),
            })
            .collect();
        NumericsSummary {
            case: case.into(),
            rows: problem.rows,
            hidden: problem.hidden,
            dtype: T::DTYPE,
            world_size: problem.world_size,
            residual_out_digest: fnv1a64(residual_out),
            out_digest: fnv1a64(out),
            out_max_ulp: reference.out_max_ulp(out),
            residual_out_exact: reference.residual_out_mismatches(residual_out).is_empty(),
            samples,
        }
    }

    /// The part identical on every path and backend: case, shape, digests, samples.
    pub fn invariant(&self) -> String {
        let value = |bits: u32| format!("{} = {}", hex_bits_of(self.dtype, bits), exact_decimal_of(self.dtype, bits));
        let mut text = format!(
            "case: {}\nshape: {} x {} {}, world {}\nresidual_out: fnv1a64 {:#018x}\nout: fnv1a64 {:#018x}\n",
            self.case, self.rows, self.hidden, self.dtype, self.world_size, self.residual_out_digest, self.out_digest
        );
        for s in &self.samples {
            text.push_str(&format!(
                "sample [{}] row {} col {}: residual_out {}, out {}\n",
                s.index,
                s.row,
                s.col,
                value(s.residual_out),
                value(s.out)
            ));
        }
        text
    }

    /// The comparison with the f64 reference: max ulp of `out`, `residual_out` bit-exact.
    pub fn backend_specific(&self) -> String {
        format!(
            "out max ulp vs f64 reference: {}\nresidual_out bit-exact vs reference: {}\n",
            self.out_max_ulp,
            if self.residual_out_exact { "yes" } else { "NO" }
        )
    }
}

impl fmt::Display for NumericsSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.invariant())?;
        f.write_str(&self.backend_specific())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fixture, Problem};
    use half::bf16;

    #[test]
    fn fnv_known_vectors() {
        assert_eq!(fnv1a64_bytes(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64_bytes(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64_bytes(b"foobar"), 0x8594_4171_f739_67e8);
        // Elements hash as their little-endian storage bytes.
        assert_eq!(fnv1a64(&[bf16::from_bits(0x6261)]), fnv1a64_bytes(b"ab"));
        assert_eq!(fnv1a64(&[f32::from_bits(0x6463_6261)]), fnv1a64_bytes(b"abcd"));
    }

    #[test]
    fn text_is_exact_and_stable() {
        let problem = Problem::new(2, 2, 8, DType::Bf16).with_eps(0.0);
        let fixture = Fixture::<bf16>::from_fn(
            &problem,
            |rank, row, col| {
                bf16::from_f32((rank + 1) as f32 * (col as f32 - 3.5) * if row == 1 { 100.0 } else { 0.1 })
            },
            |_, _| bf16::from_bits(0x8000),
            |_| bf16::from_f32(1.0),
        );
        let reference = Reference::compute(&fixture);
        let summary = NumericsSummary::new("two-rows", &reference, &reference.residual_out, &reference.out);
        let text = summary.to_string();
        assert!(!text.contains("e-"), "no scientific notation: {text}");
        assert_eq!(summary.samples.iter().map(|s| s.index).collect::<Vec<_>>(), vec![0, 8, 15]);
        let expected = format!(
            "case: two-rows\nshape: 2 x 8 bf16, world 2\nresidual_out: fnv1a64 {:#018x}\nout: fnv1a64 {:#018x}\n\
             sample [0] row 0 col 0: residual_out 0xbf86 = -1.046875, out 0xbfc3 = -1.5234375\n\
             sample [8] row 1 col 0: residual_out 0xc483 = -1048, out 0xbfc3 = -1.5234375\n\
             sample [15] row 1 col 7: residual_out 0x4483 = 1048, out 0x3fc3 = 1.5234375\n\
             out max ulp vs f64 reference: 0\nresidual_out bit-exact vs reference: yes\n",
            summary.residual_out_digest, summary.out_digest
        );
        assert_eq!(text, expected);
        let mut flipped = reference.out.clone();
        flipped[3] = bf16::from_bits(flipped[3].to_bits() + 2);
        let other = NumericsSummary::new("two-rows", &reference, &reference.residual_out, &flipped);
        assert_ne!(other.out_digest, summary.out_digest);
        assert_eq!(other.out_max_ulp, 2);
        assert_eq!(
            other.backend_specific(),
            "out max ulp vs f64 reference: 2\nresidual_out bit-exact vs reference: yes\n"
        );
    }
}

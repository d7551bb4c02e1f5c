//! Tests of the reference: hand-computed cases, agreement with the kernels' contract code (two
//! independent implementations), and that plausible wrong implementations are caught.

use super::*;
use arfuse_kernels::contract;
use half::{bf16, f16};

fn bits<T: Element>(values: &[T]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits_u32()).collect()
}

/// Outputs of a (possibly wrong) implementation, element by element from these pieces.
struct Candidate<T> {
    sum: Vec<T>,
    residual_out: Vec<T>,
    out: Vec<T>,
}

/// The kernels crate's contract code (what the CPU backend runs), applied to a fixture.
fn kernels_contract<T: Element>(fixture: &Fixture<T>) -> Candidate<T> {
    let p = &fixture.problem;
    let sum: Vec<T> = (0..p.elems()).map(|i| contract::sum_ranks(fixture.inputs.iter().map(|r| r[i]))).collect();
    let mut residual_out = vec![T::from_f32(0.0); p.elems()];
    let mut out = vec![T::from_f32(0.0); p.elems()];
    for row in 0..p.rows {
        let span = row * p.hidden..(row + 1) * p.hidden;
        contract::add_rmsnorm_row(
            &sum[span.clone()],
            &fixture.residual[span.clone()],
            &fixture.weight,
            p.eps,
            &mut residual_out[span.clone()],
            &mut out[span],
        );
    }
    Candidate { sum, residual_out, out }
}

/// An implementation with a chosen reduction over ranks and a chosen `inv` error; everything
/// else follows the contract in f32.
fn variant<T: Element>(
    fixture: &Fixture<T>,
    reduce: impl Fn(&[f32]) -> f32,
    round_sum: bool,
    inv_error: f64,
    single_rounding: bool,
) -> Candidate<T> {
    let p = &fixture.problem;
    let mut sum = Vec::with_capacity(p.elems());
    let mut residual_out = Vec::with_capacity(p.elems());
    for i in 0..p.elems() {
        let terms: Vec<f32> = fixture.inputs.iter().map(|r| r[i].to_f32()).collect();
        let s = reduce(&terms);
        sum.push(T::from_f32(s));
        let s = if round_sum { T::from_f32(s).to_f32() } else { s };
        residual_out.push(T::from_f32(s + fixture.residual[i].to_f32()));
    }
    let mut out = Vec::with_capacity(p.elems());
    for row in residual_out.chunks(p.hidden) {
        // inv from an f64 sum, so that `inv_error` (and the f32 rounding of inv) is the only error.
        let squares: f64 = row.iter().map(|v| f64::from(v.to_f32()).powi(2)).sum();
        let inv = 1.0 / (squares / p.hidden as f64 + f64::from(p.eps)).sqrt();
        let inv = (inv * (1.0 + inv_error)) as f32;
        for (&ro, &w) in row.iter().zip(&fixture.weight) {
            let normed = ro.to_f32() * inv;
            out.push(if single_rounding {
                T::from_f32(w.to_f32() * normed)
            } else {
                T::from_f32(w.to_f32() * T::from_f32(normed).to_f32())
            });
        }
    }
    Candidate { sum, residual_out, out }
}

fn canonical_rank_order(terms: &[f32]) -> f32 {
    terms.iter().map(|&x| if x == 0.0 { 0.0 } else { x }).reduce(|a, b| a + b).unwrap_or(0.0)
}

#[test]
fn hand_computed_bf16() {
    let problem = Problem::new(2, 2, 8, DType::Bf16).with_eps(0.0);
    let b = |x: f32| bf16::from_f32(x);
    let nz = bf16::from_bits(0x8000);
    // Row 0: ties, signed zeros, cancellation. Row 1: ±2 everywhere, so var = 4 and inv = 0.5.
    let rank0 = [b(1.0), nz, b(-1.0), b(1.0), b(3.0), b(256.0), b(1.0), b(-0.5)];
    let rank1 = [b(0.00390625), nz, bf16::ZERO, b(0.01171875), b(-3.0), b(1.0), b(-1.0), b(0.5)];
    let residual0 = [nz, nz, bf16::ZERO, b(0.0), nz, b(0.0), nz, b(2.0)];
    let weight = [b(1.0), b(0.5), b(3.0), b(-1.0), b(0.25), b(1.5), b(-0.5), b(2.0)];
    let fixture = Fixture::from_fn(
        &problem,
        |rank, row, col| match (rank, row) {
            (0, 0) => rank0[col],
            (1, 0) => rank1[col],
            _ => b(if col % 2 == 0 { 1.0 } else { -1.0 }),
        },
        |row, col| if row == 0 { residual0[col] } else { bf16::ZERO },
        |col| weight[col],
    );
    let reference = Reference::compute(&fixture);
    // 1 + 2^-8: a tie, to even (1.0). -0 + -0 canonicalised: +0, plus residual -0: +0.
    // 1 + 3 * 2^-8: a tie between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up. 3 - 3 = +0, + (-0) = +0.
    // 256 + 1 = 257: a tie between 256 and 258: to even, 256. 1 - 1 = +0; +0 + -0 = +0. -0.5 + 0.5 + 2 = 2.
    assert_eq!(
        bits(&reference.residual_out[..8]),
        vec![0x3f80, 0x0000, 0xbf80, 0x3f82, 0x0000, 0x4380, 0x0000, 0x4000]
    );
    assert_eq!(bits(&reference.sum[..8]), vec![0x3f80, 0x0000, 0xbf80, 0x3f82, 0x0000, 0x4380, 0x0000, 0x0000]);
    // Row 1: 2, -2, ... with inv 0.5: normed = ±1, out = ±w exactly; w * (+1) for even columns.
    assert_eq!(reference.inv_rms[1], 0.5);
    let expected: Vec<u32> =
        [1.0f32, -0.5, 3.0, 1.0, 0.25, -1.5, -0.5, -2.0].iter().map(|&x| u32::from(b(x).to_bits())).collect();
    assert_eq!(bits(&reference.out[8..]), expected);
    assert_eq!(reference.out_max_ulp(&reference.out), 0);
}

#[test]
fn zero_rows_keep_the_sign_of_the_weight() {
    let problem = Problem::new(3, 1, 8, DType::F16);
    let nz = f16::from_bits(0x8000);
    let fixture =
        Fixture::from_fn(&problem, |_, _, _| nz, |_, _| nz, |col| f16::from_f32(if col < 4 { 1.5 } else { -0.25 }));
    let reference = Reference::compute(&fixture);
    assert_eq!(bits(&reference.residual_out), vec![0; 8], "all -0.0 in, +0.0 out");
    assert_eq!(bits(&reference.out), vec![0, 0, 0, 0, 0x8000, 0x8000, 0x8000, 0x8000], "w * +0");
    assert_eq!(reference.inv_rms[0], 1.0 / f64::from(Problem::DEFAULT_EPS).sqrt());
}

fn agrees_with_kernels_contract<T: Element>(world_size: usize, rows: usize, hidden: usize) {
    let problem = Problem::new(world_size, rows, hidden, T::DTYPE);
    let fixture = Fixture::<T>::generate(&problem);
    let reference = Reference::compute(&fixture);
    let theirs = kernels_contract(&fixture);
    let what = problem.to_string();
    reference.assert_sum_exact(&what, &theirs.sum);
    reference.assert_residual_out_exact(&what, &theirs.residual_out);
    // The kernels compute inv in f32 by their tree: within the accepted band, so 0 ulp.
    reference.assert_out_within(&what, &theirs.out, 0);
}

#[test]
fn agrees_with_the_kernels_contract_code() {
    for world_size in [1, 2, 3, 4, 6, 8] {
        for (rows, hidden) in [(1, 2880), (5, 4096), (16, 512)] {
            agrees_with_kernels_contract::<bf16>(world_size, rows, hidden);
            agrees_with_kernels_contract::<f16>(world_size, rows, hidden);
        }
        agrees_with_kernels_contract::<f32>(world_size, 4, 1024);
    }
}

#[test]
fn the_band_is_narrow_but_covers_f32_inv_errors() {
    for dtype in [DType::Bf16, DType::F16, DType::F32] {
        crate::with_dtype!(dtype, T => {
            let problem = Problem::new(4, 32, 4096, dtype);
            let fixture = Fixture::<T>::generate(&problem);
            let reference = Reference::compute(&fixture);
            let ambiguous = reference.ambiguous_count() as f64 / problem.elems() as f64;
            if dtype == DType::F32 {
                assert!(ambiguous > 0.5, "f32: most elements have a band of several values ({ambiguous})");
            } else {
                assert!(ambiguous > 0.0 && ambiguous < 0.1, "{dtype}: {ambiguous} of the elements ambiguous");
            }
            // An inv off by 2^-20 relative (worse than a real f32 tree) is still accepted exactly...
            for error in [pow(-20), -pow(-20)] {
                let ours = variant(&fixture, canonical_rank_order, true, error, false);
                assert_eq!(reference.out_max_ulp(&ours.out), 0, "{dtype}, inv error {error:e}");
            }
            // ...while one off by 2^-12 (a real bug, e.g. a reduced-precision rsqrt) is not.
            let sloppy = variant(&fixture, canonical_rank_order, true, pow(-12), false);
            assert!(reference.out_max_ulp(&sloppy.out) >= 1, "{dtype}: sloppy inv caught");
        });
    }
}

fn pow(k: i32) -> f64 {
    crate::float::pow2(k)
}

#[test]
fn wrong_reductions_are_caught() {
    for world_size in [4, 8] {
        let problem = Problem::new(world_size, 8, 2048, DType::Bf16);
        let fixture = Fixture::<bf16>::generate(&problem);
        let reference = Reference::compute(&fixture);
        let right = variant(&fixture, canonical_rank_order, true, 0.0, false);
        reference.assert_residual_out_exact("rank order", &right.residual_out);
        reference.assert_sum_exact("rank order", &right.sum);

        let exact = |t: &[f32]| t.iter().map(|&x| f64::from(x)).sum::<f64>() as f32;
        let reversed = |t: &[f32]| t.iter().rev().copied().reduce(|a, b| a + b).unwrap_or(0.0);
        let tree = |t: &[f32]| {
            let mut v = t.to_vec();
            while v.len() > 1 {
                v = v.chunks(2).map(|c| c.iter().sum()).collect();
            }
            v[0]
        };
        let not_canonical = |t: &[f32]| t.iter().copied().reduce(|a, b| a + b).unwrap_or(0.0);
        for (name, wrong) in [
            ("f64 sum", variant(&fixture, exact, true, 0.0, false)),
            ("reversed", variant(&fixture, reversed, true, 0.0, false)),
            ("pairwise tree", variant(&fixture, tree, true, 0.0, false)),
            ("-0.0 not canonicalised", variant(&fixture, not_canonical, true, 0.0, false)),
            ("sum not rounded before the residual", variant(&fixture, canonical_rank_order, false, 0.0, false)),
        ] {
            let report = reference.residual_out_mismatches(&wrong.residual_out);
            assert!(!report.is_empty(), "{name} not caught (world {world_size})");
        }
    }
}

#[test]
fn single_rounding_of_out_is_caught() {
    // AITER rounds once (w * normed): up to an ulp or so away from the contract's double rounding.
    let problem = Problem::new(2, 8, 4096, DType::Bf16);
    let fixture = Fixture::<bf16>::generate(&problem);
    let reference = Reference::compute(&fixture);
    let aiter = variant(&fixture, canonical_rank_order, true, 0.0, true);
    assert!(reference.out_max_ulp(&aiter.out) >= 1);
    assert!(reference.out_violations(&aiter.out, 0).total > 0);
}

#[test]
fn reports_name_the_elements() {
    let problem = Problem::new(2, 4, 64, DType::Bf16);
    let fixture = Fixture::<bf16>::generate(&problem);
    let reference = Reference::compute(&fixture);
    assert!(reference.residual_out_mismatches(&reference.residual_out).is_empty());

    let mut residual_out = reference.residual_out.clone();
    residual_out[70] = bf16::from_bits(residual_out[70].to_bits() ^ 1);
    residual_out[200] = crate::poison::poison_value();
    let report = reference.residual_out_mismatches(&residual_out);
    assert_eq!((report.total, report.indices()), (2, vec![70, 200]));
    assert_eq!((report.first[0].row, report.first[0].col, report.first[0].ulp), (1, 6, 1));
    assert_eq!(report.first[1].ulp, u32::MAX);
    let text = report.to_string();
    assert!(text.starts_with("2 of 256 elements differ\n  [70] row 1 col 6: expected 0x"), "{text}");
    assert!(text.contains("got 0x7fa5 = NaN (NaN against a number)"), "{text}");

    // A sign flip of a zero is a bit mismatch even though it is 0 ulp.
    let zero = reference.residual_out.iter().position(|v| v.to_bits() == 0).expect("fixtures hold zeros");
    let mut flipped = reference.residual_out.clone();
    flipped[zero] = bf16::from_bits(0x8000);
    assert_eq!(reference.residual_out_mismatches(&flipped).indices(), vec![zero]);

    // out: one element moved just outside its accepted range is 1 ulp off and reported.
    let mut out = reference.out.clone();
    let index = 77;
    let (_, hi) = reference.accepted(index);
    out[index] = next_above(hi);
    assert_eq!(reference.out_max_ulp(&out), 1);
    assert_eq!(reference.out_violations(&out, 0).indices(), vec![index]);
    assert!(reference.out_violations(&out, 1).is_empty());
}

/// The next bf16 above `v` in the ordered keys of `crate::ulp`.
fn next_above(v: bf16) -> bf16 {
    let key = crate::ulp::ordered_key(v).expect("not NaN") + 1;
    bf16::from_bits(if key >= 0 { key as u16 } else { 0x8000 | (-key) as u16 })
}

#[test]
#[should_panic(expected = "rank 1 lost: residual_out is not bit-exact vs the reference (1x8 bf16, world 2")]
fn assert_panics_with_the_problem() {
    let problem = Problem::new(2, 1, 8, DType::Bf16);
    let fixture = Fixture::<bf16>::generate(&problem);
    let reference = Reference::compute(&fixture);
    let mut wrong = reference.residual_out.clone();
    wrong[3] = bf16::from_bits(wrong[3].to_bits() ^ 0x10);
    reference.assert_residual_out_exact("rank 1 lost", &wrong);
}

#[test]
#[should_panic(expected = "out: got 7 elements, the reference has 8")]
fn lengths_are_checked() {
    let fixture = Fixture::<f32>::generate(&Problem::new(1, 1, 8, DType::F32));
    let _ = Reference::compute(&fixture).out_max_ulp(&[0.0; 7]);
}

#[test]
fn reduce_element_edge_cases() {
    let nz = bf16::from_bits(0x8000);
    assert_eq!(reduce_element::<bf16>([]).to_bits(), 0);
    assert_eq!(reduce_element([nz]).to_bits(), 0);
    assert_eq!(reduce_element([nz, nz, nz]).to_bits(), 0);
    assert_eq!(reduce_element([bf16::from_bits(0x8001), nz]).to_bits(), 0x8001, "negative subnormals are data");
    assert_eq!(add_residual_element(bf16::ZERO, nz).to_bits(), 0);
    // f16 subnormals add exactly (no flush to zero anywhere).
    let s = reduce_element([f16::from_bits(0x0001), f16::from_f32(0.0)]);
    assert_eq!(s.to_bits(), 0x0001);
    assert_eq!(add_residual_element(s, f16::from_bits(0x8003)).to_bits(), 0x8002);
}

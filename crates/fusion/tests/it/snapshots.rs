//! `insta` snapshots of the numerics summary for a fixed set of cases.
//!
//! The invariant part (digests of `residual_out` and `out`, sampled elements) is asserted for every
//! path against one snapshot per case, so each snapshot file states "1-stage = 2-stage = unfused";
//! the backend-specific part (max ulp, exactness) has its own snapshot with the backend's suffix.
//! Inputs come from `Problem::new` (seeds derived from the shape, never from the environment).

use super::{call, run_group, test_config, PATHS};
use arfuse_kernels::{DType, Element};
use arfuse_testkit::{with_dtype, Fixture, NumericsSummary, Problem, Reference};

const CASES: [(usize, usize, usize, DType); 5] = [
    (4, 1, 4096, DType::Bf16),
    (4, 16, 2880, DType::F16),
    (4, 81, 8192, DType::Bf16),
    (3, 4, 7168, DType::Bf16),
    (8, 128, 5120, DType::F16),
];

fn summaries<T: Element>(problem: &Problem) -> Vec<(String, NumericsSummary)> {
    let fixture = Fixture::<T>::generate(problem);
    let reference = Reference::compute(&fixture);
    let per_rank = run_group(problem.world_size, test_config(8 << 20), |op, stream| {
        PATHS
            .iter()
            .map(|&path| {
                let got = call(op, stream, Some(path), &fixture).expect("call");
                (path.name().to_string(), NumericsSummary::new(problem.name(), &reference, &got.residual_out, &got.out))
            })
            .collect::<Vec<_>>()
    });
    per_rank.into_iter().flatten().collect()
}

#[test]
fn numerics_summaries() {
    for (world, rows, hidden, dtype) in CASES {
        let problem = Problem::new(world, rows, hidden, dtype);
        let all = with_dtype!(dtype, T => summaries::<T>(&problem));
        insta::allow_duplicates! {
            for (_path, summary) in &all {
                insta::assert_snapshot!(problem.name(), summary.invariant());
                insta::assert_snapshot!(format!("{}-cpu", problem.name()), summary.backend_specific());
            }
        }
    }
}

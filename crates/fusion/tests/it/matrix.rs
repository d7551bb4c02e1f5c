//! The contract on every path: world sizes 1, 2, 3, 4, 6, 8 × hidden 2880…8192 × tokens 1…128 ×
//! bf16/f16; `residual_out` bit-exact, `out` within 1 ulp of the f64 reference and identical
//! across paths and batch sizes, every element written.

use super::{call, run_group, test_config, PATHS, UNFUSED};
use arfuse_fusion::Path;
use arfuse_kernels::Element;
use arfuse_testkit::{assert_all_written, Fixture, Problem, Reference, TestSeed};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const HIDDEN: [usize; 6] = [2880, 4096, 5120, 6144, 7168, 8192];
const TOKENS: [usize; 6] = [1, 4, 16, 80, 81, 128];

type Case<T> = Arc<(Fixture<T>, Reference<T>)>;

/// Every rank runs every case on every path; the first rank to need a case generates it.
fn check_world<T: Element>(world: usize, seed: &TestSeed) {
    let cache: Mutex<HashMap<(usize, usize), Case<T>>> = Mutex::new(HashMap::new());
    let case = |rows: usize, hidden: usize| -> Case<T> {
        let mut cache = cache.lock().expect("cache");
        cache
            .entry((rows, hidden))
            .or_insert_with(|| {
                let problem = Problem::new(world, rows, hidden, T::DTYPE)
                    .with_seed(seed.derive_named(&format!("w{world}-{rows}x{hidden}-{}", T::DTYPE)));
                let fixture = Fixture::generate(&problem);
                let reference = Reference::compute(&fixture);
                Arc::new((fixture, reference))
            })
            .clone()
    };
    // max_size 8 MiB: every shape here (at most 2 MiB) fuses.
    let summaries = run_group(world, test_config(8 << 20), |op, stream| {
        let mut digests = Vec::new();
        for hidden in HIDDEN {
            for rows in TOKENS {
                let case = case(rows, hidden);
                let (fixture, reference) = (&case.0, &case.1);
                let name = format!("{} rank {}", fixture.problem, op.rank());
                let mut first_out: Option<Vec<T>> = None;
                for path in PATHS {
                    let got = call(op, stream, Some(path), fixture).unwrap_or_else(|e| panic!("{name} {path}: {e}"));
                    assert_eq!(got.path, path);
                    let what = format!("{name} {path}");
                    assert_all_written(&format!("{what} out"), &got.out);
                    assert_all_written(&format!("{what} residual_out"), &got.residual_out);
                    reference.assert_residual_out_exact(&what, &got.residual_out);
                    reference.assert_out_within(&what, &got.out, 1);
                    match &first_out {
                        None => first_out = Some(got.out),
                        Some(first) => assert!(
                            first.iter().zip(&got.out).all(|(a, b)| a.to_bits_u32() == b.to_bits_u32()),
                            "{what}: out differs from the 1-stage path's"
                        ),
                    }
                }
                digests.push(arfuse_testkit::fnv1a64(first_out.as_deref().unwrap_or_default()));
            }
        }
        digests
    });
    // Every rank computed the same `out`.
    assert!(summaries.windows(2).all(|w| w[0] == w[1]), "ranks disagree on out");
}

macro_rules! world_tests {
    ($($name:ident: $world:expr,)*) => {$(
        #[test]
        fn $name() {
            let seed = TestSeed::new(concat!("matrix::", stringify!($name)));
            check_world::<bf16>($world, &seed);
            check_world::<f16>($world, &seed);
        }
    )*};
}

world_tests! {
    world_1: 1,
    world_2: 2,
    world_3: 3,
    world_4: 4,
    world_6: 6,
    world_8: 8,
}

/// A token's output does not depend on the batch it was in, nor on the path.
#[test]
fn token_output_is_batch_invariant() {
    let seed = TestSeed::new("matrix::token_output_is_batch_invariant");
    let problem = Problem::new(4, 160, 4096, bf16::DTYPE).with_seed(seed.seed());
    let batch = Fixture::<bf16>::generate(&problem);
    run_group(4, test_config(8 << 20), |op, stream| {
        let whole = call(op, stream, None, &batch).expect("batch call");
        assert_eq!(whole.path, Path::TwoStage, "160 x 4096 bf16 is above world 4's 1-stage threshold");
        for row in [0, 7, 40, 80, 159] {
            let single = batch.single_token(row);
            for path in [Path::OneStage, Path::TwoStage, UNFUSED] {
                let alone = call(op, stream, Some(path), &single).expect("single-token call");
                let range = row * 4096..(row + 1) * 4096;
                assert!(
                    alone.out.iter().zip(&whole.out[range.clone()]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "row {row} alone on {path} differs from row {row} in the batch of 160"
                );
                assert!(alone
                    .residual_out
                    .iter()
                    .zip(&whole.residual_out[range])
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    });
}

/// Tensors above `max_size / 2` take the unfused path (custom all-reduce in row chunks that fit
/// max_size / 2) and stay exact.
#[test]
fn larger_than_the_buffers_runs_unfused_in_chunks_and_stays_exact() {
    let seed = TestSeed::new("matrix::larger_than_the_buffers");
    // max_size 128 KiB: fused up to 64 KiB; 100 x 4096 f16 is 800 KiB.
    let problem = Problem::new(3, 100, 4096, f16::DTYPE).with_seed(seed.seed());
    let fixture = Fixture::<f16>::generate(&problem);
    let reference = Reference::compute(&fixture);
    run_group(3, test_config(128 << 10), |op, stream| {
        let got = call(op, stream, None, &fixture).expect("call");
        assert!(matches!(got.path, Path::Unfused { .. }), "{:?}", got.path);
        reference.assert_residual_out_exact("chunked unfused", &got.residual_out);
        reference.assert_out_within("chunked unfused", &got.out, 1);
        assert_all_written("out", &got.out);
    });
}

//! Peer failures become typed errors within the deadline, never hangs or wrong data.

use super::{call, run_group};
use arfuse_fusion::{Config, Error};
use arfuse_testkit::{Fixture, Problem, TestSeed};
use half::bf16;
use std::time::{Duration, Instant};

fn short_deadline() -> Config {
    let mut config = super::test_config(1 << 20);
    config.deadline = Duration::from_millis(300);
    config
}

#[test]
fn a_rank_that_never_calls_makes_the_others_time_out_then_refuse() {
    let seed = TestSeed::new("faults::never_calls");
    let fixture =
        Fixture::<bf16>::generate(&Problem::new(3, 4, 4096, arfuse_kernels::DType::Bf16).with_seed(seed.seed()));
    let results = run_group(3, short_deadline(), |op, stream| {
        if op.rank() == 2 {
            return None; // stalls forever as far as its peers can tell
        }
        let start = Instant::now();
        let err = call(op, stream, None, &fixture).err().expect("a call without rank 2 cannot complete");
        let waited = start.elapsed();
        let again = call(op, stream, None, &fixture).err().expect("the operator refuses after a failure");
        Some((err, waited, again))
    });
    for (rank, result) in results.into_iter().enumerate().take(2) {
        let (err, waited, again) = result.expect("ranks 0 and 1 report");
        assert!(matches!(err, Error::PeerTimeout { peer: 2, .. }), "rank {rank}: {err}");
        assert!(waited < Duration::from_secs(5), "rank {rank} waited {waited:?} for a 300 ms deadline");
        assert!(matches!(again, Error::Poisoned(_)), "rank {rank}: {again}");
    }
}

#[test]
fn ranks_calling_with_different_shapes_get_a_mismatch_error_not_data() {
    let seed = TestSeed::new("faults::different_shapes");
    let small =
        Fixture::<bf16>::generate(&Problem::new(2, 4, 4096, arfuse_kernels::DType::Bf16).with_seed(seed.seed()));
    let large =
        Fixture::<bf16>::generate(&Problem::new(2, 8, 4096, arfuse_kernels::DType::Bf16).with_seed(seed.seed()));
    let errors = run_group(2, short_deadline(), |op, stream| {
        let fixture = if op.rank() == 0 { &small } else { &large };
        call(op, stream, None, fixture).err().expect("ranks disagree on the shape")
    });
    for (rank, err) in errors.iter().enumerate() {
        match err {
            Error::CallMismatch { detail, .. } => {
                assert!(detail.contains("4x4096") && detail.contains("8x4096"), "{detail}")
            }
            other => panic!("rank {rank}: expected a call mismatch, got {other}"),
        }
    }
}

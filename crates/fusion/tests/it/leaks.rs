//! Creating and dropping operators leaks nothing: open file descriptors and our `/dev/shm`
//! segments are counted before and after 1000 create/call/drop cycles and must be equal.
//!
//! The cycles run in a child process of their own (the harness re-executes this one test), so
//! that no other test of this binary, running on another thread, opens descriptors or creates
//! segments with our pid meanwhile.

use super::{call, run_group, test_config};
use arfuse_kernels::DType;
use arfuse_testkit::{assert_ranks_succeeded, child, run_processes, test_path, Fixture, Problem, Reference, TestSeed};
use half::bf16;
use std::time::{Duration, Instant};

const CYCLES: usize = 1000;

/// Entries of `/proc/self/fd` (the descriptor used to list it is counted every time alike).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

/// Our segments in `/dev/shm` (the cpu backend names them `/arfuse-<pid>-…`).
fn own_segments() -> usize {
    let prefix = format!("arfuse-{}-", std::process::id());
    std::fs::read_dir("/dev/shm")
        .expect("/dev/shm")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .count()
}

#[test]
fn thousand_operators_created_and_dropped_leak_no_fd_and_no_segment() {
    if child().is_some() {
        let seed = TestSeed::new("leaks::thousand_operators");
        let fixture = Fixture::<bf16>::generate(&Problem::new(2, 2, 64, DType::Bf16).with_seed(seed.seed()));
        let reference = Reference::compute(&fixture);
        let before = (open_fds(), own_segments());
        let start = Instant::now();
        for cycle in 0..CYCLES {
            // Each cycle: a fresh group of two rank threads, one checked call, both operators dropped.
            run_group(2, test_config(64 << 10), |op, stream| {
                let got = call(op, stream, None, &fixture).unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
                reference.assert_residual_out_exact(&format!("cycle {cycle}"), &got.residual_out);
            });
        }
        let after = (open_fds(), own_segments());
        eprintln!(
            "leaks: {CYCLES} cycles in {:.2?}; (fds, segments) before {before:?}, after {after:?}",
            start.elapsed()
        );
        assert_eq!(before, after, "(open fds, /dev/shm segments) changed over {CYCLES} create/drop cycles");
        return;
    }
    let outcomes = run_processes(
        &test_path!(thousand_operators_created_and_dropped_leak_no_fd_and_no_segment),
        1,
        Duration::from_secs(120),
    )
    .expect("process harness");
    assert_ranks_succeeded(&outcomes);
    for line in outcomes[0].stderr.lines().filter(|l| l.starts_with("leaks:")) {
        println!("{line}");
    }
}

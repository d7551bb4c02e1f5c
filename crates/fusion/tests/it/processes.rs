//! Four real rank processes over POSIX shared memory: 100 consecutive calls of changing shapes
//! and paths, all bit-exact.

use super::call;
use arfuse_fusion::{AllReduceRmsNorm, Config, Path};
use arfuse_ipc::UnixRendezvous;
use arfuse_kernels::api::Cpu;
use arfuse_kernels::{Backend, DType};
use arfuse_testkit::{
    assert_all_written, assert_ranks_succeeded, child, run_processes_with, test_path, Fixture, Problem, ProcessOptions,
    Reference, TestSeed,
};
use half::bf16;
use std::time::Duration;

const CALLS: usize = 100;

#[test]
fn four_processes_hundred_calls_of_changing_shapes() {
    if let Some(me) = child() {
        let seed = TestSeed::new("processes::four_processes_hundred_calls");
        let mut rendezvous =
            UnixRendezvous::connect(&me.dir, me.rank, me.world_size, Duration::from_secs(60)).expect("rendezvous");
        let device = Cpu::open_device(0, 1).expect("cpu");
        let stream = Cpu::create_stream(&device).expect("stream");
        let mut config = Config::default();
        config.policy.max_size = 4 << 20;
        config.deadline = Duration::from_secs(60);
        let mut op = AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, config).expect("operator");
        let hiddens = [2880, 4096, 5120, 8192];
        let tokens = [1, 3, 16, 33, 80, 81, 128];
        let mut seen = std::collections::HashSet::new();
        for i in 0..CALLS {
            // Every rank derives the same sequence of shapes from the call index.
            let hidden = hiddens[(i * 7 + 3) % hiddens.len()];
            let rows = tokens[(i * 5 + 1) % tokens.len()];
            let problem = Problem::new(me.world_size, rows, hidden, DType::Bf16).with_seed(seed.derive(i as u64));
            let fixture = Fixture::<bf16>::generate(&problem);
            let reference = Reference::compute(&fixture);
            let got = call(&mut op, &stream, None, &fixture).unwrap_or_else(|e| panic!("call {i} ({problem}): {e}"));
            let what = format!("rank {} call {i} {problem} {}", me.rank, got.path);
            reference.assert_residual_out_exact(&what, &got.residual_out);
            reference.assert_out_within(&what, &got.out, 1);
            assert_all_written(&what, &got.out);
            seen.insert(got.path);
            if me.rank == 0 && (i + 1) % 10 == 0 {
                eprintln!("processes: {}/{CALLS} calls checked", i + 1);
            }
        }
        assert!(seen.contains(&Path::OneStage) && seen.contains(&Path::TwoStage), "both fused paths ran: {seen:?}");
        return;
    }
    // Bounded by lack of progress (rank 0 reports every 10 calls), not by the run's length.
    let mut options = ProcessOptions::new(4, Duration::MAX);
    options.stall_timeout = Some(Duration::from_secs(300));
    let outcomes = run_processes_with(&test_path!(four_processes_hundred_calls_of_changing_shapes), &options)
        .expect("process harness");
    assert_ranks_succeeded(&outcomes);
}

//! Rank processes on one GPU over the runtime's IPC: operators created and dropped leak nothing,
//! and a rank that dies makes its peer time out instead of hanging.

use crate::gpu_available;
use arfuse_fusion::{AllReduceRmsNorm, Args, Config, Path, TensorMut, TensorRef};
use arfuse_ipc::{Rendezvous, UnixRendezvous};
use arfuse_kernels::gpu::DeviceBuffer;
use arfuse_kernels::{Element, GpuBackend};
use arfuse_testkit::{assert_ranks_succeeded, child, poisoned, run_processes, Fixture, Problem, Reference, TestSeed};
use half::bf16;
use std::time::Duration;

/// Entries of `/proc/self/fd`.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Operators created and dropped by two rank processes over real IPC leak nothing: open file
/// descriptors and free device memory are the same after `CYCLES` more create/call/drop cycles as
/// after the first (which pays for the context and the kernels). Each cycle maps the peer's buffer
/// with the runtime's IPC and must unmap it on drop.
pub(crate) fn operators_over_ipc_created_and_dropped_leak_no_fd_and_no_device_memory<B: GpuBackend>(test: &str) {
    const CYCLES: usize = 100;
    if let Some(me) = child() {
        use std::os::unix::fs::PermissionsExt;
        let device = B::open_device(0, me.world_size).expect("device");
        let stream = B::create_stream(&device).expect("stream");
        let seed = TestSeed::new(&format!("{}::ipc_leaks", B::KIND));
        let fixture =
            Fixture::<bf16>::generate(&Problem::new(me.world_size, 4, 4096, bf16::DTYPE).with_seed(seed.seed()));
        let reference = Reference::compute(&fixture);
        let mut config = Config::default().with_deadline(Duration::from_secs(20));
        config.policy.max_size = 8 << 20;
        let cycle = |n: usize| {
            let dir = me.dir.join(format!("cycle-{n}"));
            std::fs::create_dir_all(&dir).expect("cycle dir");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("0700");
            let mut rendezvous =
                UnixRendezvous::connect(&dir, me.rank, me.world_size, Duration::from_secs(60)).expect("rendezvous");
            let mut op = AllReduceRmsNorm::<B>::new(&device, &mut rendezvous, config).expect("operator");
            let input = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.inputs[me.rank]).expect("input");
            let residual = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.residual).expect("residual");
            let weight = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.weight).expect("weight");
            let poisoned = poisoned::<bf16>(fixture.residual.len());
            let mut out = DeviceBuffer::<B, _>::from_slice(&stream, &poisoned).expect("out");
            let mut residual_out = DeviceBuffer::<B, _>::from_slice(&stream, &poisoned).expect("residual_out");
            op.forward(
                &stream,
                Args {
                    input: TensorRef::new(&input),
                    residual: TensorRef::new(&residual),
                    weight: TensorRef::new(&weight),
                    out: TensorMut::new(&mut out),
                    residual_out: TensorMut::new(&mut residual_out),
                    eps: fixture.problem.eps,
                },
            )
            .expect("forward");
            op.check(&stream).unwrap_or_else(|e| panic!("cycle {n}: {e}"));
            let got = residual_out.download(&stream).expect("download");
            reference.assert_residual_out_exact(&format!("rank {} cycle {n}", me.rank), &got);
            // Free only once the peer's kernel has finished reading this rank's buffer.
            rendezvous.all_gather(&[]).expect("end of cycle");
            drop((op, input, residual, weight, out, residual_out));
            // The free memory is the device's, so measure only once every rank has freed.
            rendezvous.all_gather(&[]).expect("every rank freed");
        };
        cycle(0);
        let before = (open_fds(), B::memory_info(&device).expect("memory info").0);
        for n in 1..=CYCLES {
            cycle(n);
        }
        let after = (open_fds(), B::memory_info(&device).expect("memory info").0);
        eprintln!("ipc leaks: rank {} {CYCLES} cycles; (fds, free device bytes) {before:?} -> {after:?}", me.rank);
        assert_eq!(before, after, "(open fds, free device memory) changed over {CYCLES} create/drop cycles");
        return;
    }
    if !gpu_available::<B>(test) {
        return;
    }
    let outcomes = run_processes(test, 2, Duration::from_secs(400)).expect("process harness");
    assert_ranks_succeeded(&outcomes);
    for outcome in &outcomes {
        for line in outcome.stderr.lines().filter(|l| l.starts_with("ipc leaks:")) {
            println!("{line}");
        }
    }
}

/// How the faulty rank of [`a_dead_rank_process_makes_its_peer_time_out_not_hang`] dies.
const KILL_SCENARIOS: [&str; 2] = ["sigkill-between-calls", "abort-between-stages"];

/// A rank process that dies on the GPU — SIGKILLed between two calls, or aborting between the two
/// stages of a 2-stage call (its reduce-scatter enqueued, perhaps running) — makes the survivor's
/// kernel give up at its deadline: `check` reports `PeerTimeout` naming the dead rank within the
/// deadline plus a margin, no call returns wrong data, and the survivor drops its operator and
/// exits cleanly. Two processes on one GPU over real IPC.
pub(crate) fn a_dead_rank_process_makes_its_peer_time_out_not_hang<B: GpuBackend>(test: &str) {
    use arfuse_testkit::{run_processes_with, ProcessOptions};
    use std::os::unix::process::ExitStatusExt;
    const DEADLINE: Duration = Duration::from_secs(2);
    const MARGIN: Duration = Duration::from_secs(5);
    const GOOD_CALLS: usize = 3;
    if let Some(me) = child() {
        let scenario = std::env::var("ARFUSE_TEST_KILL").expect("scenario");
        let device = B::open_device(0, me.world_size).expect("device");
        let stream = B::create_stream(&device).expect("stream");
        let seed = TestSeed::new(&format!("{}::dead_rank", B::KIND));
        let fixture =
            Fixture::<bf16>::generate(&Problem::new(me.world_size, 8, 4096, bf16::DTYPE).with_seed(seed.seed()));
        let reference = Reference::compute(&fixture);
        let mut config = Config::default().with_deadline(DEADLINE);
        if me.rank == 1 && scenario == "abort-between-stages" {
            config.fault = Some(arfuse_fusion::Fault::AbortBetweenStages);
        }
        let mut rendezvous =
            UnixRendezvous::connect(&me.dir, me.rank, me.world_size, Duration::from_secs(60)).expect("rendezvous");
        let mut op = AllReduceRmsNorm::<B>::new(&device, &mut rendezvous, config).expect("operator");
        let input = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.inputs[me.rank]).expect("input");
        let residual = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.residual).expect("residual");
        let weight = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.weight).expect("weight");
        let poisoned = poisoned::<bf16>(fixture.residual.len());
        let mut out = DeviceBuffer::<B, _>::from_slice(&stream, &poisoned).expect("out");
        let mut residual_out = DeviceBuffer::<B, _>::from_slice(&stream, &poisoned).expect("residual_out");
        // Good calls on 1-stage; the calls that meet the fault on 2-stage.
        let mut call = |op: &mut AllReduceRmsNorm<B>, path: Path| -> arfuse_fusion::Result<Vec<bf16>> {
            residual_out.upload(&stream, &poisoned).expect("poison");
            op.forward_on(
                &stream,
                path,
                Args {
                    input: TensorRef::new(&input),
                    residual: TensorRef::new(&residual),
                    weight: TensorRef::new(&weight),
                    out: TensorMut::new(&mut out),
                    residual_out: TensorMut::new(&mut residual_out),
                    eps: fixture.problem.eps,
                },
            )?;
            op.check(&stream)?;
            Ok(residual_out.download(&stream).expect("download"))
        };
        for n in 0..GOOD_CALLS {
            let got = call(&mut op, Path::OneStage).unwrap_or_else(|e| panic!("good call {n}: {e}"));
            reference.assert_residual_out_exact(&format!("rank {} good call {n}", me.rank), &got);
        }
        // Nobody is inside a call now: the fault comes next.
        rendezvous.all_gather(&[]).expect("before the fault");
        if me.rank == 1 && scenario == "sigkill-between-calls" {
            // SAFETY: sends a signal to this process; no memory is touched.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        for n in 0..3 {
            let start = std::time::Instant::now();
            match call(&mut op, Path::TwoStage) {
                Ok(got) => {
                    reference.assert_residual_out_exact(&format!("rank {} call {n} after the fault", me.rank), &got)
                }
                Err(e) => {
                    let took = start.elapsed();
                    eprintln!("dead rank: {scenario}: rank {} call {n} after the fault: {e} after {took:?}", me.rank);
                    assert!(matches!(e, arfuse_fusion::Error::PeerTimeout { peer: 1, .. }), "rank {}: {e}", me.rank);
                    assert!(took < DEADLINE + MARGIN, "rank {}: took {took:?}", me.rank);
                    drop(op);
                    return;
                }
            }
        }
        panic!("rank {}: three calls after the peer died, and no error", me.rank);
    }
    if !gpu_available::<B>(test) {
        return;
    }
    for scenario in KILL_SCENARIOS {
        let options = ProcessOptions::new(2, Duration::from_secs(120)).env("ARFUSE_TEST_KILL", scenario);
        let outcomes = run_processes_with(test, &options).expect("process harness");
        let signal = if scenario == "sigkill-between-calls" { libc::SIGKILL } else { libc::SIGABRT };
        for outcome in &outcomes {
            if outcome.rank == 1 {
                assert_eq!(outcome.status.signal(), Some(signal), "{outcome}");
            } else {
                assert!(outcome.succeeded(), "{outcome}");
            }
            assert!(!outcome.timed_out, "{outcome}");
            for line in outcome.stderr.lines().filter(|l| l.starts_with("dead rank:")) {
                println!("{line}");
            }
        }
    }
}

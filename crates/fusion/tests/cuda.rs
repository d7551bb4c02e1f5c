//! The operator on the cuda backend: ranks as threads sharing one GPU (peer pointers, no IPC),
//! every path, checked against the testkit reference and against each other.
//! Skips loudly without a GPU; fails instead when `ARFUSE_REQUIRE_BACKENDS` names `cuda`.
#![cfg(feature = "cuda")]

use arfuse_fusion::{AllReduce, AllReduceRmsNorm, Args, Config, FallbackReason, Path, TensorMut, TensorRef};
use arfuse_ipc::{Rendezvous, ThreadRendezvous, UnixRendezvous};
use arfuse_kernels::api::Cuda;
use arfuse_kernels::cuda::CudaBuffer;
use arfuse_kernels::{Backend, Element};
use arfuse_testkit::{
    assert_all_written, assert_ranks_succeeded, child, poison, run_processes, run_threads, test_path, Fixture, Problem,
    Reference, TestSeed,
};
use half::{bf16, f16};
use std::sync::Mutex;
use std::time::Duration;

fn gpu_available(test: &str) -> bool {
    let required = std::env::var("ARFUSE_REQUIRE_BACKENDS").unwrap_or_default().split(',').any(|b| b.trim() == "cuda");
    match Cuda::device_count() {
        Ok(n) if n > 0 => true,
        other => {
            let why = match other {
                Ok(_) => "no CUDA device".to_string(),
                Err(e) => e.to_string(),
            };
            assert!(!required, "{test}: ARFUSE_REQUIRE_BACKENDS names cuda, but: {why}");
            println!("SKIP cuda: {why}");
            false
        }
    }
}

const UNFUSED: Path = Path::Unfused { all_reduce: AllReduce::Custom, reason: FallbackReason::Disabled };

fn check<T: Element>(world: usize, shapes: &[(usize, usize)], seed: &TestSeed) {
    let cases: Vec<(Fixture<T>, Reference<T>)> = shapes
        .iter()
        .map(|&(rows, hidden)| {
            let problem =
                Problem::new(world, rows, hidden, T::DTYPE).with_seed(seed.derive_named(&format!("{rows}x{hidden}")));
            let fixture = Fixture::generate(&problem);
            let reference = Reference::compute(&fixture);
            (fixture, reference)
        })
        .collect();
    let slots: Vec<Mutex<Option<ThreadRendezvous>>> =
        ThreadRendezvous::group(world, Duration::from_secs(60)).into_iter().map(|r| Mutex::new(Some(r))).collect();
    let config = Config { deadline: Duration::from_secs(10), ..Config::default() };
    // Ranks allocate and free device memory only while no kernel spins (a free can wait for the
    // device to go idle): every case starts and ends at this barrier.
    let phase = std::sync::Barrier::new(world);
    run_threads(world, |rank| {
        let mut rendezvous = slots[rank].lock().expect("slot").take().expect("rendezvous");
        let device = Cuda::open_device(0, world).expect("device");
        let stream = Cuda::create_stream(&device).expect("stream");
        let mut op = AllReduceRmsNorm::<Cuda>::new(&device, &mut rendezvous, config).expect("operator");
        for (fixture, reference) in &cases {
            let input = CudaBuffer::from_slice(&stream, &fixture.inputs[rank]).expect("input");
            let residual = CudaBuffer::from_slice(&stream, &fixture.residual).expect("residual");
            let weight = CudaBuffer::from_slice(&stream, &fixture.weight).expect("weight");
            let mut poisoned = vec![T::from_f32(0.0); fixture.residual.len()];
            poison(&mut poisoned);
            let mut out = CudaBuffer::from_slice(&stream, &poisoned).expect("out");
            let mut residual_out = CudaBuffer::from_slice(&stream, &poisoned).expect("residual_out");
            phase.wait();
            let mut first_out: Option<Vec<T>> = None;
            for path in [None, Some(Path::OneStage), Some(Path::TwoStage), Some(UNFUSED)] {
                out.upload(&stream, &poisoned).expect("poison out");
                residual_out.upload(&stream, &poisoned).expect("poison residual_out");
                let args = Args {
                    input: TensorRef::new(&input),
                    residual: TensorRef::new(&residual),
                    weight: TensorRef::new(&weight),
                    out: TensorMut::new(&mut out),
                    residual_out: TensorMut::new(&mut residual_out),
                    eps: fixture.problem.eps,
                };
                let ran = match path {
                    Some(path) => op.forward_on(&stream, path, args),
                    None => op.forward(&stream, args),
                }
                .expect("forward");
                op.check(&stream).expect("no peer failure");
                let what = format!("cuda rank {rank} {} {ran}", fixture.problem);
                let out = out.download(&stream).expect("download");
                let residual_out = residual_out.download(&stream).expect("download");
                assert_all_written(&what, &out);
                assert_all_written(&what, &residual_out);
                reference.assert_residual_out_exact(&what, &residual_out);
                reference.assert_out_within(&what, &out, 1);
                match &first_out {
                    None => first_out = Some(out),
                    Some(first) => {
                        assert!(
                            first.iter().zip(&out).all(|(a, b)| a.to_bits_u32() == b.to_bits_u32()),
                            "{what}: out differs by path"
                        )
                    }
                }
            }
        }
    });
    println!("cuda operator: world {world} {} {} shapes x 4 paths: exact", T::DTYPE, shapes.len());
}

#[test]
fn operator_on_cuda_every_path_matches_the_reference() {
    if !gpu_available("operator_on_cuda_every_path_matches_the_reference") {
        return;
    }
    let seed = TestSeed::new("cuda::operator_on_cuda");
    let shapes = [(1, 4096), (4, 2880), (16, 8192), (81, 5120), (128, 16384), (8192, 4096)];
    for world in [2, 4, 8] {
        check::<bf16>(world, &shapes, &seed);
        check::<f16>(world, &shapes[..4], &seed);
    }
}

/// A forward captured once into a CUDA graph and replayed many times, with new inputs written
/// into the same buffers before each replay: every replay is exact. The kernels take their epoch
/// from device memory, so replays do not reuse a barrier value or a staging half.
#[test]
fn one_captured_graph_replayed_many_times_stays_exact() {
    if !gpu_available("one_captured_graph_replayed_many_times_stays_exact") {
        return;
    }
    const REPLAYS: usize = 20;
    let seed = TestSeed::new("cuda::graph_replays");
    let world = 2;
    for (rows, hidden) in [(4, 4096), (32, 4096)] {
        let cases: Vec<(Fixture<bf16>, Reference<bf16>)> = (0..REPLAYS)
            .map(|i| {
                let problem = Problem::new(world, rows, hidden, bf16::DTYPE)
                    .with_seed(seed.derive(i as u64 * 1000 + rows as u64));
                let fixture = Fixture::generate(&problem);
                let reference = Reference::compute(&fixture);
                (fixture, reference)
            })
            .collect();
        let slots: Vec<Mutex<Option<ThreadRendezvous>>> =
            ThreadRendezvous::group(world, Duration::from_secs(60)).into_iter().map(|r| Mutex::new(Some(r))).collect();
        let phase = std::sync::Barrier::new(world);
        let config = Config { deadline: Duration::from_secs(10), ..Config::default() };
        let paths = run_threads(world, |rank| {
            let mut rendezvous = slots[rank].lock().expect("slot").take().expect("rendezvous");
            let device = Cuda::open_device(0, world).expect("device");
            let stream = Cuda::create_stream(&device).expect("stream");
            let mut op = AllReduceRmsNorm::<Cuda>::new(&device, &mut rendezvous, config).expect("operator");
            let first = &cases[0].0;
            let mut input = CudaBuffer::from_slice(&stream, &first.inputs[rank]).expect("input");
            let mut residual = CudaBuffer::from_slice(&stream, &first.residual).expect("residual");
            let mut weight = CudaBuffer::from_slice(&stream, &first.weight).expect("weight");
            let mut poisoned = vec![bf16::from_f32(0.0); first.residual.len()];
            poison(&mut poisoned);
            let mut out = CudaBuffer::from_slice(&stream, &poisoned).expect("out");
            let mut residual_out = CudaBuffer::from_slice(&stream, &poisoned).expect("residual_out");
            stream.begin_capture().expect("begin capture");
            let path = op
                .forward(
                    &stream,
                    Args {
                        input: TensorRef::new(&input),
                        residual: TensorRef::new(&residual),
                        weight: TensorRef::new(&weight),
                        out: TensorMut::new(&mut out),
                        residual_out: TensorMut::new(&mut residual_out),
                        eps: first.problem.eps,
                    },
                )
                .expect("captured forward");
            let graph = stream.end_capture().expect("end capture");
            phase.wait();
            for (i, (fixture, reference)) in cases.iter().enumerate() {
                input.upload(&stream, &fixture.inputs[rank]).expect("input");
                residual.upload(&stream, &fixture.residual).expect("residual");
                weight.upload(&stream, &fixture.weight).expect("weight");
                out.upload(&stream, &poisoned).expect("poison");
                residual_out.upload(&stream, &poisoned).expect("poison");
                // SAFETY: the graph's tensors are the buffers above, alive until the end of this closure.
                unsafe { graph.launch(&stream) }.expect("replay");
                op.check(&stream).expect("no peer failure");
                let what = format!("rank {rank} replay {i} of {path} {rows}x{hidden}");
                let got_out = out.download(&stream).expect("download");
                let got_residual_out = residual_out.download(&stream).expect("download");
                assert_all_written(&what, &got_out);
                reference.assert_residual_out_exact(&what, &got_residual_out);
                reference.assert_out_within(&what, &got_out, 1);
            }
            phase.wait();
            path
        });
        println!("cuda graph: {rows}x{hidden} bf16 world {world} on {}: one capture, {REPLAYS} replays with new inputs, exact", paths[0]);
    }
}

/// Entries of `/proc/self/fd`.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Operators created and dropped by two rank processes over real CUDA IPC leak nothing: open file
/// descriptors and free device memory are the same after `CYCLES` more create/call/drop cycles as
/// after the first (which pays for the context and the kernels). Each cycle maps the peer's buffer
/// with `cuIpcOpenMemHandle` and must unmap it on drop.
#[test]
fn operators_over_ipc_created_and_dropped_leak_no_fd_and_no_device_memory() {
    const CYCLES: usize = 100;
    if let Some(me) = child() {
        use std::os::unix::fs::PermissionsExt;
        let device = Cuda::open_device(0, me.world_size).expect("device");
        let stream = Cuda::create_stream(&device).expect("stream");
        let seed = TestSeed::new("cuda::ipc_leaks");
        let fixture =
            Fixture::<bf16>::generate(&Problem::new(me.world_size, 4, 4096, bf16::DTYPE).with_seed(seed.seed()));
        let reference = Reference::compute(&fixture);
        let mut config = Config { deadline: Duration::from_secs(20), ..Config::default() };
        config.policy.max_size = 8 << 20;
        let cycle = |n: usize| {
            let dir = me.dir.join(format!("cycle-{n}"));
            std::fs::create_dir_all(&dir).expect("cycle dir");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("0700");
            let mut rendezvous =
                UnixRendezvous::connect(&dir, me.rank, me.world_size, Duration::from_secs(60)).expect("rendezvous");
            let mut op = AllReduceRmsNorm::<Cuda>::new(&device, &mut rendezvous, config).expect("operator");
            let input = CudaBuffer::from_slice(&stream, &fixture.inputs[me.rank]).expect("input");
            let residual = CudaBuffer::from_slice(&stream, &fixture.residual).expect("residual");
            let weight = CudaBuffer::from_slice(&stream, &fixture.weight).expect("weight");
            let mut poisoned = vec![bf16::ZERO; fixture.residual.len()];
            poison(&mut poisoned);
            let mut out = CudaBuffer::from_slice(&stream, &poisoned).expect("out");
            let mut residual_out = CudaBuffer::from_slice(&stream, &poisoned).expect("residual_out");
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
        };
        cycle(0);
        let before = (open_fds(), device.memory_info().expect("memory info").0);
        for n in 1..=CYCLES {
            cycle(n);
        }
        let after = (open_fds(), device.memory_info().expect("memory info").0);
        eprintln!("ipc leaks: rank {} {CYCLES} cycles; (fds, free device bytes) {before:?} -> {after:?}", me.rank);
        assert_eq!(before, after, "(open fds, free device memory) changed over {CYCLES} create/drop cycles");
        return;
    }
    if !gpu_available("operators_over_ipc_created_and_dropped_leak_no_fd_and_no_device_memory") {
        return;
    }
    let outcomes = run_processes(
        &test_path!(operators_over_ipc_created_and_dropped_leak_no_fd_and_no_device_memory),
        2,
        Duration::from_secs(400),
    )
    .expect("process harness");
    assert_ranks_succeeded(&outcomes);
    for outcome in &outcomes {
        for line in outcome.stderr.lines().filter(|l| l.starts_with("ipc leaks:")) {
            println!("{line}");
        }
    }
}

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
    assert_all_written, assert_ranks_succeeded, child, poison, run_processes, run_threads_each, test_path, Fixture,
    Problem, Reference, TestSeed,
};
use half::{bf16, f16};
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
    let mut config = Config { deadline: Duration::from_secs(10), ..Config::default() };
    // Push slots large enough to force the 1-stage path on every case.
    config.policy.push_slot_bytes = cases.iter().map(|(f, _)| f.residual.len() * T::DTYPE.size()).max().unwrap_or(16);
    // Ranks allocate and free device memory only while no kernel spins (a free can wait for the
    // device to go idle): every case starts and ends at this barrier.
    let phase = std::sync::Barrier::new(world);
    run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
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
        let phase = std::sync::Barrier::new(world);
        let config = Config { deadline: Duration::from_secs(10), ..Config::default() };
        let paths =
            run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
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
            drop((op, input, residual, weight, out, residual_out));
            // The free memory is the device's, so measure only once every rank has freed.
            rendezvous.all_gather(&[]).expect("every rank freed");
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

/// One call of the in-place graph tests: its shape, the path forced, and where its input starts
/// inside its allocation (bytes).
#[derive(Clone, Copy, Debug)]
struct GraphCase {
    rows: usize,
    hidden: usize,
    path: Option<Path>,
    input_offset: usize,
}

/// 1-stage, 2-stage, the unfused custom path, and the dispatcher's choice on an input that starts
/// 4 KiB into its allocation (the registered address is base + offset on every peer).
const GRAPH_CASES: [GraphCase; 4] = [
    GraphCase { rows: 1, hidden: 4096, path: Some(Path::OneStage), input_offset: 0 },
    GraphCase { rows: 32, hidden: 8192, path: Some(Path::TwoStage), input_offset: 0 },
    GraphCase { rows: 16, hidden: 2880, path: Some(UNFUSED), input_offset: 0 },
    GraphCase { rows: 64, hidden: 5120, path: None, input_offset: 4096 },
];

/// One rank's tensors of one [`GraphCase`].
struct GraphTensors {
    case: GraphCase,
    /// The allocation holding the input at `case.input_offset`.
    input: CudaBuffer<bf16>,
    residual: CudaBuffer<bf16>,
    weight: CudaBuffer<bf16>,
    out: CudaBuffer<bf16>,
    residual_out: CudaBuffer<bf16>,
}

impl GraphTensors {
    fn new(stream: &arfuse_kernels::cuda::CudaStream, case: GraphCase) -> Self {
        let device = stream.device();
        let elems = case.rows * case.hidden;
        let pad = case.input_offset / std::mem::size_of::<bf16>();
        let zeros = |len| CudaBuffer::<bf16>::zeros(device, len).expect("alloc");
        GraphTensors {
            case,
            input: zeros(pad + elems),
            residual: zeros(elems),
            weight: zeros(case.hidden),
            out: zeros(elems),
            residual_out: zeros(elems),
        }
    }

    /// Writes this rank's share of `fixture` and poisons the outputs.
    fn load(&mut self, stream: &arfuse_kernels::cuda::CudaStream, fixture: &Fixture<bf16>, rank: usize) {
        let pad = self.case.input_offset / std::mem::size_of::<bf16>();
        let mut input = vec![bf16::from_f32(7.0); pad];
        input.extend_from_slice(&fixture.inputs[rank]);
        self.input.upload(stream, &input).expect("input");
        self.residual.upload(stream, &fixture.residual).expect("residual");
        self.weight.upload(stream, &fixture.weight).expect("weight");
        let mut poisoned = vec![bf16::ZERO; fixture.residual.len()];
        poison(&mut poisoned);
        self.out.upload(stream, &poisoned).expect("poison out");
        self.residual_out.upload(stream, &poisoned).expect("poison residual_out");
    }

    /// Enqueues the case's call (captured or eager).
    fn forward(
        &mut self,
        op: &mut AllReduceRmsNorm<Cuda>,
        stream: &arfuse_kernels::cuda::CudaStream,
        eps: f32,
    ) -> arfuse_fusion::Result<Path> {
        let elems = self.case.rows * self.case.hidden;
        let at = self.input.device_ptr().add(self.case.input_offset);
        // SAFETY: `at` is followed by `elems` elements of the input allocation, which lives (and is
        // only written between calls) as long as `self`.
        let input = unsafe { TensorRef::from_raw(at, elems) };
        let args = Args {
            input,
            residual: TensorRef::new(&self.residual),
            weight: TensorRef::new(&self.weight),
            out: TensorMut::new(&mut self.out),
            residual_out: TensorMut::new(&mut self.residual_out),
            eps,
        };
        match self.case.path {
            Some(path) => op.forward_on(stream, path, args),
            None => op.forward(stream, args),
        }
    }
}

/// The fixtures of replay `replay` of every case.
fn graph_fixtures(world: usize, replays: usize, seed: &TestSeed) -> Vec<Vec<(Fixture<bf16>, Reference<bf16>)>> {
    (0..replays)
        .map(|replay| {
            GRAPH_CASES
                .iter()
                .enumerate()
                .map(|(i, case)| {
                    let problem = Problem::new(world, case.rows, case.hidden, bf16::DTYPE)
                        .with_seed(seed.derive((replay * 100 + i) as u64));
                    let fixture = Fixture::generate(&problem);
                    let reference = Reference::compute(&fixture);
                    (fixture, reference)
                })
                .collect()
        })
        .collect()
}

/// One rank of the in-place graph tests: captures every case into one graph with the inputs
/// registered after capture, replays it once per fixture set with new data written into the same
/// tensors (every output exact), then runs the last set eagerly (staging copy) and requires the
/// same bits. Only the reduce-scatters read in place (1-stage calls push). Ranks meet through `rendezvous` wherever memory is allocated or freed, so that no kernel
/// spins then. Returns the paths taken.
fn graph_in_place_rank(
    rank: usize,
    world: usize,
    rendezvous: &mut dyn Rendezvous,
    fixtures: &[Vec<(Fixture<bf16>, Reference<bf16>)>],
) -> Vec<Path> {
    let meet = |rendezvous: &mut dyn Rendezvous| {
        rendezvous.all_gather(&[]).expect("meeting of the ranks");
    };
    let device = Cuda::open_device(0, world).expect("device");
    let stream = Cuda::create_stream(&device).expect("stream");
    let config = Config { deadline: Duration::from_secs(10), ..Config::default() };
    let mut op = AllReduceRmsNorm::<Cuda>::new(&device, rendezvous, config).expect("operator");
    let mut tensors: Vec<GraphTensors> = GRAPH_CASES.iter().map(|&case| GraphTensors::new(&stream, case)).collect();
    let eps = fixtures[0][0].0.problem.eps;
    op.begin_graph_capture().expect("begin graph capture");
    stream.begin_capture().expect("begin capture");
    let paths: Vec<Path> =
        tensors.iter_mut().map(|t| t.forward(&mut op, &stream, eps).expect("captured forward")).collect();
    let graph = stream.end_capture().expect("end capture");
    let registered = op.register_graph_inputs(&stream, rendezvous).expect("register graph inputs");
    // One reduce-scatter per 2-stage call; the 1-stage launches (the unfused case's all-reduce
    // too, 16 x 2880 being below every 1-stage threshold) push and register nothing.
    let expected = paths.iter().filter(|&&p| p == Path::TwoStage).count();
    assert!(expected >= 1, "a 2-stage case in {paths:?}");
    assert_eq!(registered, expected, "launches reading in place: the reduce-scatters of {paths:?}");
    meet(rendezvous);
    let mut last = Vec::new();
    for (replay, set) in fixtures.iter().enumerate() {
        for (t, (fixture, _)) in tensors.iter_mut().zip(set) {
            t.load(&stream, fixture, rank);
        }
        // SAFETY: the graph's tensors are `tensors`, alive until the end of this function.
        unsafe { graph.launch(&stream) }.expect("replay");
        op.check(&stream).expect("no peer failure");
        last.clear();
        for ((t, (fixture, reference)), path) in tensors.iter().zip(set).zip(&paths) {
            let what = format!("rank {rank} replay {replay} {} in place on {path}", fixture.problem);
            let out = t.out.download(&stream).expect("download");
            let residual_out = t.residual_out.download(&stream).expect("download");
            assert_all_written(&what, &out);
            assert_all_written(&what, &residual_out);
            reference.assert_residual_out_exact(&what, &residual_out);
            reference.assert_out_within(&what, &out, 1);
            last.push((out, residual_out));
        }
    }
    // The same calls eagerly, through the staging buffer: the same bits.
    let set = fixtures.last().expect("fixtures");
    for ((t, (fixture, _)), (replayed_out, replayed_residual_out)) in tensors.iter_mut().zip(set).zip(&last) {
        t.load(&stream, fixture, rank);
        t.forward(&mut op, &stream, eps).expect("eager forward");
        op.check(&stream).expect("no peer failure");
        let same = |a: &[bf16], b: &[bf16]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        let what = format!("rank {rank} {}", fixture.problem);
        assert!(same(&t.out.download(&stream).expect("download"), replayed_out), "{what}: eager out != graph out");
        assert!(
            same(&t.residual_out.download(&stream).expect("download"), replayed_residual_out),
            "{what}: eager residual_out != graph residual_out"
        );
    }
    meet(rendezvous);
    drop(graph);
    drop(tensors);
    meet(rendezvous);
    paths
}

/// Issue 3's graph mode: the calls of a captured graph read the users' tensors in place (inputs
/// registered after capture, no staging copy), ranks as threads (peer pointers).
#[test]
fn graph_inputs_registered_after_capture_are_read_in_place() {
    if !gpu_available("graph_inputs_registered_after_capture_are_read_in_place") {
        return;
    }
    const REPLAYS: usize = 8;
    let seed = TestSeed::new("cuda::graph_in_place");
    for world in [2, 4] {
        let fixtures = graph_fixtures(world, REPLAYS, &seed);
        let paths =
            run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
                graph_in_place_rank(rank, world, &mut rendezvous, &fixtures)
            });
        let paths: Vec<String> = paths[0].iter().map(|p| p.to_string()).collect();
        println!(
            "cuda graph, 2-stage inputs in place, 1-stage pushed: world {world}, {} calls [{}], {REPLAYS} replays with new inputs: exact, eager gives the same bits",
            GRAPH_CASES.len(),
            paths.join(", ")
        );
    }
}

/// The same over real CUDA IPC: two rank processes, each registering its own allocations, which
/// the other maps with `cuIpcOpenMemHandle`.
#[test]
fn graph_inputs_registered_after_capture_over_ipc() {
    const REPLAYS: usize = 4;
    let seed = TestSeed::new("cuda::graph_in_place_ipc");
    if let Some(me) = child() {
        let fixtures = graph_fixtures(me.world_size, REPLAYS, &seed);
        let mut rendezvous =
            UnixRendezvous::connect(&me.dir, me.rank, me.world_size, Duration::from_secs(60)).expect("rendezvous");
        let paths = graph_in_place_rank(me.rank, me.world_size, &mut rendezvous, &fixtures);
        eprintln!("graph in place over ipc: rank {} paths {paths:?}: exact", me.rank);
        return;
    }
    if !gpu_available("graph_inputs_registered_after_capture_over_ipc") {
        return;
    }
    let outcomes =
        run_processes(&test_path!(graph_inputs_registered_after_capture_over_ipc), 2, Duration::from_secs(300))
            .expect("process harness");
    assert_ranks_succeeded(&outcomes);
    for outcome in &outcomes {
        for line in outcome.stderr.lines().filter(|l| l.starts_with("graph in place")) {
            println!("{line}");
        }
    }
}

/// A graph recorded for in-place inputs but replayed before `register_graph_inputs` reads nothing:
/// every rank's kernel finds its table empty and stops before any barrier, and `check` reports
/// `NotRegistered` (no hang, no wrong data: the outputs keep their poison).
#[test]
fn graph_replayed_before_registration_fails_cleanly() {
    if !gpu_available("graph_replayed_before_registration_fails_cleanly") {
        return;
    }
    let world = 2;
    let seed = TestSeed::new("cuda::graph_unregistered");
    let fixtures = graph_fixtures(world, 1, &seed);
    let phase = std::sync::Barrier::new(world);
    run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
        let device = Cuda::open_device(0, world).expect("device");
        let stream = Cuda::create_stream(&device).expect("stream");
        let config = Config { deadline: Duration::from_secs(10), ..Config::default() };
        let mut op = AllReduceRmsNorm::<Cuda>::new(&device, &mut rendezvous, config).expect("operator");
        // The 2-stage case: its reduce-scatter reads in place (a 1-stage call needs no registration).
        let (fixture, _) = &fixtures[0][1];
        let mut t = GraphTensors::new(&stream, GRAPH_CASES[1]);
        t.load(&stream, fixture, rank);
        op.begin_graph_capture().expect("begin graph capture");
        assert!(matches!(op.begin_graph_capture(), Err(arfuse_fusion::Error::GraphCapture(_))), "begun twice");
        stream.begin_capture().expect("begin capture");
        t.forward(&mut op, &stream, fixture.problem.eps).expect("captured forward");
        let graph = stream.end_capture().expect("end capture");
        phase.wait();
        let start = std::time::Instant::now();
        // SAFETY: the graph's tensors are `t`'s, alive until the end of this closure.
        unsafe { graph.launch(&stream) }.expect("replay");
        let err = op.check(&stream).expect_err("replay before registration must fail");
        assert!(matches!(err, arfuse_fusion::Error::NotRegistered { .. }), "rank {rank}: {err}");
        assert!(start.elapsed() < Duration::from_secs(5), "rank {rank}: took {:?}", start.elapsed());
        let out = t.out.download(&stream).expect("download");
        let mut poisoned = vec![bf16::ZERO; out.len()];
        poison(&mut poisoned);
        assert!(out.iter().zip(&poisoned).all(|(a, b)| a.to_bits() == b.to_bits()), "rank {rank}: out was written");
        phase.wait();
        drop(graph);
        println!("rank {rank}: {err}");
    });
}

/// How the faulty rank of [`a_dead_rank_process_makes_its_peer_time_out_not_hang`] dies.
const KILL_SCENARIOS: [&str; 2] = ["sigkill-between-calls", "abort-between-stages"];

/// A rank process that dies on the GPU — SIGKILLed between two calls, or aborting between the two
/// stages of a 2-stage call (its reduce-scatter enqueued, perhaps running) — makes the survivor's
/// kernel give up at its deadline: `check` reports `PeerTimeout` naming the dead rank within the
/// deadline plus a margin, no call returns wrong data, and the survivor drops its operator and
/// exits cleanly. Two processes on one GPU over real CUDA IPC.
#[test]
fn a_dead_rank_process_makes_its_peer_time_out_not_hang() {
    use arfuse_testkit::{run_processes_with, ProcessOptions};
    use std::os::unix::process::ExitStatusExt;
    const DEADLINE: Duration = Duration::from_secs(2);
    const MARGIN: Duration = Duration::from_secs(5);
    const GOOD_CALLS: usize = 3;
    if let Some(me) = child() {
        let scenario = std::env::var("ARFUSE_TEST_KILL").expect("scenario");
        let device = Cuda::open_device(0, me.world_size).expect("device");
        let stream = Cuda::create_stream(&device).expect("stream");
        let seed = TestSeed::new("cuda::dead_rank");
        let fixture =
            Fixture::<bf16>::generate(&Problem::new(me.world_size, 8, 4096, bf16::DTYPE).with_seed(seed.seed()));
        let reference = Reference::compute(&fixture);
        let mut config = Config { deadline: DEADLINE, ..Config::default() };
        if me.rank == 1 && scenario == "abort-between-stages" {
            config.fault = Some(arfuse_fusion::Fault::AbortBetweenStages);
        }
        let mut rendezvous =
            UnixRendezvous::connect(&me.dir, me.rank, me.world_size, Duration::from_secs(60)).expect("rendezvous");
        let mut op = AllReduceRmsNorm::<Cuda>::new(&device, &mut rendezvous, config).expect("operator");
        let input = CudaBuffer::from_slice(&stream, &fixture.inputs[me.rank]).expect("input");
        let residual = CudaBuffer::from_slice(&stream, &fixture.residual).expect("residual");
        let weight = CudaBuffer::from_slice(&stream, &fixture.weight).expect("weight");
        let mut poisoned = vec![bf16::ZERO; fixture.residual.len()];
        poison(&mut poisoned);
        let mut out = CudaBuffer::from_slice(&stream, &poisoned).expect("out");
        let mut residual_out = CudaBuffer::from_slice(&stream, &poisoned).expect("residual_out");
        // Good calls on 1-stage; the calls that meet the fault on 2-stage.
        let mut call = |op: &mut AllReduceRmsNorm<Cuda>, path: Path| -> arfuse_fusion::Result<Vec<bf16>> {
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
    if !gpu_available("a_dead_rank_process_makes_its_peer_time_out_not_hang") {
        return;
    }
    for scenario in KILL_SCENARIOS {
        let options = ProcessOptions::new(2, Duration::from_secs(120)).env("ARFUSE_TEST_KILL", scenario);
        let outcomes = run_processes_with(&test_path!(a_dead_rank_process_makes_its_peer_time_out_not_hang), &options)
            .expect("process harness");
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

/// A registration larger than one rendezvous round (64 KiB of handles per rank): 700 captured
/// 2-stage calls in one graph register in two rounds, and the replay is exact.
#[test]
fn many_graph_inputs_register_in_several_rounds() {
    if !gpu_available("many_graph_inputs_register_in_several_rounds") {
        return;
    }
    const CALLS: usize = 700;
    let world = 2;
    let seed = TestSeed::new("cuda::graph_rounds");
    let fixture = Fixture::<bf16>::generate(&Problem::new(world, 4, 4096, bf16::DTYPE).with_seed(seed.seed()));
    let reference = Reference::compute(&fixture);
    run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
        let device = Cuda::open_device(0, world).expect("device");
        let stream = Cuda::create_stream(&device).expect("stream");
        let config = Config { deadline: Duration::from_secs(10), ..Config::default() };
        let mut op = AllReduceRmsNorm::<Cuda>::new(&device, &mut rendezvous, config).expect("operator");
        let case = GraphCase { rows: 4, hidden: 4096, path: Some(Path::TwoStage), input_offset: 0 };
        let mut t = GraphTensors::new(&stream, case);
        t.load(&stream, &fixture, rank);
        op.begin_graph_capture().expect("begin graph capture");
        stream.begin_capture().expect("begin capture");
        for _ in 0..CALLS {
            t.forward(&mut op, &stream, fixture.problem.eps).expect("captured forward");
        }
        let graph = stream.end_capture().expect("end capture");
        let registered = op.register_graph_inputs(&stream, &mut rendezvous).expect("register");
        assert_eq!(registered, CALLS);
        rendezvous.all_gather(&[]).expect("meet");
        // SAFETY: the graph's tensors are `t`'s, alive until the end of this closure.
        unsafe { graph.launch(&stream) }.expect("replay");
        op.check(&stream).expect("no peer failure");
        let what = format!("rank {rank} after {CALLS} captured calls");
        let got = t.residual_out.download(&stream).expect("download");
        assert_all_written(&what, &got);
        reference.assert_residual_out_exact(&what, &got);
        reference.assert_out_within(&what, &t.out.download(&stream).expect("download"), 1);
        rendezvous.all_gather(&[]).expect("meet");
        drop(graph);
    });
    println!("cuda graph: {CALLS} captured 2-stage calls registered in two rounds, replay exact");
}

//! The operator inside captured graphs: one capture replayed many times with new inputs, graph
//! inputs registered after capture and read in place (ranks as threads and over IPC), a replay
//! before registration, a registration of several rendezvous rounds.

use crate::{gpu_available, UNFUSED};
use arfuse_fusion::{AllReduceRmsNorm, Args, Config, Path, TensorMut, TensorRef};
use arfuse_ipc::{Rendezvous, ThreadRendezvous, UnixRendezvous};
use arfuse_kernels::gpu::DeviceBuffer;
use arfuse_kernels::{Element, GpuBackend};
use arfuse_testkit::{
    assert_all_written, assert_ranks_succeeded, child, poisoned, run_processes, run_threads_each, Fixture, Problem,
    Reference, TestSeed,
};
use half::bf16;
use std::time::Duration;

/// A forward captured once into a graph and replayed many times, with new inputs written into the
/// same buffers before each replay: every replay is exact. The kernels take their epoch from
/// device memory, so replays do not reuse a barrier value or a staging half.
pub(crate) fn one_captured_graph_replayed_many_times_stays_exact<B: GpuBackend>(test: &str) {
    if !gpu_available::<B>(test) {
        return;
    }
    const REPLAYS: usize = 20;
    let seed = TestSeed::new(&format!("{}::graph_replays", B::KIND));
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
        let config = Config::default().with_deadline(Duration::from_secs(10));
        let paths =
            run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
                let device = B::open_device(0, world).expect("device");
                let stream = B::create_stream(&device).expect("stream");
                let mut op = AllReduceRmsNorm::<B>::new(&device, &mut rendezvous, config).expect("operator");
                let first = &cases[0].0;
                let mut input = DeviceBuffer::<B, _>::from_slice(&stream, &first.inputs[rank]).expect("input");
                let mut residual = DeviceBuffer::<B, _>::from_slice(&stream, &first.residual).expect("residual");
                let mut weight = DeviceBuffer::<B, _>::from_slice(&stream, &first.weight).expect("weight");
                let poisoned = poisoned::<bf16>(first.residual.len());
                let mut out = DeviceBuffer::<B, _>::from_slice(&stream, &poisoned).expect("out");
                let mut residual_out = DeviceBuffer::<B, _>::from_slice(&stream, &poisoned).expect("residual_out");
                B::begin_capture(&stream).expect("begin capture");
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
                let graph = B::end_capture(&stream).expect("end capture");
                phase.wait();
                for (i, (fixture, reference)) in cases.iter().enumerate() {
                    input.upload(&stream, &fixture.inputs[rank]).expect("input");
                    residual.upload(&stream, &fixture.residual).expect("residual");
                    weight.upload(&stream, &fixture.weight).expect("weight");
                    out.upload(&stream, &poisoned).expect("poison");
                    residual_out.upload(&stream, &poisoned).expect("poison");
                    // SAFETY: the graph's tensors are the buffers above, alive until the end of this closure.
                    unsafe { B::replay(&graph, &stream) }.expect("replay");
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
        println!(
            "{} graph: {rows}x{hidden} bf16 world {world} on {}: one capture, {REPLAYS} replays with new inputs, exact",
            B::KIND,
            paths[0]
        );
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
struct GraphTensors<B: GpuBackend> {
    case: GraphCase,
    /// The allocation holding the input at `case.input_offset`.
    input: DeviceBuffer<B, bf16>,
    residual: DeviceBuffer<B, bf16>,
    weight: DeviceBuffer<B, bf16>,
    out: DeviceBuffer<B, bf16>,
    residual_out: DeviceBuffer<B, bf16>,
}

impl<B: GpuBackend> GraphTensors<B> {
    fn new(stream: &B::Stream, case: GraphCase) -> Self {
        let device = B::stream_device(stream);
        let elems = case.rows * case.hidden;
        let pad = case.input_offset / std::mem::size_of::<bf16>();
        let zeros = |len| DeviceBuffer::<B, bf16>::zeros(device, len).expect("alloc");
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
    fn load(&mut self, stream: &B::Stream, fixture: &Fixture<bf16>, rank: usize) {
        let pad = self.case.input_offset / std::mem::size_of::<bf16>();
        let mut input = vec![bf16::from_f32(7.0); pad];
        input.extend_from_slice(&fixture.inputs[rank]);
        self.input.upload(stream, &input).expect("input");
        self.residual.upload(stream, &fixture.residual).expect("residual");
        self.weight.upload(stream, &fixture.weight).expect("weight");
        let poisoned = poisoned::<bf16>(fixture.residual.len());
        self.out.upload(stream, &poisoned).expect("poison out");
        self.residual_out.upload(stream, &poisoned).expect("poison residual_out");
    }

    /// Enqueues the case's call (captured or eager).
    fn forward(&mut self, op: &mut AllReduceRmsNorm<B>, stream: &B::Stream, eps: f32) -> arfuse_fusion::Result<Path> {
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
/// same bits. Only the reduce-scatters read in place (1-stage calls push). Ranks meet through
/// `rendezvous` wherever memory is allocated or freed, so that no kernel spins then. Returns the
/// paths taken.
fn graph_in_place_rank<B: GpuBackend>(
    rank: usize,
    world: usize,
    rendezvous: &mut dyn Rendezvous,
    fixtures: &[Vec<(Fixture<bf16>, Reference<bf16>)>],
) -> Vec<Path> {
    let meet = |rendezvous: &mut dyn Rendezvous| {
        rendezvous.all_gather(&[]).expect("meeting of the ranks");
    };
    let device = B::open_device(0, world).expect("device");
    let stream = B::create_stream(&device).expect("stream");
    let config = Config::default().with_deadline(Duration::from_secs(10));
    let mut op = AllReduceRmsNorm::<B>::new(&device, rendezvous, config).expect("operator");
    let mut tensors: Vec<GraphTensors<B>> = GRAPH_CASES.iter().map(|&case| GraphTensors::new(&stream, case)).collect();
    let eps = fixtures[0][0].0.problem.eps;
    op.begin_graph_capture().expect("begin graph capture");
    B::begin_capture(&stream).expect("begin capture");
    let paths: Vec<Path> =
        tensors.iter_mut().map(|t| t.forward(&mut op, &stream, eps).expect("captured forward")).collect();
    let graph = B::end_capture(&stream).expect("end capture");
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
        unsafe { B::replay(&graph, &stream) }.expect("replay");
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
pub(crate) fn graph_inputs_registered_after_capture_are_read_in_place<B: GpuBackend>(test: &str) {
    if !gpu_available::<B>(test) {
        return;
    }
    const REPLAYS: usize = 8;
    let seed = TestSeed::new(&format!("{}::graph_in_place", B::KIND));
    for world in [2, 4] {
        let fixtures = graph_fixtures(world, REPLAYS, &seed);
        let paths =
            run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
                graph_in_place_rank::<B>(rank, world, &mut rendezvous, &fixtures)
            });
        let paths: Vec<String> = paths[0].iter().map(|p| p.to_string()).collect();
        println!(
            "{} graph, 2-stage inputs in place, 1-stage pushed: world {world}, {} calls [{}], {REPLAYS} replays with new inputs: exact, eager gives the same bits",
            B::KIND,
            GRAPH_CASES.len(),
            paths.join(", ")
        );
    }
}

/// The same over real IPC: two rank processes, each registering its own allocations, which the
/// other maps with the runtime's IPC (`cuIpcOpenMemHandle`, `hipIpcOpenMemHandle`).
pub(crate) fn graph_inputs_registered_after_capture_over_ipc<B: GpuBackend>(test: &str) {
    const REPLAYS: usize = 4;
    let seed = TestSeed::new(&format!("{}::graph_in_place_ipc", B::KIND));
    if let Some(me) = child() {
        let fixtures = graph_fixtures(me.world_size, REPLAYS, &seed);
        let mut rendezvous =
            UnixRendezvous::connect(&me.dir, me.rank, me.world_size, Duration::from_secs(60)).expect("rendezvous");
        let paths = graph_in_place_rank::<B>(me.rank, me.world_size, &mut rendezvous, &fixtures);
        eprintln!("graph in place over ipc: rank {} paths {paths:?}: exact", me.rank);
        return;
    }
    if !gpu_available::<B>(test) {
        return;
    }
    let outcomes = run_processes(test, 2, Duration::from_secs(300)).expect("process harness");
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
pub(crate) fn graph_replayed_before_registration_fails_cleanly<B: GpuBackend>(test: &str) {
    if !gpu_available::<B>(test) {
        return;
    }
    let world = 2;
    let seed = TestSeed::new(&format!("{}::graph_unregistered", B::KIND));
    let fixtures = graph_fixtures(world, 1, &seed);
    let phase = std::sync::Barrier::new(world);
    run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
        let device = B::open_device(0, world).expect("device");
        let stream = B::create_stream(&device).expect("stream");
        let config = Config::default().with_deadline(Duration::from_secs(10));
        let mut op = AllReduceRmsNorm::<B>::new(&device, &mut rendezvous, config).expect("operator");
        // The 2-stage case: its reduce-scatter reads in place (a 1-stage call needs no registration).
        let (fixture, _) = &fixtures[0][1];
        let mut t = GraphTensors::<B>::new(&stream, GRAPH_CASES[1]);
        t.load(&stream, fixture, rank);
        op.begin_graph_capture().expect("begin graph capture");
        assert!(matches!(op.begin_graph_capture(), Err(arfuse_fusion::Error::GraphCapture(_))), "begun twice");
        B::begin_capture(&stream).expect("begin capture");
        t.forward(&mut op, &stream, fixture.problem.eps).expect("captured forward");
        let graph = B::end_capture(&stream).expect("end capture");
        phase.wait();
        let start = std::time::Instant::now();
        // SAFETY: the graph's tensors are `t`'s, alive until the end of this closure.
        unsafe { B::replay(&graph, &stream) }.expect("replay");
        let err = op.check(&stream).expect_err("replay before registration must fail");
        assert!(matches!(err, arfuse_fusion::Error::NotRegistered { .. }), "rank {rank}: {err}");
        assert!(start.elapsed() < Duration::from_secs(5), "rank {rank}: took {:?}", start.elapsed());
        let out = t.out.download(&stream).expect("download");
        let poisoned = poisoned::<bf16>(out.len());
        assert!(out.iter().zip(&poisoned).all(|(a, b)| a.to_bits() == b.to_bits()), "rank {rank}: out was written");
        phase.wait();
        drop(graph);
        println!("rank {rank}: {err}");
    });
}

/// A registration larger than one rendezvous round (64 KiB of handles per rank): 700 captured
/// 2-stage calls in one graph register in two rounds, and the replay is exact.
pub(crate) fn many_graph_inputs_register_in_several_rounds<B: GpuBackend>(test: &str) {
    if !gpu_available::<B>(test) {
        return;
    }
    const CALLS: usize = 700;
    let world = 2;
    let seed = TestSeed::new(&format!("{}::graph_rounds", B::KIND));
    let fixture = Fixture::<bf16>::generate(&Problem::new(world, 4, 4096, bf16::DTYPE).with_seed(seed.seed()));
    let reference = Reference::compute(&fixture);
    run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
        let device = B::open_device(0, world).expect("device");
        let stream = B::create_stream(&device).expect("stream");
        let config = Config::default().with_deadline(Duration::from_secs(10));
        let mut op = AllReduceRmsNorm::<B>::new(&device, &mut rendezvous, config).expect("operator");
        let case = GraphCase { rows: 4, hidden: 4096, path: Some(Path::TwoStage), input_offset: 0 };
        let mut t = GraphTensors::<B>::new(&stream, case);
        t.load(&stream, &fixture, rank);
        op.begin_graph_capture().expect("begin graph capture");
        B::begin_capture(&stream).expect("begin capture");
        for _ in 0..CALLS {
            t.forward(&mut op, &stream, fixture.problem.eps).expect("captured forward");
        }
        let graph = B::end_capture(&stream).expect("end capture");
        let registered = op.register_graph_inputs(&stream, &mut rendezvous).expect("register");
        assert_eq!(registered, CALLS);
        rendezvous.all_gather(&[]).expect("meet");
        // SAFETY: the graph's tensors are `t`'s, alive until the end of this closure.
        unsafe { B::replay(&graph, &stream) }.expect("replay");
        op.check(&stream).expect("no peer failure");
        let what = format!("rank {rank} after {CALLS} captured calls");
        let got = t.residual_out.download(&stream).expect("download");
        assert_all_written(&what, &got);
        reference.assert_residual_out_exact(&what, &got);
        reference.assert_out_within(&what, &t.out.download(&stream).expect("download"), 1);
        rendezvous.all_gather(&[]).expect("meet");
        drop(graph);
    });
    println!("{} graph: {CALLS} captured 2-stage calls registered in two rounds, replay exact", B::KIND);
}

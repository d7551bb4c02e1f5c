//! The operator inside captured graphs, with nothing registered (every path pushes its data into
//! its peers' buffers; no kernel reads a peer's tensor): one capture replayed many times with new
//! inputs, graphs of every path (ranks as threads and over IPC), eager calls between replays, a
//! graph of hundreds of 2-stage calls.

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
/// device memory, so replays do not reuse a barrier value or a push rotation.
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

/// One call of the graph tests: its shape, the path forced, and where its input starts inside its
/// allocation (bytes).
#[derive(Clone, Copy, Debug)]
struct GraphCase {
    rows: usize,
    hidden: usize,
    path: Option<Path>,
    input_offset: usize,
}

/// 1-stage, 2-stage, the unfused custom path, and the dispatcher's choice on an input that starts
/// 4 KiB into its allocation (a peer that read it in place would need base + offset).
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

/// One rank of the graph tests: captures every case into one graph with nothing registered,
/// replays it once per fixture set with new data written into the same tensors (every output
/// exact), with an eager call of every case between two replays, then runs the last set eagerly
/// and requires the graph's bits. Ranks meet through `rendezvous` wherever memory is allocated or
/// freed, so that no kernel spins then. Returns the paths taken.
fn graph_rank<B: GpuBackend>(
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
    B::begin_capture(&stream).expect("begin capture");
    let paths: Vec<Path> =
        tensors.iter_mut().map(|t| t.forward(&mut op, &stream, eps).expect("captured forward")).collect();
    let graph = B::end_capture(&stream).expect("end capture");
    assert!(paths.contains(&Path::TwoStage) && paths.contains(&Path::OneStage), "{paths:?}");
    meet(rendezvous);
    let check = |tensors: &[GraphTensors<B>], set: &[(Fixture<bf16>, Reference<bf16>)], how: &str| {
        let mut got = Vec::new();
        for ((t, (fixture, reference)), path) in tensors.iter().zip(set).zip(&paths) {
            let what = format!("rank {rank} {how} {} on {path}", fixture.problem);
            let out = t.out.download(&stream).expect("download");
            let residual_out = t.residual_out.download(&stream).expect("download");
            assert_all_written(&what, &out);
            assert_all_written(&what, &residual_out);
            reference.assert_residual_out_exact(&what, &residual_out);
            reference.assert_out_within(&what, &out, 1);
            got.push((out, residual_out));
        }
        got
    };
    let mut last = Vec::new();
    for (replay, set) in fixtures.iter().enumerate() {
        for (t, (fixture, _)) in tensors.iter_mut().zip(set) {
            t.load(&stream, fixture, rank);
        }
        meet(rendezvous);
        // SAFETY: the graph's tensors are `tensors`, alive until the end of this function.
        unsafe { B::replay(&graph, &stream) }.expect("replay");
        op.check(&stream).expect("no peer failure");
        last = check(&tensors, set, &format!("replay {replay}"));
        if replay == 0 {
            // Eager calls between replays take the next epochs; the replays after them still pair
            // up. Every rank uploads first and the ranks meet: no rank copies (a driver call that
            // may wait for the device) while a peer's kernel spins for it.
            for (t, (fixture, _)) in tensors.iter_mut().zip(set) {
                t.load(&stream, fixture, rank);
            }
            meet(rendezvous);
            for t in tensors.iter_mut() {
                t.forward(&mut op, &stream, eps).expect("eager forward between replays");
            }
            op.check(&stream).expect("no peer failure");
            check(&tensors, set, "eager between replays");
        }
    }
    // The same calls eagerly: the same bits.
    let set = fixtures.last().expect("fixtures");
    for (t, (fixture, _)) in tensors.iter_mut().zip(set) {
        t.load(&stream, fixture, rank);
    }
    meet(rendezvous);
    for t in tensors.iter_mut() {
        t.forward(&mut op, &stream, eps).expect("eager forward");
    }
    op.check(&stream).expect("no peer failure");
    for ((t, (fixture, _)), (replayed_out, replayed_residual_out)) in tensors.iter().zip(set).zip(&last) {
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

/// Graphs of every path (1-stage, 2-stage, unfused, the dispatcher's choice) replay exact with
/// nothing registered, ranks as threads (peer pointers), worlds 2 and 4.
pub(crate) fn graphs_of_every_path_replay_with_nothing_registered<B: GpuBackend>(test: &str) {
    if !gpu_available::<B>(test) {
        return;
    }
    const REPLAYS: usize = 8;
    let seed = TestSeed::new(&format!("{}::graph_every_path", B::KIND));
    for world in [2, 4] {
        let fixtures = graph_fixtures(world, REPLAYS, &seed);
        let paths =
            run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
                graph_rank::<B>(rank, world, &mut rendezvous, &fixtures)
            });
        let paths: Vec<String> = paths[0].iter().map(|p| p.to_string()).collect();
        println!(
            "{} graph, nothing registered: world {world}, {} calls [{}], {REPLAYS} replays with new inputs and eager calls between: exact, eager gives the same bits",
            B::KIND,
            GRAPH_CASES.len(),
            paths.join(", ")
        );
    }
}

/// The same over real IPC: two rank processes, whose graphs push into the buffers each mapped
/// with the runtime's IPC at creation (`cuIpcOpenMemHandle`, `hipIpcOpenMemHandle`), nothing else.
pub(crate) fn graphs_of_every_path_replay_with_nothing_registered_over_ipc<B: GpuBackend>(test: &str) {
    const REPLAYS: usize = 4;
    let seed = TestSeed::new(&format!("{}::graph_every_path_ipc", B::KIND));
    if let Some(me) = child() {
        let fixtures = graph_fixtures(me.world_size, REPLAYS, &seed);
        let mut rendezvous =
            UnixRendezvous::connect(&me.dir, me.rank, me.world_size, Duration::from_secs(60)).expect("rendezvous");
        let paths = graph_rank::<B>(me.rank, me.world_size, &mut rendezvous, &fixtures);
        eprintln!("graph over ipc, nothing registered: rank {} paths {paths:?}: exact", me.rank);
        return;
    }
    if !gpu_available::<B>(test) {
        return;
    }
    let outcomes = run_processes(test, 2, Duration::from_secs(300)).expect("process harness");
    assert_ranks_succeeded(&outcomes);
    for outcome in &outcomes {
        for line in outcome.stderr.lines().filter(|l| l.starts_with("graph over ipc")) {
            println!("{line}");
        }
    }
}

/// 700 captured 2-stage calls in one graph (each of its own epoch, barrier values and reuse of the
/// receive area and scratch), replayed with nothing registered: exact.
pub(crate) fn a_graph_of_many_two_stage_calls_replays_exact<B: GpuBackend>(test: &str) {
    if !gpu_available::<B>(test) {
        return;
    }
    const CALLS: usize = 700;
    let world = 2;
    let seed = TestSeed::new(&format!("{}::graph_many_two_stage", B::KIND));
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
        B::begin_capture(&stream).expect("begin capture");
        for _ in 0..CALLS {
            t.forward(&mut op, &stream, fixture.problem.eps).expect("captured forward");
        }
        let graph = B::end_capture(&stream).expect("end capture");
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
    println!("{} graph: {CALLS} captured 2-stage calls, nothing registered, replay exact", B::KIND);
}

//! The operator the way an engine on cudarc calls it (issue 15, item 2): its tensors are cudarc's
//! `CudaSlice`/`CudaView`/`CudaViewMut` and its stream one it created through cudarc, handed to
//! arfuse with `CudaStream::from_cudarc`; no `unsafe` in any call. Out of place and in place
//! (`Args::in_place`), on the dispatcher's path and forced onto 2-stage and unfused; then a decode
//! step captured by cudarc into a graph on that same stream and replayed with new inputs, and the
//! same call made eagerly on an arfuse stream (joined to the tensors' stream). Every rank does it
//! twice: with cudarc's event tracking on (its default, so the operator orders its work through the
//! slices' events) and off (candle's setting: stream order alone). Seeded inputs, poisoned outputs,
//! `residual_out` bit-exact and `out` within the band of the testkit reference, in place equal to
//! out of place bit for bit, and no error parked on the engine's cudarc context at the end.

use crate::UNFUSED;
use arfuse_fusion::{AllReduceRmsNorm, Args, Config, Path, TensorMut, TensorRef};
use arfuse_ipc::ThreadRendezvous;
use arfuse_kernels::api::Cuda;
use arfuse_kernels::cuda::cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream as EngineStream};
use arfuse_kernels::cuda::{CudaDevice, CudaStream};
use arfuse_kernels::{Backend, Element, StreamOwnership};
use arfuse_testkit::{assert_all_written, poisoned, run_threads_each, Fixture, Problem, Reference, TestSeed};
use half::bf16;
use std::sync::{Arc, Barrier};
use std::time::Duration;

const WORLD: usize = 2;
/// Replays of the captured decode step, each with new inputs.
const REPLAYS: usize = 6;
/// The eager cases: shape and the path forced (`None`: the dispatcher's, 1-stage here).
const EAGER: [(usize, usize, Option<Path>); 3] =
    [(4, 4096, None), (32, 8192, Some(Path::TwoStage)), (16, 2880, Some(UNFUSED))];
/// The captured decode step.
const DECODE: (usize, usize) = (8, 4096);

/// One seeded case and its reference.
fn case(seed: &TestSeed, name: &str, rows: usize, hidden: usize) -> (Fixture<bf16>, Reference<bf16>) {
    let problem = Problem::new(WORLD, rows, hidden, bf16::DTYPE).with_seed(seed.derive_named(name));
    let fixture = Fixture::generate(&problem);
    let reference = Reference::compute(&fixture);
    (fixture, reference)
}

/// Every check of one call's outputs.
fn assert_exact(what: &str, reference: &Reference<bf16>, out: &[bf16], residual_out: &[bf16]) {
    assert_all_written(what, out);
    assert_all_written(what, residual_out);
    reference.assert_residual_out_exact(what, residual_out);
    reference.assert_out_within(what, out, 1);
}

fn same_bits(a: &[bf16], b: &[bf16]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// One rank's tensors of one case, allocated by the engine through cudarc on its stream.
struct EngineTensors {
    input: CudaSlice<bf16>,
    residual: CudaSlice<bf16>,
    weight: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
    residual_out: CudaSlice<bf16>,
}

impl EngineTensors {
    fn new(engine: &Arc<EngineStream>, fixture: &Fixture<bf16>, rank: usize) -> Self {
        let poison = poisoned::<bf16>(fixture.residual.len());
        EngineTensors {
            input: engine.clone_htod(&fixture.inputs[rank]).expect("input"),
            residual: engine.clone_htod(&fixture.residual).expect("residual"),
            weight: engine.clone_htod(&fixture.weight).expect("weight"),
            out: engine.clone_htod(&poison).expect("out"),
            residual_out: engine.clone_htod(&poison).expect("residual_out"),
        }
    }

    /// Writes `fixture`'s data again and poisons the outputs (cudarc copies on the engine's stream).
    fn load(&mut self, engine: &Arc<EngineStream>, fixture: &Fixture<bf16>, rank: usize) {
        let poison = poisoned::<bf16>(fixture.residual.len());
        engine.memcpy_htod(&fixture.inputs[rank], &mut self.input).expect("input");
        engine.memcpy_htod(&fixture.residual, &mut self.residual).expect("residual");
        engine.memcpy_htod(&fixture.weight, &mut self.weight).expect("weight");
        engine.memcpy_htod(&poison, &mut self.out).expect("poison out");
        engine.memcpy_htod(&poison, &mut self.residual_out).expect("poison residual_out");
    }

    /// The out-of-place call on these tensors.
    fn args(&mut self, eps: f32) -> Args<'_, Cuda, bf16> {
        Args {
            input: TensorRef::new(&self.input),
            residual: TensorRef::new(&self.residual),
            weight: TensorRef::new(&self.weight),
            out: TensorMut::new(&mut self.out),
            residual_out: TensorMut::new(&mut self.residual_out),
            eps,
        }
    }

    fn outputs(&self, engine: &Arc<EngineStream>) -> (Vec<bf16>, Vec<bf16>) {
        (engine.clone_dtoh(&self.out).expect("out"), engine.clone_dtoh(&self.residual_out).expect("residual_out"))
    }
}

/// The engine's context and stream, with cudarc's event tracking on or off.
fn engine_stream(tracking: bool) -> (Arc<CudaContext>, Arc<EngineStream>) {
    let ctx = CudaContext::new(0).expect("the engine's cudarc context");
    if !tracking {
        // SAFETY: every slice of this context is used on its one stream (and on an arfuse stream,
        // which the operator joins to it), so nothing needs cudarc's events; tracking is turned
        // off before any slice exists, as candle does.
        unsafe { ctx.disable_event_tracking() };
    }
    let engine = ctx.new_stream().expect("the engine's stream");
    assert_eq!(ctx.is_managing_stream_synchronization(), tracking, "cudarc tracks uses with events iff asked");
    (ctx, engine)
}

/// One rank, one tracking mode.
fn rank_round(
    rank: usize,
    tracking: bool,
    device: &CudaDevice,
    op: &mut AllReduceRmsNorm<Cuda>,
    phase: &Barrier,
    seed: &TestSeed,
) -> Vec<String> {
    let mode = if tracking { "event tracking on" } else { "event tracking off" };
    let mut report = Vec::new();
    // A new context object makes the stream: with tracking on, cudarc synchronises the context
    // then, so no rank's kernel may be spinning (every rank is at this barrier).
    phase.wait();
    let (ctx, engine) = engine_stream(tracking);
    let stream = CudaStream::from_cudarc(device, engine.clone()).expect("the engine's stream, shared");
    assert_eq!(stream.ownership(), StreamOwnership::Shared);
    assert_eq!(stream.cu_stream(), engine.cu_stream());

    // Eager calls, out of place then in place, on the engine's stream.
    let cases: Vec<_> = EAGER
        .iter()
        .map(|&(rows, hidden, path)| (case(seed, &format!("{mode} {rows}x{hidden}"), rows, hidden), path))
        .collect();
    let mut tensors: Vec<EngineTensors> =
        cases.iter().map(|((fixture, _), _)| EngineTensors::new(&engine, fixture, rank)).collect();
    let mut in_place: Vec<(CudaSlice<bf16>, CudaSlice<bf16>)> = cases
        .iter()
        .map(|((fixture, _), _)| {
            (engine.clone_htod(&fixture.inputs[rank]).expect("x"), engine.clone_htod(&fixture.residual).expect("r"))
        })
        .collect();
    engine.synchronize().expect("uploads");
    phase.wait();
    for ((((fixture, reference), path), t), (hidden_states, residual)) in
        cases.iter().zip(&mut tensors).zip(&mut in_place)
    {
        let eps = fixture.problem.eps;
        // Out of place: views for input and out, whole slices for the rest.
        let ran = {
            let input = t.input.as_view();
            let mut out = t.out.as_view_mut();
            let args = Args {
                input: TensorRef::new(&input),
                residual: TensorRef::new(&t.residual),
                weight: TensorRef::new(&t.weight),
                out: TensorMut::new(&mut out),
                residual_out: TensorMut::new(&mut t.residual_out),
                eps,
            };
            match path {
                Some(path) => op.forward_on(&stream, *path, args),
                None => op.forward(&stream, args),
            }
            .expect("forward with cudarc tensors")
        };
        op.check(&stream).expect("no peer failure");
        let what = format!("cuda rank {rank} {mode} {} {ran} out of place", fixture.problem);
        let (out, residual_out) = t.outputs(&engine);
        assert_exact(&what, reference, &out, &residual_out);

        // In place: `out` over the input, `residual_out` over the residual.
        let args = Args::in_place(hidden_states, residual, &t.weight, eps);
        match path {
            Some(path) => op.forward_on(&stream, *path, args),
            None => op.forward(&stream, args),
        }
        .expect("forward in place with cudarc tensors");
        op.check(&stream).expect("no peer failure");
        let what = format!("cuda rank {rank} {mode} {} {ran} in place", fixture.problem);
        let (got_out, got_residual_out) =
            (engine.clone_dtoh(&*hidden_states).expect("out"), engine.clone_dtoh(&*residual).expect("residual_out"));
        assert_exact(&what, reference, &got_out, &got_residual_out);
        assert!(same_bits(&got_out, &out), "{what}: out differs from the call out of place");
        assert!(same_bits(&got_residual_out, &residual_out), "{what}: residual_out differs from out of place");
        report.push(format!("{mode}: {} on {ran}, out of place and in place: exact", fixture.problem));
    }

    // A decode step captured into a graph on the engine's own stream by cudarc, replayed with new
    // inputs written into the same tensors.
    let (rows, hidden) = DECODE;
    let decode: Vec<_> = (0..REPLAYS).map(|i| case(seed, &format!("{mode} decode {i}"), rows, hidden)).collect();
    let mut step = EngineTensors::new(&engine, &decode[0].0, rank);
    engine.synchronize().expect("uploads");
    phase.wait();
    engine.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).expect("begin capture");
    let captured = op.forward(&stream, step.args(decode[0].0.problem.eps));
    let graph = engine.end_capture(sys::CUgraphInstantiate_flags(0)).expect("end capture");
    let path = captured.expect("captured forward");
    let graph = graph.expect("the capture holds the call");
    assert_eq!(path, Path::OneStage, "a decode step is 1-stage: its graph needs nothing registered");
    graph.upload().expect("graph upload");
    phase.wait();
    let mut last = (Vec::new(), Vec::new());
    for (i, (fixture, reference)) in decode.iter().enumerate() {
        step.load(&engine, fixture, rank);
        graph.launch().expect("replay");
        op.check(&stream).expect("no peer failure");
        let what = format!("cuda rank {rank} {mode} decode {} replay {i} of the cudarc graph", fixture.problem);
        last = step.outputs(&engine);
        assert_exact(&what, reference, &last.0, &last.1);
    }
    // The same call eagerly, through the graph's tensors (which re-records their events outside
    // any capture): the same bits.
    let (fixture, reference) = decode.last().expect("decode cases");
    step.load(&engine, fixture, rank);
    op.forward(&stream, step.args(fixture.problem.eps)).expect("eager forward");
    op.check(&stream).expect("no peer failure");
    let (out, residual_out) = step.outputs(&engine);
    let what = format!("cuda rank {rank} {mode} decode {} eager after the replays", fixture.problem);
    assert_exact(&what, reference, &out, &residual_out);
    assert!(same_bits(&out, &last.0) && same_bits(&residual_out, &last.1), "{what}: differs from the replay");
    report.push(format!(
        "{mode}: {} captured by cudarc on the engine's stream, {REPLAYS} replays: exact",
        fixture.problem
    ));

    // The same tensors on an arfuse stream of its own (not the tensors'): the operator orders the
    // call with the tensors' stream (cudarc's events, or a join each way), and the result is exact.
    let own = Cuda::create_stream(device).expect("an arfuse stream");
    assert_eq!(own.ownership(), StreamOwnership::Owned);
    step.load(&engine, fixture, rank);
    engine.synchronize().expect("uploads");
    // No rank's kernel may spin while a peer still creates its stream or uploads: a driver call
    // that waits for the device (its memory, its streams) would wait for that kernel, which waits
    // for the peer (seen twice on the H200 without this barrier: a peer timeout here).
    phase.wait();
    op.forward(&own, step.args(fixture.problem.eps)).expect("forward on another stream than the tensors'");
    // Read back on the engine's stream before anything waits for `own`: cudarc's events (tracking
    // on) or the operator's join (tracking off) order the copy after the call.
    let (out, residual_out) = step.outputs(&engine);
    op.check(&own).expect("no peer failure");
    assert_exact(&format!("cuda rank {rank} {mode} decode on an arfuse stream"), reference, &out, &residual_out);
    report.push(format!("{mode}: {} on an arfuse stream beside the engine's: exact", fixture.problem));

    // A borrowed raw handle of the same stream: never destroyed by arfuse.
    // SAFETY: `engine` outlives `borrowed`, which is dropped below, and the call enqueued through
    // it is finished (`check`) before that.
    let borrowed = unsafe { CudaStream::from_raw(device, engine.cu_stream()) }.expect("a borrowed stream");
    assert_eq!(borrowed.ownership(), StreamOwnership::Borrowed);
    step.load(&engine, fixture, rank);
    engine.synchronize().expect("uploads");
    phase.wait();
    op.forward(&borrowed, step.args(fixture.problem.eps)).expect("forward on the borrowed handle");
    op.check(&borrowed).expect("no peer failure");
    drop(borrowed);
    // The engine's stream still works after the borrowed wrapper is gone.
    let (out, residual_out) = step.outputs(&engine);
    assert_exact(&format!("cuda rank {rank} {mode} decode on a borrowed handle"), reference, &out, &residual_out);
    // The per-thread default stream is refused: it names a different stream on every thread.
    let per_thread = 0x2 as sys::CUstream;
    // SAFETY: the per-thread handle is always valid; `from_raw` refuses it before any use.
    let refused = unsafe { CudaStream::from_raw(device, per_thread) };
    assert!(matches!(refused, Err(arfuse_kernels::Error::BadStream { .. })), "per-thread handle: {refused:?}");
    report.push(format!("{mode}: a borrowed CUstream works and is not destroyed; CU_STREAM_PER_THREAD refused"));

    // Teardown where no kernel spins; nothing parked on the engine's context by the operator's use
    // of its slices (a captured event left in a slice would park an error when it is freed).
    engine.synchronize().expect("engine stream");
    ctx.check_err().expect("no error parked on the engine's context");
    phase.wait();
    drop(graph);
    drop(step);
    drop(tensors);
    drop(in_place);
    drop(stream);
    drop(own);
    engine.synchronize().expect("frees");
    ctx.check_err().expect("no error parked on the engine's context by the frees");
    phase.wait();
    report
}

/// Two ranks as threads sharing GPU 0, each with its own cudarc context object and stream.
pub(crate) fn cudarc_tensors_on_the_engines_own_stream_in_place_out_of_place_and_captured(test: &str) {
    if !crate::gpu_available::<Cuda>(test) {
        return;
    }
    let seed = TestSeed::new("cuda::cudarc_tensors");
    let phase = Barrier::new(WORLD);
    let config = Config::default().with_deadline(Duration::from_secs(10));
    let reports = run_threads_each(ThreadRendezvous::group(WORLD, Duration::from_secs(60)), |rank, mut rendezvous| {
        let device = Cuda::open_device(0, WORLD).expect("device");
        let mut op = AllReduceRmsNorm::<Cuda>::new(&device, &mut rendezvous, config).expect("operator");
        let mut report = Vec::new();
        for tracking in [true, false] {
            report.extend(rank_round(rank, tracking, &device, &mut op, &phase, &seed));
        }
        report
    });
    for line in &reports[0] {
        println!("cuda cudarc tensors, world {WORLD}: {line}");
    }
}

//! The measurements of `arfuse-bench` on a GPU backend (cuda, hip; any [`GpuBackend`]): ranks
//! are threads of this process, one per GPU when there are enough GPUs, otherwise several sharing
//! one (each then gets its share of the multiprocessors, as the operator does for co-resident ranks).
//!
//! For every shape and path, every rank times `repeats` batches of `iters` calls, rotating through
//! several input sets (so that consecutive calls do not read the same memory): in decode mode a
//! batch is one CUDA graph holding `iters` captured calls, replayed; in prefill mode the calls are
//! launched eagerly. Device events around each batch give the time per call. After the timed
//! batches, every rank checks the outputs of the first input set against the reference
//! (residual_out bit-exact, out within 1 ulp, every element written: outputs are poisoned before
//! each path runs).
//!
//! Ranks allocate, free, capture and instantiate only between barriers at which no kernel spins
//! (such driver calls can wait for the device to go idle, which a spinning peer prevents).

use crate::report::{floor_bytes, Floors, Mode, PathTiming, Report, Row, Shape, Stats};
use anyhow::{anyhow, bail, Context, Result};
use arfuse_fusion::{
    AllReduce, AllReduceRmsNorm, Args, BytesMut, Config, FallbackReason, Path, QuantOut, TensorMut, TensorRef, Variant,
};
use arfuse_ipc::ThreadRendezvous;
use arfuse_kernels::gpu::DeviceBuffer;
use arfuse_kernels::{Element, GpuBackend};
use arfuse_testkit::{poisoned, unwritten, Fixture, Problem, Reference};
use parking_lot::{Condvar, Mutex};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Ranks.
    pub world_size: usize,
    /// GPUs to use (ranks are spread over them; more ranks than GPUs share).
    pub gpus: usize,
    /// Shapes of each mode, in order.
    pub cases: Vec<(Mode, Shape)>,
    /// Calls per timed batch, decode mode.
    pub decode_iters: usize,
    /// Calls per timed batch, prefill mode.
    pub prefill_iters: usize,
    /// Untimed batches before timing.
    pub warmup: usize,
    /// Timed batches.
    pub repeats: usize,
    /// Check every path's output against the reference.
    pub check: bool,
    /// Input sets per shape, where the command line fixed them (else [`default_input_sets`]).
    pub input_sets: Option<usize>,
    /// Seed of the inputs.
    pub seed: u64,
    /// The command line, for the report.
    pub command: String,
    /// `--fp8`: the fused paths are timed again with this FP8 output fused (`+fp8` rows) and as
    /// the plain call followed by the separate quantisation kernel (`+quant` rows).
    pub fp8: Option<arfuse_kernels::contract::Quant>,
}

/// The unfused path as the bench forces it.
const UNFUSED: Path = Path::Unfused { all_reduce: AllReduce::Custom, reason: FallbackReason::Disabled };
/// How long a rank waits for the others at a barrier of the bench (not a kernel deadline).
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes of input sets per shape the calls rotate through (at least 2 sets, at most 8).
const ROTATION_BYTES: usize = 256 << 20;

/// Input sets for a shape: enough that they do not all sit in a 50 MB L2 cache, within limits.
pub fn default_input_sets(shape: Shape, elem_bytes: usize) -> usize {
    let per_set = 4 * shape.rows * shape.hidden * elem_bytes;
    ROTATION_BYTES.div_ceil(per_set.max(1)).clamp(2, 8)
}

/// The input sets of `shape` in this plan.
fn input_sets(plan: &Plan, shape: Shape, elem_bytes: usize) -> usize {
    plan.input_sets.unwrap_or_else(|| default_input_sets(shape, elem_bytes))
}

/// A barrier that a failing rank breaks, so that the others return an error instead of waiting.
struct Phase {
    state: Mutex<(usize, u64, Option<String>)>,
    changed: Condvar,
    parties: usize,
}

impl Phase {
    fn new(parties: usize) -> Self {
        Phase { state: Mutex::new((0, 0, None)), changed: Condvar::new(), parties }
    }

    fn wait(&self) -> Result<()> {
        let mut state = self.state.lock();
        if let Some(why) = &state.2 {
            bail!("another rank failed: {why}");
        }
        let generation = state.1;
        state.0 += 1;
        if state.0 == self.parties {
            state.0 = 0;
            state.1 += 1;
            self.changed.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + PHASE_TIMEOUT;
        while state.1 == generation && state.2.is_none() {
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                bail!("ranks did not meet within {PHASE_TIMEOUT:?}");
            }
        }
        match &state.2 {
            Some(why) if state.1 == generation => bail!("another rank failed: {why}"),
            _ => Ok(()),
        }
    }

    fn fail(&self, why: String) {
        let mut state = self.state.lock();
        state.2.get_or_insert(why);
        self.changed.notify_all();
    }
}

/// One shape's inputs, shared by the rank threads: the input sets and the reference of the first.
struct Case<T: Element> {
    mode: Mode,
    shape: Shape,
    sets: Vec<Fixture<T>>,
    reference: Option<Reference<T>>,
}

/// What a rank reports for one case.
struct RankResult {
    case: usize,
    rank: usize,
    dispatched: Path,
    timings: Vec<PathTiming>,
}

/// One input set on the device.
struct DeviceSet<B: GpuBackend, T: Element> {
    input: DeviceBuffer<B, T>,
    residual: DeviceBuffer<B, T>,
    out: DeviceBuffer<B, T>,
    residual_out: DeviceBuffer<B, T>,
    /// `--fp8`: the codes (in f32 words: u8 is no Element) and the scales (at least one).
    codes: DeviceBuffer<B, f32>,
    scales: DeviceBuffer<B, f32>,
}

/// The device's floors: copy bandwidth and one graph node.
fn measure_floors<B: GpuBackend>(device: &B::Device, stream: &B::Stream) -> Result<Floors> {
    const BYTES: usize = 256 << 20;
    let src = DeviceBuffer::<B, half::bf16>::zeros(device, BYTES / 2)?;
    let dst = DeviceBuffer::<B, half::bf16>::zeros(device, BYTES / 2)?;
    let (src_ptr, dst_ptr) = (src.device_ptr(), dst.device_ptr());
    let copy = || -> Result<f64> {
        let start = B::record_event(stream)?;
        // SAFETY: both buffers hold BYTES bytes and outlive the synchronisation below.
        unsafe { B::copy(stream, dst_ptr, src_ptr, BYTES)? };
        let end = B::record_event(stream)?;
        Ok(B::elapsed(&start, &end)?.as_secs_f64())
    };
    copy()?;
    let mut secs = Vec::new();
    for _ in 0..10 {
        secs.push(copy()?);
    }
    let best = Stats::of(&secs).context("no copy timings")?.p50;
    let copy_gbs = 2.0 * BYTES as f64 / best / 1e9;

    const NODES: usize = 100;
    B::begin_capture(stream)?;
    for i in 0..NODES {
        // SAFETY: 16-byte copies inside the buffers above, which outlive the graph.
        unsafe { B::copy(stream, dst_ptr.add(i * 64), src_ptr.add(i * 64), 16)? };
    }
    let graph = B::end_capture(stream)?;
    let mut per_node = Vec::new();
    for i in 0..13 {
        let start = B::record_event(stream)?;
        // SAFETY: the graph copies between the live buffers above.
        unsafe { B::replay(&graph, stream)? };
        let end = B::record_event(stream)?;
        if i >= 3 {
            per_node.push(B::elapsed(&start, &end)?.as_secs_f64() * 1e6 / NODES as f64);
        }
    }
    B::synchronize(stream)?;
    drop(graph);
    Ok(Floors { copy_gbs, graph_node_us: Stats::of(&per_node).context("no graph timings")?.p50 })
}

/// Runs the plan on backend `B` for storage type `T`; returns the report.
pub fn run<B: GpuBackend, T: Element>(plan: &Plan, progress: &indicatif::ProgressBar) -> Result<Report> {
    let available = B::device_count().with_context(|| format!("the {} backend", B::KIND))?;
    if available == 0 {
        bail!("no {} device", B::KIND);
    }
    let gpus = plan.gpus.clamp(1, available).min(plan.world_size);
    let ranks_per_gpu = plan.world_size.div_ceil(gpus);
    let world = plan.world_size;
    let phase = Phase::new(world);
    let rendezvous: Vec<Mutex<Option<ThreadRendezvous>>> =
        ThreadRendezvous::group(world, PHASE_TIMEOUT).into_iter().map(|r| Mutex::new(Some(r))).collect();
    let (result_tx, result_rx) = mpsc::channel::<RankResult>();
    let mut case_txs = Vec::new();
    let mut case_rxs = Vec::new();
    for _ in 0..world {
        let (tx, rx) = mpsc::sync_channel::<Arc<Case<T>>>(1);
        case_txs.push(tx);
        case_rxs.push(Mutex::new(Some(rx)));
    }
    let floors: Mutex<Option<(Floors, String)>> = Mutex::new(None);
    let date = crate::report::utc_now();
    // Unfused, 1-stage, 2-stage; with --fp8 each fused path with the FP8 out fused and with the
    // separate quantisation kernel after it.
    let paths_per_case = if plan.fp8.is_some() { 7 } else { 3 };
    progress.set_length((plan.cases.len() * paths_per_case) as u64);

    let rows = std::thread::scope(|scope| -> Result<Vec<Row>> {
        let mut handles = Vec::new();
        for rank in 0..world {
            let (phase, rendezvous, case_rxs, result_tx, floors) =
                (&phase, &rendezvous, &case_rxs, result_tx.clone(), &floors);
            handles.push(scope.spawn(move || {
                let body = || -> Result<()> {
                    let mut rdv = rendezvous[rank].lock().take().context("rendezvous taken")?;
                    let cases = case_rxs[rank].lock().take().context("case channel taken")?;
                    let device = B::open_device(rank / ranks_per_gpu, ranks_per_gpu)?;
                    let stream = B::create_stream(&device)?;
                    // The environment's ARFUSE_* settings apply (e.g. ARFUSE_ONE_STAGE_MAX_BYTES);
                    // the deadline is 20 s unless ARFUSE_DEADLINE_MS says otherwise.
                    let mut config = Config::from_env()?;
                    if std::env::var_os("ARFUSE_DEADLINE_MS").is_none() {
                        config = config.with_deadline(Duration::from_secs(20));
                    }
                    // Push slots that let every fused case be timed on the 1-stage path too (the
                    // dispatcher still picks by its threshold); ARFUSE_PUSH_SLOT_BYTES wins.
                    if config.policy.push_slot_bytes == 0 {
                        let largest = plan.cases.iter().map(|(_, s)| s.rows * s.hidden * T::DTYPE.size()).max();
                        config.policy.push_slot_bytes =
                            largest.unwrap_or(16).min(config.policy.max_size / 2).next_multiple_of(16);
                    }
                    let mut op = AllReduceRmsNorm::<B>::new(&device, &mut rdv, config)?;
                    phase.wait()?;
                    if rank == 0 {
                        let measured = measure_floors::<B>(&device, &stream)?;
                        *floors.lock() = Some((measured, B::describe(&device)));
                    }
                    for (index, case) in cases.iter().enumerate() {
                        let timings = run_case::<B, T>(plan, rank, &stream, &mut op, phase, &case, progress)?;
                        let dispatched = op.plan::<T>(case.shape.rows, case.shape.hidden);
                        if result_tx.send(RankResult { case: index, rank, dispatched, timings }).is_err() {
                            bail!("the collector stopped");
                        }
                    }
                    phase.wait()?;
                    Ok(())
                };
                let res = body();
                if let Err(e) = &res {
                    phase.fail(format!("rank {rank}: {e:#}"));
                }
                res
            }));
        }
        drop(result_tx);
        // Prepare each case while the ranks run the previous one.
        for (mode, shape) in &plan.cases {
            let case = Arc::new(prepare_case::<T>(plan, *mode, *shape));
            for tx in &case_txs {
                if tx.send(case.clone()).is_err() {
                    break; // a rank stopped; its error is reported below
                }
            }
        }
        case_txs.clear();
        let mut per_case: Vec<Vec<RankResult>> = (0..plan.cases.len()).map(|_| Vec::new()).collect();
        for result in result_rx {
            let slot = per_case.get_mut(result.case).context("result for an unknown case")?;
            slot.push(result);
        }
        for (rank, handle) in handles.into_iter().enumerate() {
            handle.join().map_err(|_| anyhow!("rank {rank} panicked"))??;
        }
        let mut rows = Vec::new();
        for ((mode, shape), mut results) in plan.cases.iter().zip(per_case) {
            results.sort_by_key(|r| r.rank);
            let first = results.first().context("a case without results")?;
            let mut paths = first.timings.clone();
            for (i, timing) in paths.iter_mut().enumerate() {
                let checks: Vec<Option<bool>> = results.iter().map(|r| r.timings[i].exact).collect();
                timing.exact = if checks.iter().all(|c| *c == Some(true)) {
                    Some(true)
                } else if checks.contains(&Some(false)) {
                    Some(false)
                } else {
                    None
                };
            }
            rows.push(Row {
                mode: *mode,
                shape: *shape,
                dtype: T::DTYPE.to_string(),
                dispatched: first.dispatched.name().to_string(),
                paths,
                floor_bytes: floor_bytes(*shape, T::DTYPE.size(), ranks_per_gpu),
            });
        }
        Ok(rows)
    })?;
    let (floors, device) = floors.lock().take().context("floors were not measured")?;
    Ok(Report {
        device: format!("{device} x{gpus}"),
        backend: B::KIND.to_string(),
        date,
        command: plan.command.clone(),
        world_size: world,
        ranks_per_gpu,
        iters: plan.decode_iters,
        prefill_iters: plan.prefill_iters,
        repeats: plan.repeats,
        graph_inputs: "pushed, nothing registered".to_string(),
        input_sets: plan.cases.iter().map(|(_, s)| (*s, input_sets(plan, *s, T::DTYPE.size()))).collect(),
        fp8: plan.fp8.as_ref().map(crate::demo::fp8_spec).unwrap_or_default(),
        floors,
        rows,
    })
}

fn prepare_case<T: Element>(plan: &Plan, mode: Mode, shape: Shape) -> Case<T> {
    let sets = input_sets(plan, shape, T::DTYPE.size());
    let seed = plan.seed ^ ((shape.rows as u64) << 32 | shape.hidden as u64);
    let fixtures: Vec<Fixture<T>> = (0..sets)
        .map(|i| {
            Fixture::generate(
                &Problem::new(plan.world_size, shape.rows, shape.hidden, T::DTYPE)
                    .with_seed(seed.wrapping_add(i as u64)),
            )
        })
        .collect();
    let reference = plan.check.then(|| Reference::compute(&fixtures[0]));
    Case { mode, shape, sets: fixtures, reference }
}

#[allow(clippy::too_many_arguments)]
fn run_case<B: GpuBackend, T: Element>(
    plan: &Plan,
    rank: usize,
    stream: &B::Stream,
    op: &mut AllReduceRmsNorm<B>,
    phase: &Phase,
    case: &Case<T>,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<PathTiming>> {
    let what = format!("rank {rank} {:?} {}", case.mode, case.shape);
    phase.wait()?;
    let poisoned = poisoned::<T>(case.shape.rows * case.shape.hidden);
    let elems = case.shape.rows * case.shape.hidden;
    let n_scales = plan.fp8.map_or(0, |q| case.shape.rows * q.scaling.scales_per_row(case.shape.hidden));
    let weight = DeviceBuffer::<B, _>::from_slice(stream, &case.sets[0].weight)?;
    let mut sets = Vec::new();
    for fixture in &case.sets {
        sets.push(DeviceSet::<B, T> {
            input: DeviceBuffer::<B, _>::from_slice(stream, &fixture.inputs[rank])?,
            residual: DeviceBuffer::<B, _>::from_slice(stream, &fixture.residual)?,
            out: DeviceBuffer::<B, _>::from_slice(stream, &poisoned)?,
            residual_out: DeviceBuffer::<B, _>::from_slice(stream, &poisoned)?,
            codes: DeviceBuffer::<B, _>::from_slice(
                stream,
                &vec![0.0f32; if plan.fp8.is_some() { elems / 4 } else { 1 }],
            )?,
            scales: DeviceBuffer::<B, _>::from_slice(stream, &vec![f32::NAN; n_scales.max(1)])?,
        });
    }
    let iters = match case.mode {
        Mode::Decode => plan.decode_iters,
        Mode::Prefill => plan.prefill_iters,
    }
    .max(1);
    let mut timings = Vec::new();
    // (path, FP8 output, whether it comes from the separate kernel after the plain call).
    let mut runs: Vec<(Path, Option<arfuse_kernels::contract::Quant>, bool)> =
        vec![(UNFUSED, None, false), (Path::OneStage, None, false), (Path::TwoStage, None, false)];
    if let Some(q) = plan.fp8 {
        for path in [Path::OneStage, Path::TwoStage] {
            runs.extend([(path, Some(q), false), (path, Some(q), true)]);
        }
    }
    for (path, quant, separate) in runs {
        sets[0].out.upload(stream, &poisoned)?;
        sets[0].residual_out.upload(stream, &poisoned)?;
        let call = |op: &mut AllReduceRmsNorm<B>, sets: &mut [DeviceSet<B, T>], k: usize| -> Result<()> {
            let n = sets.len();
            let set = &mut sets[k % n];
            let (codes, scales) = (set.codes.device_ptr(), set.scales.device_ptr());
            // SAFETY: `codes` holds `elems` bytes (elems / 4 f32 words) and `scales` at least
            // `n_scales` f32s whenever `quant` is set; the set outlives every call and replay.
            let quant = quant.map(|quant| unsafe {
                QuantOut {
                    quant,
                    codes: BytesMut::from_raw(codes, elems),
                    scales: (n_scales > 0).then(|| TensorMut::from_raw(scales, n_scales)),
                }
            });
            // `<path>+quant`: the plain call, then our separate quantisation kernel on its `out`
            // (in the same graph or timed loop).
            let (fused, after) = if separate { (None, quant) } else { (quant, None) };
            op.forward_on_with(
                stream,
                path,
                Args {
                    input: TensorRef::new(&set.input),
                    residual: TensorRef::new(&set.residual),
                    weight: TensorRef::new(&weight),
                    out: TensorMut::new(&mut set.out),
                    residual_out: TensorMut::new(&mut set.residual_out),
                    eps: case.sets[0].problem.eps,
                },
                Variant { no_residual: false, quant: fused },
            )
            .with_context(|| format!("{what} {path}"))?;
            if let Some(after) = after {
                op.quantize_fp8(stream, TensorRef::new(&set.out), case.shape.hidden, after)
                    .with_context(|| format!("{what} {path}+quant"))?;
            }
            Ok(())
        };
        let mut samples = Vec::new();
        match case.mode {
            Mode::Decode => {
                phase.wait()?;
                B::begin_capture(stream)?;
                for k in 0..iters {
                    call(op, &mut sets, k)?;
                }
                let graph = B::end_capture(stream)?;
                B::synchronize(stream)?;
                phase.wait()?;
                for _ in 0..plan.warmup {
                    // SAFETY: the graph's tensors are `sets` and `weight`, alive past the sync below.
                    unsafe { B::replay(&graph, stream)? };
                }
                B::synchronize(stream)?;
                for _ in 0..plan.repeats {
                    phase.wait()?;
                    let start = B::record_event(stream)?;
                    // SAFETY: as above.
                    unsafe { B::replay(&graph, stream)? };
                    let end = B::record_event(stream)?;
                    samples.push(B::elapsed(&start, &end)?.as_secs_f64() * 1e6 / iters as f64);
                }
                op.check(stream).with_context(|| format!("{what} {path}"))?;
                phase.wait()?;
                drop(graph);
            }
            Mode::Prefill => {
                phase.wait()?;
                for _ in 0..plan.warmup {
                    for k in 0..iters {
                        call(op, &mut sets, k)?;
                    }
                }
                op.check(stream).with_context(|| format!("{what} {path}"))?;
                for _ in 0..plan.repeats {
                    phase.wait()?;
                    let start = B::record_event(stream)?;
                    for k in 0..iters {
                        call(op, &mut sets, k)?;
                    }
                    let end = B::record_event(stream)?;
                    samples.push(B::elapsed(&start, &end)?.as_secs_f64() * 1e6 / iters as f64);
                }
                op.check(stream).with_context(|| format!("{what} {path}"))?;
            }
        }
        let exact = match &case.reference {
            Some(reference) => {
                let out = sets[0].out.download(stream)?;
                let residual_out = sets[0].residual_out.download(stream)?;
                let mut ok = unwritten(&out).is_empty()
                    && unwritten(&residual_out).is_empty()
                    && reference.residual_out_mismatches(&residual_out).total == 0
                    && reference.out_violations(&out, 1).total == 0;
                if let Some(quant) = quant {
                    let words = sets[0].codes.download(stream)?;
                    let codes: Vec<u8> = words.iter().flat_map(|w| w.to_bits().to_ne_bytes()).collect();
                    let scales = sets[0].scales.download(stream)?;
                    let fp8 = crate::demo::Fp8Out { quant, codes: &codes, scales: &scales[..n_scales] };
                    if let Err(e) = crate::demo::check_fp8(&what, &case.sets[0], &fp8) {
                        eprintln!("{e}");
                        ok = false;
                    }
                }
                if !ok {
                    eprintln!("{what} {path}: outputs differ from the reference");
                }
                Some(ok)
            }
            None => None,
        };
        let stats = Stats::of(&samples).context("no samples (repeats 0?)")?;
        let name = match (quant, separate) {
            (None, _) => path.name().to_string(),
            (Some(_), false) => format!("{}+fp8", path.name()),
            (Some(_), true) => format!("{}+quant", path.name()),
        };
        timings.push(PathTiming { path: name, stats, exact });
        if rank == 0 {
            progress.set_message(format!("{:?} {} {}", case.mode, case.shape, path.name()));
            progress.inc(1);
        }
    }
    // Free the buffers only when no peer's kernel can be spinning.
    B::synchronize(stream)?;
    phase.wait()?;
    drop(sets);
    drop(weight);
    Ok(timings)
}

//! Load: back-to-back calls of random shapes across four rank processes, every output checked.
//!
//! Each call draws (from the test's seed, identically on every rank) a dtype (bf16, f16), a hidden
//! size (2880, 4096, 5120, 8192), 1..=200 rows and a path: 1-stage, 2-stage or unfused forced, or
//! the dispatcher's choice (a forced fused path that does not fit max_size / 2 = 2 MiB falls back
//! to the dispatcher, which then takes the chunked unfused path). Every rank checks every call:
//! `residual_out` bit-exact and `out` within 1 ulp of the testkit reference.
//!
//! `ARFUSE_LOAD_CALLS` sets the number of calls (default 800: under a minute in CI); the full run is 100000:
//! `ARFUSE_LOAD_CALLS=100000 cargo test --release -p arfuse-fusion --test it load::` (docs/reliability.md).
//! Rank 0 prints progress every 10% (echoed live to the parent's stderr).
//!
//! Inputs come from one pool of 200 rows per (dtype, hidden), generated once per rank, and each
//! call takes a random window of rows of it; the reference is row-wise, so the window of the
//! pool's reference is the call's reference.

use arfuse_fusion::{AllReduceRmsNorm, Args, Config, Path, TensorMut, TensorRef};
use arfuse_ipc::UnixRendezvous;
use arfuse_kernels::api::Cpu;
use arfuse_kernels::cpu::CpuStream;
use arfuse_kernels::{Backend, DType, Element};
use arfuse_testkit::{
    assert_ranks_succeeded, child, poison, run_processes_with, test_path, ChildRank, Fixture, Problem, ProcessOptions,
    Reference, TestSeed,
};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const WORLD: usize = 4;
const DEFAULT_CALLS: usize = 800;
const HIDDENS: [usize; 4] = [2880, 4096, 5120, 8192];
const MAX_ROWS: usize = 200;
const MAX_SIZE: usize = 4 << 20;

fn calls() -> usize {
    match std::env::var("ARFUSE_LOAD_CALLS") {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| panic!("ARFUSE_LOAD_CALLS={text:?} is not a number")),
        Err(_) => DEFAULT_CALLS,
    }
}

/// The inputs and reference of `MAX_ROWS` rows of one (dtype, hidden).
struct Pool<T: Element> {
    fixture: Fixture<T>,
    reference: Reference<T>,
}

impl<T: Element> Pool<T> {
    fn new(hidden: usize, seed: u64) -> Self {
        let fixture = Fixture::<T>::generate(&Problem::new(WORLD, MAX_ROWS, hidden, T::DTYPE).with_seed(seed));
        let reference = Reference::compute(&fixture);
        Pool { fixture, reference }
    }
}

/// Reused output buffers of one dtype.
struct Outs<T> {
    out: Vec<T>,
    residual_out: Vec<T>,
}

/// One call of rows `first..first + rows` of `pool`, checked. Returns the path taken.
fn checked_call<T: Element>(
    op: &mut AllReduceRmsNorm<Cpu>,
    stream: &CpuStream,
    pool: &Pool<T>,
    outs: &mut Outs<T>,
    first: usize,
    rows: usize,
    path: Option<Path>,
    what: &dyn Fn() -> String,
) -> Path {
    let hidden = pool.fixture.problem.hidden;
    let range = first * hidden..(first + rows) * hidden;
    let n = range.len();
    outs.out.resize(n, T::from_f32(0.0));
    outs.residual_out.resize(n, T::from_f32(0.0));
    poison(&mut outs.out);
    poison(&mut outs.residual_out);
    let args = Args {
        input: TensorRef::new(&pool.fixture.inputs[op.rank()][range.clone()]),
        residual: TensorRef::new(&pool.fixture.residual[range.clone()]),
        weight: TensorRef::new(&pool.fixture.weight[..]),
        out: TensorMut::new(&mut outs.out[..]),
        residual_out: TensorMut::new(&mut outs.residual_out[..]),
        eps: pool.fixture.problem.eps,
    };
    let result = match path {
        Some(path) => op.forward_on(stream, path, args),
        None => op.forward(stream, args),
    };
    let taken = result.unwrap_or_else(|e| panic!("{}: {e}", what()));
    if let Some(forced) = path {
        assert_eq!(taken, forced, "{}", what());
    }
    let expected = &pool.reference.residual_out[range.clone()];
    if let Some(i) = (0..n).find(|&i| outs.residual_out[i].to_bits_u32() != expected[i].to_bits_u32()) {
        panic!(
            "{} ({taken}): residual_out[{i}] = {:?}, expected {:?} (bit-exact)",
            what(),
            outs.residual_out[i],
            expected[i]
        );
    }
    if let Some(i) = (0..n).find(|&i| pool.reference.out_ulp(range.start + i, outs.out[i]) > 1) {
        panic!(
            "{} ({taken}): out[{i}] = {:?} is {} ulp from the reference (at most 1)",
            what(),
            outs.out[i],
            pool.reference.out_ulp(range.start + i, outs.out[i])
        );
    }
    taken
}

fn rank_body(me: &ChildRank) {
    use rand::Rng;
    let calls = calls();
    let seed = TestSeed::new("load::four_processes");
    let pools_bf16: Vec<Pool<bf16>> =
        HIDDENS.iter().map(|&h| Pool::new(h, seed.derive_named(&format!("bf16-{h}")))).collect();
    let pools_f16: Vec<Pool<f16>> =
        HIDDENS.iter().map(|&h| Pool::new(h, seed.derive_named(&format!("f16-{h}")))).collect();
    let mut outs_bf16 = Outs { out: Vec::new(), residual_out: Vec::new() };
    let mut outs_f16 = Outs { out: Vec::new(), residual_out: Vec::new() };

    let mut rendezvous =
        UnixRendezvous::connect(&me.dir, me.rank, me.world_size, Duration::from_secs(120)).expect("rendezvous");
    let device = Cpu::open_device(0, 1).expect("cpu");
    let stream = Cpu::create_stream(&device).expect("stream");
    let mut config = Config::default();
    config.policy.max_size = MAX_SIZE;
    config.policy.push_slot_bytes = MAX_SIZE / 2;
    config.deadline = Duration::from_secs(60);
    let mut op = AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, config).expect("operator");

    // Every rank draws the same sequence.
    let mut rng = seed.rng();
    let forced = [Some(Path::OneStage), Some(Path::TwoStage), Some(super::UNFUSED), None];
    let mut paths: BTreeMap<&'static str, usize> = BTreeMap::new();
    let start = Instant::now();
    let mut last_report = Instant::now();
    let tenth = (calls / 10).max(1);
    for i in 0..calls {
        let bf = rng.gen_bool(0.5);
        let h = rng.gen_range(0..HIDDENS.len());
        let rows = rng.gen_range(1..=MAX_ROWS);
        let first = rng.gen_range(0..=MAX_ROWS - rows);
        let mut path = forced[rng.gen_range(0..forced.len())];
        let bytes = rows * HIDDENS[h] * 2;
        if matches!(path, Some(Path::OneStage | Path::TwoStage)) && bytes > MAX_SIZE / 2 {
            path = None;
        }
        let what = || {
            let dtype = if bf { DType::Bf16 } else { DType::F16 };
            format!("rank {} call {i}: {rows}x{} {dtype} rows {first}.. forced {path:?}", me.rank, HIDDENS[h])
        };
        let taken = if bf {
            checked_call(&mut op, &stream, &pools_bf16[h], &mut outs_bf16, first, rows, path, &what)
        } else {
            checked_call(&mut op, &stream, &pools_f16[h], &mut outs_f16, first, rows, path, &what)
        };
        *paths.entry(taken.name()).or_default() += 1;
        if me.rank == 0 && ((i + 1) % tenth == 0 || last_report.elapsed() > Duration::from_secs(20)) {
            last_report = Instant::now();
            eprintln!("load: {}/{calls} calls checked, {:.1} s", i + 1, start.elapsed().as_secs_f64());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if me.rank == 0 {
        eprintln!(
            "load: done: {calls} calls x {} ranks, all checked, in {secs:.1} s ({:.0} calls/s); paths {paths:?}",
            me.world_size,
            calls as f64 / secs
        );
    }
    for name in ["fused-1stage", "fused-2stage", "unfused"] {
        assert!(calls < 100 || paths.get(name).copied().unwrap_or(0) > 0, "no call took {name}: {paths:?}");
    }
}

#[test]
fn four_processes_random_shapes_and_paths_back_to_back() {
    if let Some(me) = child() {
        rank_body(&me);
        return;
    }
    let calls = calls();
    // Bounded by lack of progress, not by the run's length: rank 0 reports every 10% of the
    // calls (and every 20 s), so 5 minutes of silence means a stall on any machine, however busy.
    let mut options =
        ProcessOptions::new(WORLD, Duration::MAX).env("ARFUSE_LOAD_CALLS", calls.to_string()).echo_stderr();
    options.stall_timeout = Some(Duration::from_secs(300));
    let outcomes = run_processes_with(&test_path!(four_processes_random_shapes_and_paths_back_to_back), &options)
        .expect("process harness");
    assert_ranks_succeeded(&outcomes);
}

//! A decode loop whose step is captured into a graph once and replayed every step, the way an
//! engine runs decode: two ranks as threads, new inputs copied into the same tensors before each
//! replay, every step checked against a plain computation.
//!
//! `cargo run -p arfuse-fusion --example 03-graph-decode [-- auto|cuda|cpu]` (default `auto`: cuda
//! where a CUDA device opens, else cpu).
//!
//! - **cuda**: the engine's side is cudarc, as in an engine built on it: each rank has its own
//!   cudarc context object and a stream it created through cudarc, which it hands to arfuse with
//!   `CudaStream::from_cudarc`; its tensors are cudarc `CudaSlice`s, passed with `TensorRef::new`
//!   and `TensorMut::new`. cudarc captures one `forward` on that stream into a graph, and the loop
//!   replays the graph (`CudaGraph::launch`). No `unsafe`. A decode step is a 1-stage call, which
//!   pushes its input to the peers: its graph needs nothing registered (no call of any path does).
//! - **cpu**: the cpu backend has no graphs to capture (a call there runs before `forward`
//!   returns), so the same loop calls `forward` eagerly every step. That is what CI runs; the
//!   example says which of the two it did.

use arfuse_fusion::ipc::{Rendezvous, ThreadRendezvous};
use arfuse_fusion::kernels::api::Cpu;
use arfuse_fusion::kernels::Backend;
use arfuse_fusion::{AllReduceRmsNorm, Args, Config, TensorMut, TensorRef};
use half::bf16;
use std::sync::Barrier;
use std::time::Duration;

const WORLD: usize = 2;
const HIDDEN: usize = 4096;
/// Tokens of one decode step.
const ROWS: usize = 8;
const STEPS: usize = 16;
const EPS: f32 = 1e-6;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Rank `rank`'s partial output of decode step `step`.
fn input(rank: usize, step: usize) -> Vec<bf16> {
    (0..ROWS * HIDDEN).map(|i| bf16::from_f32(((rank * 31 + step * 11 + i * 7) % 29) as f32 / 16.0 - 0.9)).collect()
}

fn residual() -> Vec<bf16> {
    (0..ROWS * HIDDEN).map(|i| bf16::from_f32(((i * 5) % 13) as f32 / 8.0 - 0.75)).collect()
}

fn weight() -> Vec<bf16> {
    (0..HIDDEN).map(|j| bf16::from_f32(1.0 + (j % 4) as f32 / 16.0)).collect()
}

/// `residual_out = round(round(Σ_r x_r) + residual)`, summed in f32 in rank order: checked bit for bit.
fn check_step(step: usize, residual: &[bf16], residual_out: &[bf16]) -> Result<(), Error> {
    let inputs: Vec<Vec<bf16>> = (0..WORLD).map(|rank| input(rank, step)).collect();
    for (i, (&got, &r)) in residual_out.iter().zip(residual).enumerate() {
        let sum: f32 = inputs.iter().map(|x| x[i].to_f32()).sum();
        let expected = bf16::from_f32(bf16::from_f32(sum).to_f32() + r.to_f32());
        if got.to_bits() != expected.to_bits() {
            return Err(format!("step {step}: residual_out[{i}] = {got}, expected {expected}").into());
        }
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let backend = std::env::args().nth(1).unwrap_or_else(|| "auto".into());
    match backend.as_str() {
        "cpu" => run_cpu(),
        "cuda" => gpu::run(),
        "auto" if gpu::available() => gpu::run(),
        "auto" => run_cpu(),
        other => Err(format!("unknown backend {other:?} (expected auto, cuda or cpu)").into()),
    }
}

/// Runs `rank_main` on every rank of a group of threads, returning the first failure.
fn run_ranks(rank_main: impl Fn(ThreadRendezvous, &Barrier) -> Result<(), Error> + Sync) -> Result<(), Error> {
    let group = ThreadRendezvous::group(WORLD, Duration::from_secs(60));
    let phase = Barrier::new(WORLD);
    let results: Vec<Result<(), Error>> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            group.into_iter().map(|rendezvous| scope.spawn(|| rank_main(rendezvous, &phase))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into()))).collect()
    });
    results.into_iter().collect()
}

/// The cpu backend: no graph to capture, so every decode step is an eager `forward`.
fn run_cpu() -> Result<(), Error> {
    println!("cpu backend: it has no graphs, so each of the {STEPS} decode steps calls forward eagerly");
    run_ranks(|mut rendezvous, _phase| {
        let rank = rendezvous.rank();
        let device = Cpu::open_device(0, 1)?;
        let stream = Cpu::create_stream(&device)?;
        let mut op = AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, Config::default())?;
        let (residual, weight) = (residual(), weight());
        let (mut out, mut residual_out) = (vec![bf16::ZERO; ROWS * HIDDEN], vec![bf16::ZERO; ROWS * HIDDEN]);
        for step in 0..STEPS {
            let x = input(rank, step);
            let args = Args {
                input: TensorRef::new(&x[..]),
                residual: TensorRef::new(&residual[..]),
                weight: TensorRef::new(&weight[..]),
                out: TensorMut::new(&mut out[..]),
                residual_out: TensorMut::new(&mut residual_out[..]),
                eps: EPS,
            };
            let path = op.forward(&stream, args)?;
            check_step(step, &residual, &residual_out)?;
            if rank == 0 && step == 0 {
                println!("a decode step of {ROWS}x{HIDDEN} bf16 takes the {path} path");
            }
        }
        if rank == 0 {
            println!("cpu: {STEPS} eager decode steps, residual_out exact on every step");
        }
        Ok(())
    })
}

#[cfg(feature = "cuda")]
mod gpu {
    //! The decode step captured by cudarc on the engine's own stream.

    use super::*;
    use arfuse_fusion::kernels::cuda::cudarc::driver::{sys, CudaContext};
    use arfuse_fusion::kernels::cuda::{Cuda, CudaStream};
    use arfuse_fusion::Path;

    /// Whether a CUDA device opens here.
    pub(super) fn available() -> bool {
        matches!(Cuda::device_count(), Ok(n) if n > 0) && Cuda::open_device(0, WORLD).is_ok()
    }

    pub(super) fn run() -> Result<(), Error> {
        println!("cuda backend: the decode step is captured by cudarc into a graph once and replayed {STEPS} times");
        run_ranks(|mut rendezvous, phase| {
            let rank = rendezvous.rank();
            let device = Cuda::open_device(0, WORLD)?;
            // The engine's own cudarc context and stream (made before any rank launches: cudarc
            // synchronises the context when its first stream is created).
            let ctx = CudaContext::new(0)?;
            let engine = ctx.new_stream()?;
            let stream = CudaStream::from_cudarc(&device, engine.clone())?;
            let mut op = AllReduceRmsNorm::<Cuda>::new(&device, &mut rendezvous, Config::default())?;
            let residual_host = residual();
            let mut x = engine.clone_htod(&input(rank, 0))?;
            let residual = engine.clone_htod(&residual_host)?;
            let weight = engine.clone_htod(&weight())?;
            let mut out = engine.alloc_zeros::<bf16>(ROWS * HIDDEN)?;
            let mut residual_out = engine.alloc_zeros::<bf16>(ROWS * HIDDEN)?;
            engine.synchronize()?;
            // Every rank has allocated before any launches (an allocation can wait for the device).
            phase.wait();
            engine.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
            let captured = op.forward(
                &stream,
                Args {
                    input: TensorRef::new(&x),
                    residual: TensorRef::new(&residual),
                    weight: TensorRef::new(&weight),
                    out: TensorMut::new(&mut out),
                    residual_out: TensorMut::new(&mut residual_out),
                    eps: EPS,
                },
            );
            let graph = engine.end_capture(sys::CUgraphInstantiate_flags(0))?;
            let path = captured?;
            let graph = graph.ok_or("the capture recorded nothing")?;
            if path != Path::OneStage {
                return Err(format!("a decode step took {path}, not 1-stage").into());
            }
            for step in 0..STEPS {
                engine.memcpy_htod(&input(rank, step), &mut x)?;
                graph.launch()?;
                op.check(&stream)?;
                check_step(step, &residual_host, &engine.clone_dtoh(&residual_out)?)?;
            }
            if rank == 0 {
                println!("cuda: one graph of a {ROWS}x{HIDDEN} bf16 {path} call, {STEPS} replays, residual_out exact on every step");
            }
            // Free at a meeting of the ranks, where no kernel spins (a free can wait for the device).
            phase.wait();
            drop(graph);
            drop((x, residual, weight, out, residual_out));
            engine.synchronize()?;
            ctx.check_err()?;
            Ok(())
        })
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    //! Built without the cuda backend: there is no GPU path.

    use super::Error;

    pub(super) fn available() -> bool {
        false
    }

    pub(super) fn run() -> Result<(), Error> {
        Err("built without the cuda feature".into())
    }
}

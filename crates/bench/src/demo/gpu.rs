//! The demo on a GPU backend: the ranks are threads of this process, each with its own stream,
//! spread over the GPUs (rank `r` on GPU `r / ranks_per_gpu`; several share a GPU when there are
//! fewer GPUs than ranks, each with its share of the multiprocessors), meeting through an
//! in-process rendezvous. Every rank runs every case on every path: one untimed call, then
//! `--iters` calls between two device events; then it reads its outputs back and checks them
//! against the reference, and (with `--dump`) writes its inputs and outputs.
//!
//! Ranks allocate and free only between meetings at which no rank has a kernel in flight: such
//! driver calls can wait for the device to go idle, which a peer's kernel spinning for this rank
//! would prevent.

use super::{
    case_result, cases, check_fp8, demo_config, dump, finish, parse_dtype, parse_fp8, CaseResult, DemoArgs, Fp8Out,
    PATHS,
};
use anyhow::{anyhow, Context, Result};
use arfuse_fusion::{AllReduceRmsNorm, Args, BytesMut, Path, QuantOut, TensorMut, TensorRef, Variant};
use arfuse_ipc::{checked_all_gather, Rendezvous, ThreadRendezvous};
use arfuse_kernels::gpu::DeviceBuffer;
use arfuse_kernels::{DType, Element, GpuBackend};
use arfuse_testkit::{poisoned, Fixture, Problem, Reference};
use std::time::Duration;

/// Whether backend `B` can run the demo here: a device, which opens, and whose kernels load
/// (compiled or read from the cache; kept for the run). `Err` says why not.
pub(super) fn probe<B: GpuBackend>() -> std::result::Result<(), String> {
    let count = B::device_count().map_err(|e| e.to_string())?;
    if count > 0 {
        B::kernels_available().map_err(|e| format!("no kernels for the {} backend: {e}", B::KIND))?;
    }
    if count == 0 {
        return Err(format!("the {} driver reports no device", B::KIND));
    }
    let device = B::open_device(0, 1).map_err(|e| format!("device 0 does not open: {e}"))?;
    B::prepare(&device).map_err(|e| format!("the kernels do not load on {}: {e}", B::describe(&device)))
}

/// How `world` ranks are laid over `available` GPUs (at most `wanted` of them): (GPUs used, ranks
/// per GPU). Rank `r` runs on GPU `r / ranks_per_gpu`.
pub(super) fn layout(world: usize, available: usize, wanted: Option<usize>) -> (usize, usize) {
    let gpus = wanted.unwrap_or(available).clamp(1, available.max(1)).min(world.max(1));
    let ranks_per_gpu = world.div_ceil(gpus);
    (world.div_ceil(ranks_per_gpu), ranks_per_gpu)
}

/// Runs the demo on backend `B`.
pub(super) fn run<B: GpuBackend>(args: &DemoArgs) -> Result<()> {
    let dtype = parse_dtype(&args.dtype)?;
    let available = B::device_count().with_context(|| format!("the {} backend", B::KIND))?;
    let (gpus, ranks_per_gpu) = layout(args.world, available, args.gpus);
    let started = std::time::Instant::now();
    eprintln!(
        "arfuse-demo: {} ranks as threads on {gpus} of {available} {} GPU(s), {ranks_per_gpu} per GPU",
        args.world,
        B::KIND
    );
    let group = ThreadRendezvous::group(args.world, Duration::from_secs(args.timeout_s));
    let per_rank: Vec<Result<(Vec<CaseResult>, String)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .enumerate()
            .map(|(rank, rendezvous)| {
                scope.spawn(move || rank_thread::<B>(args, dtype, rank, ranks_per_gpu, rendezvous))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| h.join().unwrap_or_else(|_| Err(anyhow!("rank {rank} panicked"))))
            .collect()
    });
    let mut results = Vec::new();
    let mut failed = Vec::new();
    let mut device = String::new();
    for (rank, outcome) in per_rank.into_iter().enumerate() {
        match outcome {
            Ok((mut rows, described)) => {
                results.append(&mut rows);
                if rank == 0 {
                    device = described;
                }
            }
            Err(e) => failed.push(format!("rank {rank}: {e:#}")),
        }
    }
    eprintln!("arfuse-demo: done in {:.1} s", started.elapsed().as_secs_f64());
    let how =
        format!("{} backend, ranks as threads, {ranks_per_gpu} per GPU on {gpus} GPU(s); rank 0: {device}", B::KIND);
    finish(args, &how, &results, &failed)
}

/// One rank: its device and stream, its operator, every case.
fn rank_thread<B: GpuBackend>(
    args: &DemoArgs,
    dtype: DType,
    rank: usize,
    ranks_per_gpu: usize,
    mut rendezvous: ThreadRendezvous,
) -> Result<(Vec<CaseResult>, String)> {
    let device = B::open_device(rank / ranks_per_gpu, ranks_per_gpu)?;
    let stream = B::create_stream(&device)?;
    let mut op = AllReduceRmsNorm::<B>::new(&device, &mut rendezvous, demo_config(args, dtype)?)?;
    let mut results = Vec::new();
    for (mode, problem) in cases(args, dtype) {
        let mut rows = match dtype {
            DType::Bf16 => run_case::<B, half::bf16>(args, &mut op, &stream, &mut rendezvous, mode, &problem),
            DType::F16 => run_case::<B, half::f16>(args, &mut op, &stream, &mut rendezvous, mode, &problem),
            DType::F32 => run_case::<B, f32>(args, &mut op, &stream, &mut rendezvous, mode, &problem),
        }
        .with_context(|| format!("{mode} {}x{}", problem.rows, problem.hidden))?;
        results.append(&mut rows);
    }
    Ok((results, B::describe(&device)))
}

/// Every rank arrives before any leaves (no kernel of this demo is in flight across it).
fn meet(rendezvous: &mut dyn Rendezvous) -> Result<()> {
    checked_all_gather(rendezvous, &[], Some(0))?;
    Ok(())
}

fn run_case<B: GpuBackend, T: Element>(
    args: &DemoArgs,
    op: &mut AllReduceRmsNorm<B>,
    stream: &B::Stream,
    rendezvous: &mut dyn Rendezvous,
    mode: &str,
    problem: &Problem,
) -> Result<Vec<CaseResult>> {
    let rank = op.rank();
    let fixture = Fixture::<T>::generate(problem);
    let reference = Reference::compute(&fixture);
    let poisoned = poisoned::<T>(problem.rows * problem.hidden);
    meet(rendezvous)?;
    let input = DeviceBuffer::<B, T>::from_slice(stream, &fixture.inputs[rank])?;
    let residual = DeviceBuffer::<B, T>::from_slice(stream, &fixture.residual)?;
    let weight = DeviceBuffer::<B, T>::from_slice(stream, &fixture.weight)?;
    let mut out = DeviceBuffer::<B, T>::from_slice(stream, &poisoned)?;
    let mut residual_out = DeviceBuffer::<B, T>::from_slice(stream, &poisoned)?;
    // `--fp8`: the codes in an f32 buffer of elems / 4 words (u8 is no Element), and the scales.
    let elems = problem.rows * problem.hidden;
    let quant = args.fp8.as_deref().map(parse_fp8).transpose()?;
    let n_scales = quant.map_or(0, |q| problem.rows * q.scaling.scales_per_row(problem.hidden));
    let code_poison = vec![f32::from_bits(0xa5a5_a5a5); elems / 4];
    let mut codes = DeviceBuffer::<B, f32>::from_slice(stream, &code_poison)?;
    let mut scales = DeviceBuffer::<B, f32>::from_slice(stream, &vec![f32::NAN; n_scales.max(1)])?;
    meet(rendezvous)?;
    let mut results = Vec::new();
    for (asked, forced) in PATHS {
        // Outputs poisoned before the path's first call: every element must be written again.
        out.upload(stream, &poisoned)?;
        residual_out.upload(stream, &poisoned)?;
        codes.upload(stream, &code_poison)?;
        scales.upload(stream, &vec![f32::NAN; n_scales.max(1)])?;
        let mut call = |op: &mut AllReduceRmsNorm<B>| -> Result<Path> {
            let call = Args {
                input: TensorRef::new(&input),
                residual: TensorRef::new(&residual),
                weight: TensorRef::new(&weight),
                out: TensorMut::new(&mut out),
                residual_out: TensorMut::new(&mut residual_out),
                eps: problem.eps,
            };
            let quant = quant.map(|quant| QuantOut {
                quant,
                codes: BytesMut::new(&mut codes),
                scales: (n_scales > 0).then(|| TensorMut::new(&mut scales)),
            });
            let variant = Variant { no_residual: false, quant };
            let ran = match forced {
                Some(path) => op.forward_on_with(stream, path, call, variant)?,
                None => op.forward_with(stream, call, variant)?,
            };
            Ok(ran)
        };
        let mut ran = call(op)?;
        let start = B::record_event(stream)?;
        for _ in 0..args.iters {
            ran = call(op)?;
        }
        let end = B::record_event(stream)?;
        op.check(stream).with_context(|| format!("path {asked}"))?;
        let us = B::elapsed(&start, &end)?.as_secs_f64() * 1e6 / args.iters.max(1) as f64;
        let (out_host, residual_out_host) = (out.download(stream)?, residual_out.download(stream)?);
        results.push(case_result(rank, mode, problem, asked, ran, us, &reference, &out_host, &residual_out_host));
        let code_bytes: Vec<u8> = codes.download(stream)?.iter().flat_map(|w| w.to_bits().to_ne_bytes()).collect();
        let scales_host = scales.download(stream)?;
        let fp8 = quant.map(|quant| Fp8Out { quant, codes: &code_bytes, scales: &scales_host[..n_scales] });
        if let Some(fp8) = &fp8 {
            check_fp8(&format!("rank {rank} {problem} {asked}"), &fixture, fp8)?;
        }
        if let (Some(dir), "auto") = (&args.dump, asked) {
            dump(dir, rank, problem, &fixture, &out_host, &residual_out_host, fp8.as_ref())?;
        }
    }
    // Free only when no rank has a kernel in flight (a free can wait for the device to go idle).
    B::synchronize(stream)?;
    meet(rendezvous)?;
    drop((input, residual, weight, out, residual_out, codes, scales));
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::layout;

    #[test]
    fn ranks_spread_over_the_gpus_several_per_gpu_when_fewer() {
        assert_eq!(layout(4, 8, None), (4, 1));
        assert_eq!(layout(4, 1, None), (1, 4));
        assert_eq!(layout(4, 2, None), (2, 2));
        // 3 GPUs for 4 ranks: two per GPU, on the first two.
        assert_eq!(layout(4, 3, None), (2, 2));
        assert_eq!(layout(8, 8, Some(2)), (2, 4));
        assert_eq!(layout(2, 8, Some(0)), (1, 2));
        assert_eq!(layout(2, 1, Some(4)), (1, 2));
    }
}

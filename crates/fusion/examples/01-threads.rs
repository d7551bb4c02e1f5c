//! Two ranks as threads of one process on the cpu backend: create the operator collectively,
//! make a few calls, check the result against a plain computation.
//!
//! `cargo run -p arfuse-fusion --example 01-threads`
//!
//! Where things come from: the device and the stream from the backend (`Cpu::open_device`,
//! `Cpu::create_stream`; on a GPU, `Cuda::open_device(ordinal, ranks_sharing_it)`); the rendezvous
//! from arfuse-ipc (`ThreadRendezvous` for threads, `UnixRendezvous` for processes, or your own
//! `Rendezvous` over your engine's channel). Rows come from the lengths: `input.len() /
//! weight.len()`. Every tensor must start on a 16-byte boundary; `out` may be the input and
//! `residual_out` the residual (in place), nothing else may overlap.

use arfuse_fusion::ipc::ThreadRendezvous;
use arfuse_fusion::kernels::api::Cpu;
use arfuse_fusion::kernels::Backend;
use arfuse_fusion::{AllReduceRmsNorm, Args, Config, TensorMut, TensorRef};
use half::bf16;
use std::time::Duration;

const WORLD: usize = 2;
const HIDDEN: usize = 4096;
const ROWS: usize = 4;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let group = ThreadRendezvous::group(WORLD, Duration::from_secs(30));
    let results: Vec<Result<f32, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|mut rendezvous| scope.spawn(move || rank_main(&mut rendezvous).map_err(|e| e.to_string())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into()))).collect()
    });
    for (rank, result) in results.into_iter().enumerate() {
        println!("rank {rank}: largest |residual_out - expected| = {}", result?);
    }
    Ok(())
}

/// One rank: its own (partial) input, the shared residual and weight.
fn rank_main(rendezvous: &mut ThreadRendezvous) -> Result<f32, Box<dyn std::error::Error>> {
    use arfuse_fusion::ipc::Rendezvous;
    let rank = rendezvous.rank();
    let device = Cpu::open_device(0, 1)?;
    let stream = Cpu::create_stream(&device)?;
    // `Config::default()` is the library's defaults; `Config::from_env()` applies the `ARFUSE_*`
    // variables on top (thresholds, deadline, tune table). Change what you need with the `with_*`
    // methods (`Config` and `Policy` are `#[non_exhaustive]`): here a rank waits 10 s for a peer.
    let config = Config::default().with_deadline(std::time::Duration::from_secs(10));
    let mut op = AllReduceRmsNorm::<Cpu>::new(&device, rendezvous, config)?;
    let value = |r: usize, i: usize| ((r * 31 + i * 7) % 17) as f32 / 16.0 - 0.5;
    let input: Vec<bf16> = (0..ROWS * HIDDEN).map(|i| bf16::from_f32(value(rank, i))).collect();
    let residual: Vec<bf16> = (0..ROWS * HIDDEN).map(|i| bf16::from_f32(value(9, i))).collect();
    let weight = vec![bf16::ONE; HIDDEN];
    let mut out = vec![bf16::ZERO; ROWS * HIDDEN];
    let mut residual_out = vec![bf16::ZERO; ROWS * HIDDEN];
    for _ in 0..3 {
        let path = op.forward(
            &stream,
            Args {
                input: TensorRef::new(&input[..]),
                residual: TensorRef::new(&residual[..]),
                weight: TensorRef::new(&weight[..]),
                out: TensorMut::new(&mut out[..]),
                residual_out: TensorMut::new(&mut residual_out[..]),
                eps: 1e-6,
            },
        )?;
        if rank == 0 {
            println!("call took the {path} path");
        }
    }
    // residual_out = round(round(sum of the ranks' inputs) + residual): check it by hand.
    let worst = (0..ROWS * HIDDEN)
        .map(|i| {
            let sum: f32 = (0..WORLD).map(|r| bf16::from_f32(value(r, i)).to_f32()).sum();
            let expected = bf16::from_f32(bf16::from_f32(sum).to_f32() + residual[i].to_f32());
            (residual_out[i].to_f32() - expected.to_f32()).abs()
        })
        .fold(0.0f32, f32::max);
    if worst != 0.0 {
        return Err(format!("residual_out differs by {worst}").into());
    }
    Ok(worst)
}

//! Two rank processes on one host on the cpu backend (POSIX shared memory between them), meeting
//! over a Unix-socket rendezvous in a private directory: the way an engine with one process per
//! GPU uses arfuse (on a GPU host the backend is `Cuda` or `Hip` and the buffers are shared over
//! CUDA/HIP IPC instead).
//!
//! `cargo run -p arfuse-fusion --example 02-processes` starts both ranks itself (it re-runs its
//! own binary with `ARFUSE_EXAMPLE_RANK` set); an engine's launcher would start them instead.

use arfuse_fusion::ipc::UnixRendezvous;
use arfuse_fusion::kernels::api::Cpu;
use arfuse_fusion::kernels::Backend;
use arfuse_fusion::{AllReduceRmsNorm, Args, Config, TensorMut, TensorRef};
use half::f16;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const WORLD: usize = 2;
const HIDDEN: usize = 2880;
const ROWS: usize = 16;
const RANK_ENV: &str = "ARFUSE_EXAMPLE_RANK";
const DIR_ENV: &str = "ARFUSE_EXAMPLE_DIR";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let (Ok(rank), Ok(dir)) = (std::env::var(RANK_ENV), std::env::var(DIR_ENV)) {
        return rank_main(rank.parse()?, PathBuf::from(dir));
    }
    // The launcher: a private (0700) directory for the rendezvous, one process per rank.
    let dir = std::env::temp_dir().join(format!("arfuse-example-{}", std::process::id()));
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..WORLD)
        .map(|rank| Command::new(&exe).env(RANK_ENV, rank.to_string()).env(DIR_ENV, &dir).spawn())
        .collect::<Result<_, _>>()?;
    let mut failed = false;
    for (rank, mut child) in children.into_iter().enumerate() {
        let status = child.wait()?;
        println!("rank {rank} exited: {status}");
        failed |= !status.success();
    }
    let _ = std::fs::remove_dir(&dir);
    if failed {
        return Err("a rank failed".into());
    }
    Ok(())
}

fn rank_main(rank: usize, dir: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let mut rendezvous = UnixRendezvous::connect(&dir, rank, WORLD, Duration::from_secs(30))?;
    let device = Cpu::open_device(0, 1)?;
    let stream = Cpu::create_stream(&device)?;
    let mut op = AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, Config::from_env()?)?;
    let value = |r: usize, i: usize| ((r * 13 + i * 5) % 23) as f32 / 8.0 - 1.25;
    // In place: `out` is written over the input, `residual_out` over the residual.
    let mut hidden_states: Vec<f16> = (0..ROWS * HIDDEN).map(|i| f16::from_f32(value(rank, i))).collect();
    let mut residual: Vec<f16> = (0..ROWS * HIDDEN).map(|i| f16::from_f32(value(7, i))).collect();
    let weight: Vec<f16> = (0..HIDDEN).map(|j| f16::from_f32(1.0 + (j % 3) as f32 / 8.0)).collect();
    let before = residual.clone();
    let input_ptr = arfuse_fusion::kernels::DevicePtr(hidden_states.as_mut_ptr() as u64);
    let residual_ptr = arfuse_fusion::kernels::DevicePtr(residual.as_mut_ptr() as u64);
    // SAFETY: both vectors hold ROWS * HIDDEN elements, outlive the call (which has finished when
    // `forward` returns on the cpu backend), and nothing else touches them meanwhile; the only
    // overlaps are the two in-place forms the operator allows.
    let args = unsafe {
        Args {
            input: TensorRef::from_raw(input_ptr, ROWS * HIDDEN),
            residual: TensorRef::from_raw(residual_ptr, ROWS * HIDDEN),
            weight: TensorRef::new(&weight[..]),
            out: TensorMut::from_raw(input_ptr, ROWS * HIDDEN),
            residual_out: TensorMut::from_raw(residual_ptr, ROWS * HIDDEN),
            eps: 1e-5,
        }
    };
    let path = op.forward::<f16>(&stream, args)?;
    // residual_out = round(round(x_0 + x_1) + residual), now in `residual`.
    for i in 0..ROWS * HIDDEN {
        let sum: f32 = (0..WORLD).map(|r| f16::from_f32(value(r, i)).to_f32()).sum();
        let expected = f16::from_f32(f16::from_f32(sum).to_f32() + before[i].to_f32());
        if residual[i].to_bits() != expected.to_bits() {
            return Err(format!("rank {rank}: residual_out[{i}] = {} != {}", residual[i], expected).into());
        }
    }
    println!("rank {rank}: {ROWS}x{HIDDEN} f16 on the {path} path, in place, residual_out exact");
    Ok(())
}

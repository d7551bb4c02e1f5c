//! Integration tests of the operator on the cpu backend: ranks as threads and as processes.

mod epilogues;
mod events;
mod faults;
mod instep;
mod kills;
mod leaks;
mod load;
mod matrix;
mod ordering;
mod processes;
mod quantize;
mod refusals;
mod snapshots;

use arfuse_fusion::{AllReduce, AllReduceRmsNorm, Args, Config, FallbackReason, Path, TensorMut, TensorRef};
use arfuse_ipc::ThreadRendezvous;
use arfuse_kernels::api::Cpu;
use arfuse_kernels::cpu::CpuStream;
use arfuse_kernels::{Backend, Element};
use arfuse_testkit::{poison, run_threads_each, Fixture};
use std::time::Duration;

/// The unfused path, forced.
pub(crate) const UNFUSED: Path = Path::Unfused { all_reduce: AllReduce::Custom, reason: FallbackReason::Disabled };
/// Every path the cpu backend runs.
pub(crate) const PATHS: [Path; 3] = [Path::OneStage, Path::TwoStage, UNFUSED];

/// A config for tests: small buffers (every test shape still fuses, and 1-stage can be forced on
/// any fused size: the push slots are as large as max_size / 2), a short deadline.
pub(crate) fn test_config(max_size: usize) -> Config {
    let mut config = Config::default();
    config.policy.max_size = max_size;
    config.policy.push_slot_bytes = max_size / 2;
    config.deadline = Duration::from_secs(20);
    config
}

/// Runs `body` on every rank of a group of `world` threads, each with its own operator.
pub(crate) fn run_group<R: Send>(
    world: usize,
    config: Config,
    body: impl Fn(&mut AllReduceRmsNorm<Cpu>, &CpuStream) -> R + Sync,
) -> Vec<R> {
    run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(30)), |_, mut rendezvous| {
        let device = Cpu::open_device(0, 1).expect("cpu device");
        let stream = Cpu::create_stream(&device).expect("cpu stream");
        let mut op = AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, config).expect("operator");
        body(&mut op, &stream)
    })
}

/// The outputs of one call.
pub(crate) struct Outputs<T> {
    pub(crate) path: Path,
    pub(crate) out: Vec<T>,
    pub(crate) residual_out: Vec<T>,
}

/// One call of this rank on `fixture` (outputs poisoned first); `path` forces a path.
pub(crate) fn call<T: Element>(
    op: &mut AllReduceRmsNorm<Cpu>,
    stream: &CpuStream,
    path: Option<Path>,
    fixture: &Fixture<T>,
) -> arfuse_fusion::Result<Outputs<T>> {
    let elems = fixture.residual.len();
    let mut out = vec![T::from_f32(0.0); elems];
    let mut residual_out = vec![T::from_f32(0.0); elems];
    poison(&mut out);
    poison(&mut residual_out);
    let args = Args {
        input: TensorRef::new(&fixture.inputs[op.rank()][..]),
        residual: TensorRef::new(&fixture.residual[..]),
        weight: TensorRef::new(&fixture.weight[..]),
        out: TensorMut::new(&mut out[..]),
        residual_out: TensorMut::new(&mut residual_out[..]),
        eps: fixture.problem.eps,
    };
    let path = match path {
        Some(path) => op.forward_on(stream, path, args)?,
        None => op.forward(stream, args)?,
    };
    Ok(Outputs { path, out, residual_out })
}

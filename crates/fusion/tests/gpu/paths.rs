//! Every path of the operator on every world size and both dtypes: against the reference, and the
//! same `out` whichever path ran.

use crate::{gpu_available, UNFUSED};
use arfuse_fusion::{AllReduceRmsNorm, Args, Config, Path, TensorMut, TensorRef};
use arfuse_ipc::ThreadRendezvous;
use arfuse_kernels::gpu::DeviceBuffer;
use arfuse_kernels::{Element, GpuBackend};
use arfuse_testkit::{assert_all_written, poisoned, run_threads_each, Fixture, Problem, Reference, TestSeed};
use half::{bf16, f16};
use std::time::Duration;

fn check<B: GpuBackend, T: Element>(world: usize, shapes: &[(usize, usize)], seed: &TestSeed) {
    let cases: Vec<(Fixture<T>, Reference<T>)> = shapes
        .iter()
        .map(|&(rows, hidden)| {
            let problem =
                Problem::new(world, rows, hidden, T::DTYPE).with_seed(seed.derive_named(&format!("{rows}x{hidden}")));
            let fixture = Fixture::generate(&problem);
            let reference = Reference::compute(&fixture);
            (fixture, reference)
        })
        .collect();
    let mut config = Config::default().with_deadline(Duration::from_secs(10));
    // Push slots large enough to force the 1-stage path on every case.
    config.policy.push_slot_bytes = cases.iter().map(|(f, _)| f.residual.len() * T::DTYPE.size()).max().unwrap_or(16);
    // Ranks allocate and free device memory only while no kernel spins (a free can wait for the
    // device to go idle): every case starts and ends at this barrier.
    let phase = std::sync::Barrier::new(world);
    run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
        let device = B::open_device(0, world).expect("device");
        let stream = B::create_stream(&device).expect("stream");
        let mut op = AllReduceRmsNorm::<B>::new(&device, &mut rendezvous, config).expect("operator");
        for (fixture, reference) in &cases {
            let input = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.inputs[rank]).expect("input");
            let residual = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.residual).expect("residual");
            let weight = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.weight).expect("weight");
            let poisoned = poisoned::<T>(fixture.residual.len());
            let mut out = DeviceBuffer::<B, _>::from_slice(&stream, &poisoned).expect("out");
            let mut residual_out = DeviceBuffer::<B, _>::from_slice(&stream, &poisoned).expect("residual_out");
            phase.wait();
            let mut first_out: Option<Vec<T>> = None;
            for path in [None, Some(Path::OneStage), Some(Path::TwoStage), Some(UNFUSED)] {
                out.upload(&stream, &poisoned).expect("poison out");
                residual_out.upload(&stream, &poisoned).expect("poison residual_out");
                let args = Args {
                    input: TensorRef::new(&input),
                    residual: TensorRef::new(&residual),
                    weight: TensorRef::new(&weight),
                    out: TensorMut::new(&mut out),
                    residual_out: TensorMut::new(&mut residual_out),
                    eps: fixture.problem.eps,
                };
                let ran = match path {
                    Some(path) => op.forward_on(&stream, path, args),
                    None => op.forward(&stream, args),
                }
                .expect("forward");
                op.check(&stream).expect("no peer failure");
                let what = format!("{} rank {rank} {} {ran}", B::KIND, fixture.problem);
                let out = out.download(&stream).expect("download");
                let residual_out = residual_out.download(&stream).expect("download");
                assert_all_written(&what, &out);
                assert_all_written(&what, &residual_out);
                reference.assert_residual_out_exact(&what, &residual_out);
                reference.assert_out_within(&what, &out, 1);
                match &first_out {
                    None => first_out = Some(out),
                    Some(first) => {
                        assert!(
                            first.iter().zip(&out).all(|(a, b)| a.to_bits_u32() == b.to_bits_u32()),
                            "{what}: out differs by path"
                        )
                    }
                }
            }
        }
    });
    println!("{} operator: world {world} {} {} shapes x 4 paths: exact", B::KIND, T::DTYPE, shapes.len());
}

pub(crate) fn operator_every_path_matches_the_reference<B: GpuBackend>(test: &str) {
    if !gpu_available::<B>(test) {
        return;
    }
    let seed = TestSeed::new(&format!("{0}::operator_on_{0}", B::KIND));
    let shapes = [(1, 4096), (4, 2880), (16, 8192), (81, 5120), (128, 16384), (8192, 4096)];
    for world in [2, 4, 8] {
        check::<B, bf16>(world, &shapes, &seed);
        check::<B, f16>(world, &shapes[..4], &seed);
    }
}

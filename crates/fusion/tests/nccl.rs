//! The vendor collective fallback on NVIDIA: NCCL's all-reduce into `out`, then our add+RMSNorm
//! kernel, checked against the testkit reference.
//!
//! Skips loudly (prints why) without a CUDA device or without a loadable NCCL (`libnccl.so.2`,
//! `libnccl.so`, or `ARFUSE_NCCL_LIBRARY`); fails instead when `ARFUSE_REQUIRE_BACKENDS` names
//! `nccl`. The world-2 test needs two GPUs (NCCL refuses two ranks of one group on one GPU) and
//! skips loudly on a machine with fewer, whatever `ARFUSE_REQUIRE_BACKENDS` says.
//!
//! Run on a GPU machine: `cargo test -p arfuse-fusion --test nccl -- --nocapture`.
#![cfg(feature = "cuda")]

use arfuse_fusion::{AllReduce, AllReduceRmsNorm, Args, Config, FallbackReason, Path, TensorMut, TensorRef};
use arfuse_ipc::ThreadRendezvous;
use arfuse_kernels::api::Cuda;
use arfuse_kernels::collective::{CollectiveBackend, Library, Vendor};
use arfuse_kernels::cuda::CudaBuffer;
use arfuse_kernels::{Backend, Element};
use arfuse_testkit::reference::add_residual_element;
use arfuse_testkit::{assert_all_written, poisoned, run_threads_each, Fixture, Problem, Reference, TestSeed};
use half::bf16;
use std::time::Duration;

/// The vendor path, forced (the reason is informational).
const VENDOR: Path = Path::Unfused { all_reduce: AllReduce::Vendor, reason: FallbackReason::TooLarge };

const SHAPES: [(usize, usize); 3] = [(1, 4096), (16, 8192), (128, 5120)];

/// Whether this machine can run the test: `min_devices` CUDA devices and a loadable NCCL.
fn nccl_available(test: &str, min_devices: usize) -> bool {
    let available = match Cuda::device_count() {
        Ok(0) => Err("no CUDA device".to_string()),
        Ok(n) if n < min_devices => {
            // A property of the machine, not a missing backend: skip even where nccl is required.
            let why = format!("{n} CUDA device(s), the test needs {min_devices} (NCCL: one GPU per rank)");
            return arfuse_testkit::skip::skip("nccl", test, why);
        }
        Ok(_) => match Library::open(Vendor::Nccl) {
            Ok(library) => {
                let (major, minor, patch) = library.version();
                println!("{test}: NCCL {major}.{minor}.{patch} from {}", library.path());
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    arfuse_testkit::require_backend("nccl", test, available)
}

/// `fixture` with every `-0.0` input turned into `+0.0`. The contract's sum maps `-0.0` to `+0.0`;
/// NCCL's does not (an all-`-0.0` element stays `-0.0`), so on inputs without `-0.0` the library's
/// sum of one or two ranks is exactly the contract's (one f32 addition at most, rounded once), and
/// the ordinary reference applies. The library's own `-0.0` is checked separately below.
fn without_negative_zero_inputs<T: Element>(mut fixture: Fixture<T>) -> Fixture<T> {
    for input in &mut fixture.inputs {
        for v in input.iter_mut() {
            *v = v.canonical_zero();
        }
    }
    fixture
}

/// One rank's calls over every shape: the vendor path forced, then the dispatcher's own choice
/// (with a max_size of 1 MiB, fused up to 512 KiB, 128x5120 bf16 = 1.25 MiB is too large and goes to the vendor).
fn rank_calls(
    op: &mut AllReduceRmsNorm<Cuda>,
    stream: &<Cuda as Backend>::Stream,
    rank: usize,
    cases: &[(Fixture<bf16>, Reference<bf16>)],
) {
    for (fixture, reference) in cases {
        let input = CudaBuffer::from_slice(stream, &fixture.inputs[rank]).expect("input");
        let residual = CudaBuffer::from_slice(stream, &fixture.residual).expect("residual");
        let weight = CudaBuffer::from_slice(stream, &fixture.weight).expect("weight");
        let poisoned = poisoned::<bf16>(fixture.residual.len());
        let mut out = CudaBuffer::from_slice(stream, &poisoned).expect("out");
        let mut residual_out = CudaBuffer::from_slice(stream, &poisoned).expect("residual_out");
        for forced in [Some(VENDOR), None] {
            out.upload(stream, &poisoned).expect("poison out");
            residual_out.upload(stream, &poisoned).expect("poison residual_out");
            let args = Args {
                input: TensorRef::new(&input),
                residual: TensorRef::new(&residual),
                weight: TensorRef::new(&weight),
                out: TensorMut::new(&mut out),
                residual_out: TensorMut::new(&mut residual_out),
                eps: fixture.problem.eps,
            };
            let ran = match forced {
                Some(path) => op.forward_on(stream, path, args),
                None => op.forward(stream, args),
            }
            .expect("forward");
            op.check(stream).expect("no failure");
            assert_eq!(op.last_path(), Some(ran));
            if forced.is_some() {
                assert_eq!(ran.to_string(), "vendor");
            }
            if fixture.problem.bytes() > op.config().policy.max_size / 2 {
                assert_eq!(ran, VENDOR, "{}: too large for our kernels (max_size / 2)", fixture.problem);
            }
            let what = format!("nccl rank {rank} {} {ran}", fixture.problem);
            let got_out = out.download(stream).expect("download");
            let got_residual_out = residual_out.download(stream).expect("download");
            assert_all_written(&what, &got_out);
            assert_all_written(&what, &got_residual_out);
            reference.assert_residual_out_exact(&what, &got_residual_out);
            reference.assert_out_within(&what, &got_out, 1);
        }
    }
}

fn cases(world: usize, seed: &TestSeed) -> Vec<(Fixture<bf16>, Reference<bf16>)> {
    SHAPES
        .iter()
        .map(|&(rows, hidden)| {
            let problem = Problem::new(world, rows, hidden, bf16::DTYPE)
                .with_seed(seed.derive_named(&format!("{rows}x{hidden}")));
            let fixture = without_negative_zero_inputs(Fixture::generate(&problem));
            let reference = Reference::compute(&fixture);
            (fixture, reference)
        })
        .collect()
}

fn config() -> Config {
    let mut config = Config::default().with_deadline(Duration::from_secs(10));
    config.policy.max_size = 1 << 20;
    config
}

#[test]
fn nccl_vendor_path_world_1_matches_the_reference() {
    let test = "nccl_vendor_path_world_1_matches_the_reference";
    if !nccl_available(test, 1) {
        return;
    }
    let cases = cases(1, &TestSeed::new("nccl::vendor_world_1"));
    let mut rendezvous = ThreadRendezvous::group(1, Duration::from_secs(60)).pop().expect("rank 0");
    let device = Cuda::open_device(0, 1).expect("device");
    let mut op = AllReduceRmsNorm::<Cuda>::with_collective(&device, &mut rendezvous, config()).expect("operator");
    assert!(op.config().policy.vendor_available);
    let comm = op.communicator().expect("communicator");
    assert_eq!((comm.rank(), comm.world_size(), comm.is_owned()), (0, 1, true));
    let stream = Cuda::create_stream(&device).expect("stream");
    rank_calls(&mut op, &stream, 0, &cases);
    println!("{test}: bf16 {SHAPES:?}, vendor and dispatched paths: residual_out exact, out within 1 ulp");
}

/// The documented guarantee itself, on a fixture with `-0.0` inputs: `residual_out` is bit-exact
/// against the contract's step 2 applied to the library's own sum (read back from a direct
/// all-reduce through the same communicator, which the operator then takes over).
#[test]
fn nccl_residual_out_is_exact_against_the_librarys_own_sum() {
    let test = "nccl_residual_out_is_exact_against_the_librarys_own_sum";
    if !nccl_available(test, 1) {
        return;
    }
    let (rows, hidden) = (16, 8192);
    let problem = Problem::new(1, rows, hidden, bf16::DTYPE).with_seed(TestSeed::new("nccl::own_sum").seed());
    let fixture = Fixture::<bf16>::generate(&problem);
    let mut rendezvous = ThreadRendezvous::group(1, Duration::from_secs(60)).pop().expect("rank 0");
    let device = Cuda::open_device(0, 1).expect("device");
    let stream = &Cuda::create_stream(&device).expect("stream");
    let mut comm = arfuse_fusion::vendor::create_communicator::<Cuda>(&device, &mut rendezvous).expect("communicator");
    let input = CudaBuffer::from_slice(stream, &fixture.inputs[0]).expect("input");
    let residual = CudaBuffer::from_slice(stream, &fixture.residual).expect("residual");
    let weight = CudaBuffer::from_slice(stream, &fixture.weight).expect("weight");
    let poisoned = poisoned::<bf16>(fixture.residual.len());
    let sum = CudaBuffer::from_slice(stream, &poisoned).expect("sum");
    // SAFETY: `input` and `sum` are live allocations of `rows * hidden` bf16 on this device, kept
    // until the download below has synchronised the stream.
    unsafe {
        comm.all_reduce_sum(
            input.device_ptr(),
            sum.device_ptr(),
            rows * hidden,
            bf16::DTYPE,
            <Cuda as CollectiveBackend>::raw_stream(stream),
        )
    }
    .expect("ncclAllReduce");
    let library_sum = sum.download(stream).expect("download sum");
    assert_all_written("library sum", &library_sum);
    comm.async_error().expect("no asynchronous error");

    let mut op =
        AllReduceRmsNorm::<Cuda>::with_communicator(&device, &mut rendezvous, config(), comm).expect("operator");
    let mut out = CudaBuffer::from_slice(stream, &poisoned).expect("out");
    let mut residual_out = CudaBuffer::from_slice(stream, &poisoned).expect("residual_out");
    let args = Args {
        input: TensorRef::new(&input),
        residual: TensorRef::new(&residual),
        weight: TensorRef::new(&weight),
        out: TensorMut::new(&mut out),
        residual_out: TensorMut::new(&mut residual_out),
        eps: problem.eps,
    };
    assert_eq!(op.forward_on(stream, VENDOR, args).expect("forward"), VENDOR);
    op.check(stream).expect("no failure");
    let got = residual_out.download(stream).expect("download");
    assert_all_written(test, &got);
    assert_all_written(test, &out.download(stream).expect("download"));
    let mut kept_negative_zero = 0;
    for (i, ((&s, &r), &g)) in library_sum.iter().zip(&fixture.residual).zip(&got).enumerate() {
        let expected = add_residual_element(s, r);
        assert_eq!(g.to_bits(), expected.to_bits(), "{test}: element {i}: sum {s:?} + residual {r:?} gave {g:?}");
        kept_negative_zero += usize::from(s.to_bits() == 0x8000);
    }
    println!("{test}: {rows}x{hidden} bf16 exact against the library's sum ({kept_negative_zero} elements of -0.0 kept by NCCL)");
}

#[test]
fn nccl_vendor_path_world_2_matches_the_reference() {
    let test = "nccl_vendor_path_world_2_matches_the_reference";
    let world = 2;
    if !nccl_available(test, world) {
        return;
    }
    let cases = cases(world, &TestSeed::new("nccl::vendor_world_2"));
    run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
        let device = Cuda::open_device(rank, 1).expect("device");
        let mut op = AllReduceRmsNorm::<Cuda>::with_collective(&device, &mut rendezvous, config()).expect("operator");
        let stream = Cuda::create_stream(&device).expect("stream");
        rank_calls(&mut op, &stream, rank, &cases);
    });
    println!("{test}: bf16 {SHAPES:?}, two GPUs: residual_out exact, out within 1 ulp");
}

/// Issue 17's epilogues on the vendor path (NCCL's sum, then our add+RMSNorm epilogue kernel):
/// FP8 codes and scales of every format × scaling, no residual, bit-exact against testkit's
/// independent computation, world 1 (inputs without `-0.0`, as above).
#[test]
fn nccl_vendor_path_epilogues_are_exact() {
    use arfuse_fusion::{BytesMut, QuantOut, Variant};
    use arfuse_kernels::contract::Fp8Format;
    use arfuse_testkit::quant::{
        all_epilogues, assert_codes_exact, assert_exact, assert_scales_exact, quant_fixture, saturating_scale,
        ExactOutputs,
    };
    let test = "nccl_vendor_path_epilogues_are_exact";
    if !nccl_available(test, 1) {
        return;
    }
    let mut rendezvous = ThreadRendezvous::group(1, Duration::from_secs(60)).pop().expect("rank 0");
    let device = Cuda::open_device(0, 1).expect("device");
    let mut op = AllReduceRmsNorm::<Cuda>::with_collective(&device, &mut rendezvous, config()).expect("operator");
    let stream = Cuda::create_stream(&device).expect("stream");
    let (rows, hidden) = (9, 4096);
    let problem = Problem::new(1, rows, hidden, bf16::DTYPE).with_seed(TestSeed::new("nccl::epilogues").seed());
    let fixture = without_negative_zero_inputs(quant_fixture::<bf16>(&problem));
    let elems = rows * hidden;
    let input = CudaBuffer::from_slice(&stream, &fixture.inputs[0]).expect("input");
    let residual = CudaBuffer::from_slice(&stream, &fixture.residual).expect("residual");
    let weight = CudaBuffer::from_slice(&stream, &fixture.weight).expect("weight");
    let poison = poisoned::<bf16>(elems);
    let mut out = CudaBuffer::from_slice(&stream, &poison).expect("out");
    let mut residual_out = CudaBuffer::from_slice(&stream, &poison).expect("residual_out");
    let mut codes = CudaBuffer::<f32>::from_slice(&stream, &vec![f32::NAN; elems / 4]).expect("codes");
    let mut scales = CudaBuffer::<f32>::from_slice(&stream, &vec![f32::NAN; rows * hidden / 128]).expect("scales");
    let mut checked = 0;
    for format in Fp8Format::ALL {
        for e in all_epilogues(saturating_scale(format))
            .into_iter()
            .filter(|e| e.norm == arfuse_fusion::Norm::Standard && e.quant.is_none_or(|q| q.format == format))
        {
            let want = ExactOutputs::compute(&fixture, &e);
            let per_row = e.quant.map_or(0, |q| q.scaling.scales_per_row(hidden));
            out.upload(&stream, &poison).expect("poison");
            residual_out.upload(&stream, &poison).expect("poison");
            codes.upload(&stream, &vec![f32::NAN; elems / 4]).expect("poison");
            scales.upload(&stream, &vec![f32::NAN; rows * hidden / 128]).expect("poison");
            let n = if e.no_residual { 0 } else { elems };
            // SAFETY: every buffer holds at least the length given and stays live and otherwise
            // untouched until `check` below.
            let (residual_arg, residual_out_arg, quant) = unsafe {
                (
                    TensorRef::from_raw(residual.device_ptr(), n),
                    TensorMut::from_raw(residual_out.device_ptr(), n),
                    e.quant.map(|quant| QuantOut {
                        quant,
                        codes: BytesMut::from_raw(codes.device_ptr(), elems),
                        scales: (per_row > 0).then(|| TensorMut::from_raw(scales.device_ptr(), rows * per_row)),
                    }),
                )
            };
            let args = Args {
                input: TensorRef::new(&input),
                residual: residual_arg,
                weight: TensorRef::new(&weight),
                out: TensorMut::new(&mut out),
                residual_out: residual_out_arg,
                eps: problem.eps,
            };
            let ran = op
                .forward_on_with(&stream, VENDOR, args, Variant { no_residual: e.no_residual, quant })
                .expect("forward");
            op.check(&stream).expect("no failure");
            assert_eq!(ran, VENDOR);
            let what = format!("nccl {problem} {e:?}");
            assert_exact(&format!("{what} out"), &want.out, &out.download(&stream).expect("download"));
            if !e.no_residual {
                let got = residual_out.download(&stream).expect("download");
                assert_exact(&format!("{what} residual_out"), &want.residual_out, &got);
            }
            if e.quant.is_some() {
                let words = codes.download(&stream).expect("download");
                let got: Vec<u8> = words.iter().flat_map(|w| w.to_bits().to_ne_bytes()).collect();
                assert_codes_exact(&what, &want.codes, &got);
                let got_scales = scales.download(&stream).expect("download");
                assert_scales_exact(&what, &want.scales, &got_scales[..rows * per_row]);
            }
            checked += 1;
        }
    }
    println!("{test}: {checked} epilogues on the vendor path, bf16 {rows}x{hidden}: exact");
}

//! Bad input is refused with a typed error before anything runs, and nothing is written.

use super::{call, run_group, test_config};
use arfuse_fusion::{AllReduceRmsNorm, Args, Config, Error, TensorMut, TensorRef};
use arfuse_ipc::ThreadRendezvous;
use arfuse_kernels::api::Cpu;
use arfuse_kernels::Backend;
use arfuse_testkit::{is_poison, poison, Fixture, Problem, TestSeed};
use half::bf16;
use std::time::Duration;

fn bf(x: f32) -> bf16 {
    bf16::from_f32(x)
}

/// Tensors for a call of `rows` x `hidden`, with `out`/`residual_out` poisoned.
struct Bufs {
    input: Vec<bf16>,
    residual: Vec<bf16>,
    weight: Vec<bf16>,
    out: Vec<bf16>,
    residual_out: Vec<bf16>,
}

impl Bufs {
    fn new(rows: usize, hidden: usize) -> Self {
        let n = rows * hidden;
        let mut b = Bufs {
            input: (0..n).map(|i| bf(i as f32 * 0.25 - 3.0)).collect(),
            residual: (0..n).map(|i| bf(1.0 - i as f32 * 0.125)).collect(),
            weight: (0..hidden).map(|i| bf(0.5 + i as f32 * 0.01)).collect(),
            out: vec![bf(0.0); n + 8],
            residual_out: vec![bf(0.0); n + 8],
        };
        poison(&mut b.out);
        poison(&mut b.residual_out);
        b
    }
    fn untouched(&self) -> bool {
        self.out.iter().chain(&self.residual_out).all(|&v| is_poison(v))
    }
}

#[test]
fn every_bad_input_is_refused_before_anything_runs() {
    let seed = TestSeed::new("refusals::every_bad_input");
    run_group(2, test_config(1 << 20), |op, stream| {
        let hidden = 64;
        let rows = 4;
        let n = rows * hidden;
        // Each case: a description, a call built from fresh buffers, the expected error.
        type Check = fn(&Error) -> bool;
        type Build = Box<dyn Fn(&mut Bufs) -> Args<'_, Cpu, bf16>>;
        let cases: Vec<(&str, Build, Check)> = vec![
            (
                "hidden not a multiple of the pack",
                Box::new(|b: &mut Bufs| Args {
                    input: TensorRef::new(&b.input[..60]),
                    residual: TensorRef::new(&b.residual[..60]),
                    weight: TensorRef::new(&b.weight[..60]),
                    out: TensorMut::new(&mut b.out[..60]),
                    residual_out: TensorMut::new(&mut b.residual_out[..60]),
                    eps: 1e-6,
                }),
                |e| matches!(e, Error::HiddenNotMultipleOfPack { hidden: 60, pack: 8, .. }),
            ),
            (
                "residual shorter than input",
                Box::new(move |b: &mut Bufs| Args {
                    input: TensorRef::new(&b.input[..]),
                    residual: TensorRef::new(&b.residual[..n - hidden]),
                    weight: TensorRef::new(&b.weight[..]),
                    out: TensorMut::new(&mut b.out[..n]),
                    residual_out: TensorMut::new(&mut b.residual_out[..n]),
                    eps: 1e-6,
                }),
                |e| matches!(e, Error::ShapeMismatch { what: "residual", .. }),
            ),
            (
                "out longer than input",
                Box::new(move |b: &mut Bufs| Args {
                    input: TensorRef::new(&b.input[..]),
                    residual: TensorRef::new(&b.residual[..]),
                    weight: TensorRef::new(&b.weight[..]),
                    out: TensorMut::new(&mut b.out[..]),
                    residual_out: TensorMut::new(&mut b.residual_out[..n]),
                    eps: 1e-6,
                }),
                |e| matches!(e, Error::ShapeMismatch { what: "out", .. }),
            ),
            (
                "input not a whole number of rows",
                Box::new(move |b: &mut Bufs| Args {
                    input: TensorRef::new(&b.input[..n - 8]),
                    residual: TensorRef::new(&b.residual[..n - 8]),
                    weight: TensorRef::new(&b.weight[..]),
                    out: TensorMut::new(&mut b.out[..n - 8]),
                    residual_out: TensorMut::new(&mut b.residual_out[..n - 8]),
                    eps: 1e-6,
                }),
                |e| matches!(e, Error::ShapeMismatch { .. }),
            ),
            (
                "misaligned input",
                Box::new(move |b: &mut Bufs| Args {
                    input: TensorRef::new(&b.input[1..n - hidden + 1]),
                    residual: TensorRef::new(&b.residual[..n - hidden]),
                    weight: TensorRef::new(&b.weight[..]),
                    out: TensorMut::new(&mut b.out[..n - hidden]),
                    residual_out: TensorMut::new(&mut b.residual_out[..n - hidden]),
                    eps: 1e-6,
                }),
                |e| matches!(e, Error::Misaligned { what: "input", align: 16, .. }),
            ),
            (
                "eps NaN",
                Box::new(move |b: &mut Bufs| Args {
                    input: TensorRef::new(&b.input[..]),
                    residual: TensorRef::new(&b.residual[..]),
                    weight: TensorRef::new(&b.weight[..]),
                    out: TensorMut::new(&mut b.out[..n]),
                    residual_out: TensorMut::new(&mut b.residual_out[..n]),
                    eps: f32::NAN,
                }),
                |e| matches!(e, Error::BadEps { .. }),
            ),
            (
                "eps infinite",
                Box::new(move |b: &mut Bufs| Args {
                    input: TensorRef::new(&b.input[..]),
                    residual: TensorRef::new(&b.residual[..]),
                    weight: TensorRef::new(&b.weight[..]),
                    out: TensorMut::new(&mut b.out[..n]),
                    residual_out: TensorMut::new(&mut b.residual_out[..n]),
                    eps: f32::INFINITY,
                }),
                |e| matches!(e, Error::BadEps { .. }),
            ),
            (
                "empty weight",
                Box::new(move |b: &mut Bufs| Args {
                    input: TensorRef::new(&b.input[..]),
                    residual: TensorRef::new(&b.residual[..]),
                    weight: TensorRef::new(&b.weight[..0]),
                    out: TensorMut::new(&mut b.out[..n]),
                    residual_out: TensorMut::new(&mut b.residual_out[..n]),
                    eps: 1e-6,
                }),
                |e| matches!(e, Error::HiddenUnsupported { hidden: 0, .. }),
            ),
        ];
        for (what, build, expected) in &cases {
            let mut bufs = Bufs::new(rows, hidden);
            let args = build(&mut bufs);
            let err = op.forward(stream, args).expect_err(what);
            assert!(expected(&err), "{what}: unexpected error {err}");
            assert!(bufs.untouched(), "{what}: outputs written although the call was refused");
        }
        // The refusals launched nothing: the group is still in step and a valid call is exact.
        let problem = Problem::new(2, rows, hidden, arfuse_kernels::DType::Bf16).with_seed(seed.seed());
        let fixture = Fixture::<bf16>::generate(&problem);
        let reference = arfuse_testkit::Reference::compute(&fixture);
        let got = call(op, stream, None, &fixture).expect("valid call after refusals");
        reference.assert_residual_out_exact("after refusals", &got.residual_out);
    });
}

#[test]
fn world_sizes_beyond_the_kernels_are_refused_at_creation() {
    for world in [9usize, 12] {
        let mut group = ThreadRendezvous::group(world, Duration::from_secs(5));
        let device = Cpu::open_device(0, 1).expect("cpu");
        let err = AllReduceRmsNorm::<Cpu>::new(&device, &mut group[0], Config::default()).expect_err("world > 8");
        assert!(matches!(err, Error::WorldSizeUnsupported { world_size, .. } if world_size == world), "{err}");
    }
}

#[test]
fn invalid_config_is_refused_at_creation() {
    let mut group = ThreadRendezvous::group(1, Duration::from_secs(5));
    let device = Cpu::open_device(0, 1).expect("cpu");
    let mut config = Config::default();
    config.policy.max_size = 1000;
    let err = AllReduceRmsNorm::<Cpu>::new(&device, &mut group[0], config).expect_err("bad max_size");
    assert!(matches!(err, Error::Config(_)), "{err}");
}

/// An operator without a communicator of the vendor library: its policy says so whatever the
/// configuration claimed, a tensor above max_size / 2 takes our custom all-reduce,
/// and the vendor path, forced, is refused with a typed error before anything is written.
#[test]
fn without_a_communicator_the_vendor_path_is_refused_and_sizes_stay_custom() {
    use arfuse_fusion::{AllReduce, FallbackReason, Path};
    let seed = TestSeed::new("refusals::vendor_unavailable");
    let mut config = test_config(1 << 14);
    config.policy.vendor_available = true;
    run_group(2, config, |op, stream| {
        assert!(!op.config().policy.vendor_available, "no communicator, so no vendor");
        assert!(op.communicator().is_none());
        assert_eq!(op.last_path(), None);
        let (rows, hidden) = (4, 64);
        for reason in [FallbackReason::NoPeerAccess, FallbackReason::MultiHost, FallbackReason::TooLarge] {
            let mut bufs = Bufs::new(rows, hidden);
            let n = rows * hidden;
            let args = Args {
                input: TensorRef::new(&bufs.input[..]),
                residual: TensorRef::new(&bufs.residual[..]),
                weight: TensorRef::new(&bufs.weight[..]),
                out: TensorMut::new(&mut bufs.out[..n]),
                residual_out: TensorMut::new(&mut bufs.residual_out[..n]),
                eps: 1e-6,
            };
            let err = op
                .forward_on(stream, Path::Unfused { all_reduce: AllReduce::Vendor, reason }, args)
                .expect_err("no vendor library");
            assert!(matches!(err, Error::VendorUnavailable { .. }), "{reason:?}: unexpected error {err}");
            assert!(bufs.untouched(), "{reason:?}: outputs written although the call was refused");
            assert_eq!(op.last_path(), None, "a refused call is not the last path");
        }
        // 64 rows x 128 bf16 = 16 KiB > max_size / 2 = 8 KiB: too large, custom all-reduce in chunks.
        let problem = Problem::new(2, 64, 128, arfuse_kernels::DType::Bf16).with_seed(seed.seed());
        let fixture = Fixture::<bf16>::generate(&problem);
        let reference = arfuse_testkit::Reference::compute(&fixture);
        let got = call(op, stream, None, &fixture).expect("above max_size / 2, custom path");
        let expected = Path::Unfused { all_reduce: AllReduce::Custom, reason: FallbackReason::TooLarge };
        assert_eq!(got.path, expected);
        assert_eq!(op.last_path(), Some(expected));
        assert_eq!(expected.to_string(), "unfused");
        reference.assert_residual_out_exact("custom, too large", &got.residual_out);
    });
}

#[test]
fn a_forced_fused_path_larger_than_half_of_max_size_is_refused() {
    let seed = TestSeed::new("refusals::forced_fused_too_large");
    // max_size 64 KiB: fused up to 32 KiB; 8 x 4096 bf16 is 64 KiB.
    let problem = Problem::new(2, 8, 4096, arfuse_kernels::DType::Bf16).with_seed(seed.seed());
    let fixture = Fixture::<bf16>::generate(&problem);
    let reference = arfuse_testkit::Reference::compute(&fixture);
    run_group(2, test_config(64 << 10), |op, stream| {
        for path in [arfuse_fusion::Path::OneStage, arfuse_fusion::Path::TwoStage] {
            let err = call(op, stream, Some(path), &fixture).err().expect("does not fit");
            assert!(matches!(&err, Error::Config(why) if why.contains("max_size / 2")), "{path}: {err}");
        }
        // Nothing ran: the group is in step, and the dispatcher's own choice (unfused, in chunks) is exact.
        let got = call(op, stream, None, &fixture).expect("unfused call");
        reference.assert_residual_out_exact("after refusals", &got.residual_out);
    });
}

#[test]
fn hidden_sizes_beyond_the_kernels_or_half_of_max_size_are_refused() {
    run_group(2, test_config(64 << 10), |op, stream| {
        // 4096 packs of 8 is the kernels' limit; 32 KiB (max_size / 2) holds 16384 bf16.
        for (hidden, max) in [(32768 + 8, 32768), (16384 + 8, 16384)] {
            let mut bufs = Bufs::new(1, hidden);
            let args = Args {
                input: TensorRef::new(&bufs.input[..]),
                residual: TensorRef::new(&bufs.residual[..]),
                weight: TensorRef::new(&bufs.weight[..]),
                out: TensorMut::new(&mut bufs.out[..hidden]),
                residual_out: TensorMut::new(&mut bufs.residual_out[..hidden]),
                eps: 1e-6,
            };
            let err = op.forward(stream, args).expect_err("hidden too large");
            assert!(
                matches!(err, Error::HiddenUnsupported { hidden: h, max: m } if h == hidden && m == max),
                "hidden {hidden}: {err}"
            );
            assert!(bufs.untouched(), "hidden {hidden}: outputs written although the call was refused");
        }
    });
}

//! Issue 17's epilogues on the cpu backend: FP8 out (e4m3fn/e4m3fnuz × per tensor/token/group),
//! Gemma's `(1 + w)` norm and no residual, on every path, batch size and dtype, bit-exact against
//! testkit's independent computation (`arfuse_testkit::quant`), saturation, zero rows and NaN/Inf
//! planted; the bad combinations refused with typed errors and nothing written; and the same in
//! real rank processes.

use super::{run_group, test_config, PATHS};
use arfuse_fusion::{AllReduceRmsNorm, Args, BytesMut, Error, Norm, Path, QuantOut, TensorMut, TensorRef, Variant};
use arfuse_ipc::UnixRendezvous;
use arfuse_kernels::api::Cpu;
use arfuse_kernels::contract::{Epilogue, Fp8Format, Quant, Scaling};
use arfuse_kernels::cpu::CpuStream;
use arfuse_kernels::{Backend, DType, Element};
use arfuse_testkit::quant::{
    all_epilogues, assert_codes_exact, assert_exact, assert_scales_exact, quant_fixture, saturating_scale, ExactOutputs,
};
use arfuse_testkit::{
    assert_all_written, assert_ranks_succeeded, child, poison, run_processes_with, test_path, Fixture, Problem,
    ProcessOptions, TestSeed,
};
use half::{bf16, f16};
use std::time::Duration;

/// A byte value that no expected code has (so an unwritten code cannot pass), if there is one.
fn absent_byte(codes: &[u8]) -> Option<u8> {
    let mut seen = [false; 256];
    for &c in codes {
        seen[c as usize] = true;
    }
    (0..=255u8).rev().find(|&b| !seen[b as usize])
}

/// One call of this rank under `epilogue` on `path`, outputs poisoned (codes with `code_poison`).
fn call_epilogue<T: Element>(
    op: &mut AllReduceRmsNorm<Cpu>,
    stream: &CpuStream,
    path: Path,
    fixture: &Fixture<T>,
    epilogue: &Epilogue,
    code_poison: u8,
) -> arfuse_fusion::Result<ExactOutputs<T>> {
    let (rows, hidden) = (fixture.problem.rows, fixture.problem.hidden);
    let elems = rows * hidden;
    let residual_elems = if epilogue.no_residual { 0 } else { elems };
    let mut out = vec![T::from_f32(0.0); elems];
    let mut residual_out = vec![T::from_f32(0.0); residual_elems];
    poison(&mut out);
    poison(&mut residual_out);
    let per_row = epilogue.quant.map_or(0, |q| q.scaling.scales_per_row(hidden));
    let mut codes = vec![code_poison; if epilogue.quant.is_some() { elems } else { 0 }];
    let mut scales = vec![f32::NAN; rows * per_row];
    let args = Args {
        input: TensorRef::new(&fixture.inputs[op.rank()][..]),
        residual: TensorRef::new(&fixture.residual[..residual_elems]),
        weight: TensorRef::new(&fixture.weight[..]),
        out: TensorMut::new(&mut out[..]),
        residual_out: TensorMut::new(&mut residual_out[..]),
        eps: fixture.problem.eps,
    };
    let quant = epilogue.quant.map(|quant| QuantOut {
        quant,
        codes: BytesMut::host(&mut codes[..]),
        scales: (per_row > 0).then(|| TensorMut::new(&mut scales[..])),
    });
    let got = op.forward_on_with(stream, path, args, Variant { no_residual: epilogue.no_residual, quant })?;
    assert_eq!(got, path);
    Ok(ExactOutputs { residual_out, out, codes, scales })
}

/// Every output of one call equals the independent computation, bit for bit.
fn assert_matches<T: Element>(what: &str, want: &ExactOutputs<T>, got: &ExactOutputs<T>) {
    assert_exact(&format!("{what} residual_out"), &want.residual_out, &got.residual_out);
    assert_exact(&format!("{what} out"), &want.out, &got.out);
    assert_codes_exact(&format!("{what} codes"), &want.codes, &got.codes);
    assert_scales_exact(&format!("{what} scales"), &want.scales, &got.scales);
}

/// Every epilogue × path × batch size for `world` ranks and `T`, one operator per norm.
fn check_world<T: Element>(world: usize, seed: &TestSeed) {
    for norm in [Norm::Standard, Norm::GemmaOffset] {
        run_group(world, test_config(8 << 20).with_norm(norm), |op, stream| {
            for hidden in [512, 4096] {
                for rows in [1, 7, 33] {
                    let problem = Problem::new(world, rows, hidden, T::DTYPE)
                        .with_seed(seed.derive_named(&format!("w{world}-{rows}x{hidden}-{}", T::DTYPE)));
                    let fixture = quant_fixture::<T>(&problem);
                    for format in Fp8Format::ALL {
                        for e in all_epilogues(saturating_scale(format)).into_iter().filter(|e| e.norm == norm) {
                            // Unquantised variants once, not once per format.
                            if e.quant.is_none() && format == Fp8Format::E4m3Fnuz {
                                continue;
                            }
                            if e.quant.is_some_and(|q| q.format != format) {
                                continue;
                            }
                            let want = ExactOutputs::compute(&fixture, &e);
                            let poisons = match absent_byte(&want.codes) {
                                Some(b) => vec![b],
                                None => vec![0x00, 0xff],
                            };
                            for path in PATHS {
                                for &p in &poisons {
                                    let what = format!("{problem} rank {} {path} {e:?}", op.rank());
                                    let got = call_epilogue(op, stream, path, &fixture, &e, p)
                                        .unwrap_or_else(|err| panic!("{what}: {err}"));
                                    assert_all_written(&format!("{what} out"), &got.out);
                                    assert_all_written(&format!("{what} residual_out"), &got.residual_out);
                                    assert_matches(&what, &want, &got);
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

#[test]
fn every_epilogue_is_exact_on_every_path_bf16() {
    let seed = TestSeed::new("epilogues::every_epilogue_bf16");
    check_world::<bf16>(1, &seed);
    check_world::<bf16>(3, &seed);
}

#[test]
fn every_epilogue_is_exact_on_every_path_f16() {
    let seed = TestSeed::new("epilogues::every_epilogue_f16");
    check_world::<f16>(2, &seed);
}

#[test]
fn every_epilogue_is_exact_on_every_path_f32() {
    let seed = TestSeed::new("epilogues::every_epilogue_f32");
    check_world::<f32>(4, &seed);
}

/// The default path choice (`forward_with`) takes the epilogue too, and a row's outputs do not
/// depend on the batch it came in.
#[test]
fn the_dispatched_path_and_single_tokens_agree() {
    let seed = TestSeed::new("epilogues::dispatched");
    run_group(2, test_config(8 << 20), |op, stream| {
        let problem = Problem::new(2, 12, 1024, DType::Bf16).with_seed(seed.derive(0));
        let fixture = quant_fixture::<bf16>(&problem);
        let e = Epilogue {
            quant: Some(Quant { format: Fp8Format::E4m3Fn, scaling: Scaling::PerGroup }),
            ..Epilogue::default()
        };
        let want = ExactOutputs::compute(&fixture, &e);
        let mut codes = vec![0xa5u8; problem.elems()];
        let mut scales = vec![f32::NAN; 12 * 8];
        let (mut out, mut residual_out) = (vec![bf16::ZERO; problem.elems()], vec![bf16::ZERO; problem.elems()]);
        op.forward_with(
            stream,
            Args {
                input: TensorRef::new(&fixture.inputs[op.rank()][..]),
                residual: TensorRef::new(&fixture.residual[..]),
                weight: TensorRef::new(&fixture.weight[..]),
                out: TensorMut::new(&mut out[..]),
                residual_out: TensorMut::new(&mut residual_out[..]),
                eps: problem.eps,
            },
            Variant {
                no_residual: false,
                quant: Some(QuantOut {
                    quant: e.quant.expect("quant"),
                    codes: BytesMut::host(&mut codes[..]),
                    scales: Some(TensorMut::new(&mut scales[..])),
                }),
            },
        )
        .expect("forward_with");
        assert_codes_exact("dispatched", &want.codes, &codes);
        assert_scales_exact("dispatched", &want.scales, &scales);
        for row in 0..12 {
            let single = fixture.single_token(row);
            let got = call_epilogue(op, stream, Path::OneStage, &single, &e, 0xa5).expect("single token");
            assert_codes_exact(&format!("token {row} alone"), &want.codes[row * 1024..(row + 1) * 1024], &got.codes);
            assert_scales_exact(&format!("token {row} alone"), &want.scales[row * 8..(row + 1) * 8], &got.scales);
        }
    });
}

#[test]
fn bad_combinations_are_refused_with_nothing_written() {
    run_group(2, test_config(1 << 20), |op, stream| {
        let (rows, hidden) = (3, 2880); // 2880 = 22.5 groups of 128
        let n = rows * hidden;
        let input = vec![bf16::ONE; n];
        let residual = vec![bf16::ONE; n];
        let weight = vec![bf16::ONE; hidden];
        let fmt = Fp8Format::E4m3Fn;
        type Check = fn(&Error) -> bool;
        let cases: Vec<(&str, Scaling, usize, usize, bool, Check)> = vec![
            ("per group, hidden 2880", Scaling::PerGroup, n, 0, false, |e| {
                matches!(e, Error::QuantGroupUnsupported { hidden: 2880, group: 128 })
            }),
            ("per token, scales of the wrong length", Scaling::PerToken, n, rows + 1, false, |e| {
                matches!(e, Error::ShapeMismatch { what: "scales", expected: 3, got: 4 })
            }),
            ("per token, no scales", Scaling::PerToken, n, 0, false, |e| {
                matches!(e, Error::ShapeMismatch { what: "scales", expected: 3, got: 0 })
            }),
            ("per tensor, scales given", Scaling::PerTensor(0.5), n, rows, false, |e| {
                matches!(e, Error::ShapeMismatch { what: "scales", expected: 0, got: 3 })
            }),
            ("codes of the wrong length", Scaling::PerToken, n - 1, rows, false, |e| {
                matches!(e, Error::ShapeMismatch { what: "codes", .. })
            }),
            ("a zero static scale", Scaling::PerTensor(0.0), n, 0, false, |e| matches!(e, Error::BadQuantScale { .. })),
            ("a NaN static scale", Scaling::PerTensor(f32::NAN), n, 0, false, |e| {
                matches!(e, Error::BadQuantScale { .. })
            }),
            ("no residual, residual given", Scaling::PerTensor(1.0), n, 0, true, |e| {
                matches!(e, Error::ShapeMismatch { what: "residual", expected: 0, .. })
            }),
        ];
        for (what, scaling, code_len, scale_len, no_residual, check) in cases {
            let mut out = vec![bf16::ZERO; n];
            let mut residual_out = vec![bf16::ZERO; n];
            poison(&mut out);
            poison(&mut residual_out);
            let mut codes = vec![0x5au8; code_len];
            let mut scales = vec![f32::NAN; scale_len];
            let err = op
                .forward_with(
                    stream,
                    Args {
                        input: TensorRef::new(&input[..]),
                        residual: TensorRef::new(&residual[..]),
                        weight: TensorRef::new(&weight[..]),
                        out: TensorMut::new(&mut out[..]),
                        residual_out: TensorMut::new(&mut residual_out[..]),
                        eps: 1e-6,
                    },
                    Variant {
                        no_residual,
                        quant: Some(QuantOut {
                            quant: Quant { format: fmt, scaling },
                            codes: BytesMut::host(&mut codes[..]),
                            scales: (scale_len > 0).then(|| TensorMut::new(&mut scales[..])),
                        }),
                    },
                )
                .expect_err(what);
            assert!(check(&err), "{what}: {err:?}");
            assert!(out.iter().chain(&residual_out).all(|&v| arfuse_testkit::is_poison(v)), "{what}: written");
            assert!(codes.iter().all(|&c| c == 0x5a) && scales.iter().all(|s| s.is_nan()), "{what}: written");
        }
        // The operator is still usable: a good call after the refusals.
        let mut out = vec![bf16::ZERO; n];
        let mut residual_out = vec![bf16::ZERO; n];
        op.forward(
            stream,
            Args {
                input: TensorRef::new(&input[..]),
                residual: TensorRef::new(&residual[..]),
                weight: TensorRef::new(&weight[..]),
                out: TensorMut::new(&mut out[..]),
                residual_out: TensorMut::new(&mut residual_out[..]),
                eps: 1e-6,
            },
        )
        .expect("a good call after the refusals");
        assert!(residual_out.iter().all(|v| v.to_f32() == 3.0));
    });
}

/// Three rank processes over POSIX shared memory, every path, per-token and per-group FP8 of
/// both formats, with and without residual, Gemma's norm in one operator.
#[test]
fn three_processes_quantise_exactly() {
    if let Some(me) = child() {
        let seed = TestSeed::new("epilogues::three_processes");
        let mut rendezvous =
            UnixRendezvous::connect(&me.dir, me.rank, me.world_size, Duration::from_secs(60)).expect("rendezvous");
        let device = Cpu::open_device(0, 1).expect("cpu");
        let stream = Cpu::create_stream(&device).expect("stream");
        let config = test_config(8 << 20).with_norm(Norm::GemmaOffset);
        let mut op = AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, config).expect("operator");
        for (i, rows) in [1usize, 6, 40].into_iter().enumerate() {
            let problem = Problem::new(me.world_size, rows, 2048, DType::Bf16).with_seed(seed.derive(i as u64));
            let fixture = quant_fixture::<bf16>(&problem);
            for format in Fp8Format::ALL {
                for e in all_epilogues(saturating_scale(format))
                    .into_iter()
                    .filter(|e| e.norm == Norm::GemmaOffset && e.quant.is_some_and(|q| q.format == format))
                {
                    let want = ExactOutputs::compute(&fixture, &e);
                    let p = absent_byte(&want.codes).unwrap_or(0x00);
                    for path in PATHS {
                        let what = format!("rank {} {problem} {path} {e:?}", me.rank);
                        let got = call_epilogue(&mut op, &stream, path, &fixture, &e, p)
                            .unwrap_or_else(|err| panic!("{what}: {err}"));
                        assert_matches(&what, &want, &got);
                    }
                }
            }
        }
        return;
    }
    let mut options = ProcessOptions::new(3, Duration::MAX);
    options.stall_timeout = Some(Duration::from_secs(300));
    let outcomes =
        run_processes_with(&test_path!(three_processes_quantise_exactly), &options).expect("process harness");
    assert_ranks_succeeded(&outcomes);
}

/// One side of a mismatched pairing: the norm of the rank's operator and the call's epilogue.
#[derive(Clone, Copy, Debug)]
struct Side {
    norm: Norm,
    epilogue: Epilogue,
}

/// A rank calling with another epilogue than its peer (FP8 out or not, another format or scaling,
/// no residual, Gemma's norm) is a `CallMismatch` on both ranks on every path, with nothing
/// written: the epilogue is in the call header, so also where the cross-rank kernel is the same
/// one (2-stage's reduce-scatter, the unfused path's all-reduce), and on 1-stage where both ranks
/// run the epilogue kernel. (A static per-tensor scale's value is not in the header: it is data.)
#[test]
fn a_peer_with_another_epilogue_is_a_mismatch_on_every_path_nothing_written() {
    let seed = TestSeed::new("epilogues::mismatched_epilogue");
    let problem = Problem::new(2, 5, 1024, DType::Bf16).with_seed(seed.seed());
    let fixture = quant_fixture::<bf16>(&problem);
    let fp8 = |format, scaling| Epilogue { quant: Some(Quant { format, scaling }), ..Epilogue::default() };
    let plain = Side { norm: Norm::Standard, epilogue: Epilogue::default() };
    let fn_token = Side { norm: Norm::Standard, epilogue: fp8(Fp8Format::E4m3Fn, Scaling::PerToken) };
    let pairs = [
        ("plain vs FP8 per token", plain, fn_token),
        (
            "plain vs no residual",
            plain,
            Side { epilogue: Epilogue { no_residual: true, ..Epilogue::default() }, ..plain },
        ),
        ("plain vs Gemma's norm", plain, Side { norm: Norm::GemmaOffset, ..plain }),
        ("e4m3fn vs e4m3fnuz", fn_token, Side { epilogue: fp8(Fp8Format::E4m3Fnuz, Scaling::PerToken), ..plain }),
        ("per token vs per group", fn_token, Side { epilogue: fp8(Fp8Format::E4m3Fn, Scaling::PerGroup), ..plain }),
        (
            "per token vs per tensor",
            fn_token,
            Side { epilogue: fp8(Fp8Format::E4m3Fn, Scaling::PerTensor(0.25)), ..plain },
        ),
        (
            "FP8 with vs without residual",
            fn_token,
            Side { epilogue: Epilogue { no_residual: true, ..fn_token.epilogue }, ..plain },
        ),
    ];
    for (what, a, b) in pairs {
        for path in PATHS {
            let group = arfuse_ipc::ThreadRendezvous::group(2, Duration::from_secs(30));
            let results = arfuse_testkit::run_threads_each(group, |rank, mut rendezvous| {
                let side = if rank == 0 { a } else { b };
                let device = Cpu::open_device(0, 1).expect("cpu");
                let stream = Cpu::create_stream(&device).expect("stream");
                let config = test_config(8 << 20).with_norm(side.norm);
                let mut op = AllReduceRmsNorm::<Cpu>::new(&device, &mut rendezvous, config).expect("operator");
                let e = side.epilogue;
                let (rows, hidden) = (problem.rows, problem.hidden);
                let elems = rows * hidden;
                let residual_elems = if e.no_residual { 0 } else { elems };
                let mut out = vec![bf16::ZERO; elems];
                let mut residual_out = vec![bf16::ZERO; residual_elems];
                poison(&mut out);
                poison(&mut residual_out);
                let per_row = e.quant.map_or(0, |q| q.scaling.scales_per_row(hidden));
                let mut codes = vec![0x5au8; if e.quant.is_some() { elems } else { 0 }];
                let mut scales = vec![f32::NAN; rows * per_row];
                let quant = e.quant.map(|quant| QuantOut {
                    quant,
                    codes: BytesMut::host(&mut codes[..]),
                    scales: (per_row > 0).then(|| TensorMut::new(&mut scales[..])),
                });
                let result = op.forward_on_with(
                    &stream,
                    path,
                    Args {
                        input: TensorRef::new(&fixture.inputs[rank][..]),
                        residual: TensorRef::new(&fixture.residual[..residual_elems]),
                        weight: TensorRef::new(&fixture.weight[..]),
                        out: TensorMut::new(&mut out[..]),
                        residual_out: TensorMut::new(&mut residual_out[..]),
                        eps: problem.eps,
                    },
                    Variant { no_residual: e.no_residual, quant },
                );
                let untouched = out.iter().chain(&residual_out).all(|&v| arfuse_testkit::is_poison(v))
                    && codes.iter().all(|&c| c == 0x5a)
                    && scales.iter().all(|s| s.is_nan());
                (result, untouched)
            });
            for (rank, (result, untouched)) in results.into_iter().enumerate() {
                match &result {
                    Err(Error::CallMismatch { detail, .. }) => {
                        assert!(detail.contains("epilogue"), "{what} {path} rank {rank}: {detail}")
                    }
                    other => panic!("{what} {path} rank {rank}: expected a call mismatch, got {other:?}"),
                }
                assert!(untouched, "{what} {path} rank {rank}: the mismatched call wrote an output");
            }
        }
    }
}

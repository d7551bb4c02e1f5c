//! The separate FP8 quantisation kernel (`arfuse_fusion::quantize_fp8`, `Op::QuantizeFp8`) on the
//! cpu backend: bit-exact against testkit's independent quantisation for every format × scaling ×
//! dtype, with zero rows, saturating values and NaN/Inf planted; the plain call followed by it
//! gives the fused FP8 call's codes and scales on every path; bad input is refused with typed
//! errors and nothing written.

use super::{run_group, test_config, PATHS};
use arfuse_fusion::{quantize_fp8, AllReduceRmsNorm, Args, BytesMut, Error, QuantOut, TensorMut, TensorRef, Variant};
use arfuse_kernels::api::Cpu;
use arfuse_kernels::contract::{Fp8Format, Quant, Scaling};
use arfuse_kernels::cpu::{CpuDevice, CpuStream};
use arfuse_kernels::{Backend, DType, Element};
use arfuse_testkit::quant::{
    all_quants, assert_codes_exact, assert_scales_exact, quant_fixture, quant_input, quantize_exact, saturating_scale,
};
use arfuse_testkit::{poison, Problem, TestSeed};
use half::{bf16, f16};

/// A byte no expected code has, so an unwritten code cannot pass (0x5a if every byte occurs).
fn absent_byte(codes: &[u8]) -> u8 {
    let mut seen = [false; 256];
    for &c in codes {
        seen[c as usize] = true;
    }
    (0..=255u8).rev().find(|&b| !seen[b as usize]).unwrap_or(0x5a)
}

/// `quantize_fp8` of `values` into fresh codes (poisoned with `code_poison`) and NaN scales.
fn quantize<T: Element>(
    device: &CpuDevice,
    stream: &CpuStream,
    values: &[T],
    hidden: usize,
    quant: Quant,
    code_poison: u8,
) -> arfuse_fusion::Result<(Vec<u8>, Vec<f32>)> {
    let rows = values.len() / hidden;
    let mut codes = vec![code_poison; values.len()];
    let mut scales = vec![f32::NAN; rows * quant.scaling.scales_per_row(hidden)];
    let has_scales = !scales.is_empty();
    quantize_fp8::<Cpu, T>(
        device,
        stream,
        TensorRef::new(values),
        hidden,
        QuantOut {
            quant,
            codes: BytesMut::host(&mut codes[..]),
            scales: has_scales.then(|| TensorMut::new(&mut scales[..])),
        },
    )?;
    Ok((codes, scales))
}

fn check_dtype<T: Element>(seed: &TestSeed) {
    let device = Cpu::open_device(0, 1).expect("cpu");
    let stream = Cpu::create_stream(&device).expect("stream");
    for (rows, hidden) in [(1, 512), (7, 512), (9, 4096), (3, 2048 * T::DTYPE.pack_elems())] {
        let problem = Problem::new(1, rows, hidden, T::DTYPE)
            .with_seed(seed.derive_named(&format!("{rows}x{hidden}-{}", T::DTYPE)));
        let values = quant_input::<T>(&problem);
        for format in Fp8Format::ALL {
            for quant in all_quants(saturating_scale(format)).into_iter().filter(|q| q.format == format) {
                let (want_codes, want_scales) = quantize_exact(&values, hidden, quant);
                let what = format!("{problem} {quant:?}");
                let (codes, scales) = quantize(&device, &stream, &values, hidden, quant, absent_byte(&want_codes))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_codes_exact(&what, &want_codes, &codes);
                assert_scales_exact(&what, &want_scales, &scales);
                // The planted edges are there (rows that exist).
                if rows > 2 {
                    assert_eq!(want_codes[2 * hidden + 3], format.nan_code(), "{what}: NaN");
                }
                match quant.scaling {
                    Scaling::PerTensor(_) if rows > 3 => {
                        assert_eq!(want_codes[3 * hidden + 5], format.max_code(), "{what}: +inf saturates");
                        assert_eq!(want_codes[3 * hidden + 6], format.max_code() | 0x80, "{what}: -inf saturates");
                    }
                    Scaling::PerToken if rows > 1 => assert_eq!(want_scales[1], format.min_scale(), "{what}: zero row"),
                    Scaling::PerGroup if rows > 4 => {
                        let per_row = hidden / 128;
                        assert_eq!(want_scales[4 * per_row + 1], format.min_scale(), "{what}: zero group");
                        assert_eq!(want_scales[4 * per_row], 1000.0 / format.max(), "{what}: the group of 1000s");
                    }
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn the_separate_quantisation_is_exact_for_every_format_scaling_and_dtype() {
    let seed = TestSeed::new("quantize::exact");
    check_dtype::<bf16>(&seed);
    check_dtype::<f16>(&seed);
    check_dtype::<f32>(&seed);
}

/// The bench's `<path>+quant`: the plain call, then the separate kernel on its `out`, gives the
/// fused FP8 call's codes and scales, on every path, for every format and scaling.
#[test]
fn the_plain_call_then_quantize_gives_the_fused_codes_on_every_path() {
    let seed = TestSeed::new("quantize::plain_then_quantize");
    run_group(2, test_config(8 << 20), |op, stream| {
        let device = Cpu::open_device(0, 1).expect("cpu");
        for (i, (rows, hidden)) in [(1usize, 1024usize), (6, 2048)].into_iter().enumerate() {
            let problem = Problem::new(2, rows, hidden, DType::Bf16).with_seed(seed.derive(i as u64));
            let f = quant_fixture::<bf16>(&problem);
            let elems = problem.elems();
            for path in PATHS {
                for format in Fp8Format::ALL {
                    for quant in all_quants(saturating_scale(format)).into_iter().filter(|q| q.format == format) {
                        let what = format!("{problem} rank {} {path} {quant:?}", op.rank());
                        let call = |op: &mut AllReduceRmsNorm<Cpu>, fused: bool| {
                            let (mut out, mut residual_out) = (vec![bf16::ZERO; elems], vec![bf16::ZERO; elems]);
                            poison(&mut out);
                            poison(&mut residual_out);
                            let per_row = quant.scaling.scales_per_row(hidden);
                            let mut codes = vec![0xa5u8; if fused { elems } else { 0 }];
                            let mut scales = vec![f32::NAN; if fused { rows * per_row } else { 0 }];
                            let quant_out = fused.then(|| QuantOut {
                                quant,
                                codes: BytesMut::host(&mut codes[..]),
                                scales: (per_row > 0).then(|| TensorMut::new(&mut scales[..])),
                            });
                            op.forward_on_with(
                                stream,
                                path,
                                Args {
                                    input: TensorRef::new(&f.inputs[op.rank()][..]),
                                    residual: TensorRef::new(&f.residual[..]),
                                    weight: TensorRef::new(&f.weight[..]),
                                    out: TensorMut::new(&mut out[..]),
                                    residual_out: TensorMut::new(&mut residual_out[..]),
                                    eps: problem.eps,
                                },
                                Variant { no_residual: false, quant: quant_out },
                            )
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                            (out, codes, scales)
                        };
                        let (_, fused_codes, fused_scales) = call(op, true);
                        let (out, _, _) = call(op, false);
                        let (codes, scales) = quantize(&device, stream, &out, hidden, quant, 0x5a)
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert_codes_exact(&what, &fused_codes, &codes);
                        assert_scales_exact(&what, &fused_scales, &scales);
                    }
                }
            }
        }
    });
}

#[test]
fn bad_input_is_refused_with_nothing_written() {
    let device = Cpu::open_device(0, 1).expect("cpu");
    let stream = Cpu::create_stream(&device).expect("stream");
    let (rows, hidden) = (3, 2880); // 22.5 groups of 128
    let n = rows * hidden;
    let values = vec![bf16::ONE; (1 << 16) + 8];
    let fmt = Fp8Format::E4m3Fnuz;
    type Check = fn(&Error) -> bool;
    /// (what, scaling, hidden passed, input elements, input offset, code length, scale length)
    type Case = (&'static str, Scaling, usize, usize, usize, usize, usize, Check);
    let cases: Vec<Case> = vec![
        ("per group, hidden 2880", Scaling::PerGroup, hidden, n, 0, n, 0, |e| {
            matches!(e, Error::QuantGroupUnsupported { hidden: 2880, group: 128 })
        }),
        ("hidden 0", Scaling::PerToken, 0, n, 0, n, rows, |e| matches!(e, Error::HiddenUnsupported { hidden: 0, .. })),
        ("hidden 2884 (not whole packs)", Scaling::PerToken, 2884, 2884, 0, 2884, 1, |e| {
            matches!(e, Error::HiddenNotMultipleOfPack { hidden: 2884, .. })
        }),
        ("hidden above the limit", Scaling::PerToken, 1 << 16, 1 << 16, 0, 0, 1, |e| {
            matches!(e, Error::HiddenUnsupported { hidden: 65536, .. })
        }),
        ("input not whole rows", Scaling::PerToken, hidden, n - 8, 0, n - 8, rows, |e| {
            matches!(e, Error::ShapeMismatch { what: "input (not a whole number of rows)", .. })
        }),
        ("codes of the wrong length", Scaling::PerToken, hidden, n, 0, n - 1, rows, |e| {
            matches!(e, Error::ShapeMismatch { what: "codes", .. })
        }),
        ("per token, no scales", Scaling::PerToken, hidden, n, 0, n, 0, |e| {
            matches!(e, Error::ShapeMismatch { what: "scales", expected: 3, got: 0 })
        }),
        ("per tensor, scales given", Scaling::PerTensor(0.5), hidden, n, 0, n, rows, |e| {
            matches!(e, Error::ShapeMismatch { what: "scales", expected: 0, got: 3 })
        }),
        ("an infinite static scale", Scaling::PerTensor(f32::INFINITY), hidden, n, 0, n, 0, |e| {
            matches!(e, Error::BadQuantScale { .. })
        }),
        ("a negative static scale", Scaling::PerTensor(-1.0), hidden, n, 0, n, 0, |e| {
            matches!(e, Error::BadQuantScale { .. })
        }),
        ("a misaligned input", Scaling::PerToken, hidden, n, 1, n, rows, |e| {
            matches!(e, Error::Misaligned { what: "input", .. })
        }),
    ];
    for (what, scaling, hid, len, offset, code_len, scale_len, check) in cases {
        let mut codes = vec![0x5au8; code_len];
        let mut scales = vec![f32::NAN; scale_len];
        let err = quantize_fp8::<Cpu, bf16>(
            &device,
            &stream,
            TensorRef::new(&values[offset..offset + len]),
            hid,
            QuantOut {
                quant: Quant { format: fmt, scaling },
                codes: BytesMut::host(&mut codes[..]),
                scales: (scale_len > 0).then(|| TensorMut::new(&mut scales[..])),
            },
        )
        .expect_err(what);
        assert!(check(&err), "{what}: {err:?}");
        assert!(codes.iter().all(|&c| c == 0x5a) && scales.iter().all(|s| s.is_nan()), "{what}: written");
    }
    // Codes over the input, scales over the codes: aliasing, nothing written.
    let mut buf = vec![bf16::ONE; 2 * 512];
    let addr = buf.as_mut_ptr() as u64;
    let quant = Quant { format: fmt, scaling: Scaling::PerToken };
    let mut scales = [f32::NAN; 2];
    // SAFETY: the call refuses the overlap before it touches any memory (asserted below); every
    // range named lies inside `buf` or `scales`, which outlive the call.
    let err = unsafe {
        quantize_fp8::<Cpu, bf16>(
            &device,
            &stream,
            TensorRef::new(&buf[..512]),
            512,
            QuantOut {
                quant,
                codes: BytesMut::from_raw(arfuse_kernels::DevicePtr(addr), 512),
                scales: Some(TensorMut::new(&mut scales[..1])),
            },
        )
    }
    .expect_err("codes over the input");
    assert!(matches!(err, Error::Aliasing { a: "input", b: "codes", .. }), "{err:?}");
    assert!(buf.iter().all(|&v| v == bf16::ONE) && scales.iter().all(|s| s.is_nan()), "written");
    // Zero rows: nothing to do, nothing launched, no error.
    let mut none: [u8; 0] = [];
    quantize_fp8::<Cpu, bf16>(
        &device,
        &stream,
        TensorRef::new(&values[..0]),
        512,
        QuantOut {
            quant: Quant { format: fmt, scaling: Scaling::PerTensor(1.0) },
            codes: BytesMut::host(&mut none),
            scales: None,
        },
    )
    .expect("zero rows");
}

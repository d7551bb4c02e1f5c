//! Issue 17's epilogues on the GPU: FP8 out (e4m3fn/e4m3fnuz × per tensor/token/group), Gemma's
//! `(1 + w)` norm and no residual, on every path (the dispatched one, 1-stage, 2-stage, unfused),
//! world sizes 2 and 4, bf16/f16/f32, row widths that take one pack per thread and several (the
//! row routine's K = 1 and K = 4 forms), bit-exact against testkit's independent computation
//! (`arfuse_testkit::quant`) with saturation, zero rows and NaN/Inf planted.

use crate::{gpu_available, UNFUSED};
use arfuse_fusion::{AllReduceRmsNorm, Args, BytesMut, Config, Norm, Path, QuantOut, TensorMut, TensorRef, Variant};
use arfuse_ipc::ThreadRendezvous;
use arfuse_kernels::contract::{Epilogue, Fp8Format};
use arfuse_kernels::gpu::DeviceBuffer;
use arfuse_kernels::{Element, GpuBackend};
use arfuse_testkit::quant::{
    all_epilogues, assert_codes_exact, assert_exact, assert_scales_exact, quant_fixture, saturating_scale, ExactOutputs,
};
use arfuse_testkit::{poisoned, run_threads_each, Fixture, Problem, TestSeed};
use half::{bf16, f16};
use std::time::Duration;

/// A byte value that no expected code has (so an unwritten code cannot pass), else 0xa5.
fn absent_byte(codes: &[u8]) -> u8 {
    let mut seen = [false; 256];
    codes.iter().for_each(|&c| seen[c as usize] = true);
    (0..=255u8).rev().find(|&b| !seen[b as usize]).unwrap_or(0xa5)
}

fn check<B: GpuBackend, T: Element>(world: usize, norm: Norm, shapes: &[(usize, usize)], seed: &TestSeed) {
    let fixtures: Vec<Fixture<T>> = shapes
        .iter()
        .map(|&(rows, hidden)| {
            let problem = Problem::new(world, rows, hidden, T::DTYPE)
                .with_seed(seed.derive_named(&format!("{rows}x{hidden}-{}", T::DTYPE)));
            quant_fixture::<T>(&problem)
        })
        .collect();
    let mut epilogues: Vec<Epilogue> = Vec::new();
    for format in Fp8Format::ALL {
        for e in all_epilogues(saturating_scale(format)) {
            if e.norm == norm && !epilogues.contains(&e) {
                epilogues.push(e);
            }
        }
    }
    let mut config = Config::default().with_deadline(Duration::from_secs(10)).with_norm(norm);
    config.policy.push_slot_bytes = fixtures.iter().map(|f| f.residual.len() * T::DTYPE.size()).max().unwrap_or(16);
    let phase = std::sync::Barrier::new(world);
    run_threads_each(ThreadRendezvous::group(world, Duration::from_secs(60)), |rank, mut rendezvous| {
        let device = B::open_device(0, world).expect("device");
        let stream = B::create_stream(&device).expect("stream");
        let mut op = AllReduceRmsNorm::<B>::new(&device, &mut rendezvous, config).expect("operator");
        for fixture in &fixtures {
            let (rows, hidden) = (fixture.problem.rows, fixture.problem.hidden);
            let elems = rows * hidden;
            let input = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.inputs[rank]).expect("input");
            let residual = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.residual).expect("residual");
            let weight = DeviceBuffer::<B, _>::from_slice(&stream, &fixture.weight).expect("weight");
            let poison = poisoned::<T>(elems);
            let mut out = DeviceBuffer::<B, _>::from_slice(&stream, &poison).expect("out");
            let mut residual_out = DeviceBuffer::<B, _>::from_slice(&stream, &poison).expect("residual_out");
            // The codes live in an f32 buffer of elems / 4 words (u8 is no Element).
            let mut codes = DeviceBuffer::<B, f32>::from_slice(&stream, &vec![0.0; elems / 4]).expect("codes");
            let mut scales = DeviceBuffer::<B, f32>::from_slice(&stream, &vec![f32::NAN; rows * hidden / 128 + rows])
                .expect("scales");
            phase.wait();
            for e in &epilogues {
                if e.quant.is_some_and(|q| q.scaling == arfuse_fusion::Scaling::PerGroup) && hidden % 128 != 0 {
                    continue;
                }
                let want = ExactOutputs::compute(fixture, e);
                let per_row = e.quant.map_or(0, |q| q.scaling.scales_per_row(hidden));
                let code_poison = absent_byte(&want.codes);
                let code_words = vec![f32::from_bits(u32::from_ne_bytes([code_poison; 4])); elems / 4];
                for path in [None, Some(Path::OneStage), Some(Path::TwoStage), Some(UNFUSED)] {
                    out.upload(&stream, &poison).expect("poison");
                    residual_out.upload(&stream, &poison).expect("poison");
                    codes.upload(&stream, &code_words).expect("poison");
                    scales.upload(&stream, &vec![f32::NAN; scales.len()]).expect("poison");
                    let residual_len = if e.no_residual { 0 } else { elems };
                    // SAFETY: the buffers hold at least `residual_len` elements (`elems`) and live,
                    // unwritten by anything else, until the call's work has run (`check` below).
                    let (residual_arg, residual_out_arg) = unsafe {
                        (
                            TensorRef::from_raw(residual.device_ptr(), residual_len),
                            TensorMut::from_raw(residual_out.device_ptr(), residual_len),
                        )
                    };
                    let args = Args {
                        input: TensorRef::new(&input),
                        residual: residual_arg,
                        weight: TensorRef::new(&weight),
                        out: TensorMut::new(&mut out),
                        residual_out: residual_out_arg,
                        eps: fixture.problem.eps,
                    };
                    // SAFETY: `codes` holds `elems` bytes, `scales` at least `rows * per_row`
                    // f32s, both live and otherwise untouched until `check` below.
                    let quant = e.quant.map(|quant| unsafe {
                        QuantOut {
                            quant,
                            codes: BytesMut::from_raw(codes.device_ptr(), elems),
                            scales: (per_row > 0).then(|| TensorMut::from_raw(scales.device_ptr(), rows * per_row)),
                        }
                    });
                    let variant = Variant { no_residual: e.no_residual, quant };
                    let ran = match path {
                        Some(path) => op.forward_on_with(&stream, path, args, variant),
                        None => op.forward_with(&stream, args, variant),
                    }
                    .expect("forward");
                    op.check(&stream).expect("no peer failure");
                    let what = format!("{} rank {rank} {} {ran} {e:?}", B::KIND, fixture.problem);
                    let got_out = out.download(&stream).expect("download");
                    assert_exact(&format!("{what} out"), &want.out, &got_out);
                    let got_ro = residual_out.download(&stream).expect("download");
                    if e.no_residual {
                        assert!(got_ro.iter().all(|&v| arfuse_testkit::is_poison(v)), "{what}: residual_out written");
                    } else {
                        assert_exact(&format!("{what} residual_out"), &want.residual_out, &got_ro);
                    }
                    if e.quant.is_some() {
                        let words = codes.download(&stream).expect("download");
                        let got_codes: Vec<u8> = words.iter().flat_map(|w| w.to_bits().to_ne_bytes()).collect();
                        assert_codes_exact(&what, &want.codes, &got_codes);
                        let got_scales = scales.download(&stream).expect("download");
                        assert_scales_exact(&what, &want.scales, &got_scales[..rows * per_row]);
                        assert!(got_scales[rows * per_row..].iter().all(|s| s.is_nan()), "{what}: scales past the end");
                    }
                }
            }
            phase.wait();
        }
    });
    println!(
        "{} epilogues: world {world} {} {norm:?} {} shapes x {} epilogues x 4 paths: exact",
        B::KIND,
        T::DTYPE,
        shapes.len(),
        epilogues.len()
    );
}

pub(crate) fn every_epilogue_on_every_path_is_exact<B: GpuBackend>(test: &str) {
    if !gpu_available::<B>(test) {
        return;
    }
    let seed = TestSeed::new(&format!("{0}::epilogues_on_{0}", B::KIND));
    // Decode and prefill shapes; 16384 bf16/f16 (2048 packs) and 8192 f32 take several packs per
    // thread; 2880 is no multiple of 128 (per-group skipped there, refused: the cpu suite).
    let shapes = [(1, 4096), (7, 2048), (33, 8192), (81, 5120), (6, 16384), (3, 2880)];
    for world in [2, 4] {
        for norm in [Norm::Standard, Norm::GemmaOffset] {
            check::<B, bf16>(world, norm, &shapes, &seed);
            check::<B, f16>(world, norm, &shapes[..4], &seed);
            check::<B, f32>(world, norm, &shapes[..3], &seed);
        }
    }
}

/// `quantize_fp8` of `values` on `B` (codes poisoned with a byte no expected code has, scales
/// NaN, one more scale than needed to see nothing is written past the end), checked bit for bit.
fn check_quantize<B: GpuBackend, T: Element>(
    stream: &B::Stream,
    device: &B::Device,
    what: &str,
    values: &[T],
    hidden: usize,
    quant: arfuse_fusion::Quant,
    want: (&[u8], &[f32]),
) {
    let rows = values.len() / hidden;
    let elems = values.len();
    let per_row = quant.scaling.scales_per_row(hidden);
    let input = DeviceBuffer::<B, _>::from_slice(stream, values).expect("input");
    let poison = absent_byte(want.0);
    // The codes live in an f32 buffer of elems / 4 words (u8 is no Element).
    let words = vec![f32::from_bits(u32::from_ne_bytes([poison; 4])); elems.div_ceil(4)];
    let codes = DeviceBuffer::<B, f32>::from_slice(stream, &words).expect("codes");
    let scales = DeviceBuffer::<B, f32>::from_slice(stream, &vec![f32::NAN; rows * per_row + 1]).expect("scales");
    // SAFETY: `codes` holds at least `elems` bytes and `scales` `rows * per_row` f32s, both live
    // and untouched by anything else until the stream is synchronised below.
    let out = unsafe {
        QuantOut {
            quant,
            codes: BytesMut::from_raw(codes.device_ptr(), elems),
            scales: (per_row > 0).then(|| TensorMut::from_raw(scales.device_ptr(), rows * per_row)),
        }
    };
    arfuse_fusion::quantize_fp8::<B, T>(device, stream, TensorRef::new(&input), hidden, out).expect(what);
    B::synchronize(stream).expect("synchronize");
    let got: Vec<u8> =
        codes.download(stream).expect("download").iter().flat_map(|w| w.to_bits().to_ne_bytes()).collect();
    assert_codes_exact(what, want.0, &got[..elems]);
    assert!(got[elems..].iter().all(|&c| c == poison), "{what}: codes past the end");
    let got_scales = scales.download(stream).expect("download");
    assert_scales_exact(what, want.1, &got_scales[..rows * per_row]);
    assert!(got_scales[rows * per_row..].iter().all(|s| s.is_nan()), "{what}: scales past the end");
}

fn check_quantize_dtype<B: GpuBackend, T: Element>(seed: &TestSeed, shapes: &[(usize, usize)]) {
    use arfuse_testkit::quant::{all_quants, quant_input, quantize_exact};
    let device = B::open_device(0, 1).expect("device");
    let stream = B::create_stream(&device).expect("stream");
    for &(rows, hidden) in shapes {
        let problem = Problem::new(2, rows, hidden, T::DTYPE)
            .with_seed(seed.derive_named(&format!("quantize-{rows}x{hidden}-{}", T::DTYPE)));
        let values = quant_input::<T>(&problem);
        // The plain call's `out` of a fixture with the epilogue's edges, and what the fused FP8
        // call writes for it: the separate kernel must write the same.
        let fixture = quant_fixture::<T>(&problem);
        let plain_out = ExactOutputs::compute(&fixture, &Epilogue::default()).out;
        for format in Fp8Format::ALL {
            for quant in all_quants(saturating_scale(format)).into_iter().filter(|q| q.format == format) {
                if quant.scaling == arfuse_fusion::Scaling::PerGroup && hidden % 128 != 0 {
                    continue;
                }
                let what = format!("{} quantize {problem} {quant:?}", B::KIND);
                let (codes, scales) = quantize_exact(&values, hidden, quant);
                check_quantize::<B, T>(&stream, &device, &what, &values, hidden, quant, (&codes, &scales));
                let fused = ExactOutputs::compute(&fixture, &Epilogue { quant: Some(quant), ..Epilogue::default() });
                let what = format!("{what}, the plain call's out");
                check_quantize::<B, T>(
                    &stream,
                    &device,
                    &what,
                    &plain_out,
                    hidden,
                    quant,
                    (&fused.codes, &fused.scales),
                );
            }
        }
    }
    println!("{} quantize_fp8 {}: {} shapes x 6 quantisations: exact", B::KIND, T::DTYPE, shapes.len());
}

/// The separate quantisation kernel (`quantize_fp8`, `Op::QuantizeFp8`) on the GPU: bit-exact
/// against testkit for every format × scaling × dtype (zero rows, saturation, NaN/Inf planted),
/// and on a plain call's `out` the fused FP8 call's codes and scales; one pack per thread and
/// several (16384 bf16/f16, 8192 f32), 2880 (no per-group).
pub(crate) fn the_separate_quantisation_kernel_is_exact<B: GpuBackend>(test: &str) {
    if !gpu_available::<B>(test) {
        return;
    }
    let seed = TestSeed::new(&format!("{0}::quantize_on_{0}", B::KIND));
    let shapes = [(1, 4096), (7, 2048), (33, 8192), (81, 5120), (6, 16384), (3, 2880)];
    check_quantize_dtype::<B, bf16>(&seed, &shapes);
    check_quantize_dtype::<B, f16>(&seed, &shapes);
    check_quantize_dtype::<B, f32>(&seed, &[(1, 4096), (7, 2048), (33, 8192), (3, 2880)]);
}

/// Every bf16 and f16 value: the 2^16 bit patterns as 16 rows of 4096 (one row holds the
/// infinities and NaNs: its dynamic scale is +inf), through the separate kernel, whose codes are
/// the epilogue kernels' (the same `store_codes`), per token, per group and per tensor at scales
/// on both sides of the quotient route's edges (kernels.cu `quotient_route_applies`: 2^-60 and
/// 2^60) and at seeded random ones; both formats. Bit-exact against testkit: the route (a product
/// with the reciprocal and an FMA correction, no division) and, on sm_89+, the hardware's e4m3fn
/// conversion give the contract's codes for every 16-bit value.
pub(crate) fn every_16_bit_value_quantises_exactly<B: GpuBackend>(test: &str) {
    if !gpu_available::<B>(test) {
        return;
    }
    let seed = TestSeed::new(&format!("{0}::every_16_bit_value_on_{0}", B::KIND));
    check_every_16_bit_value::<B, bf16>(&seed);
    check_every_16_bit_value::<B, f16>(&seed);
}

fn check_every_16_bit_value<B: GpuBackend, T: Element>(seed: &TestSeed) {
    use arfuse_fusion::{Quant, Scaling};
    use arfuse_testkit::quant::quantize_exact;
    use rand::{Rng, SeedableRng};
    let device = B::open_device(0, 1).expect("device");
    let stream = B::create_stream(&device).expect("stream");
    let values: Vec<T> = (0..=u16::MAX).map(|b| T::from_bits_u32(b as u32)).collect();
    let hidden = 4096;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.derive_named(&format!("scales-{}", T::DTYPE)));
    // The route's edges (2^-60 and 2^60 on it, the next f32 past each and 2^-61, 2^61 off it),
    // then scales of random significand and exponent in [2^-70, 2^70].
    let mut scales: Vec<f32> = [0x2180_0000u32, 0x217f_ffff, 0x2100_0000, 0x5d80_0000, 0x5d80_0001, 0x5e00_0000]
        .into_iter()
        .map(f32::from_bits)
        .collect();
    scales.extend([1.0, 0.01, 1.0 / 448.0, 1.0 / 240.0]);
    scales.extend((0..24).map(|_| f32::from_bits(((rng.gen_range(57u32..=197)) << 23) | rng.gen_range(0..1u32 << 23))));
    for format in Fp8Format::ALL {
        let quants = [Scaling::PerToken, Scaling::PerGroup]
            .into_iter()
            .chain(scales.iter().map(|&s| Scaling::PerTensor(s)))
            .map(|scaling| Quant { format, scaling });
        for quant in quants {
            let what = format!("{} quantize every {} value {quant:?}", B::KIND, T::DTYPE);
            let (codes, want_scales) = quantize_exact(&values, hidden, quant);
            check_quantize::<B, T>(&stream, &device, &what, &values, hidden, quant, (&codes, &want_scales));
        }
    }
    println!("{} every {} value: 2 formats x {} quantisations: exact", B::KIND, T::DTYPE, scales.len() + 2);
}

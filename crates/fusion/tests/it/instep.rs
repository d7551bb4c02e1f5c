//! Ranks stay in step: a call that moves nothing (zero rows) or that one rank refuses still counts
//! as a call on every rank, so a pairing of different calls is `CallMismatch` everywhere and never
//! data; the two in-place forms are exact on every path, and every other overlap is refused;
//! the push protocol's traps (`-0.0`, negative subnormals, rows of `-0.0`) come out exact.

use super::{run_group, test_config, PATHS};
use arfuse_fusion::{AllReduceRmsNorm, Args, Error, Path, TensorMut, TensorRef};
use arfuse_kernels::api::Cpu;
use arfuse_kernels::cpu::CpuStream;
use arfuse_kernels::{DType, DevicePtr};
use arfuse_testkit::{poison, poison_value, Fixture, Problem, Reference, TestSeed};
use half::bf16;
use std::time::Duration;

/// What one rank's call did, with its output buffers (poisoned before the call).
struct Called {
    result: arfuse_fusion::Result<Path>,
    out: Vec<bf16>,
    residual_out: Vec<bf16>,
}

impl Called {
    fn untouched(&self) -> bool {
        let p = poison_value::<bf16>().to_bits();
        self.out.iter().chain(&self.residual_out).all(|v| v.to_bits() == p)
    }
}

/// One call of this rank on rows `rows` of `fixture` (outputs poisoned), `eps` as given.
fn call_rows(
    op: &mut AllReduceRmsNorm<Cpu>,
    stream: &CpuStream,
    fixture: &Fixture<bf16>,
    rows: usize,
    eps: f32,
) -> Called {
    let elems = rows * fixture.problem.hidden;
    let mut out = vec![bf16::ZERO; elems];
    let mut residual_out = vec![bf16::ZERO; elems];
    poison(&mut out);
    poison(&mut residual_out);
    let result = op.forward(
        stream,
        Args {
            input: TensorRef::new(&fixture.inputs[op.rank()][..elems]),
            residual: TensorRef::new(&fixture.residual[..elems]),
            weight: TensorRef::new(&fixture.weight[..]),
            out: TensorMut::new(&mut out[..]),
            residual_out: TensorMut::new(&mut residual_out[..]),
            eps,
        },
    );
    Called { result, out, residual_out }
}

fn config() -> arfuse_fusion::Config {
    let mut config = test_config(1 << 20);
    config.deadline = Duration::from_secs(20);
    config
}

fn fixture(world: usize, rows: usize, name: &str) -> Fixture<bf16> {
    let seed = TestSeed::new(name);
    Fixture::generate(&Problem::new(world, rows, 4096, DType::Bf16).with_seed(seed.seed()))
}

#[test]
fn a_zero_row_call_on_one_rank_is_a_mismatch_on_every_rank_not_data() {
    let f = fixture(3, 4, "instep::zero_rows_on_one_rank");
    let results = run_group(3, config(), |op, stream| {
        let rows = if op.rank() == 1 { 0 } else { 4 };
        let first = call_rows(op, stream, &f, rows, f.problem.eps);
        let next = call_rows(op, stream, &f, 4, f.problem.eps);
        (first, next)
    });
    for (rank, (first, next)) in results.iter().enumerate() {
        assert!(matches!(first.result, Err(Error::CallMismatch { .. })), "rank {rank}: {:?}", first.result);
        assert!(first.untouched(), "rank {rank}: the mismatched call wrote an output");
        assert!(matches!(next.result, Err(Error::Poisoned(_))), "rank {rank}: {:?}", next.result);
    }
}

#[test]
fn zero_row_calls_on_every_rank_keep_the_group_in_step() {
    let f = fixture(2, 4, "instep::zero_rows_everywhere");
    let reference = Reference::compute(&f);
    let results = run_group(2, config(), |op, stream| {
        let empty = call_rows(op, stream, &f, 0, f.problem.eps);
        let real = call_rows(op, stream, &f, 4, f.problem.eps);
        (empty, real)
    });
    for (rank, (empty, real)) in results.iter().enumerate() {
        assert_eq!(empty.result.as_ref().ok(), Some(&Path::Noop), "rank {rank}");
        assert!(real.result.is_ok(), "rank {rank}: {:?}", real.result);
        reference.assert_residual_out_exact(&format!("rank {rank} after a zero-row call"), &real.residual_out);
        reference.assert_out_within(&format!("rank {rank} after a zero-row call"), &real.out, 1);
    }
}

#[test]
fn a_call_refused_on_one_rank_only_is_its_error_and_a_mismatch_on_its_peers() {
    let f = fixture(2, 4, "instep::refused_on_one_rank");
    for bad in ["eps", "misaligned"] {
        let results = run_group(2, config(), |op, stream| {
            let first = if op.rank() == 0 {
                match bad {
                    "eps" => call_rows(op, stream, &f, 4, f32::NAN),
                    _ => {
                        // The input a few bytes into a copy of the fixture's: not 16-byte aligned.
                        let elems = 4 * 4096;
                        let mut out = vec![bf16::ZERO; elems];
                        let mut residual_out = vec![bf16::ZERO; elems];
                        poison(&mut out);
                        poison(&mut residual_out);
                        let mut shifted = vec![bf16::ZERO; 8];
                        shifted.extend_from_slice(&f.inputs[0][..elems]);
                        let base = shifted.as_ptr() as usize;
                        let start = (1..8).find(|s| (base + 2 * s) % 16 != 0).unwrap_or(1);
                        let result = op.forward(
                            stream,
                            Args {
                                input: TensorRef::new(&shifted[start..start + elems]),
                                residual: TensorRef::new(&f.residual[..elems]),
                                weight: TensorRef::new(&f.weight[..]),
                                out: TensorMut::new(&mut out[..]),
                                residual_out: TensorMut::new(&mut residual_out[..]),
                                eps: f.problem.eps,
                            },
                        );
                        Called { result, out, residual_out }
                    }
                }
            } else {
                call_rows(op, stream, &f, 4, f.problem.eps)
            };
            let next = call_rows(op, stream, &f, 4, f.problem.eps);
            (first, next)
        });
        let (refusing, peer) = (&results[0], &results[1]);
        match bad {
            "eps" => assert!(matches!(refusing.0.result, Err(Error::BadEps { .. })), "{:?}", refusing.0.result),
            _ => assert!(matches!(refusing.0.result, Err(Error::Misaligned { .. })), "{:?}", refusing.0.result),
        }
        assert!(refusing.0.untouched(), "{bad}: the refused call wrote an output");
        match &peer.0.result {
            Err(Error::CallMismatch { detail, .. }) => assert!(detail.contains("refused"), "{bad}: {detail}"),
            other => panic!("{bad}: the peer of a refusing rank got {other:?}, not a call mismatch"),
        }
        assert!(peer.0.untouched(), "{bad}: the peer's mismatched call wrote an output");
        // The refusing rank learns of the broken pairing from its own header exchange: it is
        // poisoned too, and its next call never pairs with the peer's next one.
        assert!(refusing.1.result.is_err() && peer.1.result.is_err(), "{bad}: a call after the mismatch ran");
    }
}

#[test]
fn a_call_every_rank_refuses_keeps_the_group_in_step() {
    let f = fixture(3, 4, "instep::refused_everywhere");
    let reference = Reference::compute(&f);
    let results = run_group(3, config(), |op, stream| {
        let refused = call_rows(op, stream, &f, 4, -1.0);
        let real = call_rows(op, stream, &f, 4, f.problem.eps);
        (refused, real)
    });
    for (rank, (refused, real)) in results.iter().enumerate() {
        assert!(matches!(refused.result, Err(Error::BadEps { .. })), "rank {rank}: {:?}", refused.result);
        assert!(refused.untouched(), "rank {rank}");
        assert!(real.result.is_ok(), "rank {rank}: {:?}", real.result);
        reference.assert_residual_out_exact(&format!("rank {rank} after a refused call"), &real.residual_out);
    }
}

/// Runs `fixture` on `path` with the in-place forms chosen by `residual_in_place` (residual_out
/// written over the residual) and `out_over_input`, returns every rank's (out, residual_out) bits.
fn in_place_run(
    fixture: &Fixture<bf16>,
    path: Path,
    residual_in_place: bool,
    out_over_input: bool,
) -> Vec<(Vec<u16>, Vec<u16>)> {
    let world = fixture.problem.world_size;
    run_group(world, config(), |op, stream| {
        let elems = fixture.residual.len();
        let mut input = fixture.inputs[op.rank()].clone();
        let mut residual = fixture.residual.clone();
        let mut out = vec![bf16::ZERO; elems];
        let mut residual_out = vec![bf16::ZERO; elems];
        poison(&mut out);
        poison(&mut residual_out);
        let out_ptr = if out_over_input { input.as_mut_ptr() } else { out.as_mut_ptr() };
        let ro_ptr = if residual_in_place { residual.as_mut_ptr() } else { residual_out.as_mut_ptr() };
        // SAFETY: every pointer names a live vector of `elems` elements (the weight: `hidden`) that
        // outlives the call, which has finished when `forward` returns (cpu backend); the only
        // overlaps are the two the operator allows, and nothing else touches the vectors meanwhile.
        let args = unsafe {
            Args {
                input: TensorRef::from_raw(DevicePtr(input.as_ptr() as u64), elems),
                residual: TensorRef::from_raw(DevicePtr(residual.as_ptr() as u64), elems),
                weight: TensorRef::new(&fixture.weight[..]),
                out: TensorMut::from_raw(DevicePtr(out_ptr as u64), elems),
                residual_out: TensorMut::from_raw(DevicePtr(ro_ptr as u64), elems),
                eps: fixture.problem.eps,
            }
        };
        let taken = op.forward_on(stream, path, args).expect("in-place call");
        assert_eq!(taken, path);
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
        let out = if out_over_input { bits(&input) } else { bits(&out) };
        let residual_out = if residual_in_place { bits(&residual) } else { bits(&residual_out) };
        (out, residual_out)
    })
}

#[test]
fn the_in_place_forms_give_the_out_of_place_bits_on_every_path() {
    let f = fixture(3, 6, "instep::in_place");
    let reference = Reference::compute(&f);
    for path in PATHS {
        let separate = in_place_run(&f, path, false, false);
        for (residual_in_place, out_over_input) in [(true, false), (false, true), (true, true)] {
            let together = in_place_run(&f, path, residual_in_place, out_over_input);
            assert_eq!(
                together, separate,
                "{path}: residual in place {residual_in_place}, out over input {out_over_input}: other bits"
            );
        }
        for (rank, (_, residual_out)) in separate.iter().enumerate() {
            let got: Vec<bf16> = residual_out.iter().map(|&b| bf16::from_bits(b)).collect();
            reference.assert_residual_out_exact(&format!("{path} rank {rank}"), &got);
        }
    }
}

#[test]
fn every_other_overlap_is_refused_on_every_rank_before_anything_runs() {
    let f = fixture(2, 4, "instep::overlaps");
    let reference = Reference::compute(&f);
    // (what overlaps what): `out` over `residual`, `out` over `residual_out`, `residual_out` over
    // the input, `out` over the weight, and `out` half over the residual (a partial overlap).
    for case in ["out=residual", "out=residual_out", "residual_out=input", "out=weight", "out~residual"] {
        let results = run_group(2, config(), |op, stream| {
            let elems = f.residual.len();
            let input = f.inputs[op.rank()].clone();
            let residual = f.residual.clone();
            let weight = f.weight.clone();
            let mut out = vec![bf16::ZERO; elems];
            let mut residual_out = vec![bf16::ZERO; elems];
            poison(&mut out);
            poison(&mut residual_out);
            let (out_ptr, out_len) = match case {
                "out=residual" => (residual.as_ptr() as u64, elems),
                "out=residual_out" => (residual_out.as_ptr() as u64, elems),
                "out=weight" => (weight.as_ptr() as u64, elems),
                "out~residual" => (residual.as_ptr() as u64 + (elems as u64), elems),
                _ => (out.as_mut_ptr() as u64, elems),
            };
            let ro_ptr =
                if case == "residual_out=input" { input.as_ptr() as u64 } else { residual_out.as_mut_ptr() as u64 };
            let before = (residual.clone(), weight.clone(), input.clone());
            // SAFETY: the operator refuses these overlaps before it touches any of the memory
            // (the test asserts it); every pointer names live memory of the length given, except
            // the deliberately overlapping ones, which are never dereferenced.
            let result = unsafe {
                op.forward::<bf16>(
                    stream,
                    Args {
                        input: TensorRef::from_raw(DevicePtr(input.as_ptr() as u64), elems),
                        residual: TensorRef::from_raw(DevicePtr(residual.as_ptr() as u64), elems),
                        weight: TensorRef::from_raw(DevicePtr(weight.as_ptr() as u64), f.problem.hidden),
                        out: TensorMut::from_raw(DevicePtr(out_ptr), out_len),
                        residual_out: TensorMut::from_raw(DevicePtr(ro_ptr), elems),
                        eps: f.problem.eps,
                    },
                )
            };
            let untouched = (residual, weight, input) == before
                && out.iter().chain(&residual_out).all(|v| v.to_bits() == poison_value::<bf16>().to_bits());
            let next = super::call(op, stream, None, &f).map(|o| o.residual_out);
            (result, untouched, next)
        });
        for (rank, (result, untouched, next)) in results.into_iter().enumerate() {
            assert!(matches!(result, Err(Error::Aliasing { .. })), "{case} rank {rank}: {result:?}");
            assert!(untouched, "{case} rank {rank}: memory changed");
            let next = next.unwrap_or_else(|e| panic!("{case} rank {rank}: the next call failed: {e}"));
            reference.assert_residual_out_exact(&format!("{case} rank {rank}: the call after"), &next);
        }
    }
}

#[test]
fn negative_zero_rows_and_negative_subnormals_come_out_exact_on_every_path() {
    // Row 0: every element -0.0 on every rank (and in the residual): the sum is +0.0. Row 1:
    // negative subnormals (0x8001..) on every rank, -0.0 residual. Row 2: a mix of -0.0 and
    // negative subnormals per rank. Row 3: ordinary values.
    let problem = Problem::new(3, 4, 4096, DType::Bf16);
    let neg_zero = bf16::from_bits(0x8000);
    let f = Fixture::from_fn(
        &problem,
        |rank, row, col| match row {
            0 => neg_zero,
            1 => bf16::from_bits(0x8001 + (col % 0x7f) as u16),
            2 if (rank + col) % 2 == 0 => neg_zero,
            2 => bf16::from_bits(0x8001 + (rank as u16)),
            _ => bf16::from_f32(((rank * 7 + col) % 13) as f32 / 8.0 - 0.75),
        },
        |row, col| if row < 2 || col % 3 == 0 { neg_zero } else { bf16::from_f32(0.25) },
        |col| bf16::from_f32(1.0 + (col % 5) as f32 / 4.0),
    );
    let reference = Reference::compute(&f);
    for path in PATHS {
        let outputs = run_group(3, config(), |op, stream| super::call(op, stream, Some(path), &f).expect("call"));
        for (rank, o) in outputs.iter().enumerate() {
            let what = format!("{path} rank {rank}");
            reference.assert_residual_out_exact(&what, &o.residual_out);
            reference.assert_out_within(&what, &o.out, 1);
            // An all -0.0 sum plus a -0.0 residual: +0.0 + -0.0 = +0.0 in every column of row 0.
            assert!(o.residual_out[..4096].iter().all(|v| v.to_bits() == 0), "{what}: row 0 is not +0.0");
        }
    }
}

//! Tensors handed to the operator without `unsafe` (issue 15, item 2), on the cpu backend: the
//! safe in-place form `Args::in_place` gives the out-of-place bits on every path, and tensors whose
//! owner tracks their uses (the `StreamOrder` hook that cudarc's slices have on the cuda backend)
//! are ordered around the call: every `before_*` before anything is read or written, every
//! `after_*` once the call's work is done, none after a call refused; a hook that cannot order
//! refuses the call, which its peers see as a mismatch, not data.

use super::{call, run_group, test_config, PATHS};
use arfuse_fusion::{Args, BytesMut, Error, QuantOut, TensorMut, TensorRef, Variant};
use arfuse_kernels::api::Cpu;
use arfuse_kernels::contract::{Fp8Format, Quant, Scaling};
use arfuse_kernels::cpu::CpuStream;
use arfuse_kernels::{DType, DevicePtr, DeviceSlice, DeviceSliceMut, Element, StreamOrder, StreamOrderMut};
use arfuse_testkit::{assert_all_written, is_poison, poisoned, Fixture, Problem, Reference, TestSeed};
use half::bf16;
use std::sync::Mutex;

fn fixture(world: usize, rows: usize, hidden: usize, name: &str) -> Fixture<bf16> {
    Fixture::generate(&Problem::new(world, rows, hidden, DType::Bf16).with_seed(TestSeed::new(name).seed()))
}

fn bits(values: &[bf16]) -> Vec<u16> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn args_in_place_needs_no_unsafe_and_gives_the_out_of_place_bits_on_every_path() {
    let f = fixture(3, 6, 4096, "ordering::in_place");
    let reference = Reference::compute(&f);
    let results = run_group(3, test_config(1 << 20), |op, stream| {
        PATHS
            .iter()
            .map(|&path| {
                let separate = call(op, stream, Some(path), &f).expect("out of place");
                let mut hidden_states = f.inputs[op.rank()].clone();
                let mut residual = f.residual.clone();
                let args = Args::in_place(&mut hidden_states[..], &mut residual[..], &f.weight[..], f.problem.eps);
                let ran = op.forward_on(stream, path, args).expect("in place");
                assert_eq!(ran, path);
                (separate, hidden_states, residual)
            })
            .collect::<Vec<_>>()
    });
    for (rank, runs) in results.iter().enumerate() {
        for (path, (separate, out, residual_out)) in PATHS.iter().zip(runs) {
            let what = format!("rank {rank} {path} in place");
            reference.assert_residual_out_exact(&what, residual_out);
            reference.assert_out_within(&what, out, 1);
            assert_eq!(bits(out), bits(&separate.out), "{what}: out differs from out of place");
            assert_eq!(bits(residual_out), bits(&separate.residual_out), "{what}: residual_out differs");
        }
    }
}

/// A host tensor whose owner tracks its uses, as cudarc's slices do on the cuda backend: it logs
/// every hook with what its memory held then, and can refuse to order.
struct Tracked<'a, T = bf16> {
    name: &'static str,
    data: Vec<T>,
    log: &'a Mutex<Vec<String>>,
    refuse: bool,
}

impl<'a, T: Element> Tracked<'a, T> {
    fn new(name: &'static str, data: Vec<T>, log: &'a Mutex<Vec<String>>) -> Self {
        Tracked { name, data, log, refuse: false }
    }

    /// Logs `hook`, with whether the memory is still all poison (the outputs before the call) or
    /// has none left (after it).
    fn note(&self, hook: &str) {
        let state = match self.data.iter().filter(|v| is_poison(**v)).count() {
            0 => "written",
            n if n == self.data.len() => "poisoned",
            _ => "partly written",
        };
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{hook} {} {state}", self.name));
    }
}

// SAFETY: the vector owns `len()` initialised elements at this host address (the cpu backend's
// memory) for as long as the tracked tensor is borrowed.
unsafe impl<T: Element> DeviceSlice<Cpu> for Tracked<'_, T> {
    type Elem = T;
    fn device_ptr(&self) -> DevicePtr {
        DevicePtr(self.data.as_ptr() as u64)
    }
    fn len(&self) -> usize {
        self.data.len()
    }
    fn stream_order(&self) -> Option<&dyn StreamOrder<Cpu>> {
        Some(self)
    }
}

// SAFETY: a `&mut Tracked` is the only handle on its vector.
unsafe impl<T: Element> DeviceSliceMut<Cpu> for Tracked<'_, T> {
    fn stream_order_mut(&mut self) -> Option<&mut dyn StreamOrderMut<Cpu>> {
        Some(self)
    }
}

impl<T: Element> StreamOrder<Cpu> for Tracked<'_, T> {
    fn before_read(&self, _stream: &CpuStream) -> arfuse_kernels::Result<()> {
        self.note("before_read");
        if self.refuse {
            return Err(arfuse_kernels::Error::BadStream {
                backend: arfuse_kernels::BackendKind::Cpu,
                reason: "test".into(),
            });
        }
        Ok(())
    }
    fn after_read(&self, _stream: &CpuStream) {
        self.note("after_read");
    }
}

impl<T: Element> StreamOrderMut<Cpu> for Tracked<'_, T> {
    fn before_write(&mut self, _stream: &CpuStream) -> arfuse_kernels::Result<()> {
        self.note("before_write");
        Ok(())
    }
    fn after_write(&mut self, _stream: &CpuStream) {
        self.note("after_write");
    }
}

#[test]
fn tracked_tensors_are_ordered_before_and_after_the_call_and_not_after_a_refusal() {
    let f = fixture(2, 4, 2048, "ordering::tracked");
    let reference = Reference::compute(&f);
    let results = run_group(2, test_config(1 << 20), |op, stream| {
        let log = Mutex::new(Vec::new());
        let rank = op.rank();
        let input = Tracked::new("input", f.inputs[rank].clone(), &log);
        let residual = Tracked::new("residual", f.residual.clone(), &log);
        let weight = Tracked::new("weight", f.weight.clone(), &log);
        let mut out = Tracked::new("out", poisoned(f.residual.len()), &log);
        let mut residual_out = Tracked::new("residual_out", poisoned(f.residual.len()), &log);
        let path = op
            .forward(
                stream,
                Args {
                    input: TensorRef::new(&input),
                    residual: TensorRef::new(&residual),
                    weight: TensorRef::new(&weight),
                    out: TensorMut::new(&mut out),
                    residual_out: TensorMut::new(&mut residual_out),
                    eps: f.problem.eps,
                },
            )
            .expect("forward");
        let called = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
        // A refusal (a negative eps) is found before any hook: none runs, nothing is written.
        let refused = op.forward(
            stream,
            Args {
                input: TensorRef::new(&input),
                residual: TensorRef::new(&residual),
                weight: TensorRef::new(&weight),
                out: TensorMut::new(&mut out),
                residual_out: TensorMut::new(&mut residual_out),
                eps: -1.0,
            },
        );
        let after_refusal = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
        (path, called, refused.map(|_| ()), after_refusal, out.data, residual_out.data)
    });
    let expected = [
        "before_read input written",
        "before_read residual written",
        "before_read weight written",
        "before_write out poisoned",
        "before_write residual_out poisoned",
        "after_read input written",
        "after_read residual written",
        "after_read weight written",
        "after_write out written",
        "after_write residual_out written",
    ];
    for (rank, (path, called, refused, after_refusal, out, residual_out)) in results.iter().enumerate() {
        let what = format!("rank {rank} {path} with tracked tensors");
        assert_eq!(called, &expected, "{what}: the hooks in order, outputs untouched before and written after");
        assert!(matches!(refused, Err(Error::BadEps { .. })), "rank {rank}: {refused:?}");
        assert!(after_refusal.is_empty(), "rank {rank}: hooks ran for a refused call: {after_refusal:?}");
        assert_all_written(&what, out);
        reference.assert_residual_out_exact(&what, residual_out);
        reference.assert_out_within(&what, out, 1);
    }
}

#[test]
fn a_hook_that_cannot_order_refuses_the_call_and_its_peer_sees_a_mismatch() {
    let f = fixture(2, 4, 2048, "ordering::refusing_hook");
    let results = run_group(2, test_config(1 << 20), |op, stream| {
        let log = Mutex::new(Vec::new());
        let rank = op.rank();
        let mut input = Tracked::new("input", f.inputs[rank].clone(), &log);
        input.refuse = rank == 0;
        let mut out = poisoned::<bf16>(f.residual.len());
        let mut residual_out = poisoned::<bf16>(f.residual.len());
        let result = op.forward(
            stream,
            Args {
                input: TensorRef::new(&input),
                residual: TensorRef::new(&f.residual[..]),
                weight: TensorRef::new(&f.weight[..]),
                out: TensorMut::new(&mut out[..]),
                residual_out: TensorMut::new(&mut residual_out[..]),
                eps: f.problem.eps,
            },
        );
        let hooks = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
        (result.map(|_| ()), hooks, out, residual_out)
    });
    let (refused, hooks, out, residual_out) = &results[0];
    assert!(
        matches!(refused, Err(Error::Kernels(arfuse_kernels::Error::BadStream { .. }))),
        "rank 0 gets its hook's error: {refused:?}"
    );
    assert_eq!(hooks, &["before_read input written"], "rank 0: no after_* for a call that did not run");
    assert!(out.iter().chain(residual_out).all(|v| is_poison(*v)), "rank 0: the refused call wrote an output");
    let (mismatch, hooks, out, residual_out) = &results[1];
    assert!(matches!(mismatch, Err(Error::CallMismatch { .. })), "rank 1 sees the refusal: {mismatch:?}");
    assert_eq!(hooks, &["before_read input written", "after_read input written"], "rank 1's call ran its hooks");
    assert!(out.iter().chain(residual_out).all(|v| is_poison(*v)), "rank 1: the mismatched call wrote an output");
}

/// The FP8 output's scales are a tracked tensor like the others (issue 17: `forward_with` ordered
/// only `Args`' tensors): on every path, `before_write` runs after the other tensors' hooks and
/// before anything is written, `after_write` once the scales are written; the codes are raw bytes.
#[test]
fn fp8_scales_are_ordered_like_the_other_tracked_tensors_on_every_path() {
    let f = fixture(2, 3, 2048, "ordering::fp8_scales");
    let results = run_group(2, test_config(1 << 20), |op, stream| {
        PATHS
            .iter()
            .map(|&path| {
                let log = Mutex::new(Vec::new());
                let rank = op.rank();
                let input = Tracked::new("input", f.inputs[rank].clone(), &log);
                let residual = Tracked::new("residual", f.residual.clone(), &log);
                let weight = Tracked::new("weight", f.weight.clone(), &log);
                let mut out = Tracked::new("out", poisoned(f.residual.len()), &log);
                let mut residual_out = Tracked::new("residual_out", poisoned(f.residual.len()), &log);
                let mut scales = Tracked::new("scales", poisoned::<f32>(3), &log);
                let mut codes = vec![0u8; f.residual.len()];
                op.forward_on_with(
                    stream,
                    path,
                    Args {
                        input: TensorRef::new(&input),
                        residual: TensorRef::new(&residual),
                        weight: TensorRef::new(&weight),
                        out: TensorMut::new(&mut out),
                        residual_out: TensorMut::new(&mut residual_out),
                        eps: f.problem.eps,
                    },
                    Variant {
                        no_residual: false,
                        quant: Some(QuantOut {
                            quant: Quant { format: Fp8Format::E4m3Fn, scaling: Scaling::PerToken },
                            codes: BytesMut::host(&mut codes[..]),
                            scales: Some(TensorMut::new(&mut scales)),
                        }),
                    },
                )
                .expect("forward_on_with");
                let called = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
                (path, called, scales.data.clone())
            })
            .collect::<Vec<_>>()
    });
    let expected = [
        "before_read input written",
        "before_read residual written",
        "before_read weight written",
        "before_write out poisoned",
        "before_write residual_out poisoned",
        "before_write scales poisoned",
        "after_read input written",
        "after_read residual written",
        "after_read weight written",
        "after_write out written",
        "after_write residual_out written",
        "after_write scales written",
    ];
    for (rank, runs) in results.iter().enumerate() {
        for (path, called, scales) in runs {
            assert_eq!(called, &expected, "rank {rank} {path}: the hooks in order, the scales among them");
            assert!(scales.iter().all(|s| s.is_finite() && *s > 0.0), "rank {rank} {path}: scales {scales:?}");
        }
    }
}

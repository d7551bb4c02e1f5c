//! Operator calls as `fusion` makes them, their seeded inputs, the CPU backend's results of the
//! same ranks (the reference every GPU output must equal bit for bit), and the comparisons.

use crate::ranks::{Rank, EPS};
use arfuse_kernels::{cpu, Element, GpuBackend, KernelId, LaunchParams, Op, SIGNAL_BYTES};
use arfuse_testkit::poisoned;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One operator call as `fusion` makes it: one or two kernels, one barrier base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    FusedOneStage,
    FusedTwoStage,
    AllReduceOneStage,
    AllReduceTwoStage,
    AddRmsNorm,
}

impl Call {
    pub(crate) const ALL: [Call; 5] =
        [Call::FusedOneStage, Call::FusedTwoStage, Call::AllReduceOneStage, Call::AllReduceTwoStage, Call::AddRmsNorm];

    pub(crate) fn kernels(self) -> &'static [Op] {
        match self {
            Call::FusedOneStage => &[Op::FusedOneStage],
            Call::FusedTwoStage => &[Op::FusedTwoStage, Op::ScratchAddRmsNorm],
            Call::AllReduceOneStage => &[Op::AllReduceOneStage],
            Call::AllReduceTwoStage => &[Op::ReduceScatter, Op::AllGather],
            Call::AddRmsNorm => &[Op::AddRmsNorm],
        }
    }

    pub(crate) fn crosses_ranks(self) -> bool {
        self.kernels()[0].crosses_ranks()
    }

    pub(crate) fn writes_residual(self) -> bool {
        matches!(self, Call::FusedOneStage | Call::FusedTwoStage | Call::AddRmsNorm)
    }

    /// The call whose CPU result this one must equal (1-stage and 2-stage agree bit for bit).
    fn reference(self) -> Call {
        match self {
            Call::FusedTwoStage => Call::FusedOneStage,
            Call::AllReduceTwoStage => Call::AllReduceOneStage,
            other => other,
        }
    }
}

/// The inputs of one call: every rank's `x`, the residual (the same on every rank), the weight.
pub(crate) struct Inputs<T> {
    pub(crate) rows: usize,
    pub(crate) hidden: usize,
    pub(crate) x: Vec<Vec<T>>,
    pub(crate) residual: Vec<T>,
    pub(crate) weight: Vec<T>,
}

pub(crate) fn random_inputs<T: Element>(world: usize, rows: usize, hidden: usize, seed: u64) -> Inputs<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let elems = rows * hidden;
    // Random bits in bulk (tens of millions of values per case), one u32 per value: 1 in 64 is -0.0,
    // 1 in 64 is +0.0, the rest uniform in [-scale, scale).
    let mut values = |len: usize, scale: f32| -> Vec<T> {
        let mut bits = vec![0u32; len];
        rng.fill(&mut bits[..]);
        bits.into_iter()
            .map(|b| match b & 63 {
                0 => T::from_bits_u32(T::NEG_ZERO_BITS),
                1 => T::from_f32(0.0),
                _ => T::from_f32(((b >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale),
            })
            .collect()
    };
    let mut x: Vec<Vec<T>> = (0..world).map(|_| values(elems, 2.0)).collect();
    let residual = values(elems, 4.0);
    let weight = values(hidden, 1.5);
    // Some columns of row 0 are -0.0 on every rank (the all-(-0.0) sum of the contract).
    for col in (5..hidden).step_by(97) {
        for xr in &mut x {
            xr[col] = T::from_bits_u32(T::NEG_ZERO_BITS);
        }
    }
    Inputs { rows, hidden, x, residual, weight }
}

/// What one rank's call produced.
#[derive(Clone, Default)]
pub(crate) struct Outputs<T> {
    pub(crate) out: Vec<T>,
    pub(crate) residual_out: Vec<T>,
}

/// The CPU backend's result of `call` for every rank, its ranks running as threads.
pub(crate) fn cpu_reference<T: Element>(inputs: &Inputs<T>, call: Call) -> Vec<Outputs<T>> {
    let world = inputs.x.len();
    let elems = inputs.rows * inputs.hidden;
    let zero = T::from_bits_u32(0);
    // The receive area: a slot of the chunk per rank, up to a row per rank more than `elems`.
    let mut receive = vec![vec![zero; elems + world * inputs.hidden]; world];
    let mut scratch = vec![vec![zero; elems]; world];
    let mut signals = vec![vec![0u64; SIGNAL_BYTES / 8]; world];
    let slot_bytes = elems * std::mem::size_of::<T>();
    let push_words = arfuse_kernels::params::push_region_bytes(world, slot_bytes) / 4;
    let mut push = vec![vec![arfuse_kernels::params::PUSH_SENTINEL; push_words]; world];
    let mut outputs = vec![Outputs { out: vec![zero; elems], residual_out: vec![zero; elems] }; world];
    let mut template = LaunchParams {
        residual: inputs.residual.as_ptr() as u64,
        weight: inputs.weight.as_ptr() as u64,
        barrier_base: 2,
        deadline_ns: 120_000_000_000,
        rows: inputs.rows as u32,
        hidden: inputs.hidden as u32,
        world_size: world as u32,
        eps: EPS,
        push_slot_bytes: slot_bytes as u32,
        ..LaunchParams::default()
    };
    for peer in 0..world {
        template.push[peer] = push[peer].as_mut_ptr() as u64;
        template.receive[peer] = receive[peer].as_mut_ptr() as u64;
        template.scratch[peer] = scratch[peer].as_mut_ptr() as u64;
        template.signals[peer] = signals[peer].as_mut_ptr() as u64;
    }
    let params: Vec<LaunchParams> = outputs
        .iter_mut()
        .enumerate()
        .map(|(rank, o)| {
            // (Field by field: struct update syntax here trips a rustc 1.95 ICE.)
            let mut p = template;
            p.rank = rank as u32;
            p.input = inputs.x[rank].as_ptr() as u64;
            p.out = o.out.as_mut_ptr() as u64;
            p.residual_out = o.residual_out.as_mut_ptr() as u64;
            p
        })
        .collect();
    std::thread::scope(|scope| {
        for p in &params {
            scope.spawn(move || {
                for &op in call.kernels() {
                    // SAFETY: every address in `p` is a host vector of `elems` elements (the weight:
                    // `hidden`) or a zeroed signal area, all alive until the scope ends; only the
                    // barrier protocol orders the ranks' accesses to receive areas and scratch.
                    unsafe { cpu::kernels::run(KernelId { op, dtype: T::DTYPE }, p) }.expect("cpu kernel");
                }
            });
        }
    });
    drop((receive, scratch, signals, push));
    outputs
}

/// `Ok` if `got == want` bit for bit, else a description of the first difference.
pub(crate) fn compare<T: Element>(what: &str, got: &[T], want: &[T], hidden: usize) -> Result<(), String> {
    let mut differ = got.iter().zip(want).enumerate().filter(|(_, (g, w))| g.to_bits_u32() != w.to_bits_u32());
    let Some((first, (g, w))) = differ.next() else { return Ok(()) };
    let count = 1 + differ.count();
    Err(format!(
        "{what}: {count} of {} elements differ; first at row {} col {}: gpu {:#06x} ({}), cpu {:#06x} ({})",
        want.len(),
        first / hidden,
        first % hidden,
        g.to_bits_u32(),
        g.to_f32(),
        w.to_bits_u32(),
        w.to_f32()
    ))
}

/// The error word of `r` as a protocol failure of `what`, if a kernel gave up.
pub(crate) fn gave_up<B: GpuBackend>(r: &Rank<B>, what: &str) -> Result<(), String> {
    let word = r.error_word();
    if word.kind() == 0 {
        return Ok(());
    }
    Err(format!(
        "rank {}: {what} gave up: error word {:#x} (kind {}, peer {}, barrier {})",
        r.rank,
        word.0,
        word.kind(),
        word.peer(),
        word.barrier()
    ))
}

/// Runs `calls` (each with its call index) on every rank, on the same inputs: uploads, poisons the
/// outputs, launches, waits, checks the error word, reads back. `[rank][call]`.
pub(crate) fn gpu_calls<B: GpuBackend, T: Element>(
    ranks: &[Rank<B>],
    inputs: &Inputs<T>,
    calls: &[(Call, u64)],
) -> Result<Vec<Vec<Outputs<T>>>, String> {
    let elems = inputs.rows * inputs.hidden;
    std::thread::scope(|scope| {
        let threads: Vec<_> = ranks
            .iter()
            .map(|r| {
                scope.spawn(move || -> Result<Vec<Outputs<T>>, String> {
                    r.upload(Rank::<B>::addr(&r.local.input), &inputs.x[r.rank]);
                    r.upload(Rank::<B>::addr(&r.local.residual), &inputs.residual);
                    r.upload(Rank::<B>::addr(&r.local.weight), &inputs.weight);
                    let mut results = Vec::new();
                    for &(call, index) in calls {
                        r.upload(Rank::<B>::addr(&r.local.out), &poisoned::<T>(elems));
                        r.upload(Rank::<B>::addr(&r.local.residual_out), &poisoned::<T>(elems));
                        let params = r.params(inputs.rows, inputs.hidden, 0, index);
                        r.launch(call, T::DTYPE, &params).map_err(|e| format!("rank {}: {call:?}: {e}", r.rank))?;
                        r.wait(&format!("{call:?}"));
                        gave_up(r, &format!("{call:?}"))?;
                        let out = r.download(Rank::<B>::addr(&r.local.out), elems);
                        let residual_out = if call.writes_residual() {
                            r.download(Rank::<B>::addr(&r.local.residual_out), elems)
                        } else {
                            Vec::new()
                        };
                        results.push(Outputs { out, residual_out });
                    }
                    Ok(results)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("rank thread")).collect()
    })
}

/// Checks every rank's GPU result of every call against the CPU's, and 1-stage against 2-stage
/// on the GPU; returns the elements compared. `references` caches the CPU results by call (so
/// callers can reuse them).
pub(crate) fn check_case<T: Element>(
    label: &str,
    inputs: &Inputs<T>,
    calls: &[Call],
    gpu: &[Vec<Outputs<T>>],
    references: &mut Vec<(Call, Vec<Outputs<T>>)>,
    failures: &mut Vec<String>,
) -> usize {
    let mut compared = 0;
    for (k, &call) in calls.iter().enumerate() {
        let wanted = call.reference();
        if !references.iter().any(|(c, _)| *c == wanted) {
            references.push((wanted, cpu_reference(inputs, wanted)));
        }
        let Some((_, cpu)) = references.iter().find(|(c, _)| *c == wanted) else { continue };
        for (rank, per_rank) in gpu.iter().enumerate() {
            let got = &per_rank[k];
            let mut check = |what: &str, g: &[T], w: &[T]| {
                compared += w.len();
                if let Err(e) = compare(&format!("{label} {call:?} rank {rank} {what}"), g, w, inputs.hidden) {
                    failures.push(e);
                }
            };
            check("out", &got.out, &cpu[rank].out);
            if call.writes_residual() {
                check("residual_out", &got.residual_out, &cpu[rank].residual_out);
            }
        }
    }
    // Path invariance on the GPU itself: 1-stage and 2-stage give the same bits.
    for (one, two) in [(Call::FusedOneStage, Call::FusedTwoStage), (Call::AllReduceOneStage, Call::AllReduceTwoStage)] {
        let (Some(a), Some(b)) = (calls.iter().position(|&c| c == one), calls.iter().position(|&c| c == two)) else {
            continue;
        };
        for (rank, per_rank) in gpu.iter().enumerate() {
            if let Err(e) = compare(
                &format!("{label} rank {rank} {one:?} vs {two:?} out"),
                &per_rank[b].out,
                &per_rank[a].out,
                inputs.hidden,
            ) {
                failures.push(e);
            }
        }
    }
    compared
}

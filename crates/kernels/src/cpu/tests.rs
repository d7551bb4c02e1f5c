//! The CPU kernels' 2-stage protocol (the reference for the GPU's): the reduce-scatter pushes each
//! owner's chunk into its slot of the owner's receive area (`params::receive_slot_offset`) and
//! reads no peer's memory; the areas are reused at once by the next call, whatever its shape.

use super::Cpu;
use crate::contract::sum_ranks;
use crate::params::{
    chunk_range, push_region_bytes, receive_area_bytes, receive_slot_offset, LaunchParams, PACK_BYTES, PUSH_SENTINEL,
    SIGNAL_BYTES,
};
use crate::{Backend, DevicePtr, Element, KernelId, Op};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Barrier;
use std::time::Duration;

/// The largest call of these tests, in bytes.
const MAX_CALL: usize = 5 * 2880 * 2;

/// Every rank's shared buffer: `[signal][receive area][scratch][push region]`, as arfuse-ipc lays it out.
struct Group {
    world: usize,
    buffers: Vec<<Cpu as Backend>::SharedBuffer>,
}

impl Group {
    fn new(world: usize) -> Self {
        let device = Cpu::open_device(0, 1).expect("cpu");
        let push = push_region_bytes(world, MAX_CALL);
        let buffers = (0..world)
            .map(|_| {
                let buffer = Cpu::alloc_shared(&device, Self::push_offset(world) + push).expect("shm");
                Cpu::fill_shared(&device, &buffer, Self::push_offset(world), push, PUSH_SENTINEL).expect("arm");
                buffer
            })
            .collect();
        Group { world, buffers }
    }
    fn scratch_offset(world: usize) -> usize {
        SIGNAL_BYTES + receive_area_bytes(MAX_CALL, world)
    }
    fn push_offset(world: usize) -> usize {
        Self::scratch_offset(world) + MAX_CALL
    }
    fn base(&self, rank: usize) -> u64 {
        Cpu::shared_ptr(&self.buffers[rank]).0
    }
    fn params(&self, rank: usize, local: &Local) -> LaunchParams {
        let mut p = LaunchParams {
            input: local.input.as_ptr() as u64,
            residual: local.residual.as_ptr() as u64,
            weight: local.weight.as_ptr() as u64,
            out: local.out.as_ptr() as u64,
            residual_out: local.residual_out.as_ptr() as u64,
            deadline_ns: Duration::from_secs(10).as_nanos() as u64,
            rows: local.rows as u32,
            hidden: local.hidden as u32,
            rank: rank as u32,
            world_size: self.world as u32,
            eps: 1e-6,
            push_slot_bytes: MAX_CALL as u32,
            ..LaunchParams::default()
        };
        for r in 0..self.world {
            p.signals[r] = self.base(r);
            p.receive[r] = self.base(r) + SIGNAL_BYTES as u64;
            p.scratch[r] = self.base(r) + Self::scratch_offset(self.world) as u64;
            p.push[r] = self.base(r) + Self::push_offset(self.world) as u64;
        }
        p
    }
    /// `len` elements of rank `rank`'s buffer at byte `offset`.
    fn read(&self, rank: usize, offset: usize, len: usize) -> Vec<bf16> {
        let mut bytes = vec![0u8; len * 2];
        // SAFETY: every caller's range lies inside the buffer (the layout above).
        unsafe { Cpu::read_back(&super::CpuStream, DevicePtr(self.base(rank)).add(offset), &mut bytes) }.expect("read");
        bytes.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect()
    }
}

struct Local {
    rows: usize,
    hidden: usize,
    input: Vec<bf16>,
    residual: Vec<bf16>,
    weight: Vec<bf16>,
    out: Vec<bf16>,
    residual_out: Vec<bf16>,
}

fn random(rng: &mut StdRng, len: usize) -> Vec<bf16> {
    (0..len).map(|_| bf16::from_f32(rng.gen_range(-2.0f32..2.0))).collect()
}

fn bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every rank's local tensors for a `rows x hidden` call (the same residual and weight on all),
/// outputs poisoned with NaN.
fn locals(world: usize, rows: usize, hidden: usize, rng: &mut StdRng) -> Vec<Local> {
    let (residual, weight) = (random(rng, rows * hidden), random(rng, hidden));
    (0..world)
        .map(|_| Local {
            rows,
            hidden,
            input: random(rng, rows * hidden),
            residual: residual.clone(),
            weight: weight.clone(),
            out: vec![bf16::NAN; rows * hidden],
            residual_out: vec![bf16::NAN; rows * hidden],
        })
        .collect()
}

/// Launches `ops` on rank `rank` with `p`, in order.
fn run(ops: &[Op], p: &LaunchParams) {
    for &op in ops {
        // SAFETY: every pointer of `p` names a live buffer of the extents the kernels document
        // (the group's buffers are sized for `MAX_CALL`, the locals for the call's shape).
        unsafe { Cpu::launch(&super::CpuDevice, &super::CpuStream, KernelId { op, dtype: bf16::DTYPE }, p) }
            .expect("launch");
    }
}

/// After a reduce-scatter, each rank's receive area holds, in sender `s`'s slot, exactly `s`'s
/// input over the rank's chunk; every rank's scratch holds the rank-order sum of every element;
/// the inputs are untouched. Worlds 2, 3 and 5, a shape whose chunks are not all the same size.
#[test]
fn the_reduce_scatter_pushes_each_chunk_into_its_owner() {
    for world in [2, 3, 5] {
        let (rows, hidden) = (3, 2880);
        let elems = rows * hidden;
        let pack = bf16::DTYPE.pack_elems();
        let group = Group::new(world);
        let mut rng = StdRng::seed_from_u64(0x2057 + world as u64);
        let locals = locals(world, rows, hidden, &mut rng);
        let inputs: Vec<Vec<bf16>> = locals.iter().map(|l| l.input.clone()).collect();
        let barrier = Barrier::new(world);
        std::thread::scope(|s| {
            for (rank, local) in locals.iter().enumerate() {
                let (group, barrier) = (&group, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    run(&[Op::ReduceScatter], &group.params(rank, local));
                });
            }
        });
        for owner in 0..world {
            let chunk = super::kernels::chunk_of(owner, world, elems, pack);
            for (sender, input) in inputs.iter().enumerate().filter(|&(s, _)| s != owner) {
                let at = SIGNAL_BYTES + receive_slot_offset(elems / pack, PACK_BYTES, world, sender);
                assert_eq!(
                    bits(&group.read(owner, at, chunk.len())),
                    bits(&input[chunk.clone()]),
                    "world {world}: rank {sender}'s part of rank {owner}'s chunk"
                );
            }
            let want: Vec<bf16> = (0..elems).map(|i| sum_ranks(inputs.iter().map(|x| x[i]))).collect();
            assert_eq!(
                bits(&group.read(owner, Group::scratch_offset(world), elems)),
                bits(&want),
                "world {world}: rank {owner}'s scratch"
            );
        }
        for (rank, local) in locals.iter().enumerate() {
            assert_eq!(bits(&local.input), bits(&inputs[rank]), "world {world}: rank {rank}'s input written");
        }
    }
}

/// After a fused 2-stage call's first kernel, each rank's receive area holds, in sender `s`'s
/// slot, exactly `s`'s rows of the rank's chunk; each rank's scratch holds the rank-order sums of
/// the rows the other ranks own (its own rows it normalised directly: their scratch stays as it
/// was); the rows a rank owns are the only outputs its first kernel wrote.
#[test]
fn the_fused_two_stage_call_pushes_each_rows_chunk_into_its_owner() {
    for world in [2, 3, 5] {
        let (rows, hidden) = (4, 2880);
        let group = Group::new(world);
        let mut rng = StdRng::seed_from_u64(0xf25 + world as u64);
        let mut locals = locals(world, rows, hidden, &mut rng);
        let inputs: Vec<Vec<bf16>> = locals.iter().map(|l| l.input.clone()).collect();
        let barrier = Barrier::new(world);
        std::thread::scope(|s| {
            for (rank, local) in locals.iter_mut().enumerate() {
                let (group, barrier) = (&group, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    run(&[Op::FusedTwoStage], &group.params(rank, local));
                });
            }
        });
        let row_bytes = hidden * 2;
        for (owner, local) in locals.iter().enumerate() {
            let chunk = chunk_range(owner, world, rows);
            let elems = chunk.start * hidden..chunk.end * hidden;
            for (sender, input) in inputs.iter().enumerate().filter(|&(s, _)| s != owner) {
                let at = SIGNAL_BYTES + receive_slot_offset(rows, row_bytes, world, sender);
                assert_eq!(
                    bits(&group.read(owner, at, elems.len())),
                    bits(&input[elems.clone()]),
                    "world {world}: rank {sender}'s rows of rank {owner}'s chunk"
                );
            }
            let scratch = group.read(owner, Group::scratch_offset(world), rows * hidden);
            for row in 0..rows {
                let range = row * hidden..(row + 1) * hidden;
                let got = bits(&scratch[range.clone()]);
                if chunk.contains(&row) {
                    assert!(got.iter().all(|&b| b == 0), "world {world}: rank {owner} wrote its own row {row}'s sum");
                } else {
                    let want: Vec<bf16> = range.map(|i| sum_ranks(inputs.iter().map(|x| x[i]))).collect();
                    assert_eq!(got, bits(&want), "world {world}: rank {owner}'s scratch, row {row}");
                }
                let written = !local.out[row * hidden..(row + 1) * hidden].iter().any(|x| x.is_nan());
                assert_eq!(written, chunk.contains(&row), "world {world}: rank {owner}'s out, row {row}");
            }
        }
    }
}

/// Calls of changing shapes back to back, through the 2-stage ops and the unfused path's
/// reduce-scatter + all-gather, give the bits of the 1-stage kernels (which push into other
/// buffers) on every call: the receive area and scratch are safe to reuse at once, including
/// after a larger call, with chunks that are empty on some ranks (fewer packs than ranks).
#[test]
fn back_to_back_two_stage_calls_of_changing_shapes_stay_exact() {
    let hidden = 2880;
    for world in [2, 3] {
        let group = Group::new(world);
        let mut rng = StdRng::seed_from_u64(0xb2b + world as u64);
        let barrier = Barrier::new(world);
        // (rows, hidden): the largest call, a single pack (hidden 8 at 1 row), a middle one.
        for (call, &(rows, hidden)) in [(5, hidden), (1, 8), (2, hidden), (5, hidden), (1, 16)].iter().enumerate() {
            for (two_stage, one_stage) in [
                (&[Op::FusedTwoStage, Op::ScratchAddRmsNorm][..], &[Op::FusedOneStage][..]),
                (&[Op::ReduceScatter, Op::AllGather][..], &[Op::AllReduceOneStage][..]),
            ] {
                let mut locals = locals(world, rows, hidden, &mut rng);
                let results: Vec<[(Vec<u16>, Vec<u16>); 2]> = std::thread::scope(|s| {
                    let handles: Vec<_> = locals
                        .iter_mut()
                        .enumerate()
                        .map(|(rank, local)| {
                            let (group, barrier) = (&group, &barrier);
                            s.spawn(move || {
                                let mut both = Vec::new();
                                for ops in [two_stage, one_stage] {
                                    local.out.fill(bf16::NAN);
                                    local.residual_out.fill(bf16::NAN);
                                    barrier.wait();
                                    run(ops, &group.params(rank, local));
                                    both.push((bits(&local.out), bits(&local.residual_out)));
                                }
                                [both[0].clone(), both[1].clone()]
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().expect("rank")).collect()
                });
                for (rank, [two, one]) in results.iter().enumerate() {
                    let what = format!("world {world} call {call} ({rows}x{hidden}) {two_stage:?} rank {rank}");
                    assert!(!two.0.iter().any(|&b| bf16::from_bits(b).is_nan()), "{what}: out not written");
                    assert_eq!(two.0, one.0, "{what}: out differs from {one_stage:?}");
                    if one_stage == [Op::FusedOneStage] {
                        assert_eq!(two.1, one.1, "{what}: residual_out differs");
                    }
                }
            }
        }
    }
}

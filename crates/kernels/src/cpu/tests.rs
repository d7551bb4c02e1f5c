//! The CPU kernels with graph inputs read in place (`LaunchParams::inputs`, honoured by the
//! reduce-scatter; the 1-stage kernels push and ignore it): the same bits as the staging copy on
//! every cross-rank kernel, and an empty table refused on every rank.

use super::Cpu;
use crate::params::{push_region_bytes, LaunchParams, PUSH_SENTINEL, SIGNAL_BYTES, SIGNAL_ERROR_OFFSET};
use crate::{Backend, DevicePtr, Element, Error, ErrorWord, KernelId, Op, MAX_RANKS};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Barrier;
use std::time::Duration;

const ROWS: usize = 5;
const HIDDEN: usize = 2880;
const ELEMS: usize = ROWS * HIDDEN;
const HALF: usize = ELEMS * 2;

/// Every rank's shared buffer: `[signal][staging 0][staging 1][scratch][push region]`.
struct Group {
    buffers: Vec<<Cpu as Backend>::SharedBuffer>,
}

impl Group {
    fn new(world: usize) -> Self {
        let device = Cpu::open_device(0, 1).expect("cpu");
        let push = push_region_bytes(world, HALF);
        let buffers = (0..world)
            .map(|_| {
                let buffer = Cpu::alloc_shared(&device, SIGNAL_BYTES + 3 * HALF + push).expect("shm");
                Cpu::fill_shared(&device, &buffer, SIGNAL_BYTES + 3 * HALF, push, PUSH_SENTINEL).expect("arm");
                buffer
            })
            .collect();
        Group { buffers }
    }
    fn base(&self, rank: usize) -> u64 {
        Cpu::shared_ptr(&self.buffers[rank]).0
    }
    fn params(&self, rank: usize, world: usize, local: &Local) -> LaunchParams {
        let mut p = LaunchParams {
            input: local.input.as_ptr() as u64,
            residual: local.residual.as_ptr() as u64,
            weight: local.weight.as_ptr() as u64,
            out: local.out.as_ptr() as u64,
            residual_out: local.residual_out.as_ptr() as u64,
            deadline_ns: Duration::from_secs(10).as_nanos() as u64,
            rows: ROWS as u32,
            hidden: HIDDEN as u32,
            rank: rank as u32,
            world_size: world as u32,
            eps: 1e-6,
            staging_half_bytes: HALF as u32,
            push_slot_bytes: HALF as u32,
            ..LaunchParams::default()
        };
        for r in 0..world {
            p.signals[r] = self.base(r);
            p.staging[r] = self.base(r) + SIGNAL_BYTES as u64;
            p.scratch[r] = self.base(r) + (SIGNAL_BYTES + 2 * HALF) as u64;
            p.push[r] = self.base(r) + (SIGNAL_BYTES + 3 * HALF) as u64;
        }
        p
    }
}

struct Local {
    input: Vec<bf16>,
    residual: Vec<bf16>,
    weight: Vec<bf16>,
    out: Vec<bf16>,
    residual_out: Vec<bf16>,
}

fn random(rng: &mut StdRng, len: usize) -> Vec<bf16> {
    (0..len).map(|_| bf16::from_f32(rng.gen_range(-2.0f32..2.0))).collect()
}

/// Runs `ops` on every rank (threads), in copy mode and then in place; returns, per rank, the
/// outputs `(out, residual_out)` of both.
#[allow(clippy::type_complexity)]
fn run_both(world: usize, ops: &[Op], seed: u64) -> Vec<[(Vec<u16>, Vec<u16>); 2]> {
    let group = Group::new(world);
    let mut rng = StdRng::seed_from_u64(seed);
    let (residual, weight) = (random(&mut rng, ELEMS), random(&mut rng, HIDDEN));
    let locals: Vec<Local> = (0..world)
        .map(|_| Local {
            input: random(&mut rng, ELEMS),
            residual: residual.clone(),
            weight: weight.clone(),
            out: vec![bf16::NAN; ELEMS],
            residual_out: vec![bf16::NAN; ELEMS],
        })
        .collect();
    let inputs: Vec<u64> = locals.iter().map(|l| l.input.as_ptr() as u64).collect();
    let barrier = Barrier::new(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = locals
            .into_iter()
            .enumerate()
            .map(|(rank, mut local)| {
                let (group, inputs, barrier) = (&group, &inputs, &barrier);
                s.spawn(move || {
                    let mut table = [0u64; MAX_RANKS];
                    table[..world].copy_from_slice(inputs);
                    let mut results = Vec::new();
                    for in_place in [false, true] {
                        local.out.fill(bf16::NAN);
                        local.residual_out.fill(bf16::NAN);
                        barrier.wait();
                        let mut p = group.params(rank, world, &local);
                        if in_place {
                            p.inputs = table.as_ptr() as u64;
                        }
                        for &op in ops {
                            // SAFETY: every pointer names a live buffer of the extents the kernels
                            // document; the table holds every rank's live input.
                            unsafe {
                                Cpu::launch(
                                    &super::CpuDevice,
                                    &super::CpuStream,
                                    KernelId { op, dtype: bf16::DTYPE },
                                    &p,
                                )
                            }
                            .expect("launch");
                        }
                        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>();
                        results.push((bits(&local.out), bits(&local.residual_out)));
                        barrier.wait();
                        if in_place {
                            // Epoch 2 would have copied into staging half 0 (epoch 1 used half 1).
                            let mut staging = vec![0u8; HALF];
                            let at = DevicePtr(group.base(rank)).add(SIGNAL_BYTES);
                            // SAFETY: staging half 0 lies inside this rank's buffer.
                            unsafe { Cpu::read_back(&super::CpuStream, at, &mut staging) }.expect("read");
                            assert!(staging.iter().all(|&b| b == 0), "rank {rank} {ops:?}: input copied to staging");
                        }
                    }
                    let [copy, in_place]: [_; 2] = results.try_into().expect("two runs");
                    [copy, in_place]
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank")).collect()
    })
}

#[test]
fn inputs_read_in_place_give_the_staging_copys_bits() {
    for world in [2, 3] {
        for ops in [
            &[Op::FusedOneStage][..],
            &[Op::ReduceScatter, Op::ScratchAddRmsNorm],
            &[Op::AllReduceOneStage],
            &[Op::ReduceScatter, Op::AllGather],
        ] {
            let results = run_both(world, ops, 0x5eed + world as u64);
            for (rank, [copy, in_place]) in results.iter().enumerate() {
                assert!(!copy.0.iter().any(|&b| bf16::from_bits(b).is_nan()), "world {world} {ops:?}: out not written");
                assert_eq!(copy, in_place, "world {world} rank {rank} {ops:?}: in place differs from the staging copy");
            }
        }
    }
}

#[test]
fn an_empty_input_table_is_refused_on_every_rank() {
    let world = 2;
    let group = Group::new(world);
    let barrier = Barrier::new(world);
    std::thread::scope(|s| {
        for rank in 0..world {
            let (group, barrier) = (&group, &barrier);
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(rank as u64);
                let local = Local {
                    input: random(&mut rng, ELEMS),
                    residual: random(&mut rng, ELEMS),
                    weight: random(&mut rng, HIDDEN),
                    out: vec![bf16::NAN; ELEMS],
                    residual_out: vec![bf16::NAN; ELEMS],
                };
                let table = [0u64; MAX_RANKS];
                let mut p = group.params(rank, world, &local);
                p.inputs = table.as_ptr() as u64;
                barrier.wait();
                // SAFETY: as in `run_both`; the table is empty, so nothing is read.
                let res = unsafe {
                    Cpu::launch(
                        &super::CpuDevice,
                        &super::CpuStream,
                        KernelId { op: Op::ReduceScatter, dtype: bf16::DTYPE },
                        &p,
                    )
                };
                assert!(matches!(res, Err(Error::NotRegistered { barrier: 2, .. })), "rank {rank}: {res:?}");
                let mut word = [0u8; 8];
                // SAFETY: the error word lies inside this rank's signal area.
                unsafe {
                    Cpu::read_back(&super::CpuStream, DevicePtr(group.base(rank)).add(SIGNAL_ERROR_OFFSET), &mut word)
                }
                .expect("read");
                assert_eq!(ErrorWord(u64::from_le_bytes(word)).kind(), ErrorWord::KIND_NOT_REGISTERED);
                assert!(local.out.iter().all(|x| x.is_nan()), "rank {rank}: out written");
            });
        }
    });
}

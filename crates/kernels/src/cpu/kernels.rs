//! The CPU versions of the GPU kernels: the same algorithms, the same barriers, in Rust.
//!
//! Extents every launch may touch (`E = rows * hidden` elements of the kernel's dtype):
//! - `input`: `E` elements, read; pushed into every peer's push region by the 1-stage kernels,
//!   chunk by chunk into the owners' receive areas by the reduce-scatter (peers never read it);
//! - `push[p]`: `push_region_bytes(world, push_slot_bytes)` bytes (every cross-rank kernel writes
//!   its header there; the 1-stage kernels need `E` elements to fit `push_slot_bytes`);
//! - `receive[p]`: `receive_area_bytes(E * size, world)` bytes, written by every peer of `p` (its
//!   slot of `p`'s chunk) and read by `p` (reduce-scatter, fused 2-stage);
//! - `scratch[p]`: `E` elements, written by every rank (its chunk) and read by `p`;
//! - `input`, `residual`, `out`, `residual_out`: `E` elements; `weight`: `hidden` elements;
//!   add+RMSNorm may take `input == out` (in place);
//! - the epilogue ops ([`Op::has_epilogue`]) with no residual: `residual` and `residual_out`
//!   untouched (any value); with FP8 out: `out_q` `E` bytes, `scales` the scaling's count of f32;
//! - [`Op::QuantizeFp8`]: `input` `E` elements read, `out_q` `E` bytes and `scales` the scaling's
//!   count of f32 written (nothing else touched).

use crate::contract::{add_rmsnorm_row, epilogue_row, quantise_row, sum_ranks, Epilogue};
use crate::params::{epilogue_of, LaunchParams};
use crate::{DType, Element, KernelId, Op, Result};

use super::signal::{barrier, begin_epoch, check_headers, end_epoch, publish_header, push, receive};
use crate::params::{chunk_range, receive_slot_offset, FLAG_REFUSED, PACK_BYTES, PUSH_SENTINEL};
use std::time::Instant;

/// A shared view of `len` elements at `addr`.
///
/// # Safety
/// `addr` must point to `len` initialised elements that nobody writes while the view lives.
unsafe fn view<'a, T>(addr: u64, len: usize) -> &'a [T] {
    if len == 0 {
        return &[]; // a call with no data may name no memory at all
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(addr as *const T, len) }
}

/// An exclusive view of `len` elements at `addr`.
///
/// # Safety
/// `addr` must point to `len` elements that nobody else reads or writes while the view lives.
unsafe fn view_mut<'a, T>(addr: u64, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut T, len) }
}

/// The pack-aligned range of elements rank `rank` reduces in the unfused path's 2-stage all-reduce
/// (its [`chunk_range`] of the call's packs).
pub fn chunk_of(rank: usize, world: usize, elems: usize, pack: usize) -> std::ops::Range<usize> {
    let packs = chunk_range(rank, world, elems.div_ceil(pack));
    (packs.start * pack).min(elems)..(packs.end * pack).min(elems)
}

/// Runs `kernel` with `params` on the calling thread.
///
/// # Safety
/// Every pointer in `params` must be valid for the extents in the module docs, and the barrier
/// protocol must keep peers from writing what this rank reads (the callers in `fusion` do).
pub unsafe fn run(kernel: KernelId, params: &LaunchParams) -> Result<()> {
    let mut params = *params;
    // SAFETY: forwarded from the caller.
    unsafe {
        let device_epoch = kernel.op.crosses_ranks() && begin_epoch(&mut params);
        match kernel.dtype {
            DType::Bf16 => run_typed::<half::bf16>(kernel.op, &params),
            DType::F16 => run_typed::<half::f16>(kernel.op, &params),
            DType::F32 => run_typed::<f32>(kernel.op, &params),
        }?;
        if device_epoch {
            end_epoch(&params);
        }
    }
    Ok(())
}

/// This rank's input as 32-bit words, every `-0.0` element made `+0.0`: what it pushes.
fn push_words<T: Element>(input: &[T]) -> Vec<u32> {
    let canonical: Vec<T> = input.iter().map(|v| v.canonical_zero()).collect();
    let words: Vec<u32> = bytemuck::cast_slice::<T, u8>(&canonical)
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    debug_assert!(!words.contains(&PUSH_SENTINEL));
    words
}

/// Elements from 32-bit words (the inverse of [`push_words`]).
fn elements<T: Element>(words: &[u32]) -> Vec<T> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut out = vec![T::from_f32(0.0); bytes.len() / std::mem::size_of::<T>()];
    bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes);
    out
}

/// Every rank's input of a 1-stage call, in rank order: ours from `input`, the peers' pushed.
/// Between our push and the first receive, every peer's header is checked: a peer in another call
/// is a mismatch, not a wait for data it will never send.
///
/// # Safety
/// As [`run`].
unsafe fn push_and_receive<T: Element>(p: &LaunchParams, op: Op, input: &[T], start: Instant) -> Result<Vec<Vec<T>>> {
    let words = push_words(input);
    // SAFETY: forwarded; the operator sizes the slots for the call.
    unsafe {
        push(p, &words);
        check_headers(p, op.code(), T::DTYPE, start)?;
    }
    (0..p.world_size as usize)
        .map(|peer| {
            if peer == p.rank as usize {
                return Ok(input.to_vec());
            }
            let mut theirs = vec![0u32; words.len()];
            // SAFETY: forwarded.
            unsafe { receive(p, peer, &mut theirs, start)? };
            Ok(elements(&theirs))
        })
        .collect()
}

/// # Safety
/// As [`run`].
unsafe fn run_typed<T: Element>(op: Op, p: &LaunchParams) -> Result<()> {
    let rows = p.rows as usize;
    let hidden = p.hidden as usize;
    let refused = p.flags & FLAG_REFUSED != 0;
    let elems = if refused { 0 } else { rows * hidden };
    let rank = p.rank as usize;
    let world = p.world_size as usize;
    let start = Instant::now();
    // The kernel after a cross-rank one writes nothing once this rank's error word is set (as on
    // the GPU).
    if matches!(op.plain(), Op::ScratchAddRmsNorm | Op::AllGather | Op::AddRmsNorm) && p.signals[rank] != 0 {
        // SAFETY: a non-zero signal address is this rank's live signal area (the caller's guarantee).
        let word = unsafe { super::signal::error_word(p.signals[rank]) };
        if word.load(std::sync::atomic::Ordering::Acquire) != 0 {
            return Ok(());
        }
    }
    // SAFETY: (for every view below) the extents are those of the module docs, which the caller
    // guarantees; our receive area is only read after the first barrier of the call, when every
    // peer has finished writing its slot, scratch chunks are written by exactly one rank each, and
    // push slots are only accessed atomically.
    unsafe {
        if op.crosses_ranks() {
            publish_header(p, op.code(), T::DTYPE);
        }
        match op {
            Op::FusedOneStage | Op::FusedOneStageEpilogue => {
                let input = view::<T>(p.input, elems);
                let ranks = push_and_receive(p, op, input, start)?;
                if elems == 0 {
                    return Ok(());
                }
                let mut rows_out = RowOutputs::new(p, op, elems);
                let mut sum = vec![T::from_f32(0.0); hidden];
                for row in 0..rows {
                    let base = row * hidden;
                    for (j, s) in sum.iter_mut().enumerate() {
                        *s = sum_ranks(ranks.iter().map(|x| x[base + j]));
                    }
                    rows_out.row(row, &sum);
                }
            }
            Op::AllReduceOneStage => {
                let input = view::<T>(p.input, elems);
                let ranks = push_and_receive(p, op, input, start)?;
                // `out` may be `input` (in place): `ranks` holds a copy of ours.
                let out = view_mut::<T>(p.out, elems);
                for (i, o) in out.iter_mut().enumerate() {
                    *o = sum_ranks(ranks.iter().map(|x| x[i]));
                }
            }
            Op::ReduceScatter => {
                // Push each owner's chunk of our input into our slot of its receive area (as the
                // GPU kernel does, the owners in the order after our rank).
                let input = view::<T>(p.input, elems);
                let pack = T::DTYPE.pack_elems();
                let packs = elems / pack;
                for i in 1..world {
                    let owner = (rank + i) % world;
                    let chunk = chunk_of(owner, world, elems, pack);
                    if chunk.is_empty() {
                        continue;
                    }
                    let slot =
                        (p.receive[owner] as usize + receive_slot_offset(packs, PACK_BYTES, world, rank)) as *mut T;
                    std::ptr::copy_nonoverlapping(input[chunk.clone()].as_ptr(), slot, chunk.len());
                }
                check_headers(p, op.code(), T::DTYPE, start)?;
                barrier(p, 0)?;
                let chunk = chunk_of(rank, world, elems, pack);
                // Every rank's part of our chunk: ours where it is, the peers' as they pushed it.
                let parts: Vec<&[T]> = (0..world)
                    .map(|r| match r == rank {
                        true => &input[chunk.clone()],
                        false => {
                            view(p.receive[rank] + receive_slot_offset(packs, PACK_BYTES, world, r) as u64, chunk.len())
                        }
                    })
                    .collect();
                // Every rank's scratch receives this rank's chunk ("cross-device stores").
                let targets: Vec<*mut T> = p.scratch[..world].iter().map(|&a| a as *mut T).collect();
                for (j, i) in chunk.enumerate() {
                    let s = sum_ranks(parts.iter().map(|part| part[j]));
                    for &t in &targets {
                        t.add(i).write(s);
                    }
                }
                barrier(p, 1)?;
            }
            Op::FusedTwoStage | Op::FusedTwoStageEpilogue => {
                // Push our rows of each owner's chunk into our slot of its receive area (as the
                // GPU kernel does, the owners in the order after our rank).
                let input = view::<T>(p.input, elems);
                let row_bytes = hidden * std::mem::size_of::<T>();
                for i in 1..world {
                    let owner = (rank + i) % world;
                    let chunk = chunk_range(owner, world, rows);
                    if chunk.is_empty() {
                        continue;
                    }
                    let at = p.receive[owner] as usize + receive_slot_offset(rows, row_bytes, world, rank);
                    let ours = &input[chunk.start * hidden..chunk.end * hidden];
                    std::ptr::copy_nonoverlapping(ours.as_ptr(), at as *mut T, ours.len());
                }
                check_headers(p, op.code(), T::DTYPE, start)?;
                barrier(p, 0)?;
                // Our rows: summed in rank order (ours where it is, the peers' as they pushed
                // them), each sum pushed into every peer's scratch and normalised here.
                let chunk = chunk_range(rank, world, rows);
                let parts: Vec<&[T]> = (0..world)
                    .map(|r| match r == rank {
                        true => &input[chunk.start * hidden..chunk.end * hidden],
                        false => view(
                            p.receive[rank] + receive_slot_offset(rows, row_bytes, world, r) as u64,
                            chunk.len() * hidden,
                        ),
                    })
                    .collect();
                let peers: Vec<*mut T> = (0..world).filter(|&r| r != rank).map(|r| p.scratch[r] as *mut T).collect();
                let mut rows_out = RowOutputs::new(p, op, elems);
                let mut sum = vec![T::from_f32(0.0); hidden];
                for (i, row) in chunk.enumerate() {
                    for (j, s) in sum.iter_mut().enumerate() {
                        *s = sum_ranks(parts.iter().map(|part| part[i * hidden + j]));
                    }
                    for &peer in &peers {
                        std::ptr::copy_nonoverlapping(sum.as_ptr(), peer.add(row * hidden), hidden);
                    }
                    rows_out.row(row, &sum);
                }
                barrier(p, 1)?;
            }
            Op::ScratchAddRmsNorm | Op::ScratchAddRmsNormEpilogue => {
                // The rows the other ranks own and normalised nothing of here: from the sums
                // they pushed into our scratch.
                let sum = view::<T>(p.scratch[rank], elems);
                let ours = chunk_range(rank, world, rows);
                let mut rows_out = RowOutputs::new(p, op, elems);
                for row in (0..rows).filter(|row| !ours.contains(row)) {
                    rows_out.row(row, &sum[row * hidden..(row + 1) * hidden]);
                }
            }
            Op::AddRmsNorm | Op::AddRmsNormEpilogue => {
                // add+RMSNorm may run in place (`input == out`, the unfused path): read the sum
                // before `out` is borrowed mutably.
                let sum = view::<T>(p.input, elems).to_vec();
                let mut rows_out = RowOutputs::new(p, op, elems);
                for row in 0..rows {
                    rows_out.row(row, &sum[row * hidden..(row + 1) * hidden]);
                }
            }
            Op::AllGather => {
                let sum = view::<T>(p.scratch[rank], elems);
                view_mut::<T>(p.out, elems).copy_from_slice(sum);
            }
            Op::QuantizeFp8 => {
                // The epilogue's quantisation of `out`, on `input` (the contract's one sequence).
                let Some(quant) = epilogue_of(p).quant else { return Ok(()) };
                let per_row = quant.scaling.scales_per_row(hidden);
                let input = view::<T>(p.input, elems);
                let codes = view_mut::<u8>(p.out_q, elems);
                let scales = view_mut::<f32>(p.scales, rows * per_row);
                for row in 0..rows {
                    quantise_row(
                        quant,
                        &input[row * hidden..(row + 1) * hidden],
                        &mut codes[row * hidden..(row + 1) * hidden],
                        &mut scales[row * per_row..(row + 1) * per_row],
                    );
                }
            }
        }
    }
    Ok(())
}

/// The outputs of the row routine for one launch: the residual (copied first: `residual_out`
/// may be `residual`), the weight and every output tensor, and the epilogue if the op has one.
struct RowOutputs<'a, T> {
    epilogue: Option<Epilogue>,
    hidden: usize,
    eps: f32,
    residual: Vec<T>,
    weight: &'a [T],
    out: &'a mut [T],
    residual_out: &'a mut [T],
    codes: &'a mut [u8],
    scales: &'a mut [f32],
    scales_per_row: usize,
}

impl<'a, T: Element> RowOutputs<'a, T> {
    /// Views of `p`'s tensors for `op` (`elems` elements, 0 for a refused call).
    ///
    /// # Safety
    /// As [`run`]: the extents of the module docs.
    unsafe fn new(p: &LaunchParams, op: Op, elems: usize) -> Self {
        let hidden = p.hidden as usize;
        let rows = elems.checked_div(hidden).unwrap_or(0);
        let epilogue = op.has_epilogue().then(|| epilogue_of(p));
        let no_residual = epilogue.is_some_and(|e| e.no_residual);
        let quant = epilogue.and_then(|e| e.quant);
        let scales_per_row = quant.map_or(0, |q| q.scaling.scales_per_row(hidden));
        let residual_elems = if no_residual { 0 } else { elems };
        // SAFETY: the caller's extents; `residual` is copied before `residual_out` is borrowed.
        unsafe {
            let residual = view::<T>(p.residual, residual_elems).to_vec();
            RowOutputs {
                epilogue,
                hidden,
                eps: p.eps,
                residual,
                weight: view::<T>(p.weight, if elems == 0 { 0 } else { hidden }),
                out: view_mut::<T>(p.out, elems),
                residual_out: view_mut::<T>(p.residual_out, residual_elems),
                codes: view_mut::<u8>(p.out_q, if quant.is_some() { elems } else { 0 }),
                scales: view_mut::<f32>(p.scales, rows * scales_per_row),
                scales_per_row,
            }
        }
    }

    /// Row `row` from its all-reduced `sum`.
    fn row(&mut self, row: usize, sum: &[T]) {
        let range = row * self.hidden..(row + 1) * self.hidden;
        match &self.epilogue {
            None => add_rmsnorm_row(
                sum,
                &self.residual[range.clone()],
                self.weight,
                self.eps,
                &mut self.residual_out[range.clone()],
                &mut self.out[range],
            ),
            Some(e) => {
                let (residual, residual_out): (&[T], &mut [T]) = if e.no_residual {
                    (&[], &mut [])
                } else {
                    (&self.residual[range.clone()], &mut self.residual_out[range.clone()])
                };
                let codes: &mut [u8] = if e.quant.is_some() { &mut self.codes[range.clone()] } else { &mut [] };
                let n = self.scales_per_row;
                epilogue_row(
                    e,
                    sum,
                    residual,
                    self.weight,
                    self.eps,
                    residual_out,
                    &mut self.out[range],
                    codes,
                    &mut self.scales[row * n..(row + 1) * n],
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_of;

    #[test]
    fn chunks_cover_every_element_once() {
        for world in 1..=8 {
            for elems in [0usize, 8, 16, 24, 4096, 2880 * 3, 8 * 1001] {
                let mut next = 0;
                for r in 0..world {
                    let c = chunk_of(r, world, elems, 8);
                    assert_eq!(c.start, next.min(elems));
                    assert!(c.start % 8 == 0 || c.start == elems);
                    next = c.end;
                }
                assert_eq!(next, elems, "world {world} elems {elems}");
            }
        }
    }
}

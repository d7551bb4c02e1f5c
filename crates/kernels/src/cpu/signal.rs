//! The cross-rank signal protocol on the CPU: per-block monotonic barrier counters with a deadline.
//!
//! Rank `r` arrives at barrier value `v` by storing `v` (release) into `flags[block][r]` of every
//! rank's signal area, then waits until its own `flags[block][p] >= v` (acquire) for every `p`.
//! Counters only grow, so a fast rank that already arrived at `v + 1` also satisfies `v`, and no
//! flag is ever reset. The GPU kernels implement the same protocol at system scope.

use crate::params::{
    CallDescriptor, ErrorWord, LaunchParams, CALL_WORDS, MAX_BLOCKS, MAX_RANKS, SIGNAL_CALLS_OFFSET,
    SIGNAL_EPOCH_OFFSET, SIGNAL_ERROR_OFFSET, SIGNAL_FLAGS_OFFSET,
};
use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The flag `flags[block][slot]` in the signal area at `signal`.
///
/// # Safety
/// `signal` must be the address of a live, 8-byte aligned signal area.
unsafe fn flag<'a>(signal: u64, block: usize, slot: usize) -> &'a AtomicU64 {
    debug_assert!(block < MAX_BLOCKS && slot < MAX_RANKS);
    let addr = signal as usize + SIGNAL_FLAGS_OFFSET + (block * MAX_RANKS + slot) * 8;
    // SAFETY: the caller guarantees a live, aligned signal area; the flag lies inside it and is only
    // ever accessed atomically.
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }
}

/// The error word of the signal area at `signal`.
///
/// # Safety
/// As [`flag`].
pub(crate) unsafe fn error_word<'a>(signal: u64) -> &'a AtomicU64 {
    // SAFETY: see `flag`; the error word is inside the signal area and accessed atomically.
    unsafe { AtomicU64::from_ptr((signal as usize + SIGNAL_ERROR_OFFSET) as *mut u64) }
}

/// The epoch word of the signal area at `signal`.
///
/// # Safety
/// As [`flag`].
unsafe fn epoch_word<'a>(signal: u64) -> &'a AtomicU64 {
    // SAFETY: see `flag`; the epoch word is inside the signal area and accessed atomically.
    unsafe { AtomicU64::from_ptr((signal as usize + SIGNAL_EPOCH_OFFSET) as *mut u64) }
}

/// Resolves a launch with `barrier_base == 0` from this rank's epoch word: the next epoch `e`
/// gives barrier value `2e` and staging half `e % 2`, or, with a graph-input table
/// (`params.inputs`), every rank's input read in place. Returns whether the word must be advanced
/// by [`end_epoch`] when the launch completes.
///
/// # Safety
/// As [`barrier`]; a non-zero `params.inputs` must point to `MAX_RANKS` readable `u64`s.
pub(crate) unsafe fn begin_epoch(params: &mut LaunchParams) -> Result<bool> {
    if params.barrier_base != 0 {
        return Ok(false);
    }
    let own = params.signals[params.rank as usize];
    // SAFETY: forwarded from the caller.
    let e = unsafe { epoch_word(own) }.load(Ordering::Relaxed) + 1;
    params.barrier_base = 2 * e;
    let world = params.world_size as usize;
    if params.inputs != 0 {
        // SAFETY: the caller guarantees a table of `MAX_RANKS` entries at `inputs`.
        let table = unsafe { std::slice::from_raw_parts(params.inputs as *const u64, MAX_RANKS) };
        params.staging[..world].copy_from_slice(&table[..world]);
        if table[..world].contains(&0) {
            // SAFETY: as above.
            unsafe { error_word(own) }.store(ErrorWord::not_registered(params.barrier_base).0, Ordering::Release);
            return Err(Error::NotRegistered { rank: params.rank, barrier: params.barrier_base });
        }
    } else if e % 2 == 1 {
        for staging in &mut params.staging[..world] {
            *staging += u64::from(params.staging_half_bytes);
        }
    }
    Ok(true)
}

/// Records that the launch resolved by [`begin_epoch`] completed.
///
/// # Safety
/// As [`barrier`].
pub(crate) unsafe fn end_epoch(params: &LaunchParams) {
    // SAFETY: forwarded from the caller.
    unsafe { epoch_word(params.signals[params.rank as usize]) }.store(params.barrier_base / 2, Ordering::Relaxed);
}

/// Word `word` of `calls[parity][slot]` in the signal area at `signal`.
///
/// # Safety
/// As [`flag`].
unsafe fn call_word<'a>(signal: u64, parity: usize, slot: usize, word: usize) -> &'a AtomicU64 {
    let index = (parity * MAX_RANKS + slot) * CALL_WORDS + word;
    // SAFETY: see `flag`; the descriptor words are inside the signal area and accessed atomically.
    unsafe { AtomicU64::from_ptr((signal as usize + SIGNAL_CALLS_OFFSET + index * 8) as *mut u64) }
}

/// Publishes `ours` to every peer, passes the call's first barrier, and checks that every peer
/// published the same descriptor for this epoch.
///
/// # Safety
/// As [`barrier`].
pub(crate) unsafe fn enter_call(params: &LaunchParams, ours: CallDescriptor) -> Result<()> {
    let parity = ((params.barrier_base / 2) % 2) as usize;
    let rank = params.rank as usize;
    let world = params.world_size as usize;
    for &signal in &params.signals[..world] {
        for (w, &value) in ours.0.iter().enumerate() {
            // SAFETY: the caller guarantees live signal areas. Relaxed: the barrier's release store
            // below orders these before a peer's acquire of our flag.
            unsafe { call_word(signal, parity, rank, w) }.store(value, Ordering::Relaxed);
        }
    }
    // SAFETY: forwarded.
    unsafe { barrier(params, 0)? };
    let own = params.signals[rank];
    for peer in 0..world {
        // SAFETY: as above; the barrier's acquire made the peer's descriptor visible.
        let theirs =
            CallDescriptor(std::array::from_fn(|w| unsafe { call_word(own, parity, peer, w) }.load(Ordering::Relaxed)));
        if theirs != ours {
            let word = ErrorWord::call_mismatch(peer as u32, params.barrier_base);
            // SAFETY: as above.
            unsafe { error_word(own) }.store(word.0, Ordering::Release);
            return Err(Error::CallMismatch {
                rank: params.rank,
                peer: peer as u32,
                ours: ours.to_string(),
                theirs: theirs.to_string(),
            });
        }
    }
    Ok(())
}

/// Arrives at barrier `params.barrier_base + offset` for block 0 and waits for every peer.
///
/// On timeout the error word of this rank's signal area is set and [`Error::PeerTimeout`] returned.
///
/// # Safety
/// `params.signals[..world_size]` must be live signal areas.
pub(crate) unsafe fn barrier(params: &LaunchParams, offset: u64) -> Result<()> {
    let value = params.barrier_base + offset;
    let rank = params.rank as usize;
    let world = params.world_size as usize;
    for &signal in &params.signals[..world] {
        // SAFETY: the caller guarantees live signal areas.
        unsafe { flag(signal, 0, rank) }.store(value, Ordering::Release);
    }
    let deadline = Duration::from_nanos(params.deadline_ns);
    let start = Instant::now();
    let own = params.signals[rank];
    for peer in 0..world {
        // SAFETY: the caller guarantees live signal areas.
        let slot = unsafe { flag(own, 0, peer) };
        let mut spins = 0u32;
        while slot.load(Ordering::Acquire) < value {
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 {
                if start.elapsed() > deadline {
                    let word = ErrorWord::peer_timeout(peer as u32, value);
                    // SAFETY: as above.
                    unsafe { error_word(own) }.store(word.0, Ordering::Release);
                    return Err(Error::PeerTimeout {
                        rank: params.rank,
                        peer: peer as u32,
                        barrier: value,
                        deadline_ms: deadline.as_millis() as u64,
                    });
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
    Ok(())
}

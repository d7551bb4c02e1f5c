//! The cross-rank protocols on the CPU, as the GPU kernels run them (the reference).
//!
//! - **Call headers.** Every cross-rank launch of epoch `e` writes its [`CallHeader`] into slot
//!   `rank` of rotation `e % PUSH_ROTATIONS` of every peer's push region, and checks every peer's
//!   before it writes an output: a different call is [`Error::CallMismatch`].
//! - **Push** (the 1-stage kernels). A rank writes its input (every `-0.0` made `+0.0`) into its
//!   data slot of every peer's rotation; the data is its own arrival flag: the reader waits until no
//!   32-bit word of what it needs is [`PUSH_SENTINEL`], then re-arms it.
//! - **Barriers** (the 2-stage path): per-block monotonic counters. Rank `r` arrives at value `v` by
//!   storing `v` (release) into `flags[block][r]` of every rank's signal area, then waits until its
//!   own `flags[block][p] >= v` (acquire) for every `p`. Counters only grow; no flag is ever reset.
//!
//! A waiting rank spins briefly, then sleeps on a futex on its own doorbell, which every sender
//! rings after its stores into that rank's buffers: with more ranks than cores, a waiting rank
//! gives its core to the peer it waits for. Every wait has the launch's deadline.

use crate::params::{
    push_header_offset, push_slot_offset, CallHeader, ErrorWord, LaunchParams, MAX_BLOCKS, MAX_RANKS, PUSH_ROTATIONS,
    PUSH_SENTINEL, SIGNAL_DOORBELL_OFFSET, SIGNAL_EPOCH_OFFSET, SIGNAL_ERROR_OFFSET, SIGNAL_FLAGS_OFFSET,
};
use crate::{DType, Error, Result};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Polls before a waiting rank sleeps on its doorbell.
const SPINS_BEFORE_SLEEP: u32 = 256;
/// Longest single sleep (the deadline is checked between sleeps).
const LONGEST_SLEEP: Duration = Duration::from_millis(20);

/// A 64-bit word at `addr`.
///
/// # Safety
/// `addr` must be 8-byte aligned inside a live mapping, and only ever accessed atomically.
unsafe fn word64<'a>(addr: u64) -> &'a AtomicU64 {
    // SAFETY: guaranteed by the caller.
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }
}

/// A 32-bit word at `addr`.
///
/// # Safety
/// `addr` must be 4-byte aligned inside a live mapping, and only ever accessed atomically.
unsafe fn word32<'a>(addr: u64) -> &'a AtomicU32 {
    // SAFETY: guaranteed by the caller.
    unsafe { AtomicU32::from_ptr(addr as *mut u32) }
}

/// The flag `flags[block][slot]` in the signal area at `signal`.
///
/// # Safety
/// `signal` must be the address of a live, 8-byte aligned signal area.
unsafe fn flag<'a>(signal: u64, block: usize, slot: usize) -> &'a AtomicU64 {
    debug_assert!(block < MAX_BLOCKS && slot < MAX_RANKS);
    // SAFETY: the flag lies inside the signal area the caller guarantees, accessed atomically.
    unsafe { word64(signal + (SIGNAL_FLAGS_OFFSET + (block * MAX_RANKS + slot) * 8) as u64) }
}

/// The error word of the signal area at `signal`.
///
/// # Safety
/// As [`flag`].
pub(crate) unsafe fn error_word<'a>(signal: u64) -> &'a AtomicU64 {
    // SAFETY: see `flag`; the error word is inside the signal area and accessed atomically.
    unsafe { word64(signal + SIGNAL_ERROR_OFFSET as u64) }
}

/// The epoch word of the signal area at `signal`.
///
/// # Safety
/// As [`flag`].
unsafe fn epoch_word<'a>(signal: u64) -> &'a AtomicU64 {
    // SAFETY: see `flag`; the epoch word is inside the signal area and accessed atomically.
    unsafe { word64(signal + SIGNAL_EPOCH_OFFSET as u64) }
}

/// The doorbell of the signal area at `signal` and its count of sleepers (the next word).
///
/// # Safety
/// As [`flag`].
unsafe fn doorbell<'a>(signal: u64) -> (&'a AtomicU32, &'a AtomicU32) {
    let at = signal + SIGNAL_DOORBELL_OFFSET as u64;
    // SAFETY: see `flag`; both words are inside the signal area and accessed atomically.
    unsafe { (word32(at), word32(at + 4)) }
}

/// Wakes whoever sleeps on `bell` (a futex word of a shared mapping: it works across processes).
fn futex_wake(bell: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only reads the address, which is a live, aligned u32.
    unsafe {
        libc::syscall(libc::SYS_futex, bell.as_ptr(), libc::FUTEX_WAKE, i32::MAX, std::ptr::null::<libc::timespec>());
    }
}

/// Sleeps on `bell` while it still holds `seen`, for at most `timeout`.
fn futex_wait(bell: &AtomicU32, seen: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: FUTEX_WAIT reads the live, aligned u32 at the address and the timespec on our stack;
    // it returns at once if the word no longer holds `seen` (EAGAIN), on a wake, or at the timeout.
    unsafe {
        libc::syscall(libc::SYS_futex, bell.as_ptr(), libc::FUTEX_WAIT, seen, &ts as *const libc::timespec);
    }
}

/// Tells `owner` (a signal area) that something it may wait for has been stored.
///
/// # Safety
/// As [`flag`].
unsafe fn ring(owner: u64) {
    // SAFETY: forwarded.
    let (bell, sleepers) = unsafe { doorbell(owner) };
    // SeqCst pairs with the waiter's: either it sees the new doorbell value, or we see it asleep.
    bell.fetch_add(1, Ordering::SeqCst);
    if sleepers.load(Ordering::SeqCst) > 0 {
        futex_wake(bell);
    }
}

/// Waits until `ready()` holds, for a launch of `params` waiting on `peer`: spins, then sleeps on
/// this rank's doorbell. Past the deadline it leaves [`ErrorWord::KIND_PEER_TIMEOUT`] and fails.
///
/// # Safety
/// `params.signals[params.rank]` must be a live signal area.
unsafe fn wait_until(
    params: &LaunchParams,
    peer: usize,
    start: Instant,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    for _ in 0..SPINS_BEFORE_SLEEP {
        if ready() {
            return Ok(());
        }
        std::hint::spin_loop();
    }
    let own = params.signals[params.rank as usize];
    // SAFETY: forwarded.
    let (bell, sleepers) = unsafe { doorbell(own) };
    let deadline = Duration::from_nanos(params.deadline_ns);
    loop {
        sleepers.fetch_add(1, Ordering::SeqCst);
        let seen = bell.load(Ordering::SeqCst);
        let done = ready();
        let left = deadline.checked_sub(start.elapsed()).filter(|d| !d.is_zero());
        if !done {
            if let Some(left) = left {
                futex_wait(bell, seen, left.min(LONGEST_SLEEP));
            }
        }
        sleepers.fetch_sub(1, Ordering::SeqCst);
        if done || ready() {
            return Ok(());
        }
        if left.is_none() {
            let value = params.barrier_base;
            // SAFETY: forwarded.
            unsafe { error_word(own) }.store(ErrorWord::peer_timeout(peer as u32, value).0, Ordering::Release);
            return Err(Error::PeerTimeout {
                rank: params.rank,
                peer: peer as u32,
                barrier: value,
                deadline_ms: deadline.as_millis() as u64,
            });
        }
    }
}

/// Resolves a launch with `barrier_base == 0` from this rank's epoch word: the next epoch `e`
/// gives barrier value `2e` (and push rotation `e % PUSH_ROTATIONS`). Returns whether the word
/// must be advanced by [`end_epoch`] when the launch completes.
///
/// # Safety
/// As [`barrier`].
pub(crate) unsafe fn begin_epoch(params: &mut LaunchParams) -> bool {
    if params.barrier_base != 0 {
        return false;
    }
    // SAFETY: forwarded from the caller.
    let e = unsafe { epoch_word(params.signals[params.rank as usize]) }.load(Ordering::Relaxed) + 1;
    params.barrier_base = 2 * e;
    true
}

/// Records that the launch resolved by [`begin_epoch`] completed.
///
/// # Safety
/// As [`barrier`].
pub(crate) unsafe fn end_epoch(params: &LaunchParams) {
    // SAFETY: forwarded from the caller.
    unsafe { epoch_word(params.signals[params.rank as usize]) }.store(params.barrier_base / 2, Ordering::Relaxed);
}

/// Where the push region of rank `owner` keeps `sender`'s header or data for `params`'s call.
fn push_addr(params: &LaunchParams, owner: usize, sender: usize, data: bool) -> u64 {
    let world = params.world_size as usize;
    let slot = params.push_slot_bytes as usize;
    let rotation = (params.barrier_base / 2) as usize % PUSH_ROTATIONS;
    let offset = if data {
        push_slot_offset(world, slot, rotation, sender)
    } else {
        push_header_offset(world, slot, rotation, sender)
    };
    params.push[owner] + offset as u64
}

/// The call's header as `sender` writes it.
fn header_of(params: &LaunchParams, op_code: u64, dtype: DType, sender: usize) -> CallHeader {
    CallHeader::from_sender(params.barrier_base / 2, op_code, dtype, params, sender as u32)
}

/// Re-arms the headers peers wrote for this rank's previous call (finished: calls are ordered)
/// and writes this call's header into every peer's push region.
///
/// # Safety
/// `params.push[..world]` and `params.signals[..world]` must be live push regions and signal areas.
pub(crate) unsafe fn publish_header(params: &LaunchParams, op_code: u64, dtype: DType) {
    let rank = params.rank as usize;
    let world = params.world_size as usize;
    let previous = LaunchParams { barrier_base: params.barrier_base.saturating_sub(2), ..*params };
    let ours = header_of(params, op_code, dtype, rank);
    for peer in (0..world).filter(|&p| p != rank) {
        let stale = push_addr(&previous, rank, peer, false);
        let theirs = push_addr(params, peer, rank, false);
        for w in 0..4 {
            // SAFETY: both headers lie inside live push regions; header words are only accessed
            // atomically. Release: a peer that sees the word also sees what we stored before it.
            unsafe {
                word32(stale + 4 * w as u64).store(PUSH_SENTINEL, Ordering::Release);
                word32(theirs + 4 * w as u64).store(ours.0[w], Ordering::Release);
            }
        }
        // SAFETY: forwarded.
        unsafe { ring(params.signals[peer]) };
    }
}

/// Waits for every peer's header of this call and compares it with what the peer must have sent.
///
/// # Safety
/// As [`publish_header`].
pub(crate) unsafe fn check_headers(params: &LaunchParams, op_code: u64, dtype: DType, start: Instant) -> Result<()> {
    let rank = params.rank as usize;
    for peer in (0..params.world_size as usize).filter(|&p| p != rank) {
        let at = push_addr(params, rank, peer, false);
        let load = || -> [u32; 4] {
            // SAFETY: the header lies inside our live push region, accessed atomically.
            std::array::from_fn(|w| unsafe { word32(at + 4 * w as u64) }.load(Ordering::Acquire))
        };
        // SAFETY: forwarded.
        unsafe { wait_until(params, peer, start, || CallHeader::arrived(load()))? };
        let theirs = CallHeader(load());
        let expected = header_of(params, op_code, dtype, peer);
        if theirs != expected {
            let word = ErrorWord::call_mismatch(peer as u32, params.barrier_base);
            // SAFETY: as above.
            unsafe { error_word(params.signals[rank]) }.store(word.0, Ordering::Release);
            return Err(Error::CallMismatch {
                rank: params.rank,
                peer: peer as u32,
                ours: header_of(params, op_code, dtype, rank).to_string(),
                theirs: theirs.to_string(),
            });
        }
    }
    Ok(())
}

/// Pushes `words` (this rank's input, `-0.0` already made `+0.0`) into this rank's data slot of
/// every peer's rotation, then rings each peer.
///
/// # Safety
/// As [`publish_header`]; each slot must hold `words.len()` words.
pub(crate) unsafe fn push(params: &LaunchParams, words: &[u32]) {
    let rank = params.rank as usize;
    for peer in (0..params.world_size as usize).filter(|&p| p != rank) {
        let at = push_addr(params, peer, rank, true);
        for (i, &w) in words.iter().enumerate() {
            debug_assert_ne!(w, PUSH_SENTINEL, "pushing the sentinel");
            // SAFETY: inside the peer's live slot; slot words are only accessed atomically.
            unsafe { word32(at + 4 * i as u64) }.store(w, Ordering::Release);
        }
        // SAFETY: forwarded.
        unsafe { ring(params.signals[peer]) };
    }
}

/// Waits for `peer`'s push of `out.len()` words, copies it to `out` and re-arms the slot.
///
/// # Safety
/// As [`push`].
pub(crate) unsafe fn receive(params: &LaunchParams, peer: usize, out: &mut [u32], start: Instant) -> Result<()> {
    let at = push_addr(params, params.rank as usize, peer, true);
    let mut next = 0;
    // SAFETY: (every word access) inside our live slot, accessed atomically.
    unsafe {
        wait_until(params, peer, start, || {
            while next < out.len() {
                let w = word32(at + 4 * next as u64).load(Ordering::Acquire);
                if w == PUSH_SENTINEL {
                    return false;
                }
                out[next] = w;
                next += 1;
            }
            true
        })?;
        for i in 0..out.len() {
            word32(at + 4 * i as u64).store(PUSH_SENTINEL, Ordering::Release);
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
        unsafe {
            flag(signal, 0, rank).store(value, Ordering::Release);
            ring(signal);
        }
    }
    let start = Instant::now();
    let own = params.signals[rank];
    for peer in 0..world {
        // SAFETY: the caller guarantees live signal areas.
        let slot = unsafe { flag(own, 0, peer) };
        // SAFETY: forwarded.
        unsafe { wait_until(params, peer, start, || slot.load(Ordering::Acquire) >= value)? };
    }
    Ok(())
}

//! Rank harnesses: ranks as threads of this process, or as processes re-executing the test binary.
//!
//! Threads: [`run_threads`] (scoped; a panicking rank fails the test with its rank in the
//! message) and [`run_threads_timeout`] (detached threads, for tests where a rank may stall: the
//! harness gives up after the timeout and reports which ranks never finished).
//!
//! Processes: a test calls [`child`] first; in the parent it is `None`, and the test calls
//! [`run_processes`], which starts the current test binary once per rank with
//! `--exact <test_path> --nocapture --test-threads=1` and the rank, world size and a fresh
//! private directory (for rendezvous files or sockets) in `ARFUSE_TESTKIT_*` variables; in each
//! child [`child`] returns the [`ChildRank`] and the test runs the rank's body.
//!
//! ```no_run
//! use arfuse_testkit::{assert_ranks_succeeded, child, run_processes, test_path};
//! use std::time::Duration;
//!
//! #[test]
//! fn four_ranks_agree() {
//!     if let Some(me) = child() {
//!         // The rank's body: meet the peers in `me.dir`, run, assert.
//!         return;
//!     }
//!     let outcomes = run_processes(&test_path!(four_ranks_agree), 4, Duration::from_secs(60)).expect("harness");
//!     assert_ranks_succeeded(&outcomes);
//! }
//! ```

mod process;

pub use process::{
    assert_ranks_succeeded, check_ranks, child, fresh_private_dir, run_processes, run_processes_with, ChildOutcome,
    ChildRank, PrivateDir, ProcessOptions, ENV_DIR, ENV_RANK, ENV_TEST, ENV_WORLD,
};

use crate::HarnessError;
use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The libtest path of test `name` in the module `module_path` (as `module_path!()` spells it):
/// the crate name is dropped, as libtest does. See [`crate::test_path!`].
pub fn test_path_from(module_path: &str, name: &str) -> String {
    match module_path.split_once("::") {
        Some((_crate, rest)) => format!("{rest}::{name}"),
        None => name.to_string(),
    }
}

/// The text of a panic payload (`&str` or `String`; anything else is named as such).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(a panic payload that is not a string)".to_string()
    }
}

/// Runs `f(rank)` for `rank` in `0..world_size`, each on its own scoped thread named `rank-R`,
/// and returns the results in rank order.
///
/// # Panics
/// If any rank panics (after every rank has finished), with each failed rank and its message;
/// if a thread cannot be started. A rank that waits forever for a panicked peer keeps this
/// from returning: use [`run_threads_timeout`] where that can happen.
pub fn run_threads<R: Send>(world_size: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    run_threads_each(vec![(); world_size], |rank, ()| f(rank))
}

/// As [`run_threads`], with one rank per element of `owned`, each moved into its rank's thread
/// (e.g. the endpoints of `ThreadRendezvous::group`): runs `f(rank, owned[rank])`.
///
/// # Panics
/// As [`run_threads`].
pub fn run_threads_each<T: Send, R: Send>(owned: Vec<T>, f: impl Fn(usize, T) -> R + Sync) -> Vec<R> {
    let f = &f;
    let world_size = owned.len();
    std::thread::scope(|scope| {
        let handles: Vec<_> = owned
            .into_iter()
            .enumerate()
            .map(|(rank, item)| {
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(scope, move || f(rank, item))
                    .unwrap_or_else(|e| panic!("starting the thread of rank {rank}: {e}"))
            })
            .collect();
        let mut results = Vec::with_capacity(world_size);
        let mut failures = Vec::new();
        for (rank, handle) in handles.into_iter().enumerate() {
            match handle.join() {
                Ok(result) => results.push(result),
                Err(payload) => failures.push(format!("rank {rank} panicked: {}", panic_message(&*payload))),
            }
        }
        if !failures.is_empty() {
            panic!("{} of {world_size} ranks failed:\n  {}", failures.len(), failures.join("\n  "));
        }
        results
    })
}

/// Runs `f(rank)` on `world_size` detached threads and waits at most `timeout` for all of them.
///
/// Returns the results in rank order, or [`HarnessError::RanksFailed`] naming every rank that
/// panicked (with its message) or had not finished by the deadline. Threads that never finish
/// are left behind (a stalled rank cannot be stopped from outside); the test fails instead of hanging.
pub fn run_threads_timeout<R, F>(world_size: usize, timeout: Duration, f: F) -> Result<Vec<R>, HarnessError>
where
    R: Send + 'static,
    F: Fn(usize) -> R + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let (sender, receiver) = mpsc::channel();
    for rank in 0..world_size {
        let (f, sender) = (Arc::clone(&f), sender.clone());
        std::thread::Builder::new()
            .name(format!("rank-{rank}"))
            .spawn(move || {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| f(rank)));
                // The receiver is gone only if the harness already gave up on this rank.
                let _ = sender.send((rank, result.map_err(|payload| panic_message(&*payload))));
            })
            .map_err(|source| HarnessError::SpawnThread { rank, source })?;
    }
    drop(sender);
    let deadline = Instant::now() + timeout;
    let mut results: Vec<Option<R>> = (0..world_size).map(|_| None).collect();
    let mut failures: Vec<(usize, String)> = Vec::new();
    let mut pending = world_size;
    while pending > 0 {
        let Ok((rank, result)) = receiver.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            break;
        };
        pending -= 1;
        match result {
            Ok(value) => results[rank] = Some(value),
            Err(message) => failures.push((rank, format!("rank {rank} panicked: {message}"))),
        }
    }
    for (rank, result) in results.iter().enumerate() {
        if result.is_none() && !failures.iter().any(|(r, _)| *r == rank) {
            failures.push((rank, format!("rank {rank} had not finished after {timeout:?}")));
        }
    }
    if failures.is_empty() {
        return Ok(results.into_iter().flatten().collect());
    }
    failures.sort_by_key(|(rank, _)| *rank);
    let report = failures.iter().map(|(_, line)| line.as_str()).collect::<Vec<_>>().join("\n");
    Err(HarnessError::RanksFailed { failed: failures.len(), world_size, report })
}

#[cfg(test)]
mod tests;

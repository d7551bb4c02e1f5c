//! How ranks meet: the [`Rendezvous`] trait and its in-process implementation.

use crate::{Error, Result};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A group of ranks that can exchange bytes, one round at a time. Callers may plug their own
/// channel (an engine's existing process group) by implementing it.
pub trait Rendezvous: Send {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Sends `payload` to every rank and returns every rank's payload, indexed by rank. Every
    /// rank must call it the same number of times; each call is one round.
    fn all_gather(&mut self, payload: &[u8]) -> Result<Vec<Vec<u8>>>;
}

/// [`Rendezvous::all_gather`], with its result checked against the trait's contract, so that a
/// faulty or lying implementation is a typed error ([`Error::BadRendezvous`]) instead of a short
/// table of peers that code further on would index or map: exactly `world_size()` parts, our own
/// part at index `rank()` byte-equal to `payload`, and, when `expect_len` is given, every part of
/// that length (use it where every rank sends the same layout). Every caller of `all_gather` in
/// arfuse goes through it.
pub fn checked_all_gather(rv: &mut dyn Rendezvous, payload: &[u8], expect_len: Option<usize>) -> Result<Vec<Vec<u8>>> {
    let started = Instant::now();
    let checked = check_all_gather(rv, payload, expect_len);
    match &checked {
        Ok(_) => tracing::trace!(
            rank = rv.rank(),
            world = rv.world_size(),
            bytes = payload.len(),
            waited = ?started.elapsed(),
            "rendezvous: all_gather round"
        ),
        Err(err) => {
            tracing::debug!(rank = rv.rank(), error = %err, waited = ?started.elapsed(), "rendezvous: all_gather failed")
        }
    }
    checked
}

fn check_all_gather(rv: &mut dyn Rendezvous, payload: &[u8], expect_len: Option<usize>) -> Result<Vec<Vec<u8>>> {
    let (rank, world) = (rv.rank(), rv.world_size());
    let bad = |what: String| Error::BadRendezvous { rank, what };
    if rank >= world {
        return Err(bad(format!("it says rank {rank} of world size {world}")));
    }
    if let Some(len) = expect_len {
        if payload.len() != len {
            return Err(Error::Invalid(format!("payload of {} bytes, expected {len}", payload.len())));
        }
    }
    let parts = rv.all_gather(payload)?;
    if parts.len() != world {
        return Err(bad(format!("all_gather returned {} parts for world size {world}", parts.len())));
    }
    if parts[rank] != payload {
        return Err(bad(format!(
            "part {rank} (this rank's own) is not what it sent ({} bytes returned, {} sent)",
            parts[rank].len(),
            payload.len()
        )));
    }
    if let Some(len) = expect_len {
        if let Some((peer, part)) = parts.iter().enumerate().find(|(_, p)| p.len() != len) {
            return Err(bad(format!("part of rank {peer} is {} bytes, every part must be {len}", part.len())));
        }
    }
    Ok(parts)
}

struct Round {
    number: u64,
    parts: Vec<Option<Vec<u8>>>,
    done: Option<Arc<Vec<Vec<u8>>>>,
    /// Ranks that collected the finished round.
    collected: usize,
}

struct Shared {
    world: usize,
    state: Mutex<Round>,
    changed: Condvar,
}

/// Ranks that are threads of one process.
pub struct ThreadRendezvous {
    rank: usize,
    round: u64,
    timeout: Duration,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ThreadRendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadRendezvous").field("rank", &self.rank).field("world", &self.shared.world).finish()
    }
}

impl ThreadRendezvous {
    /// One endpoint per rank; move each into its rank's thread.
    pub fn group(world_size: usize, timeout: Duration) -> Vec<ThreadRendezvous> {
        let shared = Arc::new(Shared {
            world: world_size,
            state: Mutex::new(Round { number: 0, parts: vec![None; world_size], done: None, collected: 0 }),
            changed: Condvar::new(),
        });
        (0..world_size).map(|rank| ThreadRendezvous { rank, round: 0, timeout, shared: shared.clone() }).collect()
    }
}

impl Rendezvous for ThreadRendezvous {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_gather(&mut self, payload: &[u8]) -> Result<Vec<Vec<u8>>> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let world = self.shared.world;
        let mut state = self.shared.state.lock();
        // Wait until the previous round has been collected by everyone.
        while state.number != self.round {
            if self.shared.changed.wait_until(&mut state, deadline).timed_out() {
                return Err(self.timeout_error("waiting for the previous round", start, &state));
            }
        }
        state.parts[self.rank] = Some(payload.to_vec());
        if state.parts.iter().all(Option::is_some) {
            let parts = state.parts.iter_mut().map(|p| p.take().unwrap_or_default()).collect();
            state.done = Some(Arc::new(parts));
            self.shared.changed.notify_all();
        }
        loop {
            if let Some(done) = state.done.clone() {
                state.collected += 1;
                if state.collected == world {
                    state.done = None;
                    state.collected = 0;
                    state.number += 1;
                    self.shared.changed.notify_all();
                }
                self.round += 1;
                return Ok(done.as_ref().clone());
            }
            if self.shared.changed.wait_until(&mut state, deadline).timed_out() {
                return Err(self.timeout_error("all_gather", start, &state));
            }
        }
    }
}

impl ThreadRendezvous {
    fn timeout_error(&self, phase: &'static str, start: Instant, state: &Round) -> Error {
        let missing: Vec<String> =
            state.parts.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(r, _)| r.to_string()).collect();
        Error::RendezvousTimeout {
            rank: self.rank,
            phase,
            waited: start.elapsed(),
            missing: format!("missing ranks: {}", missing.join(", ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns `parts` from every `all_gather`, whatever was sent.
    struct Canned {
        rank: usize,
        world: usize,
        parts: Vec<Vec<u8>>,
    }

    impl Rendezvous for Canned {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn all_gather(&mut self, _payload: &[u8]) -> Result<Vec<Vec<u8>>> {
            Ok(self.parts.clone())
        }
    }

    #[test]
    fn checked_all_gather_names_what_the_rendezvous_got_wrong() {
        // (rank, world, what all_gather returns, expect_len, the error's words)
        type Case = (usize, usize, Vec<Vec<u8>>, Option<usize>, &'static str);
        let cases: [Case; 6] = [
            (1, 3, vec![vec![0], vec![1]], None, "returned 2 parts for world size 3"),
            (1, 2, vec![vec![0], vec![1], vec![2]], None, "returned 3 parts for world size 2"),
            (1, 2, vec![vec![0], vec![0]], None, "part 1 (this rank's own) is not what it sent"),
            (0, 2, vec![vec![0], vec![1, 1]], Some(1), "part of rank 1 is 2 bytes, every part must be 1"),
            (2, 2, vec![vec![0], vec![1]], None, "it says rank 2 of world size 2"),
            (0, 0, vec![], None, "it says rank 0 of world size 0"),
        ];
        for (rank, world, parts, expect_len, message) in cases {
            let mut rv = Canned { rank, world, parts };
            let err = checked_all_gather(&mut rv, &[rank as u8], expect_len).expect_err(message);
            assert!(
                matches!(&err, Error::BadRendezvous { rank: r, what } if *r == rank && what.contains(message)),
                "{err}"
            );
        }
        let mut good = Canned { rank: 1, world: 2, parts: vec![vec![0], vec![1]] };
        assert_eq!(checked_all_gather(&mut good, &[1], Some(1)).expect("a correct gather"), vec![vec![0], vec![1]]);
    }

    #[test]
    fn every_world_size_gathers_several_rounds() {
        for world in 1..=8 {
            let group = ThreadRendezvous::group(world, Duration::from_secs(10));
            std::thread::scope(|s| {
                for mut rv in group {
                    s.spawn(move || {
                        for round in 0..5u8 {
                            let got = rv.all_gather(&[rv.rank() as u8, round]).expect("gather");
                            let expected: Vec<Vec<u8>> = (0..world).map(|r| vec![r as u8, round]).collect();
                            assert_eq!(got, expected);
                        }
                    });
                }
            });
        }
    }

    #[test]
    fn a_missing_rank_times_out_naming_it() {
        let mut group = ThreadRendezvous::group(3, Duration::from_millis(200));
        let started = Instant::now();
        let err = group[0].all_gather(b"x").expect_err("ranks 1 and 2 never come");
        assert!(started.elapsed() < Duration::from_secs(5));
        match err {
            Error::RendezvousTimeout { missing, .. } => {
                assert!(missing.contains('1') && missing.contains('2'), "{missing}")
            }
            other => panic!("unexpected {other}"),
        }
    }
}

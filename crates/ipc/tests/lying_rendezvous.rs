//! A caller's `Rendezvous` that breaks its contract makes `SharedBuffers::create` fail with a
//! typed error, never a panic or a wild pointer, and leaves no shared-memory segment behind.

use arfuse_ipc::{Error, Rendezvous, Result, SharedBuffers, ThreadRendezvous};
use arfuse_kernels::api::Cpu;
use arfuse_kernels::Backend;
use std::time::Duration;

/// How a [`Lying`] rendezvous alters a round's result on rank `rank` of `world`.
type Lie = fn(rank: usize, world: usize, parts: &mut Vec<Vec<u8>>);

/// A real [`ThreadRendezvous`] whose result of round `round` (0-based) is altered by `lie`.
struct Lying {
    inner: ThreadRendezvous,
    round: usize,
    lie_in: usize,
    lie: Lie,
}

impl Rendezvous for Lying {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_gather(&mut self, payload: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut parts = self.inner.all_gather(payload)?;
        if self.round == self.lie_in {
            (self.lie)(self.rank(), self.world_size(), &mut parts);
        }
        self.round += 1;
        Ok(parts)
    }
}

fn shm_entries() -> usize {
    let prefix = format!("arfuse-{}-", std::process::id());
    std::fs::read_dir("/dev/shm")
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&prefix)).count())
        .unwrap_or(0)
}

/// Runs `SharedBuffers::<Cpu>::create` on every rank of a group of `world` threads, each rank's
/// rendezvous lying the same way in round `lie_in`; returns every rank's error.
fn create_with(world: usize, lie_in: usize, lie: Lie) -> Vec<Error> {
    let group = ThreadRendezvous::group(world, Duration::from_secs(30));
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|inner| {
                s.spawn(move || {
                    let mut rv = Lying { inner, round: 0, lie_in, lie };
                    let device = Cpu::open_device(0, 1).expect("cpu");
                    SharedBuffers::<Cpu>::create(&device, &mut rv, 1 << 12, 1 << 10).map(|_| ())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("no panic").expect_err("a lying rendezvous")).collect()
    })
}

// One test, so that the `/dev/shm` count at the end sees no other test's segments.
#[test]
fn a_lying_rendezvous_gets_a_typed_error_from_create() {
    let bad = |errors: &[Error], want: &str| {
        for e in errors {
            assert!(matches!(e, Error::BadRendezvous { what, .. } if what.contains(want)), "want {want:?}, got {e}");
        }
    };
    // Too few parts: a short table of peers would leave null pointers for the kernels.
    bad(&create_with(3, 0, |_, _, parts| parts.truncate(2)), "returned 2 parts for world size 3");
    // Too many: more peers mapped than there are ranks.
    bad(&create_with(2, 0, |_, _, parts| parts.push(parts[0].clone())), "returned 3 parts for world size 2");
    // Our own slot holds another rank's part.
    bad(&create_with(2, 0, |rank, world, parts| parts[rank] = parts[(rank + 1) % world].clone()), "this rank's own");
    // A peer's part cut short, or grown.
    bad(
        &create_with(2, 0, |rank, world, parts| {
            parts[(rank + 1) % world].pop();
        }),
        "every part must be",
    );
    bad(&create_with(2, 0, |rank, world, parts| parts[(rank + 1) % world].push(0)), "every part must be");
    // The closing barrier round lies after every peer was mapped: the mappings are undone too.
    bad(&create_with(2, 1, |_, _, parts| parts.clear()), "returned 0 parts for world size 2");
    // Our own part duplicated into a peer's slot: the right length, but it names the wrong rank.
    for e in create_with(2, 0, |rank, world, parts| parts[(rank + 1) % world] = parts[rank].clone()) {
        assert!(matches!(&e, Error::Protocol(m) if m.contains("holds rank")), "{e}");
    }
    assert_eq!(shm_entries(), 0, "shared-memory segments left in /dev/shm");
}

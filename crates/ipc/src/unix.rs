//! Rank processes on one host meeting over a Unix-domain socket in a private directory.
//!
//! Rank 0 is the hub: it binds `dir/rendezvous.sock` (mode 0600 in a 0700 directory owned by this
//! user), accepts the other ranks, and per round collects every contribution and sends the full
//! set back. A socket file left by a crashed run (nobody listening) is replaced; a live one is
//! refused. Once everyone is connected the hub removes the socket file, so nothing is left behind.

use crate::rendezvous::Rendezvous;
use crate::wire::{self, Frame, Kind, HEADER_LEN};
use crate::{Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The socket file's name inside the rendezvous directory.
pub const SOCKET_NAME: &str = "rendezvous.sock";

/// One rank's endpoint of a Unix-socket rendezvous.
#[derive(Debug)]
pub struct UnixRendezvous {
    rank: usize,
    world: usize,
    round: u32,
    timeout: Duration,
    /// Hub: the other ranks' connections, indexed by rank (`None` at 0). Others: the hub at 0.
    peers: Vec<Option<UnixStream>>,
}

fn ensure_private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        // Created 0700 in one step: two ranks creating it at once must never see it wider (a
        // create-then-chmod let a rank see 0755 in between and refuse the directory).
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
    }
    let meta = std::fs::metadata(dir)?;
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(meta.uid());
    if meta.uid() != me {
        return Err(Error::Invalid(format!("{} belongs to uid {}, not to us ({me})", dir.display(), meta.uid())));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(Error::Invalid(format!(
            "{} is accessible to other users (mode {:o}); use a private (0700) directory",
            dir.display(),
            meta.mode() & 0o777
        )));
    }
    Ok(())
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
}

fn read_frame(
    stream: &mut UnixStream,
    deadline: Instant,
    rank: usize,
    phase: &'static str,
    start: Instant,
) -> Result<Frame> {
    let timeout = |missing: String| Error::RendezvousTimeout { rank, phase, waited: start.elapsed(), missing };
    let mut header = [0u8; HEADER_LEN];
    let read = |stream: &mut UnixStream, buf: &mut [u8]| -> Result<()> {
        let left = remaining(deadline).ok_or_else(|| timeout("no message from a peer".into()))?;
        stream.set_read_timeout(Some(left))?;
        stream.read_exact(buf).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => timeout("a peer stopped sending".into()),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset => peer_closed(),
            _ => Error::Io(e),
        })
    };
    read(stream, &mut header)?;
    let (kind, peer_rank, world, round, len) = wire::decode_header(&header)?;
    let mut payload = vec![0u8; len];
    read(stream, &mut payload)?;
    Ok(Frame { kind, rank: peer_rank, world, round, payload })
}

/// A peer's end of the connection is gone: it exited, crashed, or gave up on the group. Reads see
/// end-of-file, or a reset where it closed with our data unread; writes see a broken pipe.
fn peer_closed() -> Error {
    Error::Protocol("a peer closed its connection".into())
}

fn write_frame(stream: &mut UnixStream, frame: &Frame) -> Result<()> {
    stream.write_all(&wire::encode(frame)?).map_err(|e| match e.kind() {
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => peer_closed(),
        _ => Error::Io(e),
    })
}

impl UnixRendezvous {
    /// Joins the group meeting in `dir` as `rank` of `world_size`, waiting up to `timeout` for
    /// every rank (and, later, for every round).
    pub fn connect(dir: &Path, rank: usize, world_size: usize, timeout: Duration) -> Result<Self> {
        if world_size == 0 || world_size > u16::MAX as usize || rank >= world_size {
            return Err(Error::Invalid(format!("rank {rank} of world size {world_size}")));
        }
        ensure_private_dir(dir)?;
        let path = dir.join(SOCKET_NAME);
        let start = Instant::now();
        let deadline = start + timeout;
        let mut peers: Vec<Option<UnixStream>> = (0..world_size).map(|_| None).collect();
        if rank == 0 {
            let listener = Self::bind(&path)?;
            listener.set_nonblocking(true)?;
            let mut connected = 1;
            while connected < world_size {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        stream.set_nonblocking(false)?;
                        let hello = read_frame(&mut stream, deadline, 0, "hello", start)?;
                        let peer = hello.rank as usize;
                        if hello.kind != Kind::Contribute || hello.round != 0 {
                            return Err(Error::Protocol(format!(
                                "expected a hello, got {:?} round {}",
                                hello.kind, hello.round
                            )));
                        }
                        if hello.world as usize != world_size {
                            return Err(Error::Mismatch {
                                what: "world size",
                                ours: world_size.to_string(),
                                theirs: format!("{} (rank {peer})", hello.world),
                            });
                        }
                        if peer == 0 || peer >= world_size {
                            return Err(Error::Protocol(format!(
                                "rank {peer} out of range for world size {world_size}"
                            )));
                        }
                        if peers[peer].is_some() {
                            return Err(Error::Protocol(format!("duplicate rank {peer}")));
                        }
                        peers[peer] = Some(stream);
                        connected += 1;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if remaining(deadline).is_none() {
                            let missing: Vec<String> =
                                (1..world_size).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                            let _ = std::fs::remove_file(&path);
                            return Err(Error::RendezvousTimeout {
                                rank,
                                phase: "accepting ranks",
                                waited: start.elapsed(),
                                missing: format!("missing ranks: {}", missing.join(", ")),
                            });
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            // Everyone is in: the name is no longer needed.
            let _ = std::fs::remove_file(&path);
        } else {
            let mut stream = loop {
                match UnixStream::connect(&path) {
                    Ok(s) => break s,
                    Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
                        if remaining(deadline).is_none() {
                            return Err(Error::RendezvousTimeout {
                                rank,
                                phase: "connecting to rank 0",
                                waited: start.elapsed(),
                                missing: "rank 0 (the hub) never listened".into(),
                            });
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            let hello = Frame {
                kind: Kind::Contribute,
                rank: rank as u16,
                world: world_size as u16,
                round: 0,
                payload: vec![],
            };
            write_frame(&mut stream, &hello)?;
            peers[0] = Some(stream);
        }
        Ok(UnixRendezvous { rank, world: world_size, round: 0, timeout, peers })
    }

    /// Binds the hub's socket, replacing a stale one and refusing a live one.
    fn bind(path: &PathBuf) -> Result<UnixListener> {
        if path.exists() {
            match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(Error::Invalid(format!("{} is in use by another live rendezvous", path.display())))
                }
                Err(_) => std::fs::remove_file(path)?,
            }
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(listener)
    }
}

impl Rendezvous for UnixRendezvous {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_gather(&mut self, payload: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.round += 1;
        let round = self.round;
        let start = Instant::now();
        let deadline = start + self.timeout;
        let world = self.world;
        if self.rank == 0 {
            let mut parts = vec![Vec::new(); world];
            parts[0] = payload.to_vec();
            for (peer, slot) in self.peers.iter_mut().enumerate().skip(1) {
                let stream = slot.as_mut().ok_or_else(|| Error::Protocol(format!("rank {peer} not connected")))?;
                let frame = read_frame(stream, deadline, 0, "all_gather", start)?;
                if frame.kind != Kind::Contribute || frame.rank as usize != peer || frame.round != round {
                    return Err(Error::Protocol(format!(
                        "rank {peer} sent {:?} from rank {} for round {}, expected round {round}",
                        frame.kind, frame.rank, frame.round
                    )));
                }
                parts[peer] = frame.payload;
            }
            let packed = wire::pack_all(&parts);
            for (peer, slot) in self.peers.iter_mut().enumerate().skip(1) {
                if let Some(stream) = slot.as_mut() {
                    let frame = Frame {
                        kind: Kind::Gathered,
                        rank: peer as u16,
                        world: world as u16,
                        round,
                        payload: packed.clone(),
                    };
                    write_frame(stream, &frame)?;
                }
            }
            Ok(parts)
        } else {
            let rank = self.rank;
            let stream = self.peers[0].as_mut().ok_or_else(|| Error::Protocol("hub not connected".into()))?;
            let frame = Frame {
                kind: Kind::Contribute,
                rank: rank as u16,
                world: world as u16,
                round,
                payload: payload.to_vec(),
            };
            write_frame(stream, &frame)?;
            let reply = read_frame(stream, deadline, rank, "all_gather", start)?;
            if reply.kind != Kind::Gathered || reply.round != round {
                return Err(Error::Protocol(format!(
                    "hub sent {:?} for round {}, expected round {round}",
                    reply.kind, reply.round
                )));
            }
            wire::unpack_all(&reply.payload, world)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("arfuse-ipc-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn ranks_as_threads_gather_rounds() {
        let dir = private_dir("threads");
        let world = 4;
        std::thread::scope(|s| {
            for rank in 0..world {
                let dir = dir.clone();
                s.spawn(move || {
                    let mut rv = UnixRendezvous::connect(&dir, rank, world, Duration::from_secs(20)).expect("connect");
                    for round in 0..3u8 {
                        let got = rv.all_gather(&[rank as u8; 3][..(round as usize + 1)]).expect("gather");
                        let expected: Vec<Vec<u8>> = (0..world).map(|r| vec![r as u8; round as usize + 1]).collect();
                        assert_eq!(got, expected);
                    }
                });
            }
        });
        assert!(!dir.join(SOCKET_NAME).exists(), "socket file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_socket_is_replaced_and_duplicate_rank_refused() {
        let dir = private_dir("stale");
        ensure_private_dir(&dir).expect("dir");
        // A socket file nobody listens on, as a crashed run leaves it.
        drop(UnixListener::bind(dir.join(SOCKET_NAME)).expect("bind"));
        assert!(dir.join(SOCKET_NAME).exists());
        let result = std::thread::scope(|s| {
            let hub = s.spawn(|| UnixRendezvous::connect(&dir, 0, 3, Duration::from_secs(10)));
            for _ in 0..2 {
                let dir = dir.clone();
                s.spawn(move || {
                    let _ = UnixRendezvous::connect(&dir, 1, 3, Duration::from_secs(10));
                });
            }
            hub.join().expect("hub thread")
        });
        let err = result.expect_err("two ranks claim rank 1");
        assert!(err.to_string().contains("duplicate rank 1"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn wrong_world_size_is_refused() {
        let dir = private_dir("world");
        let result = std::thread::scope(|s| {
            let hub = s.spawn(|| UnixRendezvous::connect(&dir, 0, 2, Duration::from_secs(10)));
            let dir2 = dir.clone();
            s.spawn(move || {
                let _ = UnixRendezvous::connect(&dir2, 1, 3, Duration::from_secs(10));
            });
            hub.join().expect("hub thread")
        });
        assert!(matches!(result, Err(Error::Mismatch { what: "world size", .. })), "{result:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shared_directories_are_refused() {
        let dir = private_dir("open");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = UnixRendezvous::connect(&dir, 0, 1, Duration::from_secs(1)).expect_err("world-writable dir");
        assert!(err.to_string().contains("accessible to other users"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hub_times_out_naming_missing_ranks() {
        let dir = private_dir("timeout");
        let err = UnixRendezvous::connect(&dir, 0, 3, Duration::from_millis(150)).expect_err("nobody comes");
        assert!(matches!(&err, Error::RendezvousTimeout { missing, .. } if missing.contains("1, 2")), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

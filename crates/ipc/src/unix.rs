//! Rank processes on one host meeting over a Unix-domain socket in a private directory.
//!
//! Rank 0 is the hub: it binds `dir/rendezvous.sock` (mode 0600 in a 0700 directory owned by this
//! user), accepts the other ranks, and per round collects every contribution and sends the full
//! set back. A socket file left by a crashed run (nobody listening) is replaced; a live one is
//! refused. Once everyone is connected (or the hub gives up) the hub removes the socket file, so
//! nothing is left behind.
//!
//! Who may join (docs/reliability.md, "Security model of the rendezvous"):
//! - The directory is opened with `O_NOFOLLOW | O_DIRECTORY` (a symbolic link at its path is
//!   refused) and its owner and mode are checked on that descriptor; the socket is then bound and
//!   connected through `/proc/self/fd/N/rendezvous.sock`, so the directory checked is the one used.
//! - The hub checks every accepted connection's `SO_PEERCRED`: another user's process is dropped.
//!   A rank checks the hub's the same way before it sends anything.
//! - A connection is a member only once it has identified itself with a hello frame carrying the
//!   group token ([`UnixRendezvous::connect_with_token`], or [`TOKEN_ENV`] for
//!   [`UnixRendezvous::connect`]) and a free rank. Until then it is a stranger: one that closes,
//!   sends a malformed frame, a wrong token or a taken rank, or stays silent for
//!   [`IDENTIFY_TIMEOUT`], is dropped alone and the hub keeps accepting. Strangers are served
//!   without blocking, so a silent one never holds up the others.

use crate::rendezvous::Rendezvous;
use crate::wire::{self, Frame, Kind, HEADER_LEN};
use crate::{Error, Result};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{Mode, OFlags};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The socket file's name inside the rendezvous directory.
pub const SOCKET_NAME: &str = "rendezvous.sock";
/// The environment variable [`UnixRendezvous::connect`] takes the group token from (unset or
/// empty: no token; then only the same-user check guards the group).
pub const TOKEN_ENV: &str = "ARFUSE_RENDEZVOUS_TOKEN";
/// The longest group token, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// How long the hub waits for a new connection to identify itself before dropping it.
pub const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections the hub waits on at once for their hello; more are dropped as they arrive.
const MAX_PENDING: usize = 64;
/// Drop reasons quoted in the hub's timeout error.
const DROPS_QUOTED: usize = 3;

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

/// The rendezvous directory, opened without following a symbolic link and checked on that
/// descriptor; names in it are reached through [`CheckedDir::via`].
#[derive(Debug)]
struct CheckedDir {
    /// The directory as the caller named it (for messages).
    shown: PathBuf,
    /// Keeps the checked directory open while `via` refers to it.
    fd: OwnedFd,
    /// `/proc/self/fd/N`: the checked directory itself, whatever its path now names. Where `/proc`
    /// is not mounted, the path as given (a rename between the check and the bind could then
    /// redirect us, but only to another directory of this user that the checks would also pass).
    via: PathBuf,
}

impl CheckedDir {
    fn socket(&self) -> PathBuf {
        self.via.join(SOCKET_NAME)
    }
}

/// Opens `dir` (creating it 0700 if missing) and checks that it is a directory, not a symbolic
/// link, owned by our effective uid, and closed to everyone else.
fn open_private_dir(dir: &Path) -> Result<CheckedDir> {
    let insecure = |reason: String| Error::InsecureDir { path: dir.to_path_buf(), reason };
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(insecure("is a symbolic link; give the directory itself".into()));
        }
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {
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
        Err(e) => return Err(e.into()),
    }
    // The check above is only for a clear message: this open is the one that counts (a link
    // planted since is refused here, with ELOOP or ENOTDIR).
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::open(dir, flags, Mode::empty()).map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
            insecure(format!("is a symbolic link or not a directory ({e})"))
        }
        e => Error::Io(e.into()),
    })?;
    let stat = rustix::fs::fstat(&fd).map_err(std::io::Error::from)?;
    let me = rustix::process::geteuid().as_raw();
    if stat.st_uid != me {
        return Err(insecure(format!("belongs to uid {}, not to us ({me})", stat.st_uid)));
    }
    if stat.st_mode & 0o077 != 0 {
        return Err(insecure(format!(
            "is accessible to other users (mode {:o}); use a private (0700) directory",
            stat.st_mode & 0o777
        )));
    }
    let proc_path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let via = if proc_path.is_dir() { proc_path } else { dir.to_path_buf() };
    Ok(CheckedDir { shown: dir.to_path_buf(), fd, via })
}

/// The process at the other end of `stream` runs as our effective uid.
fn check_peer_uid(stream: &UnixStream, who: &str) -> std::result::Result<(), String> {
    let cred = rustix::net::sockopt::socket_peercred(stream).map_err(|e| format!("SO_PEERCRED of {who}: {e}"))?;
    let me = rustix::process::geteuid();
    if cred.uid != me {
        return Err(format!(
            "{who} (pid {}) runs as uid {}, this rank as uid {}",
            cred.pid,
            cred.uid.as_raw(),
            me.as_raw()
        ));
    }
    Ok(())
}

/// Compares tokens in time independent of where they differ.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

/// A connection the hub has accepted that has not identified itself yet (nonblocking).
struct Stranger {
    stream: UnixStream,
    /// The header, then the hello's payload, as far as read.
    buf: Vec<u8>,
    have: usize,
    /// Rank and world size from the header, once it is complete.
    claims: Option<(u16, u16)>,
    /// When it is dropped if still silent.
    until: Instant,
}

/// What a stranger's bytes so far amount to.
enum Progress {
    /// Nothing decisive yet.
    Waiting,
    /// A complete hello: claimed rank, claimed world size, token.
    Hello(u16, u16, Vec<u8>),
    /// Not a member: why.
    Drop(String),
}

impl Stranger {
    /// Reads what has arrived, never past the hello (a member's first round may follow it).
    fn advance(&mut self) -> Progress {
        loop {
            if self.have < self.buf.len() {
                match self.stream.read(&mut self.buf[self.have..]) {
                    Ok(0) => return Progress::Drop("a connection closed before identifying itself".into()),
                    Ok(n) => self.have += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Progress::Waiting,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Progress::Drop(format!("a connection failed before identifying itself: {e}")),
                }
                continue;
            }
            let Some((rank, world)) = self.claims else {
                match wire::decode_header(&self.buf) {
                    Err(e) => return Progress::Drop(format!("a connection sent a malformed hello: {e}")),
                    Ok((kind, _, _, round, _)) if kind != Kind::Contribute || round != 0 => {
                        return Progress::Drop(format!(
                            "a connection sent {kind:?} of round {round} instead of a hello"
                        ))
                    }
                    Ok((_, _, _, _, len)) if len > MAX_TOKEN_LEN => {
                        return Progress::Drop(format!("a connection sent a hello of {len} bytes (> {MAX_TOKEN_LEN})"))
                    }
                    Ok((_, rank, world, _, len)) => {
                        self.claims = Some((rank, world));
                        self.buf = vec![0; len];
                        self.have = 0;
                        continue;
                    }
                }
            };
            return Progress::Hello(rank, world, std::mem::take(&mut self.buf));
        }
    }
}

/// The connections the hub dropped: how many, and the last few reasons (for its timeout error).
#[derive(Default)]
struct Drops {
    count: usize,
    last: Vec<String>,
}

impl Drops {
    fn push(&mut self, why: String) {
        tracing::warn!(reason = %why, "unix rendezvous: dropped a connection that is not a member of the group");
        self.count += 1;
        if self.last.len() == DROPS_QUOTED {
            self.last.remove(0);
        }
        self.last.push(why);
    }
}

/// Unlinks the hub's socket name when the hub is done with it, whichever way.
struct BoundName<'a>(&'a CheckedDir);

impl Drop for BoundName<'_> {
    fn drop(&mut self) {
        // Best effort: the name is only a way in; a failure leaves a stale name the next hub replaces.
        let _ = rustix::fs::unlinkat(&self.0.fd, SOCKET_NAME, rustix::fs::AtFlags::empty());
    }
}

impl UnixRendezvous {
    /// Joins the group meeting in `dir` as `rank` of `world_size`, waiting up to `timeout` for
    /// every rank (and, later, for every round). The group token is taken from [`TOKEN_ENV`]
    /// (every rank must see the same value; unset means none); see [`Self::connect_with_token`].
    pub fn connect(dir: &Path, rank: usize, world_size: usize, timeout: Duration) -> Result<Self> {
        let token = std::env::var_os(TOKEN_ENV).map(OsStringExt::into_vec).unwrap_or_default();
        Self::connect_with_token(dir, rank, world_size, timeout, &token)
    }

    /// Like [`Self::connect`], with the group token given: a secret (at most [`MAX_TOKEN_LEN`]
    /// bytes) that every rank of the group knows and nobody else does, e.g. one the launcher
    /// drew at random and handed to its ranks. The hub admits only connections that present it
    /// (an empty token admits those that present none). It is sent only to a hub of our own uid.
    pub fn connect_with_token(
        dir: &Path,
        rank: usize,
        world_size: usize,
        timeout: Duration,
        token: &[u8],
    ) -> Result<Self> {
        if world_size == 0 || world_size > u16::MAX as usize || rank >= world_size {
            return Err(Error::Invalid(format!("rank {rank} of world size {world_size}")));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(Error::Invalid(format!("group token of {} bytes (at most {MAX_TOKEN_LEN})", token.len())));
        }
        let dir_path = dir;
        let dir = open_private_dir(dir)?;
        let start = Instant::now();
        let deadline = start + timeout;
        let peers = if rank == 0 {
            Self::accept_members(&dir, world_size, token, start, deadline)?
        } else {
            let mut peers: Vec<Option<UnixStream>> = (0..world_size).map(|_| None).collect();
            peers[0] = Some(Self::join_hub(&dir, rank, world_size, token, start, deadline)?);
            peers
        };
        tracing::debug!(rank, world_size, dir = %dir_path.display(), waited = ?start.elapsed(), "unix rendezvous: the group met");
        Ok(UnixRendezvous { rank, world: world_size, round: 0, timeout, peers })
    }

    /// The hub's side: accepts connections until every rank has identified itself, dropping
    /// strangers alone.
    fn accept_members(
        dir: &CheckedDir,
        world: usize,
        token: &[u8],
        start: Instant,
        deadline: Instant,
    ) -> Result<Vec<Option<UnixStream>>> {
        let listener = Self::bind(dir)?;
        let _name = BoundName(dir);
        listener.set_nonblocking(true)?;
        let mut peers: Vec<Option<UnixStream>> = (0..world).map(|_| None).collect();
        let mut strangers: Vec<Stranger> = Vec::new();
        let mut drops = Drops::default();
        let mut connected = 1;
        while connected < world {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Err(why) = check_peer_uid(&stream, "a connecting process") {
                            drops.push(why);
                        } else if strangers.len() >= MAX_PENDING {
                            drops.push(format!("more than {MAX_PENDING} connections waiting to identify"));
                        } else if let Err(e) = stream.set_nonblocking(true) {
                            drops.push(format!("a connection could not be made nonblocking: {e}"));
                        } else {
                            let until = Instant::now() + IDENTIFY_TIMEOUT;
                            strangers.push(Stranger { stream, buf: vec![0; HEADER_LEN], have: 0, claims: None, until });
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // A client that gave up before we accepted it.
                    Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let now = Instant::now();
            let mut i = 0;
            while i < strangers.len() {
                match strangers[i].advance() {
                    Progress::Waiting if now < strangers[i].until => i += 1,
                    Progress::Waiting => {
                        strangers.swap_remove(i);
                        drops.push(format!("a connection stayed silent for {IDENTIFY_TIMEOUT:?}"));
                    }
                    Progress::Drop(why) => {
                        strangers.swap_remove(i);
                        drops.push(why);
                    }
                    Progress::Hello(claimed, theirs, sent) => {
                        let stranger = strangers.swap_remove(i);
                        let peer = claimed as usize;
                        if !same_token(&sent, token) {
                            drops.push(format!("a client claiming rank {peer} presented a wrong group token"));
                        } else if theirs as usize != world {
                            // A member (right user, right token) that disagrees: the group is misconfigured.
                            return Err(Error::Mismatch {
                                what: "world size",
                                ours: world.to_string(),
                                theirs: format!("{theirs} (rank {peer})"),
                            });
                        } else if peer == 0 || peer >= world {
                            drops.push(format!("a client claimed rank {peer}, out of range for world size {world}"));
                        } else if peers[peer].is_some() {
                            drops.push(format!(
                                "a client claimed rank {peer}, which another has (duplicate rank {peer})"
                            ));
                        } else if let Err(e) = stranger.stream.set_nonblocking(false) {
                            drops.push(format!("rank {peer}'s connection could not be made blocking: {e}"));
                        } else {
                            peers[peer] = Some(stranger.stream);
                            connected += 1;
                        }
                    }
                }
            }
            if connected == world {
                break;
            }
            let Some(left) = remaining(deadline) else {
                let missing: Vec<String> = (1..world).filter(|&r| peers[r].is_none()).map(|r| r.to_string()).collect();
                let mut missing = format!("missing ranks: {}", missing.join(", "));
                if drops.count > 0 {
                    missing += &format!(
                        "; {} connection(s) dropped as not members (last: {})",
                        drops.count,
                        drops.last.join("; ")
                    );
                }
                return Err(Error::RendezvousTimeout {
                    rank: 0,
                    phase: "accepting ranks",
                    waited: start.elapsed(),
                    missing,
                });
            };
            // Sleep until a connection arrives, a stranger sends, or the next one's time is up.
            let next = strangers.iter().map(|s| s.until.saturating_duration_since(now)).min();
            let wait = next.map_or(left, |n| n.min(left));
            let wait = Timespec::try_from(wait).unwrap_or(Timespec { tv_sec: 1, tv_nsec: 0 });
            let mut fds: Vec<PollFd<'_>> = std::iter::once(PollFd::new(&listener, PollFlags::IN))
                .chain(strangers.iter().map(|s| PollFd::new(&s.stream, PollFlags::IN)))
                .collect();
            match rustix::event::poll(&mut fds, Some(&wait)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(Error::Io(e.into())),
            }
        }
        Ok(peers)
    }

    /// A rank's side: connects to the hub (retrying until it listens), checks that it runs as
    /// our uid, and identifies itself.
    fn join_hub(
        dir: &CheckedDir,
        rank: usize,
        world: usize,
        token: &[u8],
        start: Instant,
        deadline: Instant,
    ) -> Result<UnixStream> {
        let path = dir.socket();
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
        check_peer_uid(&stream, "the hub").map_err(Error::PeerRefused)?;
        let hello =
            Frame { kind: Kind::Contribute, rank: rank as u16, world: world as u16, round: 0, payload: token.to_vec() };
        write_frame(&mut stream, &hello)?;
        Ok(stream)
    }

    /// Binds the hub's socket, replacing a stale one and refusing a live one.
    fn bind(dir: &CheckedDir) -> Result<UnixListener> {
        let path = dir.socket();
        let listener = match UnixListener::bind(&path) {
            Ok(listener) => listener,
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                // Probing a live hub is harmless: it drops a connection that never says hello.
                if UnixStream::connect(&path).is_ok() {
                    return Err(Error::Invalid(format!(
                        "{} is in use by another live rendezvous",
                        dir.shown.join(SOCKET_NAME).display()
                    )));
                }
                std::fs::remove_file(&path)?;
                UnixListener::bind(&path)?
            }
            Err(e) => return Err(e.into()),
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
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
    fn stale_socket_is_replaced_and_a_duplicate_rank_dropped_alone() {
        let dir = private_dir("stale");
        drop(open_private_dir(&dir).expect("dir"));
        // A socket file nobody listens on, as a crashed run leaves it.
        drop(UnixListener::bind(dir.join(SOCKET_NAME)).expect("bind"));
        assert!(dir.join(SOCKET_NAME).exists());
        let world = 3;
        // Two clients claim rank 1, both connected before rank 2 comes: whichever identifies first
        // is rank 1, the other is dropped.
        let (hub, ones, two) = std::thread::scope(|s| {
            let hub = s.spawn(|| UnixRendezvous::connect(&dir, 0, world, Duration::from_secs(20))?.all_gather(&[0, 0]));
            let claimants = [1u8, 2].map(|tag| {
                let rv = UnixRendezvous::connect(&dir, 1, world, Duration::from_secs(20)).expect("connect");
                s.spawn(move || -> Result<Vec<Vec<u8>>> {
                    let mut rv = rv;
                    rv.all_gather(&[1, tag])
                })
            });
            let two = s.spawn(|| UnixRendezvous::connect(&dir, 2, world, Duration::from_secs(20))?.all_gather(&[2, 0]));
            let [a, b] = claimants.map(|h| h.join().expect("rank 1 thread"));
            (hub.join().expect("hub thread"), [a, b], two.join().expect("rank 2 thread"))
        });
        let hub = hub.expect("the hub gathers despite the duplicate");
        let two = two.expect("rank 2 gathers despite the duplicate");
        assert_eq!(hub, two);
        let winners: Vec<&Vec<Vec<u8>>> = ones.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "exactly one rank 1 is a member: {ones:?}");
        assert_eq!(winners[0], &hub);
        assert_eq!(hub[0], vec![0, 0]);
        assert_eq!(hub[1][0], 1);
        assert_eq!(hub[2], vec![2, 0]);
        let loser = ones.iter().find_map(|r| r.as_ref().err()).expect("one rank 1 is dropped");
        assert!(loser.to_string().contains("a peer closed its connection"), "{loser}");
        assert!(!dir.join(SOCKET_NAME).exists(), "socket file left behind");
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
        assert!(
            matches!(&err, Error::InsecureDir { reason, .. } if reason.contains("accessible to other users")),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hub_times_out_naming_missing_ranks() {
        let dir = private_dir("timeout");
        let err = UnixRendezvous::connect(&dir, 0, 3, Duration::from_millis(150)).expect_err("nobody comes");
        assert!(matches!(&err, Error::RendezvousTimeout { missing, .. } if missing.contains("1, 2")), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hub_timeout_names_the_strangers_it_dropped() {
        let dir = private_dir("dropped");
        std::thread::scope(|s| {
            let hub = s.spawn(|| UnixRendezvous::connect(&dir, 0, 2, Duration::from_secs(2)));
            let mut stray = loop {
                match UnixStream::connect(dir.join(SOCKET_NAME)) {
                    Ok(stream) => break stream,
                    Err(_) if !hub.is_finished() => std::thread::yield_now(),
                    Err(e) => panic!("the hub ended before listening: {e}"),
                }
            };
            stray.write_all(&[0xAB; HEADER_LEN]).expect("write");
            let err = hub.join().expect("hub thread").expect_err("rank 1 never comes");
            let text = err.to_string();
            assert!(text.contains("missing ranks: 1") && text.contains("1 connection(s) dropped"), "{text}");
            assert!(text.contains("malformed hello: rendezvous protocol error: bad magic"), "{text}");
        });
        assert!(!dir.join(SOCKET_NAME).exists(), "socket file left behind after a timeout");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

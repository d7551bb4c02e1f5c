//! The error type of `arfuse-ipc`.

use std::time::Duration;

/// What can go wrong while ranks meet and share buffers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not every rank arrived in time.
    #[error("rank {rank}: rendezvous {phase} timed out after {waited:?} ({missing})")]
    RendezvousTimeout {
        /// The waiting rank.
        rank: usize,
        /// What it was doing.
        phase: &'static str,
        /// How long it waited.
        waited: Duration,
        /// Which ranks were missing, if known.
        missing: String,
    },
    /// A peer sent something that is not a valid message of our protocol.
    #[error("rendezvous protocol error: {0}")]
    Protocol(String),
    /// Ranks disagree about the group.
    #[error("ranks disagree on {what}: ours {ours}, theirs {theirs}")]
    Mismatch {
        /// What differs.
        what: &'static str,
        /// Our value.
        ours: String,
        /// The peer's value.
        theirs: String,
    },
    /// A [`Rendezvous`](crate::Rendezvous) returned something no correct implementation can: the
    /// wrong number of parts, our own part altered, or a part of the wrong length (see
    /// [`checked_all_gather`](crate::rendezvous::checked_all_gather)).
    #[error("rank {rank}: the rendezvous broke its contract: {what}")]
    BadRendezvous {
        /// The rank that noticed.
        rank: usize,
        /// What was wrong, with the counts and ranks involved.
        what: String,
    },
    /// The rendezvous directory cannot be trusted: a symbolic link, another user's, or open to
    /// other users.
    #[error("rendezvous directory {}: {reason}", path.display())]
    InsecureDir {
        /// The directory as given.
        path: std::path::PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The process at the other end of the socket is not one we may talk to (another user's).
    #[error("rendezvous peer refused: {0}")]
    PeerRefused(String),
    /// An argument is out of range.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An I/O error (sockets, directories).
    #[error("rendezvous I/O: {0}")]
    Io(#[from] std::io::Error),
    /// An error of the device runtime (allocation, handles).
    #[error(transparent)]
    Kernels(#[from] arfuse_kernels::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

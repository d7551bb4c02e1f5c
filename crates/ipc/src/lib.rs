//! # arfuse-ipc
//!
//! How the ranks of a group meet and share memory. No `unsafe`, no kernel launches.
//!
//! | concept | here |
//! |---|---|
//! | a way for ranks to exchange bytes | [`Rendezvous`]: [`ThreadRendezvous`], [`UnixRendezvous`], or the caller's own |
//! | what any `Rendezvous` returned, checked | [`checked_all_gather`] (typed error, never a short table of peers) |
//! | who may join a [`UnixRendezvous`] | [`unix`]: a private directory opened without following links, same uid (`SO_PEERCRED`), the group token |
//! | the messages on the socket | [`wire`] (versioned, length-checked) |
//! | every rank's buffer, mapped here | [`SharedBuffers`] (signal area, 2-stage receive area and scratch, push region) |

pub mod buffers;
pub mod error;
pub mod rendezvous;
pub mod unix;
pub mod wire;

pub use buffers::SharedBuffers;
pub use error::{Error, Result};
pub use rendezvous::{checked_all_gather, Rendezvous, ThreadRendezvous};
pub use unix::UnixRendezvous;

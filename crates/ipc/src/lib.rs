//! Rendezvous and shared buffers.

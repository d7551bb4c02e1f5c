//! The shared buffers of a group: one per rank, mapped by every peer.
//!
//! Layout of a rank's buffer (offsets from its start):
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | `SIGNAL_BYTES` | signal area: barrier flags, error word, epoch word |
//! | `SIGNAL_BYTES` | `receive_area_bytes(max_size / 2, world)` (`max_size / 2` plus at most `world - 1` packs) | receive area of the 2-stage paths: each peer pushes its part of our chunk into its slot |
//! | [`scratch_offset`] | `max_size / 2` | scratch of the 2-stage paths: every rank pushes its reduced chunk here |
//! | [`push_offset`] | `push_region_bytes(world, push_slot_bytes)` | push region: call headers of every cross-rank launch, the 1-stage kernels' receive slots |
//!
//! A 2-stage call carries at most `max_size / 2` bytes (larger ones are split by the unfused path
//! or go to the vendor library).
//!
//! The push region (`arfuse_kernels::params::push_region_bytes`) holds three rotations, each a
//! header per sender and a data slot of `push_slot_bytes` per sender. Every 32-bit word of it is
//! armed with `PUSH_SENTINEL` here, before any peer can map it; readers re-arm what they read.

use crate::rendezvous::{checked_all_gather, Rendezvous};
use crate::{Error, Result};
use arfuse_kernels::params::{push_region_bytes, receive_area_bytes, PUSH_SENTINEL};
use arfuse_kernels::{Backend, BackendKind, MAX_RANKS, PACK_BYTES, SIGNAL_BYTES};

/// Offset of the receive area.
pub fn receive_offset() -> usize {
    SIGNAL_BYTES
}

/// Offset of the scratch area in a group of `world` ranks.
pub fn scratch_offset(max_size: usize, world: usize) -> usize {
    receive_offset() + receive_area_bytes(max_size / 2, world)
}

/// Offset of the push region in a group of `world` ranks.
pub fn push_offset(max_size: usize, world: usize) -> usize {
    scratch_offset(max_size, world) + max_size / 2
}

/// Total bytes of one rank's buffer in a group of `world` ranks with push slots of `push_slot_bytes`.
pub fn buffer_bytes(max_size: usize, world: usize, push_slot_bytes: usize) -> usize {
    push_offset(max_size, world) + push_region_bytes(world, push_slot_bytes)
}

/// Whether the GPU kernels are built with the measurement variant of the fused 2-stage path
/// that polls its receive area for data instead of passing a barrier first
/// (`ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_SENTINEL_SCATTER`, docs/performance.md): that area must
/// then start armed with `PUSH_SENTINEL` too. The default kernels overwrite it, unarmed.
fn sentinel_scatter() -> bool {
    arfuse_kernels::source::experiment_defines().iter().any(|d| d == "-DARFUSE_EXP_SENTINEL_SCATTER")
}

/// What every rank announces about itself (the handle follows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Announce {
    rank: u64,
    world: u64,
    max_size: u64,
    push_slot_bytes: u64,
    backend: u64,
    pid: u64,
}

fn backend_code(kind: BackendKind) -> u64 {
    match kind {
        BackendKind::Cpu => 0,
        BackendKind::Cuda => 1,
        BackendKind::Hip => 2,
    }
}

/// This rank's buffer and its peers', mapped; created collectively, unmapped and freed on drop.
pub struct SharedBuffers<B: Backend> {
    rank: usize,
    world: usize,
    max_size: usize,
    push_slot_bytes: usize,
    /// Base address of every rank's buffer in this process (ours included).
    bases: Vec<u64>,
    /// Peers' mappings (dropped before our own buffer).
    _peers: Vec<B::PeerMapping>,
    own: B::SharedBuffer,
}

impl<B: Backend> std::fmt::Debug for SharedBuffers<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuffers")
            .field("backend", &B::KIND)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("max_size", &self.max_size)
            .finish()
    }
}

impl<B: Backend> SharedBuffers<B> {
    /// Allocates this rank's buffer, exchanges handles through `rendezvous`, maps every peer's
    /// buffer, and waits until every rank has mapped every other (two rounds). `max_size` must
    /// be a positive multiple of `2 * PACK_BYTES`; `push_slot_bytes` (the largest input a 1-stage
    /// call carries) a positive multiple of `PACK_BYTES`.
    pub fn create(
        device: &B::Device,
        rendezvous: &mut dyn Rendezvous,
        max_size: usize,
        push_slot_bytes: usize,
    ) -> Result<Self> {
        let rank = rendezvous.rank();
        let world = rendezvous.world_size();
        if world == 0 || world > MAX_RANKS {
            return Err(Error::Invalid(format!("world size {world} (1..={MAX_RANKS})")));
        }
        if max_size == 0 || max_size % (2 * PACK_BYTES) != 0 {
            return Err(Error::Invalid(format!(
                "max_size {max_size} must be a positive multiple of {}",
                2 * PACK_BYTES
            )));
        }
        if push_slot_bytes == 0 || push_slot_bytes % PACK_BYTES != 0 || push_slot_bytes > u32::MAX as usize {
            return Err(Error::Invalid(format!(
                "push slots of {push_slot_bytes} bytes (a positive multiple of {PACK_BYTES} below 4 GiB)"
            )));
        }
        let bytes = buffer_bytes(max_size, world, push_slot_bytes);
        let own = B::alloc_shared(device, bytes)?;
        tracing::debug!(backend = %B::KIND, rank, world, bytes, max_size, push_slot_bytes, "shared buffer allocated");
        // Armed before any peer can map it (its handle is not sent yet).
        B::fill_shared(
            device,
            &own,
            push_offset(max_size, world),
            push_region_bytes(world, push_slot_bytes),
            PUSH_SENTINEL,
        )?;
        if sentinel_scatter() {
            B::fill_shared(device, &own, receive_offset(), receive_area_bytes(max_size / 2, world), PUSH_SENTINEL)?;
        }
        let handle = B::export_handle(&own)?;
        let ours = Announce {
            rank: rank as u64,
            world: world as u64,
            max_size: max_size as u64,
            push_slot_bytes: push_slot_bytes as u64,
            backend: backend_code(B::KIND),
            pid: u64::from(std::process::id()),
        };
        let mut message = bytemuck::bytes_of(&ours).to_vec();
        message.extend_from_slice(bytemuck::bytes_of(&handle));
        let gathered = checked_all_gather(rendezvous, &message, Some(message.len()))?;
        let head = std::mem::size_of::<Announce>();
        let mut bases = Vec::with_capacity(world);
        let mut peers = Vec::with_capacity(world);
        for (peer, bytes) in gathered.iter().enumerate() {
            let theirs: Announce = bytemuck::try_pod_read_unaligned(&bytes[..head])
                .map_err(|e| Error::Protocol(format!("rank {peer}: {e}")))?;
            for (what, a, b) in [
                ("world size", ours.world, theirs.world),
                ("max_size", ours.max_size, theirs.max_size),
                ("push slot bytes", ours.push_slot_bytes, theirs.push_slot_bytes),
                ("backend", ours.backend, theirs.backend),
            ] {
                if a != b {
                    return Err(Error::Mismatch { what, ours: a.to_string(), theirs: format!("{b} (rank {peer})") });
                }
            }
            if theirs.rank != peer as u64 {
                return Err(Error::Protocol(format!("slot {peer} holds rank {}", theirs.rank)));
            }
            if peer == rank {
                bases.push(B::shared_ptr(&own).0);
                continue;
            }
            let handle: B::IpcHandle = bytemuck::try_pod_read_unaligned(&bytes[head..])
                .map_err(|e| Error::Protocol(format!("rank {peer}'s handle: {e}")))?;
            let mapping = B::open_handle(device, &handle)?;
            tracing::debug!(
                rank,
                peer,
                peer_pid = theirs.pid,
                base = B::peer_ptr(&mapping).0,
                "mapped a peer's shared buffer"
            );
            bases.push(B::peer_ptr(&mapping).0);
            peers.push(mapping);
        }
        // Everyone has mapped everyone: names and handles may now be forgotten.
        checked_all_gather(rendezvous, &[], Some(0))?;
        B::peers_attached(&own)?;
        Ok(SharedBuffers { rank, world, max_size, push_slot_bytes, bases, _peers: peers, own })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world
    }
    /// The configured `max_size`: 2-stage calls carry at most `max_size / 2` bytes.
    pub fn max_size(&self) -> usize {
        self.max_size
    }
    /// Our own buffer.
    pub fn own(&self) -> &B::SharedBuffer {
        &self.own
    }

    fn ptrs(&self, offset: usize) -> [u64; MAX_RANKS] {
        let mut out = [0u64; MAX_RANKS];
        for (slot, base) in out.iter_mut().zip(&self.bases) {
            *slot = base + offset as u64;
        }
        out
    }

    /// Every rank's signal area, in this process's address space (zeros past the world size).
    pub fn signal_ptrs(&self) -> [u64; MAX_RANKS] {
        self.ptrs(0)
    }
    /// Every rank's receive area.
    pub fn receive_ptrs(&self) -> [u64; MAX_RANKS] {
        self.ptrs(receive_offset())
    }
    /// Every rank's scratch area.
    pub fn scratch_ptrs(&self) -> [u64; MAX_RANKS] {
        self.ptrs(scratch_offset(self.max_size, self.world))
    }
    /// Every rank's push region.
    pub fn push_ptrs(&self) -> [u64; MAX_RANKS] {
        self.ptrs(push_offset(self.max_size, self.world))
    }
    /// Bytes of one data slot of the push region: the largest input of a 1-stage call.
    pub fn push_slot_bytes(&self) -> usize {
        self.push_slot_bytes
    }
    /// Our own signal area.
    pub fn own_signal_ptr(&self) -> u64 {
        self.bases[self.rank]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadRendezvous;
    use arfuse_kernels::api::Cpu;
    use std::time::Duration;

    fn shm_entries() -> usize {
        let prefix = format!("arfuse-{}-", std::process::id());
        std::fs::read_dir("/dev/shm")
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&prefix)).count())
            .unwrap_or(0)
    }

    #[test]
    fn create_and_drop_200_times_leaves_no_segment() {
        for _ in 0..200 {
            let group = ThreadRendezvous::group(2, Duration::from_secs(20));
            std::thread::scope(|s| {
                for mut rv in group {
                    s.spawn(move || {
                        let device = Cpu::open_device(0, 1).expect("cpu");
                        SharedBuffers::<Cpu>::create(&device, &mut rv, 1 << 12, 1 << 10).expect("buffers");
                    });
                }
            });
        }
        assert_eq!(shm_entries(), 0, "shared-memory segments left in /dev/shm");
    }

    #[test]
    fn disagreeing_max_size_is_refused() {
        let group = ThreadRendezvous::group(2, Duration::from_secs(20));
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|mut rv| {
                    s.spawn(move || {
                        let device = Cpu::open_device(0, 1).expect("cpu");
                        let size = if rv.rank() == 0 { 1 << 12 } else { 1 << 13 };
                        SharedBuffers::<Cpu>::create(&device, &mut rv, size, 1 << 10).map(|_| ())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        assert!(results.iter().all(|r| matches!(r, Err(Error::Mismatch { what: "max_size", .. }))), "{results:?}");
    }
}

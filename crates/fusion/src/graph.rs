//! Graph inputs read in place: the calls of a captured graph read the users' tensors where they
//! are, without the copy into the staging buffer that eager calls make.
//!
//! While an operator records ([`AllReduceRmsNorm::begin_graph_capture`](crate::AllReduceRmsNorm::begin_graph_capture)),
//! every cross-rank launch claims a *slot* of this rank's graph-input table (device memory,
//! [`GRAPH_SLOT_BYTES`] per slot) and is launched with `LaunchParams::inputs` pointing at it; the
//! slot stays empty, so a replay at this point fails with [`Error::NotRegistered`] instead of
//! reading anything. After the capture,
//! [`register_graph_inputs`](crate::AllReduceRmsNorm::register_graph_inputs) (collective) exports
//! the allocation behind each recorded input (`cuIpcGetMemHandle`/`hipIpcGetMemHandle` of the
//! base that `cuMemGetAddressRange` gives, plus the offset), all-gathers them through the
//! rendezvous, maps every peer's allocation once (a peer in this process: its pointer as is) and
//! writes each slot: `[input of rank 0, input of rank 1, ...]` in this rank's address space.
//! Replays then read every rank's current input in place, and end with a barrier so that no rank
//! lets its user overwrite an input a peer still reads.
//!
//! Which launches read in place: the reduce-scatters (2-stage paths), whose closing barrier is
//! there anyway, so skipping the copy is a pure gain (measured on the H100, P = 2 on one GPU, 100
//! captured calls, 2026-11-25: 16×8192 2-stage 17.5 µs in place vs 18.7 µs staged). The 1-stage
//! kernels push their input into the peers' receive slots: no peer reads a user tensor, so their
//! graphs need nothing registered and replay correctly without this.

use crate::{Error, Result};
use arfuse_ipc::{checked_all_gather, Rendezvous};
use arfuse_kernels::{Backend, DevicePtr, GRAPH_SLOT_BYTES, MAX_RANKS};
use std::collections::HashMap;

/// Default number of slots of the graph-input table: one per cross-rank launch captured with its
/// input in place over the operator's life (a decode graph captures one per layer and batch
/// size). 32768 slots are 2 MiB.
pub const DEFAULT_GRAPH_SLOTS: usize = 32768;

/// The table is allocated in whole multiples of this: the driver serves smaller allocations from
/// pooled 2 MiB pages that it may keep after the free, which the leak tests would count (measured:
/// a 256 KiB table left the free device memory 2 MiB lower after 100 operators, not 25 MiB).
const TABLE_GRANULE: usize = 2 << 20;

/// This rank's graph-input table, what is recorded into it, and the peers' mapped allocations.
pub(crate) struct GraphInputs<B: Backend> {
    table: B::SharedBuffer,
    capacity: usize,
    /// Slots claimed so far (registered or pending).
    used: usize,
    /// `Some(first slot)` while recording: calls since then claim slots `first..used`.
    recording: Option<usize>,
    /// This rank's input of each slot claimed while recording, in slot order.
    pending: Vec<u64>,
    /// Peers' allocations mapped here, by (peer, handle bytes): their base address here.
    mapped: HashMap<(usize, Vec<u8>), u64>,
    /// The mappings behind `mapped`, unmapped when the operator is dropped.
    mappings: Vec<B::PeerMapping>,
}

/// One slot as a rank announces it: where its input lies inside which allocation.
const OFFSET_BYTES: usize = 8;
/// The count a rank announces when it could not export its inputs (its error text follows).
const FAILED: u64 = u64::MAX;
/// Bytes of slots a rank sends per rendezvous round: eight ranks' parts fit one 1 MiB frame.
const ROUND_BYTES: usize = 64 << 10;

impl<B: Backend> GraphInputs<B> {
    /// Allocates a table of at least `slots` slots (zero-filled: nothing registered), rounded up
    /// to whole 2 MiB.
    pub(crate) fn new(device: &B::Device, slots: usize) -> Result<Self> {
        let bytes = (slots.max(1) * GRAPH_SLOT_BYTES).next_multiple_of(TABLE_GRANULE);
        let capacity = bytes / GRAPH_SLOT_BYTES;
        let table = B::alloc_shared(device, bytes)?;
        Ok(GraphInputs {
            table,
            capacity,
            used: 0,
            recording: None,
            pending: Vec::new(),
            mapped: HashMap::new(),
            mappings: Vec::new(),
        })
    }

    /// Slots left.
    pub(crate) fn free_slots(&self) -> usize {
        self.capacity - self.used
    }

    /// Slots in all.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether calls are being recorded.
    pub(crate) fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    pub(crate) fn begin(&mut self) -> Result<()> {
        if self.recording.is_some() {
            return Err(Error::GraphCapture("begin_graph_capture called twice without register_graph_inputs".into()));
        }
        self.recording = Some(self.used);
        self.pending.clear();
        Ok(())
    }

    /// Claims the next slot for a launch whose own input is `input`; returns the slot's device
    /// address. The caller checked [`free_slots`](Self::free_slots) for the whole call.
    pub(crate) fn claim(&mut self, input: u64) -> u64 {
        debug_assert!(self.recording.is_some() && self.used < self.capacity);
        let slot = self.used;
        self.used += 1;
        self.pending.push(input);
        B::shared_ptr(&self.table).add(slot * GRAPH_SLOT_BYTES).0
    }

    /// Ends the recording: exchanges the recorded inputs with every peer, maps theirs, and fills
    /// the slots through `stream` (finished on return). Returns the number of slots registered.
    pub(crate) fn register(
        &mut self,
        device: &B::Device,
        stream: &B::Stream,
        rendezvous: &mut dyn Rendezvous,
        rank: usize,
        world: usize,
    ) -> Result<usize> {
        let Some(first) = self.recording else {
            return Err(Error::GraphCapture("register_graph_inputs called without begin_graph_capture".into()));
        };
        // Round 0: first slot and count (or `FAILED` and the error: a rank that cannot export
        // still takes part, so that its peers fail at once with its reason instead of waiting for
        // it). Then rounds of at most `ROUND_BYTES` per rank: per slot the exported handle and the
        // offset in it (a rendezvous frame holds every rank's part, at most 1 MiB).
        let handle_bytes = std::mem::size_of::<B::IpcHandle>();
        let stride = handle_bytes + OFFSET_BYTES;
        let mut slots = Vec::with_capacity(self.pending.len() * stride);
        let exported = self.pending.iter().try_for_each(|&input| {
            let (handle, offset) = B::export_allocation(device, DevicePtr(input))?;
            slots.extend_from_slice(bytemuck::bytes_of(&handle));
            slots.extend_from_slice(&offset.to_le_bytes());
            Ok::<(), arfuse_kernels::Error>(())
        });
        let mut header = (first as u64).to_le_bytes().to_vec();
        match &exported {
            Ok(()) => header.extend_from_slice(&(self.pending.len() as u64).to_le_bytes()),
            Err(e) => {
                header.extend_from_slice(&FAILED.to_le_bytes());
                header.extend_from_slice(e.to_string().as_bytes());
            }
        }
        let headers = checked_all_gather(rendezvous, &header, None)?;
        exported?;
        // Every rank must have recorded the same launches: same first slot, same count.
        for (peer, bytes) in headers.iter().enumerate() {
            if bytes.get(8..16) == Some(&FAILED.to_le_bytes()[..]) {
                return Err(Error::GraphCapture(format!(
                    "rank {peer} could not export its graph inputs: {}",
                    String::from_utf8_lossy(&bytes[16..])
                )));
            }
            if bytes[..] != header[..] {
                let theirs = |at: usize| {
                    bytes.get(at..at + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                };
                return Err(Error::GraphCapture(format!(
                    "rank {peer} recorded {} cross-rank launches from slot {}, this rank {} from slot {first}",
                    theirs(8),
                    theirs(0),
                    self.pending.len()
                )));
            }
        }
        let per_round = (ROUND_BYTES / stride).max(1);
        let mut table = vec![0u64; self.pending.len() * MAX_RANKS];
        for (round, ours) in slots.chunks(per_round * stride).enumerate() {
            // Every rank's headers matched, so every part of a round has our length.
            let gathered = checked_all_gather(rendezvous, ours, Some(ours.len()))?;
            for (peer, bytes) in gathered.iter().enumerate().take(world) {
                for (i, entry) in bytes.chunks_exact(stride).enumerate() {
                    let slot = round * per_round + i;
                    let at = slot * MAX_RANKS + peer;
                    if peer == rank {
                        table[at] = self.pending[slot];
                        continue;
                    }
                    let (handle, offset) = entry.split_at(handle_bytes);
                    let offset = u64::from_le_bytes(offset.try_into().unwrap_or_default());
                    let base = match self.mapped.get(&(peer, handle.to_vec())) {
                        Some(&base) => base,
                        None => {
                            let parsed: B::IpcHandle = bytemuck::try_pod_read_unaligned(handle).map_err(|e| {
                                Error::GraphCapture(format!("rank {peer}'s handle of slot {slot}: {e}"))
                            })?;
                            let mapping = B::open_handle(device, &parsed)?;
                            let base = B::peer_ptr(&mapping).0;
                            tracing::debug!(rank, peer, slot, base, "graph inputs: mapped a peer's allocation");
                            self.mappings.push(mapping);
                            self.mapped.insert((peer, handle.to_vec()), base);
                            base
                        }
                    };
                    table[at] = base + offset;
                }
            }
        }
        let at = B::shared_ptr(&self.table).add(first * GRAPH_SLOT_BYTES);
        // SAFETY: slots `first..first + pending.len()` lie inside the table (claimed below capacity).
        unsafe { B::write(stream, at, bytemuck::cast_slice(&table))? };
        B::synchronize(stream)?;
        let registered = self.pending.len();
        tracing::debug!(
            rank,
            world,
            registered,
            first_slot = first,
            mapped = self.mappings.len(),
            "graph inputs registered"
        );
        self.pending.clear();
        self.recording = None;
        Ok(registered)
    }
}

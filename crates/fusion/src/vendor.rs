//! The vendor collective fallback (NCCL on NVIDIA, RCCL on AMD): how an operator gets its
//! [`Communicator`], and what it keeps to call it.
//!
//! An operator made with [`AllReduceRmsNorm::with_collective`](crate::AllReduceRmsNorm::with_collective)
//! (or [`with_communicator`](crate::AllReduceRmsNorm::with_communicator), for a communicator the
//! caller already has) holds one; its policy then says `vendor_available`, and the dispatcher's
//! [`Path::Unfused`](crate::Path::Unfused) with [`AllReduce::Vendor`](crate::AllReduce::Vendor) runs
//! `ncclAllReduce` of the input into `out`, then the add+RMSNorm kernel reading `out` as the sum —
//! the same second kernel as the custom unfused path. Without one, that path is refused with
//! [`Error::VendorUnavailable`].
//!
//! When the dispatcher picks the vendor library:
//! - `bytes > max_size / 2` (too large for our kernels' buffers) **and** a communicator exists —
//!   otherwise our custom all-reduce in row chunks;
//! - no peer access between some ranks, ranks on several hosts, or a world size beyond the
//!   kernels (9 or more) — always, since our kernels cannot run there (without a communicator
//!   the call is refused with [`Error::VendorUnavailable`]).
//!
//! Numerics: the library sums in its own order, so `residual_out` is bit-exact against the
//! contract's steps 2-3 applied to the library's sum, not bit-identical to the fused or custom
//! paths (for 1 or 2 ranks the sums agree except that the library keeps `-0.0`; see
//! ARCHITECTURE.md, "Vendor collective fallback").

use crate::{Error, Result};
use arfuse_ipc::{checked_all_gather, Rendezvous};
use arfuse_kernels::collective::{CollectiveBackend, Communicator, Library, UniqueId};
use arfuse_kernels::Backend;
use std::ffi::c_void;

/// Creates this rank's communicator of the vendor library over the ranks of `rendezvous`:
/// every rank loads the library, rank 0 generates the [`UniqueId`], one all-gather round carries
/// it (and every rank's load status: if any rank cannot load the library, all fail here instead of
/// waiting in `ncclCommInitRank`), then all join with `device` current. Collective: every rank of
/// the group must call it.
pub fn create_communicator<B: CollectiveBackend>(
    device: &B::Device,
    rendezvous: &mut dyn Rendezvous,
) -> Result<Communicator> {
    let (rank, world) = (rendezvous.rank(), rendezvous.world_size());
    let prepared = Library::open(B::VENDOR).and_then(|library| {
        let id = if rank == 0 { Some(UniqueId::new(&library)?) } else { None };
        Ok((library, id))
    });
    let message = match &prepared {
        Ok((_, Some(id))) => [&[1u8][..], id.as_bytes()].concat(),
        Ok((_, None)) => vec![1u8],
        Err(e) => [&[0u8][..], e.to_string().as_bytes()].concat(),
    };
    let gathered = checked_all_gather(rendezvous, &message, None)?;
    let (library, _) = prepared?;
    for (peer, bytes) in gathered.iter().enumerate() {
        if bytes.first() != Some(&1) {
            let why = String::from_utf8_lossy(bytes.get(1..).unwrap_or_default());
            return Err(Error::VendorUnavailable {
                reason: format!("rank {peer} could not load {}: {why}", B::VENDOR),
            });
        }
    }
    let id = UniqueId::from_bytes(&gathered[0][1..])?;
    B::make_current(device)?;
    let comm = Communicator::init_rank(&library, &id, rank, world)?;
    tracing::debug!(rank, world, library = ?library, "vendor collective communicator created");
    Ok(comm)
}

/// What an operator keeps to run the vendor path: the communicator and the backend's glue,
/// captured where `B: CollectiveBackend` is known so that the operator itself needs no such bound.
pub(crate) struct VendorFallback<B: Backend> {
    pub(crate) comm: Communicator,
    pub(crate) raw_stream: fn(&B::Stream) -> *mut c_void,
    pub(crate) make_current: fn(&B::Device) -> arfuse_kernels::Result<()>,
}

impl<B: CollectiveBackend> VendorFallback<B> {
    pub(crate) fn new(comm: Communicator) -> Self {
        VendorFallback { comm, raw_stream: B::raw_stream, make_current: B::make_current }
    }
}

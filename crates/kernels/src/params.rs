//! The launch parameters every kernel takes, and the layout of a rank's signal area.
//!
//! [`LaunchParams`] is `#[repr(C)]` and mirrored field for field by `struct LaunchParams` in
//! `gpu/arfuse.h`; a test pins its size and offsets. The CPU backend reads the same struct, with
//! host addresses in the pointer fields.

use crate::contract::{Epilogue, Fp8Format, Norm, Quant, Scaling};

/// The largest world size the kernels support.
pub const MAX_RANKS: usize = 8;
/// Barrier slots per rank: one per thread block a kernel may launch.
pub const MAX_BLOCKS: usize = 256;
/// Bytes per vector access in every hot loop.
pub const PACK_BYTES: usize = 16;

/// Byte offset of the barrier flags inside a signal area: `u64 flags[MAX_BLOCKS][MAX_RANKS]`.
/// Rank `r` writes barrier value `v` for block `b` into `flags[b][r]` of every peer's area.
pub const SIGNAL_FLAGS_OFFSET: usize = 0;
/// Byte offset of the error word: 0 while healthy; a kernel that gives up writes an [`ErrorWord`].
pub const SIGNAL_ERROR_OFFSET: usize = MAX_BLOCKS * MAX_RANKS * 8;
/// Byte offset of the epoch word: cross-rank launches (with `barrier_base == 0`) this rank completed.
pub const SIGNAL_EPOCH_OFFSET: usize = SIGNAL_ERROR_OFFSET + 8;
/// Byte offset of the count of blocks that finished the current launch (the last one advances the epoch).
pub const SIGNAL_DONE_OFFSET: usize = SIGNAL_ERROR_OFFSET + 16;
/// Byte offset of the CPU backend's doorbell (`u32`): a sender bumps a rank's doorbell after its
/// stores into that rank's buffers and wakes the futex waiters on it (GPU kernels never touch it).
pub const SIGNAL_DOORBELL_OFFSET: usize = SIGNAL_ERROR_OFFSET + 24;
/// Total size of a signal area, rounded up to 64 KiB.
pub const SIGNAL_BYTES: usize = 64 * 1024;
const _: () = assert!(SIGNAL_DOORBELL_OFFSET + 8 <= SIGNAL_BYTES);

/// Rotations of the push region: call `e` uses rotation `e % PUSH_ROTATIONS`.
pub const PUSH_ROTATIONS: usize = 3;
/// Bytes of a rotation's header area: one 16-byte [`CallHeader`] per sender, padded.
pub const PUSH_HEADER_BYTES: usize = 256;
const _: () = assert!(MAX_RANKS * 16 <= PUSH_HEADER_BYTES);
/// The 32-bit word every slot of the push region holds until its data arrives: `-0.0` in f32, and
/// `(-0.0, +0.0)` as two bf16/f16 elements (high half first). Senders map every `-0.0` element to
/// `+0.0` (the numerics contract reads `-0.0` as `+0.0` anyway), so no data word of any dtype, and
/// no header word (bit 31 is always clear there), equals it.
pub const PUSH_SENTINEL: u32 = 0x8000_0000;
/// [`LaunchParams::flags`] bit: this rank refused the call (a local validation error). It takes
/// part with a header that says so and moves no data, so that its peers report
/// [`ErrorWord::KIND_CALL_MISMATCH`] instead of pairing their call with this rank's next one.
pub const FLAG_REFUSED: u32 = 1;
/// The op code a refused call's header carries.
pub const OP_CODE_REFUSED: u32 = 15;

/// Bytes of one rank's push region for `world` ranks and data slots of `slot_bytes`:
/// `PUSH_ROTATIONS x [headers: PUSH_HEADER_BYTES][data: world x slot_bytes]`.
///
/// Rotation `r` of rank `o`'s region starts at `push[o] + r * (PUSH_HEADER_BYTES + world *
/// slot_bytes)`; the header sender `s` writes there is at `+ 16 * s`, its data at
/// `+ PUSH_HEADER_BYTES + s * slot_bytes` (element `i` of the call's `[rows, hidden]` tensor at
/// byte `i * dtype size` of the slot).
pub const fn push_region_bytes(world: usize, slot_bytes: usize) -> usize {
    PUSH_ROTATIONS * (PUSH_HEADER_BYTES + world * slot_bytes)
}

/// Byte offset, in a push region, of the header `sender` writes for rotation `rotation`.
pub const fn push_header_offset(world: usize, slot_bytes: usize, rotation: usize, sender: usize) -> usize {
    rotation * (PUSH_HEADER_BYTES + world * slot_bytes) + 16 * sender
}

/// Byte offset, in a push region, of the data slot `sender` writes for rotation `rotation`.
pub const fn push_slot_offset(world: usize, slot_bytes: usize, rotation: usize, sender: usize) -> usize {
    rotation * (PUSH_HEADER_BYTES + world * slot_bytes) + PUSH_HEADER_BYTES + sender * slot_bytes
}

/// Parameters of one kernel launch (all pointers are device addresses of the launching rank's
/// device, or host addresses on the CPU backend).
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct LaunchParams {
    /// Each rank's 2-stage receive area (peer pointers; `[rank]` is ours): the reduce-scatter
    /// pushes the part of its input that rank `o` reduces into `receive[o]`, at
    /// [`receive_slot_offset`] of its own slot (the 1-stage kernels push into `push` instead).
    pub receive: [u64; MAX_RANKS],
    /// Each rank's 2-stage scratch area (reduced chunks are stored here).
    pub scratch: [u64; MAX_RANKS],
    /// Each rank's signal area.
    pub signals: [u64; MAX_RANKS],
    /// This rank's input. The 1-stage kernels push it into every peer's push region; the
    /// reduce-scatter pushes each peer's chunk of it into that peer's `receive` area (each block
    /// the part its peers' same-numbered blocks reduce) and reads its own chunk where it is;
    /// add+RMSNorm reads the all-reduced sum from it. Peers never read it.
    pub input: u64,
    /// The residual, `[rows, hidden]`.
    pub residual: u64,
    /// The RMSNorm weight, `[hidden]`.
    pub weight: u64,
    /// The normalised output (all-reduce kernels: the reduced sum), `[rows, hidden]`.
    pub out: u64,
    /// The residual output, `[rows, hidden]`.
    pub residual_out: u64,
    /// The barrier value of this call's first barrier (later barriers add 1), and with it the
    /// call-descriptor slot. 0: the kernel takes the next epoch `e` from its rank's epoch word
    /// (barrier value `2e`, push rotation `e % PUSH_ROTATIONS`) and advances the word when it
    /// ends — what makes a captured graph safe to replay.
    pub barrier_base: u64,
    /// How long a spin on a peer's flag may last before the kernel gives up, in nanoseconds.
    pub deadline_ns: u64,
    /// Tokens (rows).
    pub rows: u32,
    /// Hidden size (elements per row).
    pub hidden: u32,
    /// This rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Zero (was the staging halves' distance; kept so that the fields after it stay where
    /// `gpu/arfuse.h` has them).
    pub reserved0: u32,
    /// Zero (was the graph-input table, which the push protocol made unnecessary).
    pub reserved1: u64,
    /// Each rank's push region (see [`push_region_bytes`]): every cross-rank launch writes its
    /// [`CallHeader`] there, and the 1-stage kernels push their input into it.
    pub push: [u64; MAX_RANKS],
    /// Bytes of one data slot of the push region: the largest input a 1-stage launch may carry.
    pub push_slot_bytes: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// The epilogue kernels' ([`crate::Op::has_epilogue`]) FP8 output, `u8 [rows, hidden]`;
    /// 0 without quantisation. The plain kernels ignore this and the fields after it.
    pub out_q: u64,
    /// The epilogue kernels' dynamic scales, f32 (`[rows]` per token, `[rows, hidden / 128]` per
    /// group, row major); 0 otherwise.
    pub scales: u64,
    /// The static scale of per-tensor quantisation (`EPILOGUE_SCALE_PER_TENSOR`).
    pub quant_scale: f32,
    /// `EPILOGUE_*` bits of the epilogue kernels ([`epilogue_bits`]).
    pub epilogue: u32,
    /// Zero (keeps the size a multiple of 16 bytes).
    pub reserved: u64,
}

/// [`LaunchParams::epilogue`] bit: Gemma's `(1 + w)` norm ([`Norm::GemmaOffset`]).
pub const EPILOGUE_GEMMA: u32 = 1;
/// [`LaunchParams::epilogue`] bit: no residual (not read; `residual_out` not written).
pub const EPILOGUE_NO_RESIDUAL: u32 = 2;
/// [`LaunchParams::epilogue`] bits 2..4: the scaling of the FP8 output (0: none).
pub const EPILOGUE_SCALE_MASK: u32 = 0xc;
/// Scaling code: per tensor, static ([`LaunchParams::quant_scale`]).
pub const EPILOGUE_SCALE_PER_TENSOR: u32 = 0x4;
/// Scaling code: per token, dynamic.
pub const EPILOGUE_SCALE_PER_TOKEN: u32 = 0x8;
/// Scaling code: per group of 128, dynamic.
pub const EPILOGUE_SCALE_PER_GROUP: u32 = 0xc;
/// [`LaunchParams::epilogue`] bit: e4m3fnuz (else e4m3fn).
pub const EPILOGUE_FNUZ: u32 = 0x10;
/// The [`LaunchParams::epilogue`] bits a [`CallHeader`] carries (bits 16..21 of its second word):
/// every bit that selects what the call computes (norm, residual, FP8 format and scaling). Not
/// the static scale's value ([`LaunchParams::quant_scale`], 32 bits with no room in the header,
/// and data like the weight), nor any pointer.
pub const EPILOGUE_CALL_MASK: u32 = 0x1f;
/// Where the epilogue bits sit in a [`CallHeader`]'s second word.
pub const EPILOGUE_CALL_SHIFT: u32 = 16;
const _: () = assert!((EPILOGUE_CALL_MASK << EPILOGUE_CALL_SHIFT) >> 31 == 0, "header bit 31 must stay clear");
const _: () = assert!(
    EPILOGUE_CALL_MASK & (EPILOGUE_GEMMA | EPILOGUE_NO_RESIDUAL | EPILOGUE_SCALE_MASK | EPILOGUE_FNUZ)
        == EPILOGUE_CALL_MASK
);

/// The [`LaunchParams::epilogue`] bits and [`LaunchParams::quant_scale`] of an epilogue.
pub fn epilogue_bits(e: &Epilogue) -> (u32, f32) {
    let mut bits = 0;
    if e.norm == Norm::GemmaOffset {
        bits |= EPILOGUE_GEMMA;
    }
    if e.no_residual {
        bits |= EPILOGUE_NO_RESIDUAL;
    }
    let mut scale = 0.0;
    if let Some(q) = e.quant {
        if q.format == Fp8Format::E4m3Fnuz {
            bits |= EPILOGUE_FNUZ;
        }
        bits |= match q.scaling {
            Scaling::PerTensor(s) => {
                scale = s;
                EPILOGUE_SCALE_PER_TENSOR
            }
            Scaling::PerToken => EPILOGUE_SCALE_PER_TOKEN,
            Scaling::PerGroup => EPILOGUE_SCALE_PER_GROUP,
        };
    }
    (bits, scale)
}

/// The epilogue a launch's parameters describe (the inverse of [`epilogue_bits`]).
pub fn epilogue_of(p: &LaunchParams) -> Epilogue {
    let bits = p.epilogue;
    let format = if bits & EPILOGUE_FNUZ != 0 { Fp8Format::E4m3Fnuz } else { Fp8Format::E4m3Fn };
    let scaling = match bits & EPILOGUE_SCALE_MASK {
        EPILOGUE_SCALE_PER_TENSOR => Some(Scaling::PerTensor(p.quant_scale)),
        EPILOGUE_SCALE_PER_TOKEN => Some(Scaling::PerToken),
        EPILOGUE_SCALE_PER_GROUP => Some(Scaling::PerGroup),
        _ => None,
    };
    Epilogue {
        norm: if bits & EPILOGUE_GEMMA != 0 { Norm::GemmaOffset } else { Norm::Standard },
        no_residual: bits & EPILOGUE_NO_RESIDUAL != 0,
        quant: scaling.map(|scaling| Quant { format, scaling }),
    }
}

/// Items of the chunk each rank owns in a 2-stage call of `items` items over `world` ranks — packs
/// in the unfused path's all-reduce, rows in the fused call (kernels.cu `chunk_of`): `ceil(items /
/// world)`, the last chunks shorter or empty.
pub const fn chunk_len(items: usize, world: usize) -> usize {
    items.div_ceil(world)
}

/// The items rank `rank` owns of a 2-stage call of `items` items over `world` ranks (chunks of
/// [`chunk_len`]).
pub fn chunk_range(rank: usize, world: usize, items: usize) -> std::ops::Range<usize> {
    let per_rank = chunk_len(items, world);
    (rank * per_rank).min(items)..((rank + 1) * per_rank).min(items)
}

/// Byte offset, in the owner's receive area, of the slot `sender` pushes its part of the owner's
/// chunk into, for a 2-stage call of `items` items of `item_bytes` (packs of `PACK_BYTES` in the
/// unfused path's all-reduce, rows in the fused call) over `world` ranks: `sender x chunk_len x
/// item_bytes` (item `i` of the chunk at `+ i item_bytes`).
pub const fn receive_slot_offset(items: usize, item_bytes: usize, world: usize, sender: usize) -> usize {
    sender * chunk_len(items, world) * item_bytes
}

/// The largest row the kernels take, in bytes (`source::MAX_ROW_PACKS` packs).
pub const MAX_ROW_BYTES: usize = crate::source::MAX_ROW_PACKS * PACK_BYTES;

/// Bytes a receive area needs for 2-stage calls of up to `max_call_bytes` (a multiple of
/// `PACK_BYTES`) over `world` ranks: a slot of one chunk per rank, which rounding the chunk up to
/// whole packs (unfused all-reduce) or whole rows (fused) makes at most `world - 1` packs or rows
/// longer than the call.
pub const fn receive_area_bytes(max_call_bytes: usize, world: usize) -> usize {
    max_call_bytes + world.saturating_sub(1) * MAX_ROW_BYTES
}

/// What every cross-rank launch of epoch `e` writes into header slot `rank` of rotation
/// `e % PUSH_ROTATIONS` of every peer's push region, and checks against what each peer wrote into
/// its own: four 32-bit words, bit 31 clear in each (so none is [`PUSH_SENTINEL`]):
/// `[e, op | dtype << 4 | world << 8 | sender << 12 | epilogue << 16, rows, hidden]` (each masked
/// to 31 bits), `epilogue` the call's [`LaunchParams::epilogue`] bits under [`EPILOGUE_CALL_MASK`]:
/// so a rank calling with another epilogue (FP8 out, Gemma's norm, no residual) than its peer is a
/// mismatch on every path, also where the cross-rank kernel itself is the same (2-stage's
/// reduce-scatter, the unfused path's all-reduce). A refused call carries [`OP_CODE_REFUSED`] and
/// zeros for the shape and the epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallHeader(pub [u32; 4]);

impl CallHeader {
    const MASK: u64 = 0x7fff_ffff;

    /// The header of a launch of `op_code` (the index of the op in [`crate::Op::ALL`]) at `epoch`,
    /// sent by `params.rank`.
    pub fn new(epoch: u64, op_code: u64, dtype: crate::DType, params: &LaunchParams) -> Self {
        Self::from_sender(epoch, op_code, dtype, params, params.rank)
    }

    /// The header `sender` must have written for the same call (what a receiver compares with).
    pub fn from_sender(epoch: u64, op_code: u64, dtype: crate::DType, params: &LaunchParams, sender: u32) -> Self {
        let refused = params.flags & FLAG_REFUSED != 0;
        let op = if refused { u64::from(OP_CODE_REFUSED) } else { op_code & 0xf };
        let (rows, hidden) = if refused { (0, 0) } else { (u64::from(params.rows), u64::from(params.hidden)) };
        let epilogue = if refused { 0 } else { u64::from(params.epilogue & EPILOGUE_CALL_MASK) };
        let code = op
            | (dtype as u64 & 0xf) << 4
            | (u64::from(params.world_size) & 0xf) << 8
            | u64::from(sender) << 12
            | epilogue << EPILOGUE_CALL_SHIFT;
        CallHeader([
            (epoch & Self::MASK) as u32,
            (code & Self::MASK) as u32,
            (rows & Self::MASK) as u32,
            (hidden & Self::MASK) as u32,
        ])
    }

    /// Whether every word has arrived (none is still the sentinel).
    pub fn arrived(words: [u32; 4]) -> bool {
        !words.contains(&PUSH_SENTINEL)
    }
}

impl std::fmt::Display for CallHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [epoch, code, rows, hidden] = self.0;
        let op = code & 0xf;
        if op == OP_CODE_REFUSED {
            return write!(f, "call #{epoch} refused by rank {}", (code >> 12) & 0xf);
        }
        let op = crate::Op::ALL.get(op as usize).map(|op| op.stem()).unwrap_or("?");
        let dtype = crate::DType::ALL.get(((code >> 4) & 0xf) as usize).map(|d| d.name()).unwrap_or("?");
        write!(f, "call #{epoch} {op} {rows}x{hidden} {dtype} world {}", (code >> 8) & 0xf)?;
        let bits = (code >> EPILOGUE_CALL_SHIFT) & EPILOGUE_CALL_MASK;
        if bits != 0 {
            let e = epilogue_of(&LaunchParams { epilogue: bits, ..LaunchParams::default() });
            write!(f, " epilogue")?;
            if e.norm == Norm::GemmaOffset {
                write!(f, " gemma")?;
            }
            if e.no_residual {
                write!(f, " no-residual")?;
            }
            if let Some(q) = e.quant {
                write!(f, " fp8 {} {}", q.format.name(), q.scaling.name())?;
            }
        }
        Ok(())
    }
}

/// The error word a kernel leaves in its rank's signal area when it gives up:
/// bits 0..8 the kind (`KIND_*`), 8..16 the peer, 16..64 the low bits of the barrier value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorWord(pub u64);

impl ErrorWord {
    /// A spin on `peer`'s flag for barrier `barrier` ran past its deadline.
    pub const KIND_PEER_TIMEOUT: u64 = 1;
    /// `peer`'s [`CallHeader`] for the call at barrier value `barrier` differs from ours.
    pub const KIND_CALL_MISMATCH: u64 = 2;

    /// Encodes a call mismatch.
    pub fn call_mismatch(peer: u32, barrier: u64) -> Self {
        ErrorWord(Self::KIND_CALL_MISMATCH | (u64::from(peer & 0xff) << 8) | (barrier << 16))
    }

    /// Encodes a peer timeout.
    pub fn peer_timeout(peer: u32, barrier: u64) -> Self {
        ErrorWord(Self::KIND_PEER_TIMEOUT | (u64::from(peer & 0xff) << 8) | (barrier << 16))
    }
    /// The kind (0 = no error).
    pub fn kind(self) -> u64 {
        self.0 & 0xff
    }
    /// The peer that was awaited.
    pub fn peer(self) -> u32 {
        ((self.0 >> 8) & 0xff) as u32
    }
    /// The low 48 bits of the barrier value that was awaited.
    pub fn barrier(self) -> u64 {
        self.0 >> 16
    }

    /// The error this word reports for `rank` (whose launches waited up to `deadline`), or `None`
    /// for no error (kind 0) and kinds this build does not know. The one decoder of the word: the
    /// GPU backends' callers read it back from the signal area and ask here.
    pub fn to_error(self, rank: u32, deadline: std::time::Duration) -> Option<crate::Error> {
        self.to_error_with(rank, deadline, None)
    }

    /// [`to_error`](Self::to_error) with the two headers of a call mismatch, which it then
    /// describes on both sides: `[the header the peer sent, the header this rank sent]` (four words
    /// each, read from the push regions where they lie; all zeros: not known).
    pub fn to_error_with(
        self,
        rank: u32,
        deadline: std::time::Duration,
        mismatch: Option<[u32; 8]>,
    ) -> Option<crate::Error> {
        let (peer, barrier) = (self.peer(), self.barrier());
        // Headers re-armed since (a later call of this rank) or never written are not known.
        let known = |w: &[u32]| w.iter().any(|&w| w != 0) && CallHeader::arrived([w[0], w[1], w[2], w[3]]);
        let record = mismatch.filter(|r| known(&r[..4]) && known(&r[4..])).map(|r| {
            let header = |i: usize| CallHeader([r[i], r[i + 1], r[i + 2], r[i + 3]]);
            (header(4), header(0))
        });
        match self.kind() {
            Self::KIND_PEER_TIMEOUT => {
                Some(crate::Error::PeerTimeout { rank, peer, barrier, deadline_ms: deadline.as_millis() as u64 })
            }
            Self::KIND_CALL_MISMATCH => Some(match record {
                Some((expected, seen)) => crate::Error::CallMismatch {
                    rank,
                    peer,
                    ours: format!("{expected} (barrier {barrier})"),
                    theirs: seen.to_string(),
                },
                None => crate::Error::CallMismatch {
                    rank,
                    peer,
                    ours: format!("the call at barrier {barrier}"),
                    theirs: "a different call descriptor (epoch, op, dtype, world size, shape, epilogue)".into(),
                },
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// These numbers are repeated in `gpu/arfuse.h` (`static_assert`s there check the same).
    #[test]
    fn layout_matches_the_kernel_header() {
        assert_eq!(offset_of!(LaunchParams, receive), 0);
        assert_eq!(offset_of!(LaunchParams, scratch), 64);
        assert_eq!(offset_of!(LaunchParams, signals), 128);
        assert_eq!(offset_of!(LaunchParams, input), 192);
        assert_eq!(offset_of!(LaunchParams, barrier_base), 232);
        assert_eq!(offset_of!(LaunchParams, deadline_ns), 240);
        assert_eq!(offset_of!(LaunchParams, rows), 248);
        assert_eq!(offset_of!(LaunchParams, eps), 264);
        assert_eq!(offset_of!(LaunchParams, reserved1), 272);
        assert_eq!(offset_of!(LaunchParams, push), 280);
        assert_eq!(offset_of!(LaunchParams, push_slot_bytes), 344);
        assert_eq!(offset_of!(LaunchParams, flags), 348);
        assert_eq!(offset_of!(LaunchParams, out_q), 352);
        assert_eq!(offset_of!(LaunchParams, scales), 360);
        assert_eq!(offset_of!(LaunchParams, quant_scale), 368);
        assert_eq!(offset_of!(LaunchParams, epilogue), 372);
        assert_eq!(size_of::<LaunchParams>(), 384);
        assert_eq!(size_of::<LaunchParams>() % 16, 0);
    }

    #[test]
    fn epilogue_bits_round_trip() {
        let mut all = vec![Epilogue::default()];
        for norm in [Norm::Standard, Norm::GemmaOffset] {
            for no_residual in [false, true] {
                for format in Fp8Format::ALL {
                    for scaling in [Scaling::PerTensor(0.25), Scaling::PerToken, Scaling::PerGroup] {
                        all.push(Epilogue { norm, no_residual, quant: Some(Quant { format, scaling }) });
                    }
                }
                all.push(Epilogue { norm, no_residual, quant: None });
            }
        }
        for e in all {
            let (epilogue, quant_scale) = epilogue_bits(&e);
            assert_eq!(epilogue_of(&LaunchParams { epilogue, quant_scale, ..LaunchParams::default() }), e);
        }
        assert_eq!(epilogue_bits(&Epilogue::default()), (0, 0.0));
    }

    /// The header names the epilogue selection (and nothing of it for a refusal): calls that
    /// differ only in it differ in their headers, every word keeps bit 31 clear, and the
    /// description says which epilogue it was.
    #[test]
    fn call_headers_name_the_epilogue() {
        let base = LaunchParams { rows: 3, hidden: 4096, world_size: 8, rank: 7, ..LaunchParams::default() };
        let plain = CallHeader::new(u64::MAX, 1, crate::DType::F32, &base);
        let mut seen = vec![plain];
        for norm in [Norm::Standard, Norm::GemmaOffset] {
            for no_residual in [false, true] {
                for quant in [None, Some(Scaling::PerTensor(3.0)), Some(Scaling::PerToken), Some(Scaling::PerGroup)] {
                    for format in Fp8Format::ALL {
                        let e = Epilogue { norm, no_residual, quant: quant.map(|scaling| Quant { format, scaling }) };
                        let (epilogue, quant_scale) = epilogue_bits(&e);
                        let p = LaunchParams { epilogue, quant_scale, ..base };
                        let h = CallHeader::new(u64::MAX, 1, crate::DType::F32, &p);
                        assert!(h.0.iter().all(|w| w >> 31 == 0), "{e:?}: {h:x?}");
                        assert_eq!((h.0[1] >> EPILOGUE_CALL_SHIFT) & EPILOGUE_CALL_MASK, epilogue, "{e:?}");
                        assert_eq!(h.0[1] & 0xffff, plain.0[1], "{e:?}: op, dtype, world and sender unchanged");
                        // The static scale's value is not part of the call's description.
                        let other_scale = LaunchParams { quant_scale: quant_scale * 2.0, ..p };
                        assert_eq!(CallHeader::new(u64::MAX, 1, crate::DType::F32, &other_scale), h);
                        if !seen.contains(&h) {
                            seen.push(h);
                        }
                        let text = h.to_string();
                        assert_eq!(text.contains("gemma"), norm == Norm::GemmaOffset, "{text}");
                        assert_eq!(text.contains("no-residual"), no_residual, "{text}");
                        if quant.is_some() {
                            assert!(text.contains(format.name()), "{text}");
                        }
                        let refused = LaunchParams { flags: FLAG_REFUSED, ..p };
                        let r = CallHeader::new(5, 1, crate::DType::F32, &refused);
                        assert_eq!(
                            r,
                            CallHeader::new(5, 1, crate::DType::F32, &LaunchParams { flags: FLAG_REFUSED, ..base })
                        );
                    }
                }
            }
        }
        // 2 norms x 2 residuals x (unquantised + 2 formats x 3 scalings) distinct headers.
        assert_eq!(seen.len(), 2 * 2 * 7, "every epilogue its own header");
    }

    #[test]
    fn error_word_round_trips() {
        let w = ErrorWord::peer_timeout(5, 1234);
        assert_eq!((w.kind(), w.peer(), w.barrier()), (ErrorWord::KIND_PEER_TIMEOUT, 5, 1234));
    }

    #[test]
    fn every_error_word_decodes_to_its_error() {
        use crate::Error;
        let deadline = std::time::Duration::from_millis(2500);
        assert!(matches!(
            ErrorWord::peer_timeout(5, 1234).to_error(2, deadline),
            Some(Error::PeerTimeout { rank: 2, peer: 5, barrier: 1234, deadline_ms: 2500 })
        ));
        assert!(matches!(
            ErrorWord::call_mismatch(3, 8).to_error(1, deadline),
            Some(Error::CallMismatch { rank: 1, peer: 3, ref ours, .. }) if ours.contains("barrier 8")
        ));
        // With the mismatch record: both headers described.
        let p = LaunchParams { rows: 32, hidden: 8192, world_size: 4, ..LaunchParams::default() };
        let seen = CallHeader::from_sender(3, 10, crate::DType::Bf16, &p, 0);
        let expected = CallHeader::from_sender(6, 10, crate::DType::Bf16, &p, 0);
        let mut record = [0u32; 8];
        record[..4].copy_from_slice(&seen.0);
        record[4..].copy_from_slice(&expected.0);
        match ErrorWord::call_mismatch(0, 12).to_error_with(1, deadline, Some(record)) {
            Some(Error::CallMismatch { rank: 1, peer: 0, ours, theirs }) => {
                assert!(ours.starts_with("call #6 fused_ar_rmsnorm_2stage 32x8192 bf16 world 4"), "{ours}");
                assert!(theirs.starts_with("call #3 "), "{theirs}");
            }
            other => panic!("{other:?}"),
        }
        for unknown in [[0; 8], [PUSH_SENTINEL; 8]] {
            assert!(matches!(
                ErrorWord::call_mismatch(0, 12).to_error_with(1, deadline, Some(unknown)),
                Some(Error::CallMismatch { ref ours, .. }) if ours == "the call at barrier 12"
            ));
        }
        assert!(ErrorWord(0).to_error(0, deadline).is_none());
        assert!(ErrorWord(0x7f).to_error(0, deadline).is_none(), "a kind this build does not know");
    }
}

//! The rendezvous wire format: one frame per message, length-checked and versioned.
//!
//! `magic "ARFU" | version u16 | kind u16 | rank u16 | world u16 | round u32 | len u32 | payload`
//! (little-endian, 20-byte header). [`decode`] never panics on any input (a proptest feeds it
//! random bytes).

use crate::{Error, Result};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"ARFU";
/// Protocol version; a peer with another version is refused.
pub const VERSION: u16 = 1;
/// Header bytes.
pub const HEADER_LEN: usize = 20;
/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// A rank's contribution to a round (rank → hub). Round 0 is the hello, whose payload is the
    /// group token (see [`crate::unix`]).
    Contribute = 1,
    /// Every rank's contributions, concatenated with u32 lengths (hub → rank).
    Gathered = 2,
}

/// One decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The message kind.
    pub kind: Kind,
    /// The sender's rank (or, for [`Kind::Gathered`], the receiver's).
    pub rank: u16,
    /// The sender's world size.
    pub world: u16,
    /// The round the message belongs to.
    pub round: u32,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Encodes `frame`.
pub fn encode(frame: &Frame) -> Result<Vec<u8>> {
    if frame.payload.len() > MAX_PAYLOAD {
        return Err(Error::Invalid(format!("payload of {} bytes > {MAX_PAYLOAD}", frame.payload.len())));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + frame.payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(frame.kind as u16).to_le_bytes());
    out.extend_from_slice(&frame.rank.to_le_bytes());
    out.extend_from_slice(&frame.world.to_le_bytes());
    out.extend_from_slice(&frame.round.to_le_bytes());
    out.extend_from_slice(&(frame.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame.payload);
    Ok(out)
}

/// Decodes a header: returns the payload length still to read.
pub fn decode_header(header: &[u8]) -> Result<(Kind, u16, u16, u32, usize)> {
    if header.len() < HEADER_LEN {
        return Err(Error::Protocol(format!("truncated header ({} bytes)", header.len())));
    }
    let u16_at = |i: usize| u16::from_le_bytes([header[i], header[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    if header[..4] != MAGIC {
        return Err(Error::Protocol(format!("bad magic {:02x?} (not an arfuse peer)", &header[..4])));
    }
    let version = u16_at(4);
    if version != VERSION {
        return Err(Error::Mismatch {
            what: "protocol version",
            ours: VERSION.to_string(),
            theirs: version.to_string(),
        });
    }
    let kind = match u16_at(6) {
        1 => Kind::Contribute,
        2 => Kind::Gathered,
        other => return Err(Error::Protocol(format!("unknown message kind {other}"))),
    };
    let len = u32_at(16) as usize;
    if len > MAX_PAYLOAD {
        return Err(Error::Protocol(format!("payload of {len} bytes > {MAX_PAYLOAD}")));
    }
    Ok((kind, u16_at(8), u16_at(10), u32_at(12), len))
}

/// Decodes one whole frame (header and exactly its payload).
pub fn decode(bytes: &[u8]) -> Result<Frame> {
    let (kind, rank, world, round, len) = decode_header(bytes)?;
    let payload = &bytes[HEADER_LEN..];
    if payload.len() != len {
        return Err(Error::Protocol(format!("payload is {} bytes, header says {len}", payload.len())));
    }
    Ok(Frame { kind, rank, world, round, payload: payload.to_vec() })
}

/// Packs per-rank payloads (`u32` length + bytes each).
pub fn pack_all(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Unpacks exactly `world` payloads.
pub fn unpack_all(bytes: &[u8], world: usize) -> Result<Vec<Vec<u8>>> {
    let mut parts = Vec::with_capacity(world);
    let mut rest = bytes;
    for _ in 0..world {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(Error::Protocol("gathered payload truncated".into()));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(Error::Protocol("gathered payload truncated".into()));
        }
        parts.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    if !rest.is_empty() {
        return Err(Error::Protocol(format!("{} trailing bytes in gathered payload", rest.len())));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let _ = unpack_all(&bytes, 3);
        }

        #[test]
        fn frames_round_trip(rank in 0u16..8, world in 1u16..9, round in any::<u32>(),
                             payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let frame = Frame { kind: Kind::Contribute, rank, world, round, payload };
            let bytes = encode(&frame).expect("encode");
            prop_assert_eq!(decode(&bytes).expect("decode"), frame);
        }

        #[test]
        fn corrupted_headers_are_refused(index in 0usize..HEADER_LEN, flip in 1u8..=255) {
            let frame = Frame { kind: Kind::Gathered, rank: 1, world: 2, round: 7, payload: vec![1, 2, 3] };
            let mut bytes = encode(&frame).expect("encode");
            bytes[index] ^= flip;
            // Rank, world and round are data the hub validates; every other field must be refused,
            // except that a flip in the low byte of the kind may name another valid kind, which the
            // receiver then refuses as unexpected (it is never taken for the original frame).
            if !(8..16).contains(&index) {
                match decode(&bytes) {
                    Err(_) => {}
                    Ok(decoded) => prop_assert!(index == 6 && decoded.kind != frame.kind, "{decoded:?}"),
                }
            }
        }
    }

    #[test]
    fn wrong_version_and_oversize_are_named() {
        let mut bytes =
            encode(&Frame { kind: Kind::Contribute, rank: 0, world: 1, round: 0, payload: vec![] }).expect("encode");
        bytes[4] = 9;
        assert!(matches!(decode(&bytes), Err(Error::Mismatch { what: "protocol version", .. })));
        bytes[4] = 1;
        bytes[16..20].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(matches!(decode(&bytes), Err(Error::Protocol(_))));
    }
}

//! Pieces as gRPC messages: the `cluster.v1.Piece` protobuf in gRPC's length-prefixed framing,
//! written and read without copying the values.
//!
//! tonic's codec would copy every value twice more on each side (into an owned message, then
//! into its encode buffer; each HTTP/2 frame into its decode buffer), which on a CPU-bound
//! link cost a third of the time. Here an outgoing message is a small header followed by the
//! value buffers themselves, and an incoming message's values stay in the frames they came in.
//! The bytes are exactly what prost writes and reads for `v1::Piece` (tested both ways), so
//! the .proto file remains the contract.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

use crate::values::{Encoding, Values};
use crate::{Phase, Piece, Tag};

/// gRPC's message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// `piece` as the frames of one gRPC message: prefix and protobuf header, then the values'
/// own buffers.
pub fn encode(piece: &Piece) -> Vec<Bytes> {
    let data = piece.data.byte_len();
    let mut header = BytesMut::with_capacity(64);
    header.put_bytes(0, PREFIX);
    let tag = &piece.tag;
    let varint = |field: u32, value: u64, buf: &mut BytesMut| {
        // proto3 leaves fields at their default out, as prost does.
        if value != 0 {
            encode_key(field, WireType::Varint, buf);
            encode_varint(value, buf);
        }
    };
    varint(1, tag.step, &mut header);
    varint(2, phase_number(tag.phase), &mut header);
    varint(3, u64::from(tag.round), &mut header);
    varint(4, u64::from(tag.chunk), &mut header);
    varint(5, tag.offset, &mut header);
    varint(6, encoding_number(piece.data.encoding()), &mut header);
    if data > 0 {
        encode_key(7, WireType::LengthDelimited, &mut header);
        encode_varint(data as u64, &mut header);
    }
    let message = header.len() - PREFIX + data;
    // Pieces are a few MiB at most (the decoder enforces a limit far below 4 GiB).
    header[1..PREFIX].copy_from_slice(&(message as u32).to_be_bytes());
    let mut frames = Vec::with_capacity(1 + piece.data.segments().len());
    frames.push(header.freeze());
    frames.extend(piece.data.segments().iter().filter(|s| !s.is_empty()).cloned());
    frames
}

fn phase_number(phase: Phase) -> u64 {
    match phase {
        Phase::ReduceScatter => 0,
        Phase::AllGather => 1,
    }
}

fn encoding_number(encoding: Encoding) -> u64 {
    match encoding {
        Encoding::F32 => 0,
        Encoding::Bf16 => 1,
    }
}

/// Bytes queued in arrival order, read across segment boundaries without joining them.
#[derive(Default)]
struct Rope {
    segments: VecDeque<Bytes>,
    len: usize,
}

impl Rope {
    fn push(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.len += bytes.len();
            self.segments.push_back(bytes);
        }
    }

    /// The next `n` bytes as segments (each a view of the arrived buffers, no copy).
    fn split_segments(&mut self, mut n: usize) -> Vec<Bytes> {
        let mut out = Vec::new();
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
                break;
            };
            let piece = if front.len() <= n {
                self.segments.pop_front().unwrap_or_default()
            } else {
                front.split_to(n)
            };
            n -= piece.len();
            self.len -= piece.len();
            out.push(piece);
        }
        out
    }
}

impl Buf for Rope {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.segments.front().map(|s| s.as_ref()).unwrap_or(&[])
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.segments.front_mut() else {
                return;
            };
            if front.len() <= n {
                n -= front.len();
                self.len -= front.len();
                self.segments.pop_front();
            } else {
                front.advance(n);
                self.len -= n;
                n = 0;
            }
        }
    }
}

/// Splits a gRPC request body (HTTP/2 data frames, cut anywhere) into messages.
pub struct Deframer {
    rope: Rope,
    /// Length of the message whose prefix has been read.
    pending: Option<usize>,
    max_message: usize,
}

impl Deframer {
    /// A deframer refusing messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            rope: Rope::default(),
            pending: None,
            max_message,
        }
    }

    /// Queue a received frame.
    pub fn push(&mut self, frame: Bytes) {
        self.rope.push(frame);
    }

    /// Whether a message has started but not fully arrived.
    pub fn is_mid_message(&self) -> bool {
        self.pending.is_some() || self.rope.remaining() > 0
    }

    /// The next complete message's bytes, if it has all arrived.
    pub fn next_message(&mut self) -> Result<Option<Vec<Bytes>>, String> {
        let len = match self.pending {
            Some(len) => len,
            None => {
                if self.rope.remaining() < PREFIX {
                    return Ok(None);
                }
                let compressed = self.rope.get_u8();
                let len = self.rope.get_u32() as usize;
                if compressed != 0 {
                    return Err(format!(
                        "compressed message (flag {compressed}): ring pieces are sent uncompressed"
                    ));
                }
                if len > self.max_message {
                    return Err(format!(
                        "message of {len} bytes exceeds the {} byte limit",
                        self.max_message
                    ));
                }
                self.pending = Some(len);
                len
            }
        };
        if self.rope.remaining() < len {
            return Ok(None);
        }
        self.pending = None;
        Ok(Some(self.rope.split_segments(len)))
    }
}

/// A `v1::Piece` message from its bytes (as [`Deframer::next_message`] returns them), for
/// ring generation `generation` (which names the stream, not the message).
pub fn decode(generation: u64, message: Vec<Bytes>) -> Result<Piece, String> {
    let mut rope = Rope::default();
    for segment in message {
        rope.push(segment);
    }
    let malformed = |e: prost::DecodeError| format!("malformed piece: {e}");
    let (mut step, mut phase, mut round, mut chunk, mut offset, mut encoding) = (0, 0, 0, 0, 0, 0);
    let mut data = Vec::new();
    while rope.has_remaining() {
        let (field, wire_type) = decode_key(&mut rope).map_err(malformed)?;
        match (field, wire_type) {
            (7, WireType::LengthDelimited) => {
                let len = decode_varint(&mut rope).map_err(malformed)?;
                if len > rope.remaining() as u64 {
                    return Err(format!(
                        "malformed piece: {len} value bytes announced, {} left in the message",
                        rope.remaining()
                    ));
                }
                // A repeated field replaces the earlier one, as protobuf decoders do.
                data = rope.split_segments(len as usize);
            }
            (1..=6, WireType::Varint) => {
                let value = decode_varint(&mut rope).map_err(malformed)?;
                match field {
                    1 => step = value,
                    2 => phase = value,
                    3 => round = value,
                    4 => chunk = value,
                    5 => offset = value,
                    _ => encoding = value,
                }
            }
            (1..=7, other) => {
                return Err(format!("malformed piece: field {field} has wire type {other:?}"));
            }
            // Fields a newer sender added: skip them.
            (_, WireType::Varint) => {
                decode_varint(&mut rope).map_err(malformed)?;
            }
            (_, WireType::SixtyFourBit) => skip(&mut rope, 8)?,
            (_, WireType::ThirtyTwoBit) => skip(&mut rope, 4)?,
            (_, WireType::LengthDelimited) => {
                let len = decode_varint(&mut rope).map_err(malformed)?;
                skip(&mut rope, len)?;
            }
            (_, other) => return Err(format!("malformed piece: unsupported wire type {other:?}")),
        }
    }
    let phase = match phase {
        0 => Phase::ReduceScatter,
        1 => Phase::AllGather,
        other => return Err(format!("unknown collective phase {other}")),
    };
    let encoding = match encoding {
        0 => Encoding::F32,
        1 => Encoding::Bf16,
        other => return Err(format!("unknown value encoding {other}")),
    };
    let narrow = |what: &str, v: u64| u32::try_from(v).map_err(|_| format!("{what} {v} out of range"));
    Ok(Piece {
        tag: Tag {
            generation,
            step,
            phase,
            round: narrow("round", round)?,
            chunk: narrow("chunk", chunk)?,
            offset,
        },
        data: Values::from_wire(encoding, data)?,
    })
}

fn skip(rope: &mut Rope, n: u64) -> Result<(), String> {
    if n > rope.remaining() as u64 {
        return Err(format!(
            "malformed piece: a field of {n} bytes with {} left in the message",
            rope.remaining()
        ));
    }
    rope.advance(n as usize);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_proto::v1;
    use prost::Message;

    fn tag() -> Tag {
        Tag {
            generation: 7,
            step: 3,
            phase: Phase::AllGather,
            round: 1,
            chunk: 2,
            offset: 5,
        }
    }

    fn joined(frames: &[Bytes]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.to_vec()).collect()
    }

    /// Feed `bytes` to a deframer `cut` bytes at a time; every message it yields, decoded.
    fn deframe(bytes: &[u8], cut: usize) -> Vec<Piece> {
        let mut deframer = Deframer::new(1 << 20);
        let mut out = Vec::new();
        for frame in bytes.chunks(cut) {
            deframer.push(Bytes::copy_from_slice(frame));
            while let Some(message) = deframer.next_message().unwrap() {
                out.push(decode(7, message).unwrap());
            }
        }
        assert!(!deframer.is_mid_message());
        out
    }

    #[test]
    fn pieces_survive_framing_cut_at_any_byte() {
        let values = [1.5, -0.0, f32::MAX, 3.25e-20];
        let pieces = [
            Piece {
                tag: tag(),
                data: Values::encode(&values, Encoding::F32),
            },
            Piece {
                tag: Tag {
                    phase: Phase::ReduceScatter,
                    round: 0,
                    offset: 0,
                    ..tag()
                },
                data: Values::encode(&[], Encoding::F32),
            },
            Piece {
                tag: tag(),
                data: Values::encode(&values, Encoding::Bf16),
            },
        ];
        let stream: Vec<u8> = pieces.iter().flat_map(|p| joined(&encode(p))).collect();
        for cut in [1, 2, 3, 5, 7, 16, 1000] {
            let got = deframe(&stream, cut);
            assert_eq!(got.len(), 3, "cut {cut}");
            for (g, want) in got.iter().zip(&pieces) {
                assert_eq!(g.tag, want.tag, "cut {cut}");
                assert_eq!(g.data.to_vec(), want.data.to_vec(), "cut {cut}");
                assert_eq!(g.data.encoding(), want.data.encoding());
            }
        }
        assert!(deframe(&stream, 3)[0].data.to_vec()[1].is_sign_negative());
    }

    #[test]
    fn the_bytes_are_prosts_both_ways() {
        let piece = Piece {
            tag: tag(),
            data: Values::encode(&[0.5, -2.0, 8.25], Encoding::F32),
        };
        let bytes = joined(&encode(&piece));
        assert_eq!(bytes[0], 0);
        assert_eq!(
            u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize,
            bytes.len() - 5
        );
        let theirs = v1::Piece::decode(&bytes[5..]).unwrap();
        let expected = v1::Piece {
            step: 3,
            phase: 1,
            round: 1,
            chunk: 2,
            offset: 5,
            encoding: v1::Encoding::F32 as i32,
            data: Bytes::from(
                [0.5f32, -2.0, 8.25]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<_>>(),
            ),
        };
        assert_eq!(theirs, expected);
        assert_eq!(&bytes[5..], expected.encode_to_vec().as_slice());
        // And what prost writes (here with an unknown field appended, as a newer sender might
        // add one) reads back.
        let mut from_prost = expected.encode_to_vec();
        from_prost.extend_from_slice(&[0x40, 0x01, 0x4a, 0x02, 0xaa, 0xbb]);
        let decoded = decode(7, vec![Bytes::from(from_prost)]).unwrap();
        assert_eq!(decoded.tag, tag());
        assert_eq!(decoded.data.to_vec(), vec![0.5, -2.0, 8.25]);
    }

    #[test]
    fn malformed_messages_are_refused_with_the_reason() {
        let refusal = |bytes: &'static [u8]| {
            let mut deframer = Deframer::new(100);
            deframer.push(Bytes::from_static(bytes));
            deframer.next_message().unwrap_err()
        };
        assert!(refusal(&[1, 0, 0, 0, 4, 0, 0, 0, 0]).contains("compressed message"));
        assert!(refusal(&[0, 0, 0, 1, 0]).contains("256 bytes exceeds the 100 byte limit"));
        let mut deframer = Deframer::new(100);
        deframer.push(Bytes::from_static(&[0, 0, 0, 0, 9, 8]));
        assert_eq!(deframer.next_message().unwrap(), None);
        assert!(deframer.is_mid_message(), "a truncated message is noticed");

        let three_bytes = v1::Piece {
            data: Bytes::from_static(&[1, 2, 3]),
            ..Default::default()
        };
        let err = decode(0, vec![Bytes::from(three_bytes.encode_to_vec())]).unwrap_err();
        assert!(
            err.contains("3 bytes is not a whole number of F32 values"),
            "{err}"
        );
        let bad_phase = v1::Piece {
            phase: 9,
            ..Default::default()
        };
        let err = decode(0, vec![Bytes::from(bad_phase.encode_to_vec())]).unwrap_err();
        assert!(err.contains("phase 9"), "{err}");
        // Field 7 announcing more bytes than the message holds.
        let err = decode(0, vec![Bytes::from_static(&[0x3a, 0x08, 1, 2])]).unwrap_err();
        assert!(err.contains("8 value bytes announced, 2 left"), "{err}");
        // Field 1 (step) sent as bytes.
        let err = decode(0, vec![Bytes::from_static(&[0x0a, 0x00])]).unwrap_err();
        assert!(err.contains("field 1 has wire type LengthDelimited"), "{err}");
    }
}

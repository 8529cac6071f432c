//! Ring all-reduce: the bandwidth-optimal collective (reduce-scatter, then all-gather) over
//! any pair of message links to a rank's ring neighbours.
//!
//! Each of the `n` ranks sends `2(n-1)/n` of the buffer in total. Every chunk's sum is formed
//! once, by one rank, along a fixed ring order, and then copied: the result is bit-identical on
//! every rank. Messages carry the ring generation, the training step, the phase, the round and
//! the chunk; anything that does not match what is expected next is rejected, never summed. A
//! peer that goes silent fails the collective after the configured timeout instead of hanging.

pub mod bench;
pub mod grpc;
pub mod local;

use std::future::Future;
use std::ops::Range;
use std::time::Duration;

/// Result alias for the collective crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in a collective.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The previous rank sent nothing for too long.
    #[error("rank {rank}: no data from rank {peer} for {waited:?} during {what}; is it alive?")]
    Timeout {
        /// This rank.
        rank: usize,
        /// The silent neighbour.
        peer: usize,
        /// How long it waited.
        waited: Duration,
        /// Which part of the collective.
        what: String,
    },
    /// A message arrived that does not belong here (another generation, step or position).
    #[error("rank {rank}: rejected a message from rank {peer}: expected {expected}, got {got}")]
    Mismatch {
        /// This rank.
        rank: usize,
        /// The sender.
        peer: usize,
        /// The tag expected.
        expected: String,
        /// The tag received.
        got: String,
    },
    /// A link failed (the peer closed it or the transport broke).
    #[error("rank {rank}: link to rank {peer} failed: {reason}")]
    Link {
        /// This rank.
        rank: usize,
        /// The neighbour.
        peer: usize,
        /// The transport's words.
        reason: String,
    },
}

/// The two halves of a collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Partial sums travel around the ring.
    ReduceScatter,
    /// Finished chunks travel around the ring.
    AllGather,
}

/// Identifies a message within all collectives of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// Ring generation: bumped whenever membership changes.
    pub generation: u64,
    /// Training step (or any caller-chosen sequence number).
    pub step: u64,
    /// Phase of the collective.
    pub phase: Phase,
    /// Round within the phase (0..n-1).
    pub round: u32,
    /// Chunk index (0..n).
    pub chunk: u32,
    /// Offset of this piece inside the chunk, in elements.
    pub offset: u64,
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "generation {} step {} {:?} round {} chunk {} offset {}",
            self.generation, self.step, self.phase, self.round, self.chunk, self.offset
        )
    }
}

/// One message: a tagged piece of a chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Where it belongs.
    pub tag: Tag,
    /// The values.
    pub data: Values,
}

/// The values of a piece: plain, or still in their wire encoding (decoded while they are
/// added or copied into place, which saves a pass over the data and an allocation).
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// Plain values.
    F32(Vec<f32>),
    /// Little-endian f32 bytes.
    LeF32(bytes::Bytes),
    /// Little-endian bfloat16 bytes.
    LeBf16(bytes::Bytes),
}

impl Values {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::LeF32(b) => b.len() / 4,
            Values::LeBf16(b) => b.len() / 2,
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.apply(&mut out, Phase::AllGather);
        out
    }

    /// Add (reduce-scatter) or copy (all-gather) the values into `dst` (same length).
    fn apply(&self, dst: &mut [f32], phase: Phase) {
        match self {
            Values::F32(v) => apply(dst, v, phase),
            Values::LeF32(bytes) => match le_f32_slice(bytes) {
                Some(v) => apply(dst, v, phase),
                None if cfg!(target_endian = "little") => match phase {
                    // Unaligned wire bytes: one memcpy into place (or into an aligned scratch
                    // buffer to add from) is much faster than converting value by value.
                    Phase::AllGather => bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(bytes),
                    Phase::ReduceScatter => {
                        let mut scratch = vec![0f32; dst.len()];
                        bytemuck::cast_slice_mut::<f32, u8>(&mut scratch).copy_from_slice(bytes);
                        apply(dst, &scratch, phase);
                    }
                },
                None => {
                    let decode = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    match phase {
                        Phase::ReduceScatter => dst
                            .iter_mut()
                            .zip(bytes.chunks_exact(4))
                            .for_each(|(d, b)| *d += decode(b)),
                        Phase::AllGather => dst
                            .iter_mut()
                            .zip(bytes.chunks_exact(4))
                            .for_each(|(d, b)| *d = decode(b)),
                    }
                }
            },
            Values::LeBf16(bytes) => {
                let decode = |b: &[u8]| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                match phase {
                    Phase::ReduceScatter => dst
                        .iter_mut()
                        .zip(bytes.chunks_exact(2))
                        .for_each(|(d, b)| *d += decode(b)),
                    Phase::AllGather => dst
                        .iter_mut()
                        .zip(bytes.chunks_exact(2))
                        .for_each(|(d, b)| *d = decode(b)),
                }
            }
        }
    }
}

/// Little-endian f32 bytes viewed in place, when this machine is little-endian and the
/// bytes happen to be aligned.
fn le_f32_slice(bytes: &[u8]) -> Option<&[f32]> {
    if cfg!(target_endian = "little") {
        bytemuck::try_cast_slice(bytes).ok()
    } else {
        None
    }
}

/// A one-way link to a neighbour: the transport (gRPC streams between workers, channels in
/// tests) implements it.
pub trait Link: Send {
    /// Send a piece (`tag` and values) to the neighbour. The values are borrowed: a network
    /// link encodes them straight from the caller's buffer.
    fn send(
        &mut self,
        tag: Tag,
        data: &[f32],
    ) -> impl Future<Output = std::result::Result<(), String>> + Send;
    /// Receive the next piece from the neighbour; an error says why the link ended (the
    /// peer closed it, the connection broke).
    fn recv(&mut self) -> impl Future<Output = std::result::Result<Piece, String>> + Send;
}

/// Parameters of one rank's participation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    /// Number of ranks.
    pub world: usize,
    /// This rank.
    pub rank: usize,
    /// Ring generation (see [`Tag::generation`]).
    pub generation: u64,
    /// Largest piece sent in one message, in elements: large chunks pipeline.
    pub max_piece: usize,
    /// How long to wait for the previous rank before failing.
    pub timeout: Duration,
    /// Send values as bfloat16 (half the bytes). Every value that crosses the wire is rounded
    /// to bf16 first, the owner's copy of each finished chunk too, so ranks still agree
    /// bit for bit.
    pub bf16: bool,
}

impl Ring {
    /// A ring with 64 Ki-float (256 KiB) pieces, small enough to pipeline encoding, the
    /// network and summing (measured best of 32 KiB..4 MiB on loopback), and a 10 s timeout.
    pub fn new(world: usize, rank: usize, generation: u64) -> Self {
        Self {
            world,
            rank,
            generation,
            max_piece: 1 << 16,
            timeout: Duration::from_secs(10),
            bf16: false,
        }
    }

    fn next(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }
}

/// Element range of chunk `c` of `n` over `len` elements (sizes differ by at most one).
pub fn chunk_range(len: usize, n: usize, c: usize) -> Range<usize> {
    let base = len / n;
    let extra = len % n;
    let start = c * base + c.min(extra);
    start..start + base + usize::from(c < extra)
}

/// Sum `buf` over all ranks in place, then divide by the world size when `average`. `next`
/// sends to rank+1, `prev` receives from rank-1.
pub async fn all_reduce<N: Link, P: Link>(
    ring: &Ring,
    step: u64,
    buf: &mut [f32],
    average: bool,
    next: &mut N,
    prev: &mut P,
) -> Result<()> {
    let n = ring.world;
    if n == 1 {
        return Ok(());
    }
    let m = n as u32;
    let r = ring.rank as u32;
    for round in 0..m - 1 {
        let send_chunk = (r + m - round) % m;
        let recv_chunk = (r + m - round - 1) % m;
        let chunks = (send_chunk, recv_chunk);
        exchange(ring, step, Phase::ReduceScatter, round, chunks, buf, next, prev).await?;
    }
    // This rank now owns the complete sum of chunk r+1.
    let owned = chunk_range(buf.len(), n, ((r + 1) % m) as usize);
    finish_owned(
        &mut buf[owned],
        if average { 1.0 / n as f32 } else { 1.0 },
        ring.bf16,
    );
    for round in 0..m - 1 {
        let send_chunk = (r + 1 + m - round) % m;
        let recv_chunk = (r + m - round) % m;
        let chunks = (send_chunk, recv_chunk);
        exchange(ring, step, Phase::AllGather, round, chunks, buf, next, prev).await?;
    }
    Ok(())
}

/// Payload bytes rank `ring.rank` sends in one [`all_reduce`] of `len` values: every chunk it
/// forwards in both halves, at 4 bytes a value (2 with bf16). Framing is not counted.
pub fn bytes_sent(ring: &Ring, len: usize) -> u64 {
    let n = ring.world;
    if n <= 1 {
        return 0;
    }
    let width: u64 = if ring.bf16 { 2 } else { 4 };
    let r = ring.rank;
    let values: usize = (0..n - 1)
        .map(|round| {
            let scatter = (r + n - round) % n;
            let gather = (r + 1 + n - round) % n;
            chunk_range(len, n, scatter).len() + chunk_range(len, n, gather).len()
        })
        .sum();
    values as u64 * width
}

// The element loops below are plain functions, not generic ones: they are compiled (and
// optimised) in this crate rather than in each caller's.

/// Scale the owned chunk and round it as the wire will.
fn finish_owned(chunk: &mut [f32], scale: f32, bf16: bool) {
    if scale != 1.0 {
        chunk.iter_mut().for_each(|v| *v *= scale);
    }
    if bf16 {
        chunk.iter_mut().for_each(|v| *v = round_bf16(*v));
    }
}

/// `values` as the wire carries them: rounded to bf16 when `bf16`, untouched otherwise.
fn wire_values(values: &[f32], bf16: bool) -> Option<Vec<f32>> {
    bf16.then(|| values.iter().map(|&v| round_bf16(v)).collect())
}

/// Split `buf` into the chunk to send (read) and the chunk to receive into (written); they
/// are different chunks of the same buffer.
fn split_chunks(buf: &mut [f32], out: Range<usize>, into: Range<usize>) -> (&[f32], &mut [f32]) {
    if out.start < into.start {
        let (low, high) = buf.split_at_mut(into.start);
        (&low[out], &mut high[..into.len()])
    } else {
        let (low, high) = buf.split_at_mut(out.start);
        (&high[..out.len()], &mut low[into])
    }
}

/// Add (reduce-scatter) or copy (all-gather) an arrived piece into place.
fn apply(dst: &mut [f32], src: &[f32], phase: Phase) {
    match phase {
        Phase::ReduceScatter => dst.iter_mut().zip(src).for_each(|(d, s)| *d += s),
        Phase::AllGather => dst.copy_from_slice(src),
    }
}

/// Send chunk `chunks.0` to the next rank while receiving chunk `chunks.1` from the previous
/// one, adding or copying each piece into `buf` as it arrives (so the arithmetic overlaps
/// the transfer). A piece that is not exactly the one expected next is rejected before it
/// touches `buf`.
#[allow(clippy::too_many_arguments)]
async fn exchange<N: Link, P: Link>(
    ring: &Ring,
    step: u64,
    phase: Phase,
    round: u32,
    chunks: (u32, u32),
    buf: &mut [f32],
    next: &mut N,
    prev: &mut P,
) -> Result<()> {
    let (send_chunk, recv_chunk) = chunks;
    let n = ring.world;
    let tag = |chunk: u32, offset: u64| Tag {
        generation: ring.generation,
        step,
        phase,
        round,
        chunk,
        offset,
    };
    let out_range = chunk_range(buf.len(), n, send_chunk as usize);
    let in_range = chunk_range(buf.len(), n, recv_chunk as usize);
    let (out, dst) = split_chunks(buf, out_range, in_range);
    let rounded = wire_values(out, ring.bf16);
    let out = rounded.as_deref().unwrap_or(out);
    let max_piece = ring.max_piece.max(1);
    let send = async {
        // An empty chunk (fewer elements than ranks) still sends one empty piece, so that
        // every round carries at least one message.
        let mut offset = 0;
        loop {
            let len = (out.len() - offset).min(max_piece);
            next.send(tag(send_chunk, offset as u64), &out[offset..offset + len])
                .await
                .map_err(|reason| Error::Link {
                    rank: ring.rank,
                    peer: ring.next(),
                    reason,
                })?;
            offset += len;
            if offset == out.len() {
                break;
            }
        }
        Ok::<_, Error>(())
    };
    let want = dst.len();
    let recv = async {
        let mut filled = 0;
        loop {
            let expected = tag(recv_chunk, filled as u64);
            let piece = tokio::time::timeout(ring.timeout, prev.recv())
                .await
                .map_err(|_| Error::Timeout {
                    rank: ring.rank,
                    peer: ring.prev(),
                    waited: ring.timeout,
                    what: format!("{expected}"),
                })?
                .map_err(|reason| Error::Link {
                    rank: ring.rank,
                    peer: ring.prev(),
                    reason,
                })?;
            let len = piece.data.len();
            if piece.tag != expected || filled + len > want {
                return Err(Error::Mismatch {
                    rank: ring.rank,
                    peer: ring.prev(),
                    expected: expected.to_string(),
                    got: format!("{} with {len} values", piece.tag),
                });
            }
            piece.data.apply(&mut dst[filled..filled + len], phase);
            filled += len;
            if filled == want {
                break;
            }
        }
        Ok::<_, Error>(())
    };
    let (sent, received) = tokio::join!(send, recv);
    sent?;
    received
}

/// Round to the nearest bfloat16 (ties to even), returned as f32: the value a bf16 wire
/// carries exactly.
pub fn round_bf16(v: f32) -> f32 {
    f32::from_bits(u32::from(to_bf16_bits(v)) << 16)
}

/// The bfloat16 bit pattern nearest to `v` (ties to even); NaN stays NaN.
pub fn to_bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

#[cfg(test)]
mod tests;

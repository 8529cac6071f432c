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
    pub data: Vec<f32>,
}

/// A one-way link to a neighbour: the transport (gRPC streams between workers, channels in
/// tests) implements it.
pub trait Link: Send {
    /// Send a piece to the neighbour.
    fn send(&mut self, piece: Piece) -> impl Future<Output = std::result::Result<(), String>> + Send;
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
    /// A ring with 1M-float (4 MiB) pieces and a 10 s timeout.
    pub fn new(world: usize, rank: usize, generation: u64) -> Self {
        Self {
            world,
            rank,
            generation,
            max_piece: 1 << 20,
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
        let incoming = exchange(
            ring,
            step,
            Phase::ReduceScatter,
            round,
            send_chunk,
            recv_chunk,
            buf,
            next,
            prev,
        )
        .await?;
        let range = chunk_range(buf.len(), n, recv_chunk as usize);
        for (dst, src) in buf[range].iter_mut().zip(incoming) {
            *dst += src;
        }
    }
    // This rank now owns the complete sum of chunk r+1.
    let owned = chunk_range(buf.len(), n, ((r + 1) % m) as usize);
    if average {
        let scale = 1.0 / n as f32;
        buf[owned.clone()].iter_mut().for_each(|v| *v *= scale);
    }
    if ring.bf16 {
        buf[owned].iter_mut().for_each(|v| *v = round_bf16(*v));
    }
    for round in 0..m - 1 {
        let send_chunk = (r + 1 + m - round) % m;
        let recv_chunk = (r + m - round) % m;
        let incoming = exchange(
            ring,
            step,
            Phase::AllGather,
            round,
            send_chunk,
            recv_chunk,
            buf,
            next,
            prev,
        )
        .await?;
        let range = chunk_range(buf.len(), n, recv_chunk as usize);
        buf[range].copy_from_slice(&incoming);
    }
    Ok(())
}

/// Send chunk `send_chunk` to the next rank while receiving chunk `recv_chunk` from the
/// previous one.
#[allow(clippy::too_many_arguments)]
async fn exchange<N: Link, P: Link>(
    ring: &Ring,
    step: u64,
    phase: Phase,
    round: u32,
    send_chunk: u32,
    recv_chunk: u32,
    buf: &[f32],
    next: &mut N,
    prev: &mut P,
) -> Result<Vec<f32>> {
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
    let max_piece = ring.max_piece.max(1);
    let mut outgoing: Vec<Piece> = buf[out_range]
        .chunks(max_piece)
        .enumerate()
        .map(|(i, piece)| Piece {
            tag: tag(send_chunk, (i * max_piece) as u64),
            data: if ring.bf16 {
                piece.iter().map(|&v| round_bf16(v)).collect()
            } else {
                piece.to_vec()
            },
        })
        .collect();
    if outgoing.is_empty() {
        // An empty chunk (fewer elements than ranks) still sends one empty piece, so that
        // every round is acknowledged by exactly one message at least.
        outgoing.push(Piece {
            tag: tag(send_chunk, 0),
            data: Vec::new(),
        });
    }
    let send = async {
        for piece in outgoing {
            next.send(piece).await.map_err(|reason| Error::Link {
                rank: ring.rank,
                peer: ring.next(),
                reason,
            })?;
        }
        Ok::<_, Error>(())
    };
    let want = chunk_range(buf.len(), n, recv_chunk as usize).len();
    let recv = async {
        let mut incoming = Vec::with_capacity(want);
        loop {
            let expected = tag(recv_chunk, incoming.len() as u64);
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
            if piece.tag != expected || incoming.len() + piece.data.len() > want {
                return Err(Error::Mismatch {
                    rank: ring.rank,
                    peer: ring.prev(),
                    expected: expected.to_string(),
                    got: format!("{} with {} values", piece.tag, piece.data.len()),
                });
            }
            incoming.extend(piece.data);
            if incoming.len() == want {
                break;
            }
        }
        Ok::<_, Error>(incoming)
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

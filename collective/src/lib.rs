//! Ring all-reduce: the bandwidth-optimal collective (reduce-scatter, then all-gather) over
//! any pair of message links to a rank's ring neighbours.
//!
//! Each of the `n` ranks sends `2(n-1)/n` of the buffer in total. Every chunk's sum is formed
//! once, by one rank, along a fixed ring order, and then copied: the result is bit-identical on
//! every rank. Messages carry the ring generation, the training step, the phase, the round and
//! the chunk; anything that does not match what is expected next is rejected, never summed. A
//! peer that goes silent fails the collective after the configured timeout instead of hanging.
//!
//! | Where | What |
//! |---|---|
//! | here | [`all_reduce`]: the ring reduce-scatter and all-gather, pieces streamed |
//! | [`broadcast`] | rank 0's values or bytes on every rank, exactly; [`Seq`], what each collective is for |
//! | [`grpc`] | the peer transport between workers (streams of pieces) |
//! | [`local`] | in-process links for tests and benchmarks |
//! | [`values`], [`wire`] | values on the wire (f32 or bf16) and their encoding |
//! | [`bench`] | the bandwidth benchmark (`coordinator start --job allreduce-bench`) |

pub mod bench;
pub mod broadcast;
pub mod grpc;
pub mod local;
pub mod values;
pub mod wire;

pub use broadcast::{Seq, bytes_from_rank0, from_rank0};
pub use values::{Encoding, Values};

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
    /// The values, in their wire encoding.
    pub data: Values,
}

/// A one-way link to a neighbour: the transport (gRPC streams between workers, channels in
/// tests) implements it.
pub trait Link: Send {
    /// Send a piece to the neighbour. A network link sends the values' buffers as they are.
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
///
/// The rounds are not run one after another: each arriving piece is handled as soon as it
/// arrives and what it yields goes straight out again, so every piece streams around the
/// ring on its own and the rounds overlap (a piece's later rounds can only follow its
/// earlier ones, so the result does not depend on the interleaving). In the reduce-scatter
/// a partial sum is written once, into the buffer that is sent on (never into `buf`); the
/// finished sum goes into `buf` and out; in the all-gather an arrived piece is copied into
/// `buf` and forwarded in the buffers it arrived in.
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
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Piece>();
    // The queue to the next rank is unbounded on purpose: every arriving piece yields at most
    // one to send, so it never holds more than this rank's share of `buf`, and a rank that
    // could not queue would stop reading, which around a ring can deadlock.
    let send = async move {
        while let Some(piece) = out_rx.recv().await {
            next.send(piece).await.map_err(|reason| Error::Link {
                rank: ring.rank,
                peer: ring.next(),
                reason,
            })?;
        }
        Ok::<_, Error>(())
    };
    let work = stream_rounds(ring, step, buf, average, out_tx, prev);
    tokio::try_join!(send, work)?;
    Ok(())
}

/// The pieces a rank receives come in `2(n-1)` streams, one per phase and round, each
/// covering one chunk in order. Round `k` of the reduce-scatter brings the partial sum of
/// chunk `rank-k-1`, round `k` of the all-gather the finished chunk `rank-k`.
struct Rounds {
    n: usize,
    rank: usize,
    len: usize,
    /// Values received so far in each stream (reduce-scatter rounds first).
    filled: Vec<usize>,
    /// Whether each stream is complete (an empty chunk completes with one empty piece).
    done: Vec<bool>,
}

impl Rounds {
    fn new(n: usize, rank: usize, len: usize) -> Self {
        Self {
            n,
            rank,
            len,
            filled: vec![0; 2 * (n - 1)],
            done: vec![false; 2 * (n - 1)],
        }
    }

    fn index(&self, phase: Phase, round: u32) -> usize {
        match phase {
            Phase::ReduceScatter => round as usize,
            Phase::AllGather => self.n - 1 + round as usize,
        }
    }

    fn chunk(&self, phase: Phase, round: u32) -> usize {
        let back = match phase {
            Phase::ReduceScatter => round as usize + 1,
            Phase::AllGather => round as usize,
        };
        (self.rank + self.n - back) % self.n
    }

    /// The next tag expected in the stream of `phase` and `round` (rounds past the last are
    /// shown as the last: a message for them is refused either way).
    fn expected(&self, generation: u64, step: u64, phase: Phase, round: u32) -> Tag {
        let round = round.min(self.n as u32 - 2);
        let chunk = self.chunk(phase, round);
        Tag {
            generation,
            step,
            phase,
            round,
            chunk: chunk as u32,
            offset: self.filled[self.index(phase, round)] as u64,
        }
    }

    /// The first incomplete stream's next tag (what a timeout names).
    fn next_missing(&self, generation: u64, step: u64) -> Option<Tag> {
        let at = self.done.iter().position(|d| !d)?;
        let (phase, round) = if at < self.n - 1 {
            (Phase::ReduceScatter, at as u32)
        } else {
            (Phase::AllGather, (at - (self.n - 1)) as u32)
        };
        Some(self.expected(generation, step, phase, round))
    }
}

/// How many of its own pieces a rank may have sent beyond the number it has received. Each
/// arriving piece lets one more go, so the ring carries a few pieces per link instead of
/// whole chunks: what is summed or copied is still in cache from the socket, and the
/// HTTP/2 window never fills. 16 pieces (4 MiB) kept this machine's loopback links busy.
const LOOKAHEAD: usize = 16;

/// Receive every piece this rank expects and queue what each yields, sending this rank's
/// own chunk as the arrivals allow.
async fn stream_rounds<P: Link>(
    ring: &Ring,
    step: u64,
    buf: &mut [f32],
    average: bool,
    out: tokio::sync::mpsc::UnboundedSender<Piece>,
    prev: &mut P,
) -> Result<()> {
    let n = ring.world;
    let encoding = if ring.bf16 { Encoding::Bf16 } else { Encoding::F32 };
    let scale = if average { 1.0 / n as f32 } else { 1.0 };
    let tag = |phase: Phase, round: u32, chunk: usize, offset: usize| Tag {
        generation: ring.generation,
        step,
        phase,
        round,
        chunk: chunk as u32,
        offset: offset as u64,
    };
    let queue = |piece: Piece| {
        // The sending half only ends early when it failed, and then try_join has already
        // dropped this future with that error.
        let _ = out.send(piece);
    };
    let max_piece = ring.max_piece.max(1);
    let own = chunk_range(buf.len(), n, ring.rank);
    // An empty chunk (fewer elements than ranks) still sends one empty piece: every round
    // carries a message.
    let own_pieces = own.len().div_ceil(max_piece).max(1);
    let (mut sent_own, mut received) = (0, 0);
    let last = n as u32 - 2;
    let mut rounds = Rounds::new(n, ring.rank, buf.len());
    while let Some(next) = rounds.next_missing(ring.generation, step) {
        while sent_own < own_pieces && sent_own < received + LOOKAHEAD {
            let offset = sent_own * max_piece;
            let len = (own.len() - offset).min(max_piece);
            let at = own.start + offset;
            queue(Piece {
                tag: tag(Phase::ReduceScatter, 0, ring.rank, offset),
                data: Values::encode(&buf[at..at + len], encoding),
            });
            sent_own += 1;
        }
        let piece = receive(ring, prev, &next).await?;
        received += 1;
        let Tag { phase, round, .. } = piece.tag;
        let expected = rounds.expected(ring.generation, step, phase, round);
        let stream = rounds.index(phase, expected.round);
        let range = chunk_range(rounds.len, n, expected.chunk as usize);
        let filled = rounds.filled[stream];
        let (len, want) = (piece.data.len(), range.len() - filled);
        if piece.tag != expected || rounds.done[stream] || len > want || (len == 0 && want > 0) {
            return Err(Error::Mismatch {
                rank: ring.rank,
                peer: ring.prev(),
                expected: format!("{expected} with at most {want} values"),
                got: format!("{} with {len} values", piece.tag),
            });
        }
        let chunk = expected.chunk as usize;
        let at = range.start + filled;
        let mine = &mut buf[at..at + len];
        match phase {
            // A partial sum: add this rank's values and send it on.
            Phase::ReduceScatter if round < last => queue(Piece {
                tag: tag(phase, round + 1, chunk, filled),
                data: piece.data.plus(mine, encoding),
            }),
            // The last partial sum of the chunk this rank owns: finish it, keep it, send it.
            Phase::ReduceScatter => {
                piece.data.add_into(mine);
                finish_owned(mine, scale, ring.bf16);
                queue(Piece {
                    tag: tag(Phase::AllGather, 0, chunk, filled),
                    data: Values::encode(mine, encoding),
                });
            }
            // A finished piece: keep it, and send it on unless this is the last round.
            Phase::AllGather => {
                piece.data.copy_into(mine);
                if round < last {
                    queue(Piece {
                        tag: tag(phase, round + 1, chunk, filled),
                        data: piece.data,
                    });
                }
            }
        }
        rounds.filled[stream] += len;
        rounds.done[stream] = rounds.filled[stream] == range.len();
    }
    Ok(())
}

/// The next piece from the previous rank, or why none came.
async fn receive<P: Link>(ring: &Ring, prev: &mut P, expected: &Tag) -> Result<Piece> {
    tokio::time::timeout(ring.timeout, prev.recv())
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
        })
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

/// Scale the owned chunk and round it as the wire will (a plain function: compiled and
/// optimised in this crate rather than in each caller's).
fn finish_owned(chunk: &mut [f32], scale: f32, bf16: bool) {
    if scale != 1.0 {
        chunk.iter_mut().for_each(|v| *v *= scale);
    }
    if bf16 {
        chunk.iter_mut().for_each(|v| *v = round_bf16(*v));
    }
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

//! Rank 0's values on every rank, over the same ring as the all-reduce: the others add zeros,
//! and a sum with zeros is exact in floating point. These travel as f32 whatever the ring's
//! bf16 setting (rank 0's weights and state must arrive as they are), chosen per call; and
//! every collective of a run is named by a [`Seq`], so no two can be taken for each other.

use crate::{Link, Result, Ring, all_reduce};

/// What a collective is for: the sequence number its messages are tagged with (the `step`
/// of a [`Tag`](crate::Tag)). Training steps count up from 0; rank 0's broadcasts take the
/// top half of the range, apart from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seq {
    /// The gradient all-reduce of training step `n` (below 2^63).
    Step(u64),
    /// Rank 0's weights when a run starts.
    Weights,
    /// Rank 0's BatchNorm running statistics after epoch `n` (counted across phases).
    EpochStats(u64),
    /// Rank 0's training state for workers that join at step `n`: two numbers, the length
    /// and then the bytes.
    State(u64),
}

impl Seq {
    /// The number messages carry.
    pub fn number(self) -> u64 {
        match self {
            Seq::Step(n) => n,
            Seq::Weights => u64::MAX,
            Seq::EpochStats(epoch) => u64::MAX - 1 - epoch,
            Seq::State(step) => (1 << 63) | (step << 1),
        }
    }
}

/// Make `buf` rank 0's on every rank of `ring`, exactly: elsewhere its contents are replaced
/// (its length must be rank 0's).
pub async fn from_rank0<N: Link, P: Link>(
    ring: &Ring,
    seq: Seq,
    buf: &mut [f32],
    next: &mut N,
    prev: &mut P,
) -> Result<()> {
    exact_from_rank0(ring, seq.number(), buf, next, prev).await
}

/// Rank 0's `bytes` (`None` on the other ranks) on every rank: the length, then the bytes two
/// to a float (whole numbers below 2^16 survive the sum with the other ranks' zeros exactly).
pub async fn bytes_from_rank0<N: Link, P: Link>(
    ring: &Ring,
    seq: Seq,
    bytes: Option<Vec<u8>>,
    next: &mut N,
    prev: &mut P,
) -> Result<Vec<u8>> {
    let number = seq.number();
    let len = bytes.as_ref().map_or(0, Vec::len) as u64;
    let mut header: Vec<f32> = (0..4).map(|i| ((len >> (16 * i)) & 0xffff) as f32).collect();
    exact_from_rank0(ring, number, &mut header, next, prev).await?;
    let len = header
        .iter()
        .enumerate()
        .map(|(i, v)| (*v as u64) << (16 * i))
        .sum::<u64>() as usize;
    let mut values: Vec<f32> = match &bytes {
        Some(b) => b
            .chunks(2)
            .map(|c| f32::from(u16::from_le_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
            .collect(),
        None => vec![0.0; len.div_ceil(2)],
    };
    exact_from_rank0(ring, number + 1, &mut values, next, prev).await?;
    let mut out = Vec::with_capacity(len + 1);
    for v in values {
        out.extend_from_slice(&(v as u16).to_le_bytes());
    }
    out.truncate(len);
    Ok(out)
}

async fn exact_from_rank0<N: Link, P: Link>(
    ring: &Ring,
    number: u64,
    buf: &mut [f32],
    next: &mut N,
    prev: &mut P,
) -> Result<()> {
    if ring.rank != 0 {
        buf.fill(0.0);
    }
    let exact = Ring { bf16: false, ..*ring };
    all_reduce(&exact, number, buf, false, next, prev).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local;

    /// Runs `f` on every rank of an in-process ring of `n` with bf16 on the wire.
    async fn on_every_rank<T, F>(n: usize, f: F) -> Vec<T>
    where
        T: Send + 'static,
        F: Fn(Ring, local::ChannelLink, local::ChannelLink) -> tokio::task::JoinHandle<T>,
    {
        let mut handles = Vec::new();
        for (rank, (next, prev)) in local::ring(n, 4).into_iter().enumerate() {
            let ring = Ring {
                bf16: true,
                ..Ring::new(n, rank, 1)
            };
            handles.push(f(ring, next, prev));
        }
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_reach_every_rank_exactly_even_with_bf16_on_the_wire() {
        // Odd length, every byte value, and patterns that are not valid floats.
        let payload: Vec<u8> = (0..100_001u32).map(|i| (i * 7 % 256) as u8).collect();
        let sent = payload.clone();
        let got = on_every_rank(3, move |ring, mut next, mut prev| {
            let bytes = (ring.rank == 0).then(|| sent.clone());
            tokio::spawn(async move {
                bytes_from_rank0(&ring, Seq::State(40), bytes, &mut next, &mut prev)
                    .await
                    .unwrap()
            })
        })
        .await;
        for g in got {
            assert_eq!(g, payload);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rank0s_values_arrive_unrounded_and_replace_the_others() {
        // 1 + 2^-20 has no bf16 form: rounded, it would arrive as 1.0.
        let values = vec![1.0 + f32::EPSILON * 8.0, -3.25e-7, 123_456.79];
        let root = values.clone();
        let got = on_every_rank(3, move |ring, mut next, mut prev| {
            let mut buf = if ring.rank == 0 {
                root.clone()
            } else {
                vec![99.0; root.len()]
            };
            tokio::spawn(async move {
                from_rank0(&ring, Seq::Weights, &mut buf, &mut next, &mut prev)
                    .await
                    .unwrap();
                buf
            })
        })
        .await;
        for g in got {
            assert_eq!(g, values);
        }
    }

    #[test]
    fn purposes_never_share_a_number() {
        let numbers = [
            Seq::Step(0).number(),
            Seq::Step((1 << 63) - 1).number(),
            Seq::Weights.number(),
            Seq::EpochStats(0).number(),
            Seq::EpochStats(59).number(),
            Seq::State(0).number(),
            Seq::State(0).number() + 1,
            Seq::State(1_000_000).number(),
            Seq::State(1_000_000).number() + 1,
        ];
        let distinct: std::collections::BTreeSet<u64> = numbers.iter().copied().collect();
        assert_eq!(distinct.len(), numbers.len(), "{numbers:?}");
        assert!(Seq::Step((1 << 63) - 1).number() < Seq::State(0).number());
    }
}

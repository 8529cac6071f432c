use std::time::{Duration, Instant};

use super::local::{ring as ring_links_depth, sender};
use super::*;

fn ring_links(n: usize) -> Vec<(local::ChannelLink, local::ChannelLink)> {
    ring_links_depth(n, 4)
}

fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 31 + rank * 17) % 97) as f32 * 0.013 - 0.5 + rank as f32)
        .collect()
}

async fn run_ring(n: usize, len: usize, max_piece: usize) -> Vec<Vec<f32>> {
    run_ring_with(n, len, max_piece, false).await
}

async fn run_ring_with(n: usize, len: usize, max_piece: usize, bf16: bool) -> Vec<Vec<f32>> {
    let mut tasks = Vec::new();
    for (rank, (mut next, mut prev)) in ring_links(n).into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let ring = Ring {
                max_piece,
                bf16,
                ..Ring::new(n, rank, 1)
            };
            let mut buf = input(rank, len);
            all_reduce(&ring, 5, &mut buf, true, &mut next, &mut prev)
                .await
                .unwrap();
            buf
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn averages_match_a_direct_sum_and_are_bit_identical() {
    for n in 1..=4 {
        for len in [1, 3, 1000, 1_048_577] {
            let results = run_ring(n, len, 65_536).await;
            let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, len)).collect();
            let expected: Vec<f64> = (0..len)
                .map(|i| inputs.iter().map(|x| f64::from(x[i])).sum::<f64>() / n as f64)
                .collect();
            for (got, want) in results[0].iter().zip(&expected) {
                assert!(
                    (f64::from(*got) - want).abs() < 1e-5 * want.abs().max(1.0),
                    "n={n} len={len}"
                );
            }
            for other in &results[1..] {
                let same = other
                    .iter()
                    .zip(&results[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "n={n} len={len}: ranks differ");
            }
        }
    }
}

#[test]
fn chunks_partition_the_buffer() {
    for (len, n) in [(10, 3), (2, 4), (1_048_577, 4), (0, 2)] {
        let mut next = 0;
        for c in 0..n {
            let r = chunk_range(len, n, c);
            assert_eq!(r.start, next);
            next = r.end;
        }
        assert_eq!(next, len);
    }
}

#[tokio::test]
async fn a_stale_message_is_rejected_not_summed() {
    let mut links = ring_links(2);
    let (mut next1, _) = links.pop().unwrap();
    let (_, mut prev0) = links.pop().unwrap();
    // Rank 1 speaks for an old generation.
    let stale = Tag {
        generation: 0,
        step: 5,
        phase: Phase::ReduceScatter,
        round: 0,
        chunk: 0,
        offset: 0,
    };
    next1
        .send(Piece {
            tag: stale,
            data: Values::encode(&[1.0; 2], Encoding::F32),
        })
        .await
        .unwrap();
    let (mut sink, _keep) = sender(4);
    let mut buf = vec![0.0; 4];
    let err = all_reduce(&Ring::new(2, 0, 1), 5, &mut buf, false, &mut sink, &mut prev0)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Mismatch { .. }), "{msg}");
    assert!(
        msg.contains("expected generation 1") && msg.contains("got generation 0"),
        "{msg}"
    );
    assert_eq!(buf, [0.0; 4], "nothing was summed");
}

#[tokio::test]
async fn small_pieces_interleave_rounds_and_still_match() {
    // 3-value pieces: every chunk is dozens of pieces, far more than a rank may send ahead,
    // so later rounds overtake earlier ones on every link.
    for n in [2, 3, 4] {
        let results = run_ring(n, 1000, 3).await;
        let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, 1000)).collect();
        for (i, got) in results[0].iter().enumerate() {
            let want = inputs.iter().map(|x| f64::from(x[i])).sum::<f64>() / n as f64;
            assert!(
                (f64::from(*got) - want).abs() < 1e-5 * want.abs().max(1.0),
                "n={n} i={i}"
            );
        }
        assert!(results.iter().all(|r| r == &results[0]), "n={n}: ranks differ");
    }
}

#[tokio::test]
async fn a_rank_sends_only_a_few_pieces_ahead_of_what_it_hears() {
    let (mut next, mut sent) = sender(1000);
    let (_silent, prev) = sender(1);
    let mut prev = local::ChannelLink::receiving(prev);
    let ring = Ring {
        max_piece: 10,
        timeout: Duration::from_millis(200),
        ..Ring::new(2, 0, 1)
    };
    // Own chunk: 500 values, 50 pieces; nothing ever arrives from rank 1.
    let mut buf = vec![1.0; 1000];
    let err = all_reduce(&ring, 0, &mut buf, false, &mut next, &mut prev)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let mut pieces = Vec::new();
    while let Ok(piece) = sent.try_recv() {
        pieces.push(piece.tag.offset);
    }
    let expected: Vec<u64> = (0..LOOKAHEAD as u64).map(|i| i * 10).collect();
    assert_eq!(
        pieces, expected,
        "the first {LOOKAHEAD} pieces of rank 0's chunk, in order"
    );
}

#[tokio::test]
async fn a_repeated_or_misplaced_piece_is_rejected() {
    let tag = Tag {
        generation: 1,
        step: 0,
        phase: Phase::ReduceScatter,
        round: 0,
        chunk: 1,
        offset: 0,
    };
    let cases = [
        // The whole of chunk 1 (2 values), then the same piece again.
        (vec![(tag, 2), (tag, 2)], "offset 2"),
        // The right round, the wrong chunk.
        (vec![(Tag { chunk: 0, ..tag }, 2)], "chunk 1"),
        // A round past the last.
        (
            vec![(Tag { round: 1, ..tag }, 2)],
            "got generation 1 step 0 ReduceScatter round 1",
        ),
        // More values than the chunk holds.
        (vec![(tag, 3)], "at most 2 values"),
    ];
    for (pieces, needle) in cases {
        let (mut feed, prev) = sender(8);
        let mut prev = local::ChannelLink::receiving(prev);
        for (tag, len) in pieces {
            let data = Values::encode(&vec![5.0; len], Encoding::F32);
            feed.send(Piece { tag, data }).await.unwrap();
        }
        let (mut next, _sent) = sender(100);
        let mut buf = vec![1.0; 4];
        let err = all_reduce(&Ring::new(2, 0, 1), 0, &mut buf, false, &mut next, &mut prev)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::Mismatch { .. }) && msg.contains(needle),
            "{needle}: {msg}"
        );
    }
}

#[tokio::test]
async fn a_silent_peer_fails_within_the_timeout() {
    let mut links = ring_links(3);
    let (mut next, mut prev) = links.remove(0);
    let ring = Ring {
        timeout: Duration::from_millis(300),
        ..Ring::new(3, 0, 1)
    };
    let started = Instant::now();
    let mut buf = vec![1.0; 30];
    // Ranks 1 and 2 never run; rank 0's sends fit in the channel, then it waits.
    let err = all_reduce(&ring, 0, &mut buf, false, &mut next, &mut prev)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    let msg = err.to_string();
    assert!(
        msg.contains("no data from rank 2") && msg.contains("is it alive"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_closed_peer_is_reported() {
    let mut links = ring_links(2);
    let (mut next, mut prev) = links.remove(0);
    drop(links);
    let mut buf = vec![1.0; 8];
    let err = all_reduce(&Ring::new(2, 0, 1), 0, &mut buf, false, &mut next, &mut prev)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Link { .. }), "{err}");
}

#[test]
fn bf16_rounds_to_nearest_even() {
    assert_eq!(round_bf16(1.0), 1.0);
    // 1 + 2^-8 lies halfway between two bf16 values: ties go to the even one (1.0).
    assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
    assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    assert_eq!(round_bf16(-2.5e-3).to_bits() & 0xffff, 0);
    assert!(round_bf16(f32::NAN).is_nan());
    assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
}

#[tokio::test]
async fn bf16_wire_keeps_ranks_bit_identical() {
    let (n, len) = (3, 1001);
    let results = run_ring_with(n, len, 100, true).await;
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, len)).collect();
    for (i, got) in results[0].iter().enumerate() {
        let want = inputs.iter().map(|x| f64::from(x[i])).sum::<f64>() / n as f64;
        assert!((f64::from(*got) - want).abs() < 2e-2 * want.abs().max(1.0), "{i}");
        assert_eq!(got.to_bits() & 0xffff, 0, "every value is a bf16 value");
    }
    for other in &results[1..] {
        assert!(
            other
                .iter()
                .zip(&results[0])
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }
}

/// A link that counts the value bytes it sends.
struct Counting {
    inner: local::ChannelLink,
    bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Link for Counting {
    async fn send(&mut self, piece: Piece) -> std::result::Result<(), String> {
        let bytes: usize = piece.data.segments().iter().map(|s| s.len()).sum();
        self.bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        self.inner.send(piece).await
    }

    async fn recv(&mut self) -> std::result::Result<Piece, String> {
        self.inner.recv().await
    }
}

#[tokio::test]
async fn bytes_sent_is_what_each_rank_puts_on_its_link() {
    for (n, len, bf16) in [
        (2, 1000, false),
        (3, 1_000_003, false),
        (4, 7, true),
        (1, 10, false),
    ] {
        let mut tasks = Vec::new();
        for (rank, (next, mut prev)) in ring_links(n).into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let ring = Ring {
                    max_piece: 4096,
                    bf16,
                    ..Ring::new(n, rank, 1)
                };
                let bytes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let mut next = Counting {
                    inner: next,
                    bytes: bytes.clone(),
                };
                let mut buf = input(rank, len);
                all_reduce(&ring, 1, &mut buf, true, &mut next, &mut prev)
                    .await
                    .unwrap();
                (
                    bytes.load(std::sync::atomic::Ordering::Relaxed) as u64,
                    bytes_sent(&ring, len),
                )
            }));
        }
        let mut total = 0;
        for t in tasks {
            let (counted, predicted) = t.await.unwrap();
            assert_eq!(counted, predicted, "n={n} len={len}");
            total += predicted;
        }
        // Each of the 2(n-1) rounds moves every chunk once.
        let width = if bf16 { 2 } else { 4 };
        assert_eq!(total, 2 * (n as u64 - 1) * len as u64 * width, "n={n} len={len}");
    }
}

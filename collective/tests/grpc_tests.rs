//! The ring all-reduce over real gRPC servers on loopback ports.

use std::time::{Duration, Instant};

use cluster_proto::auth::{ClientAuth, Token};
use collective::grpc::{LocalPeers, OutboundLink, OutboundOptions, RingLinks};
use collective::{Encoding, Link, Phase, Piece, Ring, Tag, Values, all_reduce};

fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 101) as f32 * 0.011 - 0.4 + rank as f32 * 0.5)
        .collect()
}

async fn grpc_ring(n: usize, len: usize, max_piece: usize) -> Vec<Vec<f32>> {
    let peers = LocalPeers::start(n).await.unwrap();
    let mut tasks = Vec::new();
    for rank in 0..n {
        let ring = Ring {
            max_piece,
            ..Ring::new(n, rank, 3)
        };
        let opening = peers.links(&ring);
        tasks.push(tokio::spawn(async move {
            let mut links = opening.await.unwrap();
            let mut buf = input(rank, len);
            all_reduce(&ring, 0, &mut buf, true, &mut links.next, &mut links.prev)
                .await
                .unwrap();
            // A second collective on the same streams: tags keep them apart.
            let mut again = input(rank, len);
            all_reduce(&ring, 1, &mut again, true, &mut links.next, &mut links.prev)
                .await
                .unwrap();
            assert!(again.iter().zip(&buf).all(|(a, b)| a.to_bits() == b.to_bits()));
            buf
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_ring_matches_a_direct_sum_for_1_to_4_ranks() {
    for n in 1..=4 {
        for len in [1usize, 3, 1000, 1_048_577] {
            // Pieces of 256 Ki values: the 1M case pipelines several pieces per chunk.
            let results = grpc_ring(n, len, 1 << 18).await;
            let inputs: Vec<Vec<f32>> = (0..n).map(|r| input(r, len)).collect();
            for (i, got) in results[0].iter().enumerate() {
                let want = inputs.iter().map(|x| f64::from(x[i])).sum::<f64>() / n as f64;
                assert!(
                    (f64::from(*got) - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "n={n} len={len} i={i}: {got} vs {want}"
                );
            }
            for (rank, other) in results.iter().enumerate().skip(1) {
                assert!(
                    other
                        .iter()
                        .zip(&results[0])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "n={n} len={len}: rank {rank} differs from rank 0"
                );
            }
        }
    }
}

/// Send pieces of `generation` until the stream reports its refusal. The first sends may be
/// queued before the refusal arrives; the refusal must surface within half a second.
async fn first_refusal(link: &mut OutboundLink, generation: u64) -> String {
    let tag = Tag {
        generation,
        step: 0,
        phase: Phase::ReduceScatter,
        round: 0,
        chunk: 0,
        offset: 0,
    };
    for _ in 0..10 {
        let piece = Piece {
            tag,
            data: Values::encode(&[1.0], Encoding::F32),
        };
        if let Err(e) = link.send(piece).await {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the stream was not refused");
}

#[tokio::test]
async fn a_wrong_token_is_refused_as_unauthenticated() {
    let peers = LocalPeers::start(1).await.unwrap();
    let endpoint = cluster_proto::net::endpoint(&peers.addresses[0].to_string(), None).unwrap();
    let wrong = Token::new("not-the-cluster-token", "test").unwrap();
    let options = OutboundOptions {
        generation: 1,
        sender: 0,
        depth: 1,
    };
    let mut link = OutboundLink::connect(
        &endpoint,
        ClientAuth::new(&wrong),
        options,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let error = first_refusal(&mut link, 1).await;
    assert!(
        error.contains("wrong join token") && error.contains("Unauthenticated"),
        "{error}"
    );
}

#[tokio::test]
async fn a_stale_generation_stream_is_refused() {
    let peers = LocalPeers::start(2).await.unwrap();
    // Rank 1 is in generation 5 and expects rank 0; rank 0 still thinks it is generation 4.
    let _inbound = peers.services[1].expect(5, 0);
    let endpoint = cluster_proto::net::endpoint(&peers.addresses[1].to_string(), None).unwrap();
    let options = OutboundOptions {
        generation: 4,
        sender: 0,
        depth: 1,
    };
    let mut link = OutboundLink::connect(
        &endpoint,
        ClientAuth::new(&peers.token),
        options,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let error = first_refusal(&mut link, 4).await;
    assert!(
        error.contains("stale ring") && error.contains("generation 4"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_rank_fails_its_neighbours_fast() {
    let n = 3;
    let peers = LocalPeers::start(n).await.unwrap();
    let mut tasks = Vec::new();
    for rank in 0..n {
        let ring = Ring {
            timeout: Duration::from_secs(30),
            ..Ring::new(n, rank, 1)
        };
        let opening = peers.links(&ring);
        tasks.push(tokio::spawn(async move {
            let links: RingLinks = opening.await.unwrap();
            if rank == 1 {
                // Rank 1 leaves before the collective: its streams close.
                drop(links);
                return None;
            }
            let mut links = links;
            let started = Instant::now();
            let mut buf = vec![1.0f32; 100_000];
            let err = all_reduce(&ring, 0, &mut buf, true, &mut links.next, &mut links.prev)
                .await
                .unwrap_err();
            Some((rank, started.elapsed(), err.to_string()))
        }));
    }
    for task in tasks {
        if let Some((rank, elapsed, err)) = task.await.unwrap() {
            // Far below the 30 s timeout: a closed stream is noticed, not waited out.
            assert!(elapsed < Duration::from_secs(5), "rank {rank} took {elapsed:?}");
            assert!(
                err.contains(&format!("rank {rank}")) && err.contains("failed"),
                "{err}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_collective_picks_its_wire_encoding_on_the_same_links() {
    // Workers open their links once per ring; a run with --bf16-allreduce still sends state
    // (weights, byte streams packed two bytes to a float) in f32 and expects it exact.
    let n = 2;
    let peers = LocalPeers::start(n).await.unwrap();
    let mut tasks = Vec::new();
    for rank in 0..n {
        let ring = Ring {
            bf16: true,
            ..Ring::new(n, rank, 1)
        };
        let opening = peers.links(&ring);
        tasks.push(tokio::spawn(async move {
            let mut links = opening.await.unwrap();
            // 65,535 needs 16 significant bits: bf16 keeps 8.
            let values = |rank: usize| vec![if rank == 0 { 65_535.0f32 } else { 0.0 }; 1000];
            let exact = Ring { bf16: false, ..ring };
            let mut buf = values(rank);
            all_reduce(&exact, 0, &mut buf, false, &mut links.next, &mut links.prev)
                .await
                .unwrap();
            let mut rounded = values(rank);
            all_reduce(&ring, 1, &mut rounded, false, &mut links.next, &mut links.prev)
                .await
                .unwrap();
            (buf, rounded)
        }));
    }
    for task in tasks {
        let (exact, rounded) = task.await.unwrap();
        assert!(
            exact.iter().all(|&v| v == 65_535.0),
            "f32 collective: {}",
            exact[0]
        );
        assert!(
            rounded.iter().all(|&v| v == 65_536.0),
            "bf16 collective: {}",
            rounded[0]
        );
    }
}

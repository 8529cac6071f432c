//! All-reduce bandwidth, measured the way nccl-tests reports it: algbw = bytes / time and
//! busbw = algbw * 2(n-1)/n (the per-link traffic of a ring, comparable across world sizes).

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::grpc::LocalPeers;
use crate::{Link, Ring, all_reduce};

/// One measured size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    /// Buffer size in bytes.
    pub bytes: u64,
    /// Median time of one all-reduce, seconds.
    pub median_seconds: f64,
    /// bytes / time, GB/s (10^9 bytes).
    pub algbw_gbps: f64,
    /// algbw * 2(n-1)/n, GB/s.
    pub busbw_gbps: f64,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Buffer sizes in bytes.
    pub sizes: Vec<u64>,
    /// Untimed iterations per size.
    pub warmup: u32,
    /// Timed iterations per size.
    pub iterations: u32,
}

/// Time all-reduces of every size over the given links; every rank runs this together.
/// `first_step` numbers the collectives (tags must never repeat within a generation).
pub async fn measure<N: Link, P: Link>(
    ring: &Ring,
    plan: &Plan,
    next: &mut N,
    prev: &mut P,
) -> crate::Result<Vec<Row>> {
    let mut step = 0u64;
    let mut rows = Vec::new();
    for &bytes in &plan.sizes {
        let len = (bytes / 4).max(1) as usize;
        let mut buf = test_values(len, ring.rank);
        let mut times = Vec::new();
        for i in 0..plan.warmup + plan.iterations {
            let started = Instant::now();
            all_reduce(ring, step, &mut buf, true, next, prev).await?;
            step += 1;
            if i >= plan.warmup {
                times.push(started.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        let bytes = (len * 4) as u64;
        let algbw = bytes as f64 / median / 1e9;
        let n = ring.world as f64;
        rows.push(Row {
            bytes,
            median_seconds: median,
            algbw_gbps: algbw,
            busbw_gbps: algbw * 2.0 * (n - 1.0) / n,
        });
    }
    Ok(rows)
}

/// Deterministic, rank-dependent values (a plain function: compiled optimised here).
fn test_values(len: usize, rank: usize) -> Vec<f32> {
    (0..len).map(|i| ((i + rank) % 251) as f32 * 0.01).collect()
}

/// Start `n` ranks in this process, each with its own gRPC peer server on a loopback port,
/// connected into a ring exactly as workers are; returns rank 0's measurements.
pub async fn local_ring(n: usize, plan: &Plan, bf16: bool) -> Result<Vec<Row>, String> {
    let peers = LocalPeers::start(n).await?;
    let mut ranks = Vec::new();
    for rank in 0..n {
        let ring = Ring {
            bf16,
            ..Ring::new(n, rank, 1)
        };
        let plan = plan.clone();
        let opening = peers.links(&ring);
        ranks.push(tokio::spawn(async move {
            let mut links = opening.await?;
            measure(&ring, &plan, &mut links.next, &mut links.prev)
                .await
                .map_err(|e| e.to_string())
        }));
    }
    let mut rank0 = None;
    for (rank, task) in ranks.into_iter().enumerate() {
        let rows = task.await.map_err(|e| format!("rank {rank} panicked: {e}"))??;
        if rank == 0 {
            rank0 = Some(rows);
        }
    }
    rank0.ok_or_else(|| "no ranks".into())
}

/// Raw throughput of one loopback TCP stream carrying `bytes` (the ceiling for any
/// transport on this host), GB/s; the best of three runs.
pub async fn loopback_tcp(bytes: u64) -> std::io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..3 {
            let mut left = bytes;
            while left > 0 {
                let n = socket.read(&mut buf).await?;
                if n == 0 {
                    return Err(std::io::Error::other("loopback sender closed early"));
                }
                left -= n as u64;
            }
            socket.write_all(&[1]).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut socket = TcpStream::connect(address).await?;
    socket.set_nodelay(true)?;
    let block = vec![7u8; 1 << 20];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            socket.write_all(&block[..n]).await?;
            left -= n as u64;
        }
        let mut ack = [0u8; 1];
        socket.read_exact(&mut ack).await?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    reader.await.map_err(std::io::Error::other)??;
    Ok(bytes as f64 / best / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_grpc_ring_reports_consistent_bandwidths() {
        let plan = Plan {
            sizes: vec![4096, 1 << 20],
            warmup: 1,
            iterations: 3,
        };
        let rows = local_ring(3, &plan, false).await.unwrap();
        assert_eq!(rows.len(), 2);
        for row in &rows {
            assert!(row.median_seconds > 0.0);
            let algbw = row.bytes as f64 / row.median_seconds / 1e9;
            assert!((row.algbw_gbps - algbw).abs() < 1e-9);
            assert!((row.busbw_gbps - algbw * 4.0 / 3.0).abs() < 1e-9);
        }
        assert!(loopback_tcp(1 << 20).await.unwrap() > 0.0);
    }
}

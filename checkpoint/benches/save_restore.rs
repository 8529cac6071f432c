//! Checkpoint save and restore against raw object_store put/get of the same bytes to the same
//! server. Prints a markdown table.
//!
//! ```text
//! cargo bench -p checkpoint --bench save_restore                     # test S3 server on loopback
//! CHECKPOINT_BENCH_URL=s3://bucket/prefix cargo bench -p checkpoint --bench save_restore
//! CHECKPOINT_BENCH_SIZES_MB=16,64 CHECKPOINT_BENCH_REPEAT=5 cargo bench ...
//! ```
//!
//! Columns: `raw put` is object_store's put (multipart above 8 MiB, same part size and
//! concurrency as the checkpoint writer); `upload` is rank 0's streamed upload with SHA-256;
//! `commit` is the coordinator's verification (a full read and hash) plus manifest and
//! `LATEST`; `raw get` is one get of the whole object; `restore` is a worker's verified read
//! (manifest, then the object streamed and hashed).

use std::time::Instant;

use anyhow::{Context, Result};
use checkpoint::{CheckpointStore, Manifest, PART_SIZE};
use object_store::{ObjectStoreExt, WriteMultipart};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; this harness takes its settings from the environment.
    let sizes: Vec<f64> = std::env::var("CHECKPOINT_BENCH_SIZES_MB")
        .unwrap_or_else(|_| "4,16,64,256".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .context("CHECKPOINT_BENCH_SIZES_MB: numbers, comma-separated")
        })
        .collect::<Result<_>>()?;
    let repeat: usize = std::env::var("CHECKPOINT_BENCH_REPEAT")
        .unwrap_or_else(|_| "3".into())
        .parse()
        .context("CHECKPOINT_BENCH_REPEAT: a count")?;
    let server;
    let (url, options): (String, Vec<(String, String)>) = match std::env::var("CHECKPOINT_BENCH_URL") {
        Ok(url) => (url, Vec::new()),
        Err(_) => {
            server = test_s3::S3Server::start(&["bench"]);
            ("s3://bench/ckpt".to_string(), server.options())
        }
    };
    let store = CheckpointStore::open_with(&url, &options)?;
    let raw = storage::Location::create_with(&url, &options)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;

    println!("checkpoint save/restore vs raw object_store, {url}, median of {repeat}");
    println!();
    println!("| size | raw put MB/s | upload MB/s | commit MB/s | raw get MB/s | restore MB/s |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for mb in sizes {
        let len = (mb * 1048576.0) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut cols = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for r in 0..repeat {
            runtime.block_on(async {
                let key = format!("raw/{mb}-{r}");
                let t = Instant::now();
                if len <= PART_SIZE {
                    raw.put(&key, bytes.clone()).await?;
                } else {
                    let upload = raw.store.put_multipart(&raw.path(&key)).await?;
                    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
                    for part in bytes.chunks(PART_SIZE) {
                        writer.wait_for_capacity(4).await?;
                        writer.write(part);
                    }
                    writer.finish().await?;
                }
                cols[0].push(t.elapsed().as_secs_f64());

                let name = CheckpointStore::new_name(r as u64, "head", 1);
                let t = Instant::now();
                let entry = store.upload(&name, "weights.safetensors", &bytes).await?;
                cols[1].push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                let manifest = store
                    .commit(Manifest {
                        format: checkpoint::FORMAT,
                        name,
                        run_id: "bench".into(),
                        phase: "head".into(),
                        epoch: 1,
                        step: r as u64,
                        val_accuracy: None,
                        committed_unix_ms: 0,
                        objects: vec![entry],
                    })
                    .await?;
                cols[2].push(t.elapsed().as_secs_f64());

                let t = Instant::now();
                let got = raw.get_bytes(&key).await?;
                cols[3].push(t.elapsed().as_secs_f64());
                anyhow::ensure!(got.len() == len, "raw get returned {} bytes", got.len());

                let t = Instant::now();
                let manifest = store.manifest(&manifest.name).await?;
                let back = store.read(&manifest, "weights.safetensors").await?;
                cols[4].push(t.elapsed().as_secs_f64());
                anyhow::ensure!(back.as_ref() == bytes.as_slice(), "restored bytes differ");
                Ok::<_, anyhow::Error>(())
            })?;
        }
        let rate = |v: &Vec<f64>| mb * 1.048576 / median(v.clone());
        println!(
            "| {mb} MiB | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            rate(&cols[0]),
            rate(&cols[1]),
            rate(&cols[2]),
            rate(&cols[3]),
            rate(&cols[4])
        );
    }
    Ok(())
}

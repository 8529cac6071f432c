//! The ring a rank trains over, driven from the blocking training thread: the all-reduce of
//! every step, and what rank 0 broadcasts (first weights, a joiner's state, BatchNorm
//! statistics at the end of an epoch).

use super::*;

/// The ring links a rank trains over, and how to drive them from a blocking thread.
pub struct RingIo<'a, N: Link, P: Link> {
    /// Ring parameters.
    pub ring: Ring,
    /// Link to the next rank.
    pub next: &'a mut N,
    /// Link from the previous rank.
    pub prev: &'a mut P,
    /// The async runtime the links belong to.
    pub handle: Handle,
    /// Seconds spent in all-reduce, accumulated.
    pub seconds: f64,
    /// Tells the heartbeat when this thread waits in a collective; ends the collective when
    /// the coordinator aborts the ring.
    pub watch: Arc<RingWatch>,
}

impl<N: Link, P: Link> RingIo<'_, N, P> {
    pub(super) fn all_reduce(&mut self, step: u64, buf: &mut [f32], average: bool) -> Result<()> {
        let started = Instant::now();
        let generation = self.ring.generation;
        let watch = &self.watch;
        watch.enter();
        let result = self.handle.block_on(async {
            tokio::select! {
                biased;
                reason = watch.aborted(generation) => Err(Error::Ring(format!(
                    "the coordinator abandoned ring generation {generation}: {reason}"
                ))),
                done = all_reduce(&self.ring, step, buf, average, self.next, self.prev) => {
                    done.map_err(|e| Error::Ring(e.to_string()))
                }
            }
        });
        watch.leave();
        self.seconds += started.elapsed().as_secs_f64();
        result
    }
}

/// Replace the values of `tensors` with rank 0's: the others contribute zeros to a sum, which
/// is exact in floating point. `step` tags the collective.
pub(super) fn from_rank0<N: Link, P: Link>(
    tensors: &mut [(String, RawTensor)],
    io: &mut RingIo<'_, N, P>,
    step: u64,
) -> Result<()> {
    let mut flat: Vec<f32> = if io.ring.rank == 0 {
        tensors.iter().flat_map(|(_, t)| t.data.iter().copied()).collect()
    } else {
        vec![0.0; tensors.iter().map(|(_, t)| t.data.len()).sum()]
    };
    // Rank 0's values arrive as they are, never rounded to bf16.
    let bf16 = std::mem::replace(&mut io.ring.bf16, false);
    let reduced = io.all_reduce(step, &mut flat, false);
    io.ring.bf16 = bf16;
    reduced?;
    let mut offset = 0;
    for (_, tensor) in tensors {
        let len = tensor.data.len();
        tensor.data.copy_from_slice(&flat[offset..offset + len]);
        offset += len;
    }
    Ok(())
}

/// Rank 0's `bytes` on every rank, through the ring: a length, then the bytes two to a
/// float (whole numbers below 2^16 survive the sum with the other ranks' zeros exactly).
pub(super) fn bytes_from_rank0<N: Link, P: Link>(
    io: &mut RingIo<'_, N, P>,
    tag: u64,
    bytes: Option<Vec<u8>>,
) -> Result<Vec<u8>> {
    // bf16 on the wire would round the values; these must arrive exactly.
    let bf16 = std::mem::replace(&mut io.ring.bf16, false);
    let result = (|| {
        let len = bytes.as_ref().map_or(0, Vec::len) as u64;
        let mut header: Vec<f32> = (0..4).map(|i| ((len >> (16 * i)) & 0xffff) as f32).collect();
        io.all_reduce(tag, &mut header, false)?;
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
        io.all_reduce(tag + 1, &mut values, false)?;
        let mut out = Vec::with_capacity(len + 1);
        for v in values {
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        out.truncate(len);
        Ok(out)
    })();
    io.ring.bf16 = bf16;
    result
}

/// Make every rank's weights equal to rank 0's.
pub(super) fn broadcast<N: Link, P: Link>(
    model: Classifier,
    config: &effnet::config::EfficientNetConfig,
    io: &mut RingIo<'_, N, P>,
) -> Result<Classifier> {
    if io.ring.world == 1 {
        return Ok(model);
    }
    let mut tensors = collect_tensors(&model);
    // Step numbers below 2^63 belong to training; the broadcasts use the top of the range.
    from_rank0(&mut tensors, io, u64::MAX)?;
    let file = WeightsFile {
        tensors: tensors.into_iter().collect(),
        ..WeightsFile::default()
    };
    let (model, _) = apply_weights(
        model,
        config,
        &file,
        std::path::Path::new("<weights broadcast from rank 0>"),
    )?;
    Ok(model)
}

/// Rank 0's BatchNorm running statistics (empty on a ring of one).
pub(super) fn running_stats_from_rank0<N: Link, P: Link>(
    model: &Classifier,
    io: &mut RingIo<'_, N, P>,
    step: u64,
) -> Result<Vec<(String, RawTensor)>> {
    if io.ring.world == 1 {
        return Ok(Vec::new());
    }
    // `valid()` applies the statistics updates buffered during the epoch.
    let mut stats: Vec<(String, RawTensor)> = collect_tensors(&model.valid())
        .into_iter()
        .filter(|(n, _)| is_running_stat(n))
        .collect();
    from_rank0(&mut stats, io, step)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_reach_every_rank_exactly_even_with_bf16_on_the_wire() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Odd length, every byte value, and patterns that are not valid floats.
        let payload: Vec<u8> = (0..100_001u32).map(|i| (i * 7 % 256) as u8).collect();
        let threads: Vec<_> = collective::local::ring(3, 4)
            .into_iter()
            .enumerate()
            .map(|(rank, (mut next, mut prev))| {
                let handle = runtime.handle().clone();
                let payload = payload.clone();
                std::thread::spawn(move || {
                    let mut io = RingIo {
                        ring: Ring {
                            bf16: true,
                            ..Ring::new(3, rank, 1)
                        },
                        next: &mut next,
                        prev: &mut prev,
                        handle,
                        seconds: 0.0,
                        watch: Default::default(),
                    };
                    let sent = (rank == 0).then_some(payload);
                    let got = bytes_from_rank0(&mut io, 1 << 63, sent).unwrap();
                    (got, io.ring.bf16)
                })
            })
            .collect();
        for t in threads {
            let (got, bf16) = t.join().unwrap();
            assert_eq!(got, payload);
            assert!(bf16, "the ring's bf16 setting is restored");
        }
    }
}

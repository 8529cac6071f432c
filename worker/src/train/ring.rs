//! The ring a rank trains over, driven from the blocking training thread: the all-reduce of
//! every step, and what rank 0 broadcasts (first weights, a joiner's state, BatchNorm
//! statistics at the end of an epoch). The collectives themselves are `collective`'s; this
//! is the blocking face of them, with the coordinator's abort and the heartbeat's view.

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
    /// Run `collective` over the ring's links from this blocking thread: timed into
    /// `seconds`, shown to the heartbeat as a wait in a collective, and ended when the
    /// coordinator abandons the ring.
    fn run<T>(
        &mut self,
        collective: impl AsyncFnOnce(&Ring, &mut N, &mut P) -> collective::Result<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let generation = self.ring.generation;
        let (ring, next, prev, watch) = (&self.ring, &mut *self.next, &mut *self.prev, &self.watch);
        watch.enter();
        let result = self.handle.block_on(async {
            tokio::select! {
                biased;
                reason = watch.aborted(generation) => Err(Error::Ring(format!(
                    "the coordinator abandoned ring generation {generation}: {reason}"
                ))),
                done = collective(ring, next, prev) => done.map_err(|e| Error::Ring(e.to_string())),
            }
        });
        watch.leave();
        self.seconds += started.elapsed().as_secs_f64();
        result
    }

    /// The all-reduce of training step `step`'s gradients (averaged when `average`), on the
    /// wire as the ring's setting says (f32 or bf16).
    pub(super) fn all_reduce(&mut self, step: u64, buf: &mut [f32], average: bool) -> Result<()> {
        let seq = Seq::Step(step).number();
        self.run(async |ring, next, prev| all_reduce(ring, seq, buf, average, next, prev).await)
    }
}

/// Replace the values of `tensors` with rank 0's, exactly, for the collective `seq`.
pub(super) fn from_rank0<N: Link, P: Link>(
    tensors: &mut [(String, RawTensor)],
    io: &mut RingIo<'_, N, P>,
    seq: Seq,
) -> Result<()> {
    let mut flat: Vec<f32> = if io.ring.rank == 0 {
        tensors.iter().flat_map(|(_, t)| t.data.iter().copied()).collect()
    } else {
        vec![0.0; tensors.iter().map(|(_, t)| t.data.len()).sum()]
    };
    io.run(async |ring, next, prev| collective::from_rank0(ring, seq, &mut flat, next, prev).await)?;
    let mut offset = 0;
    for (_, tensor) in tensors {
        let len = tensor.data.len();
        tensor.data.copy_from_slice(&flat[offset..offset + len]);
        offset += len;
    }
    Ok(())
}

/// Rank 0's `bytes` (`None` on the other ranks) on every rank, exactly, for the collective
/// `seq`.
pub(super) fn bytes_from_rank0<N: Link, P: Link>(
    io: &mut RingIo<'_, N, P>,
    seq: Seq,
    bytes: Option<Vec<u8>>,
) -> Result<Vec<u8>> {
    io.run(async |ring, next, prev| collective::bytes_from_rank0(ring, seq, bytes, next, prev).await)
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
    from_rank0(&mut tensors, io, Seq::Weights)?;
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

/// Rank 0's BatchNorm running statistics after epoch `global_epoch` (empty on a ring of one).
pub(super) fn running_stats_from_rank0<N: Link, P: Link>(
    model: &Classifier,
    io: &mut RingIo<'_, N, P>,
    global_epoch: u64,
) -> Result<Vec<(String, RawTensor)>> {
    if io.ring.world == 1 {
        return Ok(Vec::new());
    }
    // `valid()` applies the statistics updates buffered during the epoch.
    let mut stats: Vec<(String, RawTensor)> = collect_tensors(&model.valid())
        .into_iter()
        .filter(|(n, _)| is_running_stat(n))
        .collect();
    from_rank0(&mut stats, io, Seq::EpochStats(global_epoch))?;
    Ok(stats)
}

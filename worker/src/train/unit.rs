//! One work unit on the training thread: the trainer this rank has, or one made for it
//! (resumed from a checkpoint, waiting for a joiner's state, or built with rank 0's first
//! weights), then the epoch, and rank 0's prediction grid after a tested one.

use super::*;
use checkpoint::CheckpointStore;

/// One epoch on the training thread, with the trainer this rank has, or one made for it:
/// resumed from checkpoint `resume`, waiting for a joiner's state, or built (rank 0's first
/// weights shared over the ring). Returns the trainer, if there is one, and how the epoch
/// ended; a ring that broke while weights or state were shared ends it as broken.
pub fn run_unit<N: Link, P: Link>(
    trainer: Option<Trainer>,
    resume: Option<String>,
    device: Device,
    config: &RunConfig,
    work: &EpochWork,
    io: &mut RingIo<'_, N, P>,
    beat: &Beat,
) -> Result<(Option<Trainer>, Result<EpochOutcome>)> {
    let rank = io.ring.rank;
    let mut trainer = match (trainer, resume) {
        (Some(t), _) => t,
        // Joined mid-run: the state comes from rank 0 below.
        (None, _) if work.sync => Trainer::awaiting_state(config, device, &io.handle)?,
        (None, Some(name)) => {
            let store = CheckpointStore::open(&config.checkpoint_url())?;
            let trainer = Trainer::resume(config, device, &io.handle, &store, &name)?;
            beat.metrics.restores.inc();
            trainer
        }
        (None, None) => match Trainer::new(config, device, io) {
            Ok(trainer) => trainer,
            // A peer died during the first weight broadcast: nobody has
            // trained yet, so the next ring simply starts over.
            Err(Error::Ring(e)) => {
                tracing::warn!(error = %e, "the ring broke while sharing the initial weights");
                let reason = format!("sharing the initial weights: {e}");
                let broken = broken_before_steps(work, None, reason);
                return Ok((None, Ok(EpochOutcome::Broken(broken))));
            }
            Err(e) => return Err(e),
        },
    };
    if work.sync
        && let Err(e) = trainer.sync_from_rank0(io, work.first_step)
    {
        tracing::warn!(error = %e, "the ring broke while sharing the training state");
        let reason = format!("sharing the training state: {e}");
        let broken = broken_before_steps(work, Some(&trainer), reason);
        return Ok((Some(trainer), Ok(EpochOutcome::Broken(broken))));
    }
    io.watch.end_exchange();
    let mut result = trainer.epoch(work, io, beat);
    if matches!(result, Ok(EpochOutcome::Done(_))) && work.test && rank == 0 {
        // The tutorial's picture of the result: rank 0 draws it and sends it
        // with its report; the coordinator writes it beside the other
        // outputs (a worker's filesystem may be read-only but for caches).
        match (trainer.prediction_grid(), &mut result) {
            (Ok(png), Ok(EpochOutcome::Done(done))) => {
                done.prediction_grid_png = png.unwrap_or_default();
            }
            (Err(e), _) => result = Err(e),
            _ => {}
        }
    }
    Ok((Some(trainer), result))
}

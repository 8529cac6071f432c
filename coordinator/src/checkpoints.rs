//! The coordinator's side of checkpoints: at start, a fresh run or a resume from the newest
//! good checkpoint; during the run, committing what rank 0 uploaded.

use checkpoint::objects::STATE;
use checkpoint::{CheckpointStore, Lease, Manifest, Retention};
use run_config::{Job, RunConfig};

use crate::error::Error;
use crate::run::{Checkpointed, CommitPlan, Run, SavedState};

/// A run ready to serve, and where its checkpoints go (none for benchmarks).
pub struct Prepared {
    /// The run, fresh or resumed.
    pub run: Run,
    /// The checkpoint root.
    pub store: Option<CheckpointStore>,
    /// This coordinator's lease on the root (with the store).
    pub lease: Option<Lease>,
}

/// Unix milliseconds now: the lease's clock.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Who this coordinator is, in the lease and in messages to a second one.
pub fn lease_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!(
        "coordinator on {} (pid {})",
        if host.is_empty() { "?" } else { &host },
        std::process::id()
    )
}

/// Take the lease on the checkpoint root of `config` (`lease_ttl`), then decide: resume from
/// its newest good checkpoint, or (with `fresh`, or when there is none) start a new run.
/// Starting fresh never deletes anything; the new run's retention only ever touches its own
/// checkpoints. Ring generations start at the lease's incarnation (in the high 32 bits), so
/// they never repeat across coordinators of one root.
pub async fn prepare(
    config: RunConfig,
    expected: usize,
    fresh: bool,
    lease_ttl: std::time::Duration,
) -> Result<Prepared, Error> {
    if config.job != Job::Train {
        return Ok(Prepared {
            run: Run::new(new_run_id(), config, expected),
            store: None,
            lease: None,
        });
    }
    let url = config.checkpoint_url();
    let store = CheckpointStore::open(&url)?;
    let lease = store
        .take_lease(&lease_holder(), lease_ttl, now_unix_ms())
        .await?;
    tracing::info!(root = %url, incarnation = lease.incarnation(), ttl_seconds = lease_ttl.as_secs_f64(),
        "took the checkpoint root's lease");
    let mut prepared = decide(config, expected, fresh, store).await?;
    prepared.run.generation = lease.incarnation() << 32;
    prepared.lease = Some(lease);
    Ok(prepared)
}

async fn decide(
    config: RunConfig,
    expected: usize,
    fresh: bool,
    store: CheckpointStore,
) -> Result<Prepared, Error> {
    let url = config.checkpoint_url();
    if fresh {
        let (existing, _) = store.list().await?;
        if !existing.is_empty() {
            tracing::info!(checkpoints = existing.len(), root = %url,
                "starting fresh (--fresh); the existing checkpoints are kept, delete them yourself if unwanted");
        }
        return Ok(Prepared {
            run: Run::new(new_run_id(), config, expected),
            store: Some(store),
            lease: None,
        });
    }
    let Some(good) = store.latest_good().await? else {
        tracing::info!(root = %url, "no checkpoint yet; starting a new run");
        return Ok(Prepared {
            run: Run::new(new_run_id(), config, expected),
            store: Some(store),
            lease: None,
        });
    };
    for skipped in &good.skipped {
        tracing::warn!(reason = %skipped, "a newer checkpoint failed verification and is not used");
    }
    let manifest = good.manifest;
    let bytes = store.read(&manifest, STATE).await?;
    let describe = store.describe(&format!("{}/{STATE}", manifest.name));
    let mut state: SavedState = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Resume(format!("{describe}: not a run state: {e}")))?;
    // The global batch decides every step's samples. Not given now: the checkpoint's (which
    // a resume with another --workers keeps); given: it must match.
    let mut config = config;
    if config.global_batch == 0 && state.config.global_batch != 0 {
        tracing::info!(
            global_batch = state.config.global_batch,
            "keeping the checkpoint's global batch (images per step, whatever the worker count)"
        );
        config.global_batch = state.config.global_batch;
    }
    let differences = state.config.resume_differences(&config);
    if !differences.is_empty() {
        return Err(Error::Resume(format!(
            "{url} holds checkpoints of a run with other settings: {}. Resume with the same settings, \
             or pass --fresh to start a new run (the old checkpoints are kept)",
            differences.join("; ")
        )));
    }
    // Places, timeouts and retention may change between attempts; the new values win.
    state.config = config;
    let checkpointed = Checkpointed {
        location: store.describe(&manifest.name),
        name: manifest.name.clone(),
        step: manifest.step,
    };
    tracing::info!(checkpoint = %checkpointed.location, run = %state.run_id, phase = %state.phase,
        epoch = state.epoch, step = state.step, "resuming from checkpoint");
    let run =
        Run::resume(state, checkpointed, expected).map_err(|e| Error::Resume(format!("{describe}: {e}")))?;
    Ok(Prepared {
        run,
        store: Some(store),
        lease: None,
    })
}

/// Store the run state beside rank 0's objects, verify everything, write the manifest and
/// `LATEST`, then prune by the run's retention. Pruning problems are logged, not fatal: the
/// new checkpoint is already committed.
pub async fn commit(
    store: &CheckpointStore,
    plan: CommitPlan,
    keep: u32,
) -> Result<Manifest, checkpoint::Error> {
    let state = serde_json::to_vec_pretty(&plan.state).map_err(|e| checkpoint::Error::Format {
        object: store.describe(&format!("{}/{STATE}", plan.name)),
        reason: format!("cannot encode the run state: {e}"),
    })?;
    let mut objects = plan.objects;
    objects.push(store.upload(&plan.name, STATE, &state).await?);
    let manifest = store
        .commit(Manifest {
            format: checkpoint::FORMAT,
            name: plan.name,
            run_id: plan.state.run_id.clone(),
            phase: plan.state.phase.clone(),
            epoch: plan.state.epoch,
            step: plan.state.step,
            val_accuracy: plan.val_accuracy,
            committed_unix_ms: 0,
            objects,
        })
        .await?;
    let retention = Retention {
        keep_last: keep as usize,
        keep_best: true,
    };
    match store.prune(&plan.state.run_id, retention).await {
        Ok(deleted) if !deleted.is_empty() => {
            tracing::info!(deleted = deleted.len(), "retention pruned old checkpoints")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not prune old checkpoints; they stay"),
    }
    Ok(manifest)
}

/// A run id unique across restarts and machines: checkpoints of different runs under one
/// root never mix.
pub fn new_run_id() -> String {
    format!("run-{}", checkpoint::unique_hex(6))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A root holding one committed checkpoint of a run of 2 workers x batch 32.
    async fn root_with_checkpoint(url: &str) -> RunConfig {
        let config = RunConfig {
            checkpoints: url.to_string(),
            head_epochs: 2,
            ..RunConfig::default()
        };
        let store = CheckpointStore::open(url).unwrap();
        let state = SavedState {
            run_id: "r".into(),
            phase: "head".into(),
            epoch: 1,
            step: 10,
            sampler_epoch: 1,
            sampler_consumed: 0,
            seed: config.seed,
            config: RunConfig {
                global_batch: 64,
                ..config.clone()
            },
            history: Vec::new(),
            restarts: 0,
        };
        let name = CheckpointStore::new_name(10, "head", 1);
        let entry = store
            .upload(&name, STATE, &serde_json::to_vec(&state).unwrap())
            .await
            .unwrap();
        store
            .commit(Manifest {
                format: checkpoint::FORMAT,
                name,
                run_id: "r".into(),
                phase: "head".into(),
                epoch: 1,
                step: 10,
                val_accuracy: None,
                committed_unix_ms: 0,
                objects: vec![entry],
            })
            .await
            .unwrap();
        config
    }

    #[tokio::test]
    async fn a_resume_with_another_worker_count_keeps_the_global_batch_or_is_refused() {
        let config = root_with_checkpoint("memory://resume-global-batch").await;
        let ttl = Duration::from_secs(30);
        // Three workers now, no --global-batch: the checkpoint's 64 images per step stay.
        let prepared = prepare(config.clone(), 3, false, ttl).await.unwrap();
        assert_eq!(prepared.run.global_batch, 64);
        assert_eq!(prepared.run.steps_done, 10);
        prepared.lease.unwrap().release().await.unwrap();
        // An explicit other global batch is a different run.
        let other = RunConfig {
            global_batch: 96,
            ..config
        };
        let err = match prepare(other, 3, false, ttl).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("resumed with another global batch"),
        };
        assert!(
            err.contains("global_batch = 64 (checkpoint) vs 96 (now)"),
            "{err}"
        );
    }
}

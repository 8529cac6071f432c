use std::time::Duration;

use cluster_proto::v1::{Assignment, CheckpointCommit, EpochResult, assignment::Work};

use super::*;
use crate::error::Refusal;

/// The tests' clock starts here; every transition gets a time relative to it.
fn t0() -> Instant {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T0.get_or_init(Instant::now)
}

fn run_with_two_workers() -> (Run, Vec<String>) {
    run_of_two(RunConfig::default())
}

fn run_of_two(config: RunConfig) -> (Run, Vec<String>) {
    let mut run = Run::new("r".into(), config, 2);
    let mut ids = Vec::new();
    for i in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx);
        let request = v1::JoinRequest {
            name: format!("w{i}"),
            advertise: format!("127.0.0.1:{}", 1000 + i),
            device: "cpu".into(),
        };
        ids.push(run.join(request, tx, t0()).unwrap());
    }
    (run, ids)
}

type Orders = tokio::sync::mpsc::UnboundedReceiver<Order>;

/// A training run of `n` workers (batch 4 each, 4 head epochs) whose order streams the
/// test reads.
fn elastic_run(n: usize, min_workers: usize) -> (Run, Vec<String>, Vec<Orders>) {
    let config = RunConfig {
        batch_size: 4,
        head_epochs: 4,
        finetune_epochs: 0,
        ..RunConfig::default()
    };
    let mut run = Run::new("r".into(), config, n);
    run.min_workers = min_workers;
    run.max_workers = n + 1;
    let mut ids = Vec::new();
    let mut streams = Vec::new();
    for i in 0..n {
        let (id, rx) = join_worker(&mut run, i).unwrap();
        ids.push(id);
        streams.push(rx);
    }
    (run, ids, streams)
}

fn join_worker(run: &mut Run, i: usize) -> Result<(String, Orders), Refusal> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let request = v1::JoinRequest {
        name: format!("w{i}"),
        advertise: format!("127.0.0.1:{}", 2000 + i),
        device: "cpu".into(),
    };
    Ok((run.join(request, tx, t0())?, rx))
}

/// The orders queued on a stream so far.
fn drain(rx: &mut Orders) -> Vec<order::Order> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .filter_map(|o| o.order)
        .collect()
}

fn last_assignment(rx: &mut Orders) -> Assignment {
    drain(rx)
        .into_iter()
        .filter_map(|o| match o {
            order::Order::Assignment(a) => Some(a),
            _ => None,
        })
        .next_back()
        .expect("an assignment")
}

fn broken(worker: &str, generation: u64, completed: u64, count: u64) -> v1::WorkReport {
    v1::WorkReport {
        worker_id: worker.to_string(),
        generation,
        result: Some(ReportResult::Broken(v1::RingBroken {
            phase: Phase::Head as i32,
            epoch: 0,
            completed_steps: completed,
            train_loss_sum: 2.0 * count as f64,
            train_correct: count / 2,
            train_count: count,
            last_loss_sum: 8.0,
            last_correct: 2,
            last_count: 4,
            reason: "test".into(),
            has_state: true,
        })),
    }
}

#[test]
fn a_lost_worker_leaves_a_ring_of_the_survivors_from_their_last_common_step() {
    let (mut run, ids, mut streams) = elastic_run(3, 1);
    let first = last_assignment(&mut streams[0]);
    let Some(Work::Epoch(work)) = first.work else {
        panic!()
    };
    assert_eq!((work.global_batch, work.first_step, work.sync), (12, 0, false));
    run.depart(&ids[2], t0());
    assert_eq!(
        run.generation, 1,
        "waits for the survivors to say how far they got"
    );
    // Rank 1 finished step 5 (6 completed) before the ring broke; rank 0 did not.
    run.report(broken(&ids[0], 1, 5, 20), t0()).unwrap();
    run.report(broken(&ids[1], 1, 6, 24), t0()).unwrap();
    assert_eq!(run.generation, 2);
    assert_eq!(run.ring_reforms, 1);
    for rx in &mut streams[..2] {
        let a = last_assignment(rx);
        let Some(Work::Epoch(work)) = a.work else { panic!() };
        assert_eq!((a.generation, a.world), (2, 2));
        // The rest of the epoch from step 5: 5 global batches of 12 consumed.
        assert_eq!((work.first_step, work.consumed, work.global_batch), (5, 60, 12));
        assert!(!work.sync, "every member holds the state");
    }
    // A report of the broken ring is fenced off.
    let stale = run
        .report(epoch_report(&ids[0], Phase::Head, 0, 3), t0())
        .unwrap_err();
    assert!(
        matches!(stale, Refusal::Stale { got: 1, current: 2 }),
        "{stale:?}"
    );
    // Steps count from the epoch's start; rank 1's rolled-back step is not counted twice.
    for id in &ids[..2] {
        let mut r = epoch_report(id, Phase::Head, 0, 3);
        r.generation = 2;
        run.report(r, t0()).unwrap();
    }
    let epoch = run.history.last().unwrap();
    assert_eq!(epoch.steps, 8);
    assert_eq!(run.steps_done, 8);
    assert_eq!(epoch.train_images, 20 + (24 - 4) + 2 * 8);
    assert_eq!(run.ring_reforms, 1);
}

#[test]
fn a_worker_lost_while_the_first_weights_are_shared_restarts_the_unit_afresh() {
    let (mut run, ids, mut streams) = elastic_run(3, 1);
    run.depart(&ids[2], t0());
    for id in &ids[..2] {
        let mut r = broken(id, 1, 0, 0);
        if let Some(ReportResult::Broken(b)) = r.result.as_mut() {
            b.has_state = false;
        }
        run.report(r, t0()).unwrap();
    }
    assert_eq!(run.stage, Stage::Head, "{:?}", run.error);
    let a = last_assignment(&mut streams[0]);
    let Some(Work::Epoch(work)) = a.work else { panic!() };
    assert_eq!(
        (a.generation, a.world, work.first_step, work.sync),
        (2, 2, 0, false)
    );
    // Once a step has been taken, stateless survivors cannot start over.
    let (mut later, ids, _streams) = elastic_run(2, 1);
    later.steps_done = 4;
    later.unit_generation_step = 4;
    later.depart(&ids[1], t0());
    let mut r = broken(&ids[0], 1, 4, 0);
    if let Some(ReportResult::Broken(b)) = r.result.as_mut() {
        b.has_state = false;
    }
    later.report(r, t0()).unwrap();
    assert_eq!(later.stage, Stage::Failed);
    assert!(
        later
            .error
            .as_deref()
            .unwrap_or("")
            .contains("restart the coordinator")
    );
}

#[test]
fn below_min_workers_the_run_pauses_until_a_worker_joins_and_takes_the_state() {
    let (mut run, ids, mut streams) = elastic_run(2, 2);
    run.depart(&ids[1], t0());
    run.report(broken(&ids[0], 1, 3, 12), t0()).unwrap();
    assert_eq!(run.status(t0()).state, "paused");
    assert!(
        run.status(t0()).paused.contains("fewer than --min-workers 2"),
        "{:?}",
        run.status(t0())
    );
    assert_eq!(run.generation, 1);
    let (late, mut late_rx) = join_worker(&mut run, 5).unwrap();
    assert_eq!(run.status(t0()).state, "head");
    assert_eq!(run.generation, 2);
    let survivor = last_assignment(&mut streams[0]);
    let newcomer = last_assignment(&mut late_rx);
    assert_eq!((survivor.rank, newcomer.rank), (0, 1), "rank 0 holds the state");
    let Some(Work::Epoch(work)) = newcomer.work else {
        panic!()
    };
    assert!(work.sync, "the new worker takes the state from rank 0");
    assert_eq!(work.first_step, 3);
    assert!(!run.workers[&late].has_state);
}

#[test]
fn a_worker_joining_mid_run_asks_the_ring_to_stop_after_a_step() {
    let (mut run, ids, mut streams) = elastic_run(2, 1);
    drain(&mut streams[0]);
    let (late, mut late_rx) = join_worker(&mut run, 7).unwrap();
    for rx in &mut streams {
        let regroup = drain(rx)
            .into_iter()
            .any(|o| matches!(o, order::Order::Regroup(v1::Regroup { generation: 1 })));
        assert!(regroup);
    }
    // One more than --max-workers (3) is refused.
    assert!(matches!(join_worker(&mut run, 8), Err(Refusal::Full(3))));
    run.report(broken(&ids[0], 1, 4, 16), t0()).unwrap();
    run.report(broken(&ids[1], 1, 4, 16), t0()).unwrap();
    assert_eq!(run.generation, 2);
    let a = last_assignment(&mut late_rx);
    let Some(Work::Epoch(work)) = a.work else { panic!() };
    assert_eq!((a.rank, a.world, work.first_step, work.sync), (2, 3, 4, true));
    assert_eq!(run.workers[&late].rank, Some(2));
}

#[test]
fn a_rank_that_holds_the_ring_up_is_fenced_and_the_others_abandon_the_ring() {
    use crate::stuck::{Reported, StepTimeout};
    let (mut run, ids, mut streams) = elastic_run(3, 1);
    let _ = drain(&mut streams[1]);
    let now = Instant::now() + Duration::from_secs(60);
    let waiting = |s: f64| Reported {
        waiting_seconds: s,
        step_seconds: 0.2,
        generation: 1,
        exchanging: false,
    };
    // Ranks 0 and 2 wait in step 3's all-reduce; rank 1 is at step 2, not in it.
    run.heartbeat(&ids[0], 2, &[], waiting(2.0), now).unwrap();
    run.heartbeat(&ids[1], 2, &[], waiting(0.0), now).unwrap();
    run.heartbeat(&ids[2], 2, &[], waiting(2.0), now).unwrap();
    let timeout = StepTimeout::Fixed(Duration::from_secs(3));
    run.check_progress(timeout, now);
    assert_eq!(run.workers.len(), 3, "2 s of waiting is within the timeout");
    // A second later, still nothing from rank 1 but its heartbeats.
    let later = now + Duration::from_millis(1500);
    run.heartbeat(&ids[1], 2, &[], waiting(0.0), later).unwrap();
    run.check_progress(timeout, later);
    assert_eq!(run.workers.len(), 2, "rank 1 removed");
    let fenced = drain(&mut streams[1]);
    let [order::Order::Fenced(fenced)] = fenced.as_slice() else {
        panic!("{fenced:?}")
    };
    assert!(
        fenced.reason.contains("rank 1 (w1) completed no step"),
        "{}",
        fenced.reason
    );
    assert!(fenced.reason.contains("step timeout 3.0 s"), "{}", fenced.reason);
    for i in [0, 2] {
        let orders = drain(&mut streams[i]);
        assert!(
            orders
                .iter()
                .any(|o| matches!(o, order::Order::AbortRing(a) if a.generation == 1)),
            "{orders:?}"
        );
    }
    // The survivors leave the collective, report, and go on over a ring of two.
    run.report(broken(&ids[0], 1, 2, 8), t0()).unwrap();
    run.report(broken(&ids[2], 1, 2, 8), t0()).unwrap();
    assert_eq!(run.generation, 2);
    let a = last_assignment(&mut streams[2]);
    assert_eq!((a.rank, a.world), (1, 2));
    // The fenced worker's late heartbeat names it unknown: it must join again.
    let err = run.heartbeat(&ids[1], 3, &[], waiting(0.0), later).unwrap_err();
    assert!(matches!(err, Refusal::UnknownWorker(_)), "{err}");
}

#[test]
fn the_only_holders_of_the_training_state_are_never_removed_for_slowness() {
    use crate::stuck::{Reported, StepTimeout};
    let (mut run, ids, _streams) = elastic_run(2, 1);
    // Rank 1 joined mid-run, holds no state yet, and waits in a collective for rank 0.
    run.workers.get_mut(&ids[1]).unwrap().has_state = false;
    let now = Instant::now() + Duration::from_secs(60);
    let beat = |s: f64| Reported {
        waiting_seconds: s,
        step_seconds: 0.2,
        generation: 1,
        exchanging: false,
    };
    run.heartbeat(&ids[0], 2, &[], beat(0.0), now).unwrap();
    run.heartbeat(&ids[1], 2, &[], beat(30.0), now).unwrap();
    run.check_progress(StepTimeout::Fixed(Duration::from_secs(3)), now);
    assert_eq!(run.workers.len(), 2, "rank 0 alone holds the state");
    assert_eq!(run.stage, Stage::Head);
}

#[test]
fn agreeing_step_checksums_keep_the_run_going_and_differing_ones_stop_it() {
    let (mut run, ids) = run_with_two_workers();
    assert_eq!(run.stage, Stage::Head);
    run.heartbeat(&ids[0], 100, &[(100, 7, 1)], Default::default(), Instant::now())
        .unwrap();
    run.heartbeat(&ids[1], 100, &[(100, 7, 1)], Default::default(), Instant::now())
        .unwrap();
    assert_eq!(run.stage, Stage::Head);
    run.heartbeat(&ids[0], 200, &[(200, 8, 1)], Default::default(), Instant::now())
        .unwrap();
    assert_eq!(run.stage, Stage::Head, "waits for the other rank");
    run.heartbeat(&ids[1], 200, &[(200, 9, 1)], Default::default(), Instant::now())
        .unwrap();
    assert_eq!(run.stage, Stage::Failed);
    let error = run.error.unwrap();
    assert!(error.contains("ranks diverged at step 200"), "{error}");
    assert!(error.contains("rank 1: 0000000000000009"), "{error}");
}

fn epoch_report(worker: &str, phase: Phase, epoch: u32, steps: u64) -> v1::WorkReport {
    v1::WorkReport {
        worker_id: worker.to_string(),
        generation: 1,
        result: Some(ReportResult::Epoch(EpochResult {
            phase: phase as i32,
            epoch,
            steps,
            train_count: 8,
            val_count: 4,
            val_correct: 3,
            ..Default::default()
        })),
    }
}

fn commit(worker: &str, epoch: u32, step: u64) -> CheckpointCommit {
    CheckpointCommit {
        worker_id: worker.to_string(),
        checkpoint: format!("step-{step:010}-head-e{epoch:03}-00000000"),
        phase: Phase::Head as i32,
        epoch,
        step,
        objects: vec![v1::StoredObject {
            name: "weights.safetensors".into(),
            size: 3,
            sha256: "ab".repeat(32),
        }],
    }
}

#[test]
fn checkpointed_epochs_wait_for_rank_0s_commit_and_resume_continues_after_them() {
    let config = RunConfig {
        head_epochs: 2,
        finetune_epochs: 1,
        checkpoint_every: 1,
        ..RunConfig::default()
    };
    let (mut run, ids) = run_of_two(config);
    run.report(epoch_report(&ids[0], Phase::Head, 0, 4), t0())
        .unwrap();
    run.report(epoch_report(&ids[1], Phase::Head, 0, 4), t0())
        .unwrap();
    assert_eq!(run.awaiting_checkpoint, Some((Phase::Head, 0)));
    assert_eq!(run.current, 0, "the next epoch waits for the checkpoint");

    // Only rank 0, only the due epoch, only at the run's step count.
    let err = run
        .prepare_commit(&commit(&ids[1], 1, 4))
        .unwrap_err()
        .to_string();
    assert!(err.contains("only rank 0"), "{err}");
    let err = run
        .prepare_commit(&commit(&ids[0], 2, 4))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not match the one due"), "{err}");
    let err = run
        .prepare_commit(&commit(&ids[0], 1, 5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("completed 4 steps"), "{err}");

    let plan = run.prepare_commit(&commit(&ids[0], 1, 4)).unwrap();
    assert_eq!(plan.state.phase, "head");
    assert_eq!(plan.state.epoch, 1);
    assert_eq!(plan.state.step, 4);
    assert_eq!((plan.state.sampler_epoch, plan.state.sampler_consumed), (1, 0));
    assert_eq!(plan.state.history.len(), 1);
    assert_eq!(plan.val_accuracy, Some(0.75));
    assert_eq!(plan.objects[0].name, "weights.safetensors");
    let checkpointed = Checkpointed {
        location: format!("mem://x/{}", plan.name),
        name: plan.name.clone(),
        step: 4,
    };
    run.checkpoint_committed(checkpointed.clone(), t0());
    assert_eq!(run.current, 1);
    assert_eq!(run.awaiting_checkpoint, None);
    assert_eq!(run.stage, Stage::Head);
    let err = run.prepare_commit(&commit(&ids[0], 1, 4)).unwrap_err();
    assert!(matches!(err, Refusal::Superseded(_)), "{err}");
    assert!(err.to_string().contains("not due any more"), "{err}");

    // A restarted coordinator continues with head epoch 1 (index 1 of the plan), and
    // workers are told which checkpoint to load.
    let resumed = Run::resume(plan.state.clone(), checkpointed, 2).unwrap();
    assert_eq!(resumed.current, 1);
    assert_eq!(resumed.steps_done, 4);
    assert_eq!(resumed.history.len(), 1);
    assert_eq!(resumed.resume_from.as_deref(), Some(plan.name.as_str()));
    assert_eq!(resumed.run_id, "r");
    // Restarts count across coordinators: the state carries them into later checkpoints.
    assert_eq!((plan.state.restarts, resumed.restarts), (0, 1));
    let again = Run::resume(
        SavedState {
            restarts: resumed.restarts,
            ..plan.state.clone()
        },
        run.last_checkpoint.clone().unwrap(),
        2,
    )
    .unwrap();
    assert_eq!(again.restarts, 2);
    let mut beyond = plan.state;
    beyond.epoch = 7;
    let err = Run::resume(beyond, run.last_checkpoint.clone().unwrap(), 2).unwrap_err();
    assert!(
        err.contains("head epoch 7 is not part of this run's plan"),
        "{err}"
    );
}

#[test]
fn a_commit_that_overtakes_another_ranks_report_is_held_not_refused() {
    let config = RunConfig {
        head_epochs: 2,
        finetune_epochs: 0,
        checkpoint_every: 1,
        ..RunConfig::default()
    };
    let (mut run, ids) = run_of_two(config);
    // Rank 0 reported and committed at once; rank 1 is still evaluating.
    run.report(epoch_report(&ids[0], Phase::Head, 0, 4), t0())
        .unwrap();
    let err = run.prepare_commit(&commit(&ids[0], 1, 4)).unwrap_err();
    assert!(matches!(err, Refusal::NotYet(_)), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    run.report(epoch_report(&ids[1], Phase::Head, 0, 4), t0())
        .unwrap();
    let plan = run.prepare_commit(&commit(&ids[0], 1, 4)).unwrap();
    assert_eq!((plan.state.epoch, plan.state.step), (1, 4));

    // A commit whose epoch a new ring took over is superseded, which a worker survives.
    let (mut run, ids) = run_of_two(RunConfig {
        head_epochs: 2,
        finetune_epochs: 0,
        checkpoint_every: 1,
        ..RunConfig::default()
    });
    run.report(epoch_report(&ids[0], Phase::Head, 0, 4), t0())
        .unwrap();
    run.report(broken(&ids[1], 1, 3, 12), t0()).unwrap();
    assert_eq!(run.generation, 2, "re-formed");
    let err = run.prepare_commit(&commit(&ids[0], 1, 4)).unwrap_err();
    assert!(matches!(err, Refusal::Superseded(_)), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
}

#[test]
fn heartbeats_give_speed_and_the_eta_follows_the_plan() {
    let config = RunConfig {
        head_epochs: 2,
        finetune_epochs: 1,
        ..RunConfig::default()
    };
    let (mut run, ids) = run_of_two(config);
    assert_eq!(run.eta_seconds(), None, "nothing timed yet");
    run.report(epoch_report(&ids[0], Phase::Head, 0, 4), t0())
        .unwrap();
    run.report(epoch_report(&ids[1], Phase::Head, 0, 4), t0())
        .unwrap();
    assert_eq!(run.steps_done, 4);
    assert_eq!(run.eta_seconds(), None, "no speed yet");
    // Both ranks joined at t0, were at step 4 four seconds later and at 6 two more seconds
    // on: 1 step/s.
    for (seconds, step) in [(4, 4), (6, 6)] {
        for id in &ids {
            let at = t0() + Duration::from_secs(seconds);
            run.heartbeat(id, step, &[], Default::default(), at).unwrap();
        }
    }
    let rate = run.workers[&ids[0]].steps_per_second.unwrap();
    assert!((rate - 1.0).abs() < 0.05, "{rate}");
    assert_eq!(run.ring_step(), 6);
    // Head epoch 1 (2 of 4 steps done) and the fine-tune epoch are left: 6 steps at 1/s.
    let eta = run.eta_seconds().unwrap();
    assert!((eta - 6.0).abs() < 0.3, "{eta}");
    let status = run.status(t0());
    assert_eq!(status.step, 6);
    assert_eq!(status.val_accuracy, Some(0.75));
    assert!((status.workers[0].images_per_second - rate * 32.0).abs() < 1e-9);
    // Steps slower than the heartbeat: one every 10 s, a heartbeat every second.
    let start = t0() + Duration::from_secs(6);
    for second in 1..=80u64 {
        let step = 6 + second / 10;
        for id in &ids {
            run.heartbeat(
                id,
                step,
                &[],
                Default::default(),
                start + Duration::from_secs(second),
            )
            .unwrap();
        }
    }
    let rate = run.workers[&ids[0]].steps_per_second.unwrap();
    assert!((rate - 0.1).abs() < 0.02, "one step in 10 s, measured {rate}");
}

//! What goes wrong without a fault: ranks that report at different times, runs repeated
//! until a race shows. Real binaries on loopback.

use std::time::{Duration, Instant};

use cluster_tests::processes::{
    TOKEN, assert_plan, coordinator, signal, small_coordinator, small_run, token_file, wait_for_steps,
    worker_with_env,
};
use cluster_tests::{Proc, logged_address, spawn};

/// Steps the survivors redid after the ring re-formed: the most any of them had completed
/// (their "worker lost its ring" reports) less the step the new ring restarted from.
fn steps_redone(coordinator_log: &str) -> Vec<i64> {
    let field = |line: &str, key: &str| -> Option<i64> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        v["fields"][key].as_i64()
    };
    let mut completed = Vec::new();
    let mut redone = Vec::new();
    for line in coordinator_log.lines() {
        if line.contains("worker lost its ring") {
            completed.extend(field(line, "completed_steps"));
        } else if line.contains("the unit goes on from its last common step")
            && let Some(restart) = field(line, "restart_step")
            && let Some(most) = completed.drain(..).max()
        {
            redone.push(most - restart);
        }
    }
    redone
}

#[test]
fn a_checkpoint_commit_that_overtakes_a_slower_ranks_report_is_held_and_no_worker_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let out = dir.path().join("run");
    // 48 images, batch 4 on 2 workers: 6 steps an epoch; a checkpoint after each of the 3.
    let (coordinator, address) = small_coordinator(
        &token,
        &["--workers", "2", "--checkpoint-every", "1"],
        &out,
        4,
        2,
        48,
    );
    // Whichever worker is rank 1 reports each epoch 6 s late, so rank 0's commit (sent right
    // after its own report, and its upload, which took over 2 s on two loaded cores) arrives
    // before the epoch is summarised.
    let hook = [("EFFNET_TEST_DELAY_REPORT", "1:6000")];
    let workers: Vec<_> = (0..2)
        .map(|_| worker_with_env(&token, &address, &["join"], &["--cpu"], &hook))
        .collect();
    for w in workers {
        let run = w.finish(Duration::from_secs(300)).success();
        assert!(!run.stderr.contains("refused the checkpoint"), "{}", run.stderr);
    }
    let coordinator = coordinator.finish(Duration::from_secs(30)).success();
    let log = &coordinator.stderr;
    assert_eq!(
        log.matches("checkpoint commit held until every rank has reported")
            .count(),
        3,
        "every commit overtook the delayed report:\n{log}"
    );
    let committed = log
        .lines()
        .filter(|l| l.contains("checkpoint committed") && l.contains("coordinator::run"))
        .count();
    assert_eq!(committed, 3, "{log}");
    assert!(!log.contains("worker lost"), "{log}");
    assert!(!log.contains("ring re-formed"), "{log}");
    assert_plan(&out, 3, 6);
}

/// Fault-free local runs, checkpointing every epoch, repeated (`EFFNET_SOAK_RUNS`, 3 by
/// default; the long form is 20): not one worker may be lost or restarted.
#[test]
fn fault_free_local_runs_lose_no_worker() {
    let runs: usize = std::env::var("EFFNET_SOAK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let mut lost = 0;
    for i in 0..runs {
        let out = dir.path().join(format!("run-{i}"));
        let args = small_run(
            &["start", "--local", "2", "--checkpoint-every", "1"],
            &out,
            4,
            2,
            48,
        );
        let run = spawn("coordinator", &args, &[("CLUSTER_TOKEN", "")])
            .finish(Duration::from_secs(300))
            .success();
        let this =
            run.stderr.matches("worker lost").count() + run.stderr.matches("local worker exited").count();
        assert_eq!(this, 0, "run {i} lost a worker:\n{}", run.stderr);
        lost += this;
        assert_plan(&out, 3, 6);
    }
    eprintln!("soak: {runs} fault-free runs, {lost} workers lost");
}

/// A worker whose data loader stops answering (as on a storage read that never returns)
/// keeps its heartbeats going: the others' wait in the all-reduce gives it away. It is
/// removed, the ring goes on without it, and it joins again.
#[test]
fn a_worker_whose_data_reads_stall_is_removed_and_the_run_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let out = dir.path().join("run");
    // 96 images, global batch 12 on any ring: 8 steps an epoch, 24 in the run.
    let cluster = ["--workers", "3", "--step-timeout", "3"];
    let (mut coordinator, address) = small_coordinator(&token, &cluster, &out, 4, 2, 96);
    // Rank 1's loader hangs after its third batch.
    let hook = [("EFFNET_TEST_STALL_LOADER", "1:3")];
    let workers: Vec<Proc> = (0..3)
        .map(|_| worker_with_env(&token, &address, &["join"], &["--cpu"], &hook))
        .collect();
    let line = coordinator.wait_for("held the ring up past the step timeout", Duration::from_secs(120));
    assert!(line.contains(r#""rank":1"#), "{line}");
    let caught: serde_json::Value = serde_json::from_str(&line).unwrap();
    eprintln!(
        "stalled loader caught after the others waited {:.1} s (step timeout 3 s)",
        caught["fields"]["waited_seconds"].as_f64().unwrap()
    );
    let mut stalled = 0;
    for w in workers {
        let run = w.finish(Duration::from_secs(300)).success();
        if run.stderr.contains("the data loader stops answering") {
            stalled += 1;
            assert!(
                run.stderr
                    .contains("removed from the run; joining again as a new worker"),
                "{}",
                run.stderr
            );
        }
    }
    assert_eq!(stalled, 1);
    let coordinator = coordinator.finish(Duration::from_secs(30)).success();
    let log = &coordinator.stderr;
    assert!(log.contains("ring re-formed from the survivors"), "{log}");
    assert!(
        steps_redone(log).iter().all(|&r| r <= 1),
        "{:?}\n{log}",
        steps_redone(log)
    );
    assert_plan(&out, 3, 8);
}

/// SIGSTOP, then SIGCONT: the stopped worker's silence and the others' wait are caught
/// within the step timeout (plus the heartbeats' silence window), the ring goes on without
/// it, and, continued, it joins again; at most one step is redone.
#[test]
fn a_stopped_worker_is_caught_within_the_step_timeout_and_rejoins_when_continued() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let out = dir.path().join("run");
    let step_timeout = 3.0;
    let timeout = step_timeout.to_string();
    let cluster = ["--workers", "3", "--step-timeout", timeout.as_str()];
    let (mut coordinator, address) = small_coordinator(&token, &cluster, &out, 4, 2, 96);
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| {
            let extra: &[&str] = if i == 1 {
                &["--cpu", "--metrics-listen", "127.0.0.1:0"]
            } else {
                &["--cpu"]
            };
            worker_with_env(&token, &address, &["join"], extra, &[])
        })
        .collect();
    let metrics = logged_address(&workers[1].wait_for("metrics listening", Duration::from_secs(60)));
    wait_for_steps(&metrics, 3.0, || workers[1].stderr());
    signal(&workers[1], "STOP");
    let stopped = Instant::now();
    coordinator.wait_for("held the ring up past the step timeout", Duration::from_secs(60));
    let detected = stopped.elapsed().as_secs_f64();
    eprintln!("SIGSTOP detected after {detected:.1} s (step timeout {step_timeout} s)");
    // The limit, the heartbeats' silence window (4 s) and a check period, with slack for 2
    // loaded cores; the HTTP/2 keepalive route took about 15 s.
    assert!(detected < step_timeout + 4.0 + 3.0, "{detected:.1} s");
    signal(&workers[1], "CONT");
    for w in workers {
        w.finish(Duration::from_secs(300)).success();
    }
    let coordinator = coordinator.finish(Duration::from_secs(30)).success();
    let log = &coordinator.stderr;
    let redone = steps_redone(log);
    assert!(
        !redone.is_empty() && redone.iter().all(|&r| r <= 1),
        "{redone:?}\n{log}"
    );
    // Continued, the stopped worker joined again and the ring grew back to three.
    assert!(log.matches("worker joined").count() >= 4, "{log}");
    assert_plan(&out, 3, 8);
}

/// Two coordinators on one checkpoint root: the second is refused while the first's lease
/// is live, naming it; when the first stops renewing (here: stopped past its lease), the
/// second takes the root over and the first, continued, stops instead of committing.
#[test]
fn one_coordinator_per_checkpoint_root() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let out = dir.path().join("run");
    let out_arg = out.to_str().unwrap();
    let first_args = [
        "--workers",
        "2",
        "--data",
        "synthetic",
        "--lease-ttl",
        "2",
        "--out",
        out_arg,
    ];
    let (mut first, _) = coordinator(&token, &first_args);
    first.wait_for("took the checkpoint root's lease", Duration::from_secs(10));

    let second_args = ["--workers", "2", "--data", "synthetic", "--out", out_arg];
    let mut args = vec![
        "start",
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        token.to_str().unwrap(),
    ];
    args.extend_from_slice(&second_args);
    let refused = spawn("coordinator", &args, &[])
        .finish(Duration::from_secs(30))
        .failure();
    assert!(
        refused
            .stderr
            .contains("is in use by another coordinator (coordinator on"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("its lease expires in"),
        "{}",
        refused.stderr
    );
    assert!(
        !refused.stderr.contains("coordinator listening"),
        "{}",
        refused.stderr
    );

    // The first stops renewing; once its lease lapsed a new coordinator takes the root.
    signal(&first, "STOP");
    std::thread::sleep(Duration::from_millis(2500));
    let (mut taker, _) = coordinator(&token, &second_args);
    let line = taker.wait_for("took the checkpoint root's lease", Duration::from_secs(10));
    assert!(line.contains(r#""incarnation":2"#), "{line}");
    signal(&first, "CONT");
    let first = first.finish(Duration::from_secs(30)).failure();
    assert!(
        first.stderr.contains("lost the lease on the checkpoint root"),
        "{}",
        first.stderr
    );
    drop(taker);
}

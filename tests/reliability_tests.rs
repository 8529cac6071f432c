//! What goes wrong without a fault: ranks that report at different times, runs repeated
//! until a race shows. Real binaries on loopback.

use std::time::Duration;

use cluster_tests::processes::{
    TOKEN, assert_plan, small_coordinator, small_run, token_file, worker_with_env,
};
use cluster_tests::spawn;

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
    // Whichever worker is rank 1 reports each epoch 2 s late, so rank 0's commit (sent right
    // after its own report) always arrives before the epoch is summarised.
    let hook = [("EFFNET_TEST_DELAY_REPORT", "1:2000")];
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

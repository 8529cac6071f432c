//! The cluster as separate processes on loopback: the real coordinator and worker binaries
//! talking gRPC, with join tokens, TLS, the all-reduce benchmark, a training run and a
//! worker killed mid-collective.

use std::path::Path;
use std::time::{Duration, Instant};

use cluster_tests::processes::{
    TOKEN, assert_plan, coordinator, coordinator_with_env, sample, scrape, signal, small_coordinator,
    small_run, token_file, wait_for_steps, worker, worker_with_env,
};
use cluster_tests::{Proc, history, logged_address, spawn};

/// Test images counted in an epoch's confusion matrix.
fn tested(epoch: &serde_json::Value) -> u64 {
    epoch["test_confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum()
}

/// Numbers of a table row like `|      1 MB |  3.20 |  0.321 |  0.321 |`.
fn row_numbers(line: &str) -> Vec<f64> {
    line.split('|')
        .filter_map(|cell| cell.trim().trim_end_matches(" MB").parse::<f64>().ok())
        .collect()
}

#[test]
fn allreduce_benchmark_over_three_worker_processes() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let (coordinator, address) = coordinator(
        &token,
        &[
            "--workers",
            "3",
            "--job",
            "allreduce-bench",
            "--size-mb",
            "1,4",
            "--iterations",
            "3",
        ],
    );
    let workers: Vec<Proc> = (0..3)
        .map(|_| worker(&token, &address, &["bench", "allreduce"], &[]))
        .collect();
    let runs: Vec<_> = workers
        .into_iter()
        .map(|w| w.finish(Duration::from_secs(120)).success())
        .collect();
    let coordinator = coordinator.finish(Duration::from_secs(30)).success();
    assert!(
        coordinator.stdout.contains("all-reduce over 3 workers"),
        "{}",
        coordinator.stdout
    );
    for size in ["1 MiB", "4 MiB"] {
        assert!(coordinator.stdout.contains(size), "{}", coordinator.stdout);
    }
    // Exactly one worker (rank 0) prints the table; its rows obey the nccl-tests formulas.
    let tables: Vec<&String> = runs
        .iter()
        .map(|r| &r.stdout)
        .filter(|s| s.contains("busbw"))
        .collect();
    assert_eq!(tables.len(), 1, "{runs:?}");
    let rows: Vec<Vec<f64>> = tables[0]
        .lines()
        .filter(|l| l.contains(" MB |"))
        .map(row_numbers)
        .collect();
    assert_eq!(rows.len(), 2, "{}", tables[0]);
    for (row, mb) in rows.iter().zip([1.0, 4.0]) {
        let [size, ms, algbw, busbw] = row[..] else {
            panic!("row {row:?}")
        };
        assert_eq!(size, mb);
        let expected_algbw = mb * 1048576.0 / (ms / 1e3) / 1e9;
        assert!(
            (algbw - expected_algbw).abs() <= 0.02 * expected_algbw + 0.002,
            "{row:?}"
        );
        assert!((busbw - algbw * 4.0 / 3.0).abs() <= 0.002, "{row:?}");
    }
}

// One long test on purpose: every assertion below reads the same whole run of the real
// binaries (the slow part); split, each piece would start its own.
#[test]
fn two_workers_train_both_phases_in_lockstep() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let out = dir.path().join("run");
    let (coordinator, address) = coordinator(
        &token,
        &[
            "--workers",
            "2",
            "--data",
            "synthetic",
            "--weights",
            "none",
            "--model",
            "efficientnet-b0",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--head-epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--limit-train",
            "64",
            "--limit-val",
            "32",
            "--limit-test",
            "40",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let workers: Vec<Proc> = (0..2)
        .map(|_| worker(&token, &address, &["join"], &["--cpu"]))
        .collect();
    for w in workers {
        w.finish(Duration::from_secs(300)).success();
    }
    let coordinator = coordinator.finish(Duration::from_secs(30)).success();
    let epochs = history(&out);
    let history = serde_json::Value::from(epochs.clone());
    assert_eq!(epochs.len(), 2, "{history}");
    assert_eq!(epochs[0]["phase"], "head");
    assert_eq!(epochs[1]["phase"], "finetune");
    for epoch in &epochs {
        // 64 training images over 2 ranks with batch 8: 4 steps, every image once.
        assert_eq!(epoch["train_images"], 64, "{epoch}");
        assert_eq!(epoch["steps"], 4, "{epoch}");
        let loss = epoch["train_loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{epoch}");
        assert!(epoch["val_accuracy"].as_f64().is_some(), "{epoch}");
    }
    // The test set is evaluated once, at the end, split over the ranks and summed exactly.
    assert!(epochs[0]["test_accuracy"].is_null());
    assert_eq!(epochs[1]["test_confusion"].as_array().unwrap().len(), 10);
    assert_eq!(tested(&epochs[1]), 40);
    // Rank 0 checkpointed at the end of each phase and the coordinator committed both.
    let root = out.join("checkpoints");
    let store = checkpoint::CheckpointStore::open(root.to_str().unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (committed, problems) = runtime.block_on(store.list()).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    let labels: Vec<(String, u32, u64)> = committed
        .iter()
        .map(|m| (m.phase.clone(), m.epoch, m.step))
        .collect();
    assert_eq!(
        labels,
        [("head".to_string(), 1, 4), ("finetune".to_string(), 1, 8)]
    );
    for manifest in &committed {
        let names: Vec<&str> = manifest.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "weights.safetensors",
                "optimizer.bpk",
                "param-ids.json",
                "state.json"
            ]
        );
        assert!(
            manifest.object("weights.safetensors").unwrap().size > 1_000_000,
            "{manifest:?}"
        );
        assert!(manifest.val_accuracy.is_some());
        assert!(
            coordinator.stderr.contains(&manifest.name),
            "{}",
            coordinator.stderr
        );
    }
    let good = runtime.block_on(store.latest_good()).unwrap().unwrap();
    assert_eq!(good.manifest.name, committed[1].name);
    // The final state records the whole history.
    let state: serde_json::Value = serde_json::from_slice(
        &runtime
            .block_on(store.read(&good.manifest, "state.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(state["history"].as_array().unwrap().len(), 2);
    assert_eq!(state["step"], 8);

    // Evaluating the newest checkpoint alone gives the run's own test result.
    let eval = cluster_tests::run(
        "worker",
        [
            "evaluate",
            "--weights",
            root.to_str().unwrap(),
            "--data",
            "synthetic",
            "--image-size",
            "32",
            "--limit-test",
            "40",
            "--json",
        ],
    )
    .success()
    .json();
    assert_eq!(eval["images"], 40);
    assert_eq!(eval["test_accuracy"], epochs[1]["test_accuracy"], "{eval}");
    let loss = eval["test_loss"].as_f64().unwrap();
    let run_loss = epochs[1]["test_loss"].as_f64().unwrap();
    assert!(
        (loss - run_loss).abs() < 1e-4 * run_loss.abs().max(1.0),
        "{loss} vs {run_loss}"
    );
    assert_eq!(eval["confusion"], epochs[1]["test_confusion"]);
}

#[test]
fn a_wrong_token_is_refused_and_the_run_keeps_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let wrong = token_file(dir.path(), "another-token-that-is-long-enough");
    let (coordinator, address) = coordinator(&token, &["--workers", "1"]);
    let intruder = worker(&wrong, &address, &["join"], &["--cpu"])
        .finish(Duration::from_secs(60))
        .failure();
    assert!(
        intruder.stderr.contains("wrong join token"),
        "{}",
        intruder.stderr
    );
    let status = cluster_tests::run(
        "coordinator",
        [
            "status",
            "--json",
            "--coordinator",
            &address,
            "--token-file",
            token.to_str().unwrap(),
        ],
    )
    .success();
    let status = status.json();
    assert_eq!(status["state"], "waiting");
    assert_eq!(status["workers"].as_array().unwrap().len(), 0);
    drop(coordinator);
}

#[test]
fn a_client_speaking_another_protocol_version_is_refused() {
    use cluster_proto::auth::{ClientAuth, Token};
    use cluster_proto::v1::StatusRequest;
    use cluster_proto::v1::coordinator_client::CoordinatorClient;

    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let (_coordinator, address) = coordinator(&token, &["--workers", "1"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = cluster_proto::net::endpoint(&address, None)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token = Token::new(TOKEN, "test").unwrap();
        let mut future =
            CoordinatorClient::with_interceptor(channel.clone(), ClientAuth::with_version(&token, 99));
        let status = future.status(StatusRequest {}).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status.message().contains("protocol version mismatch") && status.message().contains("sent 99"),
            "{}",
            status.message()
        );
        let mut current = CoordinatorClient::with_interceptor(channel, ClientAuth::new(&token));
        assert_eq!(
            current.status(StatusRequest {}).await.unwrap().into_inner().state,
            "waiting"
        );
    });
}

#[test]
fn a_worker_killed_mid_collective_fails_the_others_fast() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    // Endless 16 MB all-reduces; a 120 s peer timeout proves the failure is not waited out.
    let (coordinator, address) = coordinator(
        &token,
        &[
            "--workers",
            "3",
            "--job",
            "allreduce-bench",
            "--size-mb",
            "16",
            "--iterations",
            "1000000",
            "--peer-timeout",
            "120",
        ],
    );
    let mut workers: Vec<Proc> = (0..3)
        .map(|_| worker(&token, &address, &["join"], &["--cpu"]))
        .collect();
    for w in &mut workers {
        w.wait_for("ring links open", Duration::from_secs(60));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut victim = workers.remove(1);
    let killed_at = Instant::now();
    victim.kill();
    for w in workers {
        let run = w.finish(Duration::from_secs(30)).failure();
        assert!(
            run.stderr.contains("link to rank") || run.stderr.contains("disconnected during bench"),
            "{}",
            run.stderr
        );
    }
    let coordinator = coordinator.finish(Duration::from_secs(30)).failure();
    assert!(
        coordinator.stderr.contains("disconnected during bench"),
        "{}",
        coordinator.stderr
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(15),
        "took {:?}",
        killed_at.elapsed()
    );
}

#[test]
fn a_worker_killed_mid_training_leaves_a_smaller_ring_that_finishes_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let out = dir.path().join("run");
    // 96 images, batch 4 per worker on 3 workers: a global batch of 12, 8 steps an epoch,
    // 24 in the run, whatever the ring's size. Weights are compared after every step.
    let (coordinator, address) = small_coordinator(&token, &["--workers", "3"], &out, 4, 2, 96);
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| {
            let extra: &[&str] = if i == 1 {
                &["--cpu", "--metrics-listen", "127.0.0.1:0"]
            } else {
                &["--cpu"]
            };
            worker(&token, &address, &["join"], extra)
        })
        .collect();
    let metrics = logged_address(&workers[1].wait_for("metrics listening", Duration::from_secs(60)));
    // Kill the victim in the middle of the first epoch, while it computes or all-reduces.
    wait_for_steps(&metrics, 3.0, || workers[1].stderr());
    let mut victim = workers.remove(1);
    victim.kill();
    for w in workers {
        let run = w.finish(Duration::from_secs(300)).success();
        assert!(run.stderr.contains("the ring broke"), "{}", run.stderr);
    }
    let coordinator = coordinator.finish(Duration::from_secs(30)).success();
    assert!(
        coordinator.stderr.contains("ring re-formed from the survivors"),
        "{}",
        coordinator.stderr
    );
    // The plan's optimizer steps, no more and no fewer (the redone step replaced the lost
    // one), and the last checkpoint after all 24.
    let epochs = assert_plan(&out, 3, 8);
    let history = serde_json::Value::from(epochs.clone());
    // Unbroken epochs trained on every image once; the broken one lost the dead rank's sums.
    assert_eq!(epochs[1]["train_images"], 96, "{history}");
    assert_eq!(epochs[2]["train_images"], 96, "{history}");
    let broken = epochs[0]["train_images"].as_u64().unwrap();
    assert!((48..96).contains(&broken), "{history}");
    // The test set was evaluated whole.
    assert_eq!(tested(&epochs[2]), 24);
}

#[test]
fn a_worker_killed_as_the_ring_forms_leaves_the_others_to_start_over() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let out = dir.path().join("run");
    let (coordinator, address) = small_coordinator(&token, &["--workers", "3"], &out, 4, 1, 48);
    let mut workers: Vec<Proc> = (0..3)
        .map(|_| worker(&token, &address, &["join"], &["--cpu"]))
        .collect();
    // As soon as the ring is up, while the first weights go round (or just after).
    for w in &mut workers {
        w.wait_for("ring links open", Duration::from_secs(60));
    }
    workers[2].kill();
    workers.pop();
    for w in workers {
        w.finish(Duration::from_secs(300)).success();
    }
    let coordinator = coordinator.finish(Duration::from_secs(30)).success();
    assert!(
        coordinator.stderr.contains("ring re-formed from the survivors"),
        "{}",
        coordinator.stderr
    );
    // 48 images, global batch 12: 4 steps an epoch, 8 in the run.
    assert_plan(&out, 2, 4);
}

#[test]
fn a_worker_that_joins_mid_run_gets_the_state_and_ends_identical() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let out = dir.path().join("run");
    // Two workers with batch 4: a global batch of 8, 12 steps an epoch, 36 in the run.
    let cluster = ["--workers", "2", "--max-workers", "3"];
    let (coordinator, address) = small_coordinator(&token, &cluster, &out, 4, 2, 96);
    let mut first = worker(
        &token,
        &address,
        &["join"],
        &["--cpu", "--metrics-listen", "127.0.0.1:0"],
    );
    let second = worker(&token, &address, &["join"], &["--cpu"]);
    let metrics = logged_address(&first.wait_for("metrics listening", Duration::from_secs(60)));
    wait_for_steps(&metrics, 3.0, || first.stderr());
    let late = worker(&token, &address, &["join"], &["--cpu"]);
    let late = late.finish(Duration::from_secs(300)).success();
    assert!(
        late.stderr.contains("training state shared from rank 0"),
        "{}",
        late.stderr
    );
    first.finish(Duration::from_secs(60)).success();
    second.finish(Duration::from_secs(60)).success();
    let coordinator = coordinator.finish(Duration::from_secs(30)).success();
    assert!(
        coordinator
            .stderr
            .contains("asking the ring to stop after this step"),
        "{}",
        coordinator.stderr
    );
    // Steps and images as planned: the global batch did not change when the ring grew.
    // Weights were compared on all three ranks after every step of the new ring (a
    // difference stops the run), and the final checkpoint is at the plan's last step.
    for epoch in &assert_plan(&out, 3, 12) {
        assert_eq!(epoch["train_images"], 96, "{epoch}");
    }
}

#[test]
fn a_restarted_coordinator_resumes_the_run_with_the_same_workers() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let out = dir.path().join("run");
    // The restarted coordinator must be where the workers look for it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let cluster = [
        "--log-format",
        "json",
        "start",
        "--listen",
        &listen,
        "--token-file",
        token.to_str().unwrap(),
        "--workers",
        "2",
        "--checkpoint-every",
        "1",
        "--lease-ttl",
        "2",
    ];
    let args = small_run(&cluster, &out, 4, 2, 64);
    let mut first = spawn("coordinator", &args, &[]);
    first.wait_for("coordinator listening", Duration::from_secs(30));
    let workers: Vec<Proc> = (0..2)
        .map(|_| {
            worker(
                &token,
                &listen,
                &["join"],
                &["--cpu", "--coordinator-timeout", "120"],
            )
        })
        .collect();
    first.wait_for("checkpoint committed", Duration::from_secs(300));
    first.kill();
    // The killed coordinator's lease on the checkpoint root (2 s, see its arguments) lapses
    // before another may take the root.
    std::thread::sleep(Duration::from_millis(2200));
    let mut second = spawn("coordinator", &args, &[]);
    second.wait_for("resuming from checkpoint", Duration::from_secs(30));
    for w in workers {
        let run = w.finish(Duration::from_secs(300)).success();
        assert!(
            run.stderr
                .contains("lost the coordinator; trying to reach it again"),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("resumed from checkpoint"), "{}", run.stderr);
    }
    second.finish(Duration::from_secs(30)).success();
    assert_plan(&out, 3, 8);
}

#[test]
fn a_worker_whose_coordinator_never_returns_exits_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let (mut coordinator, address) = coordinator(&token, &["--workers", "2"]);
    let mut worker = worker(
        &token,
        &address,
        &["join"],
        &["--cpu", "--coordinator-timeout", "2"],
    );
    worker.wait_for("joined", Duration::from_secs(60));
    coordinator.kill();
    let run = worker.finish(Duration::from_secs(60)).failure();
    assert!(
        run.stderr
            .contains("lost the coordinator; trying to reach it again"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains(&format!("cannot reach the coordinator at {address} within 2 s")),
        "{}",
        run.stderr
    );
}

/// `coordinator status --json` of the coordinator at `address`, or `None` once it is gone.
fn status_json(token: &Path, address: &str) -> Option<serde_json::Value> {
    let run = cluster_tests::spawn(
        "coordinator",
        [
            "status",
            "--coordinator",
            address,
            "--json",
            "--token-file",
            token.to_str().unwrap(),
        ],
        &[],
    )
    .finish(Duration::from_secs(30));
    (run.code == Some(0)).then(|| run.json())
}

/// Repeated random strikes: a kill followed by a replacement worker, or a SIGSTOP that is
/// continued 8 s later (the stopped worker is removed for holding the ring up, and joins
/// again): the run still takes exactly its planned steps. `EFFNET_CHAOS_KILLS` (strikes, 3),
/// `EFFNET_CHAOS_SEED` (7) and `EFFNET_CHAOS_EPOCHS` (head epochs, 2) make the longer form
/// (see the README).
#[test]
fn chaos_random_kills_stops_and_replacements_still_finish_the_plan() {
    let env = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let kills = env("EFFNET_CHAOS_KILLS", 3);
    let mut seed = env("EFFNET_CHAOS_SEED", 7);
    let head_epochs = env("EFFNET_CHAOS_EPOCHS", 2);
    let mut random = move |n: u64| {
        // SplitMix64: a fixed sequence per seed.
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    };
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let out = dir.path().join("run");
    // 96 images, global batch 12: 8 steps an epoch on any ring.
    let cluster = ["--workers", "3", "--min-workers", "1", "--step-timeout", "4"];
    let (coordinator, address) = small_coordinator(&token, &cluster, &out, 4, head_epochs, 96);
    let mut alive: Vec<Proc> = (0..3)
        .map(|_| worker(&token, &address, &["join"], &["--cpu"]))
        .collect();
    let mut finished = Vec::new();
    let mut stopped: Vec<(Proc, Instant)> = Vec::new();
    let mut last_kill_step = 0;
    let (mut done, mut stops) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(600);
    let resume = |stopped: &mut Vec<(Proc, Instant)>, alive: &mut Vec<Proc>, all: bool| {
        while let Some(i) = stopped
            .iter()
            .position(|(_, at)| all || at.elapsed() > Duration::from_secs(8))
        {
            let (proc, _) = stopped.remove(i);
            signal(&proc, "CONT");
            alive.push(proc);
        }
    };
    while done < kills {
        assert!(Instant::now() < deadline, "the chaos did not end");
        resume(&mut stopped, &mut alive, false);
        let Some(status) = status_json(&token, &address) else {
            break;
        };
        let ranked = status["workers"]
            .as_array()
            .map_or(0, |w| w.iter().filter(|w| !w["rank"].is_null()).count());
        let step = status["step"].as_u64().unwrap_or(0);
        if status["state"] == "done" {
            break;
        }
        // Strike again once the ring is whole and has trained past the last strike.
        if ranked == 3 && stopped.is_empty() && step >= last_kill_step + 2 + random(3) {
            let victim = random(alive.len() as u64) as usize;
            let mut proc = alive.remove(victim);
            if random(2) == 0 {
                proc.kill();
                finished.push(proc);
                alive.push(worker(&token, &address, &["join"], &["--cpu"]));
            } else {
                signal(&proc, "STOP");
                stopped.push((proc, Instant::now()));
                stops += 1;
            }
            last_kill_step = step;
            done += 1;
        }
        std::thread::sleep(Duration::from_millis(100 + random(300)));
    }
    resume(&mut stopped, &mut alive, true);
    for w in alive {
        w.finish(Duration::from_secs(300)).success();
    }
    let coordinator = coordinator.finish(Duration::from_secs(30)).success();
    let reforms = coordinator
        .stderr
        .matches("ring re-formed from the survivors")
        .count() as u64;
    assert!(
        reforms >= done - stops,
        "{done} strikes ({stops} stops), {reforms} new rings:\n{}",
        coordinator.stderr
    );
    assert!(done >= 1, "no strike landed before the run ended");
    eprintln!(
        "chaos: {done} strikes ({} kills, {stops} stops), {reforms} rings re-formed",
        done - stops
    );
    assert_plan(&out, head_epochs + 1, 8);
}

#[test]
fn mutual_tls_cluster_runs_and_plaintext_is_refused() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let node_key = KeyPair::generate().unwrap();
    let node = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&node_key, &ca)
        .unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let ca_pem = write("ca.pem", ca.pem());
    let cert_pem = write("node.pem", node.pem());
    let key_pem = write("node.key", node_key.serialize_pem());
    let tls = [
        "--tls-cert",
        &cert_pem,
        "--tls-key",
        &key_pem,
        "--tls-ca",
        &ca_pem,
    ];
    let mut args = vec![
        "--workers",
        "2",
        "--job",
        "allreduce-bench",
        "--size-mb",
        "1",
        "--iterations",
        "2",
    ];
    args.extend_from_slice(&tls);
    let (coordinator, address) = coordinator(&token, &args);
    let plaintext = worker(&token, &address, &["join"], &["--cpu", "--connect-timeout", "2"])
        .finish(Duration::from_secs(60))
        .failure();
    assert!(plaintext.stderr.contains("coordinator"), "{}", plaintext.stderr);
    let workers: Vec<Proc> = (0..2)
        .map(|_| worker(&token, &address, &["join"], &[&["--cpu"][..], &tls[..]].concat()))
        .collect();
    for w in workers {
        w.finish(Duration::from_secs(120)).success();
    }
    let coordinator = coordinator.finish(Duration::from_secs(30)).success();
    assert!(coordinator.stdout.contains("1 MiB"), "{}", coordinator.stdout);
}

#[test]
fn joining_with_a_gpu_on_a_cpu_build_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let run = worker(&token, "127.0.0.1:9", &["join"], &["--gpu", "0"])
        .finish(Duration::from_secs(30))
        .failure();
    assert!(
        run.stderr.contains("--gpu 0 requested") && run.stderr.contains("--features cuda"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_libtorch_backend_on_a_default_build_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let run = worker(
        &token,
        "127.0.0.1:9",
        &["join"],
        &["--cpu", "--cpu-backend", "libtorch"],
    )
    .finish(Duration::from_secs(30))
    .failure();
    assert!(
        run.stderr.contains("--cpu-backend libtorch requested")
            && run.stderr.contains("--features libtorch")
            && run.stderr.contains("--cpu-backend flex"),
        "{}",
        run.stderr
    );
}

#[test]
fn local_mode_runs_the_whole_cluster_from_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let run = spawn(
        "coordinator",
        [
            "start",
            "--local",
            "2",
            "--data",
            "synthetic",
            // Weights compared every step through the heartbeats: no false alarm from the head's
            // per-rank BatchNorm statistics.
            "--checksum-every",
            "1",
            "--head",
            "tutorial",
            "--weights",
            "none",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--head-epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--limit-train",
            "48",
            "--limit-val",
            "16",
            "--limit-test",
            "20",
            "--out",
            out.to_str().unwrap(),
        ],
        &[("CLUSTER_TOKEN", "")],
    )
    .finish(Duration::from_secs(300))
    .success();
    // Two worker processes joined over loopback with a token made for the run. The tutorial
    // head's BatchNorm trains on each rank's own batches; the run only finishes if its
    // statistics are made equal again (weight checksums are compared every epoch).
    assert_eq!(run.stderr.matches("worker joined").count(), 2, "{}", run.stderr);
    // The made-up token is kept for `coordinator status`, readable by this user only.
    let token = out.join("token");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&token).unwrap().trim().len(), 32);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["workers"], 2);
    assert_eq!(report["devices"], serde_json::json!(["cpu", "cpu"]));
    assert_eq!(report["test_images"], 20);
    assert_eq!(report["classes"].as_array().unwrap().len(), 10);
    assert_eq!(report["phases"]["head"]["epochs"], 1);
    assert_eq!(report["phases"]["finetune"]["epochs"], 1);
    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("history.json")).unwrap()).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 2);
    // The tutorial's pictures: learning curves and a 5 x 5 grid of (20) test predictions.
    let curves = image::open(out.join("curves.png")).unwrap();
    assert_eq!((curves.width(), curves.height()), (1200, 480));
    let grid = image::open(out.join("predictions.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (5 * 192, 4 * 162));
}

/// Process ids of `pid`'s children (those of every thread).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

#[test]
fn local_mode_restarts_a_killed_worker_and_the_run_finishes_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cluster = [
        "--log-format",
        "json",
        "start",
        "--local",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let args = small_run(&cluster, &out, 4, 2, 64);
    let mut run = spawn("coordinator", &args, &[]);
    let workers = run.wait_for_lines(
        &["metrics listening", "\"target\":\"worker::cluster\""],
        2,
        Duration::from_secs(60),
    );
    let metrics = logged_address(&workers[0]);
    wait_for_steps(&metrics, 2.0, || run.stderr());
    let children = children_of(run.id());
    assert_eq!(children.len(), 2, "{children:?}");
    let killed = std::process::Command::new("kill")
        .args(["-9", &children[1].to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let run = run.finish(Duration::from_secs(300)).success();
    assert!(
        run.stderr.contains("local worker exited; starting it again"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("ring re-formed from the survivors"),
        "{}",
        run.stderr
    );
    // 64 images, global batch 8: 8 steps on any ring.
    assert_plan(&out, 3, 8);
}

#[test]
fn local_mode_stops_when_a_worker_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    // A worker that cannot find its dataset exits; the run must not wait for it forever.
    let missing = dir.path().join("no-such-data");
    let run = spawn(
        "coordinator",
        [
            "start",
            "--local",
            "2",
            "--data",
            missing.to_str().unwrap(),
            "--weights",
            "none",
            "--out",
            dir.path().join("run").to_str().unwrap(),
        ],
        &[("CLUSTER_TOKEN", "")],
    )
    .finish(Duration::from_secs(120))
    .failure();
    assert!(run.stderr.contains("no-such-data"), "{}", run.stderr);
}

/// The final weights of the run whose checkpoints are under `url`, by tensor name.
fn final_weights(
    server: &test_s3::S3Server,
    url: &str,
) -> (
    checkpoint::Manifest,
    std::collections::BTreeMap<String, effnet::weights::RawTensor>,
) {
    let options = server.options();
    let store = checkpoint::CheckpointStore::open_with(url, &options).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let good = runtime
        .block_on(store.latest_good())
        .unwrap()
        .expect("a committed checkpoint");
    let bytes = runtime
        .block_on(store.read(&good.manifest, "weights.safetensors"))
        .unwrap();
    let file = effnet::weights::safetensors_from_bytes(Path::new(url), &bytes).unwrap();
    (good.manifest, file.tensors)
}

/// Two workers and a coordinator checkpointing every epoch to `url` on the test S3 server.
fn s3_cluster(dir: &Path, server: &test_s3::S3Server, url: &str, out: &Path) -> (Proc, Vec<Proc>) {
    let token = token_file(dir, TOKEN);
    let env = server.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = [
        "--workers",
        "2",
        "--data",
        "synthetic",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--head-epochs",
        "2",
        "--finetune-epochs",
        "1",
        "--limit-train",
        "64",
        "--limit-val",
        "32",
        "--limit-test",
        "40",
        "--checkpoint-every",
        "1",
        "--lease-ttl",
        "2",
        "--checkpoints",
        url,
        "--out",
        out.to_str().unwrap(),
    ];
    let (coordinator, address) = coordinator_with_env(&token, &args, &env);
    let workers = (0..2)
        .map(|_| worker_with_env(&token, &address, &["join"], &["--cpu"], &env))
        .collect();
    (coordinator, workers)
}

#[test]
fn s3_checkpoints_survive_a_killed_upload_and_resume_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let server = test_s3::S3Server::start(&["ckpt"]);

    // The reference: the same run, never interrupted.
    let (coordinator, workers) = s3_cluster(
        dir.path(),
        &server,
        "s3://ckpt/straight",
        &dir.path().join("straight"),
    );
    for w in workers {
        w.finish(Duration::from_secs(300)).success();
    }
    coordinator.finish(Duration::from_secs(60)).success();
    let (straight, straight_weights) = final_weights(&server, "s3://ckpt/straight");
    assert_eq!(
        (straight.phase.as_str(), straight.epoch, straight.step),
        ("finetune", 1, 12)
    );

    // Once the first checkpoint's LATEST is written, every later write hangs: the second
    // checkpoint's upload never completes, and the whole job is killed in the middle of it.
    server.hold_writes_after("/ckpt/resumed/LATEST");
    let out = dir.path().join("resumed");
    let (mut coordinator, mut workers) = s3_cluster(dir.path(), &server, "s3://ckpt/resumed", &out);
    assert!(
        server.wait_for_held(Duration::from_secs(300)),
        "no upload reached the server:\n{}",
        coordinator.stderr()
    );
    for w in &mut workers {
        w.kill();
    }
    coordinator.kill();
    server.release();
    // Its lease on the root (2 s) lapses before the next coordinator takes it.
    std::thread::sleep(Duration::from_millis(2200));
    let (first, _) = final_weights(&server, "s3://ckpt/resumed");
    assert_eq!(
        (first.phase.as_str(), first.epoch, first.step),
        ("head", 1, 4),
        "the previous checkpoint is the one loaded"
    );

    // The same command again resumes from it and ends where the uninterrupted run ended.
    let (coordinator, workers) = s3_cluster(dir.path(), &server, "s3://ckpt/resumed", &out);
    for w in workers {
        let w = w.finish(Duration::from_secs(300)).success();
        assert!(w.stderr.contains("resumed from checkpoint"), "{}", w.stderr);
    }
    let coordinator = coordinator.finish(Duration::from_secs(60)).success();
    assert!(
        coordinator.stderr.contains("resuming from checkpoint"),
        "{}",
        coordinator.stderr
    );
    assert!(coordinator.stderr.contains(&first.name), "{}", coordinator.stderr);
    let (resumed, resumed_weights) = final_weights(&server, "s3://ckpt/resumed");
    assert_eq!(
        (resumed.phase.as_str(), resumed.epoch, resumed.step),
        ("finetune", 1, 12)
    );
    assert_eq!(resumed_weights.len(), straight_weights.len());
    for (name, tensor) in &straight_weights {
        assert!(
            resumed_weights.get(name) == Some(tensor),
            "tensor {name} differs after resuming"
        );
    }
    // The history spans the whole run, the epoch before the interruption included.
    let history: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("history.json")).unwrap()).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 3, "{history}");
}

/// The serving status `service` reports at `address` through `grpc.health.v1`, asked without
/// a join token, as a Kubernetes probe asks.
fn health_status(address: &str, service: &str) -> Result<i32, tonic::Code> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map(|r| r.into_inner().status)
            .map_err(|status| status.code())
    })
}

#[test]
fn both_binaries_answer_grpc_health_checks_without_a_token() {
    use tonic_health::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    // Two expected workers: the one that joins waits, serving its peer port.
    let (coordinator, address) = coordinator(&token, &["--workers", "2"]);
    assert_eq!(health_status(&address, ""), Ok(ServingStatus::Serving as i32));
    assert_eq!(
        health_status(&address, "cluster.v1.Coordinator"),
        Ok(ServingStatus::Serving as i32)
    );
    assert_eq!(
        health_status(&address, "cluster.v1.Nope"),
        Err(tonic::Code::NotFound)
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let advertise = format!("127.0.0.1:{port}");
    let mut worker = worker(&token, &address, &["join"], &["--cpu", "--advertise", &advertise]);
    worker.wait_for("joined", Duration::from_secs(60));
    assert_eq!(
        health_status(&advertise, "cluster.v1.Peer"),
        Ok(ServingStatus::Serving as i32)
    );
    drop(worker);
    drop(coordinator);
}

// One long test on purpose: every assertion below reads the same whole run of the real
// binaries (the slow part); split, each piece would start its own.
#[test]
fn metrics_move_during_a_local_run_and_secrets_stay_out_of_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    const SECRET: &str = "secret-token-that-must-never-be-logged";
    const AWS_SECRET: &str = "aws-secret-that-must-never-be-logged";
    let mut run = spawn(
        "coordinator",
        [
            "--log-format",
            "json",
            "start",
            "--local",
            "2",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data",
            "synthetic",
            "--weights",
            "none",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--head-epochs",
            "3",
            "--finetune-epochs",
            "1",
            "--limit-train",
            "64",
            "--limit-val",
            "16",
            "--limit-test",
            "20",
            "--out",
            out.to_str().unwrap(),
        ],
        &[("CLUSTER_TOKEN", SECRET), ("AWS_SECRET_ACCESS_KEY", AWS_SECRET)],
    );
    let address = logged_address(
        &run.wait_for_lines(
            &["metrics listening", "\"target\":\"coordinator\""],
            1,
            Duration::from_secs(60),
        )[0],
    );
    let worker_addresses: Vec<String> = run
        .wait_for_lines(
            &["metrics listening", "\"target\":\"worker::cluster\""],
            2,
            Duration::from_secs(60),
        )
        .iter()
        .map(|line| logged_address(line))
        .collect();
    let coordinator_address = logged_address(&run.wait_for("coordinator listening", Duration::from_secs(10)));
    // `status --json` lists every worker with its rank once the ring has formed.
    let status_deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = cluster_tests::spawn(
            "coordinator",
            ["status", "--coordinator", &coordinator_address, "--json"],
            &[("CLUSTER_TOKEN", SECRET)],
        )
        .finish(Duration::from_secs(30))
        .success()
        .json();
        // The first ring of this coordinator: generations count up from its lease's
        // incarnation in the high 32 bits.
        let first_ring = status["generation"]
            .as_u64()
            .is_some_and(|g| g & 0xffff_ffff == 1 && g >> 32 == 1);
        if status["workers"].as_array().map(|w| w.len()) == Some(2) && first_ring {
            break status;
        }
        assert!(
            Instant::now() < status_deadline,
            "the ring never formed: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut ranks: Vec<u64> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["rank"].as_u64().unwrap())
        .collect();
    ranks.sort();
    assert_eq!(ranks, [0, 1], "{status}");
    assert!(
        status["workers"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let mut steps_seen = std::collections::BTreeSet::new();
    let mut workers_seen = std::collections::BTreeSet::new();
    let mut worker_steps_seen = std::collections::BTreeSet::new();
    let mut worker_last = vec![String::new(); 2];
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Some(body) = scrape(&address) {
        // Workers hang up first when the run ends; keep their last scrape.
        for (i, worker) in worker_addresses.iter().enumerate() {
            if let Some(body) = scrape(worker) {
                if i == 0
                    && let Some(steps) = sample(&body, "effnet_worker_steps_total")
                {
                    worker_steps_seen.insert(steps as u64);
                }
                worker_last[i] = body;
            }
        }
        if let Some(steps) = sample(&body, "effnet_steps_total") {
            steps_seen.insert(steps as u64);
        }
        if let Some(workers) = sample(&body, "effnet_ranked_workers") {
            workers_seen.insert(workers as u64);
        }
        last = body;
        assert!(
            Instant::now() < deadline,
            "the run did not end:\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = run.finish(Duration::from_secs(60)).success();
    // 64 images over 2 ranks with batch 8: 4 steps an epoch; the counter climbed while we watched.
    assert!(steps_seen.len() >= 2, "steps seen: {steps_seen:?}\n{last}");
    assert!(
        steps_seen.iter().all(|s| s % 4 == 0 && *s <= 16),
        "{steps_seen:?}"
    );
    assert!(
        workers_seen.contains(&2),
        "ranked workers seen: {workers_seen:?}\n{last}"
    );
    for family in [
        "effnet_epoch_duration_seconds",
        "effnet_checkpoint_commit_duration_seconds",
    ] {
        assert!(
            last.contains(&format!("# TYPE {family} histogram")),
            "{family} missing:\n{last}"
        );
    }
    // Each worker took all 16 steps with 32 of the 64 images an epoch, sent exactly the
    // all-reduce bytes its ring position implies, and timed every step and data wait.
    assert!(
        worker_steps_seen.len() >= 2,
        "worker steps seen: {worker_steps_seen:?}\n{}",
        worker_last[0]
    );
    let mut ranks_seen = Vec::new();
    for body in &worker_last {
        assert_eq!(sample(body, "effnet_worker_steps_total"), Some(16.0), "{body}");
        assert_eq!(
            sample(body, "effnet_worker_train_images_total"),
            Some(128.0),
            "{body}"
        );
        assert_eq!(sample(body, "effnet_worker_world_size"), Some(2.0), "{body}");
        assert_eq!(
            sample(body, "effnet_worker_step_duration_seconds_count"),
            Some(16.0),
            "{body}"
        );
        assert_eq!(
            sample(body, "effnet_worker_data_wait_seconds_count"),
            Some(16.0),
            "{body}"
        );
        assert_eq!(
            sample(body, "effnet_worker_allreduce_duration_seconds_count"),
            Some(16.0),
            "{body}"
        );
        let sent = sample(body, "effnet_worker_allreduce_sent_bytes_total").unwrap_or(0.0);
        assert!(
            sent > 0.0 && (sent as u64).is_multiple_of(16 * 4),
            "{sent}\n{body}"
        );
        assert!(
            sample(body, "effnet_worker_train_loss").is_some_and(f64::is_finite),
            "{body}"
        );
        ranks_seen.push(sample(body, "effnet_worker_rank").unwrap_or(-1.0) as i64);
    }
    ranks_seen.sort();
    assert_eq!(ranks_seen, [0, 1]);
    // Only rank 0 uploads checkpoints, one at the end of each phase (the last scrape may
    // come before the final one: the worker exits soon after it).
    let mut uploads: Vec<f64> = worker_last
        .iter()
        .map(|b| sample(b, "effnet_worker_checkpoint_upload_duration_seconds_count").unwrap_or(-1.0))
        .collect();
    uploads.sort_by(f64::total_cmp);
    assert!(
        uploads[0] == 0.0 && [1.0, 2.0].contains(&uploads[1]),
        "{uploads:?}"
    );
    assert!(!run.stderr.contains(SECRET) && !run.stdout.contains(SECRET));
    assert!(!run.stderr.contains(AWS_SECRET) && !run.stdout.contains(AWS_SECRET));
}

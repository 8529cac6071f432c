//! Checkpoints against a real S3-protocol server with SigV4 enforced (`test-s3`: s3s over a
//! temporary directory, on loopback), and against local directories.

use checkpoint::{CheckpointStore, Manifest, ObjectEntry, PART_SIZE, Retention};
use test_s3::S3Server;

fn open(server: &S3Server, url: &str) -> CheckpointStore {
    let options = server.options();
    CheckpointStore::open_with(url, &options).unwrap()
}

/// Deterministic bytes that differ at every offset from a shifted copy.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect()
}

fn manifest(name: &str, run: &str, step: u64, acc: Option<f64>, objects: Vec<ObjectEntry>) -> Manifest {
    Manifest {
        format: 0,
        name: name.to_string(),
        run_id: run.to_string(),
        phase: "head".into(),
        epoch: step as u32,
        step,
        val_accuracy: acc,
        committed_unix_ms: 0,
        objects,
    }
}

/// Upload `objects` under a fresh name and commit them.
async fn save(
    store: &CheckpointStore,
    run: &str,
    step: u64,
    acc: Option<f64>,
    objects: &[(&str, Vec<u8>)],
) -> Manifest {
    let name = CheckpointStore::new_name(step, "head", step as u32);
    let mut entries = Vec::new();
    for (object, data) in objects {
        entries.push(store.upload(&name, object, data).await.unwrap());
    }
    store
        .commit(manifest(&name, run, step, acc, entries))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_is_bit_exact_with_multipart_objects() {
    let server = S3Server::start(&["ckpt"]);
    let store = open(&server, "s3://ckpt/runs/a");
    // Larger than two parts, and not a multiple of the part size.
    let weights = bytes(2 * PART_SIZE + 12_345, 1);
    let state = br#"{"epoch": 3}"#.to_vec();
    let committed = save(
        &store,
        "r1",
        30,
        Some(0.5),
        &[
            ("weights.safetensors", weights.clone()),
            ("state.json", state.clone()),
        ],
    )
    .await;
    assert_eq!(committed.format, checkpoint::FORMAT);
    assert!(committed.committed_unix_ms > 0);

    // A second process would open the same URL afresh.
    let reader = open(&server, "s3://ckpt/runs/a");
    let good = reader.latest_good().await.unwrap().expect("a checkpoint");
    assert!(good.skipped.is_empty());
    assert_eq!(good.manifest, committed);
    let back = reader.read(&good.manifest, "weights.safetensors").await.unwrap();
    assert_eq!(back.len(), weights.len());
    assert!(
        back.as_ref() == weights.as_slice(),
        "weights differ after the round trip"
    );
    assert_eq!(
        reader.read(&good.manifest, "state.json").await.unwrap().as_ref(),
        state.as_slice()
    );
    let err = reader
        .read(&good.manifest, "optimizer.bpk")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has no object optimizer.bpk") && err.contains("weights.safetensors"),
        "{err}"
    );

    // What the server holds: the objects, the manifest and the pointer, under the prefix.
    let dir = server.object_file("ckpt", &format!("runs/a/{}", committed.name));
    assert_eq!(
        std::fs::metadata(dir.join("weights.safetensors")).unwrap().len(),
        weights.len() as u64
    );
    assert!(dir.join("MANIFEST.json").is_file());
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(server.object_file("ckpt", "runs/a/LATEST")).unwrap()).unwrap();
    assert_eq!(latest["checkpoint"], committed.name.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_missing_objects_are_skipped_for_the_previous_checkpoint() {
    let server = S3Server::start(&["ckpt"]);
    let store = open(&server, "s3://ckpt/r");
    let first = save(
        &store,
        "r1",
        10,
        Some(0.4),
        &[("weights.safetensors", bytes(1000, 2))],
    )
    .await;
    let second = save(
        &store,
        "r1",
        20,
        Some(0.6),
        &[("weights.safetensors", bytes(1000, 3))],
    )
    .await;
    assert_eq!(
        store.latest_good().await.unwrap().unwrap().manifest.name,
        second.name
    );

    // Flip one byte of the newest checkpoint's weights behind the server's back.
    let file = server.object_file("ckpt", &format!("r/{}/weights.safetensors", second.name));
    let mut data = std::fs::read(&file).unwrap();
    data[500] ^= 0xff;
    std::fs::write(&file, &data).unwrap();
    let good = store.latest_good().await.unwrap().unwrap();
    assert_eq!(good.manifest.name, first.name);
    assert_eq!(good.skipped.len(), 1);
    assert!(
        good.skipped[0].contains("is corrupt") && good.skipped[0].contains(&second.name),
        "{:?}",
        good.skipped
    );
    // Reading the corrupt object directly fails too, naming what was expected.
    let err = store
        .read(&second, "weights.safetensors")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expected 1000 bytes with sha256") && err.contains(&second.weights_sha()),
        "{err}"
    );

    // A missing object is skipped the same way.
    std::fs::remove_file(&file).unwrap();
    let good = store.latest_good().await.unwrap().unwrap();
    assert_eq!(good.manifest.name, first.name);
    assert!(good.skipped[0].contains("missing"), "{:?}", good.skipped);

    // With the older one broken as well, nothing is loaded and the error says what to do.
    std::fs::remove_file(server.object_file("ckpt", &format!("r/{}/weights.safetensors", first.name)))
        .unwrap();
    let err = store.latest_good().await.unwrap_err().to_string();
    assert!(
        err.contains("none passes verification") && err.contains("--fresh"),
        "{err}"
    );
}

trait WeightsSha {
    fn weights_sha(&self) -> String;
}
impl WeightsSha for Manifest {
    fn weights_sha(&self) -> String {
        self.object("weights.safetensors").unwrap().sha256.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_refuses_objects_that_do_not_match_and_keeps_the_previous_one() {
    let server = S3Server::start(&["ckpt"]);
    let store = open(&server, "s3://ckpt/r");
    let first = save(&store, "r1", 1, None, &[("weights.safetensors", bytes(64, 4))]).await;
    let name = CheckpointStore::new_name(2, "head", 2);
    let mut entry = store
        .upload(&name, "weights.safetensors", &bytes(64, 5))
        .await
        .unwrap();
    entry.sha256 = "00".repeat(32);
    let err = store
        .commit(manifest(&name, "r1", 2, None, vec![entry]))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is corrupt"), "{err}");
    let missing = ObjectEntry {
        name: "optimizer.bpk".into(),
        size: 10,
        sha256: "00".repeat(32),
    };
    let err = store
        .commit(manifest(&name, "r1", 2, None, vec![missing]))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("optimizer.bpk"), "{err}");
    assert_eq!(store.latest().await.unwrap().unwrap().checkpoint, first.name);
    assert_eq!(
        store.latest_good().await.unwrap().unwrap().manifest.name,
        first.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_with_a_clear_error() {
    let server = S3Server::start(&["ckpt"]);
    let options = server.options_with_secret("not-the-secret-key-at-all");
    let store = CheckpointStore::open_with("s3://ckpt/r", &options).unwrap();
    let err = store
        .upload("step-1", "weights.safetensors", &[1, 2, 3])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refused the credentials") && err.contains("AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );
    assert!(err.contains("s3://ckpt/r/step-1/weights.safetensors"), "{err}");
    let err = store.latest_good().await.unwrap_err().to_string();
    assert!(err.contains("refused the credentials"), "{err}");
    // Nothing was written.
    assert!(
        std::fs::read_dir(server.object_file("ckpt", ""))
            .unwrap()
            .next()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_fails_after_bounded_retries() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let options = [
        ("aws_endpoint", endpoint.as_str()),
        ("aws_region", "us-east-1"),
        ("aws_access_key_id", test_s3::ACCESS_KEY),
        ("aws_secret_access_key", test_s3::SECRET_KEY),
    ];
    let store = CheckpointStore::open_with("s3://ckpt/r", &options).unwrap();
    let err = store
        .upload("step-1", "weights.safetensors", &[1, 2, 3])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot be reached") && err.contains("AWS_ENDPOINT_URL"),
        "{err}"
    );
    assert!(
        err.contains(&format!("after {} retries", storage::S3_MAX_RETRIES)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_last_k_the_best_and_latest_and_other_runs() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("ckpts");
    let store = CheckpointStore::open(url.to_str().unwrap()).unwrap();
    let old_run = save(&store, "r0", 1, Some(0.99), &[("w", bytes(8, 0))]).await;
    let mut names = Vec::new();
    for (step, acc) in [(10, 0.5), (20, 0.9), (30, 0.6), (40, 0.7), (50, 0.65)] {
        names.push(
            save(&store, "r1", step, Some(acc), &[("w", bytes(8, step))])
                .await
                .name,
        );
    }
    // A torn upload (objects, no manifest) between two commits.
    let torn = CheckpointStore::new_name(35, "head", 0);
    store.upload(&torn, "w", &bytes(8, 99)).await.unwrap();

    let deleted = store
        .prune(
            "r1",
            Retention {
                keep_last: 2,
                keep_best: true,
            },
        )
        .await
        .unwrap();
    let mut expected = vec![names[0].clone(), names[2].clone(), torn.clone()];
    expected.sort();
    let mut got = deleted.clone();
    got.sort();
    assert_eq!(got, expected);
    let (left, _) = store.list().await.unwrap();
    let left: Vec<&str> = left.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(left, [old_run.name.as_str(), &names[1], &names[3], &names[4]]);
    assert!(!url.join(&torn).join("w").exists());
    assert!(!url.join(&names[0]).join("w").exists());
    // No empty directory stays behind to be listed (and "deleted") again at the next prune.
    assert!(!url.join(&names[0]).exists() && !url.join(&torn).exists());
    let again = store
        .prune(
            "r1",
            Retention {
                keep_last: 2,
                keep_best: true,
            },
        )
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");

    // LATEST is never deleted, even when retention would not keep it.
    let deleted = store
        .prune(
            "r1",
            Retention {
                keep_last: 0,
                keep_best: false,
            },
        )
        .await
        .unwrap();
    assert!(!deleted.contains(&names[4]), "{deleted:?}");
    assert_eq!(
        store.latest_good().await.unwrap().unwrap().manifest.name,
        names[4]
    );
}

#[tokio::test]
async fn unreadable_manifests_and_pointers_are_reported_by_name() {
    let store = CheckpointStore::open("memory://checkpoint-format-test/x").unwrap();
    assert!(store.latest_good().await.unwrap().is_none());
    let good = save(&store, "r1", 5, None, &[("w", bytes(4, 1))]).await;
    let root = storage::Location::open("memory://checkpoint-format-test/x").unwrap();
    root.put("LATEST", b"not json".to_vec()).await.unwrap();
    // An unreadable pointer: found by listing instead.
    assert_eq!(
        store.latest_good().await.unwrap().unwrap().manifest.name,
        good.name
    );
    root.put(&format!("{}/MANIFEST.json", good.name), b"{}".to_vec())
        .await
        .unwrap();
    let err = store.latest_good().await.unwrap_err().to_string();
    assert!(
        err.contains("MANIFEST.json") && err.contains("not a checkpoint manifest"),
        "{err}"
    );
}

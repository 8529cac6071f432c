//! The checkpoint root's lease on every kind of store: a real S3-protocol server with SigV4
//! (`test-s3`), a local directory and memory.

use std::time::Duration;

use checkpoint::{CheckpointStore, Error, Manifest};
use test_s3::S3Server;

const TTL: Duration = Duration::from_secs(30);
const T0: u64 = 1_000_000;

/// A second holder is refused while the first's lease is live, takes over once it lapsed
/// (one incarnation more), and the first cannot renew any more; a release frees it at once.
async fn one_holder_at_a_time(store: &CheckpointStore) {
    let mut first = store.take_lease("coordinator A", TTL, T0).await.unwrap();
    assert_eq!(first.incarnation(), 1);
    first.renew(T0 + 10_000).await.unwrap();
    let err = store
        .take_lease("coordinator B", TTL, T0 + 20_000)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LeaseHeld { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("in use by another coordinator (coordinator A)"),
        "{text}"
    );
    assert!(text.contains("expires in 20 s"), "{text}");

    // A stopped the renewals (partitioned, paused): B takes the lapsed lease.
    let second = store.take_lease("coordinator B", TTL, T0 + 40_001).await.unwrap();
    assert_eq!(second.incarnation(), 2);
    let err = first.renew(T0 + 40_002).await.unwrap_err();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    assert!(err.to_string().contains("to coordinator B"), "{err}");

    second.release().await.unwrap();
    let third = store.take_lease("coordinator C", TTL, T0 + 40_003).await.unwrap();
    assert_eq!(third.incarnation(), 3, "a released lease is free at once");
}

fn manifest(name: &str, step: u64) -> Manifest {
    Manifest {
        format: 0,
        name: name.to_string(),
        run_id: "r".into(),
        phase: "head".into(),
        epoch: 1,
        step,
        val_accuracy: None,
        committed_unix_ms: 0,
        objects: vec![],
    }
}

/// `LATEST` never moves to an earlier checkpoint than the one it names.
async fn latest_never_moves_backwards(store: &CheckpointStore) {
    let later = CheckpointStore::new_name(20, "head", 2);
    let earlier = CheckpointStore::new_name(10, "head", 1);
    store.commit(manifest(&later, 20)).await.unwrap();
    let err = store.commit(manifest(&earlier, 10)).await.unwrap_err();
    assert!(matches!(err, Error::Backwards { .. }), "{err}");
    assert_eq!(store.latest().await.unwrap().unwrap().checkpoint, later);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_root_has_one_lease_holder_and_latest_only_moves_forward() {
    let server = S3Server::start(&["ckpt"]);
    let options = server.options();
    one_holder_at_a_time(&CheckpointStore::open_with("s3://ckpt/lease", &options).unwrap()).await;
    latest_never_moves_backwards(&CheckpointStore::open_with("s3://ckpt/latest", &options).unwrap()).await;
}

#[tokio::test]
async fn a_local_root_has_one_lease_holder_and_latest_only_moves_forward() {
    let dir = tempfile::tempdir().unwrap();
    one_holder_at_a_time(&CheckpointStore::open(dir.path().join("a").to_str().unwrap()).unwrap()).await;
    latest_never_moves_backwards(&CheckpointStore::open(dir.path().join("b").to_str().unwrap()).unwrap())
        .await;
}

#[tokio::test]
async fn a_memory_root_has_one_lease_holder() {
    one_holder_at_a_time(&CheckpointStore::open("memory://lease-test").unwrap()).await;
}

#[tokio::test]
async fn oversized_pointers_and_manifests_are_refused_before_they_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    std::fs::write(dir.path().join("LATEST"), vec![b' '; 100 << 10]).unwrap();
    let err = store.latest().await.unwrap_err().to_string();
    assert!(
        err.contains("LATEST is 102400 bytes, more than the 65536"),
        "{err}"
    );
    let name = CheckpointStore::new_name(1, "head", 1);
    std::fs::create_dir_all(dir.path().join(&name)).unwrap();
    let manifest = std::fs::File::create(dir.path().join(&name).join("MANIFEST.json")).unwrap();
    manifest.set_len(17 << 20).unwrap();
    let err = store.manifest(&name).await.unwrap_err().to_string();
    assert!(err.contains("MANIFEST.json is 17825792 bytes"), "{err}");
}

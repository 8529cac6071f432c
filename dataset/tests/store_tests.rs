//! Reading datasets from a local directory and through a real S3-protocol server (moto's
//! standalone server, `python3 -m moto.server`, a separate process on loopback; `.ci/run`
//! installs it).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataset::cifar;
use dataset::source::{Dataset, Item};
use dataset::store::DataStore;
use object_store::{ObjectStoreExt, PutPayload};

/// A moto S3 server on a free loopback port, stopped on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Option<Moto> {
        let importable = Command::new("python3")
            .args(["-c", "import moto.server"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !importable {
            assert!(std::env::var_os("CI").is_none(), "CI must install moto[server]");
            eprintln!("skipped: python3 cannot import moto.server; pip install 'moto[server]'");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 -m moto.server");
        let server = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(server)
    }

    /// Create a bucket with a plain S3 `PUT /bucket` request.
    fn create_bucket(&self, bucket: &str) {
        let addr = self.endpoint.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }

    fn options(&self) -> Vec<(&str, &str)> {
        vec![
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_access_key_id", "testing"),
            ("aws_secret_access_key", "testing"),
            ("aws_region", "us-east-1"),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pixels for record `i`.
fn pixels(i: usize) -> Vec<u8> {
    (0..3 * cifar::SIDE * cifar::SIDE)
        .map(|p| ((p * 13 + i * 101) % 256) as u8)
        .collect()
}

/// A small CIFAR-10 binary tree: 5 train files of `per_file` records and a test file of 4.
fn cifar_files(per_file: usize) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut n = 0;
    for name in cifar::TRAIN_FILES.iter().chain([&cifar::TEST_FILE]) {
        let count = if *name == cifar::TEST_FILE { 4 } else { per_file };
        let mut bytes = Vec::new();
        for _ in 0..count {
            bytes.extend(cifar::encode_record((n % 10) as u8, &pixels(n)));
            n += 1;
        }
        files.push((format!("cifar-10-batches-bin/{name}"), bytes));
    }
    let meta = cifar::CLASS_NAMES.join("\n") + "\n\n";
    files.push(("cifar-10-batches-bin/batches.meta.txt".into(), meta.into_bytes()));
    files
}

fn png(seed: u8, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([seed, x as u8, y as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn write_local(root: &Path, files: &[(String, Vec<u8>)]) {
    for (name, bytes) in files {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

async fn check_cifar(store: DataStore) {
    let mut ds = Dataset::open(store).await.unwrap();
    assert_eq!(ds.classes, cifar::CLASS_NAMES);
    assert_eq!((ds.train.len(), ds.test.len()), (15, 4));
    assert_eq!(ds.items[7], Item::Record { file: 2, index: 1 });
    assert_eq!(ds.labels(), None, "opening reads no records");
    let samples = ds.read(&[16, 3, 4, 0]).await.unwrap();
    for (sample, i) in samples.iter().zip([16, 3, 4, 0]) {
        assert_eq!(sample.label, (i % 10) as u16);
        assert_eq!((sample.width, sample.height), (32, 32));
        // The records were encoded from these interleaved pixels (planes on disk).
        assert_eq!(sample.rgb, pixels(i));
    }
    let labels: Vec<u16> = (0..19).map(|i| (i % 10) as u16).collect();
    assert_eq!(ds.load_labels().await.unwrap(), labels);
}

#[tokio::test]
async fn cifar_binary_from_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    write_local(dir.path(), &cifar_files(3));
    check_cifar(DataStore::open(dir.path().to_str().unwrap()).unwrap()).await;
    let url = format!("file://{}", dir.path().join("cifar-10-batches-bin").display());
    check_cifar(DataStore::open(&url).unwrap()).await;
}

#[tokio::test]
async fn cifar_and_image_folders_through_s3() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("data");
    let store = DataStore::open_with("s3://data/sets/cifar", &moto.options()).unwrap();
    for (name, bytes) in cifar_files(3) {
        store
            .store
            .put(&store.path(&name), PutPayload::from(bytes))
            .await
            .unwrap();
    }
    check_cifar(store).await;

    let folder = DataStore::open_with("s3://data/sets/pets", &moto.options()).unwrap();
    let files = [
        ("train/cat/a.png", png(1, 5, 4)),
        ("train/dog/b.png", png(2, 6, 3)),
        ("test/dog/c.png", png(3, 2, 2)),
    ];
    for (name, bytes) in &files {
        folder
            .store
            .put(&folder.path(name), PutPayload::from(bytes.clone()))
            .await
            .unwrap();
    }
    let ds = Dataset::open(folder).await.unwrap();
    assert_eq!(ds.classes, ["cat", "dog"]);
    assert_eq!(
        ds.labels(),
        Some(&[0, 1, 1][..]),
        "folder labels come from the paths"
    );
    assert_eq!((ds.train.len(), ds.test.len()), (2, 1));
    let s = ds.read(&[1, 2]).await.unwrap();
    assert_eq!((s[0].width, s[0].height, s[0].label, s[0].rgb[0]), (6, 3, 1, 2));
    assert_eq!((s[1].width, s[1].height, s[1].label), (2, 2, 1));

    // A bucket that does not exist is a clear error naming the location.
    let missing = DataStore::open_with("s3://no-such-bucket/x", &moto.options()).unwrap();
    let err = Dataset::open(missing).await.unwrap_err().to_string();
    assert!(err.contains("s3://no-such-bucket/x"), "{err}");
}

#[tokio::test]
async fn bad_files_are_named_with_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = cifar_files(2);
    files[1].1.truncate(cifar::RECORD + 100);
    write_local(dir.path(), &files);
    let err = Dataset::open(DataStore::open(dir.path().to_str().unwrap()).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data_batch_2.bin") && err.contains("offset 3073"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut files = cifar_files(2);
    files[0].1[cifar::RECORD] = 42;
    write_local(dir.path(), &files);
    let mut ds = Dataset::open(DataStore::open(dir.path().to_str().unwrap()).unwrap())
        .await
        .unwrap();
    let err = ds.read(&[0, 1]).await.unwrap_err().to_string();
    assert!(
        err.contains("data_batch_1.bin") && err.contains("record 1 has label 42"),
        "{err}"
    );
    let err = ds.load_labels().await.unwrap_err().to_string();
    assert!(
        err.contains("data_batch_1.bin") && err.contains("offset 3073"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    write_local(
        dir.path(),
        &[
            ("train/cat/a.png".into(), png(1, 2, 2)),
            ("train/cat/b.png".into(), b"not a png".to_vec()),
        ],
    );
    let ds = Dataset::open(DataStore::open(dir.path().to_str().unwrap()).unwrap())
        .await
        .unwrap();
    let err = ds.read(&[0, 1]).await.unwrap_err().to_string();
    assert!(
        err.contains("cannot decode image") && err.contains("train/cat/b.png"),
        "{err}"
    );

    let err = DataStore::open("/definitely/not/here").unwrap_err().to_string();
    assert!(
        err.contains("/definitely/not/here") && err.contains("no such directory"),
        "{err}"
    );
}

#[test]
fn prefetcher_yields_batches_in_order_and_stops_when_dropped() {
    use dataset::loader::{Prefetcher, batches};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    write_local(dir.path(), &cifar_files(4));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ds = Arc::new(
        rt.block_on(Dataset::open(
            DataStore::open(dir.path().to_str().unwrap()).unwrap(),
        ))
        .unwrap(),
    );
    let order: Vec<usize> = (0..20).rev().collect();
    let plan = batches(&order, 6);
    assert_eq!(plan.iter().map(Vec::len).collect::<Vec<_>>(), [6, 6, 6, 2]);
    let got: Vec<_> = Prefetcher::spawn(ds.clone(), plan.clone(), 2)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got.len(), 4);
    for (batch, want) in got.iter().zip(&plan) {
        assert_eq!(&batch.indices, want);
        assert_eq!(batch.samples, rt.block_on(ds.read(want)).unwrap());
    }
    // Taking one batch and dropping the rest returns promptly (the thread is not stuck on a
    // full queue).
    let mut early = Prefetcher::spawn(ds, plan, 1).unwrap();
    assert!(early.next().is_some());
    drop(early);
}

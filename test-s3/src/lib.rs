//! A real S3-protocol server for tests and benchmarks: `s3s` over a temporary directory
//! (`s3s-fs`), listening on loopback, with AWS Signature Version 4 enforced for one fixed key
//! pair. It runs on its own thread and runtime, so synchronous tests that start the project's
//! binaries can use it as well as async ones.
//!
//! A [`Gate`] can hold write requests to simulate an upload that never finishes, so a test
//! can kill the uploading process at a known point.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

/// The access key id the server accepts.
pub const ACCESS_KEY: &str = "AKIDEFFNETTEST0001";
/// The secret key the server accepts.
pub const SECRET_KEY: &str = "effnet-cluster-test-secret-key-0001";
/// The region clients sign for.
pub const REGION: &str = "us-east-1";

/// Holds write requests (PUT, POST) once armed and tripped, until released.
#[derive(Default)]
pub struct Gate {
    trip_on: Mutex<Option<String>>,
    tripped: AtomicBool,
    held: AtomicUsize,
    released: tokio::sync::Notify,
    open: AtomicBool,
}

impl Gate {
    async fn pass(&self, method: &hyper::Method, path: &str) {
        let writes = *method == hyper::Method::PUT || *method == hyper::Method::POST;
        if !writes {
            return;
        }
        if self.tripped.load(Ordering::SeqCst) && !self.open.load(Ordering::SeqCst) {
            self.held.fetch_add(1, Ordering::SeqCst);
            let released = self.released.notified();
            if !self.open.load(Ordering::SeqCst) {
                released.await;
            }
            self.held.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let trip = self
            .trip_on
            .lock()
            .map(|t| t.as_deref().is_some_and(|suffix| path.ends_with(suffix)))
            .unwrap_or(false);
        if trip {
            // This write goes through; every later one waits.
            self.tripped.store(true, Ordering::SeqCst);
        }
    }
}

/// A running server; stopped (and its directory removed) on drop.
pub struct S3Server {
    addr: SocketAddr,
    root: tempfile::TempDir,
    gate: Arc<Gate>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl S3Server {
    /// Start a server on a free loopback port, with the buckets `buckets` created.
    pub fn start(buckets: &[&str]) -> Self {
        let root = tempfile::tempdir().expect("a temporary directory for the S3 server");
        for bucket in buckets {
            std::fs::create_dir_all(root.path().join(bucket)).expect("create a bucket directory");
        }
        let gate = Arc::new(Gate::default());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let dir = root.path().to_path_buf();
        let thread_gate = gate.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime for the S3 server");
            runtime.block_on(serve(dir, thread_gate, addr_tx, stop_rx));
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the S3 server did not start");
        Self {
            addr,
            root,
            gate,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment a client needs: endpoint, region and the accepted credentials.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// The same as `object_store` S3 options (keys `aws_*`), with another secret if asked.
    pub fn options_with_secret(&self, secret: &str) -> Vec<(String, String)> {
        vec![
            ("aws_endpoint".into(), self.endpoint()),
            ("aws_region".into(), REGION.into()),
            ("aws_access_key_id".into(), ACCESS_KEY.into()),
            ("aws_secret_access_key".into(), secret.into()),
            ("aws_allow_http".into(), "true".into()),
        ]
    }

    /// `object_store` S3 options with the accepted credentials.
    pub fn options(&self) -> Vec<(String, String)> {
        self.options_with_secret(SECRET_KEY)
    }

    /// Where object `key` of `bucket` lives on disk, to corrupt it behind the server's back.
    pub fn object_file(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.path().join(bucket).join(key)
    }

    /// The server's directory.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// From the write whose path ends with `suffix` on, hold every later write request.
    pub fn hold_writes_after(&self, suffix: &str) {
        if let Ok(mut t) = self.gate.trip_on.lock() {
            *t = Some(suffix.to_string());
        }
    }

    /// How many write requests are being held now.
    pub fn held(&self) -> usize {
        self.gate.held.load(Ordering::SeqCst)
    }

    /// Wait until at least one write is held, up to `timeout`; whether one is.
    pub fn wait_for_held(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.held() > 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Let held writes go and stop holding.
    pub fn release(&self) {
        self.gate.open.store(true, Ordering::SeqCst);
        self.gate.released.notify_waiters();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.release();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    dir: PathBuf,
    gate: Arc<Gate>,
    addr_tx: std::sync::mpsc::Sender<SocketAddr>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let fs = s3s_fs::FileSystem::new(&dir).expect("an s3s-fs store over the temporary directory");
    let service = {
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        builder.build()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port for the S3 server");
    let _ = addr_tx.send(listener.local_addr().expect("the S3 server's address"));
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(_) => continue,
            },
            _ = &mut stop => break,
        };
        let service = service.clone();
        let gate = gate.clone();
        let handler = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let service = service.clone();
            let gate = gate.clone();
            async move {
                gate.pass(req.method(), req.uri().path()).await;
                hyper::service::Service::call(&service, req).await
            }
        });
        let conn = http.serve_connection(TokioIo::new(socket), handler).into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

//! Prometheus metrics plumbing shared by the coordinator and the workers: the `/metrics`
//! endpoint (OpenMetrics text over HTTP/1.1) and small helpers that register a value into a
//! [`Registry`] built at scrape time.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

pub use prometheus_client;

/// The media type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Produces the metrics text for one scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Register a gauge holding `value`.
pub fn gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(value);
    registry.register(name, help, g);
}

/// Register a counter (exposed as `<name>_total`, or `<name>_<unit>_total`) holding `value`.
pub fn counter(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>, value: f64) {
    let c = Counter::<f64, AtomicU64>::default();
    c.inc_by(value);
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, c),
        None => registry.register(name, help, c),
    }
}

/// Histogram buckets in seconds, doubling from `first` (14 of them: `first` to
/// `first * 8192`).
pub fn seconds_buckets(first: f64) -> impl Iterator<Item = f64> {
    exponential_buckets(first, 2.0, 14)
}

/// Register a histogram in seconds over `values`, buckets from [`seconds_buckets`].
pub fn seconds_histogram(
    registry: &mut Registry,
    name: &str,
    help: &str,
    first: f64,
    values: impl Iterator<Item = f64>,
) {
    let h = Histogram::new(seconds_buckets(first));
    for v in values {
        h.observe(v);
    }
    registry.register_with_unit(name, help, Unit::Seconds, h);
}

/// The OpenMetrics text of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// What one metrics endpoint allows, so that slow or silent clients cannot hold the process's
/// file descriptors or tasks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Connections served at once; further ones wait in the kernel's backlog, unaccepted.
    pub max_connections: usize,
    /// Time a client has to send its request headers.
    pub header_timeout: std::time::Duration,
    /// Time one connection may take in all (one request: keep-alive is off).
    pub connection_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            header_timeout: std::time::Duration::from_secs(5),
            connection_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// Serve `GET /metrics` on `listener`, rendering every scrape with `render`, until the task
/// is dropped. Other paths get 404. Within the default [`Limits`].
pub async fn serve(listener: TcpListener, render: Render) {
    serve_with(listener, render, Limits::default()).await
}

/// [`serve`] within `limits`.
pub async fn serve_with(listener: TcpListener, render: Render, limits: Limits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        // A connection is accepted only with a free slot.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "metrics listener cannot accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &*render)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false)
                .serve_connection(TokioIo::new(socket), service);
            let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
        });
    }
}

fn respond(
    req: &Request<hyper::body::Incoming>,
    render: &(dyn Fn() -> String + Send + Sync),
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        *response.status_mut() = StatusCode::NOT_FOUND;
        *response.body_mut() = Full::new(Bytes::from_static(b"not found: metrics are at /metrics\n"));
        return response;
    }
    if let Ok(value) = CONTENT_TYPE.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    *response.body_mut() = Full::new(Bytes::from(render()));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(address: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn silent_clients_are_cut_off_and_cannot_crowd_out_a_scrape() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let render: Render = Arc::new(|| "# EOF\n".to_string());
        let limits = Limits {
            max_connections: 4,
            header_timeout: std::time::Duration::from_millis(300),
            connection_timeout: std::time::Duration::from_secs(5),
        };
        let server = tokio::spawn(serve_with(listener, render, limits));
        // Ten clients connect and send nothing: more than the endpoint serves at once.
        let mut silent = Vec::new();
        for _ in 0..10 {
            silent.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
        let started = std::time::Instant::now();
        let scraped = tokio::time::timeout(std::time::Duration::from_secs(10), get(address, "/metrics"))
            .await
            .expect("a scrape gets through once the silent clients time out");
        assert!(scraped.starts_with("HTTP/1.0 200"), "{scraped}");
        let waited = started.elapsed();
        assert!(waited < std::time::Duration::from_secs(5), "{waited:?}");
        // The silent clients were hung up on (EOF, or a reset once the server closed).
        for mut client in silent {
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), client.read(&mut buf))
                .await
                .expect("the server closes a silent connection");
            assert!(
                read.as_ref()
                    .map_or(true, |&n| n == 0 || buf[..n].starts_with(b"HTTP/1.1 408")),
                "{read:?}"
            );
        }
        server.abort();
    }

    #[tokio::test]
    async fn every_scrape_renders_afresh_and_other_paths_are_not_found() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let scrapes = Arc::new(AtomicU64::new(0));
        let counted = scrapes.clone();
        let render: Render = Arc::new(move || {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let mut registry = Registry::with_prefix("demo");
            counter(&mut registry, "scrapes", "Scrapes so far", None, n as f64);
            seconds_histogram(&mut registry, "wait", "Waits", 0.5, [0.25, 3.0].into_iter());
            encode(&registry)
        });
        let server = tokio::spawn(serve(listener, render));
        let first = get(address, "/metrics").await;
        let second = get(address, "/metrics").await;
        assert!(first.starts_with("HTTP/1.0 200"), "{first}");
        assert!(
            first.contains("content-type: application/openmetrics-text"),
            "{first}"
        );
        assert!(first.contains("\ndemo_scrapes_total 1.0\n"), "{first}");
        assert!(second.contains("\ndemo_scrapes_total 2.0\n"), "{second}");
        // 0.25 falls in the first bucket (le 0.5), 3.0 in le 4.0.
        assert!(
            first.contains("demo_wait_seconds_bucket{le=\"0.5\"} 1\n"),
            "{first}"
        );
        assert!(
            first.contains("demo_wait_seconds_bucket{le=\"4.0\"} 2\n"),
            "{first}"
        );
        assert!(first.contains("demo_wait_seconds_sum 3.25\n"), "{first}");
        assert!(first.ends_with("# EOF\n"), "{first}");
        let missing = get(address, "/").await;
        assert!(missing.starts_with("HTTP/1.0 404"), "{missing}");
        assert!(missing.contains("metrics are at /metrics"), "{missing}");
        server.abort();
    }
}

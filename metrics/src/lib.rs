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

/// Serve `GET /metrics` on `listener`, rendering every scrape with `render`, until the task
/// is dropped. Other paths get 404.
pub async fn serve(listener: TcpListener, render: Render) {
    loop {
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
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &*render)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
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

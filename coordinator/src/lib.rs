//! The effnet-cluster coordinator: admits workers, assigns ranks, forms the ring from their
//! advertised peer addresses, hands out one unit of work at a time (an epoch of a phase, or
//! the all-reduce benchmark), aggregates the results and records checkpoints.

pub mod checkpoints;
pub mod cli;
pub mod config;
pub mod error;
pub mod local;
pub mod metrics;
pub mod progress;
pub mod report;
pub mod run;
pub mod service;
pub mod stuck;

use std::time::Duration;

use cluster_proto::auth::{ServerAuth, Token};
use cluster_proto::net::{self, MAX_MESSAGE_BYTES, TlsFiles};
use cluster_proto::v1::coordinator_server::CoordinatorServer;
use run_config::RunConfig;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

pub use error::{Error, Refusal};
use run::{Run, Stage};
use service::{CoordinatorService, Shared};

/// How the coordinator serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Workers to wait for.
    pub workers: usize,
    /// Fewest workers training continues with after losing some.
    pub min_workers: usize,
    /// Most workers in the ring (workers joining mid-run are admitted up to it).
    pub max_workers: usize,
    /// The cluster's join token.
    pub token: Token,
    /// TLS files (none: plaintext).
    pub tls: TlsFiles,
    /// A ranked worker silent for this long is presumed dead.
    pub heartbeat_timeout: Duration,
    /// A rank holding the ring up for this long is removed (see [`stuck`]).
    pub step_timeout: stuck::StepTimeout,
    /// After the run ends, how long to wait for workers to receive their final order.
    pub linger: Duration,
    /// Show a progress bar (interactive terminals).
    pub progress: bool,
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    /// The final state.
    pub run: Run,
}

/// Serve the `prepared` run on `listener` until it is over, or until `interrupt` resolves
/// with the reason to stop it.
pub async fn serve(
    prepared: checkpoints::Prepared,
    options: ServeOptions,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    interrupt: impl std::future::Future<Output = String>,
) -> Result<Outcome, Error> {
    let address = listener.local_addr().ok();
    let run_id = prepared.run.run_id.clone();
    let mut run = prepared.run;
    run.min_workers = options.min_workers;
    run.max_workers = options.max_workers;
    let shared = Shared::new(run);
    let lease = std::sync::Arc::new(tokio::sync::Mutex::new(prepared.lease));
    let service = InterceptedService::new(
        CoordinatorServer::new(CoordinatorService::new(
            shared.clone(),
            prepared.store,
            lease.clone(),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ServerAuth::new(options.token.clone()),
    );
    let mut server = net::server(options.tls.server()?)?;
    let (_health_reporter, health) = net::health(&["cluster.v1.Coordinator"]).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        server
            .add_service(health)
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );
    if !options.tls.enabled() && address.is_some_and(|a| !a.ip().is_loopback()) {
        tracing::warn!(
            "plaintext: the join token and all traffic cross the network unencrypted; use \
             --tls-cert/--tls-key/--tls-ca, or a network only the run's nodes reach (the \
             Kubernetes manifests ship a NetworkPolicy)"
        );
    }
    let address = address.map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(run = %run_id, address = %address, workers = options.workers, tls = options.tls.enabled(),
        "coordinator listening");

    let metrics = metrics_listener.map(|listener| {
        let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(address = %address, "metrics listening");
        let shared = shared.clone();
        let render: cluster_metrics::Render = std::sync::Arc::new(move || metrics::render(&shared.lock()));
        tokio::spawn(cluster_metrics::serve(listener, render))
    });
    let watchdog = {
        let shared = shared.clone();
        let limit = options.heartbeat_timeout;
        let step_timeout = options.step_timeout;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                shared.update(|run| {
                    let now = std::time::Instant::now();
                    run.check_liveness(limit, now);
                    run.check_progress(step_timeout, now);
                });
            }
        })
    };

    let renewer = tokio::spawn(renew_lease(lease.clone(), shared.clone()));

    tokio::pin!(interrupt);
    let progress = progress::Progress::new(options.progress);
    loop {
        let changed = shared.changed();
        progress.update(&shared.lock());
        if shared.lock().finished() {
            progress.finish(&shared.lock());
            break;
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            reason = &mut interrupt => {
                shared.update(|run| run.finish(Some(reason)));
                progress.finish(&shared.lock());
                break;
            }
        }
    }
    watchdog.abort();
    renewer.abort();
    if let Some(held) = lease.lock().await.take() {
        match held.release().await {
            Ok(()) => tracing::info!("released the checkpoint root's lease"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the checkpoint root's lease; it lapses by itself")
            }
        }
    }
    if let Some(metrics) = metrics {
        metrics.abort();
    }

    // Let workers read their final order and hang up before the server goes away.
    let deadline = tokio::time::Instant::now() + options.linger;
    while !shared.lock().workers.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    let run = std::mem::replace(
        &mut *shared.lock(),
        Run::new(String::new(), RunConfig::default(), 0),
    );
    debug_assert!(matches!(run.stage, Stage::Done | Stage::Failed));
    Ok(Outcome { run })
}

/// Renew the checkpoint root's lease every third of its time to live. A renewal that finds
/// the lease taken over stops the run: another coordinator commits to this root now. Other
/// failures (the store briefly unreachable) are retried at the next period.
async fn renew_lease(lease: service::SharedLease, shared: Shared) {
    let Some(ttl) = lease.lock().await.as_ref().map(checkpoint::Lease::ttl) else {
        return;
    };
    loop {
        tokio::time::sleep(ttl / 3).await;
        let mut held = lease.lock().await;
        let Some(current) = held.as_mut() else {
            return;
        };
        match current.renew(checkpoints::now_unix_ms()).await {
            Ok(()) => {}
            Err(e @ checkpoint::Error::LeaseLost { .. }) => {
                held.take();
                drop(held);
                let reason = format!("{e}; this coordinator stops (its workers stop with it)");
                tracing::error!(reason = %reason, "lease lost");
                shared.update(|run| run.finish(Some(reason)));
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the checkpoint root's lease; retrying"),
        }
    }
}

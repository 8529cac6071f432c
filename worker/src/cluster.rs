//! `worker join`: serve the peer service, join the coordinator, and carry out its orders
//! (epochs of either phase, or the all-reduce benchmark) over the ring it forms, until it
//! says the run is finished.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use burn::tensor::Device;
use checkpoint::CheckpointStore;
use cluster_proto::auth::{ClientAuth, ServerAuth, Token};
use cluster_proto::net::{self, MAX_MESSAGE_BYTES, TlsFiles};
use cluster_proto::v1::coordinator_client::CoordinatorClient;
use cluster_proto::v1::{
    Assignment, BenchResult, BenchRow, BenchWork, CheckpointCommit, EpochWork, HeartbeatRequest, JoinRequest,
    Order, StepChecksum, StoredObject, WorkReport, assignment::Work, order, work_report,
};
use collective::Ring;
use collective::bench::{Plan, measure};
use collective::grpc::{PeerService, RingLinks, connect_with_retry};
use run_config::RunConfig;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::{Error, Result};
use crate::metrics::WorkerMetrics;
use crate::train::{EpochOutcome, RingIo, Trainer, broken_before_steps, run_unit};
use crate::watch::Beat;

type Client = CoordinatorClient<InterceptedService<Channel, ClientAuth>>;

/// How often a worker tells the coordinator its step and whether it waits in the ring: the
/// coordinator's stuck-rank detection is this much late at most, plus its own check period.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How to join.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The coordinator's address (`host:port` or a URL).
    pub coordinator: String,
    /// The cluster's join token.
    pub token: Token,
    /// TLS files (none: plaintext).
    pub tls: TlsFiles,
    /// `host:port` other workers reach this one at; default: a free port on the address
    /// this host uses to reach the coordinator.
    pub advertise: Option<String>,
    /// This worker's name in logs and status.
    pub name: String,
    /// How long to keep retrying the first connection to the coordinator.
    pub connect_timeout: Duration,
    /// How long to keep trying to reach the coordinator again after losing it.
    pub coordinator_timeout: Duration,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// What the worker did, for the caller to print.
#[derive(Debug, Default)]
pub struct JoinOutcome {
    /// This worker's last rank.
    pub rank: Option<u32>,
    /// Benchmark rows, when the run was a benchmark and this worker measured them (rank 0).
    pub bench: Vec<BenchRow>,
    /// Ring size of the benchmark.
    pub world: u32,
}

/// Bind the peer listener and decide the address to advertise.
async fn bind_peer(advertise: Option<&str>, coordinator: &str) -> Result<(TcpListener, String)> {
    if let Some(advertise) = advertise {
        let (host, port) = advertise
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| Error::Usage(format!("--advertise {advertise:?}: expected HOST:PORT")))?;
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .map_err(|error| Error::Listen {
                what: format!("cannot listen for peers on port {port}"),
                error,
            })?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
        return Ok((listener, format!("{host}:{port}")));
    }
    let ip = local_ip_towards(coordinator)
        .await
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(|error| Error::Listen {
            what: "cannot listen for peers".into(),
            error,
        })?;
    let port = listener
        .local_addr()
        .map_err(|error| Error::Listen {
            what: "the peer listener has no address".into(),
            error,
        })?
        .port();
    Ok((listener, format!("{ip}:{port}")))
}

/// Whether `host:port` names this machine's loopback interface.
fn is_loopback(address: &str) -> bool {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The local address the OS routes to the coordinator from: reachable by the other workers
/// when they share its network (no packets are sent).
async fn local_ip_towards(coordinator: &str) -> Option<IpAddr> {
    let bare = coordinator
        .strip_prefix("http://")
        .or_else(|| coordinator.strip_prefix("https://"))
        .unwrap_or(coordinator);
    let target: SocketAddr = tokio::net::lookup_host(bare).await.ok()?.next()?;
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// Join the coordinator with `device` and work until the run ends.
pub async fn join(options: JoinOptions, device: Device, device_name: String) -> Result<JoinOutcome> {
    let (listener, advertise) = bind_peer(options.advertise.as_deref(), &options.coordinator).await?;
    if !options.tls.enabled() && !is_loopback(&advertise) {
        tracing::warn!(advertise = %advertise,
            "plaintext: the join token, gradients and weights cross the network unencrypted; use \
             --tls-cert/--tls-key/--tls-ca, or a network only the run's nodes reach");
    }
    let peer = PeerService::new();
    let (_health_reporter, health) = net::health(&["cluster.v1.Peer"]).await;
    let server = net::server(options.tls.server()?)?
        .add_service(health)
        .add_service(peer.clone().into_server(ServerAuth::new(options.token.clone())))
        .serve_with_incoming(TcpListenerStream::new(listener));
    let server = tokio::spawn(server);
    let step = Arc::new(Beat::default());
    let metrics = match options.metrics_listen {
        Some(address) => {
            let listener = TcpListener::bind(address).await.map_err(|error| Error::Listen {
                what: format!("cannot listen for metrics on {address}"),
                error,
            })?;
            let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(address = %bound, "metrics listening");
            let beat = step.clone();
            let render: cluster_metrics::Render = Arc::new(move || beat.metrics.render());
            Some(tokio::spawn(cluster_metrics::serve(listener, render)))
        }
        None => None,
    };
    let client_tls = options.tls.client()?;
    let endpoint = net::endpoint(&options.coordinator, client_tls.clone())?;
    let mut state = State {
        peer,
        auth: ClientAuth::new(&options.token),
        client_tls,
        links: None,
        trainer: None,
        device,
        outcome: JoinOutcome::default(),
        welcomed: false,
    };
    // Time to reach the coordinator: from the start, then from the moment it was lost (a
    // coordinator that is restarting may refuse or drop a few attempts first).
    let mut budget = (options.connect_timeout, "--connect-timeout");
    let mut deadline = tokio::time::Instant::now() + budget.0;
    let mut last_error = String::new();
    let result = loop {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        if wait.is_zero() {
            break Err(Error::Unreachable(format!(
                "cannot reach the coordinator at {} within {:.0} s ({}); is it running? last error: {last_error}",
                options.coordinator,
                budget.0.as_secs_f64(),
                budget.1
            )));
        }
        state.welcomed = false;
        match session(
            &options,
            &endpoint,
            &advertise,
            &device_name,
            wait,
            &step,
            &mut state,
        )
        .await
        {
            Err(Error::Fenced(why)) => {
                // The run went on without this worker; the coordinator is there and takes
                // it back as a new member (it gets the training state from rank 0).
                tracing::warn!(reason = %why, "removed from the run; joining again as a new worker");
                step.session.fetch_add(1, Ordering::Relaxed);
                state.peer.reset();
                state.links = None;
                state.trainer = None;
                budget = (options.coordinator_timeout, "--coordinator-timeout");
                deadline = tokio::time::Instant::now() + budget.0;
            }
            Err(Error::CoordinatorLost(why)) => {
                last_error.clone_from(&why);
                // Whatever this worker was doing belongs to the lost coordinator's run: stop
                // it, and let the restarted coordinator say where the run goes on (its last
                // committed checkpoint).
                step.session.fetch_add(1, Ordering::Relaxed);
                state.peer.reset();
                state.links = None;
                state.trainer = None;
                if state.welcomed {
                    budget = (options.coordinator_timeout, "--coordinator-timeout");
                    deadline = tokio::time::Instant::now() + budget.0;
                    tracing::warn!(reason = %why, retry_seconds = options.coordinator_timeout.as_secs_f64(),
                        "lost the coordinator; trying to reach it again");
                } else {
                    tracing::debug!(reason = %why, "the coordinator is not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            other => break other,
        }
    };
    server.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    result.map(|()| state.outcome)
}

/// One connection to the coordinator: join, then carry out its orders until the run ends
/// (`Ok`), fails, or the coordinator is lost ([`Error::CoordinatorLost`]).
async fn session(
    options: &JoinOptions,
    endpoint: &tonic::transport::Endpoint,
    advertise: &str,
    device_name: &str,
    wait: Duration,
    step: &Arc<Beat>,
    state: &mut State,
) -> Result<()> {
    // Connection failures go back to the caller, which keeps trying until its deadline.
    let channel = connect_with_retry(endpoint, wait)
        .await
        .map_err(Error::CoordinatorLost)?;
    let mut client: Client = CoordinatorClient::with_interceptor(channel, state.auth.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let request = JoinRequest {
        name: options.name.clone(),
        advertise: advertise.to_string(),
        device: device_name.to_string(),
    };
    let stream = client
        .join(request)
        .await
        .map_err(|s| rpc_error(&s, "the coordinator refused to admit this worker"))?
        .into_inner();
    let (reader, mut orders) = read_orders(stream);

    let worker_id = match orders.recv().await {
        Some(Ok(Order {
            order: Some(order::Order::Welcome(welcome)),
        })) => {
            state.welcomed = true;
            tracing::info!(worker = %welcome.worker_id, run = %welcome.run_id, advertise = %advertise,
                expected = welcome.expected_workers, "joined; waiting for the run to start");
            welcome.worker_id
        }
        Some(Err(e)) => return Err(Error::CoordinatorLost(e)),
        _ => {
            return Err(Error::Protocol(
                "the coordinator did not welcome this worker".into(),
            ));
        }
    };

    let heartbeat = send_heartbeats(client.clone(), step.clone(), worker_id.clone());

    let mut pending: VecDeque<Order> = VecDeque::new();
    let result = loop {
        let order = match pending.pop_front() {
            Some(order) => order,
            None => match orders.recv().await {
                Some(Ok(order)) => order,
                Some(Err(e)) => break Err(Error::CoordinatorLost(e)),
                None => {
                    break Err(Error::CoordinatorLost(
                        "the coordinator closed the connection".into(),
                    ));
                }
            },
        };
        match order.order {
            Some(order::Order::Finish(finish)) if finish.error.is_empty() => break Ok(()),
            Some(order::Order::Finish(finish)) => {
                break Err(Error::Stopped(finish.error));
            }
            Some(order::Order::Fenced(fenced)) => break Err(Error::Fenced(fenced.reason)),
            Some(order::Order::Welcome(_))
            | Some(order::Order::Regroup(_))
            | Some(order::Order::AbortRing(_))
            | None => continue,
            Some(order::Order::Assignment(assignment)) => {
                let work = state.execute(assignment, &worker_id, step, &mut client);
                tokio::pin!(work);
                // Watch the coordinator while working: when another worker dies it says so,
                // and waiting for this unit to finish would wait for a dead ring.
                let done = loop {
                    tokio::select! {
                        done = &mut work => break done,
                        order = orders.recv() => match order {
                            Some(Ok(Order { order: Some(order::Order::Finish(finish)) })) if !finish.error.is_empty() => {
                                break Err(Error::Stopped(finish.error));
                            }
                            Some(Ok(Order { order: Some(order::Order::Fenced(fenced)) })) => {
                                break Err(Error::Fenced(fenced.reason));
                            }
                            Some(Ok(Order { order: Some(order::Order::AbortRing(abort)) })) => {
                                tracing::warn!(generation = abort.generation, reason = %abort.reason,
                                    "the coordinator abandoned this ring");
                                step.watch.abort(abort.generation, &abort.reason);
                            }
                            Some(Ok(Order { order: Some(order::Order::Regroup(regroup)) })) => {
                                tracing::info!(generation = regroup.generation, "asked to stop after this step for new workers");
                                step.regroup.store(regroup.generation, Ordering::Relaxed);
                            }
                            Some(Ok(order)) => pending.push_back(order),
                            Some(Err(e)) => break Err(Error::CoordinatorLost(e)),
                            None => break Err(Error::CoordinatorLost("the coordinator closed the connection".into())),
                        },
                    }
                };
                if let Err(e) = done {
                    break Err(e);
                }
            }
        }
    };
    heartbeat.abort();
    reader.abort();
    result
}

/// The coordinator's orders, forwarded from `stream` by a task until it ends; its end or
/// failure arrives as the last item, an `Err` saying why.
fn read_orders(
    mut stream: tonic::Streaming<Order>,
) -> (
    tokio::task::JoinHandle<()>,
    mpsc::UnboundedReceiver<std::result::Result<Order, String>>,
) {
    let (order_tx, orders) = mpsc::unbounded_channel::<std::result::Result<Order, String>>();
    let reader = tokio::spawn(async move {
        loop {
            let item = match stream.message().await {
                Ok(Some(order)) => Ok(order),
                Ok(None) => Err("the coordinator closed the connection".to_string()),
                Err(status) => Err(format!("lost the coordinator: {}", status.message())),
            };
            let end = item.is_err();
            if order_tx.send(item).is_err() || end {
                return;
            }
        }
    });
    (reader, orders)
}

/// A task sending `beat`'s progress (step, waits, step time, checksums) as `worker_id`'s
/// heartbeat every [`HEARTBEAT_INTERVAL`] until aborted.
fn send_heartbeats(mut client: Client, beat: Arc<Beat>, worker_id: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(HEARTBEAT_INTERVAL).await;
            let request = HeartbeatRequest {
                worker_id: worker_id.clone(),
                step: beat.step.load(Ordering::Relaxed),
                waiting_seconds: beat.watch.waiting_seconds(),
                step_seconds: beat.watch.step_seconds(),
                generation: beat.watch.generation(),
                exchanging: beat.watch.exchanging(),
                checksums: beat
                    .drain()
                    .into_iter()
                    .map(|(step, weights_checksum, generation)| StepChecksum {
                        step,
                        weights_checksum,
                        generation,
                    })
                    .collect(),
            };
            if let Err(status) = client.heartbeat(request).await {
                tracing::warn!(error = %status.message(), "heartbeat failed");
            }
        }
    })
}

struct State {
    /// The current session got as far as the coordinator's welcome.
    welcomed: bool,
    peer: PeerService,
    auth: ClientAuth,
    client_tls: Option<tonic::transport::ClientTlsConfig>,
    links: Option<(u64, RingLinks)>,
    trainer: Option<Trainer>,
    device: Device,
    outcome: JoinOutcome,
}

impl State {
    /// Carry out one assignment of the coordinator's: open the ring's links when it is a
    /// new ring, do its work (an epoch, or the all-reduce benchmark) and report the result.
    async fn execute(
        &mut self,
        assignment: Assignment,
        worker_id: &str,
        step: &Arc<Beat>,
        client: &mut Client,
    ) -> Result<()> {
        let config = RunConfig::from_json(&assignment.config_json)
            .map_err(|e| Error::Protocol(format!("the assignment's run configuration: {e}")))?;
        let world = assignment.world as usize;
        let rank = assignment.rank as usize;
        if world == 0 || rank >= world || assignment.peers.len() != world {
            return Err(Error::Protocol(format!(
                "malformed assignment: rank {rank} of {world} with {} peer addresses",
                assignment.peers.len()
            )));
        }
        self.outcome.rank = Some(assignment.rank);
        let metrics = &step.metrics;
        metrics.rank.set(i64::from(assignment.rank));
        metrics.world.set(i64::from(assignment.world));
        metrics.generation.set(assignment.generation as i64);
        let ring = Ring {
            timeout: Duration::from_secs_f64(config.peer_timeout_s),
            bf16: config.bf16_allreduce,
            ..Ring::new(world, rank, assignment.generation)
        };
        if !self.open_links(&assignment, &ring, worker_id, client).await? {
            return Ok(());
        }
        let result = match assignment.work {
            Some(Work::Bench(bench)) => self.bench(bench, &ring, assignment.world).await?,
            Some(Work::Epoch(epoch)) => {
                let resume = Some(assignment.resume_checkpoint.clone()).filter(|n| !n.is_empty());
                let (generation, links, result) =
                    self.train_on_thread(&epoch, ring, &config, resume, step).await?;
                let (trainer, result) = result?;
                let result = match result? {
                    EpochOutcome::Done(result) => result,
                    EpochOutcome::Broken(broken) => {
                        // Closing this ring's links fails the neighbours still in it at once;
                        // the coordinator sends the next ring when every survivor reported.
                        drop(links);
                        self.trainer = trainer;
                        return report(
                            client,
                            worker_id,
                            assignment.generation,
                            work_report::Result::Broken(broken),
                        )
                        .await;
                    }
                };
                self.links = Some((generation, links));
                let at_step = epoch.first_step + result.steps;
                let trainer = self.trainer.insert(
                    trainer.ok_or_else(|| Error::Internal("the epoch ended without a trainer".into()))?,
                );
                if let Some(delay) = report_delay(rank) {
                    tracing::warn!(
                        ms = delay.as_millis() as u64,
                        "test hook: holding the epoch report back"
                    );
                    tokio::time::sleep(delay).await;
                }
                report(
                    client,
                    worker_id,
                    assignment.generation,
                    work_report::Result::Epoch(result),
                )
                .await?;
                // The coordinator holds the next unit until this checkpoint is committed.
                if epoch.checkpoint && rank == 0 {
                    checkpoint(
                        trainer,
                        &config,
                        &epoch,
                        at_step,
                        worker_id,
                        client,
                        &step.metrics,
                    )
                    .await?;
                }
                return Ok(());
            }
            None => return Err(Error::Protocol("the assignment carries no work".into())),
        };
        report(client, worker_id, assignment.generation, result).await
    }

    /// The epoch of `work` over `ring`, on a blocking thread (training is CPU/GPU-bound and
    /// synchronous; it drives the ring links through the runtime handle). Gives back the
    /// links with their generation, and what [`run_unit`] returned.
    async fn train_on_thread(
        &mut self,
        work: &EpochWork,
        ring: Ring,
        config: &RunConfig,
        resume: Option<String>,
        beat: &Arc<Beat>,
    ) -> Result<(u64, RingLinks, Result<(Option<Trainer>, Result<EpochOutcome>)>)> {
        let (generation, mut links) = self
            .links
            .take()
            .ok_or_else(|| Error::Internal("no ring links for the assignment".into()))?;
        let trainer = self.trainer.take();
        let device = self.device.clone();
        let beat = beat.clone();
        let handle = tokio::runtime::Handle::current();
        let (work, config) = (*work, config.clone());
        let (links, result) = tokio::task::spawn_blocking(move || {
            let mut io = RingIo {
                ring,
                next: &mut links.next,
                prev: &mut links.prev,
                handle,
                seconds: 0.0,
                watch: beat.watch.clone(),
            };
            io.watch.start_unit(generation);
            // Sharing the first weights or a joining worker's state: the coordinator's
            // stuck-rank check leaves every rank in it alone.
            if trainer.is_none() || work.sync {
                io.watch.begin_exchange();
            }
            let result = run_unit(trainer, resume, device, &config, &work, &mut io, &beat);
            io.watch.end_exchange();
            (links, result)
        })
        .await
        .map_err(|e| Error::Internal(format!("the training thread failed: {e}")))?;
        Ok((generation, links, result))
    }

    /// Open this rank's links of the ring of `assignment` unless they are open already (a
    /// new ring: first, or re-formed after a failure; the trainer, if any, keeps its state
    /// and re-shards the rest of the epoch for the new world size). `false` when a member
    /// could not be reached during training: that was reported as a broken ring, and the
    /// next assignment brings a new one.
    async fn open_links(
        &mut self,
        assignment: &Assignment,
        ring: &Ring,
        worker_id: &str,
        client: &mut Client,
    ) -> Result<bool> {
        if self.links.as_ref().map(|(g, _)| *g) == Some(assignment.generation) {
            return Ok(true);
        }
        let (world, rank) = (ring.world, ring.rank);
        self.links = None;
        let next = &assignment.peers[(rank + 1) % world];
        let endpoint = net::endpoint(next, self.client_tls.clone())?;
        let links = RingLinks::open(
            &self.peer,
            ring,
            &endpoint,
            self.auth.clone(),
            Duration::from_secs(30),
        )
        .await;
        let links = match (links, &assignment.work) {
            (Ok(links), _) => links,
            // A member died before the ring was up: like any broken ring during training,
            // say so and wait for the next one.
            (Err(e), Some(Work::Epoch(epoch))) => {
                let reason = format!("cannot reach rank {} at {next}: {e}", (rank + 1) % world);
                tracing::warn!(reason = %reason, "the ring broke before it formed");
                let broken = broken_before_steps(epoch, self.trainer.as_ref(), reason);
                report(
                    client,
                    worker_id,
                    assignment.generation,
                    work_report::Result::Broken(broken),
                )
                .await?;
                return Ok(false);
            }
            (Err(e), _) => {
                return Err(Error::Ring(format!(
                    "cannot reach rank {} at {next}: {e}",
                    (rank + 1) % world
                )));
            }
        };
        tracing::info!(generation = assignment.generation, rank, world, next = %next, "ring links open");
        self.links = Some((assignment.generation, links));
        Ok(true)
    }

    /// The all-reduce benchmark over the open ring; rank 0 keeps the table for its exit.
    async fn bench(&mut self, bench: BenchWork, ring: &Ring, world: u32) -> Result<work_report::Result> {
        let rank = ring.rank;
        let (_, links) = self
            .links
            .as_mut()
            .ok_or_else(|| Error::Internal("no ring links for the assignment".into()))?;
        let plan = Plan {
            sizes: bench.sizes,
            warmup: bench.warmup,
            iterations: bench.iterations,
        };
        let rows = measure(ring, &plan, &mut links.next, &mut links.prev)
            .await
            .map_err(|e| Error::Ring(e.to_string()))?;
        let rows: Vec<BenchRow> = rows
            .into_iter()
            .map(|r| BenchRow {
                bytes: r.bytes,
                median_seconds: r.median_seconds,
                algbw_gbps: r.algbw_gbps,
                busbw_gbps: r.busbw_gbps,
            })
            .collect();
        if rank == 0 {
            self.outcome.bench = rows.clone();
            self.outcome.world = world;
        }
        Ok(work_report::Result::Bench(BenchResult { rows }))
    }
}

/// A failed call to the coordinator: lost when it did not answer, refused otherwise.
fn rpc_error(status: &tonic::Status, refused: &str) -> Error {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
            Error::CoordinatorLost(status.message().to_string())
        }
        _ => Error::Refused {
            what: refused.to_string(),
            reason: status.message().to_string(),
        },
    }
}

async fn report(
    client: &mut Client,
    worker_id: &str,
    generation: u64,
    result: work_report::Result,
) -> Result<()> {
    client
        .report(WorkReport {
            worker_id: worker_id.to_string(),
            generation,
            result: Some(result),
        })
        .await
        .map_err(|s| rpc_error(&s, "the coordinator refused the report"))?;
    Ok(())
}

/// Rank 0's part of a checkpoint: upload the model and the optimizer state under a fresh
/// name, then ask the coordinator to verify and commit them.
async fn checkpoint(
    trainer: &Trainer,
    config: &RunConfig,
    epoch: &cluster_proto::v1::EpochWork,
    at_step: u64,
    worker_id: &str,
    client: &mut Client,
    metrics: &WorkerMetrics,
) -> Result<()> {
    let phase = cluster_proto::v1::Phase::try_from(epoch.phase).unwrap_or_default();
    let store = CheckpointStore::open(&config.checkpoint_url())?;
    let name = CheckpointStore::new_name(at_step, phase.label(), epoch.epoch + 1);
    let (model, optimizer) = trainer.checkpoint_parts()?;
    let started = std::time::Instant::now();
    let objects = crate::state::upload(&store, &name, model, optimizer).await?;
    let bytes: u64 = objects.iter().map(|o| o.size).sum();
    metrics
        .checkpoint_upload_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.checkpoint_upload_bytes.inc_by(bytes);
    tracing::info!(checkpoint = %store.describe(&name), bytes, seconds = started.elapsed().as_secs_f64(),
        "checkpoint uploaded");
    let committed = client
        .commit_checkpoint(CheckpointCommit {
            worker_id: worker_id.to_string(),
            checkpoint: name,
            phase: epoch.phase,
            epoch: epoch.epoch + 1,
            step: at_step,
            objects: objects
                .into_iter()
                .map(|o| StoredObject {
                    name: o.name,
                    size: o.size,
                    sha256: o.sha256,
                })
                .collect(),
        })
        .await;
    match committed {
        Ok(_) => Ok(()),
        // The run moved on while this checkpoint was uploaded (a ring was re-formed): the
        // epoch goes on and gets its checkpoint when it ends. Nothing this worker did wrong.
        Err(status) if status.code() == tonic::Code::Aborted => {
            tracing::warn!(reason = %status.message(), "checkpoint not committed; training goes on");
            Ok(())
        }
        Err(status) => Err(rpc_error(&status, "the coordinator refused the checkpoint")),
    }
}

/// Test hook: `EFFNET_TEST_DELAY_REPORT=RANK:MILLISECONDS` holds that rank's epoch reports
/// back, so that tests can make another rank's checkpoint commit overtake them.
fn report_delay(rank: usize) -> Option<Duration> {
    let (delayed, ms) = crate::train::rank_hook("EFFNET_TEST_DELAY_REPORT")?;
    (delayed == rank).then_some(Duration::from_millis(ms))
}

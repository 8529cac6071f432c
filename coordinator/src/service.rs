//! The `cluster.v1.Coordinator` gRPC service over the shared [`Run`].

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Instant;

use cluster_proto::v1::coordinator_server::Coordinator;
use cluster_proto::v1::{
    Ack, CheckpointCommit, HeartbeatReply, HeartbeatRequest, JoinRequest, Order, StatusReply, StatusRequest,
    WorkReport,
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::Refusal;
use crate::run::{Checkpointed, Run};
use checkpoint::{CheckpointStore, Lease};

/// The run, shared between handlers, with a signal for "something changed".
#[derive(Clone)]
pub struct Shared {
    run: Arc<Mutex<Run>>,
    changed: Arc<Notify>,
}

impl Shared {
    /// Share `run`.
    pub fn new(run: Run) -> Self {
        Self {
            run: Arc::new(Mutex::new(run)),
            changed: Arc::new(Notify::new()),
        }
    }

    /// Lock the run. A handler that panicked mid-update leaves it poisoned; the state is still
    /// the best information there is, so keep serving it.
    pub fn lock(&self) -> MutexGuard<'_, Run> {
        self.run.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wake whoever waits for a change.
    pub fn notify(&self) {
        self.changed.notify_waiters();
    }

    /// Wait until the run changes.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Ask `check` after every change of the run until it gives an answer. The waiter is
    /// registered before each look, so a change between the look and the wait is not missed.
    pub async fn when<T>(&self, mut check: impl FnMut(&Run) -> Option<T>) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(answer) = check(&self.lock()) {
                return answer;
            }
            notified.await;
        }
    }

    /// Run `f` on the run, then wake the waiters.
    pub fn update<T>(&self, f: impl FnOnce(&mut Run) -> T) -> T {
        let out = f(&mut self.lock());
        self.notify();
        out
    }
}

/// The coordinator's lease on the checkpoint root, shared by the renewals and the commits
/// (both rewrite `LEASE`, so they take turns); `None` once lost or released.
pub type SharedLease = Arc<tokio::sync::Mutex<Option<Lease>>>;

/// The gRPC service.
#[derive(Clone)]
pub struct CoordinatorService {
    shared: Shared,
    checkpoints: Option<CheckpointStore>,
    lease: SharedLease,
}

impl CoordinatorService {
    /// Serve `shared`, committing checkpoints under `checkpoints` while holding `lease`.
    pub fn new(shared: Shared, checkpoints: Option<CheckpointStore>, lease: SharedLease) -> Self {
        Self {
            shared,
            checkpoints,
            lease,
        }
    }
}

/// A worker's order stream; dropping it (the worker disconnected) tells the run.
pub struct Orders {
    inner: UnboundedReceiverStream<Order>,
    departure: Option<(Shared, String)>,
}

impl Stream for Orders {
    type Item = Result<Order, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx).map(|order| order.map(Ok))
    }
}

impl Drop for Orders {
    fn drop(&mut self) {
        if let Some((shared, id)) = self.departure.take() {
            shared.update(|run| run.depart(&id, Instant::now()));
        }
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type JoinStream = Orders;

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<Orders>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self
            .shared
            .update(|run| run.join(request, tx, Instant::now()))
            .map_err(|refusal| {
                tracing::warn!(peer = ?peer, reason = %refusal, "join refused");
                Status::from(refusal)
            })?;
        Ok(Response::new(Orders {
            inner: UnboundedReceiverStream::new(rx),
            departure: Some((self.shared.clone(), id)),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let request = request.into_inner();
        let checksums: Vec<(u64, u64, u64)> = request
            .checksums
            .iter()
            .map(|c| (c.step, c.weights_checksum, c.generation))
            .collect();
        let progress = crate::stuck::Reported {
            waiting_seconds: request.waiting_seconds,
            step_seconds: request.step_seconds,
            generation: request.generation,
            exchanging: request.exchanging,
        };
        let now = Instant::now();
        self.shared
            .update(|run| run.heartbeat(&request.worker_id, request.step, &checksums, progress, now))
            .map_err(Status::from)?;
        Ok(Response::new(HeartbeatReply {}))
    }

    async fn report(&self, request: Request<WorkReport>) -> Result<Response<Ack>, Status> {
        self.shared
            .update(|run| run.report(request.into_inner(), Instant::now()))
            .map_err(Status::from)?;
        Ok(Response::new(Ack {}))
    }

    async fn commit_checkpoint(&self, request: Request<CheckpointCommit>) -> Result<Response<Ack>, Status> {
        let Some(store) = &self.checkpoints else {
            return Err(Status::failed_precondition("this run keeps no checkpoints"));
        };
        // A commit that overtook a slower rank's epoch report waits for it (or for the run to
        // move on, which makes it superseded); the worker's call stays open meanwhile.
        let mut held = false;
        let decided = self
            .shared
            .when(|run| match run.prepare_commit(request.get_ref()) {
                Err(Refusal::NotYet(why)) => {
                    if !held {
                        held = true;
                        tracing::info!(checkpoint = %request.get_ref().checkpoint, reason = %why,
                            "checkpoint commit held until every rank has reported");
                    }
                    None
                }
                other => Some(other.map(|plan| (plan, run.config.keep_checkpoints))),
            })
            .await;
        let (plan, keep) = decided.map_err(|refusal| {
            if let Refusal::Superseded(why) = &refusal {
                tracing::warn!(reason = %why, "checkpoint commit superseded");
            }
            Status::from(refusal)
        })?;
        let name = plan.name.clone();
        let started = Instant::now();
        // Only the lease holder moves LATEST: renew it first (which proves it is still ours),
        // and keep it locked until the commit is done.
        let mut lease = self.lease.lock().await;
        let renewed = match lease.as_mut() {
            Some(held) => held.renew(crate::checkpoints::now_unix_ms()).await,
            None => Err(checkpoint::Error::LeaseLost {
                root: store.describe(""),
                by: "another coordinator".into(),
            }),
        };
        if let Err(e) = renewed {
            let reason = format!(
                "checkpoint {} not committed: {e}; the previous checkpoint is untouched",
                store.describe(&name)
            );
            self.shared.update(|run| run.finish(Some(reason.clone())));
            return Err(Status::failed_precondition(reason));
        }
        let committed = crate::checkpoints::commit(store, plan, keep).await;
        drop(lease);
        match committed {
            Ok(manifest) => {
                let stat = crate::run::CommitStat {
                    seconds: started.elapsed().as_secs_f64(),
                    bytes: manifest.objects.iter().map(|o| o.size).sum(),
                };
                self.shared.update(|run| {
                    run.commit_stats.push(stat);
                    run.checkpoint_committed(
                        Checkpointed {
                            location: store.describe(&manifest.name),
                            name: manifest.name.clone(),
                            step: manifest.step,
                        },
                        Instant::now(),
                    )
                });
                Ok(Response::new(Ack {}))
            }
            Err(e) => {
                let reason = format!(
                    "checkpoint {} could not be committed: {e}; the previous checkpoint is untouched",
                    store.describe(&name)
                );
                self.shared.update(|run| run.finish(Some(reason.clone())));
                Err(Status::internal(reason))
            }
        }
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        Ok(Response::new(self.shared.lock().status(Instant::now())))
    }
}

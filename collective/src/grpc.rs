//! The ring over gRPC: each rank streams pieces to the next rank through one client-streaming
//! `cluster.v1.Peer/Ring` call per ring generation, and serves the same call for the previous
//! rank.
//!
//! A stream is named by its ring generation and sender rank (metadata); the receiving
//! [`PeerService`] accepts exactly the stream it expects and refuses stale or foreign ones,
//! so a worker from an old ring can never feed values into a new one.
//!
//! Both ends run on tonic's transport (its channel, server, TLS, HTTP/2 settings and the
//! cluster's auth interceptors) but frame the messages themselves ([`crate::wire`]): the
//! values go out in the buffers the collective filled and are read in the frames they arrived
//! in, instead of being copied through tonic's codec buffers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use cluster_proto::auth::{ClientAuth, ServerAuth, Token};
use cluster_proto::net::MAX_MESSAGE_BYTES;
use cluster_proto::v1::RingSummary;
use cluster_proto::{GENERATION_HEADER, SENDER_HEADER};
use http_body::Frame;
use http_body_util::BodyExt;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tower_service::Service;

use crate::wire::{self, Deframer};
use crate::{Link, Piece};

/// The RPC's path.
const RING_PATH: &str = "/cluster.v1.Peer/Ring";

/// How long an incoming stream waits for this rank to expect it (ranks learn about a new
/// ring at slightly different times).
const ACCEPT_WAIT: Duration = Duration::from_secs(30);

struct Expected {
    generation: u64,
    sender: u32,
    tx: Option<oneshot::Sender<Incoming>>,
}

/// An accepted `Ring` call, handed from the server to the rank's [`InboundLink`], which
/// reads the request body itself (one task less between the socket and the sums).
struct Incoming {
    body: Body,
    /// How the call ends: the pieces taken, or why the stream was refused.
    done: oneshot::Sender<Result<u64, Status>>,
}

#[derive(Default)]
struct Inbox {
    expected: Mutex<Option<Expected>>,
    changed: Notify,
}

/// The receiving side of the ring: the `Peer` service of one worker.
#[derive(Clone, Default)]
pub struct PeerService {
    inbox: Arc<Inbox>,
}

impl PeerService {
    /// A service expecting nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Expect generation `generation`'s stream from rank `sender`, replacing any earlier
    /// expectation (whose stream is then refused); returns the link that yields its pieces.
    pub fn expect(&self, generation: u64, sender: usize) -> InboundLink {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut expected) = self.inbox.expected.lock() {
            *expected = Some(Expected {
                generation,
                sender: sender as u32,
                tx: Some(tx),
            });
        }
        self.inbox.changed.notify_waiters();
        InboundLink {
            generation,
            sender,
            state: Inbound::Waiting(rx),
        }
    }

    /// Forget the expected stream (its link ends): a new coordinator numbers rings afresh.
    pub fn reset(&self) {
        if let Ok(mut expected) = self.inbox.expected.lock() {
            *expected = None;
        }
        self.inbox.changed.notify_waiters();
    }

    /// The service to add to a tonic server, behind `auth`; it refuses messages over the
    /// cluster's message limit.
    pub fn into_server(self, auth: ServerAuth) -> InterceptedService<RingServer, ServerAuth> {
        InterceptedService::new(RingServer { peer: self }, auth)
    }

    /// Wait until this rank expects `(generation, sender)` and take the sending half.
    async fn accept(&self, generation: u64, sender: u32) -> Result<oneshot::Sender<Incoming>, Status> {
        let deadline = tokio::time::Instant::now() + ACCEPT_WAIT;
        loop {
            let notified = self.inbox.changed.notified();
            {
                let mut guard = self
                    .inbox
                    .expected
                    .lock()
                    .map_err(|_| Status::internal("peer inbox poisoned"))?;
                if let Some(expected) = guard.as_mut() {
                    if generation < expected.generation {
                        return Err(Status::failed_precondition(format!(
                            "stale ring: stream for generation {generation}, this rank is in generation {}",
                            expected.generation
                        )));
                    }
                    if generation == expected.generation {
                        if sender != expected.sender {
                            return Err(Status::failed_precondition(format!(
                                "rank {sender} is not this rank's predecessor in generation {generation} \
                                 (expected rank {})",
                                expected.sender
                            )));
                        }
                        return expected.tx.take().ok_or_else(|| {
                            Status::already_exists(format!(
                                "a stream from rank {sender} for generation {generation} is already open"
                            ))
                        });
                    }
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::deadline_exceeded(format!(
                    "this rank never joined ring generation {generation} within {ACCEPT_WAIT:?}"
                )));
            }
        }
    }
}

/// The `cluster.v1.Peer` service as tonic's server runs it (see [`PeerService::into_server`]).
#[derive(Clone)]
pub struct RingServer {
    peer: PeerService,
}

impl NamedService for RingServer {
    const NAME: &'static str = "cluster.v1.Peer";
}

impl Service<http::Request<Body>> for RingServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let peer = self.peer.clone();
        Box::pin(async move {
            if request.uri().path() != RING_PATH {
                let status = Status::unimplemented(format!("no method {}", request.uri().path()));
                return Ok(status.into_http());
            }
            Ok(match peer.ring(request).await {
                Ok(pieces) => summary_response(pieces),
                Err(status) => status.into_http(),
            })
        })
    }
}

/// A successful call's response: one `RingSummary` message, then `grpc-status: 0`.
fn summary_response(pieces: u64) -> http::Response<Body> {
    let summary = RingSummary { pieces }.encode_to_vec();
    let mut message = BytesMut::with_capacity(5 + summary.len());
    message.extend_from_slice(&[0]);
    message.extend_from_slice(&(summary.len() as u32).to_be_bytes());
    message.extend_from_slice(&summary);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [Frame::data(message.freeze()), Frame::trailers(trailers)];
    let body = http_body_util::StreamBody::new(tokio_stream::iter(frames.map(Ok::<_, Infallible>)));
    let mut response = http::Response::new(Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

fn header_u64(headers: &http::HeaderMap, key: &str) -> Result<u64, Status> {
    headers
        .get(key)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Status::invalid_argument(format!("missing or malformed {key} metadata")))
}

impl PeerService {
    /// Serve one `Ring` call: hand its body to the rank expecting it and wait until that
    /// rank is done with it.
    async fn ring(&self, request: http::Request<Body>) -> Result<u64, Status> {
        let generation = header_u64(request.headers(), GENERATION_HEADER)?;
        let sender = u32::try_from(header_u64(request.headers(), SENDER_HEADER)?)
            .map_err(|_| Status::invalid_argument("sender rank out of range"))?;
        let tx = self.accept(generation, sender).await?;
        let (done, outcome) = oneshot::channel();
        let incoming = Incoming {
            body: request.into_body(),
            done,
        };
        if tx.send(incoming).is_err() {
            return Err(Status::unavailable(format!(
                "this rank left ring generation {generation} before rank {sender}'s stream arrived"
            )));
        }
        // A link dropped without a word has left the ring (a newer generation or shutdown):
        // the stream ends there, as a completed call.
        outcome.await.unwrap_or(Ok(0))
    }
}

/// Pieces arriving from the previous rank: the body of its `Ring` call, read and framed
/// here, in the rank's own task.
pub struct InboundLink {
    generation: u64,
    sender: usize,
    state: Inbound,
}

enum Inbound {
    /// The call has not arrived yet.
    Waiting(oneshot::Receiver<Incoming>),
    /// Reading it.
    Open(Stream),
    /// It ended; the reason is repeated to every later `recv`.
    Ended(String),
}

struct Stream {
    body: Body,
    deframer: Deframer,
    pieces: u64,
    /// Told how the call ended when the stream is dropped.
    done: Option<oneshot::Sender<Result<u64, Status>>>,
}

impl Stream {
    /// The next piece, or the status to end the call with and the reason for the collective.
    async fn next(&mut self, generation: u64, sender: usize) -> Result<Piece, (Option<Status>, String)> {
        let broke = |reason: String| format!("stream from rank {sender} broke: {reason}");
        loop {
            let message = self
                .deframer
                .next_message()
                .map_err(|reason| (Some(Status::invalid_argument(reason.clone())), broke(reason)))?;
            if let Some(message) = message {
                let piece = wire::decode(generation, message)
                    .map_err(|reason| (Some(Status::invalid_argument(reason.clone())), broke(reason)))?;
                self.pieces += 1;
                return Ok(piece);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.deframer.push(data);
                    }
                }
                // The transport broke: the call has no one to answer.
                Some(Err(status)) => return Err((None, broke(status.message().to_string()))),
                None if self.deframer.is_mid_message() => {
                    let reason = "the stream ended inside a message".to_string();
                    return Err((Some(Status::invalid_argument(reason.clone())), broke(reason)));
                }
                None => return Err((None, "the previous rank closed its stream".into())),
            }
        }
    }

    fn finish(&mut self, outcome: Result<u64, Status>) {
        if let Some(done) = self.done.take() {
            let _ = done.send(outcome);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let pieces = self.pieces;
        self.finish(Ok(pieces));
    }
}

impl Link for InboundLink {
    async fn send(&mut self, _piece: Piece) -> Result<(), String> {
        Err("an inbound link only receives".into())
    }

    async fn recv(&mut self) -> Result<Piece, String> {
        if let Inbound::Waiting(rx) = &mut self.state {
            self.state = match rx.await {
                Ok(incoming) => Inbound::Open(Stream {
                    body: incoming.body,
                    deframer: Deframer::new(MAX_MESSAGE_BYTES),
                    pieces: 0,
                    done: Some(incoming.done),
                }),
                Err(_) => Inbound::Ended(format!(
                    "no stream from rank {} for ring generation {}: this rank stopped expecting it",
                    self.sender, self.generation
                )),
            };
        }
        let stream = match &mut self.state {
            Inbound::Open(stream) => stream,
            Inbound::Ended(reason) => return Err(reason.clone()),
            Inbound::Waiting(_) => return Err("the previous rank's stream has not arrived".into()),
        };
        match stream.next(self.generation, self.sender).await {
            Ok(piece) => Ok(piece),
            Err((status, reason)) => {
                if let Some(status) = status {
                    stream.finish(Err(status));
                }
                self.state = Inbound::Ended(reason.clone());
                Err(reason)
            }
        }
    }
}

/// The stream to the next rank.
pub struct OutboundLink {
    tx: Option<mpsc::Sender<Vec<Bytes>>>,
    call: Option<JoinHandle<Result<u64, Status>>>,
}

/// Options of an outbound stream.
#[derive(Debug, Clone, Copy)]
pub struct OutboundOptions {
    /// Ring generation the stream belongs to.
    pub generation: u64,
    /// This rank.
    pub sender: usize,
    /// Pieces queued ahead of the network.
    pub depth: usize,
}

/// The request body of a `Ring` call: each queued message's frames, in order.
struct RingBody {
    rx: mpsc::Receiver<Vec<Bytes>>,
    frames: std::vec::IntoIter<Bytes>,
}

impl http_body::Body for RingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        loop {
            if let Some(bytes) = self.frames.next() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(frames)) => self.frames = frames.into_iter(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl OutboundLink {
    /// Open the stream to the next rank at `endpoint`, retrying the connection for up to
    /// `connect_for` (the peer may still be starting).
    pub async fn connect(
        endpoint: &Endpoint,
        auth: ClientAuth,
        options: OutboundOptions,
        connect_for: Duration,
    ) -> Result<Self, String> {
        let channel = connect_with_retry(endpoint, connect_for).await?;
        let (tx, rx) = mpsc::channel(options.depth.max(1));
        let body = RingBody {
            rx,
            frames: Vec::new().into_iter(),
        };
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(RING_PATH)
            .version(http::Version::HTTP_2)
            .header(http::header::TE, "trailers")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(GENERATION_HEADER, options.generation)
            .header(SENDER_HEADER, options.sender)
            .body(Body::new(body))
            .map_err(|e| format!("cannot build the ring request: {e}"))?;
        let call = tokio::spawn(ring_call(InterceptedService::new(channel, auth), request));
        Ok(Self {
            tx: Some(tx),
            call: Some(call),
        })
    }

    /// End the stream cleanly and wait for the receiver's summary.
    pub async fn close(mut self) -> Result<u64, String> {
        self.tx = None;
        match self.call.take() {
            Some(call) => match call.await {
                Ok(Ok(pieces)) => Ok(pieces),
                Ok(Err(status)) => Err(status.message().to_string()),
                Err(e) => Err(e.to_string()),
            },
            None => Ok(0),
        }
    }

    /// Why the call ended, once sending failed.
    async fn failure(&mut self) -> String {
        match self.call.take() {
            Some(call) => match call.await {
                Ok(Err(status)) => format!("{} ({:?})", status.message(), status.code()),
                Ok(Ok(_)) => "the next rank ended the stream".into(),
                Err(e) => e.to_string(),
            },
            None => "the stream is closed".into(),
        }
    }
}

/// Make the `Ring` call and read its outcome: the number of pieces the receiver took, or
/// the status it ended the call with.
async fn ring_call(
    mut service: InterceptedService<Channel, ClientAuth>,
    request: http::Request<Body>,
) -> Result<u64, Status> {
    std::future::poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(|e| Status::unavailable(format!("the next rank's connection failed: {e}")))?;
    let response = service
        .call(request)
        .await
        .map_err(|e| Status::unavailable(format!("the ring call failed: {e}")))?;
    let (parts, mut body) = response.into_parts();
    // An error before any message comes as headers alone ("trailers-only").
    if let Some(status) = Status::from_header_map(&parts.headers)
        && status.code() != tonic::Code::Ok
    {
        return Err(status);
    }
    if !parts.status.is_success() {
        return Err(Status::unknown(format!(
            "the next rank answered HTTP {}",
            parts.status
        )));
    }
    let mut data = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::unavailable(format!("the ring response broke: {e}")))?;
        match frame.into_data() {
            Ok(bytes) => data.extend_from_slice(&bytes),
            Err(frame) => {
                if let Some(status) = frame.trailers_ref().and_then(Status::from_header_map)
                    && status.code() != tonic::Code::Ok
                {
                    return Err(status);
                }
            }
        }
    }
    if data.len() < 5 {
        return Err(Status::internal("the next rank sent no ring summary"));
    }
    data.advance(5);
    RingSummary::decode(data.freeze())
        .map(|summary| summary.pieces)
        .map_err(|e| Status::internal(format!("malformed ring summary: {e}")))
}

impl Link for OutboundLink {
    async fn send(&mut self, piece: Piece) -> Result<(), String> {
        let frames = wire::encode(&piece);
        let sent = match &self.tx {
            Some(tx) => tx.send(frames).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            self.tx = None;
            Err(self.failure().await)
        }
    }

    async fn recv(&mut self) -> Result<Piece, String> {
        Err("an outbound link only sends".into())
    }
}

/// Connect, retrying with exponential backoff (100 ms doubling to 2 s) for up to `total`.
pub async fn connect_with_retry(endpoint: &Endpoint, total: Duration) -> Result<Channel, String> {
    let deadline = tokio::time::Instant::now() + total;
    let mut backoff = Duration::from_millis(100);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    let source = std::error::Error::source(&e)
                        .map(|s| format!(": {s}"))
                        .unwrap_or_default();
                    return Err(format!(
                        "cannot connect to {} within {total:?}: {e}{source}",
                        endpoint.uri()
                    ));
                }
                tracing::debug!(uri = %endpoint.uri(), error = %e, "connect failed; retrying");
                // The last wait ends at the deadline, so the whole time is tried.
                tokio::time::sleep(backoff.min(deadline - now)).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Both links of one rank in a ring over gRPC.
pub struct RingLinks {
    /// To rank + 1.
    pub next: OutboundLink,
    /// From rank - 1.
    pub prev: InboundLink,
}

impl RingLinks {
    /// Expect the previous rank's stream and open this rank's stream to `next_endpoint`.
    pub async fn open(
        service: &PeerService,
        ring: &crate::Ring,
        next_endpoint: &Endpoint,
        auth: ClientAuth,
        connect_for: Duration,
    ) -> Result<Self, String> {
        let prev = service.expect(ring.generation, (ring.rank + ring.world - 1) % ring.world);
        let options = OutboundOptions {
            generation: ring.generation,
            sender: ring.rank,
            depth: 4,
        };
        let next = OutboundLink::connect(next_endpoint, auth, options, connect_for).await?;
        Ok(Self { next, prev })
    }
}

/// Peer servers for `n` ranks in this process, each on its own loopback port, sharing a
/// random token: the gRPC ring without separate processes (benchmarks and tests).
pub struct LocalPeers {
    /// The cluster token.
    pub token: Token,
    /// Each rank's peer service.
    pub services: Vec<PeerService>,
    /// Each rank's server address.
    pub addresses: Vec<SocketAddr>,
    servers: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl LocalPeers {
    /// Start `n` servers.
    pub async fn start(n: usize) -> Result<Self, String> {
        let token = Token::random().map_err(|e| format!("cannot create a token: {e}"))?;
        let mut peers = Self {
            token,
            services: Vec::new(),
            addresses: Vec::new(),
            servers: Vec::new(),
        };
        for _ in 0..n {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| format!("cannot bind a loopback port: {e}"))?;
            peers
                .addresses
                .push(listener.local_addr().map_err(|e| e.to_string())?);
            let service = PeerService::new();
            let server = cluster_proto::net::server(None)
                .map_err(|e| e.to_string())?
                .add_service(service.clone().into_server(ServerAuth::new(peers.token.clone())))
                .serve_with_incoming(TcpListenerStream::new(listener));
            peers.servers.push(tokio::spawn(server));
            peers.services.push(service);
        }
        Ok(peers)
    }

    /// Open `ring.rank`'s links (a future that does not borrow `self`).
    pub fn links(
        &self,
        ring: &crate::Ring,
    ) -> impl std::future::Future<Output = Result<RingLinks, String>> + Send + 'static {
        let service = self.services[ring.rank].clone();
        let next = self.addresses[(ring.rank + 1) % ring.world].to_string();
        let auth = ClientAuth::new(&self.token);
        let ring = *ring;
        async move {
            let endpoint = cluster_proto::net::endpoint(&next, None).map_err(|e| e.to_string())?;
            RingLinks::open(&service, &ring, &endpoint, auth, Duration::from_secs(10)).await
        }
    }
}

impl Drop for LocalPeers {
    fn drop(&mut self) {
        for server in &self.servers {
            server.abort();
        }
    }
}

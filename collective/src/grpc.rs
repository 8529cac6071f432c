//! The ring over gRPC: each rank streams pieces to the next rank through one client-streaming
//! `Peer.Ring` call per ring generation, and serves the same call for the previous rank.
//!
//! A stream is named by its ring generation and sender rank (metadata); the receiving
//! [`PeerService`] accepts exactly the stream it expects and refuses stale or foreign ones,
//! so a worker from an old ring can never feed values into a new one.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster_proto::auth::{ClientAuth, ServerAuth, Token};
use cluster_proto::net::MAX_MESSAGE_BYTES;
use cluster_proto::v1::peer_client::PeerClient;
use cluster_proto::v1::peer_server::{Peer, PeerServer};
use cluster_proto::v1::{self, Encoding, RingSummary};
use cluster_proto::{GENERATION_HEADER, SENDER_HEADER};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::{Link, Phase, Piece, Tag, Values};

/// How long an incoming stream waits for this rank to expect it (ranks learn about a new
/// ring at slightly different times).
const ACCEPT_WAIT: Duration = Duration::from_secs(30);

struct Expected {
    generation: u64,
    sender: u32,
    tx: Option<mpsc::Sender<Result<Piece, String>>>,
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
    pub fn expect(&self, generation: u64, sender: usize, depth: usize) -> InboundLink {
        let (tx, rx) = mpsc::channel(depth.max(1));
        if let Ok(mut expected) = self.inbox.expected.lock() {
            *expected = Some(Expected {
                generation,
                sender: sender as u32,
                tx: Some(tx),
            });
        }
        self.inbox.changed.notify_waiters();
        InboundLink { rx }
    }

    /// Forget the expected stream (its link ends): a new coordinator numbers rings afresh.
    pub fn reset(&self) {
        if let Ok(mut expected) = self.inbox.expected.lock() {
            *expected = None;
        }
        self.inbox.changed.notify_waiters();
    }

    /// The tonic service, behind `auth` and the cluster's message limits.
    pub fn into_server(self, auth: ServerAuth) -> InterceptedService<PeerServer<Self>, ServerAuth> {
        InterceptedService::new(
            PeerServer::new(self)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth,
        )
    }

    /// Wait until this rank expects `(generation, sender)` and take the sending half.
    async fn accept(
        &self,
        generation: u64,
        sender: u32,
    ) -> Result<mpsc::Sender<Result<Piece, String>>, Status> {
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

fn header_u64(request: &Request<Streaming<v1::Piece>>, key: &str) -> Result<u64, Status> {
    request
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Status::invalid_argument(format!("missing or malformed {key} metadata")))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn ring(&self, request: Request<Streaming<v1::Piece>>) -> Result<Response<RingSummary>, Status> {
        let generation = header_u64(&request, GENERATION_HEADER)?;
        let sender = u32::try_from(header_u64(&request, SENDER_HEADER)?)
            .map_err(|_| Status::invalid_argument("sender rank out of range"))?;
        let tx = self.accept(generation, sender).await?;
        let mut stream = request.into_inner();
        let mut pieces = 0u64;
        loop {
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(status) => {
                    // Tell the collective why, then end: a broken predecessor ends the ring.
                    let reason = format!("stream from rank {sender} broke: {}", status.message());
                    let _ = tx.send(Err(reason)).await;
                    return Err(status);
                }
            };
            let piece = decode(generation, message).map_err(Status::invalid_argument)?;
            if tx.send(Ok(piece)).await.is_err() {
                // This rank left the ring (a newer generation or shutdown).
                break;
            }
            pieces += 1;
        }
        Ok(Response::new(RingSummary { pieces }))
    }
}

fn decode(generation: u64, message: v1::Piece) -> Result<Piece, String> {
    let phase = match message.phase {
        0 => Phase::ReduceScatter,
        1 => Phase::AllGather,
        other => return Err(format!("unknown collective phase {other}")),
    };
    let data = match Encoding::try_from(message.encoding) {
        Ok(Encoding::F32) if message.data.len().is_multiple_of(4) => Values::LeF32(message.data),
        Ok(Encoding::Bf16) if message.data.len().is_multiple_of(2) => Values::LeBf16(message.data),
        Ok(encoding) => {
            return Err(format!(
                "{} bytes is not a whole number of {encoding:?} values",
                message.data.len()
            ));
        }
        Err(_) => return Err(format!("unknown value encoding {}", message.encoding)),
    };
    Ok(Piece {
        tag: Tag {
            generation,
            step: message.step,
            phase,
            round: message.round,
            chunk: message.chunk,
            offset: message.offset,
        },
        data,
    })
}

fn encode(tag: &Tag, values: &[f32], bf16: bool) -> v1::Piece {
    let (encoding, data) = if bf16 {
        let mut bytes = vec![0u8; values.len() * 2];
        for (dst, v) in bytes.chunks_exact_mut(2).zip(values) {
            dst.copy_from_slice(&crate::to_bf16_bits(*v).to_le_bytes());
        }
        (Encoding::Bf16, bytes)
    } else if cfg!(target_endian = "little") {
        // The in-memory layout is the wire layout: one copy.
        (Encoding::F32, bytemuck::cast_slice::<f32, u8>(values).to_vec())
    } else {
        let mut bytes = vec![0u8; values.len() * 4];
        for (dst, v) in bytes.chunks_exact_mut(4).zip(values) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        (Encoding::F32, bytes)
    };
    v1::Piece {
        step: tag.step,
        phase: match tag.phase {
            Phase::ReduceScatter => 0,
            Phase::AllGather => 1,
        },
        round: tag.round,
        chunk: tag.chunk,
        offset: tag.offset,
        encoding: encoding as i32,
        data: Bytes::from(data),
    }
}

/// Pieces arriving from the previous rank.
pub struct InboundLink {
    rx: mpsc::Receiver<Result<Piece, String>>,
}

impl Link for InboundLink {
    async fn send(&mut self, _tag: Tag, _data: &[f32]) -> Result<(), String> {
        Err("an inbound link only receives".into())
    }

    async fn recv(&mut self) -> Result<Piece, String> {
        match self.rx.recv().await {
            Some(item) => item,
            None => Err("the previous rank closed its stream".into()),
        }
    }
}

/// The stream to the next rank.
pub struct OutboundLink {
    tx: Option<mpsc::Sender<v1::Piece>>,
    call: Option<JoinHandle<Result<Response<RingSummary>, Status>>>,
    bf16: bool,
}

/// Options of an outbound stream.
#[derive(Debug, Clone, Copy)]
pub struct OutboundOptions {
    /// Ring generation the stream belongs to.
    pub generation: u64,
    /// This rank.
    pub sender: usize,
    /// Encode values as bfloat16 on the wire.
    pub bf16: bool,
    /// Pieces queued ahead of the network.
    pub depth: usize,
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
        let mut client = PeerClient::with_interceptor(channel, auth)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(options.depth.max(1));
        let mut request = Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert(GENERATION_HEADER, options.generation.into());
        request
            .metadata_mut()
            .insert(SENDER_HEADER, (options.sender as u64).into());
        let call = tokio::spawn(async move { client.ring(request).await });
        Ok(Self {
            tx: Some(tx),
            call: Some(call),
            bf16: options.bf16,
        })
    }

    /// End the stream cleanly and wait for the receiver's summary.
    pub async fn close(mut self) -> Result<u64, String> {
        self.tx = None;
        match self.call.take() {
            Some(call) => match call.await {
                Ok(Ok(summary)) => Ok(summary.into_inner().pieces),
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

impl Link for OutboundLink {
    async fn send(&mut self, tag: Tag, data: &[f32]) -> Result<(), String> {
        let message = encode(&tag, data, self.bf16);
        let sent = match &self.tx {
            Some(tx) => tx.send(message).await.is_ok(),
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
        let prev = service.expect(ring.generation, (ring.rank + ring.world - 1) % ring.world, 4);
        let options = OutboundOptions {
            generation: ring.generation,
            sender: ring.rank,
            bf16: ring.bf16,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_survive_encoding() {
        let tag = Tag {
            generation: 7,
            step: 3,
            phase: Phase::AllGather,
            round: 1,
            chunk: 2,
            offset: 5,
        };
        let values = [1.5, -0.0, f32::MAX, 3.25e-20];
        let piece = decode(7, encode(&tag, &values, false)).unwrap();
        assert_eq!(piece.tag, tag);
        assert_eq!(piece.data.to_vec(), values);
        assert!(piece.data.to_vec()[1].is_sign_negative());
        let halved = decode(7, encode(&tag, &values, true)).unwrap();
        let rounded: Vec<f32> = values.iter().map(|&v| crate::round_bf16(v)).collect();
        assert_eq!(halved.data.to_vec(), rounded);
        assert_eq!(encode(&tag, &values, true).data.len(), 8);
    }

    #[test]
    fn unaligned_wire_bytes_decode_the_same() {
        // One byte of offset makes the in-place view impossible: the slow path must agree.
        let values = [0.25f32, -3.0, 7.5];
        let mut raw = vec![0u8];
        for v in values {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        let unaligned = Values::LeF32(Bytes::from(raw).slice(1..));
        assert_eq!(unaligned.to_vec(), values);
    }

    #[test]
    fn malformed_pieces_are_refused() {
        let tag = Tag {
            generation: 0,
            step: 0,
            phase: Phase::ReduceScatter,
            round: 0,
            chunk: 0,
            offset: 0,
        };
        let mut message = encode(&tag, &[1.0], false);
        message.data = Bytes::from_static(&[1, 2, 3]);
        assert!(decode(0, message.clone()).unwrap_err().contains("3 bytes"));
        message.phase = 9;
        assert!(decode(0, message).unwrap_err().contains("phase 9"));
    }
}

//! The effnet-cluster wire protocol: the `cluster.v1` gRPC services generated from
//! `cluster-proto/cluster/v1/cluster.proto`, the protocol version, join-token authentication and the
//! transport settings every node uses (HTTP/2 windows, message limits, timeouts, TLS).

pub mod auth;
pub mod net;

/// Generated messages, clients and servers of package `cluster.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("cluster.v1");
}

/// Version of the protocol spoken on the wire. Nodes refuse peers that speak another one.
pub const PROTOCOL_VERSION: u32 = 3;

/// Metadata key carrying [`PROTOCOL_VERSION`] on every call.
pub const PROTOCOL_HEADER: &str = "x-cluster-protocol";

/// Metadata key naming the ring generation of a peer stream.
pub const GENERATION_HEADER: &str = "x-ring-generation";

/// Metadata key naming the sending rank of a peer stream.
pub const SENDER_HEADER: &str = "x-ring-sender";

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while setting up the protocol's security and transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The join token file could not be read.
    #[error("cannot read the join token from {path}: {error}")]
    TokenFile {
        /// The file.
        path: String,
        /// Why (in the message, not repeated as a source).
        error: std::io::Error,
    },
    /// No token was configured anywhere.
    #[error(
        "no join token: pass --token-file FILE or set CLUSTER_TOKEN (every node of a cluster needs the same \
         secret; create one with `openssl rand -hex 32 > token`)"
    )]
    NoToken,
    /// The token is too short to be a secret.
    #[error(
        "the join token from {origin} has {len} characters; use at least {min} (e.g. `openssl rand -hex 32`)"
    )]
    WeakToken {
        /// Where it came from.
        origin: String,
        /// Its length.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// The token cannot travel in an HTTP/2 header.
    #[error("the join token from {origin} contains characters not allowed in a header (use printable ASCII)")]
    TokenCharacters {
        /// Where it came from.
        origin: String,
    },
    /// A TLS file could not be read.
    #[error("cannot read the TLS {what} file {path}: {source}")]
    TlsFile {
        /// Certificate, key or CA.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS options are incomplete.
    #[error("TLS needs {0}")]
    TlsIncomplete(&'static str),
    /// The address could not be used as a gRPC endpoint.
    #[error("invalid address {address:?}: {reason}")]
    Address {
        /// What was given.
        address: String,
        /// Why it is not usable.
        reason: String,
    },
    /// The transport library refused the configuration.
    #[error("transport configuration: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Phase names shared by logs, configs and status output.
impl v1::Phase {
    /// Lowercase name used in logs and JSON.
    pub fn label(self) -> &'static str {
        match self {
            v1::Phase::Unspecified => "unspecified",
            v1::Phase::Head => "head",
            v1::Phase::Finetune => "finetune",
        }
    }
}

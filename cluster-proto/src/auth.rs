//! Join-token authentication and protocol-version checks, applied to every RPC.
//!
//! Clients attach `authorization: Bearer <token>` and `x-cluster-protocol: <version>`; servers
//! compare the token in constant time before any handler runs.

use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::{Error, PROTOCOL_HEADER, PROTOCOL_VERSION, Result};

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// The shared secret of a cluster. Its `Debug` output never shows the value.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token from a string, checked for length and header-safe characters; surrounding
    /// whitespace (a trailing newline in a file) is ignored.
    pub fn new(value: &str, origin: &str) -> Result<Self> {
        let value = value.trim();
        if value.len() < MIN_TOKEN_LEN {
            return Err(Error::WeakToken {
                origin: origin.to_string(),
                len: value.len(),
                min: MIN_TOKEN_LEN,
            });
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::TokenCharacters {
                origin: origin.to_string(),
            });
        }
        Ok(Self(value.into()))
    }

    /// The token from `file` if given, else from the `CLUSTER_TOKEN` environment variable
    /// (empty counts as unset).
    pub fn load(file: Option<&Path>) -> Result<Self> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|error| Error::TokenFile {
                path: path.display().to_string(),
                error,
            })?;
            return Self::new(&text, &path.display().to_string());
        }
        match std::env::var("CLUSTER_TOKEN") {
            // An empty variable is how shells unset things for one command.
            Ok(value) if !value.trim().is_empty() => Self::new(&value, "CLUSTER_TOKEN"),
            _ => Err(Error::NoToken),
        }
    }

    /// A fresh random token (128 bits from the OS), for single-node runs that start every
    /// process themselves.
    pub fn random() -> std::io::Result<Self> {
        let mut bytes = [0u8; 16];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self(hex.into()))
    }

    /// The secret itself, to hand to a child process.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn header(&self) -> MetadataValue<Ascii> {
        // Checked at construction: printable ASCII always parses.
        MetadataValue::try_from(format!("Bearer {}", self.0))
            .unwrap_or_else(|_| MetadataValue::from_static(""))
    }
}

/// Server side: refuses calls without the right token or protocol version.
#[derive(Clone, Debug)]
pub struct ServerAuth {
    token: Token,
}

impl ServerAuth {
    /// Checks calls against `token`.
    pub fn new(token: Token) -> Self {
        Self { token }
    }

    /// Check one call's metadata.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing join token (authorization: Bearer ...)"))?;
        if !bool::from(presented.as_bytes().ct_eq(self.token.0.as_bytes())) {
            return Err(Status::unauthenticated(
                "wrong join token: use the same --token-file or CLUSTER_TOKEN on every node",
            ));
        }
        let version = metadata.get(PROTOCOL_HEADER).and_then(|v| v.to_str().ok());
        if version != Some(PROTOCOL_VERSION.to_string().as_str()) {
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: this node speaks cluster.v1 protocol {PROTOCOL_VERSION}, the caller sent {}; \
                 run the same effnet-cluster release on every node",
                version.unwrap_or("none")
            )));
        }
        Ok(())
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

/// Client side: attaches the token and the protocol version to every call.
#[derive(Clone, Debug)]
pub struct ClientAuth {
    header: MetadataValue<Ascii>,
    version: MetadataValue<Ascii>,
}

impl ClientAuth {
    /// Presents `token` and this build's protocol version.
    pub fn new(token: &Token) -> Self {
        Self::with_version(token, PROTOCOL_VERSION)
    }

    /// Presents another protocol version (for testing refusal).
    pub fn with_version(token: &Token, version: u32) -> Self {
        Self {
            header: token.header(),
            version: MetadataValue::from(version),
        }
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
        request
            .metadata_mut()
            .insert(PROTOCOL_HEADER, self.version.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token::new("0123456789abcdef0123", "test").unwrap()
    }

    #[test]
    fn right_token_and_version_pass() {
        let mut request = Request::new(());
        request = ClientAuth::new(&token()).call(request).unwrap();
        assert!(ServerAuth::new(token()).check(request.metadata()).is_ok());
    }

    #[test]
    fn wrong_or_missing_token_is_unauthenticated() {
        let other = Token::new("0123456789abcdef0124", "test").unwrap();
        let request = ClientAuth::new(&other).call(Request::new(())).unwrap();
        let status = ServerAuth::new(token()).check(request.metadata()).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("wrong join token"));
        let status = ServerAuth::new(token())
            .check(Request::new(()).metadata())
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("missing join token"));
    }

    #[test]
    fn other_protocol_version_is_refused() {
        let request = ClientAuth::with_version(&token(), 99)
            .call(Request::new(()))
            .unwrap();
        let status = ServerAuth::new(token()).check(request.metadata()).unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status
                .message()
                .contains(&format!("protocol {PROTOCOL_VERSION}, the caller sent 99")),
            "{}",
            status.message()
        );
    }

    #[test]
    fn short_or_binary_tokens_are_rejected_and_debug_redacts() {
        assert!(matches!(
            Token::new("short", "x"),
            Err(Error::WeakToken { len: 5, .. })
        ));
        assert!(matches!(
            Token::new("0123456789abcdef 0123", "x"),
            Err(Error::TokenCharacters { .. })
        ));
        assert_eq!(
            Token::new(" 0123456789abcdef\n", "x").unwrap().expose(),
            "0123456789abcdef"
        );
        assert_eq!(format!("{:?}", token()), "Token(<redacted>)");
        assert_eq!(Token::random().unwrap().expose().len(), 32);
    }
}

//! Transport settings shared by every server and client of the cluster: HTTP/2 flow-control
//! windows sized for bulk gradient traffic, message-size limits, keepalives and optional TLS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

use crate::{Error, Result};

/// Largest message any service accepts. Gradient pieces are at most a few MiB; anything
/// bigger is a bug or an attack.
pub const MAX_MESSAGE_BYTES: usize = 32 << 20;

/// Per-stream HTTP/2 window. The default 64 KiB would stall a gradient stream every 64 KiB
/// waiting for a window update; a few pieces in flight keep the link busy.
const STREAM_WINDOW: u32 = 32 << 20;
/// Per-connection HTTP/2 window.
const CONNECTION_WINDOW: u32 = 64 << 20;
/// HTTP/2 frame size: larger frames mean fewer headers and wakeups per MiB.
const FRAME_SIZE: u32 = 1 << 20;
/// Dead connections are noticed by HTTP/2 pings within interval + timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS files given on the command line. Without any, traffic is plaintext.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// This node's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    pub key: Option<PathBuf>,
    /// The CA that signed every node's certificate (PEM). Servers then also require client
    /// certificates signed by it (mutual TLS).
    pub ca: Option<PathBuf>,
    /// `--tls-client-auth none`: a server accepts clients without certificates. Never by
    /// default: a server with a certificate but no CA is refused instead of silently taking
    /// any client.
    pub no_client_auth: bool,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::TlsFile {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Make ring rustls' process-wide crypto provider (idempotent). Two providers are compiled
/// in, and rustls panics rather than pick one.
fn install_crypto() {
    // An error only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TlsFiles {
    /// Whether any TLS option was given.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    fn identity(&self) -> Result<Option<Identity>> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some(Identity::from_pem(
                read("certificate", cert)?,
                read("key", key)?,
            ))),
            (None, None) => Ok(None),
            _ => Err(Error::TlsIncomplete("both --tls-cert and --tls-key")),
        }
    }

    /// Server configuration: certificate and key are required; with a CA, clients must
    /// present certificates it signed.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>> {
        if !self.enabled() {
            return Ok(None);
        }
        install_crypto();
        let identity = self
            .identity()?
            .ok_or(Error::TlsIncomplete("--tls-cert and --tls-key on a serving node"))?;
        let config = ServerTlsConfig::new().identity(identity);
        match (&self.ca, self.no_client_auth) {
            (Some(ca), false) => Ok(Some(
                config.client_ca_root(Certificate::from_pem(read("CA", ca)?)),
            )),
            (None, false) => Err(Error::TlsIncomplete(
                "--tls-ca on a serving node, to require client certificates (mutual TLS); or \
                 --tls-client-auth none to accept clients without one",
            )),
            (_, true) => {
                tracing::warn!(
                    "--tls-client-auth none: TLS without client certificates; any client that \
                     has the join token is served"
                );
                Ok(Some(config))
            }
        }
    }

    /// Client configuration: the CA is required to verify servers; certificate and key, when
    /// given, identify this node to servers that demand it.
    pub fn client(&self) -> Result<Option<ClientTlsConfig>> {
        if !self.enabled() {
            return Ok(None);
        }
        install_crypto();
        let ca = self
            .ca
            .as_ref()
            .ok_or(Error::TlsIncomplete("--tls-ca to verify the other nodes"))?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("CA", ca)?));
        if let Some(identity) = self.identity()? {
            config = config.identity(identity);
        }
        Ok(Some(config))
    }
}

/// The security flags every node takes: the join token and TLS files.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// File holding the join token shared by every node (default: the CLUSTER_TOKEN
    /// environment variable).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// This node's TLS certificate (PEM), for the services it serves.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This node's TLS private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that signed every node's certificate; servers require client
    /// certificates signed by it.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// `require` (default): a TLS server demands client certificates signed by --tls-ca and
    /// will not start without one; `none`: it accepts clients without certificates (they
    /// still need the join token).
    #[arg(long, value_name = "MODE", value_parser = ["require", "none"], default_value = "require")]
    pub tls_client_auth: String,
}

impl SecurityArgs {
    /// The TLS files given.
    pub fn tls(&self) -> TlsFiles {
        TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
            no_client_auth: self.tls_client_auth == "none",
        }
    }

    /// The join token: from --token-file, else CLUSTER_TOKEN.
    pub fn token(&self) -> Result<crate::auth::Token> {
        crate::auth::Token::load(self.token_file.as_deref())
    }
}

/// The standard `grpc.health.v1.Health` service, for Kubernetes gRPC probes and
/// `grpc_health_probe`: the whole server (`""`) and each of `services` report SERVING. It takes
/// no join token (probes cannot send one); it tells a caller only that the process serves.
pub async fn health(
    services: &[&str],
) -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, server) = tonic_health::server::health_reporter();
    for service in services {
        reporter
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    (reporter, server)
}

/// A server builder with the cluster's transport settings.
pub fn server(tls: Option<ServerTlsConfig>) -> Result<Server> {
    let builder = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_nodelay(true);
    Ok(match tls {
        Some(tls) => builder.tls_config(tls)?,
        None => builder,
    })
}

/// A client endpoint for `address` (`host:port`, `http://host:port` or `https://host:port`)
/// with the cluster's transport settings; TLS when `tls` is given.
pub fn endpoint(address: &str, tls: Option<ClientTlsConfig>) -> Result<Endpoint> {
    let bare = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address);
    if bare.is_empty() || !bare.contains(':') {
        return Err(Error::Address {
            address: address.to_string(),
            reason: "expected host:port".into(),
        });
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{bare}");
    let endpoint = Endpoint::from_shared(url).map_err(|e| Error::Address {
        address: address.to_string(),
        reason: e.to_string(),
    })?;
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    Ok(match tls {
        Some(tls) => endpoint.tls_config(tls)?,
        None => endpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        assert!(endpoint("127.0.0.1:50051", None).is_ok());
        assert_eq!(
            endpoint("http://10.0.0.2:7000", None).unwrap().uri().to_string(),
            "http://10.0.0.2:7000/"
        );
        let err = endpoint("coordinator", None).unwrap_err().to_string();
        assert!(
            err.contains("\"coordinator\"") && err.contains("host:port"),
            "{err}"
        );
    }

    #[test]
    fn incomplete_tls_is_explained() {
        let only_cert = TlsFiles {
            cert: Some("c.pem".into()),
            ..Default::default()
        };
        assert!(only_cert.server().unwrap_err().to_string().contains("--tls-key"));
        assert!(only_cert.client().unwrap_err().to_string().contains("--tls-ca"));
        let missing = TlsFiles {
            cert: Some("/nonexistent/c.pem".into()),
            key: Some("/nonexistent/k.pem".into()),
            ..Default::default()
        };
        let err = missing.server().unwrap_err().to_string();
        assert!(err.contains("certificate file /nonexistent/c.pem"), "{err}");
        assert!(TlsFiles::default().server().unwrap().is_none());
    }

    #[test]
    fn a_tls_server_without_a_ca_is_refused_unless_client_auth_is_off() {
        let dir = std::env::temp_dir().join(format!("effnet-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("k.pem"), key.serialize_pem()).unwrap();
        let files = TlsFiles {
            cert: Some(dir.join("c.pem")),
            key: Some(dir.join("k.pem")),
            ..Default::default()
        };
        let err = files.server().unwrap_err().to_string();
        assert!(err.contains("--tls-ca on a serving node"), "{err}");
        assert!(err.contains("--tls-client-auth none"), "{err}");
        let open = TlsFiles {
            no_client_auth: true,
            ..files
        };
        assert!(open.server().unwrap().is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! What the nodes refuse: TLS clients without a good certificate or talking to the wrong
//! name, a TLS server that would take clients without certificates, plaintext beyond
//! loopback said out loud. Real binaries on loopback.

use std::path::Path;
use std::time::Duration;

use cluster_tests::processes::{TOKEN, coordinator, token_file};
use cluster_tests::spawn;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA, and a certificate signed by it for `names` (PEM files in `dir`, named `prefix-*`).
fn issue(dir: &Path, prefix: &str, names: &[&str]) -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(format!("{prefix}-{name}"));
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    (
        write("ca.pem", ca.pem()),
        write("cert.pem", cert.pem()),
        write("key.pem", key.serialize_pem()),
    )
}

/// `coordinator status` against `address` with `tls` options: its exit and stderr.
fn status(token: &Path, address: &str, tls: &[&str]) -> (bool, String) {
    let mut args = vec![
        "status",
        "--coordinator",
        address,
        "--json",
        "--token-file",
        token.to_str().unwrap(),
    ];
    args.extend_from_slice(tls);
    let run = spawn("coordinator", &args, &[]).finish(Duration::from_secs(30));
    (run.code == Some(0), run.stderr)
}

#[test]
fn tls_clients_without_a_good_certificate_or_name_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    // The server's certificate names localhost only, not 127.0.0.1.
    let (ca, cert, key) = issue(dir.path(), "cluster", &["localhost"]);
    let (_, other_cert, other_key) = issue(dir.path(), "other", &["localhost"]);
    let tls = ["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca];
    let (_server, address) = coordinator(&token, &[&["--workers", "2"][..], &tls[..]].concat());
    let port = address.rsplit_once(':').unwrap().1;
    let by_name = format!("https://localhost:{port}");

    let (ok, stderr) = status(&token, &by_name, &tls);
    assert!(ok, "the cluster's own certificate is accepted: {stderr}");
    let (ok, stderr) = status(&token, &by_name, &["--tls-ca", &ca]);
    assert!(!ok, "a client without a certificate is refused: {stderr}");
    let (ok, stderr) = status(
        &token,
        &by_name,
        &[
            "--tls-cert",
            &other_cert,
            "--tls-key",
            &other_key,
            "--tls-ca",
            &ca,
        ],
    );
    assert!(!ok, "a certificate from another CA is refused: {stderr}");
    let by_ip = format!("https://127.0.0.1:{port}");
    let (ok, stderr) = status(&token, &by_ip, &tls);
    assert!(
        !ok,
        "a server whose certificate does not name the address is refused: {stderr}"
    );
}

#[test]
fn a_tls_server_without_a_ca_needs_client_auth_none() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let (ca, cert, key) = issue(dir.path(), "cluster", &["localhost"]);
    let out = dir.path().join("refused");
    let out = out.to_str().unwrap();
    let args = [
        "start",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--token-file",
        token.to_str().unwrap(),
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--out",
        out,
    ];
    let refused = spawn("coordinator", args, &[])
        .finish(Duration::from_secs(30))
        .failure();
    assert!(
        refused.stderr.contains("--tls-ca on a serving node"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("--tls-client-auth none"),
        "{}",
        refused.stderr
    );

    let (mut server, address) = coordinator(
        &token,
        &[
            "--workers",
            "2",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-auth",
            "none",
        ],
    );
    server.wait_for("TLS without client certificates", Duration::from_secs(10));
    let port = address.rsplit_once(':').unwrap().1;
    let (ok, stderr) = status(&token, &format!("https://localhost:{port}"), &["--tls-ca", &ca]);
    assert!(
        ok,
        "with --tls-client-auth none a client needs no certificate: {stderr}"
    );
}

#[test]
fn plaintext_beyond_loopback_is_said_out_loud() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let token_arg = token.to_str().unwrap();
    let start = |listen: &str| {
        let out = dir.path().join(listen.replace(':', "-"));
        let args = [
            "--log-format",
            "json",
            "start",
            "--listen",
            listen,
            "--workers",
            "2",
            "--token-file",
            token_arg,
            "--out",
            out.to_str().unwrap(),
        ];
        let mut proc = spawn("coordinator", args, &[]);
        proc.wait_for("coordinator listening", Duration::from_secs(30));
        proc
    };
    let wide = start("0.0.0.0:0");
    let local = start("127.0.0.1:0");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        wide.stderr()
            .contains("plaintext: the join token and all traffic cross the network"),
        "{}",
        wide.stderr()
    );
    assert!(!local.stderr().contains("plaintext"), "{}", local.stderr());
}

//! Downloading files into a local cache, with checksums and a progress bar.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// torchvision's ImageNet-1k EfficientNet-B0 weights. The 8 hex digits in the file name are
/// the start of the file's sha256, which torchvision checks and so do we.
pub const TORCHVISION_B0_URL: &str =
    "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth";

/// The cache directory: `$XDG_CACHE_HOME/effnet-cluster`, else `~/.cache/effnet-cluster`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("effnet-cluster")
}

/// The sha256 prefix torchvision puts in its file names (`name-<hex>.pth`), if any.
pub fn sha256_prefix_from_name(url: &str) -> Option<&str> {
    let file = url.rsplit('/').next()?;
    let stem = file.rsplit_once('.').map_or(file, |(s, _)| s);
    let (_, hash) = stem.rsplit_once('-')?;
    (hash.len() >= 6 && hash.chars().all(|c| c.is_ascii_hexdigit())).then_some(hash)
}

/// Return the cached copy of `url` under `dir`, downloading it first when missing. The file
/// must have a sha256 starting with `sha256_prefix`; a partial download never takes the
/// final name.
///
/// `what` names the file in messages; `flag` is the option that takes a local copy instead
/// (`--weights FILE`), which the offline error recommends.
pub fn fetch_cached(url: &str, dir: &Path, sha256_prefix: &str, what: &str, flag: &str) -> Result<PathBuf> {
    let name = url
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("download");
    let dest = dir.join(name);
    if dest.exists() {
        verify_sha256(&dest, sha256_prefix)?;
        return Ok(dest);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tracing::info!(url, dest = %dest.display(), "downloading {what}");
    let partial = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let result = download(url, &partial, what, flag).and_then(|()| verify_sha256(&partial, sha256_prefix));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &dest).map_err(|e| Error::io(&dest, e))?;
    Ok(dest)
}

fn download(url: &str, dest: &Path, what: &str, flag: &str) -> Result<()> {
    let offline = |reason: String| Error::Download {
        url: url.to_string(),
        reason: format!(
            "{reason}. If this machine is offline, download {what} elsewhere and pass the \
             local file instead ({flag})"
        ),
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| offline(e.to_string()))?;
    let body = response.into_body();
    let total = body.content_length();
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    let mut reader = body.into_reader();
    let mut file = std::fs::File::create(dest).map_err(|e| Error::io(dest, e))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| offline(format!("connection lost: {e}")))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(|e| Error::io(dest, e))?;
        bar.inc(n as u64);
    }
    file.sync_all().map_err(|e| Error::io(dest, e))?;
    bar.finish_and_clear();
    Ok(())
}

/// Check that `path`'s sha256 starts with `prefix` (a full digest is a prefix too).
pub fn verify_sha256(path: &Path, prefix: &str) -> Result<()> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let found = hex::encode(hasher.finalize());
    if found.starts_with(&prefix.to_ascii_lowercase()) {
        Ok(())
    } else {
        Err(Error::Checksum {
            path: path.to_path_buf(),
            expected: prefix.to_string(),
            found,
        })
    }
}

/// Loopback HTTP servers for the tests of code that downloads (this crate's, and the
/// worker's dataset download with the `testing` feature). Test code: it panics on any error.
#[cfg(any(test, feature = "testing"))]
pub mod testing {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// `http://127.0.0.1:PORT` for a port that was just released: nothing listens there.
    pub fn unreachable_base() -> String {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("http://127.0.0.1:{port}")
    }

    /// A one-shot HTTP server on loopback that answers every request with `body`.
    pub fn serve(body: &'static [u8], requests: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(requests) {
                let mut stream = stream.unwrap();
                let mut req = [0u8; 4096];
                let _ = stream.read(&mut req);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                stream.write_all(body).unwrap();
            }
        });
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testing::{serve, unreachable_base};

    #[test]
    fn torchvision_names_carry_a_sha256_prefix() {
        assert_eq!(sha256_prefix_from_name(TORCHVISION_B0_URL), Some("7f5810bc"));
        assert_eq!(sha256_prefix_from_name("https://x/model.pth"), None);
    }

    #[test]
    fn a_download_is_verified_and_cached() {
        // sha256("hello weights") starts with this prefix.
        let digest = hex::encode(Sha256::digest(b"hello weights"));
        let base = serve(b"hello weights", 1);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("{base}/w-{}.pth", &digest[..8]);
        let path = fetch_cached(&url, dir.path(), &digest[..8], "test weights", "--weights FILE").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello weights");
        // The second call is served from the cache: the server took only one request.
        assert_eq!(
            fetch_cached(&url, dir.path(), &digest[..8], "test weights", "--weights FILE").unwrap(),
            path
        );
    }

    #[test]
    fn a_corrupt_download_is_rejected_and_not_kept() {
        let base = serve(b"tampered bytes", 1);
        let dir = tempfile::tempdir().unwrap();
        let err = fetch_cached(
            &format!("{base}/w-deadbeef.pth"),
            dir.path(),
            "deadbeef",
            "test weights",
            "--weights FILE",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("expected a digest starting with deadbeef"), "{err}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing left behind"
        );
    }

    #[test]
    fn offline_says_to_pass_a_file() {
        // Nothing listens on a port we just released.
        let dir = tempfile::tempdir().unwrap();
        let url = format!("{}/w-deadbeef.pth", unreachable_base());
        let err = fetch_cached(&url, dir.path(), "deadbeef", "ImageNet weights", "--weights FILE")
            .unwrap_err()
            .to_string();
        assert!(err.contains("offline"), "{err}");
        assert!(
            err.contains("pass the local file instead (--weights FILE)"),
            "{err}"
        );
    }
}

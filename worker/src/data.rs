//! Resolving `--data`: `cifar10` is the official CIFAR-10 binary release, downloaded into the
//! cache on first use; `synthetic` is the generated set; anything else is a location for
//! [`dataset::store::DataStore::open`]. [`open_dataset`] opens it and makes the run's splits.

use std::io::Read;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use dataset::source::Dataset;
use dataset::split::{Limits, SplitScheme, Splits, apply_limits, split};
use dataset::store::DataStore;
use flate2::read::GzDecoder;
use run_config::RunConfig;
use tokio::runtime::Handle;

use crate::error::{Error, Result};
use effnet::download;

/// The official CIFAR-10 binary archive.
pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// Its sha256 (170,052,171 bytes; the publisher gives md5 c32a1d4ab5d03f1284b67883e8d87530).
pub const CIFAR10_SHA256: &str = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd";
/// Files of the archive that are used; nothing else is extracted.
const MEMBERS: [&str; 7] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
    "batches.meta.txt",
];

/// Turn a `--data` argument into a location `DataStore::open` takes.
pub fn resolve(spec: &str) -> Result<String> {
    if spec == "cifar10" {
        let dir = fetch_cifar10(
            CIFAR10_URL,
            CIFAR10_SHA256,
            &download::cache_dir().join("datasets"),
        )?;
        return Ok(dir.display().to_string());
    }
    Ok(spec.to_string())
}

/// Download (once) and unpack the CIFAR-10 binary archive under `cache`, returning the
/// `cifar-10-batches-bin` directory. The directory appears whole or not at all.
pub fn fetch_cifar10(url: &str, sha256: &str, cache: &Path) -> Result<PathBuf> {
    let target = cache.join("cifar-10-batches-bin");
    if MEMBERS.iter().all(|m| target.join(m).is_file()) {
        return Ok(target);
    }
    let archive = download::fetch_cached(url, cache, sha256, "the CIFAR-10 binary archive", "--data DIR")?;
    let staging = cache.join(format!(".cifar-10-batches-bin.partial-{}", std::process::id()));
    let result = unpack(&archive, &staging).and_then(|()| {
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
        }
        std::fs::rename(&staging, &target).map_err(|e| Error::io(&target, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result.map(|()| target)
}

fn unpack(archive: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let file = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut tar = tar::Archive::new(GzDecoder::new(file));
    let bad = |reason: String| Error::DataArchive {
        path: archive.to_path_buf(),
        reason,
    };
    let mut found = 0;
    for entry in tar
        .entries()
        .map_err(|e| bad(format!("not a tar.gz archive: {e}")))?
    {
        let mut entry = entry.map_err(|e| bad(format!("corrupt archive: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("corrupt entry name: {e}")))?
            .into_owned();
        // Only regular files named exactly as expected: no path from the archive is trusted.
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| MEMBERS.contains(n))
        else {
            continue;
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("cannot read {name}: {e}")))?;
        let out = dest.join(name);
        std::fs::write(&out, bytes).map_err(|e| Error::io(&out, e))?;
        found += 1;
    }
    if found != MEMBERS.len() {
        return Err(bad(format!(
            "expected {} CIFAR-10 files in the archive, found {found}",
            MEMBERS.len()
        )));
    }
    Ok(())
}

/// Open the run's dataset.
pub fn open_dataset(config: &RunConfig, handle: &Handle) -> Result<(Arc<Dataset>, Splits)> {
    let store = if config.data == "synthetic" {
        handle.block_on(DataStore::synthetic(
            config.synthetic_train,
            config.synthetic_test,
            config.seed,
        ))
    } else {
        DataStore::open(&resolve(&config.data)?)
    }
    .map_err(|source| Error::data_read(&config.data, source))?;
    let mut dataset = handle
        .block_on(Dataset::open(store))
        .map_err(|source| Error::data_read(&config.data, source))?;
    let scheme = if config.split == "tutorial" {
        SplitScheme::Tutorial
    } else {
        SplitScheme::Official {
            val_fraction: config.val_fraction,
        }
    };
    // Image folders are read sorted by class: slicing that order would make the tutorial's
    // test set one class. CIFAR's files (and the synthetic set) are mixed already.
    let official_train = match (scheme, dataset.files.is_empty()) {
        (SplitScheme::Tutorial, true) => dataset::split::mixed_order(&dataset.train, config.seed),
        _ => dataset.train.clone(),
    };
    let mut splits = split(scheme, &official_train, &dataset.test, config.seed);
    let limits = Limits {
        train: config.limit_train,
        val: config.limit_val,
        test: config.limit_test,
    };
    if limits != Limits::default() {
        let labels = handle
            .block_on(dataset.load_labels())
            .map_err(|source| Error::data_read(&config.data, source))?
            .to_vec();
        splits = apply_limits(splits, &labels, limits);
    }
    if splits.train.is_empty() {
        return Err(Error::NoTrainingImages(config.data.clone()));
    }
    Ok((Arc::new(dataset), splits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn archive() -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for name in MEMBERS.iter().chain(&["readme.html"]) {
            let body = format!("contents of {name}");
            let mut header = tar::Header::new_gnu();
            header.set_size(body.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(
                    &mut header,
                    format!("cifar-10-batches-bin/{name}"),
                    body.as_bytes(),
                )
                .unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn the_archive_is_verified_unpacked_and_reused() {
        let bytes: &'static [u8] = Box::leak(archive().into_boxed_slice());
        let sha = hex::encode(Sha256::digest(bytes));
        let base = download::testing::serve(bytes, 1);
        let cache = tempfile::tempdir().unwrap();
        let url = format!("{base}/cifar-10-binary.tar.gz");
        let dir = fetch_cifar10(&url, &sha, cache.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("test_batch.bin")).unwrap(),
            "contents of test_batch.bin"
        );
        assert!(
            !dir.join("readme.html").exists(),
            "only the expected members are extracted"
        );
        // The server answered once; a second call is served from the cache.
        assert_eq!(fetch_cifar10(&url, &sha, cache.path()).unwrap(), dir);
    }

    #[test]
    fn offline_tells_how_to_pass_a_local_copy() {
        let cache = tempfile::tempdir().unwrap();
        let url = format!("{}/cifar-10-binary.tar.gz", download::testing::unreachable_base());
        let err = fetch_cifar10(&url, CIFAR10_SHA256, cache.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("offline") && err.contains("--data DIR"), "{err}");
        assert!(!cache.path().join("cifar-10-batches-bin").exists());
    }
}

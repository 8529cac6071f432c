//! A small, learnable, seeded 10-class image set, generated in memory in the CIFAR-10 binary
//! layout: the zero-setup demo (`--data synthetic`) and I/O-free throughput runs, as Horovod's
//! synthetic benchmarks are.
//!
//! Class `k` is a striped pattern: a class colour, stripes at a class angle and frequency,
//! under per-sample brightness, phase and pixel noise. A classifier has to look at colour and
//! texture; chance is 10%.

use std::sync::Arc;

use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};

use crate::cifar;
use crate::error::{Error, Result};
use crate::sampler::SplitMix64;
use crate::store::DataStore;

/// Class names of the synthetic set.
pub const CLASS_NAMES: [&str; cifar::CLASSES] = [
    "red", "orange", "yellow", "green", "teal", "blue", "indigo", "violet", "pink", "grey",
];

const PALETTE: [[f32; 3]; cifar::CLASSES] = [
    [200., 40., 40.],
    [230., 130., 30.],
    [220., 210., 50.],
    [50., 170., 60.],
    [40., 160., 160.],
    [40., 80., 210.],
    [80., 50., 160.],
    [160., 60., 200.],
    [230., 120., 170.],
    [128., 128., 128.],
];

/// One synthetic image of class `label` (interleaved RGB, 32x32), drawn from `rng`.
pub fn image(label: usize, rng: &mut SplitMix64) -> Vec<u8> {
    let angle = label as f32 * std::f32::consts::PI / cifar::CLASSES as f32;
    let freq = 0.25 + 0.05 * (label % 4) as f32;
    let (dx, dy) = (angle.cos() * freq, angle.sin() * freq);
    let phase = rng.next_f32() * std::f32::consts::TAU;
    let brightness = 0.75 + 0.5 * rng.next_f32();
    let mut out = Vec::with_capacity(3 * cifar::SIDE * cifar::SIDE);
    for y in 0..cifar::SIDE {
        for x in 0..cifar::SIDE {
            let stripe = 0.5 + 0.5 * (x as f32 * dx + y as f32 * dy + phase).sin();
            for base in PALETTE[label] {
                let noise = (rng.next_f32() - 0.5) * 60.0;
                let v = base * brightness * (0.55 + 0.45 * stripe) + noise;
                out.push(v.clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

impl DataStore {
    /// The synthetic set with `train` and `test` images (class-balanced, seeded), in memory.
    /// Every batch file holds at least one record, so `train` is at least 5 and `test` 1.
    pub async fn synthetic(train: usize, test: usize, seed: u64) -> Result<Self> {
        let store = Arc::new(InMemory::new());
        let mut rng = SplitMix64::new(seed ^ 0x5157_4E7E_71C0);
        let mut records = |n: usize| {
            (0..n)
                .flat_map(|i| {
                    let label = i % cifar::CLASSES;
                    cifar::encode_record(label as u8, &image(label, &mut rng))
                })
                .collect::<Vec<u8>>()
        };
        let per_file = train.div_ceil(cifar::TRAIN_FILES.len());
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut left = train;
        for name in cifar::TRAIN_FILES {
            let n = per_file.min(left);
            left -= n;
            // Record counts must be positive: an empty batch file is not a valid batch.
            files.push((name.to_string(), records(n.max(1))));
        }
        files.push((cifar::TEST_FILE.to_string(), records(test.max(1))));
        files.push((cifar::META_FILE.to_string(), CLASS_NAMES.join("\n").into_bytes()));
        for (name, bytes) in files {
            store
                .put(&ObjectPath::from(name.as_str()), PutPayload::from(bytes))
                .await
                .map_err(|error| Error::Read {
                    file: format!("synthetic/{name}"),
                    error,
                })?;
        }
        Ok(storage::Location {
            store,
            prefix: ObjectPath::default(),
            display: "synthetic".into(),
            local_dir: None,
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Dataset;

    fn mean_rgb(img: &[u8]) -> [f32; 3] {
        let mut m = [0f32; 3];
        for px in img.chunks_exact(3) {
            for c in 0..3 {
                m[c] += f32::from(px[c]);
            }
        }
        m.map(|v| v / (img.len() / 3) as f32)
    }

    #[tokio::test]
    async fn the_set_reads_like_cifar_and_is_seeded() {
        let ds = Dataset::open(DataStore::synthetic(100, 20, 7).await.unwrap())
            .await
            .unwrap();
        assert_eq!(ds.classes, CLASS_NAMES);
        assert_eq!((ds.train.len(), ds.test.len()), (100, 20));
        let a = ds.read(&[0, 1, 57]).await.unwrap();
        let again = Dataset::open(DataStore::synthetic(100, 20, 7).await.unwrap())
            .await
            .unwrap();
        assert_eq!(again.read(&[0, 1, 57]).await.unwrap(), a);
        let other = Dataset::open(DataStore::synthetic(100, 20, 8).await.unwrap())
            .await
            .unwrap();
        assert_ne!(other.read(&[0]).await.unwrap(), a[..1]);
        assert_eq!(a.iter().map(|s| s.label).collect::<Vec<_>>(), [0, 1, 7]);
    }

    #[test]
    fn classes_are_separable_by_a_nearest_mean_rule() {
        // A nearest-class-mean classifier on mean colour, fitted on 20 images per class and
        // tested on 20 more, beats chance (10%) by far: the set is learnable.
        let mut rng = SplitMix64::new(1);
        let means: Vec<[f32; 3]> = (0..10)
            .map(|k| {
                let sum = (0..20)
                    .map(|_| mean_rgb(&image(k, &mut rng)))
                    .fold([0f32; 3], |a, b| [a[0] + b[0], a[1] + b[1], a[2] + b[2]]);
                sum.map(|v| v / 20.0)
            })
            .collect();
        let mut correct = 0;
        for k in 0..10 {
            for _ in 0..20 {
                let m = mean_rgb(&image(k, &mut rng));
                let dist = |c: &[f32; 3]| (0..3).map(|i| (c[i] - m[i]).powi(2)).sum::<f32>();
                let best = (0..10)
                    .min_by(|&a, &b| dist(&means[a]).total_cmp(&dist(&means[b])))
                    .unwrap();
                correct += usize::from(best == k);
            }
        }
        assert!(correct >= 120, "{correct}/200 correct");
    }
}

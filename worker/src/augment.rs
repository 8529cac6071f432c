//! Preprocessing on the worker's device: decoded samples become a resized, optionally
//! augmented `[batch, 3, size, size]` tensor of raw 0..255 values (the model scales them).
//!
//! Augmentation: random left-right and up-down flips and a random multiple of 90 degrees of
//! rotation (the 8 symmetries of a square), or the Keras tutorial's code exactly: random flips,
//! then one quarter turn on every image. Each sample's choice comes from
//! `(seed, epoch, dataset index)`, so a run is reproducible whatever the number of workers or
//! the batch a sample lands in.

// Host-device copies go through `Transfers`, which counts them (transfer_tests.rs).
#![deny(clippy::disallowed_methods)]

use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor, TensorData};
use dataset::sampler::SplitMix64;
use dataset::source::Sample;

use crate::transfer::Transfers;

/// How many quarter turns a training image gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Turns {
    /// None.
    #[default]
    None,
    /// 0, 1, 2 or 3, drawn per image.
    Random,
    /// Exactly one, counter-clockwise, on every image (`tf.image.rot90` as the Keras tutorial's
    /// code calls it: after the random flips, not instead of them).
    One,
}

/// Which random transforms to apply while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Augment {
    /// Random left-right and up-down flips, each with probability 1/2.
    pub flips: bool,
    /// The quarter turns after the flips.
    pub turns: Turns,
}

impl Augment {
    /// Random flips and a random number of quarter turns: the 8 symmetries of a square
    /// (`--augmentation symmetries`, the default).
    pub fn symmetries() -> Self {
        Self {
            flips: true,
            turns: Turns::Random,
        }
    }

    /// Random flips, then one quarter turn on every image: what the Keras tutorial's code does
    /// (`--augmentation flips-rot90`). Four variants per image, none of them upright.
    pub fn flips_rot90() -> Self {
        Self {
            flips: true,
            turns: Turns::One,
        }
    }

    /// No augmentation (evaluation).
    pub fn none() -> Self {
        Self::default()
    }

    /// The training augmentation a run's configuration asks for.
    pub fn of_run(config: &run_config::RunConfig) -> Self {
        match (config.augment, config.augmentation.as_str()) {
            (false, _) => Self::none(),
            (true, run_config::FLIPS_ROT90) => Self::flips_rot90(),
            (true, _) => Self::symmetries(),
        }
    }

    /// How many different images its draws make of one image (both flips together are a
    /// half turn, so random flips and turns give 8, not 16).
    pub fn variants(self) -> u8 {
        match (self.flips, self.turns) {
            (false, Turns::None | Turns::One) => 1,
            (false, Turns::Random) | (true, Turns::None | Turns::One) => 4,
            (true, Turns::Random) => 8,
        }
    }
}

/// The transform drawn for one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Variant {
    /// Mirror left-right.
    pub flip_lr: bool,
    /// Mirror up-down.
    pub flip_ud: bool,
    /// Quarter turns counter-clockwise (0..4).
    pub quarter_turns: u8,
}

impl Variant {
    /// The variant of dataset sample `index` in `epoch` of a run seeded with `seed`.
    pub fn draw(augment: Augment, seed: u64, epoch: u64, index: usize) -> Self {
        let mut rng = SplitMix64::new(
            seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407)
                ^ (index as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25),
        );
        let bits = rng.next_u64();
        Self {
            flip_lr: augment.flips && bits & 1 == 1,
            flip_ud: augment.flips && bits & 2 == 2,
            quarter_turns: match augment.turns {
                Turns::None => 0,
                Turns::Random => ((bits >> 2) & 3) as u8,
                Turns::One => 1,
            },
        }
    }

    /// The variant of sample `index` in `epoch` when each image is seen in at most `pool` of
    /// the 8 symmetries: a fixed random subset of `pool` per image (from `seed` and `index`),
    /// one of them drawn per epoch. `pool` 8 (or more) is [`draw`](Self::draw) itself.
    pub fn draw_pooled(augment: Augment, pool: u8, seed: u64, epoch: u64, index: usize) -> Self {
        if pool >= 8 || augment != Augment::symmetries() {
            return Self::draw(augment, seed, epoch, index);
        }
        let mut rng = SplitMix64::new(
            seed ^ 0x6A09_E667_F3BC_C908 ^ (index as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25),
        );
        let mut ids: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
        for i in (1..8).rev() {
            ids.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let pick = SplitMix64::new(
            seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407)
                ^ (index as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25),
        )
        .below(u64::from(pool.max(1)));
        Self::from_id(ids[pick as usize])
    }

    /// The symmetry with [`id`](Self::id) `id`.
    pub fn from_id(id: u8) -> Self {
        Self {
            flip_lr: id & 4 == 4,
            flip_ud: false,
            quarter_turns: id & 3,
        }
    }

    /// The same transform with at most one flip: both flips together are a half turn, so the
    /// 16 draws are only the 8 symmetries of a square.
    pub fn canonical(self) -> Self {
        Self {
            flip_lr: self.flip_lr != self.flip_ud,
            flip_ud: false,
            quarter_turns: (self.quarter_turns + if self.flip_ud { 2 } else { 0 }) % 4,
        }
    }

    /// Which of the 8 symmetries this is (0..8; equal ids transform images identically).
    pub fn id(self) -> u8 {
        let c = self.canonical();
        (u8::from(c.flip_lr) << 2) | c.quarter_turns
    }

    /// Apply to `[n, c, h, w]` images (square images keep their shape).
    pub fn apply(self, mut x: Tensor<4>) -> Tensor<4> {
        if self.flip_lr {
            x = x.flip([3]);
        }
        if self.flip_ud {
            x = x.flip([2]);
        }
        for _ in 0..self.quarter_turns {
            // Counter-clockwise: transpose, then mirror up-down.
            x = x.swap_dims(2, 3).flip([2]);
        }
        x
    }
}

/// Upload `samples` through `transfers` (one copy when they share a size, as CIFAR's do),
/// resize each to `size` x `size` (bilinear) and apply `variants` (one per sample, or empty for
/// none).
pub fn to_input(
    transfers: &Transfers,
    samples: &[Sample],
    size: usize,
    variants: &[Variant],
    device: &Device,
) -> Tensor<4> {
    let same_size = samples
        .windows(2)
        .all(|w| (w[0].width, w[0].height) == (w[1].width, w[1].height));
    let images: Vec<Tensor<4>> = if same_size && !samples.is_empty() {
        // One upload and one resize for the whole batch (the CIFAR case).
        let (w, h) = (samples[0].width, samples[0].height);
        let data: Vec<f32> = samples
            .iter()
            .flat_map(|s| s.rgb.iter().map(|&v| f32::from(v)))
            .collect();
        let batch: Tensor<4> = transfers.upload(TensorData::new(data, [samples.len(), h, w, 3]), device);
        let batch = resize(batch.permute([0, 3, 1, 2]), size);
        if variants.is_empty() {
            return batch;
        }
        (0..samples.len())
            .map(|i| batch.clone().narrow(0, i, 1))
            .collect()
    } else {
        samples
            .iter()
            .map(|s| {
                let data: Vec<f32> = s.rgb.iter().map(|&v| f32::from(v)).collect();
                let t: Tensor<4> = transfers.upload(TensorData::new(data, [1, s.height, s.width, 3]), device);
                resize(t.permute([0, 3, 1, 2]), size)
            })
            .collect()
    };
    let images = if variants.is_empty() {
        images
    } else {
        images
            .into_iter()
            .zip(variants)
            .map(|(x, v)| v.apply(x))
            .collect()
    };
    Tensor::cat(images, 0)
}

/// Bilinear with half-pixel centres (`align_corners = false`), as `tf.image.resize`, PyTorch's
/// `F.interpolate` and torchvision's `Resize` sample. Burn's options default to aligned
/// corners, which stretches a 32-pixel image over 223/31 of its width instead of 224/32: every
/// upscaled CIFAR image was a slightly different picture from the one the pretrained models'
/// pipelines make.
fn resize(x: Tensor<4>, size: usize) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    if (h, w) == (size, size) {
        return x;
    }
    interpolate(
        x,
        InterpolateOptions::new(InterpolateMode::Bilinear)
            .with_align_corners(false)
            .with_output_size([size, size]),
    )
}

#[cfg(test)]
// The tests read results back directly: they check values, not the copies.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn sample(w: usize, h: usize, f: impl Fn(usize, usize, usize) -> u8) -> Sample {
        let mut rgb = Vec::new();
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    rgb.push(f(x, y, c));
                }
            }
        }
        Sample {
            width: w,
            height: h,
            rgb,
            label: 0,
        }
    }

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn pixels_land_in_channel_planes_and_transforms_are_exact() {
        let device = Device::flex();
        // 2x2 image, red channel = 10 * (y * 2 + x): [[0, 10], [20, 30]].
        let s = sample(2, 2, |x, y, c| if c == 0 { (10 * (y * 2 + x)) as u8 } else { 0 });
        let red = |v: Variant| {
            values(to_input(
                &Transfers::default(),
                std::slice::from_ref(&s),
                2,
                &[v],
                &device,
            ))[..4]
                .to_vec()
        };
        assert_eq!(red(Variant::default()), [0., 10., 20., 30.]);
        assert_eq!(
            red(Variant {
                flip_lr: true,
                ..Default::default()
            }),
            [10., 0., 30., 20.]
        );
        assert_eq!(
            red(Variant {
                flip_ud: true,
                ..Default::default()
            }),
            [20., 30., 0., 10.]
        );
        // A quarter turn counter-clockwise moves the top-right pixel to the top-left.
        assert_eq!(
            red(Variant {
                quarter_turns: 1,
                ..Default::default()
            }),
            [10., 30., 0., 20.]
        );
        assert_eq!(
            red(Variant {
                quarter_turns: 2,
                ..Default::default()
            }),
            [30., 20., 10., 0.]
        );
    }

    #[test]
    fn sixteen_draws_are_eight_symmetries() {
        let device = Device::flex();
        // A 3x3 image with 9 distinct pixels: every symmetry moves them differently.
        let s = sample(3, 3, |x, y, c| (c * 9 + y * 3 + x) as u8);
        let mut by_id = std::collections::BTreeMap::new();
        for bits in 0..16u8 {
            let v = Variant {
                flip_lr: bits & 1 == 1,
                flip_ud: bits & 2 == 2,
                quarter_turns: bits >> 2,
            };
            let pixels = values(to_input(
                &Transfers::default(),
                std::slice::from_ref(&s),
                3,
                &[v],
                &device,
            ));
            assert_eq!(
                pixels,
                values(to_input(
                    &Transfers::default(),
                    std::slice::from_ref(&s),
                    3,
                    &[v.canonical()],
                    &device
                )),
                "{v:?}"
            );
            assert!(!v.canonical().flip_ud && v.canonical().id() == v.id());
            let previous = by_id.insert(v.id(), pixels.clone());
            assert!(
                previous.is_none_or(|p| p == pixels),
                "id {} is one transform",
                v.id()
            );
        }
        assert_eq!(by_id.len(), 8);
        let distinct: std::collections::BTreeSet<Vec<u32>> = by_id
            .values()
            .map(|p| p.iter().map(|v| v.to_bits()).collect())
            .collect();
        assert_eq!(distinct.len(), 8, "different ids transform differently");
    }

    #[test]
    fn pooled_draws_stay_in_a_fixed_subset_per_image() {
        let aug = Augment::symmetries();
        for index in 0..50 {
            let seen = |pool: u8| -> std::collections::BTreeSet<u8> {
                (0..64)
                    .map(|epoch| Variant::draw_pooled(aug, pool, 7, epoch, index).id())
                    .collect()
            };
            assert_eq!(seen(1).len(), 1);
            assert_eq!(seen(2).len(), 2, "64 epochs see both variants of image {index}");
            assert!(seen(2).is_superset(&seen(1)), "pools are nested");
            assert_eq!(seen(8).len(), 8);
            assert_eq!(
                Variant::draw_pooled(aug, 8, 7, 3, index),
                Variant::draw(aug, 7, 3, index)
            );
        }
        // Different images get different subsets.
        let firsts: std::collections::BTreeSet<u8> = (0..50)
            .map(|i| Variant::draw_pooled(aug, 1, 7, 0, i).id())
            .collect();
        assert_eq!(firsts.len(), 8);
        for id in 0..8 {
            assert_eq!(Variant::from_id(id).id(), id);
        }
        assert_eq!(
            Variant::draw_pooled(Augment::none(), 1, 7, 0, 3),
            Variant::default()
        );
    }

    #[test]
    fn resizing_samples_at_half_pixel_centres_as_pytorch_and_tensorflow_do() {
        let device = Device::flex();
        // One row [0, 10] to 4 pixels: torch.nn.functional.interpolate(..., mode="bilinear",
        // align_corners=False) and tf.image.resize give [0, 2.5, 7.5, 10] (aligned corners
        // would give [0, 3.33, 6.67, 10]).
        let s = sample(2, 2, |x, _, _| (10 * x) as u8);
        let v = values(to_input(&Transfers::default(), &[s], 4, &[], &device));
        assert_eq!(v[..4], [0.0, 2.5, 7.5, 10.0]);
    }

    #[test]
    fn flips_then_one_turn_make_four_variants_none_upright() {
        let aug = Augment::flips_rot90();
        assert_eq!(aug.variants(), 4);
        let ids: std::collections::BTreeSet<u8> = (0..200)
            .map(|i| Variant::draw(aug, 7, 0, i))
            .inspect(|v| assert_eq!(v.quarter_turns, 1, "{v:?}"))
            .map(Variant::id)
            .collect();
        assert_eq!(
            ids.len(),
            4,
            "random flips then a quarter turn: 4 different images"
        );
        assert!(
            !ids.contains(&Variant::default().id()),
            "no variant is the image itself"
        );
        assert_eq!(Augment::symmetries().variants(), 8);
        assert_eq!(Augment::none().variants(), 1);
        // The pool of --head-variants subsets the 8 symmetries only; this draws as is.
        assert_eq!(Variant::draw_pooled(aug, 2, 7, 3, 5), Variant::draw(aug, 7, 3, 5));
    }

    #[test]
    fn resizing_keeps_constant_images_constant_and_mixes_sizes() {
        let device = Device::flex();
        let a = sample(32, 32, |_, _, c| [200, 100, 50][c]);
        let b = sample(7, 5, |_, _, c| [1, 2, 3][c]);
        let t = to_input(&Transfers::default(), &[a, b], 16, &[], &device);
        assert_eq!(t.dims(), [2, 3, 16, 16]);
        let v = values(t);
        let plane = 256;
        assert!(v[..plane].iter().all(|&x| (x - 200.0).abs() < 1e-3));
        assert!(v[2 * plane..3 * plane].iter().all(|&x| (x - 50.0).abs() < 1e-3));
        assert!(v[5 * plane..].iter().all(|&x| (x - 3.0).abs() < 1e-3));
    }

    #[test]
    fn draws_are_reproducible_and_cover_all_variants() {
        let aug = Augment::symmetries();
        assert_eq!(Variant::draw(aug, 7, 3, 11), Variant::draw(aug, 7, 3, 11));
        let seen: std::collections::BTreeSet<(bool, bool, u8)> = (0..200)
            .map(|i| Variant::draw(aug, 7, 0, i))
            .map(|v| (v.flip_lr, v.flip_ud, v.quarter_turns))
            .collect();
        assert_eq!(seen.len(), 16, "every flip and turn combination occurs");
        let epochs_differ = (0..50).any(|i| Variant::draw(aug, 7, 0, i) != Variant::draw(aug, 7, 1, i));
        assert!(epochs_differ);
        assert_eq!(Variant::draw(Augment::none(), 7, 0, 5), Variant::default());
    }
}

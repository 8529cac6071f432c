//! Data parallelism is exact: two ranks with batch b, gradients all-reduced over the ring,
//! take the same step as one rank with batch 2b (frozen backbone, linear head).

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use collective::{Ring, all_reduce, local};
use effnet::config::EfficientNetConfig;
use effnet::model::Classifier;
use effnet::weights::collect_tensors;
use worker::grads::{flatten, unflatten};
use worker::transfer::Transfers;

const SIZE: usize = 32;

fn pixels(indices: std::ops::Range<usize>, device: &Device) -> Tensor<4> {
    let n = indices.len();
    let data: Vec<f32> = indices
        .flat_map(|i| (0..3 * SIZE * SIZE).map(move |p| ((p * 7 + i * 53) % 256) as f32))
        .collect();
    Tensor::from_data(TensorData::new(data, [n, 3, SIZE, SIZE]), device)
}

fn labels(indices: std::ops::Range<usize>, device: &Device) -> Tensor<1, Int> {
    let n = indices.len();
    let data: Vec<i64> = indices.map(|i| (i % 3) as i64).collect();
    Tensor::from_data(TensorData::new(data, [n]), device)
}

fn model(device: &Device) -> Classifier {
    let cfg = EfficientNetConfig::b(0)
        .unwrap()
        .with_width(0.25)
        .with_depth(0.25)
        .with_dropout(0.0);
    let mut m = Classifier::new(&cfg, 3, device);
    m.backbone = m.backbone.freeze();
    m
}

/// One SGD step on samples `range` (SGD, not Adam: its step is proportional to the gradient,
/// so a sum where an average belongs would show); the gradients pass through `reduce` first.
fn step(
    m: Classifier,
    range: std::ops::Range<usize>,
    device: &Device,
    reduce: impl FnOnce(&Classifier, GradientsParams) -> GradientsParams,
) -> (f32, Classifier) {
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let loss = loss_fn.forward(m.forward(pixels(range.clone(), device)), labels(range, device));
    let grads = GradientsParams::from_grads(loss.backward(), &m);
    let grads = reduce(&m, grads);
    let mut optim = SgdConfig::new().init();
    let value = loss.into_data().try_to_vec::<f32>().unwrap()[0];
    (value, optim.step(0.5, m, grads))
}

fn head(m: &Classifier) -> Vec<f32> {
    collect_tensors(&m.head)
        .into_iter()
        .flat_map(|(_, t)| t.data)
        .collect()
}

#[test]
fn two_ranks_with_half_batches_match_one_rank() {
    two_ranks_vs_one(true);
}

#[test]
#[should_panic(expected = "largest difference from the single-rank step")]
fn summing_instead_of_averaging_is_caught() {
    two_ranks_vs_one(false);
}

fn two_ranks_vs_one(average: bool) {
    let device = Device::flex().autodiff();
    let initial = model(&device);
    // A copy of the values: clones and forks share BatchNorm running statistics.
    let backbone_before = collect_tensors(&initial.backbone.valid());

    let (single_loss, single) = step(initial.clone().fork(&device), 0..8, &device, |_, g| g);

    let links = local::ring(2, 4);
    let handles: Vec<_> = links
        .into_iter()
        .enumerate()
        .map(|(rank, (mut next, mut prev))| {
            let m = initial.clone().fork(&device);
            let device = device.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                step(m, rank * 4..rank * 4 + 4, &device, |m, grads| {
                    let copies = Transfers::default();
                    let mut flat = flatten(m, &grads, &copies).unwrap();
                    assert!(!flat.is_empty(), "the head has gradients");
                    let ring = Ring::new(2, rank, 1);
                    rt.block_on(all_reduce(&ring, 0, &mut flat, average, &mut next, &mut prev))
                        .unwrap();
                    unflatten(m, &grads, &flat, &copies)
                })
            })
        })
        .collect();
    let ranks: Vec<(f32, Classifier)> = handles.into_iter().map(|h| h.join().unwrap()).collect();

    let mean_loss = (ranks[0].0 + ranks[1].0) / 2.0;
    assert!(
        (mean_loss - single_loss).abs() < 1e-5,
        "{mean_loss} vs {single_loss}"
    );
    let (a, b, one) = (head(&ranks[0].1), head(&ranks[1].1), head(&single));
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "ranks are bit-identical"
    );
    let worst = a
        .iter()
        .zip(&one)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-5,
        "largest difference from the single-rank step: {worst}"
    );
    let moved = head(&initial).iter().zip(&one).any(|(x, y)| x != y);
    assert!(moved, "the step changed the head");
    // The frozen backbone did not move, BatchNorm statistics included.
    assert_eq!(collect_tensors(&ranks[0].1.backbone.valid()), backbone_before);
    assert_eq!(collect_tensors(&single.backbone.valid()), backbone_before);
}

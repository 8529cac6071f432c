//! One phase-1 training step of ours, stage by stage, for `worker/scripts/torch_step_parity.py`
//! to redo in PyTorch on the same images and compare: the resized input, the frozen Lite0
//! backbone's pooled features, a new linear head's logits and loss, its gradients, and the
//! weights after one Adam step. Where two runs of "the same recipe" differ, this says at which
//! stage they part.
//!
//! ```sh
//! cargo run --release -p worker --example step_parity -- CIFAR_BIN_DIR LITE0_PTH OUT.safetensors [SIZE]
//! python3 worker/scripts/torch_step_parity.py OUT.safetensors CIFAR_BIN_DIR LITE0_PTH
//! ```
//!
//! The images are the first 16 of the tutorial split's training part, unaugmented.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use effnet::model::{Head, HeadKind};
use effnet::modelfile::{self, WeightsSource};
use effnet::phase::{self, Phase};
use effnet::weights::{RawTensor, write_safetensors};
use run_config::RunConfig;
use worker::augment::to_input;
use worker::transfer::Transfers;

const IMAGES: usize = 16;
const LR: f64 = 1e-3;

fn raw<const D: usize>(t: Tensor<D>) -> Result<RawTensor> {
    let data = t.into_data();
    let shape = data.shape().to_vec();
    let data = data
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(RawTensor { shape, data })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [data, weights, out, rest @ ..] = args.as_slice() else {
        bail!("usage: step_parity CIFAR_BIN_DIR LITE0_PTH OUT.safetensors [SIZE]");
    };
    let size: usize = rest.first().map_or(Ok(224), |s| s.parse()).context("SIZE")?;
    let config = RunConfig {
        data: data.clone(),
        split: "tutorial".into(),
        model: "efficientnet-lite0".into(),
        ..RunConfig::default()
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let (dataset, splits) = worker::data::open_dataset(&config, runtime.handle())?;
    let indices: Vec<usize> = splits.train[..IMAGES].to_vec();
    let samples = runtime.block_on(dataset.read(&indices))?;
    let labels: Vec<i64> = samples.iter().map(|s| i64::from(s.label)).collect();

    let device = Device::flex().autodiff();
    device.seed(7);
    let loaded = modelfile::load(Some(&config.model), &WeightsSource::File(weights.into()), &device)?;
    let model = phase::prepare(
        loaded.model.with_head(HeadKind::Linear, 10, 0.0, &device),
        Phase::Head,
    );
    let Head::Linear(head) = &model.head else {
        bail!("expected a linear head");
    };
    let (w0, b0) = (head.fc.weight.val(), head.fc.bias.as_ref().map(|b| b.val()));
    let inner = device.clone().inner();
    let input = to_input(&Transfers::default(), &samples, size, &[], &inner);
    let features = model.valid().head_input(input.clone());
    let logits = model.head.forward(Tensor::from_inner(features.clone()));
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [IMAGES]), &device);
    let loss = CrossEntropyLossConfig::new()
        .init(&device)
        .forward(logits.clone(), y);
    let grads = GradientsParams::from_grads(loss.backward(), &model.head);
    let Head::Linear(head) = &model.head else {
        bail!("expected a linear head");
    };
    let gw = grads
        .get::<2>(head.fc.weight.id)
        .context("no gradient for the head's weight")?;
    let gb = head
        .fc
        .bias
        .as_ref()
        .and_then(|b| grads.get::<1>(b.id))
        .context("no gradient for the head's bias")?;
    let mut adam = worker::optim::adam(&config).init();
    let stepped = adam.step(LR, model.head.clone(), grads);
    let Head::Linear(after) = &stepped else {
        bail!("expected a linear head");
    };
    let mut tensors = vec![
        ("input".to_string(), raw(input)?),
        ("features".into(), raw(features.reshape([IMAGES as i64, -1]))?),
        ("w0".into(), raw(w0.inner())?),
        ("logits".into(), raw(logits.inner())?),
        ("loss".into(), raw(loss.inner().reshape([1]))?),
        ("grad_w".into(), raw(gw)?),
        ("grad_b".into(), raw(gb)?),
        ("w1".into(), raw(after.fc.weight.val().inner())?),
        (
            "labels".into(),
            RawTensor {
                shape: vec![IMAGES],
                data: labels.iter().map(|&l| l as f32).collect(),
            },
        ),
    ];
    if let Some(b0) = b0 {
        tensors.push(("b0".into(), raw(b0.inner())?));
    }
    if let Some(b1) = &after.fc.bias {
        tensors.push(("b1".into(), raw(b1.val().inner())?));
    }
    let metadata = HashMap::from([
        ("indices".to_string(), serde_json::to_string(&indices)?),
        ("size".to_string(), size.to_string()),
        ("lr".to_string(), LR.to_string()),
        ("adam_epsilon".to_string(), config.adam_epsilon.to_string()),
    ]);
    write_safetensors(Path::new(out), &tensors, metadata)?;
    println!("wrote {out}: {IMAGES} images of the tutorial split's training part at {size} px");
    Ok(())
}

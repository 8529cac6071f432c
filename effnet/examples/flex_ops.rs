//! A minimal reproduction of where Burn's CPU backends spend an EfficientNet-B0 step, op by
//! op, at the shapes of B0's first stages (batch 16, 224 px input). Uses Burn alone, nothing
//! of this project; `worker/scripts/torch_ops.py` runs the same ops in PyTorch. Flex by
//! default; `libtorch` as the argument runs Burn's LibTorch backend (built with the feature).
//!
//! ```sh
//! cargo run --release -p effnet --example flex_ops
//! cargo run --release -p effnet --features libtorch --example flex_ops -- libtorch
//! python3 worker/scripts/torch_ops.py
//! ```

use std::time::Instant;

use burn::tensor::activation::silu;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Tensor};

fn median_ms(iters: usize, mut op: impl FnMut()) -> f64 {
    op();
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            op();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn random(shape: [usize; 4], device: &Device) -> Tensor<4> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

#[cfg(feature = "libtorch")]
#[allow(deprecated)] // burn-tch is deprecated in Burn 0.22 but still shipped; see device.rs.
fn libtorch() -> Device {
    Device::libtorch()
}

#[cfg(not(feature = "libtorch"))]
fn libtorch() -> Device {
    eprintln!("built without the libtorch feature: add --features libtorch");
    std::process::exit(2)
}

fn main() {
    let (plain, backend) = match std::env::args().nth(1).as_deref() {
        Some("libtorch") => (libtorch(), "libtorch"),
        None | Some("flex") => (Device::flex(), "flex"),
        Some(other) => {
            eprintln!("unknown backend {other:?}: flex or libtorch");
            std::process::exit(2)
        }
    };
    let grad = plain.clone().autodiff();
    let iters = 5;
    // [batch, channels, h, w] of the largest expanded activation of B0's stage 2.
    let act = [16, 96, 112, 112];
    let mut rows: Vec<(&str, f64)> = Vec::new();

    let x = random(act, &plain);
    rows.push((
        "silu forward [16,96,112,112]",
        median_ms(iters, || {
            let _ = silu(x.clone()).into_data();
        }),
    ));
    let xg = random(act, &grad).require_grad();
    rows.push((
        "silu forward+backward",
        median_ms(iters, || {
            let _ = silu(xg.clone()).sum().backward();
        }),
    ));

    let dw = ConvOptions::new([1, 1], [1, 1], [1, 1], 96);
    let w = random([96, 1, 3, 3], &plain);
    rows.push((
        "depthwise 3x3 conv forward",
        median_ms(iters, || {
            let _ = conv2d(x.clone(), w.clone(), None, dw.clone()).into_data();
        }),
    ));
    let wg = random([96, 1, 3, 3], &grad).require_grad();
    rows.push((
        "depthwise 3x3 conv forward+backward",
        median_ms(iters, || {
            let _ = conv2d(xg.clone(), wg.clone(), None, dw.clone()).sum().backward();
        }),
    ));

    // A stage-3 projection: 144 -> 24 channels at 56 x 56.
    let pw = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
    let x3 = random([16, 144, 56, 56], &grad).require_grad();
    let w3 = random([24, 144, 1, 1], &grad).require_grad();
    rows.push((
        "1x1 conv 144->24 at 56x56 fwd+bwd",
        median_ms(iters, || {
            let _ = conv2d(x3.clone(), w3.clone(), None, pw.clone()).sum().backward();
        }),
    ));

    println!("| op (Burn {backend}, f32) | median ms |");
    println!("| --- | ---: |");
    for (name, ms) in rows {
        println!("| {name} | {ms:.1} |");
    }
}

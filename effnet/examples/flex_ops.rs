//! Where Burn's CPU backends spend an EfficientNet-B0 step, op by op, at the shapes of B0's
//! first stages (batch 16, 224 px input): each op as Burn's own (`burn::tensor`) and as this
//! project's fused kernel (`effnet::native`, `cpu-kernels` on flex, PyTorch's kernels on
//! LibTorch). `worker/scripts/torch_ops.py` runs the same ops in PyTorch. Flex by default;
//! `libtorch` as the argument runs Burn's LibTorch backend (built with the feature).
//!
//! ```sh
//! cargo run --release -p effnet --example flex_ops
//! cargo run --release -p effnet --features libtorch --example flex_ops -- libtorch
//! python3 worker/scripts/torch_ops.py
//! ```

use std::time::Instant;

use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Tensor};
use effnet::native;

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

/// One row: the op timed with Burn's ops and with `effnet::native`'s.
struct Row {
    name: &'static str,
    burn: f64,
    ours: f64,
}

/// Times `op(fused)` both ways.
fn row(name: &'static str, iters: usize, op: impl Fn(bool)) -> Row {
    Row {
        name,
        burn: median_ms(iters, || op(false)),
        ours: median_ms(iters, || op(true)),
    }
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
    let x = random(act, &plain);
    let xg = random(act, &grad).require_grad();
    let dw = ConvOptions::new([1, 1], [1, 1], [1, 1], 96);
    let w = random([96, 1, 3, 3], &plain);
    let wg = random([96, 1, 3, 3], &grad).require_grad();
    // Stage 3's first depthwise layer: 5x5 at stride 2, 144 channels, 56 -> 28.
    let x5 = random([16, 144, 56, 56], &grad).require_grad();
    let w5 = random([144, 1, 5, 5], &grad).require_grad();
    let dw5 = ConvOptions::new([2, 2], [2, 2], [1, 1], 144);
    // A stage-3 projection: 144 -> 24 channels at 56 x 56.
    let pw = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
    let x3 = random([16, 144, 56, 56], &grad).require_grad();
    let w3 = random([24, 144, 1, 1], &grad).require_grad();
    // Squeeze-excitation on stage 2's output of its depthwise layer.
    let xs = random([16, 96, 56, 56], &grad).require_grad();
    let gs = random([16, 96, 1, 1], &grad).require_grad();

    let conv = |fused: bool, x: Tensor<4>, w: Tensor<4>, options: &ConvOptions<2>| {
        if fused {
            native::conv2d(x, w, None, options.clone())
        } else {
            conv2d(x, w, None, options.clone())
        }
    };
    let rows = [
        row("silu forward [16,96,112,112]", iters, |fused| {
            let y = if fused {
                native::silu(x.clone())
            } else {
                silu(x.clone())
            };
            let _ = y.into_data();
        }),
        row("silu forward+backward", iters, |fused| {
            let y = if fused {
                native::silu(xg.clone())
            } else {
                silu(xg.clone())
            };
            let _ = y.sum().backward();
        }),
        row("depthwise 3x3 conv forward", iters, |fused| {
            let _ = conv(fused, x.clone(), w.clone(), &dw).into_data();
        }),
        row("depthwise 3x3 conv forward+backward", iters, |fused| {
            let _ = conv(fused, xg.clone(), wg.clone(), &dw).sum().backward();
        }),
        row("depthwise 5x5 stride 2 [16,144,56,56] fwd+bwd", iters, |fused| {
            let _ = conv(fused, x5.clone(), w5.clone(), &dw5).sum().backward();
        }),
        row("1x1 conv 144->24 at 56x56 fwd+bwd", iters, |fused| {
            let _ = conv(fused, x3.clone(), w3.clone(), &pw).sum().backward();
        }),
        row("SE pool + gate [16,96,56,56] fwd+bwd", iters, |fused| {
            let y = if fused {
                let pooled = native::plane_means(xs.clone());
                native::gate(xs.clone(), gs.clone() + pooled)
            } else {
                let pooled = xs.clone().mean_dim(3).mean_dim(2);
                xs.clone() * sigmoid(gs.clone() + pooled)
            };
            let _ = y.sum().backward();
        }),
    ];

    println!("| op (f32, {backend}) | Burn's op ms | effnet::native ms | Burn / native |");
    println!("| --- | ---: | ---: | ---: |");
    for Row { name, burn, ours } in rows {
        println!("| {name} | {burn:.1} | {ours:.1} | {:.2}x |", burn / ours);
    }
}

//! The flex extension's ops (`flex.rs`) against Burn's own, outputs and gradients.

use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Tensor, activation, module};

use crate::native::testing::{leaf, relative_error};

fn flex() -> Device {
    Device::flex().autodiff()
}

/// A loss whose gradient differs per element, so a gradient in the wrong place shows.
fn score<const D: usize>(y: Tensor<D>) -> Tensor<1> {
    (y.clone() * y.sin().add_scalar(0.5)).sum()
}

#[test]
fn kernel_convolutions_and_their_gradients_match_burns() {
    let device = flex();
    device.seed(21);
    // (channels, groups, kernel, stride, padding, bias, input tracked, input h x w): a
    // depthwise 3x3 at stride 1, a depthwise 5x5 at stride 2 on an odd size, TF-style
    // "same" at stride 2 (one more after: 9), a 1x1 with and without bias, a 1x1 whose
    // input is not tracked, and the squeeze-excitation's one-pixel 1x1.
    let cases = [
        (6, 6, 3, 1, 1, true, true, [9, 7]),
        (5, 5, 5, 2, 2, true, true, [11, 9]),
        (4, 4, 3, 2, 9, false, true, [8, 10]),
        (4, 4, 5, 2, 9, true, true, [9, 9]),
        (6, 1, 1, 1, 0, true, true, [7, 5]),
        (7, 1, 1, 1, 0, false, false, [3, 4]),
        (8, 1, 1, 1, 0, true, true, [1, 1]),
    ];
    for (channels, groups, kernel, stride, padding, bias, input_tracked, [h, w]) in cases {
        let out = if groups == 1 { channels + 3 } else { channels };
        let x = Tensor::<4>::random([3, channels, h, w], Distribution::Normal(0.0, 1.0), &device);
        let weight = Tensor::<4>::random(
            [out, channels / groups, kernel, kernel],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let b = Tensor::<1>::random([out], Distribution::Normal(0.0, 1.0), &device);
        let pads = match padding {
            9 => {
                // TF "same": total = (ceil(in / s) - 1) * s + k - in, the odd one after.
                let pair = |size: usize| {
                    let total = ((size.div_ceil(stride) - 1) * stride + kernel).saturating_sub(size);
                    (total / 2, total - total / 2)
                };
                [pair(h), pair(w)]
            }
            p => [(p, p), (p, p)],
        };
        let options = ConvOptions::new_with_padding([stride, stride], pads, [1, 1], groups);
        assert!(
            super::flex::Conv::of(x.dims(), weight.dims(), &options).is_some(),
            "case {channels} {groups} {kernel} {stride} is one the kernels cover"
        );
        let run = |fused: bool| {
            let x = if input_tracked { leaf(&x) } else { x.clone() };
            let (weight, b) = (leaf(&weight), leaf(&b));
            let with_bias = bias.then(|| b.clone());
            let y = if fused {
                crate::native::conv2d(x.clone(), weight.clone(), with_bias, options.clone())
            } else {
                module::conv2d(x.clone(), weight.clone(), with_bias, options.clone())
            };
            let grads = score(y.clone()).backward();
            assert_eq!(x.grad(&grads).is_some(), input_tracked);
            assert_eq!(b.grad(&grads).is_some(), bias, "bias gradient");
            (y, x.grad(&grads), weight.grad(&grads).unwrap(), b.grad(&grads))
        };
        let (y, gx, gw, gb) = run(true);
        let (y_ref, gx_ref, gw_ref, gb_ref) = run(false);
        let case = format!("groups {groups} kernel {kernel} stride {stride} padding {pads:?} input {h}x{w}");
        assert!(relative_error(y.inner(), y_ref.inner()) < 1e-5, "{case}: output");
        assert!(relative_error(gw, gw_ref) < 1e-4, "{case}: weight gradient");
        if let (Some(gx), Some(gx_ref)) = (gx, gx_ref) {
            assert!(relative_error(gx, gx_ref) < 1e-4, "{case}: input gradient");
        }
        if let (Some(gb), Some(gb_ref)) = (gb, gb_ref) {
            assert!(relative_error(gb, gb_ref) < 1e-4, "{case}: bias gradient");
        }
    }
}

#[test]
fn convolution_with_silu_matches_burns_both_in_inference_and_training() {
    for device in [Device::flex(), flex()] {
        device.seed(24);
        for (groups, kernel, stride, pads) in [(6, 3, 2, [(0, 1), (0, 1)]), (1, 1, 1, [(0, 0), (0, 0)])] {
            let x = Tensor::<4>::random([2, 6, 9, 8], Distribution::Normal(0.0, 1.0), &device);
            let weight = Tensor::<4>::random(
                [6, 6 / groups, kernel, kernel],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let bias = Tensor::<1>::random([6], Distribution::Normal(0.0, 1.0), &device);
            let options = ConvOptions::new_with_padding([stride, stride], pads, [1, 1], groups);
            let (x, weight) = if device.is_autodiff() {
                (leaf(&x), leaf(&weight))
            } else {
                (x, weight)
            };
            let fused =
                crate::native::conv2d_silu(x.clone(), weight.clone(), Some(bias.clone()), options.clone());
            let expected = activation::silu(module::conv2d(x.clone(), weight.clone(), Some(bias), options));
            let case = format!("groups {groups}, autodiff {}", device.is_autodiff());
            if device.is_autodiff() {
                let (gx, gw) = {
                    let grads = score(fused.clone()).backward();
                    (x.grad(&grads).unwrap(), weight.grad(&grads).unwrap())
                };
                let grads = score(expected.clone()).backward();
                assert!(
                    relative_error(gx, x.grad(&grads).unwrap()) < 1e-4,
                    "{case}: input gradient"
                );
                assert!(
                    relative_error(gw, weight.grad(&grads).unwrap()) < 1e-4,
                    "{case}: weight gradient"
                );
            }
            assert!(relative_error(fused, expected) < 1e-5, "{case}: output");
        }
    }
}

#[test]
fn convolutions_the_kernels_do_not_cover_are_left_to_burn() {
    let options = |stride, padding, dilation, groups| {
        ConvOptions::new([stride; 2], [padding; 2], [dilation; 2], groups)
    };
    let covered = |x, w, o: ConvOptions<2>| super::flex::Conv::of(x, w, &o).is_some();
    // The stem (3x3 over three channels), a grouped convolution, a dilated depthwise one
    // and a strided or padded 1x1.
    assert!(!covered([2, 3, 9, 9], [8, 3, 3, 3], options(2, 1, 1, 1)));
    assert!(!covered([2, 8, 9, 9], [8, 4, 3, 3], options(1, 1, 1, 2)));
    assert!(!covered([2, 8, 9, 9], [8, 1, 3, 3], options(1, 2, 2, 8)));
    assert!(!covered([2, 8, 9, 9], [4, 8, 1, 1], options(2, 0, 1, 1)));
    assert!(!covered([2, 8, 9, 9], [4, 8, 1, 1], options(1, 1, 1, 1)));
    assert!(covered([2, 8, 9, 9], [4, 8, 1, 1], options(1, 0, 1, 1)));
    assert!(covered([2, 8, 9, 9], [8, 1, 3, 3], options(2, 1, 1, 8)));
}

#[test]
fn kernel_silu_gate_and_pooling_match_burns() {
    let device = flex();
    device.seed(22);
    // Odd sizes: vector tails and uneven splits between threads.
    let data = Tensor::<4>::random([3, 5, 7, 9], Distribution::Normal(0.0, 3.0), &device);
    let logits = Tensor::<4>::random([3, 5, 1, 1], Distribution::Normal(0.0, 2.0), &device);
    let run = |fused: bool| {
        let (x, g) = (leaf(&data), leaf(&logits));
        let (silu, pooled, gated) = if fused {
            let silu = crate::native::silu(x.clone());
            (
                silu.clone(),
                crate::native::plane_means(silu.clone()),
                crate::native::gate(silu, g.clone()),
            )
        } else {
            let silu = activation::silu(x.clone());
            (
                silu.clone(),
                silu.clone().mean_dim(3).mean_dim(2),
                silu * activation::sigmoid(g.clone()),
            )
        };
        // Every output feeds the loss, so each backward pass runs.
        let loss = score(silu.clone()) + score(pooled.clone()) + score(gated.clone());
        let grads = loss.backward();
        (
            silu,
            pooled,
            gated,
            x.grad(&grads).unwrap(),
            g.grad(&grads).unwrap(),
        )
    };
    let (silu, pooled, gated, gx, gg) = run(true);
    let (silu_ref, pooled_ref, gated_ref, gx_ref, gg_ref) = run(false);
    assert!(relative_error(silu.inner(), silu_ref.inner()) < 1e-6, "silu");
    assert!(
        relative_error(pooled.inner(), pooled_ref.inner()) < 1e-6,
        "pooled"
    );
    assert!(relative_error(gated.inner(), gated_ref.inner()) < 1e-6, "gated");
    assert!(relative_error(gx, gx_ref) < 1e-5, "input gradient");
    assert!(relative_error(gg, gg_ref) < 1e-5, "gate gradient");
}

#[test]
fn kernel_training_batchnorm_matches_burns() {
    crate::native::testing::batch_norm_matches_burns(&flex(), 23);
}

#[test]
fn burns_ops_run_inside_with_burn_ops_and_the_kernels_after() {
    let x = Tensor::<2>::random([4, 4], Distribution::Normal(0.0, 1.0), &Device::flex());
    assert!(super::kernels_for(&x));
    crate::native::with_burn_ops(|| assert!(!super::kernels_for(&x)));
    assert!(super::kernels_for(&x));
}

//! BatchNorm over the batch's own statistics (training mode) for NCHW tensors, forward and
//! backward, one task per channel.
//!
//! Burn composes it from a dozen tensor ops each way (means, a variance, broadcasts,
//! temporaries); here the forward pass reads a channel twice (mean, then the centred sum of
//! squares, which keeps the variance exact for large means) and writes it once, and the
//! backward pass reads it twice and writes it once.

use rayon::prelude::*;

use crate::simd::{self, multiversion};

/// What the forward pass gives besides the output.
#[derive(Debug, Clone, PartialEq)]
pub struct Statistics {
    /// Batch mean per channel.
    pub mean: Vec<f32>,
    /// Batch variance per channel, biased (divided by the count), as Burn reports it.
    pub variance: Vec<f32>,
}

/// The gradients of the input, gamma and beta.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    /// Of the input, `[batch, channels, h, w]`.
    pub input: Vec<f32>,
    /// Of gamma, `[channels]`.
    pub gamma: Vec<f32>,
    /// Of beta, `[channels]`.
    pub beta: Vec<f32>,
}

multiversion! {
    fn centred_squares(x: &[f32], mean: f32) -> f32 {
        let mut lanes = [0f32; 16];
        let mut chunks = x.chunks_exact(16);
        for chunk in &mut chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                let d = v - mean;
                *lane += d * d;
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
        lanes.iter().sum::<f32>() + tail
    }
}

multiversion! {
    fn affine(x: &[f32], scale: f32, shift: f32, y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * scale + shift;
        }
    }
}

multiversion! {
    fn input_gradient(x: &[f32], grad: &[f32], a: f32, b: f32, c: f32, dx: &mut [f32]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(grad) {
            *dx = a * g + b * x + c;
        }
    }
}

/// The planes of channel `c`: one per image.
fn planes(x: &[f32], channels: usize, plane: usize, c: usize) -> impl Iterator<Item = &[f32]> {
    x.chunks_exact(channels * plane)
        .map(move |image| &image[c * plane..(c + 1) * plane])
}

fn check(x: usize, channels: usize, plane: usize, gamma: usize, beta: usize) {
    assert!(channels > 0 && plane > 0, "batch_norm: empty channels");
    assert_eq!(x % (channels * plane), 0, "batch_norm: input length");
    assert!(x > 0, "batch_norm: empty batch");
    assert_eq!(gamma, channels, "batch_norm: gamma length");
    assert_eq!(beta, channels, "batch_norm: beta length");
}

/// The forward pass: `y = (x - mean) / sqrt(variance + epsilon) * gamma + beta` per channel,
/// over `x` `[batch, channels, plane]`; writes `y` and returns the batch statistics.
///
/// # Panics
/// If a slice's length does not match `channels` and `plane`.
pub fn forward(
    x: &[f32],
    channels: usize,
    plane: usize,
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    y: &mut [f32],
) -> Statistics {
    check(x.len(), channels, plane, gamma.len(), beta.len());
    assert_eq!(y.len(), x.len(), "batch_norm: output length");
    let count = (x.len() / channels) as f32;
    let statistics: Vec<(f32, f32)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            let mean = planes(x, channels, plane, c).map(simd::plane_sum).sum::<f32>() / count;
            let variance = planes(x, channels, plane, c)
                .map(|p| centred_squares(p, mean))
                .sum::<f32>()
                / count;
            (mean, variance)
        })
        .collect();
    // Writing is per plane: the output's planes of one image are contiguous.
    y.par_chunks_mut(plane)
        .zip(x.par_chunks(plane))
        .enumerate()
        .for_each(|(i, (y, x))| {
            let c = i % channels;
            let (mean, variance) = statistics[c];
            let scale = gamma[c] / (variance + epsilon).sqrt();
            affine(x, scale, beta[c] - mean * scale, y);
        });
    let (mean, variance) = statistics.into_iter().unzip();
    Statistics { mean, variance }
}

/// The backward pass of [`forward`] for the gradient `grad` of its output, from the input and
/// the batch statistics the forward pass returned.
///
/// # Panics
/// If a slice's length does not match `channels` and `plane`.
pub fn backward(
    x: &[f32],
    channels: usize,
    plane: usize,
    gamma: &[f32],
    statistics: &Statistics,
    epsilon: f32,
    grad: &[f32],
) -> Gradients {
    check(x.len(), channels, plane, gamma.len(), statistics.mean.len());
    assert_eq!(grad.len(), x.len(), "batch_norm backward: gradient length");
    let count = (x.len() / channels) as f32;
    // Per channel: sum(g) (beta's gradient) and sum(g * x), from which gamma's follows.
    let sums: Vec<(f32, f32)> = (0..channels)
        .into_par_iter()
        .map(|c| {
            let g = planes(grad, channels, plane, c);
            let xs = planes(x, channels, plane, c);
            g.zip(xs).fold((0.0, 0.0), |(s, sx), (g, x)| {
                (s + simd::plane_sum(g), sx + simd::plane_dot(g, x))
            })
        })
        .collect();
    let mut dgamma = Vec::with_capacity(channels);
    // dx = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat)), rewritten as
    // a * g + b * x + c per channel.
    let mut coefficients = Vec::with_capacity(channels);
    for (c, &(sum_g, sum_gx)) in sums.iter().enumerate() {
        let (mean, invstd) = (
            statistics.mean[c],
            1.0 / (statistics.variance[c] + epsilon).sqrt(),
        );
        // sum(g * xhat) = invstd * (sum(g * x) - mean * sum(g))
        let sum_gxhat = invstd * (sum_gx - mean * sum_g);
        dgamma.push(sum_gxhat);
        let k = gamma[c] * invstd;
        let a = k;
        let b = -k * invstd * sum_gxhat / count;
        let c0 = -k * sum_g / count - b * mean;
        coefficients.push((a, b, c0));
    }
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(plane)
        .zip(x.par_chunks(plane).zip(grad.par_chunks(plane)))
        .enumerate()
        .for_each(|(i, (dx, (x, g)))| {
            let (a, b, c) = coefficients[i % channels];
            input_gradient(x, g, a, b, c, dx);
        });
    Gradients {
        input: dx,
        gamma: dgamma,
        beta: sums.into_iter().map(|(s, _)| s).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, values};

    /// The definition in f64: output, mean, variance, and the gradients of `sum(y * grad)`.
    #[allow(clippy::type_complexity)]
    fn reference(
        x: &[f32],
        channels: usize,
        plane: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f64,
        grad: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let index = |i: usize, c: usize, p: usize| (i * channels + c) * plane + p;
        let images = x.len() / (channels * plane);
        let n = (images * plane) as f64;
        let (mut y, mut dx) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        let (mut means, mut vars, mut dgamma, mut dbeta) = (vec![], vec![], vec![], vec![]);
        for c in 0..channels {
            let at = |i, p| x[index(i, c, p)] as f64;
            let g = |i, p| grad[index(i, c, p)] as f64;
            let all = || (0..images).flat_map(|i| (0..plane).map(move |p| (i, p)));
            let mean = all().map(|(i, p)| at(i, p)).sum::<f64>() / n;
            let var = all().map(|(i, p)| (at(i, p) - mean).powi(2)).sum::<f64>() / n;
            let invstd = 1.0 / (var + eps).sqrt();
            let xhat = |i, p| (at(i, p) - mean) * invstd;
            let sum_g: f64 = all().map(|(i, p)| g(i, p)).sum();
            let sum_gxhat: f64 = all().map(|(i, p)| g(i, p) * xhat(i, p)).sum();
            for (i, p) in all() {
                y[index(i, c, p)] = (xhat(i, p) * gamma[c] as f64 + beta[c] as f64) as f32;
                dx[index(i, c, p)] =
                    (gamma[c] as f64 * invstd * (g(i, p) - sum_g / n - xhat(i, p) * sum_gxhat / n)) as f32;
            }
            means.push(mean as f32);
            vars.push(var as f32);
            dgamma.push(sum_gxhat as f32);
            dbeta.push(sum_g as f32);
        }
        (y, means, vars, dx, dgamma, dbeta)
    }

    #[test]
    fn forward_and_backward_match_the_definition_in_f64() {
        // Odd sizes, a mean far from zero (the variance must not cancel), and planes of one
        // pixel.
        for (images, channels, plane, offset) in [(3, 5, 7 * 9, 0.0), (4, 6, 5, 40.0), (5, 3, 1, -2.0)] {
            let x: Vec<f32> = values(images * channels * plane, 1, 3.0)
                .iter()
                .map(|v| v + offset)
                .collect();
            let gamma = values(channels, 2, 2.0);
            let beta = values(channels, 3, 1.0);
            let grad = values(x.len(), 4, 1.0);
            let mut y = vec![f32::NAN; x.len()];
            let stats = forward(&x, channels, plane, &gamma, &beta, 1e-3, &mut y);
            let found = backward(&x, channels, plane, &gamma, &stats, 1e-3, &grad);
            let (ry, rmean, rvar, rdx, rdgamma, rdbeta) =
                reference(&x, channels, plane, &gamma, &beta, 1e-3, &grad);
            let case = format!("{images}x{channels}x{plane} around {offset}");
            assert_close(&y, &ry, 1e-5, &format!("output {case}"));
            assert_close(&stats.mean, &rmean, 1e-5, &format!("mean {case}"));
            assert_close(&stats.variance, &rvar, 1e-4, &format!("variance {case}"));
            assert_close(&found.input, &rdx, 1e-4, &format!("input gradient {case}"));
            assert_close(&found.gamma, &rdgamma, 1e-4, &format!("gamma gradient {case}"));
            assert_close(&found.beta, &rdbeta, 1e-4, &format!("beta gradient {case}"));
        }
    }
}

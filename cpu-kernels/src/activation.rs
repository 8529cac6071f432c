//! SiLU, and squeeze-excitation's gate (`x * sigmoid(g)` per channel) with its pooling, each
//! one pass over memory in each direction.
//!
//! Burn composes SiLU as `x * sigmoid(x)`: a sigmoid pass with a scalar `exp` per element, a
//! product pass, a temporary between them, and as many passes back. Here the forward pass is
//! one loop and the backward one more, from the saved input (the sigmoid is recomputed: an
//! `exp` on the vector unit costs less than reading a saved tensor of the same size).

use rayon::prelude::*;

use crate::simd::{self, multiversion};

/// Elements per parallel task: large enough to amortise scheduling, small enough to share a
/// [16, 96, 112, 112] activation between threads evenly.
const CHUNK: usize = 1 << 15;

multiversion! {
    fn silu_grad_chunk(x: &[f32], grad: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(grad) {
            let s = simd::sigmoid(x);
            *dx = g * s * (1.0 + x * (1.0 - s));
        }
    }
}

/// `y = x * sigmoid(x)`.
///
/// # Panics
/// If the slices differ in length.
pub fn silu(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "silu: input and output lengths");
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            y.copy_from_slice(x);
            simd::silu_in_place(y);
        });
}

/// [`silu`] overwriting its input (inference: nothing else needs it, and one stream over
/// memory replaces two).
pub fn silu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(simd::silu_in_place);
}

/// The gradient of SiLU's input: `dx = grad * s * (1 + x * (1 - s))` with `s = sigmoid(x)`.
///
/// # Panics
/// If the slices differ in length.
pub fn silu_backward(x: &[f32], grad: &[f32], dx: &mut [f32]) {
    assert_eq!(x.len(), grad.len(), "silu_backward: input and gradient lengths");
    assert_eq!(x.len(), dx.len(), "silu_backward: input and result lengths");
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|((dx, x), grad)| silu_grad_chunk(x, grad, dx));
}

/// Planes per parallel task for per-channel work (`plane` elements each).
fn planes_per_task(plane: usize) -> usize {
    (CHUNK / plane.max(1)).max(1)
}

multiversion! {
    fn scale_plane(x: &[f32], factor: f32, y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * factor;
        }
    }
}

multiversion! {
    fn scale_plane_in_place(x: &mut [f32], factor: f32) {
        for x in x.iter_mut() {
            *x *= factor;
        }
    }
}

/// The mean of each plane: `x` holds `means.len()` planes of `plane` values (`[b, c, h, w]`
/// gives one mean per `(b, c)`).
///
/// # Panics
/// If `x` is not `means.len() * plane` long or `plane` is 0.
pub fn plane_means(x: &[f32], plane: usize, means: &mut [f32]) {
    assert!(plane > 0, "plane_means: empty planes");
    assert_eq!(x.len(), means.len() * plane, "plane_means: input length");
    let per = planes_per_task(plane);
    means
        .par_chunks_mut(per)
        .zip(x.par_chunks(per * plane))
        .for_each(|(means, x)| {
            for (mean, x) in means.iter_mut().zip(x.chunks_exact(plane)) {
                *mean = simd::plane_sum(x) / plane as f32;
            }
        });
}

/// The backward pass of [`plane_means`]: every value of plane `i` gets `grad[i] / plane`.
///
/// # Panics
/// If `dx` is not `grad.len() * plane` long.
pub fn plane_means_backward(grad: &[f32], plane: usize, dx: &mut [f32]) {
    assert_eq!(
        dx.len(),
        grad.len() * plane,
        "plane_means_backward: result length"
    );
    let per = planes_per_task(plane);
    dx.par_chunks_mut(per * plane)
        .zip(grad.par_chunks(per))
        .for_each(|(dx, grad)| {
            for (dx, &g) in dx.chunks_exact_mut(plane).zip(grad) {
                dx.fill(g / plane as f32);
            }
        });
}

/// Squeeze-excitation's gate: `y = x * sigmoid(gate[i])` over plane `i` of `x` (`gate` holds
/// one logit per `(b, c)`).
///
/// # Panics
/// If `x` and `y` are not `gate.len() * plane` long.
pub fn gate(x: &[f32], gate: &[f32], plane: usize, y: &mut [f32]) {
    assert_eq!(x.len(), gate.len() * plane, "gate: input length");
    assert_eq!(y.len(), x.len(), "gate: output length");
    let per = planes_per_task(plane);
    y.par_chunks_mut(per * plane)
        .zip(x.par_chunks(per * plane))
        .zip(gate.par_chunks(per))
        .for_each(|((y, x), gate)| {
            for ((y, x), &g) in y.chunks_exact_mut(plane).zip(x.chunks_exact(plane)).zip(gate) {
                scale_plane(x, simd::sigmoid(g), y);
            }
        });
}

/// [`gate`] overwriting `x`.
///
/// # Panics
/// If `x` is not `gate.len() * plane` long.
pub fn gate_in_place(x: &mut [f32], gate: &[f32], plane: usize) {
    assert_eq!(x.len(), gate.len() * plane, "gate_in_place: input length");
    let per = planes_per_task(plane);
    x.par_chunks_mut(per * plane)
        .zip(gate.par_chunks(per))
        .for_each(|(x, gate)| {
            for (x, &g) in x.chunks_exact_mut(plane).zip(gate) {
                scale_plane_in_place(x, simd::sigmoid(g));
            }
        });
}

/// The backward pass of [`gate`]: `dx = grad * sigmoid(gate[i])` over plane `i`, and
/// `dgate[i] = sum(grad * x over plane i) * s * (1 - s)`.
///
/// # Panics
/// If the lengths disagree as in [`gate`].
pub fn gate_backward(x: &[f32], gate: &[f32], grad: &[f32], plane: usize, dx: &mut [f32], dgate: &mut [f32]) {
    assert_eq!(x.len(), gate.len() * plane, "gate_backward: input length");
    assert_eq!(grad.len(), x.len(), "gate_backward: gradient length");
    assert_eq!(dx.len(), x.len(), "gate_backward: input-gradient length");
    assert_eq!(dgate.len(), gate.len(), "gate_backward: gate-gradient length");
    let per = planes_per_task(plane);
    dx.par_chunks_mut(per * plane)
        .zip(dgate.par_chunks_mut(per))
        .zip(x.par_chunks(per * plane).zip(grad.par_chunks(per * plane)))
        .zip(gate.par_chunks(per))
        .for_each(|(((dx, dgate), (x, grad)), gate)| {
            let planes = dx
                .chunks_exact_mut(plane)
                .zip(dgate.iter_mut())
                .zip(x.chunks_exact(plane).zip(grad.chunks_exact(plane)));
            for (((dx, dgate), (x, grad)), &g) in planes.zip(gate) {
                let s = simd::sigmoid(g);
                scale_plane(grad, s, dx);
                *dgate = simd::plane_dot(grad, x) * s * (1.0 - s);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, values};

    fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    #[test]
    fn silu_and_its_gradient_match_the_definition_in_f64() {
        // An odd length, so the parallel split and the vector tails both run.
        let x = values(100_003, 1, 6.0);
        let grad = values(100_003, 2, 1.0);
        let mut y = vec![0.0; x.len()];
        let mut dx = vec![0.0; x.len()];
        silu(&x, &mut y);
        silu_backward(&x, &grad, &mut dx);
        let expected: Vec<f32> = x.iter().map(|&x| (x as f64 * sigmoid(x as f64)) as f32).collect();
        assert_close(&y, &expected, 1e-6, "silu");
        let mut in_place = x.clone();
        silu_in_place(&mut in_place);
        assert_eq!(in_place, y, "in place");
        let expected: Vec<f32> = x
            .iter()
            .zip(&grad)
            .map(|(&x, &g)| {
                let (x, s) = (x as f64, sigmoid(x as f64));
                (g as f64 * s * (1.0 + x * (1.0 - s))) as f32
            })
            .collect();
        assert_close(&dx, &expected, 1e-6, "silu gradient");
    }

    #[test]
    fn plane_means_and_their_backward() {
        let (planes, plane) = (7, 13 * 11);
        let x = values(planes * plane, 3, 2.0);
        let mut means = vec![0.0; planes];
        plane_means(&x, plane, &mut means);
        let expected: Vec<f32> = x
            .chunks(plane)
            .map(|p| (p.iter().map(|&v| v as f64).sum::<f64>() / plane as f64) as f32)
            .collect();
        assert_close(&means, &expected, 1e-6, "means");
        let grad = values(planes, 4, 1.0);
        let mut dx = vec![0.0; x.len()];
        plane_means_backward(&grad, plane, &mut dx);
        for (i, dx) in dx.chunks(plane).enumerate() {
            assert!(dx.iter().all(|&v| v == grad[i] / plane as f32), "plane {i}");
        }
    }

    #[test]
    fn gate_and_its_gradients_match_the_definition_in_f64() {
        let (planes, plane) = (9, 7 * 7);
        let x = values(planes * plane, 5, 3.0);
        let g = values(planes, 6, 4.0);
        let grad = values(planes * plane, 7, 1.0);
        let mut y = vec![0.0; x.len()];
        gate(&x, &g, plane, &mut y);
        let (mut dx, mut dg) = (vec![0.0; x.len()], vec![0.0; planes]);
        gate_backward(&x, &g, &grad, plane, &mut dx, &mut dg);
        let mut expected_y = Vec::new();
        let mut expected_dx = Vec::new();
        let mut expected_dg = Vec::new();
        for (i, &logit) in g.iter().enumerate() {
            let s = sigmoid(logit as f64);
            let range = i * plane..(i + 1) * plane;
            expected_y.extend(x[range.clone()].iter().map(|&v| (v as f64 * s) as f32));
            expected_dx.extend(grad[range.clone()].iter().map(|&v| (v as f64 * s) as f32));
            let dot: f64 = x[range.clone()]
                .iter()
                .zip(&grad[range])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            expected_dg.push((dot * s * (1.0 - s)) as f32);
        }
        assert_close(&y, &expected_y, 1e-6, "output");
        let mut in_place = x.clone();
        gate_in_place(&mut in_place, &g, plane);
        assert_eq!(in_place, y, "in place");
        assert_close(&dx, &expected_dx, 1e-6, "input gradient");
        assert_close(&dg, &expected_dg, 1e-5, "gate gradient");
    }
}

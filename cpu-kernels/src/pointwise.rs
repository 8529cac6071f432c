//! 1x1 convolution at stride 1 without padding (EfficientNet's expansion and projection
//! layers, most of its arithmetic) over NCHW tensors: per image one matrix product,
//! `y[b] (out x hw) = weight (out x in) . x[b] (in x hw)`, forward and backward.
//!
//! Burn lowers this to its general convolution, and its backward pass transposes the
//! activations to NHWC and back around the products; here both gradients are matrix products
//! over the tensors as they lie (the transposes are strides handed to `gemm`).

use gemm::Parallelism;
use rayon::prelude::*;

use crate::simd::{self, multiversion};
use crate::{ConvGradients, Epilogue};

/// The shapes of a 1x1 convolution: `batch` images of `in_channels` planes of `plane` pixels
/// to `out_channels` planes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pointwise {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Pixels per plane (height x width).
    pub plane: usize,
}

/// A matrix inside a slice: element `(i, j)` at `i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
struct Matrix<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Matrix<'a> {
    fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of the row-major matrix of `stored_rows` rows in `data`.
    fn transposed(data: &'a [f32], stored_rows: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: data.len() / stored_rows.max(1),
        }
    }

    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst (m x n, row-major) = [dst +] lhs (m x k) . rhs (k x n)`.
fn matmul(
    dst: &mut [f32],
    n: usize,
    accumulate: bool,
    lhs: Matrix,
    rhs: Matrix,
    k: usize,
    parallelism: Parallelism,
) {
    let m = dst.len() / n.max(1);
    assert_eq!(dst.len(), m * n, "matmul: destination length");
    matmul_strided(dst, m, n, n, accumulate, lhs, rhs, k, parallelism);
}

/// [`matmul`] into `m x n` of `dst` whose rows are `dst_row` apart.
#[allow(clippy::too_many_arguments)]
fn matmul_strided(
    dst: &mut [f32],
    m: usize,
    n: usize,
    dst_row: usize,
    accumulate: bool,
    lhs: Matrix,
    rhs: Matrix,
    k: usize,
    parallelism: Parallelism,
) {
    let dst_view = Matrix {
        data: dst,
        row_stride: dst_row,
        col_stride: 1,
    };
    assert!(dst_view.covers(m, n), "matmul: destination out of bounds");
    assert!(
        lhs.covers(m, k) && rhs.covers(k, n),
        "matmul: operand out of bounds"
    );
    // SAFETY: every index gemm reads or writes lies inside the slices (checked above); `dst`
    // is borrowed mutably, so nothing aliases it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

impl Pointwise {
    fn check(&self, x: usize, weight: usize, y: usize, what: &str) {
        assert_eq!(
            x,
            self.batch * self.in_channels * self.plane,
            "pointwise {what}: input length"
        );
        assert_eq!(
            weight,
            self.out_channels * self.in_channels,
            "pointwise {what}: weight length"
        );
        assert_eq!(
            y,
            self.batch * self.out_channels * self.plane,
            "pointwise {what}: output length"
        );
    }

    /// Images share the threads when there are enough of them; otherwise each product uses
    /// them all (inference on one photo).
    fn split_images(&self) -> bool {
        self.batch >= rayon::current_num_threads()
    }

    fn inner_parallelism(&self) -> Parallelism {
        if self.split_images() {
            Parallelism::None
        } else {
            Parallelism::Rayon(rayon::current_num_threads())
        }
    }
}

/// Runs `work(image, parallelism)` for every image, spread over the threads as
/// [`Pointwise::split_images`] says.
fn per_image<T: Send>(g: &Pointwise, items: Vec<T>, work: impl Fn(usize, T, Parallelism) + Sync) {
    let parallelism = g.inner_parallelism();
    if g.split_images() {
        items
            .into_par_iter()
            .enumerate()
            .for_each(|(b, item)| work(b, item, parallelism));
    } else {
        items
            .into_iter()
            .enumerate()
            .for_each(|(b, item)| work(b, item, parallelism));
    }
}

/// Output columns per product when an epilogue follows, so that the block is still in cache
/// when the epilogue runs over it (about 512 KiB of outputs).
fn block_columns(g: &Pointwise) -> usize {
    ((1 << 17) / g.out_channels.max(1)).next_multiple_of(16).max(64)
}

/// The forward pass: `y[b] = epilogue(weight . x[b] + bias)`, `weight` `[out, in]`, `bias`
/// `[out]` or absent, `x` `[batch, in, plane]`, `y` `[batch, out, plane]`.
///
/// # Panics
/// If a slice's length does not match the shapes.
pub fn forward(
    g: &Pointwise,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    y: &mut [f32],
) {
    g.check(x.len(), weight.len(), y.len(), "forward");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), g.out_channels, "pointwise forward: bias length");
    }
    let (x_image, y_image, plane) = (g.in_channels * g.plane, g.out_channels * g.plane, g.plane);
    let block = if epilogue == Epilogue::None {
        plane
    } else {
        block_columns(g)
    };
    let images: Vec<&mut [f32]> = y.chunks_mut(y_image.max(1)).collect();
    per_image(g, images, |b, y, parallelism| {
        let x = &x[b * x_image..(b + 1) * x_image];
        for start in (0..plane).step_by(block.max(1)) {
            let n = block.min(plane - start);
            if let Some(bias) = bias {
                for (row, &v) in y.chunks_exact_mut(plane).zip(bias) {
                    row[start..start + n].fill(v);
                }
            }
            let w = Matrix::rows(weight, g.in_channels);
            let x = Matrix {
                data: &x[start..],
                row_stride: plane,
                col_stride: 1,
            };
            let dst = &mut y[start..];
            matmul_strided(
                dst,
                g.out_channels,
                n,
                plane,
                bias.is_some(),
                w,
                x,
                g.in_channels,
                parallelism,
            );
            if epilogue != Epilogue::None {
                for row in y.chunks_exact_mut(plane) {
                    epilogue.apply(&mut row[start..start + n]);
                }
            }
        }
    });
}

multiversion! {
    fn add_into(src: &[f32], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

/// The backward pass of [`forward`] for the gradient `grad` of its output: each gradient in
/// `wanted` (`[input, weight, bias]`).
///
/// # Panics
/// If a slice's length does not match the shapes.
pub fn backward(g: &Pointwise, x: &[f32], weight: &[f32], grad: &[f32], wanted: [bool; 3]) -> ConvGradients {
    g.check(x.len(), weight.len(), grad.len(), "backward");
    let (x_image, y_image) = (g.in_channels * g.plane, g.out_channels * g.plane);
    let input = wanted[0].then(|| {
        let mut dx = vec![0f32; x.len()];
        let images: Vec<&mut [f32]> = dx.chunks_mut(x_image.max(1)).collect();
        per_image(g, images, |b, dx, parallelism| {
            // dx[b] (in x hw) = weight^T (in x out) . grad[b] (out x hw)
            let w_t = Matrix::transposed(weight, g.out_channels);
            let grad = Matrix::rows(&grad[b * y_image..(b + 1) * y_image], g.plane);
            matmul(dx, g.plane, false, w_t, grad, g.out_channels, parallelism);
        });
        dx
    });
    let weight_grad = wanted[1].then(|| {
        // dw (out x in) = sum over b of grad[b] (out x hw) . x[b]^T (hw x in)
        let term = |dw: &mut [f32], b: usize, parallelism| {
            let grad = Matrix::rows(&grad[b * y_image..(b + 1) * y_image], g.plane);
            let x_t = Matrix::transposed(&x[b * x_image..(b + 1) * x_image], g.in_channels);
            matmul(dw, g.in_channels, true, grad, x_t, g.plane, parallelism);
        };
        let size = weight.len();
        if g.split_images() {
            (0..g.batch)
                .into_par_iter()
                .fold(
                    || vec![0f32; size],
                    |mut dw, b| {
                        term(&mut dw, b, Parallelism::None);
                        dw
                    },
                )
                .reduce_with(|mut a, b| {
                    add_into(&b, &mut a);
                    a
                })
                .unwrap_or_else(|| vec![0f32; size])
        } else {
            let mut dw = vec![0f32; size];
            for b in 0..g.batch {
                term(&mut dw, b, g.inner_parallelism());
            }
            dw
        }
    });
    let bias = wanted[2].then(|| {
        let mut db = vec![0f32; g.out_channels];
        for image in grad.chunks_exact(y_image.max(1)) {
            for (db, row) in db.iter_mut().zip(image.chunks_exact(g.plane.max(1))) {
                *db += simd::plane_sum(row);
            }
        }
        db
    });
    ConvGradients {
        input,
        weight: weight_grad,
        bias,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, assert_gradients, values};

    fn reference(g: &Pointwise, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; g.batch * g.out_channels * g.plane];
        for b in 0..g.batch {
            for o in 0..g.out_channels {
                for p in 0..g.plane {
                    let mut acc = bias[o] as f64;
                    for i in 0..g.in_channels {
                        acc +=
                            w[o * g.in_channels + i] as f64 * x[(b * g.in_channels + i) * g.plane + p] as f64;
                    }
                    y[(b * g.out_channels + o) * g.plane + p] = acc as f32;
                }
            }
        }
        y
    }

    fn shapes() -> [Pointwise; 3] {
        let g = |batch, in_channels, out_channels, plane| Pointwise {
            batch,
            in_channels,
            out_channels,
            plane,
        };
        // Many images (split between threads), one image (threads inside the product), and
        // the squeeze-excitation shape (one pixel).
        [g(5, 7, 11, 13), g(1, 16, 5, 49), g(4, 9, 3, 1)]
    }

    #[test]
    fn forward_and_gradients_match_the_definition() {
        for (n, g) in shapes().into_iter().enumerate() {
            let n = n as u64;
            let x = values(g.batch * g.in_channels * g.plane, n, 1.0);
            let w = values(g.out_channels * g.in_channels, 10 + n, 1.0);
            let bias = values(g.out_channels, 20 + n, 1.0);
            let mut y = vec![f32::NAN; g.batch * g.out_channels * g.plane];
            forward(&g, &x, &w, Some(&bias), Epilogue::None, &mut y);
            assert_close(&y, &reference(&g, &x, &w, &bias), 1e-5, &format!("output {g:?}"));
            let mut activated = vec![f32::NAN; y.len()];
            forward(&g, &x, &w, Some(&bias), Epilogue::Silu, &mut activated);
            let silu: Vec<f32> = y.iter().map(|&v| v / (1.0 + (-v).exp())).collect();
            assert_close(&activated, &silu, 1e-5, &format!("with SiLU {g:?}"));
            let mut unbiased = vec![f32::NAN; y.len()];
            forward(&g, &x, &w, None, Epilogue::None, &mut unbiased);
            assert_close(
                &unbiased,
                &reference(&g, &x, &w, &vec![0.0; g.out_channels]),
                1e-5,
                "no bias",
            );

            // sum(y * grad) is linear in x, w and bias: each gradient entry is the response
            // to a unit step of that entry.
            let grad = values(y.len(), 30 + n, 1.0);
            let found = backward(&g, &x, &w, &grad, [true, true, true]);
            let score = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
                reference(&g, x, w, b)
                    .iter()
                    .zip(&grad)
                    .map(|(y, g)| *y as f64 * *g as f64)
                    .sum()
            };
            let base = score(&x, &w, &bias);
            let response = |v: &[f32], f: &dyn Fn(&[f32]) -> f64| -> Vec<f32> {
                (0..v.len())
                    .map(|i| {
                        let mut v = v.to_vec();
                        v[i] += 1.0;
                        (f(&v) - base) as f32
                    })
                    .collect()
            };
            let dx = response(&x, &|x| score(x, &w, &bias));
            let dw = response(&w, &|w| score(&x, w, &bias));
            let db = response(&bias, &|b| score(&x, &w, b));
            assert_gradients(&found, [&dx, &dw, &db], &format!("{g:?}"));
        }
    }

    #[test]
    fn an_epilogue_over_column_blocks_matches_the_whole_product() {
        // 600 output channels: blocks of 224 columns, so a 500-pixel plane takes three.
        let g = Pointwise {
            batch: 3,
            in_channels: 5,
            out_channels: 600,
            plane: 500,
        };
        assert!(block_columns(&g) < g.plane / 2);
        let x = values(g.batch * g.in_channels * g.plane, 1, 1.0);
        let w = values(g.out_channels * g.in_channels, 2, 1.0);
        let bias = values(g.out_channels, 3, 1.0);
        let expected: Vec<f32> = reference(&g, &x, &w, &bias)
            .iter()
            .map(|&v| v / (1.0 + (-v).exp()))
            .collect();
        let mut y = vec![f32::NAN; expected.len()];
        forward(&g, &x, &w, Some(&bias), Epilogue::Silu, &mut y);
        assert_close(&y, &expected, 1e-5, "blocked");
    }

    #[test]
    fn unwanted_gradients_are_not_computed() {
        let g = shapes()[0];
        let x = values(g.batch * g.in_channels * g.plane, 1, 1.0);
        let w = values(g.out_channels * g.in_channels, 2, 1.0);
        let grad = values(g.batch * g.out_channels * g.plane, 3, 1.0);
        let found = backward(&g, &x, &w, &grad, [false, true, false]);
        assert!(found.input.is_none() && found.bias.is_none() && found.weight.is_some());
    }
}

//! Depthwise convolution (one `kh x kw` filter per channel) over NCHW tensors, forward and
//! backward, as direct loops over each `(image, channel)` plane.
//!
//! Burn runs a depthwise convolution's backward pass through its generic grouped-convolution
//! code (a transposed convolution for the input gradient, transposes around it); here each
//! plane is visited once per direction. The plane is first copied into a zero-padded layout
//! split into phases by the stride ([`Padded`]), so that every filter tap reads the inputs of
//! consecutive outputs from consecutive memory, without bounds checks: at stride 2, phase
//! (0, 0) holds the even rows' even columns, (0, 1) their odd columns, and so on. Outputs are
//! accumulated a block at a time over all taps before they are stored once.

use rayon::iter::Either;
use rayon::prelude::*;

use crate::simd::{self, multiversion};
use crate::{ConvGradients, Epilogue};

/// The shapes of a depthwise convolution: `batch` images of `channels` planes of `input` =
/// `[height, width]`, a `kernel` per channel, `stride`, and padding before and after each axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Depthwise {
    /// Images.
    pub batch: usize,
    /// Channels (and filters).
    pub channels: usize,
    /// Input `[height, width]`.
    pub input: [usize; 2],
    /// Filter `[height, width]`.
    pub kernel: [usize; 2],
    /// `[vertical, horizontal]` stride.
    pub stride: [usize; 2],
    /// Zero rows and columns before the input, `[top, left]`.
    pub pad_begin: [usize; 2],
    /// Zero rows and columns after it, `[bottom, right]` (TensorFlow's "same" at stride 2 pads
    /// one more after than before).
    pub pad_end: [usize; 2],
}

impl Depthwise {
    /// Output `[height, width]`.
    ///
    /// # Panics
    /// If a stride is 0 or the filter is larger than the padded input.
    pub fn output(&self) -> [usize; 2] {
        std::array::from_fn(|i| {
            assert!(self.stride[i] > 0, "depthwise: stride 0");
            let padded = self.input[i] + self.pad_begin[i] + self.pad_end[i];
            assert!(
                padded >= self.kernel[i],
                "depthwise: kernel larger than padded input"
            );
            (padded - self.kernel[i]) / self.stride[i] + 1
        })
    }

    fn in_plane(&self) -> usize {
        self.input[0] * self.input[1]
    }

    fn out_plane(&self) -> usize {
        let [h, w] = self.output();
        h * w
    }

    fn taps(&self) -> usize {
        self.kernel[0] * self.kernel[1]
    }

    fn padded(&self) -> Padded {
        let [oh, ow] = self.output();
        let [kh, kw] = self.kernel;
        let [sy, sx] = self.stride;
        Padded {
            phases: self.stride,
            // One row more than outputs read: the flattened loops below run over whole
            // padded rows, and the last one's tail reads into it.
            rows: oh + (kh - 1) / sy + 1,
            width: ow + (kw - 1) / sx,
            kernel: self.kernel,
            out: [oh, ow],
        }
    }

    fn check(&self, x: usize, weight: usize, y: usize, what: &str) {
        let planes = self.batch * self.channels;
        assert_eq!(x, planes * self.in_plane(), "depthwise {what}: input length");
        assert_eq!(
            weight,
            self.channels * self.taps(),
            "depthwise {what}: weight length"
        );
        assert_eq!(y, planes * self.out_plane(), "depthwise {what}: output length");
    }

    /// Input columns `ix` of phase `px` inside the padded layout: `(first ix, first j, count)`.
    fn phase_columns(&self, p: &Padded, px: usize) -> (usize, usize, usize) {
        let (sx, pl, w) = (p.phases[1], self.pad_begin[1], self.input[1]);
        // Padded column c = ix + pl = j * sx + px; the first ix >= 0 with c % sx == px.
        let first_c = if pl <= px {
            px
        } else {
            pl + (px + sx - pl % sx) % sx
        };
        if first_c < pl || first_c - pl >= w {
            return (0, 0, 0);
        }
        let (ix, j) = (first_c - pl, first_c / sx);
        let count = ((w - ix).div_ceil(sx)).min(p.width.saturating_sub(j));
        (ix, j, count)
    }

    /// Copies input plane `x` into the padded layout `q` (zeros around it). Every plane
    /// writes the same positions, so a buffer reused for the next plane keeps its zeros.
    fn pad(&self, p: &Padded, x: &[f32], q: &mut Vec<f32>) {
        if q.len() != p.len() {
            q.clear();
            q.resize(p.len(), 0.0);
        }
        let [h, w] = self.input;
        let [sy, sx] = p.phases;
        for iy in 0..h {
            let r = iy + self.pad_begin[0];
            let (py, row) = (r % sy, r / sy);
            if row >= p.rows {
                continue;
            }
            let source = &x[iy * w..(iy + 1) * w];
            for px in 0..sx {
                let (ix, j, count) = self.phase_columns(p, px);
                let at = p.at(py, px, row) + j;
                let target = &mut q[at..at + count];
                if sx == 1 {
                    target.copy_from_slice(&source[ix..ix + count]);
                } else {
                    for (t, &v) in target.iter_mut().zip(source[ix..].iter().step_by(sx)) {
                        *t = v;
                    }
                }
            }
        }
    }

    /// The inverse of [`Depthwise::pad`] for gradients: input plane `dx` from the padded
    /// layout `dq` (padding dropped; inputs no output reads get 0).
    fn unpad(&self, p: &Padded, dq: &[f32], dx: &mut [f32]) {
        let w = self.input[1];
        let [sy, sx] = p.phases;
        dx.fill(0.0);
        for (iy, target) in dx.chunks_exact_mut(w).enumerate() {
            let r = iy + self.pad_begin[0];
            let (py, row) = (r % sy, r / sy);
            if row >= p.rows {
                continue;
            }
            for px in 0..sx {
                let (ix, j, count) = self.phase_columns(p, px);
                let at = p.at(py, px, row) + j;
                if sx == 1 {
                    target[ix..ix + count].copy_from_slice(&dq[at..at + count]);
                } else {
                    for (t, &v) in target[ix..].iter_mut().step_by(sx).zip(&dq[at..at + count]) {
                        *t = v;
                    }
                }
            }
        }
    }
}

/// A plane zero-padded and split into phases by the stride, so that a filter tap reads the
/// inputs of consecutive outputs from consecutive memory: block `(py, px)` holds `rows` rows
/// of `width`, element `(r, j)` being padded row `r * sy + py`, column `j * sx + px`. Tap
/// `(ky, kx)` of output `(oy, ox)` reads block `(ky % sy, kx % sx)` at `(oy + ky / sy, ox + kx
/// / sx)`. Rows are `width` long against the output's `ow`, so the loops run over the
/// flattened `oh x width` "wide" output and drop the `width - ow` extra columns of each row
/// at the end: one long vector loop per tap, even for 7 x 7 planes.
#[derive(Clone, Copy)]
struct Padded {
    phases: [usize; 2],
    rows: usize,
    width: usize,
    kernel: [usize; 2],
    out: [usize; 2],
}

impl Padded {
    fn len(&self) -> usize {
        self.phases[0] * self.phases[1] * self.rows * self.width
    }

    fn at(&self, py: usize, px: usize, row: usize) -> usize {
        ((py * self.phases[1] + px) * self.rows + row) * self.width
    }

    /// Where tap `(ky, kx)` reads for wide output 0.
    fn tap(&self, ky: usize, kx: usize) -> usize {
        let [sy, sx] = self.phases;
        self.at(ky % sy, kx % sx, ky / sy) + kx / sx
    }

    /// Length of the wide output (`oh x width`).
    fn wide(&self) -> usize {
        self.out[0] * self.width
    }
}

multiversion! {
    fn forward_plane(p: Padded, q: &[f32], w: &[f32], bias: f32, epilogue: Epilogue, wide: &mut [f32]) {
        let [kh, kw] = p.kernel;
        let len = p.wide();
        let mut start = 0;
        // Whole blocks: a fixed-size accumulator that LLVM keeps in vector registers across
        // all taps (a slice of run-time length goes through memory at every tap).
        while start + BLOCK <= len {
            let mut acc = [bias; BLOCK];
            for ky in 0..kh {
                for kx in 0..kw {
                    let weight = w[ky * kw + kx];
                    let at = p.tap(ky, kx) + start;
                    let source: &[f32; BLOCK] = q[at..at + BLOCK].try_into().expect("a block is BLOCK long");
                    for (a, &v) in acc.iter_mut().zip(source) {
                        *a += weight * v;
                    }
                }
            }
            epilogue.apply(&mut acc);
            wide[start..start + BLOCK].copy_from_slice(&acc);
            start += BLOCK;
        }
        if start < len {
            let n = len - start;
            let mut acc = [bias; BLOCK];
            let acc = &mut acc[..n];
            for ky in 0..kh {
                for kx in 0..kw {
                    let weight = w[ky * kw + kx];
                    let at = p.tap(ky, kx) + start;
                    for (a, &v) in acc.iter_mut().zip(&q[at..at + n]) {
                        *a += weight * v;
                    }
                }
            }
            epilogue.apply(acc);
            wide[start..].copy_from_slice(acc);
        }
    }
}

multiversion! {
    fn input_grad_plane(p: Padded, w: &[f32], wide_grad: &[f32], dq: &mut [f32]) {
        let [kh, kw] = p.kernel;
        let len = p.wide();
        dq.fill(0.0);
        for ky in 0..kh {
            for kx in 0..kw {
                let weight = w[ky * kw + kx];
                let at = p.tap(ky, kx);
                for (d, &g) in dq[at..at + len].iter_mut().zip(wide_grad) {
                    *d += weight * g;
                }
            }
        }
    }
}

multiversion! {
    fn weight_grad_plane(p: Padded, q: &[f32], wide_grad: &[f32], dw: &mut [f32]) {
        let [kh, kw] = p.kernel;
        let len = p.wide();
        for ky in 0..kh {
            for kx in 0..kw {
                let at = p.tap(ky, kx);
                dw[ky * kw + kx] = simd::dot(&q[at..at + len], wide_grad);
            }
        }
    }
}

/// Outputs accumulated in registers before one store.
const BLOCK: usize = 64;

/// Planes per task: about 32k outputs' work.
fn min_planes(plane: usize) -> usize {
    ((1 << 15) / plane.max(1)).max(1)
}

/// The forward pass: `y[b, c] = epilogue(x[b, c] (*) weight[c] + bias[c])`. `weight` is
/// `[channels, kh, kw]`, `bias` `[channels]` or absent, `y` `[batch, channels, out_h, out_w]`
/// ([`Depthwise::output`]).
///
/// # Panics
/// If a slice's length does not match the shapes.
pub fn forward(
    g: &Depthwise,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    y: &mut [f32],
) {
    g.check(x.len(), weight.len(), y.len(), "forward");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), g.channels, "depthwise forward: bias length");
    }
    let (in_plane, out_plane, taps, p) = (g.in_plane(), g.out_plane(), g.taps(), g.padded());
    let ow = p.out[1];
    y.par_chunks_mut(out_plane)
        .enumerate()
        .with_min_len(min_planes(out_plane))
        .for_each_init(Scratch::default, |scratch, (i, y)| {
            let c = i % g.channels;
            g.pad(&p, &x[i * in_plane..(i + 1) * in_plane], &mut scratch.padded);
            let w = &weight[c * taps..(c + 1) * taps];
            scratch.wide.resize(p.wide(), 0.0);
            let bias = bias.map_or(0.0, |b| b[c]);
            forward_plane(p, &scratch.padded, w, bias, epilogue, &mut scratch.wide);
            for (y, wide) in y.chunks_exact_mut(ow).zip(scratch.wide.chunks_exact(p.width)) {
                y.copy_from_slice(&wide[..ow]);
            }
        });
}

/// Scratch for one plane.
#[derive(Default)]
struct Scratch {
    padded: Vec<f32>,
    wide: Vec<f32>,
    grad: Vec<f32>,
}

/// `count` chunks of `size` of `buffer`, or `count` times `None` without one.
fn optional_chunks(
    buffer: Option<&mut [f32]>,
    size: usize,
    count: usize,
) -> impl IndexedParallelIterator<Item = Option<&mut [f32]>> {
    match buffer {
        Some(buffer) => Either::Left(buffer.par_chunks_mut(size).map(Some)),
        None => Either::Right((0..count).into_par_iter().map(|_| None)),
    }
}

/// The backward pass of [`forward`] for the gradient `grad` of its output: each gradient in
/// `wanted` (`[input, weight, bias]`).
///
/// # Panics
/// If a slice's length does not match the shapes.
pub fn backward(g: &Depthwise, x: &[f32], weight: &[f32], grad: &[f32], wanted: [bool; 3]) -> ConvGradients {
    g.check(x.len(), weight.len(), grad.len(), "backward");
    let (in_plane, out_plane, taps, p) = (g.in_plane(), g.out_plane(), g.taps(), g.padded());
    let ow = p.out[1];
    let planes = g.batch * g.channels;
    let mut dx = wanted[0].then(|| vec![0f32; planes * in_plane]);
    // Per plane, summed over the batch below, so that planes stay independent tasks.
    let mut dw_planes = wanted[1].then(|| vec![0f32; planes * taps]);
    let mut db_planes = wanted[2].then(|| vec![0f32; planes]);
    let dx_chunks = optional_chunks(dx.as_deref_mut(), in_plane, planes);
    let dw_chunks = optional_chunks(dw_planes.as_deref_mut(), taps, planes);
    let db_chunks = optional_chunks(db_planes.as_deref_mut(), 1, planes);
    dx_chunks
        .zip(dw_chunks)
        .zip(db_chunks)
        .enumerate()
        .with_min_len(min_planes(out_plane))
        .for_each_init(Scratch::default, |scratch, (i, ((dx, dw), db))| {
            let c = i % g.channels;
            let w = &weight[c * taps..(c + 1) * taps];
            let grad = &grad[i * out_plane..(i + 1) * out_plane];
            // The gradient in the wide layout, zero in the extra columns (which no plane
            // writes, so a reused buffer keeps them zero).
            if scratch.wide.len() != p.wide() {
                scratch.wide.clear();
                scratch.wide.resize(p.wide(), 0.0);
            }
            for (wide, g) in scratch.wide.chunks_exact_mut(p.width).zip(grad.chunks_exact(ow)) {
                wide[..ow].copy_from_slice(g);
            }
            if let Some(dx) = dx {
                scratch.grad.resize(p.len(), 0.0);
                input_grad_plane(p, w, &scratch.wide, &mut scratch.grad);
                g.unpad(&p, &scratch.grad, dx);
            }
            if let Some(dw) = dw {
                g.pad(&p, &x[i * in_plane..(i + 1) * in_plane], &mut scratch.padded);
                weight_grad_plane(p, &scratch.padded, &scratch.wide, dw);
            }
            if let Some(db) = db {
                db[0] = simd::plane_sum(grad);
            }
        });

    let over_batch = |per_plane: Vec<f32>, width: usize| {
        let mut total = vec![0f32; g.channels * width];
        for image in per_plane.chunks_exact(g.channels * width) {
            for (t, v) in total.iter_mut().zip(image) {
                *t += v;
            }
        }
        total
    };
    ConvGradients {
        input: dx,
        weight: dw_planes.map(|dw| over_batch(dw, taps)),
        bias: db_planes.map(|db| over_batch(db, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, assert_gradients, values};

    /// The definition, in f64, one output at a time.
    fn reference(g: &Depthwise, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
        let [oh, ow] = g.output();
        let [h, wd] = g.input;
        let mut y = Vec::new();
        for b in 0..g.batch {
            for c in 0..g.channels {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut acc = bias[c] as f64;
                        for ky in 0..g.kernel[0] {
                            for kx in 0..g.kernel[1] {
                                let iy = (oy * g.stride[0] + ky) as isize - g.pad_begin[0] as isize;
                                let ix = (ox * g.stride[1] + kx) as isize - g.pad_begin[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x[((b * g.channels + c) * h + iy as usize) * wd + ix as usize];
                                acc += xv as f64 * w[(c * g.kernel[0] + ky) * g.kernel[1] + kx] as f64;
                            }
                        }
                        y.push(acc as f32);
                    }
                }
            }
        }
        y
    }

    /// Gradients of `sum(y * grad)` by central differences would be slow and loose; the
    /// forward pass is linear in each of x, w and bias, so the gradient's entry `i` is the
    /// output's response to a unit change of entry `i`, dotted with `grad`.
    fn linear_gradient(
        len: usize,
        mut output_for: impl FnMut(usize) -> Vec<f32>,
        base: &[f32],
        grad: &[f32],
    ) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let moved = output_for(i);
                moved
                    .iter()
                    .zip(base)
                    .zip(grad)
                    .map(|((m, b), g)| (*m as f64 - *b as f64) * *g as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }

    fn cases() -> Vec<Depthwise> {
        let g =
            |input: [usize; 2], kernel: usize, stride: usize, begin: [usize; 2], end: [usize; 2]| Depthwise {
                batch: 2,
                channels: 3,
                input,
                kernel: [kernel, kernel],
                stride: [stride, stride],
                pad_begin: begin,
                pad_end: end,
            };
        vec![
            g([7, 9], 3, 1, [1, 1], [1, 1]),
            g([8, 8], 3, 2, [0, 0], [1, 1]), // TF "same" at stride 2: one more after
            g([9, 7], 5, 2, [2, 2], [2, 2]),
            g([10, 11], 5, 2, [1, 2], [2, 2]), // uneven on one axis, odd width
            g([5, 6], 3, 1, [0, 0], [0, 0]),   // valid
            g([3, 3], 5, 1, [2, 2], [2, 2]),   // filter wider than the input
        ]
    }

    #[test]
    fn forward_matches_the_definition() {
        for (n, g) in cases().into_iter().enumerate() {
            let x = values(g.batch * g.channels * g.in_plane(), n as u64, 1.0);
            let w = values(g.channels * g.taps(), 100 + n as u64, 1.0);
            let bias = values(g.channels, 200 + n as u64, 1.0);
            let mut y = vec![f32::NAN; g.batch * g.channels * g.out_plane()];
            forward(&g, &x, &w, Some(&bias), Epilogue::None, &mut y);
            let expected = reference(&g, &x, &w, &bias);
            assert_close(&y, &expected, 1e-5, &format!("{g:?}"));
            forward(&g, &x, &w, Some(&bias), Epilogue::Silu, &mut y);
            let silu: Vec<f32> = expected.iter().map(|&v| v / (1.0 + (-v).exp())).collect();
            assert_close(&y, &silu, 1e-5, &format!("with SiLU {g:?}"));
        }
    }

    #[test]
    fn gradients_match_the_outputs_response() {
        for (n, g) in cases().into_iter().enumerate() {
            let x = values(g.batch * g.channels * g.in_plane(), n as u64, 1.0);
            let w = values(g.channels * g.taps(), 100 + n as u64, 1.0);
            let bias = values(g.channels, 200 + n as u64, 1.0);
            let base = reference(&g, &x, &w, &bias);
            let grad = values(base.len(), 300 + n as u64, 1.0);
            let found = backward(&g, &x, &w, &grad, [true, true, true]);
            let bump = |v: &[f32], i: usize| {
                let mut v = v.to_vec();
                v[i] += 1.0;
                v
            };
            let dx = linear_gradient(x.len(), |i| reference(&g, &bump(&x, i), &w, &bias), &base, &grad);
            let dw = linear_gradient(w.len(), |i| reference(&g, &x, &bump(&w, i), &bias), &base, &grad);
            let db = linear_gradient(
                bias.len(),
                |i| reference(&g, &x, &w, &bump(&bias, i)),
                &base,
                &grad,
            );
            let case = format!("{g:?}");
            assert_gradients(&found, [&dx, &dw, &db], &case);
        }
    }

    #[test]
    fn only_the_wanted_gradients_are_computed() {
        let g = cases()[1];
        let x = values(g.batch * g.channels * g.in_plane(), 1, 1.0);
        let w = values(g.channels * g.taps(), 2, 1.0);
        let grad = values(g.batch * g.channels * g.out_plane(), 3, 1.0);
        let all = backward(&g, &x, &w, &grad, [true, true, true]);
        let some = backward(&g, &x, &w, &grad, [false, true, false]);
        assert!(some.input.is_none() && some.bias.is_none());
        assert_eq!(some.weight, all.weight);
    }

    #[test]
    fn output_size_follows_padding_and_stride() {
        let g = cases()[1];
        assert_eq!(g.output(), [4, 4]);
        assert_eq!(cases()[3].output(), [5, 6]);
    }
}

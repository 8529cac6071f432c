//! Fused, vectorised CPU kernels for EfficientNet's hot operations, forward and backward, on
//! plain `f32` slices in NCHW order: SiLU ([`activation::silu`]), squeeze-excitation's pooling
//! and gate ([`activation::plane_means`], [`activation::gate`]), depthwise convolution
//! ([`depthwise`]) and 1x1 convolution ([`pointwise`]).
//!
//! Burn's flex backend builds these out of generic kernels: a scalar `exp` per element for the
//! sigmoids, a temporary per composed op, transposes around convolution backward passes. The
//! model crate (`effnet::native`) routes the operations here on flex through a Burn backend
//! extension whose backward passes are these kernels. Work is spread over rayon's global pool,
//! the pool flex uses; element loops are compiled per instruction set and chosen at run time
//! (`simd`).
//!
//! Shapes that do not match the slices are caller bugs and panic, as Burn's own backend
//! operations do.

pub mod activation;
pub mod batch_norm;
pub mod depthwise;
pub mod pointwise;
pub mod simd;

/// What a convolution applies to its output before storing it: fusing the activation saves
/// a pass over the activation's memory (inference; training keeps the convolution's own output
/// for the activation's backward pass, so it runs them apart).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Epilogue {
    /// The convolution's output as it is.
    #[default]
    None,
    /// SiLU of it.
    Silu,
}

impl Epilogue {
    /// Applies the epilogue to `values` in place.
    pub(crate) fn apply(self, values: &mut [f32]) {
        if self == Self::Silu {
            simd::silu_in_place(values);
        }
    }
}

/// The gradients a convolution's backward pass was asked for (`None` where not wanted).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ConvGradients {
    /// Of the input, `[batch, in_channels, h, w]`.
    pub input: Option<Vec<f32>>,
    /// Of the weight, `[out_channels, in_channels / groups, kh, kw]`.
    pub weight: Option<Vec<f32>>,
    /// Of the bias, `[out_channels]`.
    pub bias: Option<Vec<f32>>,
}

#[cfg(test)]
pub(crate) mod testing {
    /// `len` values in `[-scale, scale)` from a fixed-seed generator (xorshift), so a failing
    /// case reproduces.
    pub fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Fails unless each gradient in `found` is within 1e-4 of `expected` (`[input, weight,
    /// bias]`).
    pub fn assert_gradients(found: &crate::ConvGradients, expected: [&[f32]; 3], case: &str) {
        let found = [&found.input, &found.weight, &found.bias];
        for ((name, found), expected) in ["input", "weight", "bias"].iter().zip(found).zip(expected) {
            let found = found
                .as_deref()
                .unwrap_or_else(|| panic!("{case}: no {name} gradient"));
            assert_close(found, expected, 1e-4, &format!("{name} gradient {case}"));
        }
    }

    /// Fails unless every `found` is within `tolerance` of `expected`, relative to the largest
    /// magnitude in `expected`.
    pub fn assert_close(found: &[f32], expected: &[f32], tolerance: f32, what: &str) {
        assert_eq!(found.len(), expected.len(), "{what}: lengths");
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            scale > 0.0,
            "{what}: all zeros, the comparison would prove nothing"
        );
        for (i, (f, e)) in found.iter().zip(expected).enumerate() {
            assert!(
                (f - e).abs() <= tolerance * scale,
                "{what}: element {i} is {f}, expected {e} (tolerance {tolerance} of {scale})"
            );
        }
    }
}

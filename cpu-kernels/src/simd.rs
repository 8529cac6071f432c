//! Element loops compiled for the widest vector unit the CPU has, picked at run time.
//!
//! The kernels are written as plain loops over slices with no calls and no branches in their
//! bodies, which LLVM vectorises; [`multiversion!`] compiles each body once for AVX-512, once for
//! AVX2 with FMA and once for the baseline (SSE2 on x86-64, NEON on aarch64), and calls the
//! widest the CPU supports. A release build for the baseline alone would run 4 lanes where the
//! machine has 16.

/// Defines `fn $name(args)` whose body is compiled per instruction set and dispatched at run
/// time (feature detection is cached by the standard library, so a call costs a load and a
/// branch).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                if $crate::simd::has_avx512() {
                    // SAFETY: the CPU supports every feature `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::simd::has_avx2() {
                    // SAFETY: as above, for `avx2`.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Whether the CPU runs AVX-512 (foundation and byte/word instructions).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")
}

/// Whether the CPU runs AVX2 with fused multiply-add.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `e^x` for f32 without a library call, so that loops over it vectorise: Cephes' range
/// reduction and degree-6 polynomial (within 2 ulp of `f32::exp` on the clamped range). The
/// argument is clamped to [-87.3, 88.0], where the result is a normal float; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that k * LN2_HI is exact for the k that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Selects rather than f32::min/max: those carry NaN rules that cost extra instructions.
    let x = if x > 88.0 { 88.0 } else { x };
    let x = if x < -87.3 { -87.3 } else { x };
    let t = x * LOG2_E + ROUND;
    let k = t - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^k, built from k's bits: the clamp keeps k + 127 within a normal exponent.
    let k_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(k_bits.wrapping_add(127) << 23);
    e * scale
}

/// The logistic function `1 / (1 + e^-x)` on [`exp`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Sums a slice with eight partial sums, so the loop vectorises (a single running sum fixes
/// the order of additions, which LLVM must keep).
#[inline(always)]
pub(crate) fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    lanes.iter().sum::<f32>() + tail
}

/// `sum(a[i] * b[i])`, vectorised as [`sum`].
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_library_over_its_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (found, expected) = (exp(x), x.exp());
            worst = worst.max(((found - expected) / expected).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5 * f32::EPSILON, "worst relative error {worst:e}");
    }

    #[test]
    fn exp_saturates_instead_of_overflowing_and_keeps_nan() {
        assert_eq!(exp(1000.0), exp(88.0));
        assert!(exp(88.0).is_finite() && exp(88.0) > 1e38);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn sigmoid_matches_the_definition_and_its_limits() {
        for x in [-30.0f32, -5.5, -1.0, 0.0, 0.25, 3.0, 40.0] {
            let expected = 1.0 / (1.0 + (-x as f64).exp());
            assert!((sigmoid(x) as f64 - expected).abs() < 1e-7, "sigmoid({x})");
        }
        assert_eq!(sigmoid(200.0), 1.0);
        assert!(sigmoid(-200.0) < 1e-37);
    }

    #[test]
    fn sums_and_dots_of_odd_lengths_are_exact_for_integers() {
        let values: Vec<f32> = (0..37).map(|i| i as f32).collect();
        assert_eq!(sum(&values), 666.0);
        assert_eq!(
            dot(&values, &values),
            (0..37).map(|i| (i * i) as f32).sum::<f32>()
        );
        assert_eq!(sum(&[]), 0.0);
    }
}

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

multiversion! {
    /// [`sum`] compiled for the CPU's widest vector unit.
    pub(crate) fn plane_sum(x: &[f32]) -> f32 {
        sum(x)
    }
}

multiversion! {
    /// [`dot`] compiled for the CPU's widest vector unit.
    pub(crate) fn plane_dot(x: &[f32], y: &[f32]) -> f32 {
        dot(x, y)
    }
}

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

/// [`exp`]'s constants, shared by its vector versions in `x86`.
/// Clamp: within it, `e^x` and `2^k` are normal floats.
const EXP_MIN: f32 = -87.3;
const EXP_MAX: f32 = 88.0;
/// ln 2 split so that `k * LN2_HI` is exact for the `k` that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' polynomial for `(e^r - 1 - r) / r^2` on [-ln2/2, ln2/2], highest degree first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` for f32 without a library call, so that loops over it vectorise: Cephes' range
/// reduction and degree-6 polynomial (within 2 ulp of `f32::exp` on the clamped range). The
/// argument is clamped to [-87.3, 88.0], where the result is a normal float; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // Selects rather than f32::min/max: those carry NaN rules that cost extra instructions.
    let x = if x > EXP_MAX { EXP_MAX } else { x };
    let x = if x < EXP_MIN { EXP_MIN } else { x };
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let k = t - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
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

/// `x * sigmoid(x)` over `values`, in place: explicit vector code where the CPU has AVX-512
/// or AVX2, because the sigmoid's division is what the loop waits on (a `vdivps` is several
/// times slower than a fused multiply-add) and only intrinsics reach the reciprocal estimate
/// (`vrcp14ps`, `vrcpps`) that one Newton step makes exact to a few ulp. Elsewhere the same
/// loop as [`sigmoid`].
pub fn silu_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU supports AVX-512F (checked).
            return unsafe { x86::silu_avx512(values) };
        }
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked).
            return unsafe { x86::silu_avx2(values) };
        }
    }
    for v in values.iter_mut() {
        *v *= sigmoid(*v);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::exp`]'s steps on 16 lanes; `recip` is `1 / (1 + e^-x)` by a reciprocal
    /// estimate and one Newton step.
    #[target_feature(enable = "avx512f")]
    fn silu16(x: __m512) -> __m512 {
        let neg = _mm512_sub_ps(_mm512_setzero_ps(), x);
        let t = _mm512_min_ps(
            _mm512_max_ps(neg, _mm512_set1_ps(super::EXP_MIN)),
            _mm512_set1_ps(super::EXP_MAX),
        );
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            t,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(super::LN2_HI), t);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(super::LN2_LO), r);
        let mut p = _mm512_set1_ps(super::EXP_POLY[0]);
        for &c in &super::EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
        let e = _mm512_scalef_ps(e, k);
        let d = _mm512_add_ps(e, _mm512_set1_ps(1.0));
        let y = _mm512_rcp14_ps(d);
        // Newton: y (2 - d y).
        let y = _mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.0)));
        _mm512_mul_ps(x, y)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn silu_avx512(values: &mut [f32]) {
        let mut chunks = values.chunks_exact_mut(16);
        for chunk in &mut chunks {
            // SAFETY: the chunk holds 16 floats; unaligned loads and stores.
            unsafe {
                let x = _mm512_loadu_ps(chunk.as_ptr());
                _mm512_storeu_ps(chunk.as_mut_ptr(), silu16(x));
            }
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let mask: __mmask16 = (1u32 << tail.len()).wrapping_sub(1) as __mmask16;
            // SAFETY: masked lanes are neither read nor written.
            unsafe {
                let x = _mm512_maskz_loadu_ps(mask, tail.as_ptr());
                _mm512_mask_storeu_ps(tail.as_mut_ptr(), mask, silu16(x));
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn silu8(x: __m256) -> __m256 {
        let neg = _mm256_sub_ps(_mm256_setzero_ps(), x);
        let t = _mm256_min_ps(
            _mm256_max_ps(neg, _mm256_set1_ps(super::EXP_MIN)),
            _mm256_set1_ps(super::EXP_MAX),
        );
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            t,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(super::LN2_HI), t);
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(super::LN2_LO), r);
        let mut p = _mm256_set1_ps(super::EXP_POLY[0]);
        for &c in &super::EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0));
        // 2^k from k's bits (k within a normal exponent after the clamp).
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)));
        let e = _mm256_mul_ps(e, _mm256_castsi256_ps(bits));
        let d = _mm256_add_ps(e, _mm256_set1_ps(1.0));
        let y = _mm256_rcp_ps(d);
        // Two Newton steps: the estimate has 12 bits.
        let y = _mm256_mul_ps(y, _mm256_fnmadd_ps(d, y, _mm256_set1_ps(2.0)));
        let y = _mm256_mul_ps(y, _mm256_fnmadd_ps(d, y, _mm256_set1_ps(2.0)));
        _mm256_mul_ps(x, y)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu_avx2(values: &mut [f32]) {
        let mut chunks = values.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: the chunk holds 8 floats; unaligned loads and stores.
            unsafe {
                let x = _mm256_loadu_ps(chunk.as_ptr());
                _mm256_storeu_ps(chunk.as_mut_ptr(), silu8(x));
            }
        }
        for v in chunks.into_remainder() {
            *v *= super::sigmoid(*v);
        }
    }
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
    fn vector_silu_matches_the_definition_on_every_instruction_set() {
        let x: Vec<f32> = (0..1001)
            .map(|i| (i as f32 - 500.0) * 0.37)
            .chain([f32::NAN, 1e30, -1e30])
            .collect();
        let expected = |v: f32| (v as f64 / (1.0 + (-(v as f64)).exp())) as f32;
        let check = |found: &[f32], what: &str| {
            for (&v, &f) in x.iter().zip(found) {
                let e = expected(v);
                if v.is_nan() {
                    assert!(f.is_nan(), "{what}: silu(NaN) = {f}");
                } else if v.abs() < 1e29 {
                    assert!(
                        (f - e).abs() <= 1e-6 * e.abs().max(1.0),
                        "{what}: silu({v}) = {f}, expected {e}"
                    );
                } else if v > 0.0 {
                    assert_eq!(f, v, "{what}: silu({v})");
                } else {
                    // The exponent is clamped: a vanishing product instead of -0.
                    assert!(f <= 0.0 && f > -1e-8, "{what}: silu({v}) = {f}");
                }
            }
        };
        let mut found = x.clone();
        silu_in_place(&mut found);
        check(&found, "dispatched");
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                let mut found = x.clone();
                // SAFETY: checked above.
                unsafe { x86::silu_avx2(&mut found) };
                check(&found, "avx2");
            }
            if has_avx512() {
                let mut found = x.clone();
                // SAFETY: checked above.
                unsafe { x86::silu_avx512(&mut found) };
                check(&found, "avx512");
            }
        }
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

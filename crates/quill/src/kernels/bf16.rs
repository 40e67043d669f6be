//! bf16 mixed-precision matrix multiply: C (+)= op(A) · op(B) with A, B and C in f32. The
//! operands are rounded to bf16 (round to nearest even) while they are packed into cache-sized
//! panels; the products run on AVX-512 BF16's `vdpbf16ps` (two bf16 products added into each
//! f32 lane per instruction, twice the f32 FMA rate) and accumulate in f32. The blocking,
//! packing and kernels are in [`super::packed`]; this file holds the rounding (the product's entry is [`super::matmul`]).

/// Whether this CPU runs the bf16 kernel natively (and `QUILL_SIMD` does not cap it below avx512).
pub fn has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            super::simd::has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// f32 -> bf16, rounding to nearest even (as PyTorch and `half` do); NaN stays NaN.
#[inline]
pub fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// bf16 bits -> f32 (exact).
#[inline]
pub fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

super::simd::multiversion! {
    /// dst = src rounded to bf16 (to nearest even; NaN stays NaN), as f32.
    pub fn round_row(dst: &mut [f32], src: &[f32]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = bf16_to_f32(round_bf16(x));
        }
    }
}

super::simd::multiversion! {
    /// x rounded to bf16 in place, as [`round_row`].
    pub fn round_in_place(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = bf16_to_f32(round_bf16(*v));
        }
    }
}

super::simd::multiversion! {
    /// dst = the bf16 values of src, as f32 (exact).
    pub fn widen_bf16(dst: &mut [f32], src: &[u16]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = bf16_to_f32(x);
        }
    }
}

/// dst = the f16 values of src, as f32 (exact): eight at a time with F16C where the CPU has
/// it.
pub fn widen_f16(dst: &mut [f32], src: &[u16]) {
    let n = dst.len().min(src.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && super::simd::has_avx2() {
        // Safety: F16C and AVX are present; n elements of each slice are in bounds.
        return unsafe { widen_f16_f16c(&mut dst[..n], &src[..n]) };
    }
    for (d, &x) in dst[..n].iter_mut().zip(&src[..n]) {
        *d = half::f16::from_bits(x).to_f32();
    }
}

/// [`widen_f16`] on F16C.
///
/// # Safety
/// The CPU has F16C and AVX; the slices have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16_f16c(dst: &mut [f32], src: &[u16]) {
    use std::arch::x86_64::*;
    let n = dst.len();
    let whole = n / 8 * 8;
    for i in (0..whole).step_by(8) {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    for i in whole..n {
        dst[i] = half::f16::from_bits(src[i]).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;
    use crate::rng::Rng;

    #[test]
    fn rounding_matches_half() {
        let mut rng = Rng::new(41);
        let mut x = randn(&mut rng, 1000, 3.0);
        x.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 1e-40]);
        for &v in &x {
            assert_eq!(round_bf16(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
        assert!(bf16_to_f32(round_bf16(f32::NAN)).is_nan());
    }
}

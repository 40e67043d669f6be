//! bf16 mixed-precision matrix multiply: C (+)= op(A) · op(B) with A, B and C in f32. The
//! operands are rounded to bf16 (round to nearest even) while they are packed into cache-sized
//! panels; the products run on AVX-512 BF16's `vdpbf16ps` (two bf16 products added into each
//! f32 lane per instruction, twice the f32 FMA rate) and accumulate in f32. The blocking,
//! packing and kernels are in [`super::packed`]; this file holds the rounding and the API.

use super::packed;

/// Whether this CPU runs the bf16 kernel natively (and `QUILL_SIMD=scalar` is not set).
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

/// c[m,n] (+)= op(a)[m,k] · op(b)[k,n] with bf16 operands and f32 accumulation.
/// `a` is stored [m,k], or [k,m] when `trans_a`; `b` is stored [k,n], or [n,k] when `trans_b`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    use super::matmul::{matmul_fused, Fused, Precision};
    matmul_fused(
        Precision::Bf16,
        c,
        a,
        b,
        m,
        k,
        n,
        trans_a,
        trans_b,
        accumulate,
        Fused::default(),
    )
}

/// The strided form ([`packed::matmul_fused`] with nothing fused).
///
/// # Safety
/// As [`packed::matmul_fused`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_strided(
    m: usize,
    k: usize,
    n: usize,
    c: *mut f32,
    c_rs: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    accumulate: bool,
    parallel: bool,
) {
    packed::matmul_fused(
        m,
        k,
        n,
        c,
        c_rs,
        a,
        a_rs,
        a_cs,
        b,
        b_rs,
        b_cs,
        accumulate,
        parallel,
        packed::Fusion::default(),
    )
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

    /// Both paths against float64 products of the bf16-rounded operands, on awkward sizes
    /// (odd depth, fewer rows/columns than a tile, several blocks), every transpose, with and
    /// without accumulation, on one thread and split between threads.
    #[test]
    fn products_match_float64_of_rounded_operands() {
        let mut rng = Rng::new(42);
        let q = |v: &[f32]| -> Vec<f64> {
            v.iter()
                .map(|&x| bf16_to_f32(round_bf16(x)) as f64)
                .collect()
        };
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (13, 31, 33),
            (12, 32, 32),
            (17, 257, 1),
            (1, 300, 65),
            (130, 515, 70),
            (250, 64, 1600),
        ] {
            for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
                let a = randn(&mut rng, m * k, 1.0);
                let b = randn(&mut rng, k * n, 1.0);
                let c0 = randn(&mut rng, m * n, 1.0);
                for &acc in &[false, true] {
                    let mut want = if acc { to_f64(&c0) } else { vec![0.0; m * n] };
                    crate::kernels::reference::matmul(&mut want, &q(&a), &q(&b), m, k, n, ta, tb);
                    let mut got = c0.clone();
                    matmul(&mut got, &a, &b, m, k, n, ta, tb, acc);
                    let err = max_rel_err(&got, &want, 1.0);
                    assert!(err < 2e-5, "{m}x{k}x{n} ta={ta} tb={tb} acc={acc}: {err}");
                    let mut plain = c0.clone();
                    packed::tests::plain(&mut plain, &a, &b, m, k, n, ta, tb, acc);
                    let err = max_rel_err(&plain, &want, 1.0);
                    assert!(
                        err < 2e-5,
                        "plain {m}x{k}x{n} ta={ta} tb={tb} acc={acc}: {err}"
                    );
                    // and the f32 product itself within bf16's rounding (8 bits of mantissa)
                    let mut exact = if acc { to_f64(&c0) } else { vec![0.0; m * n] };
                    crate::kernels::reference::matmul(
                        &mut exact,
                        &to_f64(&a),
                        &to_f64(&b),
                        m,
                        k,
                        n,
                        ta,
                        tb,
                    );
                    let err = max_rel_err(&got, &exact, 1.0);
                    assert!(err < 3e-2, "vs f32 {m}x{k}x{n}: {err}");
                }
            }
        }
    }

    #[test]
    fn zero_depth_clears_or_keeps() {
        let mut c = vec![1.0f32; 6];
        matmul(&mut c, &[], &[], 2, 0, 3, false, false, true);
        assert_eq!(c, vec![1.0; 6]);
        matmul(&mut c, &[], &[], 2, 0, 3, false, false, false);
        assert_eq!(c, vec![0.0; 6]);
    }
}

//! bf16 matrix products with f32 accumulation, on AVX-512 BF16's `vdpbf16ps` (two bf16
//! products added into each f32 lane per instruction: twice the f32 rate). The first piece of
//! bf16 mixed-precision training; `quill bench peak` measures it.
//!
//! Layout: both operands row-major with the shared dimension k contiguous ("rows times
//! rows"): y[i, j] = Σ_k a[i, k] · b[j, k].

use super::SendPtr;
use rayon::prelude::*;

/// Whether this CPU runs the bf16 kernel natively (and `QUILL_SIMD=scalar` is not set).
pub fn has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// f32 -> bf16, rounding to nearest even (as PyTorch and `half` do for finite values).
pub fn to_bf16(dst: &mut [u16], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| convert(d, s));
}

super::simd::multiversion! {
    fn convert(d: &mut [u16], s: &[f32]) {
        for (d, &x) in d.iter_mut().zip(s) {
            let b = x.to_bits();
            let round = 0x7fff + ((b >> 16) & 1);
            *d = (b.wrapping_add(round) >> 16) as u16;
        }
    }
}

fn bf(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

const A_BLOCK: usize = 32;
const B_TASK: usize = 32;

/// y [m, n] (row stride n) = a [m, k] · b [n, k]ᵀ, bf16 operands, f32 results.
pub fn matmul_nt(y: &mut [f32], a: &[u16], b: &[u16], m: usize, k: usize, n: usize) {
    assert!(y.len() >= m * n && a.len() >= m * k && b.len() >= n * k);
    let yp = SendPtr(y.as_mut_ptr());
    let native = has_bf16();
    for i0 in (0..m).step_by(A_BLOCK) {
        let i1 = (i0 + A_BLOCK).min(m);
        (0..n.div_ceil(B_TASK)).into_par_iter().for_each(|t| {
            let j0 = t * B_TASK;
            let j1 = (j0 + B_TASK).min(n);
            for jb in (j0..j1).step_by(4) {
                for ib in (i0..i1).step_by(4) {
                    let rows: [usize; 4] = std::array::from_fn(|r| (ib + r).min(i1 - 1));
                    let cols: [usize; 4] = std::array::from_fn(|c| (jb + c).min(j1 - 1));
                    let t16 = tile(a, b, k, rows, cols, native);
                    for r in 0..(i1 - ib).min(4) {
                        for c in 0..(j1 - jb).min(4) {
                            // Safety: this task alone writes columns j0..j1.
                            unsafe { *yp.get().add((ib + r) * n + jb + c) = t16[r * 4 + c] };
                        }
                    }
                }
            }
        });
    }
}

/// 16 dot products of rows `rows` of a with rows `cols` of b.
fn tile(
    a: &[u16],
    b: &[u16],
    k: usize,
    rows: [usize; 4],
    cols: [usize; 4],
    native: bool,
) -> [f32; 16] {
    let full = k - k % 32;
    let mut out = [0.0f32; 16];
    #[cfg(target_arch = "x86_64")]
    if native && full > 0 {
        // Safety: the CPU has AVX-512 BF16; each row holds k >= full values.
        out = unsafe {
            tile_avx512bf16(
                rows.map(|r| a[r * k..].as_ptr()),
                cols.map(|c| b[c * k..].as_ptr()),
                full,
            )
        };
    }
    let from = if native { full } else { 0 };
    for r in 0..4 {
        for c in 0..4 {
            let (ar, br) = (
                &a[rows[r] * k..rows[r] * k + k],
                &b[cols[c] * k..cols[c] * k + k],
            );
            let mut s = 0.0f32;
            for kk in from..k {
                s += bf(ar[kk]) * bf(br[kk]);
            }
            out[r * 4 + c] += s;
        }
    }
    out
}

/// # Safety
/// The CPU has AVX-512F and AVX-512 BF16; every pointer reaches `full` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_avx512bf16(a: [*const u16; 4], b: [*const u16; 4], full: usize) -> [f32; 16] {
    use std::arch::x86_64::*;
    let ld = |p: *const u16, k: usize| -> __m512bh {
        std::mem::transmute(_mm512_loadu_si512(p.add(k) as *const _))
    };
    let z = _mm512_setzero_ps();
    let mut acc = [z; 16];
    let mut k = 0;
    while k < full {
        let (b0, b1, b2, b3) = (ld(b[0], k), ld(b[1], k), ld(b[2], k), ld(b[3], k));
        let a0 = ld(a[0], k);
        acc[0] = _mm512_dpbf16_ps(acc[0], a0, b0);
        acc[1] = _mm512_dpbf16_ps(acc[1], a0, b1);
        acc[2] = _mm512_dpbf16_ps(acc[2], a0, b2);
        acc[3] = _mm512_dpbf16_ps(acc[3], a0, b3);
        let a1 = ld(a[1], k);
        acc[4] = _mm512_dpbf16_ps(acc[4], a1, b0);
        acc[5] = _mm512_dpbf16_ps(acc[5], a1, b1);
        acc[6] = _mm512_dpbf16_ps(acc[6], a1, b2);
        acc[7] = _mm512_dpbf16_ps(acc[7], a1, b3);
        let a2 = ld(a[2], k);
        acc[8] = _mm512_dpbf16_ps(acc[8], a2, b0);
        acc[9] = _mm512_dpbf16_ps(acc[9], a2, b1);
        acc[10] = _mm512_dpbf16_ps(acc[10], a2, b2);
        acc[11] = _mm512_dpbf16_ps(acc[11], a2, b3);
        let a3 = ld(a[3], k);
        acc[12] = _mm512_dpbf16_ps(acc[12], a3, b0);
        acc[13] = _mm512_dpbf16_ps(acc[13], a3, b1);
        acc[14] = _mm512_dpbf16_ps(acc[14], a3, b2);
        acc[15] = _mm512_dpbf16_ps(acc[15], a3, b3);
        k += 32;
    }
    acc.map(|v| _mm512_reduce_add_ps(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;
    use crate::rng::Rng;

    #[test]
    fn rounding_matches_half_and_products_match_float64() {
        let mut rng = Rng::new(41);
        let x = randn(&mut rng, 1000, 3.0);
        let mut got = vec![0u16; x.len()];
        to_bf16(&mut got, &x);
        for (&g, &v) in got.iter().zip(&x) {
            assert_eq!(g, half::bf16::from_f32(v).to_bits(), "{v}");
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 31, 5),
            (5, 32, 7),
            (9, 100, 17),
            (70, 96, 33),
            (4, 64, 4),
        ] {
            let a = randn(&mut rng, m * k, 1.0);
            let b = randn(&mut rng, n * k, 1.0);
            let (mut ab, mut bb) = (vec![0u16; m * k], vec![0u16; n * k]);
            to_bf16(&mut ab, &a);
            to_bf16(&mut bb, &b);
            let mut y = vec![f32::NAN; m * n];
            matmul_nt(&mut y, &ab, &bb, m, k, n);
            let mut want = vec![0.0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k)
                        .map(|p| bf(ab[i * k + p]) as f64 * bf(bb[j * k + p]) as f64)
                        .sum();
                }
            }
            assert!(max_rel_err(&y, &want, 1.0) < 1e-5, "{m},{k},{n}");
        }
    }
}

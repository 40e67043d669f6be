//! Fast, branch-free exp and tanh for f32 that the compiler vectorises. std's `expf` and
//! `tanhf` are library calls per element; on GELU and softmax they cost a third of a
//! training step (measured with perf on the default run).
//!
//! Accuracy: exp within 2e-7 relative over [-87, 88]; tanh within 2e-7 absolute.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in a high part exact in f32 and a low correction (Cody-Waite reduction).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// e^x. Inputs below -87.3 give ~0 (not exactly 0), above 88.3 give ~2^127.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    #[allow(clippy::manual_clamp)] // max/min: no panic path, and it vectorises
    let x = x.max(-87.3).min(88.3);
    // n = round(x / ln 2) via the 1.5 * 2^23 trick: adding MAGIC leaves n in the low
    // mantissa bits, so both the float n and the integer n come without a conversion
    // (integer-only steps keep the loop vectorised).
    const MAGIC: f32 = 12_582_912.0;
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let n_int = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO; // |r| <= ln2/2
                                         // e^r by its Taylor series to degree 7 (truncation error < 3e-8 on |r| <= 0.347), summed
                                         // by Estrin's scheme: pairs of terms, then pairs of pairs, a chain six operations deep
                                         // instead of Horner's fourteen (the chain, not the operation count, bounded GELU's and
                                         // softmax's loops: few iterations fit in the out-of-order window at once)
    let r2 = r * r;
    let lo = (1.0 + r) + r2 * (0.5 + r * (1.0 / 6.0));
    let hi = (1.0 / 24.0 + r * (1.0 / 120.0)) + r2 * (1.0 / 720.0 + r * (1.0 / 5040.0));
    let p = lo + (r2 * r2) * hi;
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    p * scale
}

/// tanh(x) = 1 - 2 / (e^{2x} + 1), saturating cleanly at ±1.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// Lanes for reductions: independent partial sums the compiler keeps in one SIMD register
/// (a plain `iter().sum()` of floats must add in order, one element at a time).
const LANES: usize = 16;

/// Σ x.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Σ a·b.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let full = n - n % LANES;
    for (ca, cb) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a[full..].iter().zip(&b[full..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Σ (x - m)².
#[inline(always)]
pub fn sum_sq_dev(x: &[f32], m: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - m;
            acc[i] += d * d;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| (v - m) * (v - m)).sum::<f32>()
}

/// max x (−∞ for an empty slice).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let m = acc
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    rest.iter().fold(m, |m, &v| if v > m { v } else { m })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reductions_agree_with_plain_sums() {
        for n in [0usize, 1, 15, 16, 17, 100, 1001] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
                .collect();
            let y: Vec<f32> = (0..n).map(|i| ((i * 11 % 13) as f32 - 6.0) * 0.1).collect();
            let s: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((super::sum(&x) as f64 - s).abs() < 1e-4);
            let d: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!((super::dot(&x, &y) as f64 - d).abs() < 1e-4);
            let m = 0.3f32;
            let q: f64 = x.iter().map(|&v| ((v - m) as f64).powi(2)).sum();
            assert!((super::sum_sq_dev(&x, m) as f64 - q).abs() < 1e-3);
            let mx = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max(&x), mx);
        }
    }

    #[test]
    fn exp_and_tanh_are_accurate() {
        let mut worst_exp = 0.0f64;
        let mut worst_tanh = 0.0f64;
        let mut x = -87.0f64;
        while x < 88.0 {
            let e = super::exp(x as f32) as f64;
            let want = (x as f32 as f64).exp();
            worst_exp = worst_exp.max(((e - want) / want).abs());
            x += 0.00731;
        }
        let mut x = -20.0f64;
        while x < 20.0 {
            let t = super::tanh(x as f32) as f64;
            worst_tanh = worst_tanh.max((t - (x as f32 as f64).tanh()).abs());
            x += 0.000917;
        }
        assert!(worst_exp < 2e-7, "exp relative error {worst_exp}");
        assert!(worst_tanh < 2e-7, "tanh absolute error {worst_tanh}");
        assert_eq!(super::tanh(100.0), 1.0);
        assert_eq!(super::tanh(-100.0), -1.0);
        assert!(super::exp(-1000.0) < 1e-37);
    }
}

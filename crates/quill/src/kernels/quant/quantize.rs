//! Quantization: f32 rows into the block formats of [`super::QType`] (the inverse of
//! [`super::dequantize`]).
//!
//! - The 32-element formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the half-precision ones follow
//!   the reference rounding of ggml (as the `gguf` Python package reimplements it): the same
//!   f32 operations in the same order, so the bytes are the same (tested against that package
//!   in tests/python/test_quantize.py).
//! - The K formats (Q4_K, Q6_K) have no reference rounding to match; ours fits each
//!   sub-block's scale (and minimum) by least squares over a few candidate grids, then
//!   rounds the sub-block scales to their 6- or 8-bit codes and every number once more
//!   against the rounded scales. Tested below for the round trip and for errors no larger
//!   than the simple formats of the same width.

use super::{QType, QK_K};
use half::f16;

/// Appends the encoding of `x` in format `t` to `out`. `x.len()` must be a whole number of
/// blocks and finite (callers check both; a partial block panics). Returns false for a type
/// without a quantizer (Q2_K, Q3_K, Q5_K).
pub fn quantize(t: QType, x: &[f32], out: &mut Vec<u8>) -> bool {
    assert!(x.len().is_multiple_of(t.block()));
    let n = t.block();
    for b in x.chunks_exact(n) {
        match t {
            QType::F32 => out.extend_from_slice(&b[0].to_le_bytes()),
            QType::F16 => out.extend_from_slice(&f16::from_f32(b[0]).to_le_bytes()),
            QType::Bf16 => out.extend_from_slice(&bf16_bits(b[0]).to_le_bytes()),
            QType::Q8_0 => q8_0(b, out),
            QType::Q4_0 => q4_0(b, out),
            QType::Q4_1 => q4_1(b, out),
            QType::Q5_0 => q5_0(b, out),
            QType::Q5_1 => q5_1(b, out),
            QType::Q4K => q4_k(b, out),
            QType::Q6K => q6_k(b, out),
            QType::Q2K | QType::Q3K | QType::Q5K => return false,
        }
    }
    true
}

/// Whether [`quantize`] writes type `t`.
pub fn can_quantize(t: QType) -> bool {
    !matches!(t, QType::Q2K | QType::Q3K | QType::Q5K)
}

/// f32 → bf16 rounding to nearest even (NaN kept quiet), as ggml converts.
fn bf16_bits(x: f32) -> u16 {
    let n = x.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return (((n & 0xffff_0000) | (64 << 16)) >> 16) as u16;
    }
    ((n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) >> 16) as u16
}

fn push_f16(out: &mut Vec<u8>, x: f32) {
    out.extend_from_slice(&f16::from_f32(x).to_le_bytes());
}

/// 1/d, or 0 for a block of zeros.
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// The number of largest magnitude (the first of equals), with its sign.
fn signed_max(b: &[f32]) -> f32 {
    let mut m = b[0];
    for &v in &b[1..] {
        if v.abs() > m.abs() {
            m = v;
        }
    }
    m
}

/// Sixteen numbers' 4-bit codes, low nibbles first half, as the 32-element formats pack them.
fn push_nibbles(q: &[u8; 32], out: &mut Vec<u8>) {
    for i in 0..16 {
        out.push((q[i] & 15) | (q[16 + i] << 4));
    }
}

fn push_fifth_bits(q: &[u8; 32], out: &mut Vec<u8>) {
    let mut qh = 0u32;
    for (i, &v) in q.iter().enumerate() {
        qh |= ((v >> 4) as u32 & 1) << i;
    }
    out.extend_from_slice(&qh.to_le_bytes());
}

fn q8_0(b: &[f32], out: &mut Vec<u8>) {
    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    push_f16(out, d);
    out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// Q4_0 / Q5_0: the number of largest magnitude maps to −8 (−16).
fn symmetric_codes(b: &[f32], half: f32, top: f32) -> (f32, [u8; 32]) {
    let d = signed_max(b) / -half;
    let id = inverse(d);
    let mut q = [0u8; 32];
    for (c, &v) in q.iter_mut().zip(b) {
        *c = (v * id + (half + 0.5)).trunc().clamp(0.0, top) as u8;
    }
    (d, q)
}

/// Q4_1 / Q5_1: the minimum maps to 0, the maximum to the top code.
fn offset_codes(b: &[f32], top: f32) -> (f32, f32, [u8; 32]) {
    let max = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let min = b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let d = (max - min) / top;
    let id = inverse(d);
    let mut q = [0u8; 32];
    for (c, &v) in q.iter_mut().zip(b) {
        *c = ((v - min) * id + 0.5).trunc().clamp(0.0, top) as u8;
    }
    (d, min, q)
}

fn q4_0(b: &[f32], out: &mut Vec<u8>) {
    let (d, q) = symmetric_codes(b, 8.0, 15.0);
    push_f16(out, d);
    push_nibbles(&q, out);
}

fn q4_1(b: &[f32], out: &mut Vec<u8>) {
    let (d, m, q) = offset_codes(b, 15.0);
    push_f16(out, d);
    push_f16(out, m);
    push_nibbles(&q, out);
}

fn q5_0(b: &[f32], out: &mut Vec<u8>) {
    let (d, q) = symmetric_codes(b, 16.0, 31.0);
    push_f16(out, d);
    push_fifth_bits(&q, out);
    push_nibbles(&q, out);
}

fn q5_1(b: &[f32], out: &mut Vec<u8>) {
    let (d, m, q) = offset_codes(b, 31.0);
    push_f16(out, d);
    push_f16(out, m);
    push_fifth_bits(&q, out);
    push_nibbles(&q, out);
}

/// Least squares: the (scale, offset) minimising Σ (scale·q + offset − x)² for fixed codes,
/// with the offset held ≤ 0 (formats that subtract an unsigned minimum). Returns the fit and
/// its squared error.
fn fit_affine(x: &[f32], q: &[f32]) -> (f32, f32, f32) {
    let n = x.len() as f32;
    let (mut sq, mut sx, mut sqq, mut sqx) = (0f32, 0f32, 0f32, 0f32);
    for (&v, &c) in x.iter().zip(q) {
        sq += c;
        sx += v;
        sqq += c * c;
        sqx += c * v;
    }
    let det = n * sqq - sq * sq;
    let (mut a, mut b) = if det > 0.0 {
        ((n * sqx - sq * sx) / det, (sqq * sx - sq * sqx) / det)
    } else {
        (0.0, sx / n)
    };
    if b > 0.0 || a <= 0.0 {
        b = 0.0;
        a = if sqq > 0.0 { (sqx / sqq).max(0.0) } else { 0.0 };
    }
    let err = x
        .iter()
        .zip(q)
        .map(|(&v, &c)| (a * c + b - v).powi(2))
        .sum();
    (a, b, err)
}

/// A sub-block's scale and minimum for codes 0..=top: x ≈ scale · q − min, min ≥ 0. The
/// min/max grid first, then grids stretched by a few percent either way, each refitted by
/// least squares; the best fit wins.
fn fit_scale_min(x: &[f32], top: f32) -> (f32, f32) {
    let lo = x.iter().fold(0f32, |m, &v| m.min(v));
    let hi = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if hi <= lo {
        return (0.0, -lo);
    }
    let mut best = ((hi - lo) / top, -lo, f32::INFINITY);
    let mut q = vec![0f32; x.len()];
    for step in -4..=8 {
        let iscale = (top + 0.25 * step as f32) / (hi - lo);
        for (c, &v) in q.iter_mut().zip(x) {
            *c = ((v - lo) * iscale).round().clamp(0.0, top);
        }
        let (a, b, err) = fit_affine(x, &q);
        if err < best.2 {
            best = (a, -b, err);
        }
    }
    (best.0, best.1)
}

/// A sub-block's signed scale for codes −half..half−1: x ≈ scale · q. The number of largest
/// magnitude on the lowest code first, then slightly different scales, each refitted.
fn fit_scale_signed(x: &[f32], half: f32) -> f32 {
    let m = signed_max(x);
    if m == 0.0 {
        return 0.0;
    }
    let (mut best, mut best_err) = (m / -half, f32::INFINITY);
    for step in -6..=6 {
        let iscale = -(half + 0.1 * step as f32) / m;
        let (mut sqx, mut sqq) = (0f32, 0f32);
        let codes: Vec<f32> = x
            .iter()
            .map(|&v| (v * iscale).round().clamp(-half, half - 1.0))
            .collect();
        for (&v, &c) in x.iter().zip(&codes) {
            sqx += c * v;
            sqq += c * c;
        }
        if sqq == 0.0 {
            continue;
        }
        let a = sqx / sqq;
        let err: f32 = x
            .iter()
            .zip(&codes)
            .map(|(&v, &c)| (a * c - v).powi(2))
            .sum();
        if err < best_err {
            (best, best_err) = (a, err);
        }
    }
    best
}

/// The f16-rounded value of `x`.
fn as_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Q4_K: eight sub-blocks of 32, each with a 6-bit scale and minimum under the super-block's
/// f16 d and dmin; 4-bit codes.
fn q4_k(b: &[f32], out: &mut Vec<u8>) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for j in 0..8 {
        (scales[j], mins[j]) = fit_scale_min(&b[32 * j..32 * j + 32], 15.0);
    }
    let max_scale = scales.iter().fold(0f32, |m, &v| m.max(v));
    let max_min = mins.iter().fold(0f32, |m, &v| m.max(v));
    let d = as_f16(max_scale / 63.0);
    let dmin = as_f16(max_min / 63.0);
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        sc[j] = (scales[j] * inverse(d)).round().clamp(0.0, 63.0) as u8;
        mn[j] = (mins[j] * inverse(dmin)).round().clamp(0.0, 63.0) as u8;
    }
    push_f16(out, d);
    push_f16(out, dmin);
    // the 12-byte packing `scales_mins_k` unpacks
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[4 + j] >> 4) << 6);
        s[4 + j] = mn[j] | ((mn[4 + j] >> 4) << 6);
        s[8 + j] = (sc[4 + j] & 15) | ((mn[4 + j] & 15) << 4);
    }
    out.extend_from_slice(&s);
    let mut q = [0u8; QK_K];
    for j in 0..8 {
        let (scale, min) = (d * sc[j] as f32, dmin * mn[j] as f32);
        let id = inverse(scale);
        for l in 0..32 {
            q[32 * j + l] = ((b[32 * j + l] + min) * id).round().clamp(0.0, 15.0) as u8;
        }
    }
    // number 64g + 32s + l is nibble s of byte 32g + l
    for g in 0..4 {
        for l in 0..32 {
            out.push(q[64 * g + l] | (q[64 * g + 32 + l] << 4));
        }
    }
}

/// Q6_K: sixteen sub-blocks of 16, each with an int8 scale under the super-block's f16 d;
/// 6-bit codes stored as q + 32.
fn q6_k(b: &[f32], out: &mut Vec<u8>) {
    let mut scales = [0f32; 16];
    for (j, s) in scales.iter_mut().enumerate() {
        *s = fit_scale_signed(&b[16 * j..16 * j + 16], 32.0);
    }
    let amax = scales.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let d = as_f16(amax / 127.0);
    let mut sc = [0i8; 16];
    for (c, &s) in sc.iter_mut().zip(&scales) {
        *c = (s * inverse(d)).round().clamp(-127.0, 127.0) as i8;
    }
    let mut q = [0u8; QK_K];
    for ((qj, bj), &s) in q.chunks_exact_mut(16).zip(b.chunks_exact(16)).zip(&sc) {
        let id = inverse(d * s as f32);
        for (c, &v) in qj.iter_mut().zip(bj) {
            *c = ((v * id).round().clamp(-32.0, 31.0) + 32.0) as u8;
        }
    }
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for g in 0..2 {
        for l in 0..128 {
            let v = q[128 * g + l];
            ql[64 * g + l % 64] |= (v & 15) << (4 * (l / 64));
            qh[32 * g + l % 32] |= (v >> 4) << (2 * (l / 32));
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    push_f16(out, d);
}

#[cfg(test)]
mod tests {
    use super::super::dequantize;
    use super::*;
    use crate::rng::Rng;

    fn round_trip(t: QType, x: &[f32]) -> Vec<f32> {
        let mut bytes = Vec::new();
        assert!(quantize(t, x, &mut bytes));
        assert_eq!(bytes.len(), t.bytes_for(x.len()).unwrap());
        let mut y = vec![0f32; x.len()];
        dequantize(t, &bytes, &mut y);
        y
    }

    fn rms_error(x: &[f32], y: &[f32]) -> f64 {
        let s: f64 = x
            .iter()
            .zip(y)
            .map(|(&a, &b)| ((a - b) as f64).powi(2))
            .sum();
        (s / x.len() as f64).sqrt()
    }

    /// Rows like trained weights: Gaussian, with an outlier now and then.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|i| {
                let g = rng.normal() as f32 * 0.02;
                if i % 97 == 5 {
                    g * 8.0
                } else {
                    g
                }
            })
            .collect()
    }

    #[test]
    fn every_writable_type_round_trips_within_its_step() {
        let x = weights(4 * QK_K, 1);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        // bits per number: the error of a uniform grid over the block's range is step/√12
        for (t, bits) in [
            (QType::Q8_0, 8),
            (QType::Q4_0, 4),
            (QType::Q4_1, 4),
            (QType::Q5_0, 5),
            (QType::Q5_1, 5),
            (QType::Q4K, 4),
            (QType::Q6K, 6),
        ] {
            let e = rms_error(&x, &round_trip(t, &x));
            let step = 2.0 * amax as f64 / ((1u32 << bits) - 1) as f64;
            assert!(
                e < step / 12f64.sqrt(),
                "{t:?}: rms error {e} vs step {step}"
            );
        }
        for t in [QType::F32, QType::F16, QType::Bf16] {
            let y = round_trip(t, &x);
            let rel = if t == QType::F32 { 0.0 } else { 2f64.powi(-8) };
            for (&a, &b) in x.iter().zip(&y) {
                assert!(((a - b) as f64).abs() <= rel * a.abs() as f64, "{t:?}");
            }
        }
    }

    #[test]
    fn k_formats_are_no_worse_than_the_simple_formats_of_their_width() {
        for seed in 0..4 {
            let x = weights(8 * QK_K, 10 + seed);
            let q4k = rms_error(&x, &round_trip(QType::Q4K, &x));
            let q4_1 = rms_error(&x, &round_trip(QType::Q4_1, &x));
            let q6k = rms_error(&x, &round_trip(QType::Q6K, &x));
            let q5_0 = rms_error(&x, &round_trip(QType::Q5_0, &x));
            let q8_0 = rms_error(&x, &round_trip(QType::Q8_0, &x));
            assert!(q4k < q4_1 * 1.05, "Q4_K {q4k} vs Q4_1 {q4_1}");
            assert!(q6k < q5_0 * 0.6, "Q6_K {q6k} vs Q5_0 {q5_0}");
            assert!(q8_0 < q6k, "Q8_0 {q8_0} vs Q6_K {q6k}");
        }
    }

    #[test]
    fn zero_constant_and_one_sided_blocks() {
        for x in [
            vec![0f32; QK_K],
            vec![0.5f32; QK_K],
            vec![-0.25f32; QK_K],
            (0..QK_K).map(|i| i as f32 * 1e-3).collect(),
            (0..QK_K).map(|i| -(i as f32) * 1e-3).collect(),
        ] {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for t in QType::ALL.into_iter().filter(|&t| can_quantize(t)) {
                let y = round_trip(t, &x);
                let e = x
                    .iter()
                    .zip(&y)
                    .fold(0f32, |m, (&a, &b)| m.max((a - b).abs()));
                assert!(
                    e.is_finite() && e <= amax * 0.07 + 1e-6,
                    "{t:?}: {e} of {amax}"
                );
            }
        }
    }
}

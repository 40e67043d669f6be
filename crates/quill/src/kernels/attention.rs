//! Causal multi-head self-attention: each position attends to itself and the positions
//! before it. scores = q·kᵀ · scale, masked above the diagonal, softmax over each row,
//! then the probabilities weight the values.
//!
//! Tasks run in parallel over (batch, head); inside a task the products run on one thread.

use super::matmul::matmul_strided_serial as mm;
use super::SendPtr;
use rayon::prelude::*;

/// Rows per block when skipping the masked (upper) part of the T x T score matrix.
const CAUSAL_BLOCK: usize = 32;

/// Head counts of one attention layer: `h` query heads and `kv` key/value heads (grouped-query
/// attention when kv < h: query head i reads kv head i / (h / kv)), each of width `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub h: usize,
    pub kv: usize,
    pub d: usize,
}

impl Heads {
    /// Plain multi-head attention: every query head has its own key and value head.
    pub fn mha(c: usize, h: usize) -> Self {
        Heads { h, kv: h, d: c / h }
    }
    /// Width of a packed q | k | v row: (h + 2 kv) · d.
    pub fn qkv_width(&self) -> usize {
        (self.h + 2 * self.kv) * self.d
    }
    fn group(&self) -> usize {
        self.h / self.kv
    }
}

/// qkv [B,T,(H+2KV)·D] with blocks q | k | v (head i in columns i·D .. i·D+D of its block)
/// -> out [B,T,H·D] (heads side by side), att [B,H,T,T] (softmax probabilities, kept for backward).
pub fn forward(
    out: &mut [f32],
    att: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    hs: Heads,
    scale: f32,
) {
    let (h, d, w) = (hs.h, hs.d, hs.qkv_width());
    let oc = h * d;
    assert!(out.len() == b * t * oc && qkv.len() == b * t * w && att.len() >= b * h * t * t);
    assert!(hs.kv > 0 && h % hs.kv == 0);
    let out_p = SendPtr(out.as_mut_ptr());
    att[..b * h * t * t]
        .par_chunks_mut(t * t)
        .enumerate()
        .for_each(|(task, p)| {
            let (bi, hi) = (task / h, task % h);
            let kvh = hi / hs.group();
            let row0 = qkv[bi * t * w..].as_ptr();
            let rs = w as isize;
            // Safety: strides stay inside qkv and inside this task's rows/columns of out.
            unsafe {
                let q = row0.add(hi * d);
                let k = row0.add(oc + kvh * d);
                let v = row0.add(oc + hs.kv * d + kvh * d);
                let pp = p.as_mut_ptr();
                // Query rows in blocks: block [i0, i1) only needs keys 0..i1 (causal), which
                // skips most of the masked upper triangle.
                for i0 in (0..t).step_by(CAUSAL_BLOCK) {
                    let i1 = (i0 + CAUSAL_BLOCK).min(t);
                    let qi = q.offset(i0 as isize * rs);
                    mm(
                        i1 - i0,
                        d,
                        i1,
                        pp.add(i0 * t),
                        t as isize,
                        qi,
                        rs,
                        1,
                        k,
                        1,
                        rs,
                        false,
                    );
                }
                for i in 0..t {
                    softmax_causal_row(&mut p[i * t..(i + 1) * t], i, scale);
                }
                let o = out_p.get().add(bi * t * oc + hi * d);
                for i0 in (0..t).step_by(CAUSAL_BLOCK) {
                    let i1 = (i0 + CAUSAL_BLOCK).min(t);
                    let oi = o.add(i0 * oc);
                    mm(
                        i1 - i0,
                        i1,
                        d,
                        oi,
                        oc as isize,
                        p.as_ptr().add(i0 * t),
                        t as isize,
                        1,
                        v,
                        rs,
                        1,
                        false,
                    );
                }
            }
        });
}

super::simd::multiversion! {
/// row[..=last] <- softmax(row[..=last] · scale); row[last+1..] <- 0.
fn softmax_causal_row(row: &mut [f32], last: usize, scale: f32) {
    let (live, masked) = row.split_at_mut(last + 1);
    let mx = super::math::max(live) * scale;
    for v in live.iter_mut() {
        *v = super::math::exp(*v * scale - mx);
    }
    let inv = 1.0 / super::math::sum(live);
    for v in live.iter_mut() {
        *v *= inv;
    }
    masked.fill(0.0);
}
}

/// Gradients of [`forward`]: dout [B,T,H·D] -> dqkv [B,T,(H+2KV)·D] (overwritten).
/// `datt` [B,H,T,T] is scratch. Tasks run over (batch, kv head), so the query heads that
/// share a kv head add their key and value gradients in one place, in a fixed order.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dqkv: &mut [f32],
    datt: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    hs: Heads,
    scale: f32,
) {
    let (h, d, w) = (hs.h, hs.d, hs.qkv_width());
    let oc = h * d;
    let g = hs.group();
    assert!(dqkv.len() == b * t * w && dout.len() == b * t * oc && qkv.len() == b * t * w);
    let dqkv_p = SendPtr(dqkv.as_mut_ptr());
    datt[..b * h * t * t]
        .par_chunks_mut(g * t * t)
        .enumerate()
        .for_each(|(task, dps)| {
            let (bi, kvh) = (task / hs.kv, task % hs.kv);
            let rs = w as isize;
            let (cs, ts) = (oc as isize, t as isize);
            for (gi, dp) in dps.chunks_mut(t * t).enumerate() {
                let hi = kvh * g + gi;
                let p = &att[(bi * h + hi) * t * t..(bi * h + hi + 1) * t * t];
                let acc = gi > 0;
                // Safety: every view stays inside its buffer; this task alone writes the
                // columns of its kv head and of the query heads in its group.
                unsafe {
                    let row0 = qkv.as_ptr().add(bi * t * w);
                    let q = row0.add(hi * d);
                    let k = row0.add(oc + kvh * d);
                    let v = row0.add(oc + hs.kv * d + kvh * d);
                    let dy = dout.as_ptr().add(bi * t * oc + hi * d);
                    let dpp = dp.as_mut_ptr();
                    // dP = dY · Vᵀ, causal blocks of query rows
                    for i0 in (0..t).step_by(CAUSAL_BLOCK) {
                        let i1 = (i0 + CAUSAL_BLOCK).min(t);
                        mm(
                            i1 - i0,
                            d,
                            i1,
                            dpp.add(i0 * t),
                            ts,
                            dy.add(i0 * oc),
                            cs,
                            1,
                            v,
                            1,
                            rs,
                            false,
                        );
                    }
                    softmax_backward_rows(dp, p, t, scale);
                    let drow0 = dqkv_p.get().add(bi * t * w);
                    let dq = drow0.add(hi * d);
                    let dk = drow0.add(oc + kvh * d);
                    let dv = drow0.add(oc + hs.kv * d + kvh * d);
                    let (dsp, pp) = (dp.as_ptr(), p.as_ptr());
                    for b0 in (0..t).step_by(CAUSAL_BLOCK) {
                        let b1 = (b0 + CAUSAL_BLOCK).min(t);
                        let r = b0 as isize;
                        // dQ[i] = Σ_{j<=i} dS[i,j] K[j]  (query block b0..b1 needs keys 0..b1)
                        mm(
                            b1 - b0,
                            b1,
                            d,
                            dq.offset(r * rs),
                            rs,
                            dsp.add(b0 * t),
                            ts,
                            1,
                            k,
                            rs,
                            1,
                            false,
                        );
                        // dK[j] = Σ_{i>=j} dS[i,j] Q[i]  (key block b0..b1 needs queries b0..t)
                        let a = dsp.add(b0 * t + b0);
                        mm(
                            b1 - b0,
                            t - b0,
                            d,
                            dk.offset(r * rs),
                            rs,
                            a,
                            1,
                            ts,
                            q.offset(r * rs),
                            rs,
                            1,
                            acc,
                        );
                        // dV[j] = Σ_{i>=j} P[i,j] dY[i]
                        let a = pp.add(b0 * t + b0);
                        mm(
                            b1 - b0,
                            t - b0,
                            d,
                            dv.offset(r * rs),
                            rs,
                            a,
                            1,
                            ts,
                            dy.offset(r * cs),
                            cs,
                            1,
                            acc,
                        );
                    }
                }
            }
        });
}

super::simd::multiversion! {
    /// dS = P ⊙ (dP - rowsum(P ⊙ dP)) · scale, in place over dP [T, T] (causal rows).
    fn softmax_backward_rows(dp: &mut [f32], p: &[f32], t: usize, scale: f32) {
        for i in 0..t {
            let pr = &p[i * t..i * t + i + 1];
            let dr = &mut dp[i * t..(i + 1) * t];
            let dot = super::math::dot(pr, dr);
            for j in 0..=i {
                dr[j] = pr[j] * (dr[j] - dot) * scale;
            }
            dr[i + 1..].fill(0.0);
        }
    }
}

/// Attention for `n` new positions pos..pos+n against a cache holding keys and values of
/// positions 0..pos+n. q [n, H·D] (row stride `q_rs`); k_cache/v_cache rows of n_kv·D
/// (grouped-query: query head h reads kv head h / (H / n_kv)); out [n, H·D].
/// Position i attends to the last `window` positions up to itself (usize::MAX: all).
#[allow(clippy::too_many_arguments)]
pub fn forward_cached(
    out: &mut [f32],
    q: &[f32],
    q_rs: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    n: usize,
    pos: usize,
    h: usize,
    n_kv: usize,
    d: usize,
    scale: f32,
    window: usize,
) {
    let kv_rs = n_kv * d;
    let total = pos + n;
    assert!(k_cache.len() >= total * kv_rs && out.len() >= n * h * d);
    let out_p = SendPtr(out.as_mut_ptr());
    let group = h / n_kv;
    (0..h * n).into_par_iter().for_each_init(
        || vec![0.0f32; total],
        |scores, task| {
            let (hi, i) = (task / n, task % n);
            let kvh = hi / group;
            let qrow = &q[i * q_rs + hi * d..i * q_rs + hi * d + d];
            let len = pos + i + 1;
            let first = len.saturating_sub(window);
            let mut mx = f32::NEG_INFINITY;
            for (j, s) in scores[..len].iter_mut().enumerate().skip(first) {
                let krow = &k_cache[j * kv_rs + kvh * d..j * kv_rs + kvh * d + d];
                *s = dot(qrow, krow) * scale;
                mx = mx.max(*s);
            }
            let mut sum = 0.0;
            for s in scores[first..len].iter_mut() {
                *s = super::math::exp(*s - mx);
                sum += *s;
            }
            let inv = 1.0 / sum;
            // Safety: (i, hi) owns out[i, hi·D .. hi·D+D].
            let o =
                unsafe { std::slice::from_raw_parts_mut(out_p.get().add(i * h * d + hi * d), d) };
            o.fill(0.0);
            for (j, &s) in scores[..len].iter().enumerate().skip(first) {
                let w = s * inv;
                let vrow = &v_cache[j * kv_rs + kvh * d..j * kv_rs + kvh * d + d];
                for (o, &v) in o.iter_mut().zip(vrow) {
                    *o += w * v;
                }
            }
        },
    );
}

super::simd::multiversion! {
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        super::math::dot(a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{reference, testutil::*};
    use crate::rng::Rng;

    fn loss64(qkv: &[f64], r: &[f64], b: usize, t: usize, hs: Heads, s: f64) -> f64 {
        let y = reference::attention_forward(qkv, b, t, (hs.h, hs.kv, hs.d), s);
        y.iter().zip(r).map(|(a, b)| a * b).sum()
    }

    #[test]
    fn forward_and_backward_match_reference_and_finite_differences() {
        let mut rng = Rng::new(5);
        // (b, t, h, kv, d): multi-head, grouped-query and one kv head, odd sizes
        for &(b, t, h, kv, d) in &[
            (1, 1, 1, 1, 4),
            (2, 5, 3, 3, 4),
            (1, 9, 2, 2, 5),
            (3, 17, 4, 4, 4),
            (1, 70, 2, 2, 4),
            (2, 7, 4, 2, 3),
            (1, 37, 6, 1, 2),
            (2, 33, 6, 3, 5),
        ] {
            let hs = Heads { h, kv, d };
            let scale = 1.0 / (d as f32).sqrt();
            let qkv = randn(&mut rng, b * t * hs.qkv_width(), 1.0);
            let r = randn(&mut rng, b * t * h * d, 1.0);
            let mut y = vec![0.0; b * t * h * d];
            let mut att = vec![0.0; b * h * t * t];
            forward(&mut y, &mut att, &qkv, b, t, hs, scale);
            let want = reference::attention_forward(&to_f64(&qkv), b, t, (h, kv, d), scale as f64);
            assert!(max_rel_err(&y, &want, 1.0) < 1e-5, "forward {hs:?} {b},{t}");

            let mut dqkv = vec![7.0; qkv.len()];
            let mut datt = vec![0.0; att.len()];
            backward(&mut dqkv, &mut datt, &r, &qkv, &att, b, t, hs, scale);
            let (q64, r64) = (to_f64(&qkv), to_f64(&r));
            let fd = finite_diff(&q64, |x| loss64(x, &r64, b, t, hs, scale as f64));
            assert!(
                max_rel_err(&dqkv, &fd, 1.0) < 1e-4,
                "backward {hs:?} {b},{t}"
            );
        }
    }

    #[test]
    fn cached_attention_matches_full_attention() {
        let mut rng = Rng::new(6);
        let (t, c, h) = (11, 12, 3);
        let d = c / h;
        let scale = 1.0 / (d as f32).sqrt();
        let qkv = randn(&mut rng, t * 3 * c, 1.0);
        let mut full = vec![0.0; t * c];
        let mut att = vec![0.0; h * t * t];
        forward(&mut full, &mut att, &qkv, 1, t, Heads::mha(c, h), scale);
        let mut kc = vec![0.0; t * c];
        let mut vc = vec![0.0; t * c];
        for i in 0..t {
            kc[i * c..(i + 1) * c].copy_from_slice(&qkv[i * 3 * c + c..i * 3 * c + 2 * c]);
            vc[i * c..(i + 1) * c].copy_from_slice(&qkv[i * 3 * c + 2 * c..i * 3 * c + 3 * c]);
        }
        // a prefill of 4 positions, then one position at a time
        let mut got = vec![0.0; t * c];
        forward_cached(
            &mut got[..4 * c],
            &qkv,
            3 * c,
            &kc,
            &vc,
            4,
            0,
            h,
            h,
            d,
            scale,
            usize::MAX,
        );
        for p in 4..t {
            let mut o = vec![0.0; c];
            forward_cached(
                &mut o,
                &qkv[p * 3 * c..],
                3 * c,
                &kc,
                &vc,
                1,
                p,
                h,
                h,
                d,
                scale,
                usize::MAX,
            );
            got[p * c..(p + 1) * c].copy_from_slice(&o);
        }
        for (a, b) in got.iter().zip(&full) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}

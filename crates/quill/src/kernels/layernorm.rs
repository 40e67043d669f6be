//! LayerNorm over the last dimension, with the biased variance (as PyTorch and GPT-2).

use super::simd::multiversion;
use super::{rows_per_task, RowStats, Stats};
use rayon::prelude::*;

/// out [N,C] = (inp - mean) * rstd * weight + bias (C = weight's length); saves mean [N]
/// and rstd [N] for backward.
pub fn forward(
    out: &mut [f32],
    stats: RowStats,
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
) {
    let c = weight.len();
    let RowStats { mean, rstd } = stats;
    let n = inp.len() / c;
    assert!(out.len() == n * c && mean.len() >= n && rstd.len() >= n);
    let rpt = rows_per_task(n, c);
    out.par_chunks_mut(rpt * c)
        .zip(
            mean[..n]
                .par_chunks_mut(rpt)
                .zip(rstd[..n].par_chunks_mut(rpt)),
        )
        .zip(inp.par_chunks(rpt * c))
        .for_each(|((o, (mean, rstd)), x)| {
            forward_rows(o, RowStats { mean, rstd }, x, weight, bias, eps)
        });
}

multiversion! {
    fn forward_rows(o: &mut [f32], stats: RowStats, x: &[f32], weight: &[f32], bias: &[f32], eps: f32) {
        let (c, mu, rs) = (weight.len(), stats.mean, stats.rstd);
        for r in 0..mu.len() {
            let row = &x[r * c..(r + 1) * c];
            let m = super::math::sum(row) / c as f32;
            let var = super::math::sum_sq_dev(row, m) / c as f32;
            let s = 1.0 / (var + eps).sqrt();
            let orow = &mut o[r * c..(r + 1) * c];
            for i in 0..c {
                orow[i] = (row[i] - m) * s * weight[i] + bias[i];
            }
            mu[r] = m;
            rs[r] = s;
        }
    }
}

/// Accumulates gradients: dinp += d/dinp, (dweight, dbias) += (d/dweight, d/dbias), given
/// dout [N,C] and the saved mean/rstd.
pub fn backward(
    dinp: &mut [f32],
    grads: (&mut [f32], &mut [f32]),
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    saved: Stats,
) {
    let (c, (dweight, dbias), Stats { mean, rstd }) = (weight.len(), grads, saved);
    let n = inp.len() / c;
    assert!(dinp.len() == n * c && dout.len() == n * c);
    assert!(dweight.len() == c && dbias.len() == c && mean.len() >= n && rstd.len() >= n);
    // one sweep: dx rows, and per chunk of rows the partial sums of dweight and dbias
    super::reduce::rows_with_col_sums(dinp, c, &mut [dweight, dbias], |r0, dx, partial| {
        let r1 = r0 + dx.len() / c;
        let saved = Stats {
            mean: &mean[r0..r1],
            rstd: &rstd[r0..r1],
        };
        backward_rows(
            dx,
            &dout[r0 * c..r1 * c],
            &inp[r0 * c..r1 * c],
            saved,
            weight,
            partial,
        )
    });
}

multiversion! {
    /// dx rows, and into partial [2C]: Σ rows of dy·norm (dweight), then Σ rows of dy (dbias).
    fn backward_rows(dx: &mut [f32], dy: &[f32], x: &[f32], saved: Stats, weight: &[f32], partial: &mut [f32]) {
            let (c, mu, rs) = (weight.len(), saved.mean, saved.rstd);
            let (pw, pb) = partial.split_at_mut(c);
            for r in 0..mu.len() {
                let (m, s) = (mu[r], rs[r]);
                let xr = &x[r * c..(r + 1) * c];
                let dyr = &dy[r * c..(r + 1) * c];
                // mean over the row of dnorm and of dnorm * norm
                let mut acc_dn = [0.0f32; 16];
                let mut acc_dn_n = [0.0f32; 16];
                for i0 in (0..c).step_by(16) {
                    for k in 0..16.min(c - i0) {
                        let i = i0 + k;
                        let dn = dyr[i] * weight[i];
                        acc_dn[k] += dn;
                        acc_dn_n[k] += dn * (xr[i] - m) * s;
                    }
                }
                let sum_dn: f32 = acc_dn.iter().sum();
                let sum_dn_n: f32 = acc_dn_n.iter().sum();
                let mean_dn = sum_dn / c as f32;
                let mean_dn_n = sum_dn_n / c as f32;
                let dxr = &mut dx[r * c..(r + 1) * c];
                let (pw, pb) = (&mut pw[..c], &mut pb[..c]);
                for i in 0..c {
                    let norm = (xr[i] - m) * s;
                    dxr[i] += (dyr[i] * weight[i] - mean_dn - norm * mean_dn_n) * s;
                    pw[i] += dyr[i] * norm;
                    pb[i] += dyr[i];
                }
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{reference, testutil::*};
    use crate::rng::Rng;

    #[test]
    fn reference_backward_matches_finite_differences() {
        let mut rng = Rng::new(2);
        let (n, c, eps) = (3, 7, 1e-5);
        let x = to_f64(&randn(&mut rng, n * c, 1.0));
        let w = to_f64(&randn(&mut rng, c, 1.0));
        let b = to_f64(&randn(&mut rng, c, 1.0));
        let r = to_f64(&randn(&mut rng, n * c, 1.0));
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
            let y = reference::layernorm_forward(x, w, b, c, eps);
            y.iter().zip(&r).map(|(a, b)| a * b).sum()
        };
        let (dx, dw, db) = reference::layernorm_backward(&r, &x, &w, c, eps);
        assert_close64(&dx, &finite_diff(&x, |x| loss(x, &w, &b)), 1e-6, "dx");
        assert_close64(&dw, &finite_diff(&w, |w| loss(&x, w, &b)), 1e-6, "dw");
        assert_close64(&db, &finite_diff(&b, |b| loss(&x, &w, b)), 1e-6, "db");
    }

    #[test]
    fn fast_kernel_matches_reference() {
        let mut rng = Rng::new(3);
        for &(n, c) in &[(1, 1), (5, 3), (33, 17), (130, 96)] {
            let x = randn(&mut rng, n * c, 2.0);
            let w = randn(&mut rng, c, 1.0);
            let b = randn(&mut rng, c, 1.0);
            let dy = randn(&mut rng, n * c, 1.0);
            let (mut y, mut mu, mut rs) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            forward(
                &mut y,
                RowStats {
                    mean: &mut mu,
                    rstd: &mut rs,
                },
                &x,
                &w,
                &b,
                1e-5,
            );
            let want = reference::layernorm_forward(&to_f64(&x), &to_f64(&w), &to_f64(&b), c, 1e-5);
            assert!(max_rel_err(&y, &want, 1.0) < 1e-5);
            let (mut dx, mut dw, mut db) = (vec![0.5; n * c], vec![0.25; c], vec![-0.5; c]);
            backward(
                &mut dx,
                (&mut dw, &mut db),
                &dy,
                &x,
                &w,
                Stats {
                    mean: &mu,
                    rstd: &rs,
                },
            );
            let (rdx, rdw, rdb) =
                reference::layernorm_backward(&to_f64(&dy), &to_f64(&x), &to_f64(&w), c, 1e-5);
            let add = |v: Vec<f64>, k: f64| v.into_iter().map(|x| x + k).collect::<Vec<_>>();
            // c = 1 makes every normalised value 0, so dx is pure rounding there.
            if c > 1 {
                assert!(max_rel_err(&dx, &add(rdx, 0.5), 1.0) < 1e-4, "dx {n}x{c}");
            }
            assert!(max_rel_err(&dw, &add(rdw, 0.25), 1.0) < 1e-4, "dw {n}x{c}");
            assert!(max_rel_err(&db, &add(rdb, -0.5), 1.0) < 1e-5, "db {n}x{c}");
        }
    }
}

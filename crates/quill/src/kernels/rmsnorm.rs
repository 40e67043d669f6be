//! RMSNorm over the last dimension (Llama, Mistral, Qwen2): out = x / sqrt(mean(x²) + eps) · w.
//! No mean subtraction and no bias.

use super::rows_per_task;
use super::simd::multiversion;
use rayon::prelude::*;

/// out [N,C] = inp · rstd · weight; saves rstd [N] for backward.
pub fn forward(out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], c: usize, eps: f32) {
    let n = inp.len() / c;
    assert!(out.len() == n * c && rstd.len() >= n && weight.len() == c);
    let rpt = rows_per_task(n, c);
    out.par_chunks_mut(rpt * c)
        .zip(rstd[..n].par_chunks_mut(rpt))
        .zip(inp.par_chunks(rpt * c))
        .for_each(|((o, rs), x)| forward_rows(o, rs, x, weight, c, eps));
}

multiversion! {
    fn forward_rows(o: &mut [f32], rs: &mut [f32], x: &[f32], weight: &[f32], c: usize, eps: f32) {
        for r in 0..rs.len() {
            let row = &x[r * c..(r + 1) * c];
            let ms = super::math::dot(row, row) / c as f32;
            let s = 1.0 / (ms + eps).sqrt();
            let orow = &mut o[r * c..(r + 1) * c];
            for i in 0..c {
                orow[i] = row[i] * s * weight[i];
            }
            rs[r] = s;
        }
    }
}

/// Accumulates gradients: dinp += d/dinp and dweight += d/dweight, given dout [N,C] and the
/// saved rstd. With g = dout · w and n = x · rstd: dx = rstd · (g - n · mean(g · n)).
pub fn backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    rstd: &[f32],
) {
    let c = weight.len();
    let n = inp.len() / c;
    assert!(dinp.len() == n * c && dout.len() == n * c && rstd.len() >= n);
    assert_eq!(dweight.len(), c);
    // one sweep: dx rows, and per chunk of rows the partial sums of dweight
    super::reduce::rows_with_col_sums(dinp, c, &mut [dweight], |r0, dx, partial| {
        let r1 = r0 + dx.len() / c;
        backward_rows(
            dx,
            &dout[r0 * c..r1 * c],
            &inp[r0 * c..r1 * c],
            &rstd[r0..r1],
            weight,
            partial,
        )
    });
}

multiversion! {
    /// dx rows, and Σ rows of dy · x · rstd (dweight) into partial [C].
    fn backward_rows(dx: &mut [f32], dy: &[f32], x: &[f32], rs: &[f32], weight: &[f32], partial: &mut [f32]) {
        let c = weight.len();
        for r in 0..rs.len() {
            let s = rs[r];
            let xr = &x[r * c..(r + 1) * c];
            let dyr = &dy[r * c..(r + 1) * c];
            let mut acc = [0.0f32; 16];
            for i0 in (0..c).step_by(16) {
                for (k, a) in acc.iter_mut().enumerate().take(16.min(c - i0)) {
                    let i = i0 + k;
                    *a += dyr[i] * weight[i] * xr[i];
                }
            }
            // mean(g · n) = rstd · Σ g·x / C
            let m = acc.iter().sum::<f32>() * s / c as f32;
            let dxr = &mut dx[r * c..(r + 1) * c];
            let pw = &mut partial[..c];
            for i in 0..c {
                dxr[i] += (dyr[i] * weight[i] - xr[i] * s * m) * s;
                pw[i] += dyr[i] * xr[i] * s;
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
    fn forward_and_backward_match_reference_and_finite_differences() {
        let mut rng = Rng::new(21);
        for &(n, c) in &[(1, 1), (3, 7), (5, 16), (2, 33), (1, 100)] {
            let x = randn(&mut rng, n * c, 1.5);
            let w: Vec<f32> = randn(&mut rng, c, 0.3).iter().map(|v| v + 1.0).collect();
            let r = randn(&mut rng, n * c, 1.0);
            let eps = 1e-5;
            let mut out = vec![0.0; n * c];
            let mut rstd = vec![0.0; n];
            forward(&mut out, &mut rstd, &x, &w, c, eps);
            let (x64, w64, r64) = (to_f64(&x), to_f64(&w), to_f64(&r));
            let want = reference::rmsnorm_forward(&x64, &w64, c, eps as f64);
            assert!(max_rel_err(&out, &want, 1.0) < 1e-5, "forward {n}x{c}");

            let mut dx = vec![0.5; n * c];
            let mut dw = vec![0.25; c];
            backward(&mut dx, &mut dw, &r, &x, &w, &rstd);
            let loss = |xx: &[f64], ww: &[f64]| {
                let y = reference::rmsnorm_forward(xx, ww, c, eps as f64);
                y.iter().zip(&r64).map(|(a, b)| a * b).sum::<f64>()
            };
            let fdx: Vec<f64> = finite_diff(&x64, |xx| loss(xx, &w64))
                .iter()
                .map(|v| v + 0.5)
                .collect();
            let fdw: Vec<f64> = finite_diff(&w64, |ww| loss(&x64, ww))
                .iter()
                .map(|v| v + 0.25)
                .collect();
            assert!(max_rel_err(&dx, &fdx, 1.0) < 1e-4, "dx {n}x{c}");
            assert!(max_rel_err(&dw, &fdw, 1.0) < 1e-4, "dw {n}x{c}");
        }
    }
}

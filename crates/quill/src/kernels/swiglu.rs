//! SwiGLU, the gated MLP activation of Llama-family models: for a row [gate (F) | up (F)]
//! out = silu(gate) · up, with silu(x) = x · sigmoid(x).

use super::simd::multiversion;
use rayon::prelude::*;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + super::math::exp(-x))
}

multiversion! {
    fn forward_rows(o: &mut [f32], gu: &[f32], f: usize) {
        for (orow, r) in o.chunks_mut(f).zip(gu.chunks(2 * f)) {
            let (g, u) = r.split_at(f);
            for i in 0..f {
                orow[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        }
    }
}

multiversion! {
    fn backward_rows(dgu: &mut [f32], dout: &[f32], gu: &[f32], f: usize) {
        for ((drow, dy), r) in dgu.chunks_mut(2 * f).zip(dout.chunks(f)).zip(gu.chunks(2 * f)) {
            let (g, u) = r.split_at(f);
            let (dg, du) = drow.split_at_mut(f);
            for i in 0..f {
                let s = sigmoid(g[i]);
                let silu = g[i] * s;
                du[i] = dy[i] * silu;
                dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        }
    }
}

fn rows_per_task(n: usize, f: usize) -> usize {
    super::rows_per_task(n, 2 * f)
}

/// out [N,F] = silu(gu[:, :F]) · gu[:, F:], from gu [N, 2F].
pub fn forward(out: &mut [f32], gu: &[f32], f: usize) {
    let n = gu.len() / (2 * f);
    assert!(out.len() == n * f && gu.len() == n * 2 * f);
    let rpt = rows_per_task(n, f);
    out.par_chunks_mut(rpt * f)
        .zip(gu.par_chunks(rpt * 2 * f))
        .for_each(|(o, x)| forward_rows(o, x, f));
}

/// dgu [N, 2F] (overwritten) = gradient of [`forward`] given dout [N, F].
pub fn backward(dgu: &mut [f32], dout: &[f32], gu: &[f32], f: usize) {
    let n = gu.len() / (2 * f);
    assert!(dgu.len() == n * 2 * f && dout.len() == n * f);
    let rpt = rows_per_task(n, f);
    dgu.par_chunks_mut(rpt * 2 * f)
        .zip(dout.par_chunks(rpt * f).zip(gu.par_chunks(rpt * 2 * f)))
        .for_each(|(d, (dy, x))| backward_rows(d, dy, x, f));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{reference, testutil::*};
    use crate::rng::Rng;

    #[test]
    fn forward_and_backward_match_reference_and_finite_differences() {
        let mut rng = Rng::new(22);
        for &(n, f) in &[(1, 1), (3, 7), (2, 17), (4, 40)] {
            let gu = randn(&mut rng, n * 2 * f, 3.0);
            let r = randn(&mut rng, n * f, 1.0);
            let mut out = vec![0.0; n * f];
            forward(&mut out, &gu, f);
            let (g64, r64) = (to_f64(&gu), to_f64(&r));
            let want = reference::swiglu_forward(&g64, f);
            assert!(max_rel_err(&out, &want, 1.0) < 1e-5, "forward {n}x{f}");
            let mut d = vec![9.0; n * 2 * f];
            backward(&mut d, &r, &gu, f);
            let fd = finite_diff(&g64, |x| {
                let y = reference::swiglu_forward(x, f);
                y.iter().zip(&r64).map(|(a, b)| a * b).sum()
            });
            assert!(max_rel_err(&d, &fd, 1.0) < 1e-4, "backward {n}x{f}");
        }
    }
}

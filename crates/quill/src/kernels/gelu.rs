//! GELU, tanh approximation (GPT-2's "gelu_new"):
//! gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

use super::simd::multiversion;
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CHUNK: usize = 1 << 13;

/// As 0.5·x·(1 + tanh(u)) = x·e/(e + 1) with e = exp(2u): no cancellation where tanh(u)
/// is near -1, and a shorter chain of operations after the exponential.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    let e = super::math::exp(2.0 * u);
    x * (e / (e + 1.0))
}

/// gelu'(x) = 0.5(1 + t) + 0.5·x·(1 - t²)·u'(x) with t = tanh(u); with e = exp(2u),
/// σ = (1 + t)/2 = e/(e + 1) and 1 - σ = 1/(e + 1), so 0.5(1 - t²) = 2σ(1 - σ): one
/// division, no cancellation, and the factor of x computed beside the exponential.
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let x2 = x * x;
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x2 * x);
    let k = 2.0 * SQRT_2_OVER_PI * x * (1.0 + 3.0 * 0.044715 * x2);
    let e = super::math::exp(2.0 * u);
    let s = 1.0 / (e + 1.0);
    let sigma = e * s;
    sigma + k * sigma * s
}

multiversion! {
    fn forward_chunk(o: &mut [f32], x: &[f32]) {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = gelu(x);
        }
    }
}

multiversion! {
    fn backward_chunk(d: &mut [f32], x: &[f32]) {
        for (d, &x) in d.iter_mut().zip(x) {
            *d *= gelu_grad(x);
        }
    }
}

/// out[i] = gelu(inp[i]).
pub fn forward(out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len());
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(o, x)| forward_chunk(o, x));
}

multiversion! {
    /// As `backward_chunk` on whole rows of `width`, adding each row into `sums` [width].
    fn backward_rows_sums(d: &mut [f32], x: &[f32], sums: &mut [f32], width: usize) {
        for (dr, xr) in d.chunks_mut(width).zip(x.chunks(width)) {
            for ((d, &x), s) in dr.iter_mut().zip(xr).zip(sums.iter_mut()) {
                *d *= gelu_grad(x);
                *s += *d;
            }
        }
    }
}

/// [`backward_inplace`] on rows of `width` that also adds each column of the result into
/// `col_sums` [width] (the bias gradient of the layer that produced `inp`), in the same sweep;
/// the sums do not depend on the thread count ([`super::reduce::rows_with_col_sums`]).
pub fn backward_inplace_col_sums(d: &mut [f32], inp: &[f32], width: usize, col_sums: &mut [f32]) {
    assert!(
        d.len() == inp.len() && col_sums.len() == width && d.len().is_multiple_of(width.max(1))
    );
    super::reduce::rows_with_col_sums(d, width, &mut [col_sums], |r0, rows, partial| {
        let x = &inp[r0 * width..r0 * width + rows.len()];
        backward_rows_sums(rows, x, partial, width)
    });
}

/// d[i] = d[i] * gelu'(inp[i]): turns d loss/d gelu(inp) into d loss/d inp, in place.
pub fn backward_inplace(d: &mut [f32], inp: &[f32]) {
    assert_eq!(d.len(), inp.len());
    d.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(d, x)| backward_chunk(d, x));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{reference, testutil::*};
    use crate::rng::Rng;

    #[test]
    fn reference_grad_matches_finite_differences() {
        let xs: Vec<f64> = (-40..=40).map(|i| i as f64 * 0.15).collect();
        let fd = finite_diff(&xs, |x| x.iter().map(|&v| reference::gelu(v)).sum());
        let an: Vec<f64> = xs.iter().map(|&x| reference::gelu_grad(x)).collect();
        assert_close64(&an, &fd, 1e-7, "gelu'");
    }

    #[test]
    fn fast_kernel_matches_reference() {
        let mut rng = Rng::new(4);
        let x = randn(&mut rng, 10_007, 3.0);
        let mut y = vec![0.0; x.len()];
        forward(&mut y, &x);
        let want: Vec<f64> = x.iter().map(|&v| reference::gelu(v as f64)).collect();
        assert!(max_rel_err(&y, &want, 1.0) < 5e-6);
        let mut d = vec![1.0; x.len()];
        backward_inplace(&mut d, &x);
        let want: Vec<f64> = x.iter().map(|&v| reference::gelu_grad(v as f64)).collect();
        assert!(max_rel_err(&d, &want, 1.0) < 5e-6);
    }

    #[test]
    fn backward_with_column_sums_matches_reference() {
        let mut rng = Rng::new(5);
        // rows across several of the fixed row chunks, an odd width
        for &(rows, width) in &[(1, 1), (7, 5), (100, 37), (33, 64)] {
            let x = randn(&mut rng, rows * width, 3.0);
            let dy = randn(&mut rng, rows * width, 1.0);
            let mut d = dy.clone();
            let mut sums = vec![0.5f32; width];
            backward_inplace_col_sums(&mut d, &x, width, &mut sums);
            let want: Vec<f64> = x
                .iter()
                .zip(&dy)
                .map(|(&v, &g)| reference::gelu_grad(v as f64) * g as f64)
                .collect();
            assert!(max_rel_err(&d, &want, 1.0) < 5e-6);
            let want_sums: Vec<f64> = (0..width)
                .map(|j| 0.5 + (0..rows).map(|r| want[r * width + j]).sum::<f64>())
                .collect();
            assert!(max_rel_err(&sums, &want_sums, 1.0) < 1e-5, "{rows}x{width}");
        }
    }
}

//! GELU, tanh approximation (GPT-2's "gelu_new"):
//! gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

use super::simd::multiversion;
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CHUNK: usize = 1 << 13;

#[inline(always)]
fn gelu(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    0.5 * x * (1.0 + super::math::tanh(u))
}

#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    let t = super::math::tanh(u);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
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
}

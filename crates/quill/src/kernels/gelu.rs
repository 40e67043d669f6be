//! GELU, tanh approximation (GPT-2's "gelu_new"):
//! gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

use super::matmul::Tile;
use super::simd::multiversion;
use super::SendPtr;
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

multiversion! {
    /// For a fused product whose output C is the pre-activation h [.., ld]: writes gelu(h)
    /// of one finished tile into out (same layout).
    fn forward_tile_rows(t: Tile, out: SendPtr, ld: usize) {
        for r in 0..t.rows {
            // Safety: called with the tile by the product that owns it; `out` has C's shape.
            let (h, o) = unsafe {
                let o = std::slice::from_raw_parts_mut(out.get().add((t.i + r) * ld + t.j), t.cols);
                (t.row(r), o)
            };
            for (o, &x) in o.iter_mut().zip(h.iter()) {
                *o = gelu(x);
            }
        }
    }
}

multiversion! {
    /// For a fused product whose output C is d loss/d gelu(h): multiplies a finished tile by
    /// gelu'(h) in place (h [.., ld]), making it d loss/d h.
    fn backward_tile_rows(t: Tile, h: &[f32], ld: usize) {
        for r in 0..t.rows {
            let x = &h[(t.i + r) * ld + t.j..][..t.cols];
            // Safety: called with the tile by the product that owns it.
            let d = unsafe { t.row(r) };
            for (d, &x) in d.iter_mut().zip(x) {
                *d *= gelu_grad(x);
            }
        }
    }
}

/// The step to fuse into the product that computes h [.., ld]: out (same shape) = gelu(h).
pub fn forward_tiles<'a>(out: &'a mut [f32], ld: usize) -> impl Fn(Tile) + Sync + 'a {
    let (len, ptr) = (out.len(), SendPtr(out.as_mut_ptr()));
    // the closure holds the borrow of `out` (only through `ptr`) for as long as it lives
    let borrow = std::marker::PhantomData::<&'a mut [f32]>;
    move |t: Tile| {
        let _ = &borrow;
        assert!(t.rows == 0 || (t.i + t.rows - 1) * ld + t.j + t.cols <= len);
        forward_tile_rows(t, ptr, ld)
    }
}

/// The step to fuse into the product that computes d loss/d gelu(h) [.., ld]: multiplies it
/// by gelu'(h), as [`backward_inplace`].
pub fn backward_tiles(h: &[f32], ld: usize) -> impl Fn(Tile) + Sync + '_ {
    move |t: Tile| backward_tile_rows(t, h, ld)
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

//! Kernels: one operation per file, each a forward/backward pair over flat f32 buffers,
//! with the shapes written at the top of each function. A kernel knows nothing of models.
//!
//! `reference` holds plain float64 twins of every kernel; the tests check the fast f32
//! kernels against them, and the twins against finite differences.

pub mod attention;
pub mod bf16;
pub mod crossentropy;
pub mod embedding;
pub mod families;
pub mod gelu;
pub mod layernorm;
pub mod linear;
pub mod math;
pub mod matmul;
pub mod packed;
pub mod product;
pub mod quant;
pub mod reduce;
pub mod reference;
pub mod rmsnorm;
pub mod rope;
pub mod sgemm;
pub mod simd;
pub mod swiglu;
pub mod tile;

/// Where a norm's forward pass writes each row's statistics for its backward pass: the mean
/// (LayerNorm; RMSNorm leaves it alone, and it may be empty) and 1/std.
pub struct RowStats<'a> {
    pub mean: &'a mut [f32],
    pub rstd: &'a mut [f32],
}

/// The statistics a norm's forward pass kept, as its backward pass reads them.
#[derive(Clone, Copy)]
pub struct Stats<'a> {
    pub mean: &'a [f32],
    pub rstd: &'a [f32],
}

/// A raw pointer that may be shared between threads that write disjoint regions.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole Send wrapper).
    #[inline]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Rows per parallel task for row-wise kernels: enough tasks to balance, few enough to be cheap.
pub(crate) fn rows_per_task(rows: usize, cols: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let min_rows = (4096 / cols.max(1)).max(1);
    rows.div_ceil(threads * 4).max(min_rows).max(1)
}

/// Each row of y [rows, width] <- bias (+ the same row of `residual`), or zero without either:
/// the starting value of a linear layer's output, into which the product then accumulates.
/// This fuses the bias and the residual connection into one pass (no separate addition).
pub fn init_rows(y: &mut [f32], bias: Option<&[f32]>, residual: Option<&[f32]>, width: usize) {
    use rayon::prelude::*;
    let rows = y.len() / width.max(1);
    if let Some(b) = bias {
        assert_eq!(b.len(), width);
    }
    if let Some(r) = residual {
        assert_eq!(r.len(), y.len());
    }
    let per = rows_per_task(rows, width) * width;
    y.par_chunks_mut(per.max(1))
        .enumerate()
        .for_each(|(i, chunk)| {
            let res = residual.map(|r| &r[i * per..i * per + chunk.len()]);
            init_chunk(chunk, bias, res, width);
        });
}

simd::multiversion! {
    fn init_chunk(y: &mut [f32], bias: Option<&[f32]>, residual: Option<&[f32]>, width: usize) {
        match (bias, residual) {
            (Some(b), Some(r)) => {
                for (row, rr) in y.chunks_mut(width).zip(r.chunks(width)) {
                    for ((o, &x), &bv) in row.iter_mut().zip(rr).zip(b) {
                        *o = x + bv;
                    }
                }
            }
            (Some(b), None) => {
                for row in y.chunks_mut(width) {
                    row.copy_from_slice(b);
                }
            }
            (None, Some(r)) => y.copy_from_slice(r),
            (None, None) => y.fill(0.0),
        }
    }
}

/// x += y, elementwise (the residual connection).
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    use rayon::prelude::*;
    assert_eq!(x.len(), y.len());
    const CHUNK: usize = 1 << 14;
    x.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(a, b)| add_chunk(a, b));
}

simd::multiversion! {
    fn add_chunk(a: &mut [f32], b: &[f32]) {
        for (a, b) in a.iter_mut().zip(b) {
            *a += b;
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::product::{Accumulate, Dims, Strided, View, ViewMut};
    use crate::rng::Rng;

    /// C [m, n] (+)= op(A) · op(B) over dense buffers as a strided product: A stored [m, k]
    /// (or [k, m] when transposed), B [k, n] (or [n, k]); one thread, nothing fused.
    pub fn strided<'a>(
        c: &mut [f32],
        a: &[f32],
        b: &[f32],
        (m, k, n): (usize, usize, usize),
        (ta, tb): (bool, bool),
    ) -> Strided<'a> {
        assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
        let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
        let c = ViewMut::new(c.as_mut_ptr(), n);
        let (a, b) = (
            View::new(a.as_ptr(), a_rs, a_cs),
            View::new(b.as_ptr(), b_rs, b_cs),
        );
        Strided::new(Dims::new(m, k, n), c, a, b, Accumulate::Overwrite)
    }

    pub fn randn(rng: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (rng.normal() * scale) as f32).collect()
    }

    pub fn to_f64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    /// The largest |a - b| over the largest |b| (at least `floor`); infinite where an element
    /// is NaN (f64::max would pass over it).
    pub fn max_rel_err(a: &[f32], b: &[f64], floor: f64) -> f64 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(floor, |m, &v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y).abs())
            .map(|d| if d.is_nan() { f64::INFINITY } else { d })
            .fold(0.0, f64::max)
            / scale
    }

    /// Central finite difference of a scalar function along every coordinate of `x`.
    pub fn finite_diff(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let h = 1e-6;
        let mut xp = x.to_vec();
        (0..x.len())
            .map(|i| {
                let orig = xp[i];
                xp[i] = orig + h;
                let fp = f(&xp);
                xp[i] = orig - h;
                let fm = f(&xp);
                xp[i] = orig;
                (fp - fm) / (2.0 * h)
            })
            .collect()
    }

    pub fn assert_close64(a: &[f64], b: &[f64], tol: f64, what: &str) {
        let scale = b.iter().fold(1e-3, |m: f64, &v| m.max(v.abs()));
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * scale,
                "{what}[{i}]: {x} vs {y} (tol {tol} x {scale})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;
    use crate::rng::Rng;

    /// Bias and residual rows, on widths and row counts that split unevenly between tasks.
    #[test]
    fn init_rows_is_bias_plus_residual() {
        let mut rng = Rng::new(9);
        for &(rows, width) in &[(1, 1), (3, 7), (97, 13), (1000, 65)] {
            let b = randn(&mut rng, width, 1.0);
            let r = randn(&mut rng, rows * width, 1.0);
            for (bias, res) in [
                (Some(&b[..]), Some(&r[..])),
                (Some(&b[..]), None),
                (None, Some(&r[..])),
                (None, None),
            ] {
                let mut y = vec![f32::NAN; rows * width];
                init_rows(&mut y, bias, res, width);
                for (i, &v) in y.iter().enumerate() {
                    let want = bias.map_or(0.0, |b| b[i % width]) + res.map_or(0.0, |r| r[i]);
                    assert_eq!(v, want, "{rows}x{width} at {i}");
                }
            }
        }
    }
}

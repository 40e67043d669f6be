//! Column reductions used by backward passes (bias and norm-weight gradients).
//! Each column is summed over rows by one task in row order, so the result does not
//! depend on the number of threads: training is reproducible.

use super::SendPtr;
use rayon::prelude::*;

/// Width of a column block handled by one task.
const COL_BLOCK: usize = 64;

/// Runs `f(col_start, col_end, acc)` for column blocks in parallel, where `acc` is the
/// slice `out[col_start..col_end]`.
pub(crate) fn for_column_blocks(out: &mut [f32], f: impl Fn(usize, usize, &mut [f32]) + Sync) {
    let cols = out.len();
    let ptr = SendPtr(out.as_mut_ptr());
    let blocks = cols.div_ceil(COL_BLOCK);
    (0..blocks).into_par_iter().for_each(|blk| {
        let c0 = blk * COL_BLOCK;
        let c1 = (c0 + COL_BLOCK).min(cols);
        let p = ptr;
        // Safety: blocks are disjoint ranges of `out`.
        let acc = unsafe { std::slice::from_raw_parts_mut(p.get().add(c0), c1 - c0) };
        f(c0, c1, acc);
    });
}

/// out[c] += sum over rows r of x[r, c]; x is [rows, cols].
pub fn col_sum_acc(out: &mut [f32], x: &[f32], rows: usize) {
    let cols = out.len();
    assert!(x.len() >= rows * cols);
    for_column_blocks(out, |c0, c1, acc| col_sum_block(acc, x, rows, cols, c0, c1));
}

super::simd::multiversion! {
    fn col_sum_block(acc: &mut [f32], x: &[f32], rows: usize, cols: usize, c0: usize, c1: usize) {
        for r in 0..rows {
            let row = &x[r * cols + c0..r * cols + c1];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_sums() {
        let rows = 37;
        let cols = 131;
        let x: Vec<f32> = (0..rows * cols).map(|i| (i % 17) as f32 - 8.0).collect();
        let mut out = vec![1.0; cols];
        col_sum_acc(&mut out, &x, rows);
        for c in 0..cols {
            let want: f32 = 1.0 + (0..rows).map(|r| x[r * cols + c]).sum::<f32>();
            assert_eq!(out[c], want);
        }
    }
}

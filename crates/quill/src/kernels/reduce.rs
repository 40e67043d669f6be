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

/// Rows per chunk of [`rows_with_col_sums`]: fixed, so sums do not depend on the threads.
pub(crate) const SUM_ROWS: usize = 32;

thread_local! {
    /// Per-chunk column partial sums of `rows_with_col_sums` (owned by the calling thread,
    /// grown to the largest call, then reused: no allocation in a training step).
    static PARTIALS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A row-wise pass that also produces column sums, in one sweep over the data: `f(r0, rows,
/// partial)` runs in parallel for fixed chunks of SUM_ROWS rows of `data` [rows, width]
/// (`rows` is the chunk, starting at row r0), adding its chunk's column sums into the zeroed
/// `partial`, which holds one span per vector of `outs`, back to back. The partials are then
/// added into `outs` in chunk order, column blocks in parallel: the result depends on neither
/// the thread count nor the scheduling.
pub(crate) fn rows_with_col_sums(
    data: &mut [f32],
    width: usize,
    outs: &mut [&mut [f32]],
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) {
    let cols: usize = outs.iter().map(|o| o.len()).sum();
    let rows = data.len() / width.max(1);
    let chunks = rows.div_ceil(SUM_ROWS);
    let mut run = |partials: &mut Vec<f32>| {
        if partials.len() < chunks * cols {
            partials.resize(chunks * cols, 0.0);
        }
        let partials = &mut partials[..chunks * cols];
        partials.fill(0.0);
        data.par_chunks_mut(SUM_ROWS * width)
            .zip(partials.par_chunks_mut(cols.max(1)))
            .enumerate()
            .for_each(|(i, (rows, partial))| f(i * SUM_ROWS, rows, partial));
        let partials = &*partials;
        let mut base = 0;
        for out in outs.iter_mut() {
            for_column_blocks(out, |c0, c1, acc| {
                for ch in 0..chunks {
                    let p = &partials[ch * cols + base + c0..ch * cols + base + c1];
                    for (a, &v) in acc.iter_mut().zip(p) {
                        *a += v;
                    }
                }
            });
            base += out.len();
        }
    };
    PARTIALS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => run(&mut buf),
        Err(_) => run(&mut Vec::new()),
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
    fn row_pass_with_column_sums_matches_separate_sums_for_any_thread_count() {
        for &(rows, width) in &[(1, 1), (31, 5), (33, 7), (100, 130), (64, 3)] {
            let x: Vec<f32> = (0..rows * width)
                .map(|i| ((i * 7919) % 23) as f32 * 0.37 - 4.0)
                .collect();
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut data = x.clone();
                let (mut o1, mut o2) = (vec![1.0f32; width], vec![1.0f32; width]);
                pool.install(|| {
                    rows_with_col_sums(
                        &mut data,
                        width,
                        &mut [&mut o1, &mut o2],
                        |r0, chunk, partial| {
                            for (r, row) in chunk.chunks_mut(width).enumerate() {
                                for (j, v) in row.iter_mut().enumerate() {
                                    partial[j] += *v;
                                    partial[width + j] += *v * (r0 + r) as f32;
                                    *v *= 2.0;
                                }
                            }
                        },
                    )
                });
                o1.extend(o2);
                (data, o1)
            };
            let (data, out) = run(1);
            assert_eq!(run(3), (data.clone(), out.clone()), "{rows}x{width}");
            for (d, v) in data.iter().zip(&x) {
                assert_eq!(*d, 2.0 * v);
            }
            for j in 0..width {
                let s: f64 = (0..rows).map(|r| x[r * width + j] as f64).sum();
                let w: f64 = (0..rows).map(|r| x[r * width + j] as f64 * r as f64).sum();
                assert!(
                    (out[j] as f64 - 1.0 - s).abs() < 1e-3 * (1.0 + s.abs()),
                    "sum {j}"
                );
                assert!(
                    (out[width + j] as f64 - 1.0 - w).abs() < 1e-3 * (1.0 + w.abs()),
                    "weighted {j}"
                );
            }
        }
    }

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

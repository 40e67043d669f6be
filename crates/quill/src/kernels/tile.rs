//! Small f32 products read in place, without packing: attention's strip products in f32
//! (a 32-row strip against a head's keys, values or gradients, depth ≤ T or the head width).
//! A general GEMM packs both operands on every call, which at these sizes costs as much as the
//! arithmetic; here B's rows are read where they lie (its columns contiguous) and A's elements
//! are broadcast through any strides, into register tiles of up to 8 rows x 64 columns.
//!
//! On AVX-512 each depth step of a tile is up to four 16-wide loads of B, one broadcast per row
//! and one FMA per row and 16 columns; columns past the edge are masked. On AVX2 (16 ymm
//! registers) a tile is up to 6 rows x 16 columns, two 8-wide loads of B per depth. Both skip
//! the tiles a causal product leaves out (on an AMD EPYC Zen 5 forced to AVX2, attention
//! moved from the general GEMM, which computed every tile, to these: `char` 3,198–3,239 →
//! 3,279–3,295 tokens/s, `nano` 34,570–35,899 → 36,013–37,172). Without either (or with
//! `QUILL_SIMD=scalar`) the same product runs as plain loops, which the tests check the SIMD
//! paths against on awkward sizes.

use super::product::{Dims, Strided};

/// Which part of a causal (triangular) product is needed, so that whole tiles of the masked
/// part are skipped. Work inside a tile that straddles the diagonal is still done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causal {
    /// The whole product.
    Full,
    /// Only c[i, j] with j ≤ i + off is needed; the others may be left unwritten.
    ColsUpTo(usize),
    /// a[i, p] is zero for p > i + off: those terms are skipped.
    DepthUpTo(usize),
    /// a[i, p] is zero for p < i: those terms are skipped.
    DepthFrom,
}

/// c[i, j] (+)= Σ_p a[i·a_rs + p·a_cs] · b[p·b_rs + j] for i < m, j < n, p < k; c[i, j] is at
/// c + i·c_rs + j. Without `accumulate`, C is overwritten. `causal` says which terms or
/// outputs may be skipped (the plain path computes them all).
///
/// # Safety
/// Every element named lies inside a live allocation; nobody else touches C's elements during
/// the call, and C does not overlap A or B.
pub unsafe fn gemm(s: Strided, causal: Causal) {
    debug_assert_eq!(s.b.cs, 1, "B's columns are contiguous");
    let Dims { m, n, .. } = s.dims;
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx512() {
        return avx512::gemm(s, causal);
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        return avx2::gemm(s, causal);
    }
    plain(s);
}

/// One register tile's operands: C's block at c (`cols` columns), A's rows from a, B's block
/// from b, over depth k.
#[cfg(target_arch = "x86_64")]
struct Tile {
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    c: *mut f32,
    c_rs: usize,
    cols: usize,
    accumulate: bool,
}

/// The walk both SIMD bodies share: column blocks of `nb` outer (a block of B stays in cache
/// while the row tiles pass over it), tiles of `mr(block)` rows, each trimmed by `causal` to
/// the columns or depths it needs; `tile(rows, t)` computes one.
///
/// # Safety
/// As [`gemm`].
#[cfg(target_arch = "x86_64")]
unsafe fn walk(
    s: &Strided,
    causal: Causal,
    (nb, mr): (usize, fn(usize) -> usize),
    mut tile: impl FnMut(usize, &Tile),
) {
    let Dims { m, k, n } = s.dims;
    let (c, c_rs, a, a_rs, a_cs) = (s.c.ptr, s.c.rs, s.a.ptr, s.a.rs, s.a.cs);
    let (b, b_rs) = (s.b.ptr, s.b.rs);
    let accumulate = s.adds();
    for j in (0..n).step_by(nb) {
        let block = (n - j).min(nb);
        let mr = mr(block);
        for i in (0..m).step_by(mr) {
            let rows = (m - i).min(mr);
            // the tile's columns and depth range
            let (mut cols, mut p0, mut p1) = (block, 0, k);
            match causal {
                Causal::Full => {}
                Causal::ColsUpTo(off) => cols = cols.min((i + rows + off).saturating_sub(j)),
                Causal::DepthUpTo(off) => p1 = p1.min(i + rows + off),
                Causal::DepthFrom => p0 = i.min(k),
            }
            if cols > 0 {
                let t = Tile {
                    k: p1.saturating_sub(p0),
                    a: a.add(i * a_rs + p0 * a_cs),
                    a_rs,
                    a_cs,
                    b: b.add(p0 * b_rs + j),
                    b_rs,
                    c: c.add(i * c_rs + j),
                    c_rs,
                    cols,
                    accumulate,
                };
                tile(rows, &t);
            }
        }
    }
}

/// The plain loops (the fallback, and what the SIMD path is tested against).
///
/// # Safety
/// As [`gemm`].
pub unsafe fn plain(s: Strided) {
    let Dims { m, k, n } = s.dims;
    let (c, c_rs, a, a_rs, a_cs) = (s.c.ptr, s.c.rs, s.a.ptr, s.a.rs, s.a.cs);
    let (b, b_rs) = (s.b.ptr, s.b.rs);
    debug_assert_eq!(s.b.cs, 1, "B's columns are contiguous");
    let accumulate = s.adds();
    for i in 0..m {
        let row = std::slice::from_raw_parts_mut(c.add(i * c_rs), n);
        if !accumulate {
            row.fill(0.0);
        }
        for p in 0..k {
            let x = *a.add(i * a_rs + p * a_cs);
            let brow = std::slice::from_raw_parts(b.add(p * b_rs), n);
            for (o, &y) in row.iter_mut().zip(brow) {
                *o += x * y;
            }
        }
    }
}

/// dst[p·rows + j] <- src[j·src_rs + p] for j < rows, p < cols (a block stored transposed).
///
/// # Safety
/// src has `rows` rows of `cols` readable elements at stride src_rs; dst does not overlap it.
pub unsafe fn transpose(dst: &mut [f32], src: *const f32, src_rs: usize, rows: usize, cols: usize) {
    let dst = &mut dst[..rows * cols];
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx512() {
        return avx512::transpose(dst, src, src_rs, rows, cols);
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        return transpose_avx2(dst, src, src_rs, rows, cols);
    }
    for j in 0..rows {
        for p in 0..cols {
            dst[p * rows + j] = *src.add(j * src_rs + p);
        }
    }
}

/// [`transpose`] in 8 x 8 blocks through registers, the edges past the last whole block one
/// element at a time.
///
/// # Safety
/// AVX2; as [`transpose`], with dst holding rows x cols.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_avx2(
    dst: &mut [f32],
    src: *const f32,
    src_rs: usize,
    rows: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let out = dst.as_mut_ptr();
    let (whole_rows, whole_cols) = (rows / 8 * 8, cols / 8 * 8);
    for j0 in (0..whole_rows).step_by(8) {
        for p0 in (0..whole_cols).step_by(8) {
            let mut r = [_mm256_setzero_ps(); 8];
            for (j, x) in r.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(src.add((j0 + j) * src_rs + p0));
            }
            for (p, x) in super::simd::transpose8(r).iter().enumerate() {
                _mm256_storeu_ps(out.add((p0 + p) * rows + j0), *x);
            }
        }
    }
    for j in 0..rows {
        // the columns past the whole blocks, and every column of the rows past them
        let from = if j < whole_rows { whole_cols } else { 0 };
        for p in from..cols {
            *out.add(p * rows + j) = *src.add(j * src_rs + p);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Causal, Strided, Tile};
    use crate::kernels::simd::{mask16, transpose16};
    use std::arch::x86_64::*;

    /// Columns per tile: four zmm.
    const NB: usize = 64;

    /// As [`super::gemm`], on a CPU with AVX-512F: column blocks of up to 64 (V zmm), tiles of
    /// 8 rows for V ≤ 2, else 4.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm(s: Strided, causal: Causal) {
        debug_assert_eq!(s.b.cs, 1, "B's columns are contiguous");
        let mr = |block: usize| if block <= 32 { 8 } else { 4 };
        super::walk(&s, causal, (NB, mr), |rows, t| match t.cols.div_ceil(16) {
            1 => by_rows::<1>(rows, t),
            2 => by_rows::<2>(rows, t),
            3 => by_rows::<3>(rows, t),
            _ => by_rows::<4>(rows, t),
        });
    }

    /// [`super::transpose`] in 16 x 16 blocks through registers (masked at the edges).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose(
        dst: &mut [f32],
        src: *const f32,
        src_rs: usize,
        rows: usize,
        cols: usize,
    ) {
        let out = dst.as_mut_ptr();
        for j0 in (0..rows).step_by(16) {
            let nj = (rows - j0).min(16);
            for p0 in (0..cols).step_by(16) {
                let np = (cols - p0).min(16);
                let m = mask16(np);
                let mut r = [_mm512_setzero_si512(); 16];
                for (j, x) in r.iter_mut().enumerate().take(nj) {
                    *x = _mm512_maskz_loadu_epi32(m, src.add((j0 + j) * src_rs + p0) as *const _);
                }
                let t = transpose16(r);
                let mj = mask16(nj);
                for (p, x) in t.iter().enumerate().take(np) {
                    _mm512_mask_storeu_epi32(out.add((p0 + p) * rows + j0) as *mut _, mj, *x);
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn by_rows<const V: usize>(rows: usize, t: &Tile) {
        match rows {
            1 => tile::<1, V>(t),
            2 => tile::<2, V>(t),
            3 => tile::<3, V>(t),
            4 => tile::<4, V>(t),
            5 => tile::<5, V>(t),
            6 => tile::<6, V>(t),
            7 => tile::<7, V>(t),
            _ => tile::<8, V>(t),
        }
    }

    /// R x (V·16) accumulators in registers over the whole depth, then one store.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const V: usize>(t: &Tile) {
        let mut masks = [0u16; V];
        for (v, m) in masks.iter_mut().enumerate() {
            *m = mask16(t.cols.saturating_sub(16 * v));
        }
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let mut rows = [t.a; R];
        for (r, p) in rows.iter_mut().enumerate() {
            *p = t.a.add(r * t.a_rs);
        }
        let mut bp = t.b;
        for _ in 0..t.k {
            let mut bv = [_mm512_setzero_ps(); V];
            for v in 0..V {
                bv[v] = _mm512_maskz_loadu_ps(masks[v], bp.add(16 * v));
            }
            for r in 0..R {
                let x = _mm512_set1_ps(*rows[r]);
                rows[r] = rows[r].add(t.a_cs);
                for v in 0..V {
                    acc[r][v] = _mm512_fmadd_ps(x, bv[v], acc[r][v]);
                }
            }
            bp = bp.add(t.b_rs);
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let row = t.c.add(r * t.c_rs);
            for v in 0..V {
                let cp = row.add(16 * v);
                let mut x = acc_r[v];
                if t.accumulate {
                    x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(masks[v], cp));
                }
                _mm512_mask_storeu_ps(cp, masks[v], x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Causal, Strided, Tile};
    use crate::kernels::simd::mask8;
    use std::arch::x86_64::*;

    /// Columns per tile: two ymm.
    const NB: usize = 16;

    /// As [`super::gemm`], on a CPU with AVX2 and FMA (16 ymm registers): tiles of up to 6 rows
    /// x 16 columns, 12 accumulators; masked loads and stores only in a block of fewer than 16
    /// columns.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm(s: Strided, causal: Causal) {
        debug_assert_eq!(s.b.cs, 1, "B's columns are contiguous");
        super::walk(&s, causal, (NB, |_| 6), |rows, t| match t.cols {
            NB => by_rows::<2, false>(rows, t),
            9.. => by_rows::<2, true>(rows, t),
            _ => by_rows::<1, true>(rows, t),
        });
    }

    #[inline(always)]
    unsafe fn by_rows<const V: usize, const MASKED: bool>(rows: usize, t: &Tile) {
        match rows {
            1 => tile::<1, V, MASKED>(t),
            2 => tile::<2, V, MASKED>(t),
            3 => tile::<3, V, MASKED>(t),
            4 => tile::<4, V, MASKED>(t),
            5 => tile::<5, V, MASKED>(t),
            _ => tile::<6, V, MASKED>(t),
        }
    }

    /// R x (V·8) accumulators in registers over the whole depth, then one store.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const V: usize, const MASKED: bool>(t: &Tile) {
        let masks: [__m256i; V] = std::array::from_fn(|v| mask8(t.cols.saturating_sub(8 * v)));
        let load = |p: *const f32, v: usize| match MASKED {
            true => _mm256_maskload_ps(p.add(8 * v), masks[v]),
            false => _mm256_loadu_ps(p.add(8 * v)),
        };
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        let mut rows: [*const f32; R] = std::array::from_fn(|r| t.a.add(r * t.a_rs));
        let mut bp = t.b;
        for _ in 0..t.k {
            let bv: [__m256; V] = std::array::from_fn(|v| load(bp, v));
            for (acc_r, row) in acc.iter_mut().zip(rows.iter_mut()) {
                let x = _mm256_broadcast_ss(&**row);
                *row = row.add(t.a_cs);
                for (a, b) in acc_r.iter_mut().zip(&bv) {
                    *a = _mm256_fmadd_ps(x, *b, *a);
                }
            }
            bp = bp.add(t.b_rs);
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let row = t.c.add(r * t.c_rs);
            for (v, &x) in acc_r.iter().enumerate() {
                let x = match t.accumulate {
                    true => _mm256_add_ps(x, load(row, v)),
                    false => x,
                };
                match MASKED {
                    true => _mm256_maskstore_ps(row.add(8 * v), masks[v], x),
                    false => _mm256_storeu_ps(row.add(8 * v), x),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::product::{Accumulate, View, ViewMut};
    use crate::kernels::testutil::*;
    use crate::rng::Rng;

    #[test]
    fn transpose_matches_definition() {
        let mut rng = Rng::new(42);
        for &(rows, cols) in &[
            (1, 1),
            (5, 3),
            (8, 8),
            (16, 16),
            (17, 33),
            (256, 64),
            (40, 7),
            (9, 23),
        ] {
            let src_rs = cols + 3;
            let src = randn(&mut rng, rows * src_rs, 1.0);
            let mut dst = vec![f32::NAN; rows * cols];
            // Safety: rows x cols at stride src_rs lie inside src.
            unsafe { transpose(&mut dst, src.as_ptr(), src_rs, rows, cols) };
            for j in 0..rows {
                for p in 0..cols {
                    assert_eq!(dst[p * rows + j], src[j * src_rs + p]);
                }
            }
        }
    }

    /// Every tile shape (rows 1..8 and partial ones, columns past each 16-lane edge), depth 0,
    /// both strides of A, accumulation, each causal trim: the dispatched path against the plain
    /// loops and both against float64 (on the outputs a trim keeps; A is zero where a trim
    /// skips terms).
    #[test]
    fn tiles_match_plain_loops_and_float64() {
        let mut rng = Rng::new(41);
        let trims = [
            Causal::Full,
            Causal::ColsUpTo(0),
            Causal::ColsUpTo(5),
            Causal::DepthUpTo(0),
            Causal::DepthUpTo(3),
            Causal::DepthFrom,
        ];
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 7, 5),
            (8, 64, 64),
            (9, 3, 17),
            (13, 31, 33),
            (32, 64, 256),
            (17, 0, 40),
            (37, 65, 49),
            (4, 130, 95),
            (11, 5, 129),
            (70, 70, 70),
        ] {
            for trans_a in [false, true] {
                for (t, &causal) in trims.iter().enumerate() {
                    let accumulate = t % 2 == 1;
                    let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
                    let mut a = randn(&mut rng, m * k, 1.0);
                    for i in 0..m {
                        for p in 0..k {
                            let zero = match causal {
                                Causal::DepthUpTo(off) => p > i + off,
                                Causal::DepthFrom => p < i,
                                _ => false,
                            };
                            if zero {
                                a[i * a_rs + p * a_cs] = 0.0;
                            }
                        }
                    }
                    let b = randn(&mut rng, k * n + 3, 1.0);
                    // C with a row stride wider than n
                    let (c_rs, b_rs) = (n + 2, n);
                    let c0 = randn(&mut rng, m * c_rs, 1.0);
                    let (mut fast, mut slow) = (c0.clone(), c0.clone());
                    // Safety: the strides stay inside the buffers.
                    unsafe {
                        gemm(
                            Strided::new(
                                Dims { m, k, n },
                                ViewMut::new(fast.as_mut_ptr(), c_rs),
                                View::new(a.as_ptr(), a_rs, a_cs),
                                View::new(b.as_ptr(), b_rs, 1),
                                Accumulate::from(accumulate),
                            ),
                            causal,
                        );
                        plain(Strided::new(
                            Dims { m, k, n },
                            ViewMut::new(slow.as_mut_ptr(), c_rs),
                            View::new(a.as_ptr(), a_rs, a_cs),
                            View::new(b.as_ptr(), b_rs, 1),
                            Accumulate::from(accumulate),
                        ));
                    }
                    let scale = (k as f64).sqrt().max(1.0);
                    for i in 0..m {
                        for j in 0..n {
                            if let Causal::ColsUpTo(off) = causal {
                                if j > i + off {
                                    continue;
                                }
                            }
                            let mut w = if accumulate {
                                c0[i * c_rs + j] as f64
                            } else {
                                0.0
                            };
                            for p in 0..k {
                                w += a[i * a_rs + p * a_cs] as f64 * b[p * b_rs + j] as f64;
                            }
                            for got in [fast[i * c_rs + j], slow[i * c_rs + j]] {
                                let err = (got as f64 - w).abs() / scale;
                                assert!(
                                    err < 1e-5,
                                    "{m}x{k}x{n} {trans_a} {causal:?}: {got} vs {w}"
                                );
                            }
                        }
                        // the padding between rows is untouched
                        for j in n..c_rs {
                            assert_eq!(fast[i * c_rs + j], c0[i * c_rs + j]);
                        }
                    }
                }
            }
        }
    }
}

//! f32 matrix multiply on AVX-512: C (+)= op(A) · op(B), row-major C, A and B through any
//! strides, f32 accumulation. The training step's linear layers and inference prompts run on
//! it (CPUs without AVX-512 use the `gemm` crate instead, see [`super::matmul`]).
//!
//! Blocking (BLIS-style, shaped after the measurements in BENCHMARKS.md):
//! - C's columns go in blocks of NC; the depth in even blocks of at most KC.
//! - For each (column block, depth block), B's block is packed into panels of NR = 64
//!   columns, [depth][64] each (zero past the last column), split between the threads.
//! - A is never packed: the register tile (MR = 6 rows x 64 columns, 24 zmm accumulators)
//!   broadcasts A's six values of each depth straight from A's rows, whatever its strides,
//!   so the six rows (6 x KC floats, 12 KB) sit in L1 while the tile walks a sub-block of
//!   B's panels (KC x NB floats) that sits in L2.
//! - The threads split C by rows (every thread needs the whole packed block: it is packed by
//!   all of them, then each computes its rows) or, when the columns divide well, by panels
//!   (each thread packs and computes its own panels, with no wait in between).
//!
//! Work rides along ([`Fusion`], as in the bf16 kernel): a starting value (bias, residual) is
//! added in the tile stores of the first depth block, and B's column sums (a bias gradient)
//! are taken while B is packed, so neither costs a pass over memory.
//!
//! The one packing buffer is per calling thread and reused (sized for the largest block at
//! the first call), so nothing allocates after the first product.

#[cfg(test)]
use super::product::{Accumulate, Fusion, View, ViewMut};
use super::product::{Dims, Store, Strided};
use super::simd::{mask16, transpose16};
use super::SendPtr;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;

/// Rows of the register tile.
pub const MR: usize = 6;
/// Columns of the register tile (four zmm of f32).
pub const NR: usize = 64;
/// Most depths per block (a tile's six rows of A, 12 KB, stay in L1).
const KC: usize = 512;
/// Columns of B per packed block (a multiple of NR; KC x NC floats, 3 MB).
const NC: usize = 1536;
/// Rows of A copied at a time when A is not contiguous along the depth (a multiple of MR).
const MC: usize = 96;
/// Panels per L2 sub-block (KC x 384 floats, 768 KB) for the tile rows to walk.
const NB_PANELS: usize = 6;
/// Depth blocks up to this deep walk one panel at a time instead (its KC x 64 floats, 32 KB,
/// stay in L1 while every six rows of A pass by).
const SHALLOW: usize = 128;
/// Floats kept spare in the packing buffer to start it on a cache line.
const ALIGN: usize = 16;

/// Problems smaller than this many multiply-adds run on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// Whether this CPU runs [`matmul_fused`] (AVX-512 F and BW, not turned off by
/// `QUILL_SIMD=scalar`).
pub fn available() -> bool {
    super::simd::has_avx512()
}

thread_local! {
    /// B's packed block, owned by the thread that called the product.
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A's rows copied into micro-panels (when A is not contiguous along the depth), per
    /// computing thread.
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The problem, with raw pointers as addresses so the closures that split it are Send.
struct Problem<'a> {
    s: Strided<'a>,
}

/// One strided product ([`Strided`]) with its fused work (`Fusion::default()` for none). With `parallel`, the work is split between the threads of the
/// current rayon pool when the product is large enough. Needs [`available`].
///
/// # Safety
/// [`available`] is true; every element reached through the strides lies inside live
/// allocations, and nobody else touches `c`'s elements during the call; the residual has m
/// rows of n readable elements, col_sums n writable ones, and bias n elements.
pub unsafe fn matmul_fused(s: Strided) {
    assert!(available(), "sgemm needs AVX-512");
    let Dims { m, k, n } = s.dims;
    s.fusion.check(n, s.adds());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // C is its starting value (zero, bias, residual), or unchanged when accumulating
        if !s.adds() {
            s.fusion.write_start(s.c.ptr, s.c.rs, m, n);
        }
        return;
    }
    let (parallel, p) = (s.parallel, Problem { s });
    let threads = rayon::current_num_threads();
    let threads = if parallel && threads > 1 && m * k * n >= PARALLEL_MIN_MACS {
        threads
    } else {
        1
    };
    PACKED.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => p.run(&mut buf, threads),
        // a thread waiting on its own product may be handed another one by rayon; that one
        // packs into a buffer of its own
        Err(_) => p.run(&mut Vec::new(), threads),
    });
}

/// One depth block of one column block of B, packed: panel q of it at packed + q*kc*NR.
struct Block {
    packed: *mut f32,
    /// First column of C.
    jc: usize,
    /// Columns in the block.
    nb: usize,
    /// First depth.
    pc: usize,
    /// Depths in the block.
    kc: usize,
    /// C starts from its starting value (the first depth block, not accumulating).
    init: bool,
}

impl Block {
    /// Panels a tile row walks before the next six rows of A: one when the block is shallow
    /// enough for a panel (kc x 64 floats) to stay in L1, else an L2 sub-block.
    fn walk(&self) -> usize {
        if self.kc <= SHALLOW {
            1
        } else {
            NB_PANELS
        }
    }
}

impl Problem<'_> {
    fn run(&self, buf: &mut Vec<f32>, threads: usize) {
        let (m, k, n) = (self.s.dims.m, self.s.dims.k, self.s.dims.n);
        let depth_blocks = k.div_ceil(KC);
        let kstep = k.div_ceil(depth_blocks);
        let ncols = n.min(NC).div_ceil(NR) * NR;
        if buf.len() < kstep * ncols + ALIGN {
            // the largest block there can be, so the buffer is sized once
            buf.resize(KC * NC + ALIGN, 0.0);
        }
        // panels start on a cache line, so no load of B straddles two
        let start = buf.as_ptr().align_offset(64).min(ALIGN);
        let packed = SendPtr(buf[start..].as_mut_ptr());
        let row_tiles = m.div_ceil(MR);
        for jc in (0..n).step_by(NC) {
            let nb = (n - jc).min(NC);
            let panels = nb.div_ceil(NR);
            // by panels when the columns divide evenly between the threads (or there are
            // few rows)
            let even = panels % threads == 0 && nb % NR == 0;
            // (a copied A goes by rows, so no row is copied twice)
            let few_rows = row_tiles < 2 * threads;
            let by_panels = threads > 1
                && panels >= threads
                && (few_rows || (self.s.a.cs == 1 && (even || panels >= 4 * threads)));
            // when the whole column block of B fits the buffer, every depth block is packed
            // in one parallel pass (depth block pc at pc * panels * NR) and computed in
            // another, instead of two passes per depth block: small products are dominated
            // by those waits
            let whole = k * panels * NR + ALIGN <= buf.len();
            let block = |pc: usize| Block {
                packed: packed
                    .get()
                    .wrapping_add(if whole { pc * panels * NR } else { 0 }),
                jc,
                nb,
                pc,
                kc: (k - pc).min(kstep),
                init: pc == 0 && !self.s.adds(),
            };
            // Safety (both): panels q0..q1 of a depth block's part of the buffer, and rows
            // r0..r1 x panels q0..q1 of C, belong to the caller alone; a block's panels are
            // packed before they are computed with.
            let pack = |pc: usize, q0: usize, q1: usize| unsafe { self.pack_b(&block(pc), q0, q1) };
            let compute = |pc: usize, r0: usize, r1: usize, q0: usize, q1: usize| unsafe {
                self.compute(&block(pc), r0, r1, q0, q1)
            };
            let panels_of = |t: usize| (panels * t / threads, panels * (t + 1) / threads);
            let rows_of = |t: usize| {
                let r0 = (row_tiles * t / threads * MR).min(m);
                (r0, (row_tiles * (t + 1) / threads * MR).min(m))
            };
            // the depth blocks in groups that run between two waits: all of them at once
            // when they fit the buffer together, else one at a time
            let group = if whole { k } else { kstep };
            for g in (0..k).step_by(group) {
                let depths = || (g..(g + group).min(k)).step_by(kstep);
                if threads == 1 {
                    for pc in depths() {
                        pack(pc, 0, panels);
                        compute(pc, 0, m, 0, panels);
                    }
                } else if by_panels {
                    (0..threads).into_par_iter().for_each(|t| {
                        let (q0, q1) = panels_of(t);
                        for pc in depths() {
                            pack(pc, q0, q1);
                            compute(pc, 0, m, q0, q1);
                        }
                    });
                } else {
                    (0..threads).into_par_iter().for_each(|t| {
                        let (q0, q1) = panels_of(t);
                        depths().for_each(|pc| pack(pc, q0, q1));
                    });
                    (0..threads).into_par_iter().for_each(|t| {
                        let (r0, r1) = rows_of(t);
                        depths().for_each(|pc| compute(pc, r0, r1, 0, panels));
                    });
                }
            }
        }
    }

    /// Packs panels q0..q1 of B's block (depths pc..pc+kc, columns jc..jc+nb): panel q at
    /// q*kc*NR, [depth][NR], zero past column nb. Adds the block's column sums into
    /// col_sums when asked.
    unsafe fn pack_b(&self, blk: &Block, q0: usize, q1: usize) {
        let b = self.s.b.ptr;
        let kc = blk.kc;
        for q in q0..q1 {
            let j0 = q * NR;
            let cols = (blk.nb - j0).min(NR);
            let dst = blk.packed.add(q * kc * NR);
            let src = b.add(blk.pc * self.s.b.rs + (blk.jc + j0) * self.s.b.cs);
            let sums = self.s.fusion.col_sums.map(|s| s.add(blk.jc + j0));
            if self.s.b.cs == 1 {
                pack_rows(dst, src, self.s.b.rs, kc, cols, sums);
            } else if self.s.b.rs == 1 {
                pack_columns(dst, src, self.s.b.cs, kc, cols, sums);
            } else {
                for p in 0..kc {
                    for j in 0..NR {
                        *dst.add(p * NR + j) = if j < cols {
                            *src.add(p * self.s.b.rs + j * self.s.b.cs)
                        } else {
                            0.0
                        };
                    }
                }
                if let Some(s) = sums {
                    for j in 0..cols {
                        let mut acc = 0.0;
                        for p in 0..kc {
                            acc += *src.add(p * self.s.b.rs + j * self.s.b.cs);
                        }
                        *s.add(j) += acc;
                    }
                }
            }
        }
    }

    /// Rows r0..r1 x panels q0..q1 of C's part of the block.
    unsafe fn compute(&self, blk: &Block, r0: usize, r1: usize, q0: usize, q1: usize) {
        if self.s.a.cs != 1 {
            // A is not contiguous along the depth (each depth of a transposed A is another
            // line, often another page): its rows are copied, MC at a time, into micro-panels
            // [depth][MR], read from there by every panel
            return ROWS.with(|cell| {
                // (a nested product on this thread copies into a buffer of its own)
                let (mut own, mut shared) = (Vec::new(), cell.try_borrow_mut());
                let buf = shared.as_deref_mut().unwrap_or(&mut own);
                self.compute_copied(buf, blk, r0..r1, q0..q1)
            });
        }
        let a = (self.s.a.ptr).add(blk.pc * self.s.a.cs);
        let walk = blk.walk();
        for qb in (q0..q1).step_by(walk) {
            let qe = (qb + walk).min(q1);
            for i in (r0..r1).step_by(MR) {
                let rows = (r1 - i).min(MR);
                let ai = a.add(i * self.s.a.rs);
                self.row_tiles(blk, i..i + rows, (ai, self.s.a.rs, self.s.a.cs), qb..qe);
            }
        }
    }

    /// [`Self::compute`] with A's rows copied into `buf`, MC rows at a time.
    unsafe fn compute_copied(
        &self,
        buf: &mut Vec<f32>,
        blk: &Block,
        rows: Range<usize>,
        panels: Range<usize>,
    ) {
        let (Range { start: r0, end: r1 }, Range { start: q0, end: q1 }) = (rows, panels);
        if buf.len() < MC * KC {
            buf.resize(MC * KC, 0.0);
        }
        let (a, kc) = ((self.s.a.ptr).add(blk.pc * self.s.a.cs), blk.kc);
        let walk = blk.walk();
        for ic in (r0..r1).step_by(MC) {
            let ie = (ic + MC).min(r1);
            let rows_ic = a.add(ic * self.s.a.rs);
            copy_rows(buf, rows_ic, self.s.a.rs, self.s.a.cs, ie - ic, kc);
            for qb in (q0..q1).step_by(walk) {
                let qe = (qb + walk).min(q1);
                for i in (ic..ie).step_by(MR) {
                    let rows = (ie - i).min(MR);
                    let ai = buf.as_ptr().add((i - ic) / MR * kc * MR);
                    self.row_tiles(blk, i..i + rows, (ai, 1, MR), qb..qe);
                }
            }
        }
    }

    /// The tiles of rows i..i+rows against panels qb..qe; A's rows at `a` = (pointer to row
    /// i at the block's first depth, row stride, depth stride).
    unsafe fn row_tiles(
        &self,
        blk: &Block,
        rows: Range<usize>,
        a: (*const f32, usize, usize),
        panels: Range<usize>,
    ) {
        let (i, rows, qb, qe) = (rows.start, rows.len(), panels.start, panels.end);
        let f = &self.s.fusion;
        for q in qb..qe {
            let j = blk.jc + q * NR;
            let cols = (blk.nb - q * NR).min(NR);
            let t = Tile {
                kc: blk.kc,
                a: a.0,
                a_rs: a.1,
                a_cs: a.2,
                b: blk.packed.add(q * blk.kc * NR),
                c: self.s.c.ptr.add(i * self.s.c.rs + j),
                c_rs: self.s.c.rs,
                rows,
                cols,
                store: Store::at(f, blk.init, i, j),
            };
            match cols.div_ceil(16) {
                1 => tile::<1>(&t),
                2 => tile::<2>(&t),
                3 => tile::<3>(&t),
                _ => tile::<4>(&t),
            }
        }
    }
}

/// `rows` rows x kc depths of A (row r, depth p at a + r*a_rs + p*a_cs) into micro-panels
/// of MR rows, [depth][MR] each, one after another in dst (rows past the end are zero).
///
/// # Safety
/// Every value named is readable; dst holds rows.div_ceil(MR) * kc * MR floats.
unsafe fn copy_rows(
    dst: &mut [f32],
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    rows: usize,
    kc: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if a_rs == 1 && available() {
        return copy_rows_avx512(dst, a, a_cs, rows, kc);
    }
    for t in 0..rows.div_ceil(MR) {
        let panel = &mut dst[t * kc * MR..(t + 1) * kc * MR];
        for (p, out) in panel.chunks_exact_mut(MR).enumerate() {
            for (r, o) in out.iter_mut().enumerate() {
                let row = t * MR + r;
                *o = if row < rows {
                    *a.add(row * a_rs + p * a_cs)
                } else {
                    0.0
                };
            }
        }
    }
}

/// [`copy_rows`] when A's rows are adjacent at each depth (A stored [k, m]): each depth's
/// `rows` values are read in one sweep and split between the micro-panels.
///
/// # Safety
/// AVX-512; as [`copy_rows`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn copy_rows_avx512(dst: &mut [f32], a: *const f32, a_cs: usize, rows: usize, kc: usize) {
    use std::arch::x86_64::*;
    let panels = rows.div_ceil(MR);
    assert!(dst.len() >= panels * kc * MR);
    let out = dst.as_mut_ptr();
    let store = mask16(MR);
    for p in 0..kc {
        let src = a.add(p * a_cs);
        for t in 0..panels {
            let v = _mm512_maskz_loadu_ps(mask16(rows - t * MR), src.add(t * MR));
            _mm512_mask_storeu_ps(out.add((t * kc + p) * MR), store, v);
        }
    }
}

/// One register tile: rows x cols (at most MR x NR) of C over kc depths, A read in place,
/// B from a packed panel.
struct Tile {
    kc: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    c: *mut f32,
    c_rs: usize,
    rows: usize,
    cols: usize,
    store: Store,
}

/// The tile with V column vectors (16 columns each; V = 4 is the full 64). Rows past `rows`
/// repeat row 0 (so no read leaves A) and are not stored.
///
/// # Safety
/// The CPU has AVX-512 F and BW; A's rows, B's panel and C's tile are as [`Tile`] says.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile<const V: usize>(t: &Tile) {
    use std::arch::x86_64::*;
    let z = _mm512_setzero_ps();
    let mut acc = [[z; V]; MR];
    let mut ar = [t.a; MR];
    for (r, p) in ar.iter_mut().enumerate().take(t.rows) {
        *p = t.a.add(r * t.a_rs);
    }
    let a_cs = t.a_cs;
    t.store.prefetch(t.c, t.c_rs, t.rows, t.cols);
    for p in 0..t.kc {
        let mut bv = [z; V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(t.b.add(p * NR + 16 * v));
        }
        for (acc_r, ap) in acc.iter_mut().zip(&ar) {
            let av = _mm512_set1_ps(*ap.add(p * a_cs));
            for (o, &x) in acc_r.iter_mut().zip(&bv) {
                *o = _mm512_fmadd_ps(av, x, *o);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate().take(t.rows) {
        let row = t.c.add(r * t.c_rs);
        for (v, &x) in acc_r.iter().enumerate() {
            let mask = mask16(t.cols.saturating_sub(16 * v));
            let at = 16 * v;
            let out = match t.store {
                Store::Add => _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, row.add(at))),
                Store::Init(bias, (res, rs)) => {
                    let mut y = x;
                    if !bias.is_null() {
                        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, bias.add(at)));
                    }
                    if !res.is_null() {
                        let rr = res.add(r * rs + at);
                        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, rr));
                    }
                    y
                }
            };
            _mm512_mask_storeu_ps(row.add(at), mask, out);
        }
    }
}

/// A panel from rows of B that are contiguous along the columns (B row-major): kc rows of
/// `cols` floats at src + p*rs. Column sums (in depth order) go into sums when asked.
///
/// # Safety
/// AVX-512; the block is readable, dst has kc*NR writable floats, sums `cols` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_rows(
    dst: *mut f32,
    src: *const f32,
    rs: usize,
    kc: usize,
    cols: usize,
    sums: Option<*mut f32>,
) {
    use std::arch::x86_64::*;
    let masks = [0, 1, 2, 3].map(|v| mask16(cols.saturating_sub(16 * v)));
    let mut acc = [_mm512_setzero_ps(); 4];
    for p in 0..kc {
        let row = src.add(p * rs);
        for v in 0..4 {
            let x = _mm512_maskz_loadu_ps(masks[v], row.add(16 * v));
            acc[v] = _mm512_add_ps(acc[v], x);
            _mm512_storeu_ps(dst.add(p * NR + 16 * v), x);
        }
    }
    if let Some(s) = sums {
        for (v, &x) in acc.iter().enumerate() {
            let at = s.add(16 * v);
            let old = _mm512_maskz_loadu_ps(masks[v], at);
            _mm512_mask_storeu_ps(at, masks[v], _mm512_add_ps(old, x));
        }
    }
}

/// A panel from columns of B that are contiguous along the depth (B stored [n, k]): `cols`
/// lines of kc floats at src + j*cs, transposed 16 x 16 at a time in registers. Column sums
/// (in depth order) go into sums when asked.
///
/// # Safety
/// AVX-512; the block is readable, dst has kc*NR writable floats, sums `cols` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_columns(
    dst: *mut f32,
    src: *const f32,
    cs: usize,
    kc: usize,
    cols: usize,
    sums: Option<*mut f32>,
) {
    use std::arch::x86_64::*;
    for l0 in (0..NR).step_by(16) {
        let lines = cols.saturating_sub(l0).min(16);
        let mut p0 = 0;
        while p0 < kc {
            let m = mask16(kc - p0);
            let mut rows = [_mm512_setzero_si512(); 16];
            for (l, row) in rows.iter_mut().enumerate().take(lines) {
                *row = _mm512_maskz_loadu_epi32(m, src.add((l0 + l) * cs + p0) as *const _);
            }
            let t = transpose16(rows);
            for (d, col) in t.iter().enumerate().take((kc - p0).min(16)) {
                _mm512_storeu_si512(dst.add((p0 + d) * NR + l0) as *mut _, *col);
            }
            p0 += 16;
        }
    }
    if let Some(s) = sums {
        for j in 0..cols {
            let line = std::slice::from_raw_parts(src.add(j * cs), kc);
            *s.add(j) += line.iter().fold(0.0, |acc, &x| acc + x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;
    use crate::rng::Rng;

    /// Every tile width and row remainder, every transpose, several depth and column blocks,
    /// both thread splits, strided views, accumulation, and the fused starting values and
    /// column sums, against float64. C starts as NaN, so any output the kernel skips shows.
    #[test]
    fn agrees_with_float64() {
        if !available() {
            eprintln!("no AVX-512: sgemm not tested on this CPU");
            return;
        }
        let mut rng = Rng::new(5);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 3, 17),
            (13, 31, 33),
            (6, 64, 64),
            (61, 515, 70),
            (40, 1100, 200),
            (130, 37, 1601),
            (300, 24, 130),
            (20, 1100, 800),
        ] {
            for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
                for way in 0..4 {
                    // 0: plain; 1: accumulate; 2: bias + residual + sums; 3: strided views
                    let pad = if way == 3 { 3 } else { 0 };
                    let (ak, bk) = (k + pad, n + pad);
                    let a = randn(&mut rng, m.max(k) * (m.max(k) + pad), 1.0);
                    let b = randn(&mut rng, k.max(n) * (k.max(n) + pad), 1.0);
                    let (a_rs, a_cs) = if ta { (1, m + pad) } else { (ak, 1) };
                    let (b_rs, b_cs) = if tb { (1, k + pad) } else { (bk, 1) };
                    let c_rs = n + pad;
                    let c0 = randn(&mut rng, m * c_rs, 1.0);
                    let bias = randn(&mut rng, n, 1.0);
                    let res = randn(&mut rng, m * n, 1.0);
                    let sums0 = randn(&mut rng, n, 1.0);
                    let mut want = vec![0.0f64; m * n];
                    let mut want_sums = to_f64(&sums0);
                    for i in 0..m {
                        for j in 0..n {
                            let mut s = match way {
                                1 => c0[i * c_rs + j] as f64,
                                2 => bias[j] as f64 + res[i * n + j] as f64,
                                _ => 0.0,
                            };
                            for p in 0..k {
                                s += a[i * a_rs + p * a_cs] as f64 * b[p * b_rs + j * b_cs] as f64;
                            }
                            want[i * n + j] = s;
                        }
                    }
                    for (j, s) in want_sums.iter_mut().enumerate() {
                        for p in 0..k {
                            *s += b[p * b_rs + j * b_cs] as f64;
                        }
                    }
                    for parallel in [false, true] {
                        let mut c = if way == 1 {
                            c0.clone()
                        } else {
                            vec![f32::NAN; m * c_rs]
                        };
                        let mut sums = sums0.clone();
                        let fusion = if way == 2 {
                            Fusion {
                                bias: Some(&bias),
                                residual: Some((res.as_ptr(), n)),
                                col_sums: Some(sums.as_mut_ptr()),
                            }
                        } else {
                            Fusion::default()
                        };
                        // Safety: the strides stay inside the buffers (sized for the padding).
                        pool.install(|| unsafe {
                            let views = (
                                ViewMut::new(c.as_mut_ptr(), c_rs),
                                View::new(a.as_ptr(), a_rs, a_cs),
                                View::new(b.as_ptr(), b_rs, b_cs),
                            );
                            let acc = Accumulate::from(way == 1);
                            let s =
                                Strided::new(Dims::new(m, k, n), views.0, views.1, views.2, acc);
                            matmul_fused(Strided {
                                parallel,
                                fusion,
                                ..s
                            })
                        });
                        let got: Vec<f32> = (0..m * n).map(|x| c[x / n * c_rs + x % n]).collect();
                        let what = format!("{m}x{k}x{n} ta={ta} tb={tb} way={way} par={parallel}");
                        let err = max_rel_err(&got, &want, 1.0);
                        assert!(err < 1e-5, "{what}: {err}");
                        if way == 2 {
                            assert!(max_rel_err(&sums, &want_sums, 1.0) < 1e-5, "{what}: sums");
                        }
                        if way == 3 {
                            // the padding columns of C are not touched
                            for i in 0..m {
                                for j in n..c_rs {
                                    assert!(c[i * c_rs + j].is_nan(), "{what}: wrote padding");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// k = 0: C becomes its starting value (or stays, when accumulating).
    #[test]
    fn empty_depth_gives_the_starting_value() {
        if !available() {
            return;
        }
        let bias = [1.0f32, 2.0, 3.0];
        let res = [10.0f32, 20.0, 30.0, 40.0, 50.0, 60.0];
        let mut c = [f32::NAN; 6];
        let f = Fusion {
            bias: Some(&bias),
            residual: Some((res.as_ptr(), 3)),
            col_sums: None,
        };
        // Safety: k = 0 reads nothing from A or B; C has 2 x 3 elements.
        unsafe {
            matmul_fused(Strided {
                dims: Dims { m: 2, k: 0, n: 3 },
                c: ViewMut {
                    ptr: c.as_mut_ptr(),
                    rs: 3,
                },
                a: View {
                    ptr: std::ptr::null(),
                    rs: 0,
                    cs: 1,
                },
                b: View {
                    ptr: std::ptr::null(),
                    rs: 3,
                    cs: 1,
                },
                accumulate: Accumulate::Overwrite,
                parallel: false,
                fusion: f,
            })
        };
        assert_eq!(c, [11.0, 22.0, 33.0, 41.0, 52.0, 63.0]);
    }
}

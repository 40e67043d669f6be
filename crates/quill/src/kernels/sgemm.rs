//! f32 matrix multiply on AVX-512 or AVX2 + FMA: C (+)= op(A) · op(B), row-major C, A and B
//! through any strides, f32 accumulation. The training step's linear layers and inference
//! prompts run on it (CPUs without AVX2 use the `gemm` crate's plain path instead, see
//! [`super::matmul`]).
//!
//! Blocking (BLIS-style, shaped after the measurements in BENCHMARKS.md):
//! - C's columns go in blocks of NC; the depth in even blocks of at most KC.
//! - For each (column block, depth block), B's block is packed into panels of NR = 64
//!   columns, [depth][64] each (zero past the last column), split between the threads.
//! - A is never packed: the register tile (MR = 6 rows x 64 columns, 24 zmm accumulators)
//!   broadcasts A's six values of each depth straight from A's rows, whatever its strides,
//!   so the six rows (6 x KC floats, 12 KB) sit in L1 while the tile walks a sub-block of
//!   B's panels (KC x NB floats) that sits in L2.
//! - With AVX2 (16 ymm registers) the tile is 6 x 16 (12 ymm accumulators, two loads of B
//!   and a broadcast of A per depth) and B's panels are 16 columns wide, [depth][16]. The
//!   loops turn around: each panel stays in L1 while blocks of MC_AVX2 rows of A (in L2)
//!   pass by six at a time. (A's rows kept in L1 while B's panels streamed from L2, as on
//!   AVX-512, measured 7% slower than the `gemm` crate on Zen 3; so did 16-column strips of
//!   the 64-column panels, whose lines fall in a quarter of L1's sets.)
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
use super::product::{Dims, Half, Store, Strided};
use super::simd::{mask16, transpose16};
#[cfg(target_arch = "x86_64")]
use super::simd::{mask8, transpose8};
use super::SendPtr;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;

/// Rows of the register tile.
pub const MR: usize = 6;
/// Columns of the register tile (four zmm of f32).
pub const NR: usize = 64;
/// Columns of the AVX2 register tile (two ymm of f32).
const NR_AVX2: usize = 16;
/// Most depths per block (a tile's six rows of A, 12 KB, stay in L1).
const KC: usize = 512;
/// Most depths per block on the AVX2 body. Deeper blocks mean fewer passes over C (a block's
/// tiles load and store C again): on an AMD EPYC Zen 3 the training shapes ran faster with
/// 512 than with 256 or 384, and 640 keeps depths such as 576 (SmolLM2's width) in one block,
/// which took the 1024 x 576 x 49152 logits product from 0.9x the `gemm` crate's speed to
/// parity. A panel is then 40 KB, a little more than L1, and is read from L2 when it spills.
const KC_AVX2: usize = 640;
/// Columns of B per packed block (a multiple of NR; KC x NC floats, 3 MB).
const NC: usize = 1536;
/// Rows of A copied at a time when A is not contiguous along the depth (a multiple of MR).
const MC: usize = 96;
/// Rows of A per block on the AVX2 body (at most MC_AVX2 x KC_AVX2 floats, 360 KB, stay in
/// L2; 96 and 240 measured no different on Zen 3).
const MC_AVX2: usize = 144;
/// Panels per L2 sub-block (KC x 384 floats, 768 KB) for the tile rows to walk.
const NB_PANELS: usize = 6;
/// Depth blocks up to this deep walk one panel at a time instead (its KC x 64 floats, 32 KB,
/// stay in L1 while every six rows of A pass by).
const SHALLOW: usize = 128;
/// Floats kept spare in the packing buffer to start it on a cache line.
const ALIGN: usize = 16;

/// Problems smaller than this many multiply-adds run on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// Whether this CPU runs [`matmul_fused`] (AVX-512 F and BW, or AVX2 and FMA; not turned off
/// by `QUILL_SIMD=scalar`).
pub fn available() -> bool {
    super::simd::has_avx512() || super::simd::has_avx2()
}

/// Which register tile computes: AVX-512's 6 x 64, or AVX2's 6 x 16.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Body {
    Avx512,
    Avx2,
}

impl Body {
    /// The widest this CPU has (and `QUILL_SIMD` allows); needs [`available`].
    fn detect() -> Body {
        match super::simd::has_avx512() {
            true => Body::Avx512,
            false => Body::Avx2,
        }
    }

    /// Columns of a packed panel of B: the register tile's width. (AVX2's 16-column panels,
    /// [depth][16], are contiguous: as a quarter of a 64-column panel, at a stride of 64
    /// floats, a panel's lines would fall in a quarter of L1's sets and not stay there.)
    fn nr(self) -> usize {
        match self {
            Body::Avx512 => NR,
            Body::Avx2 => NR_AVX2,
        }
    }

    /// Most depths per block.
    fn kc(self) -> usize {
        match self {
            Body::Avx512 => KC,
            Body::Avx2 => KC_AVX2,
        }
    }
}

thread_local! {
    /// B's packed block, owned by the thread that called the product.
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A's rows copied into micro-panels (when A is not contiguous along the depth), per
    /// computing thread.
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A panel's columns of a half-precision B widened to f32 ([depth] per column) before
    /// they are packed, per packing thread.
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The problem, with raw pointers as addresses so the closures that split it are Send.
struct Problem<'a> {
    s: Strided<'a>,
    body: Body,
}

/// One strided product ([`Strided`]) with its fused work (`Fusion::default()` for none). With `parallel`, the work is split between the threads of the
/// current rayon pool when the product is large enough. Needs [`available`].
///
/// # Safety
/// [`available`] is true; every element reached through the strides lies inside live
/// allocations, and nobody else touches `c`'s elements during the call; the residual has m
/// rows of n readable elements, col_sums n writable ones, and bias n elements.
pub unsafe fn matmul_fused(s: Strided) {
    assert!(available(), "sgemm needs AVX-512 or AVX2");
    let Dims { m, k, n } = s.dims;
    s.fusion.check(n, s.adds());
    assert!(
        s.fusion.b_half.is_none() || s.b.rs == 1,
        "a half-precision B is read along its depths"
    );
    assert!(!s.fusion.a_bf16, "sgemm reads A in f32");
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
    let body = Body::detect();
    let (parallel, p) = (s.parallel, Problem { s, body });
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

/// One depth block of one column block of B, packed: panel q of it at packed + q*kc*nr.
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
        let depth_blocks = k.div_ceil(self.body.kc());
        let kstep = k.div_ceil(depth_blocks);
        let nr = self.body.nr();
        let ncols = n.min(NC).div_ceil(nr) * nr;
        if buf.len() < kstep * ncols + ALIGN {
            // the largest block there can be, so the buffer is sized once
            buf.resize(self.body.kc() * NC + ALIGN, 0.0);
        }
        // panels start on a cache line, so no load of B straddles two
        let start = buf.as_ptr().align_offset(64).min(ALIGN);
        let packed = SendPtr(buf[start..].as_mut_ptr());
        let row_tiles = m.div_ceil(MR);
        for jc in (0..n).step_by(NC) {
            let nb = (n - jc).min(NC);
            let panels = nb.div_ceil(nr);
            // by panels when the columns divide evenly between the threads (or there are
            // few rows)
            let even = panels % threads == 0 && nb % nr == 0;
            // (a copied A goes by rows, so no row is copied twice)
            let few_rows = row_tiles < 2 * threads;
            let by_panels = threads > 1
                && panels >= threads
                && (few_rows || (!self.copies_a() && (even || panels >= 4 * threads)));
            // when the whole column block of B fits the buffer, every depth block is packed
            // in one parallel pass (depth block pc at pc * panels * nr) and computed in
            // another, instead of two passes per depth block: small products are dominated
            // by those waits
            let whole = k * panels * nr + ALIGN <= buf.len();
            let block = |pc: usize| Block {
                packed: packed
                    .get()
                    .wrapping_add(if whole { pc * panels * nr } else { 0 }),
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
    /// q*kc*nr, [depth][nr], zero past column nb. Adds the block's column sums into
    /// col_sums when asked, then rounds the panel to bf16 when asked (`round_b`). Half
    /// precision B (`b_half`) is widened a panel's columns at a time into this thread's
    /// [`WIDE`] buffer and packed from there.
    unsafe fn pack_b(&self, blk: &Block, q0: usize, q1: usize) {
        let b = self.s.b.ptr;
        let kc = blk.kc;
        let nr = self.body.nr();
        for q in q0..q1 {
            let j0 = q * nr;
            let cols = (blk.nb - j0).min(nr);
            let dst = blk.packed.add(q * kc * nr);
            let offset = blk.pc * self.s.b.rs + (blk.jc + j0) * self.s.b.cs;
            let sums = self.s.fusion.col_sums.map(|s| s.add(blk.jc + j0));
            let (rs, cs, avx512) = (self.s.b.rs, self.s.b.cs, self.body == Body::Avx512);
            if let Some(kind) = self.s.fusion.b_half {
                WIDE.with(|cell| {
                    // (nothing runs on this thread while it is borrowed)
                    let mut wide = cell.borrow_mut();
                    if wide.len() < nr * kc {
                        wide.resize(nr * self.body.kc(), 0.0);
                    }
                    let src = (b as *const u16).add(offset);
                    for (j, line) in wide.chunks_exact_mut(kc).take(cols).enumerate() {
                        let col = std::slice::from_raw_parts(src.add(j * cs), kc);
                        match kind {
                            Half::Bf16 => super::bf16::widen_bf16(line, col),
                            Half::F16 => super::bf16::widen_f16(line, col),
                        }
                    }
                    let (w, avx2) = (wide.as_ptr(), !avx512);
                    match avx2 {
                        true => pack_columns_avx2(dst, w, kc, kc, cols, sums),
                        false => pack_columns(dst, w, kc, kc, cols, sums),
                    }
                });
                if self.s.fusion.round_b {
                    super::bf16::round_in_place(std::slice::from_raw_parts_mut(dst, kc * nr));
                }
                continue;
            }
            let src = b.add(offset);
            if cs == 1 && avx512 {
                pack_rows(dst, src, rs, kc, cols, sums);
            } else if cs == 1 {
                pack_rows_avx2(dst, src, rs, kc, cols, sums);
            } else if rs == 1 && avx512 {
                pack_columns(dst, src, cs, kc, cols, sums);
            } else if rs == 1 {
                pack_columns_avx2(dst, src, cs, kc, cols, sums);
            } else {
                for p in 0..kc {
                    for j in 0..nr {
                        *dst.add(p * nr + j) = if j < cols {
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
            if self.s.fusion.round_b {
                // the panel just written, still in L1
                super::bf16::round_in_place(std::slice::from_raw_parts_mut(dst, kc * nr));
            }
        }
    }

    /// Whether A's rows are copied before the tiles read them: when A is not contiguous along
    /// the depth, or is to be rounded to bf16.
    fn copies_a(&self) -> bool {
        self.s.a.cs != 1 || self.s.fusion.round_a
    }

    /// Rows r0..r1 x panels q0..q1 of C's part of the block.
    unsafe fn compute(&self, blk: &Block, r0: usize, r1: usize, q0: usize, q1: usize) {
        if self.copies_a() {
            // A is not contiguous along the depth (each depth of a transposed A is another
            // line, often another page), or is rounded to bf16: its rows are copied, MC at a
            // time, into this thread's buffer, read from there by every panel
            return ROWS.with(|cell| {
                // (a nested product on this thread copies into a buffer of its own)
                let (mut own, mut shared) = (Vec::new(), cell.try_borrow_mut());
                let buf = shared.as_deref_mut().unwrap_or(&mut own);
                self.compute_copied(buf, blk, r0..r1, q0..q1)
            });
        }
        let a = (self.s.a.ptr).add(blk.pc * self.s.a.cs);
        if self.body == Body::Avx2 {
            let (a_rs, a_cs) = (self.s.a.rs, self.s.a.cs);
            for ic in (r0..r1).step_by(MC_AVX2) {
                let ie = (ic + MC_AVX2).min(r1);
                self.panels_avx2(blk, ic..ie, |i| (a.add(i * a_rs), a_rs, a_cs), q0..q1);
            }
            return;
        }
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

    /// [`Self::compute`] with A's rows copied into `buf`, MC rows at a time: into micro-panels
    /// [depth][MR] when A is not contiguous along the depth, else row by row as they are
    /// ([rows][kc]); rounded to bf16 with `round_a`.
    unsafe fn compute_copied(
        &self,
        buf: &mut Vec<f32>,
        blk: &Block,
        rows: Range<usize>,
        panels: Range<usize>,
    ) {
        let (Range { start: r0, end: r1 }, Range { start: q0, end: q1 }) = (rows, panels);
        if buf.len() < MC * self.body.kc() + 2 {
            // (two floats spare for copy_rows_avx2's last store)
            buf.resize(MC * self.body.kc() + 2, 0.0);
        }
        let (a, kc) = ((self.s.a.ptr).add(blk.pc * self.s.a.cs), blk.kc);
        let walk = blk.walk();
        let (rs, cs) = (self.s.a.rs, self.s.a.cs);
        for ic in (r0..r1).step_by(MC) {
            let ie = (ic + MC).min(r1);
            let rows_ic = a.add(ic * rs);
            // where row i of the copy starts: (pointer, row stride, depth stride)
            let at: &dyn Fn(usize) -> (*const f32, usize, usize) = if cs == 1 {
                for (r, dst) in buf.chunks_exact_mut(kc).take(ie - ic).enumerate() {
                    let src = std::slice::from_raw_parts(rows_ic.add(r * rs), kc);
                    // (only round_a brings a contiguous A here)
                    super::bf16::round_row(dst, src);
                }
                &|i: usize| (buf.as_ptr().add((i - ic) * kc), kc, 1)
            } else {
                copy_rows(buf, rows_ic, rs, cs, ie - ic, kc);
                if self.s.fusion.round_a {
                    let len = (ie - ic).div_ceil(MR) * kc * MR;
                    super::bf16::round_in_place(&mut buf[..len]);
                }
                &|i: usize| (buf.as_ptr().add((i - ic) / MR * kc * MR), 1, MR)
            };
            if self.body == Body::Avx2 {
                self.panels_avx2(blk, ic..ie, at, q0..q1);
                continue;
            }
            for qb in (q0..q1).step_by(walk) {
                let qe = (qb + walk).min(q1);
                for i in (ic..ie).step_by(MR) {
                    let rows = (ie - i).min(MR);
                    self.row_tiles(blk, i..i + rows, at(i), qb..qe);
                }
            }
        }
    }

    /// The AVX2 body over rows x panels of the block: each panel (at most KC_AVX2 x 16
    /// floats, 40 KB; 32 KB at depth 512) stays in L1 (or close, in L2) while every six of
    /// the rows pass by (their A, at most MC_AVX2 x KC_AVX2 floats, in L2). `a(i)` is A's row i at the
    /// block's first depth: (pointer, row stride, depth stride).
    unsafe fn panels_avx2(
        &self,
        blk: &Block,
        rows: Range<usize>,
        a: impl Fn(usize) -> (*const f32, usize, usize),
        panels: Range<usize>,
    ) {
        let f = &self.s.fusion;
        for q in panels {
            let j = blk.jc + q * NR_AVX2;
            let cols = (blk.nb - q * NR_AVX2).min(NR_AVX2);
            for i in rows.clone().step_by(MR) {
                let (a, a_rs, a_cs) = a(i);
                let t = Tile {
                    kc: blk.kc,
                    a,
                    a_rs,
                    a_cs,
                    b: blk.packed.add(q * blk.kc * NR_AVX2),
                    c: self.s.c.ptr.add(i * self.s.c.rs + j),
                    c_rs: self.s.c.rs,
                    rows: (rows.end - i).min(MR),
                    cols,
                    store: Store::at(f, blk.init, i, j),
                };
                tile_avx2(&t);
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
    if a_rs == 1 && super::simd::has_avx512() {
        return copy_rows_avx512(dst, a, a_cs, rows, kc);
    }
    #[cfg(target_arch = "x86_64")]
    if a_rs == 1 && super::simd::has_avx2() {
        return copy_rows_avx2(dst, a, a_cs, rows, kc);
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

/// The tile on AVX2 + FMA: rows x cols (at most MR x 16) of C, 12 ymm accumulators, B's
/// panel [depth][16]. Rows past `rows` repeat row 0 (so no read leaves A) and are not
/// stored.
///
/// # Safety
/// The CPU has AVX2 and FMA; A's rows, B's panel and C's tile are as [`Tile`] says.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(t: &Tile) {
    use std::arch::x86_64::*;
    let z = _mm256_setzero_ps();
    let mut acc = [[z; 2]; MR];
    let mut ar = [t.a; MR];
    for (r, p) in ar.iter_mut().enumerate().take(t.rows) {
        *p = t.a.add(r * t.a_rs);
    }
    let (a_cs, b, c, cols) = (t.a_cs, t.b, t.c, t.cols);
    t.store.prefetch(c, t.c_rs, t.rows, cols);
    for p in 0..t.kc {
        let b0 = _mm256_loadu_ps(b.add(p * 16));
        let b1 = _mm256_loadu_ps(b.add(p * 16 + 8));
        for (acc_r, ap) in acc.iter_mut().zip(&ar) {
            let av = _mm256_broadcast_ss(&*ap.add(p * a_cs));
            acc_r[0] = _mm256_fmadd_ps(av, b0, acc_r[0]);
            acc_r[1] = _mm256_fmadd_ps(av, b1, acc_r[1]);
        }
    }
    let masks = [mask8(cols), mask8(cols.saturating_sub(8))];
    let load = |p: *const f32, v: usize| match cols {
        16 => _mm256_loadu_ps(p.add(8 * v)),
        _ => _mm256_maskload_ps(p.add(8 * v), masks[v]),
    };
    for (r, acc_r) in acc.iter().enumerate().take(t.rows) {
        let row = c.add(r * t.c_rs);
        for (v, &x) in acc_r.iter().enumerate() {
            let out = match t.store {
                Store::Add => _mm256_add_ps(x, load(row, v)),
                Store::Init(bias, (res, rs)) => {
                    let mut y = x;
                    if !bias.is_null() {
                        y = _mm256_add_ps(y, load(bias, v));
                    }
                    if !res.is_null() {
                        y = _mm256_add_ps(y, load(res.add(r * rs), v));
                    }
                    y
                }
            };
            match cols {
                16 => _mm256_storeu_ps(row.add(8 * v), out),
                _ => _mm256_maskstore_ps(row.add(8 * v), masks[v], out),
            }
        }
    }
}

/// [`pack_rows`] on AVX2, into a 16-column panel: kc rows of `cols` (at most 16) floats at
/// src + p*rs to dst [depth][16].
///
/// # Safety
/// AVX2; the block is readable, dst has kc*16 writable floats, sums `cols` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_rows_avx2(
    dst: *mut f32,
    src: *const f32,
    rs: usize,
    kc: usize,
    cols: usize,
    sums: Option<*mut f32>,
) {
    use std::arch::x86_64::*;
    let masks = [mask8(cols), mask8(cols.saturating_sub(8))];
    let mut acc = [_mm256_setzero_ps(); 2];
    for p in 0..kc {
        let row = src.add(p * rs);
        for v in 0..2 {
            let x = match cols {
                NR_AVX2 => _mm256_loadu_ps(row.add(8 * v)),
                _ => _mm256_maskload_ps(row.add(8 * v), masks[v]),
            };
            acc[v] = _mm256_add_ps(acc[v], x);
            _mm256_storeu_ps(dst.add(p * NR_AVX2 + 8 * v), x);
        }
    }
    if let Some(s) = sums {
        for (v, &x) in acc.iter().enumerate() {
            let at = s.add(8 * v);
            let old = _mm256_maskload_ps(at, masks[v]);
            _mm256_maskstore_ps(at, masks[v], _mm256_add_ps(old, x));
        }
    }
}

/// [`pack_columns`] on AVX2, into a 16-column panel [depth][16]: 8 x 8 transposes.
///
/// # Safety
/// AVX2; the block is readable, dst has kc*16 writable floats, sums `cols` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_columns_avx2(
    dst: *mut f32,
    src: *const f32,
    cs: usize,
    kc: usize,
    cols: usize,
    sums: Option<*mut f32>,
) {
    use std::arch::x86_64::*;
    for l0 in (0..NR_AVX2).step_by(8) {
        let lines = cols.saturating_sub(l0).min(8);
        let mut p0 = 0;
        while p0 < kc {
            let depths = (kc - p0).min(8);
            let m = mask8(depths);
            let mut rows = [_mm256_setzero_ps(); 8];
            for (l, row) in rows.iter_mut().enumerate().take(lines) {
                let at = src.add((l0 + l) * cs + p0);
                *row = match depths {
                    8 => _mm256_loadu_ps(at),
                    _ => _mm256_maskload_ps(at, m),
                };
            }
            let t = transpose8(rows);
            for (d, col) in t.iter().enumerate().take(depths) {
                _mm256_storeu_ps(dst.add((p0 + d) * NR_AVX2 + l0), *col);
            }
            p0 += 8;
        }
    }
    if let Some(s) = sums {
        line_sums(s, src, cs, kc, cols);
    }
}

/// sums[j] += the kc floats of line j at src + j*cs (in depth order), for j < cols: the
/// column sums of a B stored [n, k].
///
/// # Safety
/// The lines are readable, sums has `cols` writable floats.
unsafe fn line_sums(sums: *mut f32, src: *const f32, cs: usize, kc: usize, cols: usize) {
    for j in 0..cols {
        let line = std::slice::from_raw_parts(src.add(j * cs), kc);
        *sums.add(j) += line.iter().fold(0.0, |acc, &x| acc + x);
    }
}

/// [`copy_rows`] on AVX2 when A's rows are adjacent at each depth (A stored [k, m]). Each
/// depth's six values are stored as eight floats (masked stores are slow on AMD), so the
/// panels are written in order, each depth after the one before: the two extra floats land
/// where the next store goes, and past the last panel in `dst`'s spare end.
///
/// # Safety
/// AVX2; as [`copy_rows`], with two more floats in dst.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn copy_rows_avx2(dst: &mut [f32], a: *const f32, a_cs: usize, rows: usize, kc: usize) {
    use std::arch::x86_64::*;
    let panels = rows.div_ceil(MR);
    assert!(dst.len() >= panels * kc * MR + 2);
    let out = dst.as_mut_ptr();
    for t in 0..panels {
        let left = rows - t * MR;
        let (src, to, m) = (a.add(t * MR), out.add(t * kc * MR), mask8(left.min(MR)));
        for p in 0..kc {
            let v = match left >= 8 {
                true => _mm256_loadu_ps(src.add(p * a_cs)),
                false => _mm256_maskload_ps(src.add(p * a_cs), m),
            };
            // (the two floats past this depth's six are overwritten by the next depth's)
            _mm256_storeu_ps(to.add(p * MR), v);
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
        line_sums(s, src, cs, kc, cols);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;
    use crate::rng::Rng;

    /// Every tile width and row remainder, every transpose, several depth and column blocks,
    /// both thread splits, strided views, accumulation, and the fused starting values and
    /// column sums, and operands rounded to bf16 as they are copied (`round_a`, `round_b`, on
    /// strided views, the sums from B unrounded), against float64. C starts as NaN, so any
    /// output the kernel skips shows.
    #[test]
    fn agrees_with_float64() {
        if !available() {
            eprintln!("neither AVX-512 nor AVX2: sgemm not tested on this CPU");
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
                for way in 0..5 {
                    // 0: plain; 1: accumulate; 2: bias + residual + sums; 3: strided views;
                    // 4: strided views, both operands rounded to bf16, B's sums
                    let pad = if way >= 3 { 3 } else { 0 };
                    let q = |x: f32| match way {
                        4 => crate::kernels::bf16::bf16_to_f32(crate::kernels::bf16::round_bf16(x)),
                        _ => x,
                    };
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
                                s += q(a[i * a_rs + p * a_cs]) as f64
                                    * q(b[p * b_rs + j * b_cs]) as f64;
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
                        let fusion = match way {
                            2 => Fusion {
                                bias: Some(&bias),
                                residual: Some((res.as_ptr(), n)),
                                col_sums: Some(sums.as_mut_ptr()),
                                round_b: false,
                                round_a: false,
                                b_half: None,
                                a_bf16: false,
                            },
                            4 => Fusion {
                                col_sums: Some(sums.as_mut_ptr()),
                                round_b: true,
                                round_a: true,
                                ..Fusion::default()
                            },
                            _ => Fusion::default(),
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
                        if way == 2 || way == 4 {
                            assert!(max_rel_err(&sums, &want_sums, 1.0) < 1e-5, "{what}: sums");
                        }
                        if way >= 3 {
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
            round_b: false,
            round_a: false,
            b_half: None,
            a_bf16: false,
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

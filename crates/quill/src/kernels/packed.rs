//! Cache-blocked, packed matrix multiply with bf16 operands on AVX-512 BF16 (`vdpbf16ps`, see
//! [`super::bf16`]), accumulating and writing f32. C (+)= op(A) · op(B) with A, B and C f32 in
//! memory, any strides. (f32 products have their own kernel, [`super::sgemm`], shaped
//! differently: an f32 kind of this one measured 5-15% slower than the `gemm` crate.)
//!
//! Blocking (after BLIS-style libraries): C is split by rows or by columns, whichever side is
//! larger, between the threads (one part when serial). For each depth block of STEPS steps (a
//! step is a pair of k) the operand every part needs (B for a row split,
//! A for a column split) is packed whole, once, by all threads together, into NR-column (or
//! MR-row) panels; each part then packs its own share of the other operand in blocks of MC
//! rows (or NC columns) and runs a register tile of MR x NR f32 accumulators (24 zmm), one
//! instruction per 16 outputs per step. A packed element (step p, lane j) is one u32, the
//! bf16 pair (k = 2p in the low half, k = 2p + 1 in the high half) that `vdpbf16ps`
//! multiplies.
//! bf16 operands are rounded (to nearest even) while they are packed.
//! Work can ride along ([`Fusion`]): a starting value for C (bias, residual) goes into the tile
//! stores of the first depth block, and the column sums of B (a bias gradient) are taken while
//! B is packed, so neither costs a pass over memory.
//!
//! A may be bf16 already (`Fusion::a_bf16`: weights stored in half precision, as the A of
//! yᵀ = W·xᵀ): where its rows hold whole pairs and are the split side, the register tile
//! broadcasts its pairs straight from the weights and A is not packed at all; elsewhere its
//! pairs are copied into the panels as they are, with no f32 copy and no rounding.
//! Packing buffers are per thread and reused (the private ones sized at the first call, the
//! shared one grown to the largest block seen): once every shape has run, nothing allocates.
//! Without the CPU features (or with `QUILL_SIMD=scalar`) the same panels go through plain
//! loops; the tests check one path against the other and both against float64.

use super::bf16::{bf16_to_f32, has_bf16, round_bf16};
use super::product::{Dims, Store, Strided};
#[cfg(target_arch = "x86_64")]
use super::simd::{mask16, transpose16};
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of the register tile.
pub const MR: usize = 12;
/// Columns of the register tile (two zmm of f32).
pub const NR: usize = 32;
/// Depth steps per packed block: a B panel of STEPS x NR u32 (24 KB) stays in L1.
const STEPS: usize = 192;
/// Rows of A per packed block (a multiple of MR).
const MC: usize = 120;
/// Columns of B per packed block (a multiple of NR).
const NC: usize = 1536;

#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    round_bf16(lo) as u32 | (round_bf16(hi) as u32) << 16
}

/// Problems smaller than this many multiply-adds run on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// One strided product ([`Strided`]) with its fused work (`Fusion::default()` for none). With `parallel`, the output is split between the threads of the
/// current rayon pool when the product is large enough.
///
/// # Safety
/// Every element reached through the strides lies inside live allocations, and nobody else
/// touches `c`'s elements during the call; the residual has m rows of n readable elements,
/// col_sums n writable ones, and bias n elements.
pub unsafe fn matmul_fused(s: Strided) {
    let Dims { m, k, n } = s.dims;
    s.fusion.check(n, s.adds());
    assert!(
        !s.fusion.round_a && !s.fusion.round_b && s.fusion.b_half.is_none(),
        "the bf16 kernel rounds both f32 operands itself"
    );
    assert!(
        !s.fusion.a_bf16 || s.a.cs == 1,
        "a bf16 A is read along its depths"
    );
    let parallel = s.parallel;
    let p = Problem {
        s,
        native: has_bf16(),
    };
    let threads = rayon::current_num_threads();
    let parallel = parallel && threads > 1 && m * k * n >= PARALLEL_MIN_MACS;
    p.run(if parallel { threads } else { 1 });
}

/// Rows lo..hi of C (`split_m`) or columns lo..hi: one thread's part of a product.
#[derive(Clone, Copy)]
struct Part {
    lo: usize,
    hi: usize,
    split_m: bool,
}

/// One depth block: depths pc..pc + kc (kp steps of two), added into C unless it is the
/// first and the product overwrites.
#[derive(Clone, Copy)]
struct DepthBlock {
    pc: usize,
    kc: usize,
    kp: usize,
    add: bool,
}

struct Problem<'a> {
    s: Strided<'a>,
    /// Whether the CPU runs `vdpbf16ps` (else the plain kernel).
    native: bool,
}

/// A u32 pointer that threads may share (they write disjoint panels, or only read).
#[derive(Clone, Copy)]
struct SharedPanels(*mut u32);
unsafe impl Send for SharedPanels {}
unsafe impl Sync for SharedPanels {}

impl SharedPanels {
    /// The pointer (a method, so closures capture the whole Send wrapper).
    fn ptr(self) -> *mut u32 {
        self.0
    }
}

thread_local! {
    /// The operand that a parallel product shares between its threads, packed once (owned by
    /// the calling thread, grown to the largest block seen).
    static SHARED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// Packing buffers (A panels, B panels), grown once per thread and reused.
    static PACK: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl Problem<'_> {
    /// A's row stride in pairs where the tiles read A's bf16 pairs in place (the CPU runs
    /// `vdpbf16ps`, A is bf16 with contiguous depths, and every row holds whole pairs, so no
    /// pair straddles two rows and an odd last depth never occurs); None where A is packed.
    fn a_pairs_in_place(&self) -> Option<usize> {
        let s = &self.s;
        let whole_pairs = s.a.rs.is_multiple_of(2) && s.dims.k.is_multiple_of(2);
        (self.native && s.fusion.a_bf16 && s.a.cs == 1 && whole_pairs).then_some(s.a.rs / 2)
    }

    /// The whole product, on this thread alone (`threads` = 1) or split between `threads`
    /// threads. The larger side of C is split (whole register tiles per part); the other
    /// operand, which every part needs, is packed once per depth block (by all threads
    /// together) into a shared buffer, then each part packs its own share of the split
    /// operand and runs its tiles.
    fn run(&self, threads: usize) {
        let (m, n) = (self.s.dims.m, self.s.dims.n);
        if m == 0 || n == 0 {
            return;
        }
        if self.s.dims.k == 0 {
            if !self.s.adds() {
                // Safety: C has m rows of n elements at row stride c_rs.
                unsafe { self.s.fusion.write_start(self.s.c.ptr, self.s.c.rs, m, n) };
            }
            return;
        }
        SHARED.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => self.run_with(&mut buf, threads),
            // a thread waiting on its own parallel product may be handed another one by rayon;
            // that one packs into a buffer of its own
            Err(_) => self.run_with(&mut Vec::new(), threads),
        });
    }

    fn run_with(&self, buf: &mut Vec<u32>, threads: usize) {
        let (m, n) = (self.s.dims.m, self.s.dims.n);
        let split_m = m > n;
        let (lines, w, l_s, k_s, src) = if split_m {
            (n, NR, self.s.b.cs, self.s.b.rs, self.s.b.ptr as usize)
        } else {
            (m, MR, self.s.a.rs, self.s.a.cs, self.s.a.ptr as usize)
        };
        let half = !split_m && self.s.fusion.a_bf16;
        let (unit, len) = if split_m { (MR, m) } else { (NR, n) };
        let tiles = len.div_ceil(unit);
        let parts = threads.min(tiles).max(1);
        let panels = lines.div_ceil(w);
        if buf.len() < panels * w * STEPS {
            // at least one NC block's worth from the start, so that every product a thread
            // runs inside another's tasks (attention's, of varying sizes) fits at once: a
            // thread's first such product then sizes it for good
            buf.resize((panels * w).max(NC) * STEPS, 0);
        }
        let shared = SharedPanels(buf.as_mut_ptr());
        for pc in (0..self.s.dims.k).step_by(2 * STEPS) {
            let kc = (self.s.dims.k - pc).min(2 * STEPS);
            let kp = kc.div_ceil(2);
            // phase 1: the shared operand's panels, split between the parts
            let pack_shared = |t: usize| {
                let (q0, q1) = (panels * t / parts, panels * (t + 1) / parts);
                if q0 == q1 {
                    return;
                }
                let n_lines = (lines - q0 * w).min((q1 - q0) * w);
                // Safety: panels q0..q1 of the buffer are this part's alone; the source block
                // lies inside the operand.
                unsafe {
                    let dst = std::slice::from_raw_parts_mut(
                        shared.ptr().add(q0 * kp * w),
                        (q1 - q0) * kp * w,
                    );
                    let s = at(src as *const f32, q0 * w * l_s + pc * k_s, half);
                    let sums = match self.s.fusion.col_sums {
                        Some(p) if split_m => p.add(q0 * w),
                        _ => std::ptr::null_mut(),
                    };
                    pack(
                        dst,
                        Lines {
                            ptr: s,
                            l_s,
                            k_s,
                            lines: n_lines,
                            kc,
                            half,
                        },
                        w,
                        self.native,
                        sums,
                    );
                }
            };
            // phase 2: each part of C against the shared panels
            let add = self.s.adds() || pc > 0;
            let compute = |t: usize| {
                let lo = (tiles * t / parts * unit).min(len);
                let hi = (tiles * (t + 1) / parts * unit).min(len);
                let shared = shared.ptr() as *const u32;
                let block = DepthBlock { pc, kc, kp, add };
                self.run_part(Part { lo, hi, split_m }, block, shared);
            };
            if parts == 1 {
                pack_shared(0);
                compute(0);
            } else {
                (0..parts).into_par_iter().for_each(pack_shared);
                (0..parts).into_par_iter().for_each(compute);
            }
        }
    }

    /// Rows lo..hi of C (when `split_m`; the packed B panels of all columns are `shared`) or
    /// columns lo..hi (the packed A panels of all rows are `shared`), for one depth block.
    fn run_part(&self, part: Part, block: DepthBlock, shared: *const u32) {
        let (Part { lo, hi, split_m }, DepthBlock { pc, kc, kp, add }) = (part, block);
        if lo >= hi {
            return;
        }
        let f = &self.s.fusion;
        // the tile at (i, j) of C, stored as the depth block says
        let tile = |i: usize, j: usize, rows: usize, cols: usize, apan, a_rs, bpan| {
            // Safety: (i, j) is a tile of C inside this part; the starting values have the
            // shape of C.
            unsafe {
                let store = Store::at(f, !add, i, j);
                let cp = self.s.c.ptr.add(i * self.s.c.rs + j);
                kernel(
                    Panels {
                        kp,
                        a: apan,
                        a_rs,
                        b: bpan,
                    },
                    TileOut {
                        c: cp,
                        c_rs: self.s.c.rs,
                        rows,
                        cols,
                        store,
                    },
                    self.native,
                );
            }
        };
        let (a, b) = (self.s.a.ptr, self.s.b.ptr);
        PACK.with(|bufs| {
            let mut bufs = bufs.borrow_mut();
            let (ap, bp) = &mut *bufs;
            if ap.is_empty() {
                ap.resize(MC * STEPS, 0);
                bp.resize(NC * STEPS, 0);
            }
            // the private operand in blocks (MC rows of A, or NC columns of B), each against
            // all of the shared one
            let block = if split_m { MC } else { NC };
            let in_place = if split_m {
                self.a_pairs_in_place()
            } else {
                None
            };
            for x0 in (lo..hi).step_by(block) {
                let xc = (hi - x0).min(block);
                // Safety: the blocks lie inside the operands; panels hold kp steps; the tiles
                // lie in this thread's part of C.
                unsafe {
                    if let Some(a_rs) = in_place {
                        // A's pairs in place: row x0 + ir's pairs from depth pc on
                        let a = a as *const u32;
                        for jr in (0..self.s.dims.n).step_by(NR) {
                            let cols = (self.s.dims.n - jr).min(NR);
                            let bpan = shared.add(jr / NR * kp * NR);
                            for ir in (0..xc).step_by(MR) {
                                let apan = a.add((x0 + ir) * a_rs + pc / 2);
                                let rows = (xc - ir).min(MR);
                                tile(x0 + ir, jr, rows, cols, apan, a_rs, bpan);
                            }
                        }
                    } else if split_m {
                        pack(
                            ap,
                            Lines {
                                ptr: at(
                                    a,
                                    x0 * self.s.a.rs + pc * self.s.a.cs,
                                    self.s.fusion.a_bf16,
                                ),
                                l_s: self.s.a.rs,
                                k_s: self.s.a.cs,
                                lines: xc,
                                kc,
                                half: self.s.fusion.a_bf16,
                            },
                            MR,
                            self.native,
                            std::ptr::null_mut(),
                        );
                        for jr in (0..self.s.dims.n).step_by(NR) {
                            let cols = (self.s.dims.n - jr).min(NR);
                            let bpan = shared.add(jr / NR * kp * NR);
                            for ir in (0..xc).step_by(MR) {
                                let apan = ap.as_ptr().add(ir / MR * kp * MR);
                                let rows = (xc - ir).min(MR);
                                tile(x0 + ir, jr, rows, cols, apan, 0, bpan);
                            }
                        }
                    } else {
                        pack(
                            bp,
                            Lines {
                                ptr: b.add(pc * self.s.b.rs + x0 * self.s.b.cs),
                                l_s: self.s.b.cs,
                                k_s: self.s.b.rs,
                                lines: xc,
                                kc,
                                half: false,
                            },
                            NR,
                            self.native,
                            f.col_sums.map_or(std::ptr::null_mut(), |p| p.add(x0)),
                        );
                        for ic in (0..self.s.dims.m).step_by(MC) {
                            let mc = (self.s.dims.m - ic).min(MC);
                            for jr in (0..xc).step_by(NR) {
                                let cols = (xc - jr).min(NR);
                                let bpan = bp.as_ptr().add(jr / NR * kp * NR);
                                for ir in (0..mc).step_by(MR) {
                                    let apan = shared.add((ic + ir) / MR * kp * MR);
                                    let rows = (mc - ir).min(MR);
                                    tile(ic + ir, x0 + jr, rows, cols, apan, 0, bpan);
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

/// `lines` lines x `kc` depth of a strided operand: element (line l, depth k) at
/// ptr + l·l_s + k·k_s, an f32, or a bf16 (2 bytes, the offsets counted in them) if `half`.
#[derive(Clone, Copy)]
struct Lines {
    ptr: *const f32,
    l_s: usize,
    k_s: usize,
    lines: usize,
    kc: usize,
    half: bool,
}

/// The address `elems` elements past `ptr`: f32 elements, or bf16 ones if `half`.
///
/// # Safety
/// The address lies inside the operand.
unsafe fn at(ptr: *const f32, elems: usize, half: bool) -> *const f32 {
    match half {
        true => (ptr as *const u16).add(elems) as *const f32,
        false => ptr.add(elems),
    }
}

/// Packs `lines` lines x `kc` depth of a strided operand into panels of `w` lines: element
/// (line l, depth k) is at src + l*l_s + k*k_s. Panel q holds lines q*w.. as [step][w] u32;
/// lines past the end (and, for bf16, the odd depth's missing partner) are zero. Unless
/// `sums` is null, each line's kc values (f32, in depth order) are added into sums[line].
///
/// # Safety
/// Every (l, k) with l < lines, k < kc is readable; sums (when not null) has `lines`
/// writable elements.
unsafe fn pack(dst: &mut [u32], src: Lines, w: usize, native: bool, sums: *mut f32) {
    let Lines {
        ptr: src,
        l_s,
        k_s,
        lines,
        kc,
        half,
    } = src;
    let kp = kc.div_ceil(2);
    let panels = lines.div_ceil(w);
    let dst = &mut dst[..panels * kp * w];
    if half {
        // bf16 already, depths contiguous (checked on entry): pairs copied as they are
        debug_assert!(k_s == 1 && sums.is_null());
        let src = src as *const u16;
        for (q, panel) in dst.chunks_exact_mut(kp * w).enumerate() {
            let n_lines = (lines - q * w).min(w);
            let s = src.add(q * w * l_s);
            #[cfg(target_arch = "x86_64")]
            if native {
                pack_k_contiguous(panel, s, l_s, n_lines, kc, w);
                continue;
            }
            for p in 0..kp {
                let out = &mut panel[p * w..(p + 1) * w];
                for (l, o) in out.iter_mut().enumerate() {
                    *o = if l >= n_lines {
                        0
                    } else {
                        let e = s.add(l * l_s + 2 * p);
                        let hi = if 2 * p + 1 < kc { *e.add(1) } else { 0 };
                        *e as u32 | (hi as u32) << 16
                    };
                }
            }
        }
        return;
    }
    let native_sums = native && l_s == 1 && k_s != 1;
    if !sums.is_null() && !native_sums {
        // the plain path, and lines along the depth: a plain pass over the block (cached)
        for l in 0..lines {
            let mut acc = *sums.add(l);
            for k in 0..kc {
                acc += *src.add(l * l_s + k * k_s);
            }
            *sums.add(l) = acc;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if native && (k_s == 1 || l_s == 1) {
        for (q, panel) in dst.chunks_exact_mut(kp * w).enumerate() {
            let n_lines = (lines - q * w).min(w);
            let s = src.add(q * w * l_s);
            if k_s == 1 {
                pack_k_contiguous(panel, s, l_s, n_lines, kc, w);
            } else {
                let sums = if sums.is_null() {
                    sums
                } else {
                    sums.add(q * w)
                };
                let lines = Lines {
                    ptr: s,
                    l_s,
                    k_s,
                    lines: n_lines,
                    kc,
                    half: false,
                };
                pack_lines_contiguous(panel, lines, w, sums);
            }
        }
        return;
    }
    for (q, panel) in dst.chunks_exact_mut(kp * w).enumerate() {
        let n_lines = (lines - q * w).min(w);
        for p in 0..kp {
            let out = &mut panel[p * w..(p + 1) * w];
            for (l, o) in out.iter_mut().enumerate() {
                *o = if l >= n_lines {
                    0
                } else {
                    let e = src.add((q * w + l) * l_s + 2 * p * k_s);
                    let hi = if 2 * p + 1 < kc { *e.add(k_s) } else { 0.0 };
                    pair(*e, hi)
                };
            }
        }
    }
}

/// A line of depth-contiguous values that [`pack_k_contiguous`] reads 16 pairs at a time.
#[cfg(target_arch = "x86_64")]
trait PairLine: Copy {
    /// The 16 pairs from `line` (depths `line`..`line` + 32, of which `left` remain; pairs
    /// past them zero, and the missing partner of an odd last depth zero).
    ///
    /// # Safety
    /// AVX-512 F, BW and BF16; `left` values are readable at `line`.
    unsafe fn pairs16(line: *const Self, left: usize) -> std::arch::x86_64::__m512i;
}

#[cfg(target_arch = "x86_64")]
impl PairLine for f32 {
    /// 32 floats rounded to bf16 pairs.
    #[inline(always)]
    unsafe fn pairs16(line: *const f32, left: usize) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let lo = _mm512_maskz_loadu_ps(mask16(left), line);
        let hi = _mm512_maskz_loadu_ps(mask16(left.saturating_sub(16)), line.add(16));
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
    }
}

#[cfg(target_arch = "x86_64")]
impl PairLine for u16 {
    /// 32 bf16, pairs already, loaded as they are.
    #[inline(always)]
    unsafe fn pairs16(line: *const u16, left: usize) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let m: __mmask32 = if left >= 32 {
            u32::MAX
        } else {
            (1u32 << left) - 1
        };
        _mm512_maskz_loadu_epi16(m, line as *const _)
    }
}

/// Panel packing when each line's depth is contiguous: f32 lines (A row-major, B stored
/// [n, k]) rounded 32 floats to 16 pairs, or bf16 lines (weights W [out, in] as A) whose 32
/// values are 16 pairs as they lie; 16 lines at a time are transposed in registers so the
/// panel is written in whole rows of pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_k_contiguous<T: PairLine>(
    panel: &mut [u32],
    src: *const T,
    l_s: usize,
    n_lines: usize,
    kc: usize,
    w: usize,
) {
    use std::arch::x86_64::*;
    let kp = kc.div_ceil(2);
    let out = panel.as_mut_ptr();
    let mut l0 = 0;
    while l0 < w {
        let lanes = (w - l0).min(16);
        let store: __mmask16 = ((1u32 << lanes) - 1) as u16;
        let mut p0 = 0;
        while p0 < kp {
            let k0 = 2 * p0;
            let mut rows = [_mm512_setzero_si512(); 16];
            for (l, row) in rows.iter_mut().enumerate() {
                if l0 + l < n_lines {
                    *row = T::pairs16(src.add((l0 + l) * l_s + k0), kc - k0);
                }
            }
            let cols = transpose16(rows);
            for (t, col) in cols.iter().enumerate().take((kp - p0).min(16)) {
                _mm512_mask_storeu_epi32(out.add((p0 + t) * w + l0) as *mut _, store, *col);
            }
            p0 += 16;
        }
        l0 += 16;
    }
}

/// Panel packing when lines are contiguous at fixed depth (A stored [k, m], B row-major): two
/// depths' rows of 16 lines round and interleave into 16 consecutive pairs. Unless `sums` is
/// null, each line's values are added into sums[line], in depth order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_lines_contiguous(panel: &mut [u32], src: Lines, w: usize, sums: *mut f32) {
    let Lines {
        ptr: src,
        k_s,
        lines: n_lines,
        kc,
        ..
    } = src;
    use std::arch::x86_64::*;
    let kp = kc.div_ceil(2);
    // lane 2j <- bf16(x0[j]) (in lanes 0..16), lane 2j+1 <- bf16(x1[j]) (in lanes 16..32)
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    debug_assert!(w <= 32);
    // the lines' sums over this block, in registers (16 lines each)
    let mut acc = [_mm512_setzero_ps(); 2];
    for p in 0..kp {
        let r0 = src.add(2 * p * k_s);
        let has_hi = 2 * p + 1 < kc;
        let out = panel.as_mut_ptr().add(p * w);
        let mut l = 0;
        while l < w {
            let left = n_lines.saturating_sub(l);
            let m: __mmask16 = if left >= 16 {
                0xffff
            } else {
                ((1u32 << left) - 1) as u16
            };
            let x0 = _mm512_maskz_loadu_ps(m, r0.add(l));
            let x1 = if has_hi {
                _mm512_maskz_loadu_ps(m, r0.add(k_s + l))
            } else {
                _mm512_setzero_ps()
            };
            if !sums.is_null() {
                // lanes past the lines, and x1 past the depth, are zero
                let g = &mut acc[l / 16];
                *g = _mm512_add_ps(_mm512_add_ps(*g, x0), x1);
            }
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
            let v = _mm512_permutexvar_epi16(idx, v);
            let store: __mmask16 = if w - l >= 16 {
                0xffff
            } else {
                ((1u32 << (w - l)) - 1) as u16
            };
            _mm512_mask_storeu_epi32(out.add(l) as *mut _, store, v);
            l += 16;
        }
    }
    if !sums.is_null() {
        for (g, a) in acc.iter().enumerate() {
            let m = mask16(n_lines.saturating_sub(16 * g));
            let sp = sums.add(16 * g);
            _mm512_mask_storeu_ps(sp, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, sp), *a));
        }
    }
}

/// A packed A panel (MR rows) and B panel (NR columns) of `kp` steps; or, where `a_rs` is
/// not 0, A's pairs in place: row r's step p at a + r·a_rs + p.
#[derive(Clone, Copy)]
struct Panels {
    kp: usize,
    a: *const u32,
    a_rs: usize,
    b: *const u32,
}

/// Where a tile goes: its first element of C, C's row stride, the rows and columns of it
/// that are stored, and how.
#[derive(Clone, Copy)]
struct TileOut {
    c: *mut f32,
    c_rs: usize,
    rows: usize,
    cols: usize,
    store: Store,
}

/// One MR x NR tile of C (+)= packed A panel · packed B panel over `kp` steps; only `rows` x
/// `cols` of it are stored.
///
/// # Safety
/// The panels hold kp steps; C's tile is writable.
#[inline]
unsafe fn kernel(panels: Panels, out: TileOut, native: bool) {
    #[cfg(target_arch = "x86_64")]
    if native {
        return match panels.a_rs {
            0 => kernel_avx512bf16(panels, out),
            _ => kernel_rows_avx512bf16(panels, out),
        };
    }
    let (kp, a, b) = (panels.kp, panels.a, panels.b);
    let (c, c_rs, rows, cols, store) = (out.c, out.c_rs, out.rows, out.cols, out.store);
    let _ = native;
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kp {
        let bv = std::slice::from_raw_parts(b.add(p * NR), NR);
        for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
            let x = match panels.a_rs {
                0 => *a.add(p * MR + r),
                a_rs => a.add(r * a_rs + p).read_unaligned(),
            };
            let (a0, a1) = (bf16_to_f32(x as u16), bf16_to_f32((x >> 16) as u16));
            for (o, &y) in acc_r.iter_mut().zip(bv) {
                *o += a0 * bf16_to_f32(y as u16) + a1 * bf16_to_f32((y >> 16) as u16);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate().take(rows) {
        let row = std::slice::from_raw_parts_mut(c.add(r * c_rs), cols);
        for (j, (o, &v)) in row.iter_mut().zip(acc_r).enumerate() {
            *o = match store {
                Store::Add => *o + v,
                Store::Init(bias, (res, res_rs)) => {
                    let mut x = v;
                    if !bias.is_null() {
                        x += *bias.add(j);
                    }
                    if !res.is_null() {
                        x += *res.add(r * res_rs + j);
                    }
                    x
                }
            };
        }
    }
}

/// Writes the first `rows` x `cols` of an accumulator tile into C as `store` says. A macro,
/// so the accumulators stay in registers (a call would spill them).
macro_rules! store_tile {
    ($acc:expr, $c:expr, $c_rs:expr, $rows:expr, $cols:expr, $store:expr) => {{
        let m0 = mask16($cols);
        let m1 = mask16($cols.saturating_sub(16));
        let (add, bias, res, res_rs) = match $store {
            Store::Add => (true, std::ptr::null(), std::ptr::null(), 0),
            Store::Init(bias, (res, res_rs)) => (false, bias, res, res_rs),
        };
        let (b0, b1) = if bias.is_null() {
            (_mm512_setzero_ps(), _mm512_setzero_ps())
        } else {
            (
                _mm512_maskz_loadu_ps(m0, bias),
                _mm512_maskz_loadu_ps(m1, bias.add(16)),
            )
        };
        for (r, acc_r) in $acc.iter().enumerate() {
            if r >= $rows {
                break;
            }
            let row = $c.add(r * $c_rs);
            let (mut v0, mut v1) = (acc_r[0], acc_r[1]);
            if add {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
            } else {
                v0 = _mm512_add_ps(v0, b0);
                v1 = _mm512_add_ps(v1, b1);
                if !res.is_null() {
                    let rr: *const f32 = res.add(r * res_rs);
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, rr));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, rr.add(16)));
                }
            }
            _mm512_mask_storeu_ps(row, m0, v0);
            _mm512_mask_storeu_ps(row.add(16), m1, v1);
        }
    }};
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel_avx512bf16(panels: Panels, out: TileOut) {
    let (kp, a, b) = (panels.kp, panels.a, panels.b);
    let (c, c_rs, rows, cols, store) = (out.c, out.c_rs, out.rows, out.cols, out.store);
    use std::arch::x86_64::*;
    store.prefetch(c, c_rs, rows, cols);
    let z = _mm512_setzero_ps();
    let mut acc = [[z; 2]; MR];
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
        let ap = a.add(p * MR);
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
            acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
            acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
        }
    }
    store_tile!(acc, c, c_rs, rows, cols, store);
}

/// [`kernel_avx512bf16`] with A's pairs broadcast from A's rows in place (`a_rs` pairs
/// apart); rows past `rows` read the last row again (their sums are not stored), so no read
/// leaves A.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel_rows_avx512bf16(panels: Panels, out: TileOut) {
    let (kp, a, a_rs, b) = (panels.kp, panels.a, panels.a_rs, panels.b);
    let (c, c_rs, rows, cols, store) = (out.c, out.c_rs, out.rows, out.cols, out.store);
    use std::arch::x86_64::*;
    store.prefetch(c, c_rs, rows, cols);
    let row: [*const u32; MR] = std::array::from_fn(|r| a.add(r.min(rows - 1) * a_rs));
    let z = _mm512_setzero_ps();
    let mut acc = [[z; 2]; MR];
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let pair = row[r].add(p).read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
            acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
            acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
        }
    }
    store_tile!(acc, c, c_rs, rows, cols, store);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The product forced down the plain path (no SIMD packing, plain kernel), one thread.
    pub(crate) fn plain(s: Strided) {
        let p = Problem { s, native: false };
        p.run(1);
    }
}

//! bf16 mixed-precision matrix multiply: C (+)= op(A) · op(B) with A, B and C in f32. The
//! operands are rounded to bf16 (round to nearest even) while they are packed into cache-sized
//! panels; the products run on AVX-512 BF16's `vdpbf16ps` (two bf16 products added into each
//! f32 lane per instruction, twice the f32 FMA rate) and accumulate in f32.
//!
//! Blocking (the usual scheme of BLIS-style libraries, written for bf16 pairs): for each block
//! of NC columns and KC depth, B is packed into NR-column panels (kept in L2/L1); for each
//! block of MC rows A is packed into MR-row panels; a register tile of MR x NR f32
//! accumulators (24 zmm) is then updated by one `vdpbf16ps` per 16 outputs per pair of k.
//! Packed element (pair p, lane j) is one u32: bf16 of k = 2p in the low half, k = 2p + 1 in
//! the high half, exactly the operand layout of `vdpbf16ps`.
//!
//! Without AVX-512 BF16 (or with `QUILL_SIMD=scalar`) the same packed panels go through a plain
//! kernel, so both paths round the same way; the tests check one against the other.

use super::SendPtr;
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of the register tile.
pub const MR: usize = 12;
/// Columns of the register tile (two zmm of f32).
pub const NR: usize = 32;
/// Depth of a packed block (even, so pairs never straddle blocks).
const KC: usize = 384;
/// Rows of A per packed block (a multiple of MR).
const MC: usize = 120;
/// Columns of B per packed block (a multiple of NR).
const NC: usize = 1536;

/// Whether this CPU runs the bf16 kernel natively (and `QUILL_SIMD=scalar` is not set).
pub fn has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            super::simd::has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// f32 -> bf16, rounding to nearest even (as PyTorch and `half` do); NaN stays NaN.
#[inline]
pub fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// bf16 bits -> f32 (exact).
#[inline]
pub fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// f32 -> bf16 for a whole slice (round to nearest even).
pub fn to_bf16(dst: &mut [u16], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    dst.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| convert(d, s));
}

super::simd::multiversion! {
    fn convert(d: &mut [u16], s: &[f32]) {
        for (d, &x) in d.iter_mut().zip(s) {
            let b = x.to_bits();
            let round = 0x7fff + ((b >> 16) & 1);
            let r = (b.wrapping_add(round) >> 16) as u16;
            // NaN (exponent all ones, mantissa not zero) keeps a quiet NaN
            let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
            *d = if nan { ((b >> 16) as u16) | 0x40 } else { r };
        }
    }
}

#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    round_bf16(lo) as u32 | (round_bf16(hi) as u32) << 16
}

/// Problems smaller than this many multiply-adds run on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// c[m,n] (+)= op(a)[m,k] · op(b)[k,n] with bf16 operands and f32 accumulation.
/// `a` is stored [m,k], or [k,m] when `trans_a`; `b` is stored [k,n], or [n,k] when `trans_b`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
    // Safety: the assert bounds every index the strides reach.
    unsafe {
        matmul_strided(
            m,
            k,
            n,
            c.as_mut_ptr(),
            n,
            a.as_ptr(),
            a_rs,
            a_cs,
            b.as_ptr(),
            b_rs,
            b_cs,
            accumulate,
            true,
        )
    }
}

/// The strided form: c[i,j] at c + i*c_rs + j, op(a)[i,p] at a + i*a_rs + p*a_cs,
/// op(b)[p,j] at b + p*b_rs + j*b_cs. With `parallel`, the output is split between the
/// threads of the current rayon pool when the product is large enough.
///
/// # Safety
/// Every element reached through the strides lies inside live allocations, and nobody else
/// touches `c`'s elements during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_strided(
    m: usize,
    k: usize,
    n: usize,
    c: *mut f32,
    c_rs: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    accumulate: bool,
    parallel: bool,
) {
    let native = has_bf16();
    let p = Problem {
        k,
        c: SendPtr(c),
        c_rs,
        a: a as usize,
        a_rs,
        a_cs,
        b: b as usize,
        b_rs,
        b_cs,
        accumulate,
        native,
    };
    let threads = rayon::current_num_threads();
    if !parallel || threads < 2 || m * k * n < PARALLEL_MIN_MACS {
        p.run(0, m, 0, n);
        return;
    }
    // Split the larger side of C between the threads (whole register tiles per part): each
    // part packs its share of that operand and all of the other.
    let (unit, len) = if n >= m { (NR, n) } else { (MR, m) };
    let tiles = len.div_ceil(unit);
    let parts = threads.min(tiles);
    (0..parts).into_par_iter().for_each(|t| {
        let lo = (tiles * t / parts * unit).min(len);
        let hi = (tiles * (t + 1) / parts * unit).min(len);
        if n >= m {
            p.run(0, m, lo, hi);
        } else {
            p.run(lo, hi, 0, n);
        }
    });
}

struct Problem {
    k: usize,
    c: SendPtr,
    c_rs: usize,
    a: usize,
    a_rs: usize,
    a_cs: usize,
    b: usize,
    b_rs: usize,
    b_cs: usize,
    accumulate: bool,
    native: bool,
}

thread_local! {
    /// Packing buffers (A panels, B panels), grown once per thread and reused.
    static PACK: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl Problem {
    /// Computes rows i0..i1, columns j0..j1 of C on this thread.
    fn run(&self, i0: usize, i1: usize, j0: usize, j1: usize) {
        let (a, b) = (self.a as *const f32, self.b as *const f32);
        let c = self.c.get();
        if i0 >= i1 || j0 >= j1 {
            return;
        }
        if self.k == 0 {
            if !self.accumulate {
                for i in i0..i1 {
                    // Safety: row i, columns j0..j1 of C are ours.
                    unsafe { std::ptr::write_bytes(c.add(i * self.c_rs + j0), 0, j1 - j0) };
                }
            }
            return;
        }
        PACK.with(|bufs| {
            let mut bufs = bufs.borrow_mut();
            let (ap, bp) = &mut *bufs;
            // full size at the first call, so that later calls never allocate
            if ap.is_empty() {
                ap.resize(MC * KC / 2, 0);
                bp.resize(NC * KC / 2, 0);
            }
            for jc in (j0..j1).step_by(NC) {
                let nc = (j1 - jc).min(NC);
                for pc in (0..self.k).step_by(KC) {
                    let kc = (self.k - pc).min(KC);
                    let kp = kc.div_ceil(2);
                    // Safety: (pc, jc) and the block's extent lie inside B.
                    unsafe {
                        pack(
                            bp,
                            b.add(pc * self.b_rs + jc * self.b_cs),
                            self.b_cs,
                            self.b_rs,
                            nc,
                            kc,
                            NR,
                            self.native,
                        )
                    };
                    let add = self.accumulate || pc > 0;
                    for ic in (i0..i1).step_by(MC) {
                        let mc = (i1 - ic).min(MC);
                        // Safety: as for B.
                        unsafe {
                            pack(
                                ap,
                                a.add(ic * self.a_rs + pc * self.a_cs),
                                self.a_rs,
                                self.a_cs,
                                mc,
                                kc,
                                MR,
                                self.native,
                            )
                        };
                        for jr in (0..nc).step_by(NR) {
                            let cols = (nc - jr).min(NR);
                            let bpan = bp[jr / NR * kp * NR..].as_ptr();
                            for ir in (0..mc).step_by(MR) {
                                let rows = (mc - ir).min(MR);
                                let apan = ap[ir / MR * kp * MR..].as_ptr();
                                // Safety: the panels hold kp pairs; the tile lies in our part of C.
                                unsafe {
                                    let cp = c.add((ic + ir) * self.c_rs + jc + jr);
                                    kernel(
                                        kp,
                                        apan,
                                        bpan,
                                        cp,
                                        self.c_rs,
                                        rows,
                                        cols,
                                        add,
                                        self.native,
                                    )
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

/// Packs `lines` lines x `kc` depth of a strided operand into panels of `w` lines: element
/// (line l, depth p) is at src + l*l_s + p*k_s. Panel q holds lines q*w.. as [pair][w] u32;
/// lines past the end and the odd depth's missing partner are zero.
///
/// # Safety
/// Every (l, p) with l < lines, p < kc is readable.
#[allow(clippy::too_many_arguments)]
unsafe fn pack(
    dst: &mut [u32],
    src: *const f32,
    l_s: usize,
    k_s: usize,
    lines: usize,
    kc: usize,
    w: usize,
    native: bool,
) {
    let kp = kc.div_ceil(2);
    let panels = lines.div_ceil(w);
    let dst = &mut dst[..panels * kp * w];
    #[cfg(target_arch = "x86_64")]
    if native && (k_s == 1 || l_s == 1) {
        for (q, panel) in dst.chunks_exact_mut(kp * w).enumerate() {
            let n_lines = (lines - q * w).min(w);
            let s = src.add(q * w * l_s);
            if k_s == 1 {
                pack_k_contiguous(panel, s, l_s, n_lines, kc, w);
            } else {
                pack_lines_contiguous(panel, s, k_s, n_lines, kc, w);
            }
        }
        return;
    }
    for (q, panel) in dst.chunks_exact_mut(kp * w).enumerate() {
        let n_lines = (lines - q * w).min(w);
        for p in 0..kp {
            let out = &mut panel[p * w..(p + 1) * w];
            for (l, o) in out.iter_mut().enumerate() {
                *o = if l < n_lines {
                    let e = src.add((q * w + l) * l_s + 2 * p * k_s);
                    let hi = if 2 * p + 1 < kc { *e.add(k_s) } else { 0.0 };
                    pair(*e, hi)
                } else {
                    0
                };
            }
        }
    }
}

/// Panel packing when each line's depth is contiguous (A row-major, B stored [n, k]): 32
/// consecutive floats of a line round to 16 consecutive pairs; 16 lines at a time are
/// transposed in registers so the panel is written in whole rows of pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_k_contiguous(
    panel: &mut [u32],
    src: *const f32,
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
            let left = kc - k0;
            let m_lo = mask16(left);
            let m_hi = mask16(left.saturating_sub(16));
            let mut rows = [_mm512_setzero_si512(); 16];
            for (l, row) in rows.iter_mut().enumerate() {
                if l0 + l < n_lines {
                    let line = src.add((l0 + l) * l_s + k0);
                    let lo = _mm512_maskz_loadu_ps(m_lo, line);
                    let hi = _mm512_maskz_loadu_ps(m_hi, line.add(16));
                    *row = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
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

/// Mask of the first min(n, 16) lanes.
#[inline]
fn mask16(n: usize) -> u16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// 16 x 16 transpose of 32-bit elements: out[j] lane i = rows[i] lane j.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // within each 128-bit lane: pairs of rows interleaved, then quads
    let mut t = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
        let ab_lo = _mm512_unpacklo_epi32(a, b);
        let ab_hi = _mm512_unpackhi_epi32(a, b);
        let cd_lo = _mm512_unpacklo_epi32(c, d);
        let cd_hi = _mm512_unpackhi_epi32(c, d);
        // u[4g + j], lane L = rows 4g..4g+4 at column 4L + j
        t[4 * g] = _mm512_unpacklo_epi64(ab_lo, cd_lo);
        t[4 * g + 1] = _mm512_unpackhi_epi64(ab_lo, cd_lo);
        t[4 * g + 2] = _mm512_unpacklo_epi64(ab_hi, cd_hi);
        t[4 * g + 3] = _mm512_unpackhi_epi64(ab_hi, cd_hi);
    }
    let mut out = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let (a, b, c, d) = (t[j], t[4 + j], t[8 + j], t[12 + j]);
        let v0 = _mm512_shuffle_i32x4::<0x88>(a, b);
        let v1 = _mm512_shuffle_i32x4::<0xdd>(a, b);
        let w0 = _mm512_shuffle_i32x4::<0x88>(c, d);
        let w1 = _mm512_shuffle_i32x4::<0xdd>(c, d);
        out[j] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        out[8 + j] = _mm512_shuffle_i32x4::<0xdd>(v0, w0);
        out[4 + j] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        out[12 + j] = _mm512_shuffle_i32x4::<0xdd>(v1, w1);
    }
    out
}

/// Panel packing when lines are contiguous at fixed depth (A stored [k, m], B row-major): two
/// depths' rows of 16 lines round and interleave into 16 consecutive pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_lines_contiguous(
    panel: &mut [u32],
    src: *const f32,
    k_s: usize,
    n_lines: usize,
    kc: usize,
    w: usize,
) {
    use std::arch::x86_64::*;
    let kp = kc.div_ceil(2);
    // lane 2j <- bf16(x0[j]) (in lanes 0..16), lane 2j+1 <- bf16(x1[j]) (in lanes 16..32)
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
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
}

/// One MR x NR tile of C (+)= packed A panel · packed B panel over `kp` pairs; only `rows` x
/// `cols` of it are stored.
///
/// # Safety
/// The panels hold kp pairs; C's tile is writable.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn kernel(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    rows: usize,
    cols: usize,
    add: bool,
    native: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if native {
        return kernel_avx512bf16(kp, a, b, c, c_rs, rows, cols, add);
    }
    let _ = native;
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kp {
        let bv = std::slice::from_raw_parts(b.add(p * NR), NR);
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let x = *a.add(p * MR + r);
            let (a0, a1) = (bf16_to_f32(x as u16), bf16_to_f32((x >> 16) as u16));
            for (o, &y) in acc_r.iter_mut().zip(bv) {
                *o += a0 * bf16_to_f32(y as u16) + a1 * bf16_to_f32((y >> 16) as u16);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate().take(rows) {
        let row = std::slice::from_raw_parts_mut(c.add(r * c_rs), cols);
        for (o, &v) in row.iter_mut().zip(acc_r) {
            *o = if add { *o + v } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx512bf16(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    rows: usize,
    cols: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
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
    let m0: __mmask16 = if cols >= 16 {
        0xffff
    } else {
        ((1u32 << cols) - 1) as u16
    };
    let c1 = cols.saturating_sub(16);
    let m1: __mmask16 = if c1 >= 16 {
        0xffff
    } else {
        ((1u32 << c1) - 1) as u16
    };
    for (r, acc_r) in acc.iter().enumerate() {
        if r >= rows {
            break;
        }
        let row = c.add(r * c_rs);
        let (mut v0, mut v1) = (acc_r[0], acc_r[1]);
        if add {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
        }
        _mm512_mask_storeu_ps(row, m0, v0);
        _mm512_mask_storeu_ps(row.add(16), m1, v1);
    }
}

/// For the tests: the same product forced down the plain path.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn matmul_plain(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
    let p = Problem {
        k,
        c: SendPtr(c.as_mut_ptr()),
        c_rs: n,
        a: a.as_ptr() as usize,
        a_rs,
        a_cs,
        b: b.as_ptr() as usize,
        b_rs,
        b_cs,
        accumulate,
        native: false,
    };
    p.run(0, m, 0, n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::*;
    use crate::rng::Rng;

    #[test]
    fn rounding_matches_half() {
        let mut rng = Rng::new(41);
        let mut x = randn(&mut rng, 1000, 3.0);
        x.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 1e-40]);
        let mut got = vec![0u16; x.len()];
        to_bf16(&mut got, &x);
        for (&g, &v) in got.iter().zip(&x) {
            assert_eq!(g, half::bf16::from_f32(v).to_bits(), "{v}");
            assert_eq!(round_bf16(v), g, "{v}");
        }
        let mut nan = [0u16];
        to_bf16(&mut nan, &[f32::NAN]);
        assert!(bf16_to_f32(nan[0]).is_nan() && bf16_to_f32(round_bf16(f32::NAN)).is_nan());
    }

    /// Both paths against float64 products of the bf16-rounded operands, on awkward sizes
    /// (odd depth, fewer rows/columns than a tile, several blocks), every transpose, with and
    /// without accumulation, on one thread and split between threads.
    #[test]
    fn products_match_float64_of_rounded_operands() {
        let mut rng = Rng::new(42);
        let q = |v: &[f32]| -> Vec<f64> {
            v.iter()
                .map(|&x| bf16_to_f32(round_bf16(x)) as f64)
                .collect()
        };
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (13, 31, 33),
            (12, 32, 32),
            (17, 257, 1),
            (1, 300, 65),
            (130, 515, 70),
            (250, 64, 1600),
        ] {
            for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
                let a = randn(&mut rng, m * k, 1.0);
                let b = randn(&mut rng, k * n, 1.0);
                let c0 = randn(&mut rng, m * n, 1.0);
                for &acc in &[false, true] {
                    let mut want = if acc { to_f64(&c0) } else { vec![0.0; m * n] };
                    crate::kernels::reference::matmul(&mut want, &q(&a), &q(&b), m, k, n, ta, tb);
                    let mut got = c0.clone();
                    matmul(&mut got, &a, &b, m, k, n, ta, tb, acc);
                    let err = max_rel_err(&got, &want, 1.0);
                    assert!(err < 2e-5, "{m}x{k}x{n} ta={ta} tb={tb} acc={acc}: {err}");
                    let mut plain = c0.clone();
                    matmul_plain(&mut plain, &a, &b, m, k, n, ta, tb, acc);
                    let err = max_rel_err(&plain, &want, 1.0);
                    assert!(
                        err < 2e-5,
                        "plain {m}x{k}x{n} ta={ta} tb={tb} acc={acc}: {err}"
                    );
                    // and the f32 product itself within bf16's rounding (8 bits of mantissa)
                    let mut exact = if acc { to_f64(&c0) } else { vec![0.0; m * n] };
                    crate::kernels::reference::matmul(
                        &mut exact,
                        &to_f64(&a),
                        &to_f64(&b),
                        m,
                        k,
                        n,
                        ta,
                        tb,
                    );
                    let err = max_rel_err(&got, &exact, 1.0);
                    assert!(err < 3e-2, "vs f32 {m}x{k}x{n}: {err}");
                }
            }
        }
    }

    #[test]
    fn zero_depth_clears_or_keeps() {
        let mut c = vec![1.0f32; 6];
        matmul(&mut c, &[], &[], 2, 0, 3, false, false, true);
        assert_eq!(c, vec![1.0; 6]);
        matmul(&mut c, &[], &[], 2, 0, 3, false, false, false);
        assert_eq!(c, vec![0.0; 6]);
    }
}

//! Quantized products of many activation rows (a prompt, a batch) with quantized weights, as
//! a packed integer GEMM: the numbers of [`super::dot`] (activations quantized to int16 per 32
//! numbers, weight digits against them in exact integer arithmetic, f32 scales per chunk),
//! computed 32 weight rows at a time so that each decoded weight serves every row of x.
//!
//! A panel is 32 weight rows of one matrix, decoded once: for each chunk of 32 numbers along
//! the input, 16 steps of 32 lanes, lane j of step p holding row j's digits 2p and 2p + 1 as
//! an int16 pair (what `vpdpwssd` multiplies with a broadcast pair of activations), and per
//! half chunk the rows' f32 scales a and offsets b (a number is a·digit + b). Digits are
//! stored centred where a format's offset is a fixed multiple of its scale (Q4_0's −8, Q5_0's
//! −16, Q3_K's −4, Q6_K's −32), so that the offset vanishes; the formats with a minimum of
//! their own (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) keep b, applied to the chunk sums of x.
//!
//! The register tile is MR rows of x × 32 weight rows: 2·MR int32 accumulators summed over
//! one chunk (or half chunk, for the formats with 16-number scales), then turned to f32 and
//! scaled into 2·MR f32 accumulators by a(j) · dx(i, chunk). A product of a digit (|u| ≤ 128)
//! and an activation (|q| ≤ 32767) summed over 32 numbers stays below 2³¹, so the integer
//! sums are exact; the result equals [`super::dot::dot_plain`] to float rounding (tested on
//! every format and awkward sizes).
//!
//! The path needs AVX-512 with VNNI ([`available`]); elsewhere a prompt's product dequantizes
//! its weights and runs the f32 GEMM (`kernels::linear`).

use super::dot::{isa, Isa, QuantRows, CHUNK};
use super::QType;

/// Weight rows per panel (two registers of 16 int32 lanes).
pub const NR: usize = 32;
/// Rows of x per register tile.
pub const MR: usize = 4;

/// Whether this CPU runs the packed integer GEMM (AVX-512 VNNI, not capped by `QUILL_SIMD`).
pub fn available() -> bool {
    isa() == Isa::Avx512Vnni
}

/// Up to 32 decoded weight rows (see the module comment); reused between calls.
#[derive(Default, Debug)]
pub struct Panel {
    /// [chunk][step 0..16][lane 0..32] int16 pairs.
    u: Vec<u32>,
    /// [chunk][half][lane] scales.
    a: Vec<f32>,
    /// [chunk][half][lane] offsets (zero for the centred formats).
    b: Vec<f32>,
    /// Weight rows held (the other lanes are zero).
    rows: usize,
    /// Chunks per row.
    chunks: usize,
}

impl Panel {
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// The value a format's digits are centred on in a panel (its offset is −centre × scale).
pub fn centre(t: QType) -> i32 {
    match t {
        QType::Q4_0 => 8,
        QType::Q5_0 => 16,
        QType::Q3K => 4,
        QType::Q6K => 32,
        _ => 0,
    }
}

/// Whether a format's offsets are not a fixed multiple of its scales (they stay in b).
pub fn has_offset(t: QType) -> bool {
    matches!(
        t,
        QType::Q4_1 | QType::Q5_1 | QType::Q2K | QType::Q4K | QType::Q5K
    )
}

/// Whether a format's two half chunks have scales of their own (16-number sub-blocks).
pub fn split(t: QType) -> bool {
    matches!(t, QType::Q2K | QType::Q3K | QType::Q6K)
}

/// Decodes `rows` (1..=32) weight rows of `cols` numbers (`w`: their bytes, whole blocks of
/// `t`) into `panel`, portably (the plain twin of the SIMD packing, and its fallback).
pub fn pack_plain(t: QType, w: &[u8], rows: usize, cols: usize, panel: &mut Panel) {
    let chunks = prepare(panel, w, t, rows, cols);
    let (per, rb) = (super::dot::chunks_per_block(t), w.len() / rows);
    let c0 = centre(t);
    for j in 0..rows {
        let row = &w[j * rb..(j + 1) * rb];
        for k in 0..chunks {
            let blk = &row[k / per * t.block_bytes()..(k / per + 1) * t.block_bytes()];
            let ch = super::dot::chunk(t, blk, k % per);
            for p in 0..16 {
                let digit = |i: usize| {
                    let u = if ch.signed {
                        ch.u[i] as i8 as i32
                    } else {
                        ch.u[i] as i32
                    };
                    (u - c0) as i16 as u16 as u32
                };
                panel.u[(k * 16 + p) * NR + j] = digit(2 * p) | digit(2 * p + 1) << 16;
            }
            for h in 0..2 {
                panel.a[(k * 2 + h) * NR + j] = ch.a[h];
                panel.b[(k * 2 + h) * NR + j] = ch.b[h] + c0 as f32 * ch.a[h];
            }
        }
    }
}

/// Sizes the panel's buffers for `rows` rows of `cols` numbers, zeroed; returns chunks per row.
fn prepare(panel: &mut Panel, w: &[u8], t: QType, rows: usize, cols: usize) -> usize {
    assert!((1..=NR).contains(&rows) && cols.is_multiple_of(t.block()));
    assert_eq!(w.len(), rows * cols / t.block() * t.block_bytes());
    let chunks = cols / CHUNK;
    panel.rows = rows;
    panel.chunks = chunks;
    panel.u.clear();
    panel.u.resize(chunks * 16 * NR, 0);
    panel.a.clear();
    panel.a.resize(chunks * 2 * NR, 0.0);
    panel.b.clear();
    panel.b.resize(chunks * 2 * NR, 0.0);
    chunks
}

/// Decodes weight rows into `panel` on the fastest path ([`pack_plain`]'s numbers).
pub fn pack(t: QType, w: &[u8], rows: usize, cols: usize, panel: &mut Panel) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        prepare(panel, w, t, rows, cols);
        // Safety: `available()` found AVX-512 VNNI (and with it AVX2, F16C); `prepare`
        // checked the sizes.
        return unsafe { x86::pack(t, w, rows, panel) };
    }
    pack_plain(t, w, rows, cols, panel)
}

/// y[i, j] = x[i] · W[j] for rows `i0..i1` of `x` and the panel's weight rows, written at
/// `y[i * y_rs + j]` (columns 0..panel.rows()), plainly: the twin of the SIMD tile.
///
/// # Safety
/// `y` reaches those elements and nobody else writes them during the call.
pub unsafe fn times_plain(
    t: QType,
    panel: &Panel,
    x: &QuantRows,
    (i0, i1): (usize, usize),
    y: *mut f32,
    y_rs: usize,
) {
    let per_row = x.cols / CHUNK;
    assert!(per_row == panel.chunks && i1 <= x.rows());
    let halves = if split(t) { 2 } else { 1 };
    for i in i0..i1 {
        for j in 0..panel.rows {
            let mut acc = 0.0f32;
            for k in 0..panel.chunks {
                let xc = i * per_row + k;
                let mut part = 0.0f32;
                for h in 0..halves {
                    let steps = 16 / halves;
                    let mut s = 0i32;
                    for p in h * steps..(h + 1) * steps {
                        let pair = panel.u[(k * 16 + p) * NR + j];
                        let (u0, u1) = (pair as u16 as i16 as i32, (pair >> 16) as u16 as i16);
                        let q = &x.q[xc * CHUNK + 2 * p..];
                        s += u0 * q[0] as i32 + u1 as i32 * q[1] as i32;
                    }
                    part += panel.a[(k * 2 + h) * NR + j] * s as f32;
                }
                acc += part * x.d[xc];
                if has_offset(t) {
                    let (b0, b1) = (panel.b[k * 2 * NR + j], panel.b[(k * 2 + 1) * NR + j]);
                    acc += b0 * x.xs[2 * xc] + b1 * x.xs[2 * xc + 1];
                }
            }
            *y.add(i * y_rs + j) = acc;
        }
    }
}

/// [`times_plain`] on the fastest path.
///
/// # Safety
/// As [`times_plain`].
pub unsafe fn times(
    t: QType,
    panel: &Panel,
    x: &QuantRows,
    rows: (usize, usize),
    y: *mut f32,
    y_rs: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        assert!(x.cols / CHUNK == panel.chunks && rows.1 <= x.rows());
        return unsafe { x86::times(t, panel, x, rows, y, y_rs) };
    }
    times_plain(t, panel, x, rows, y, y_rs)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::dot::x86::{
        decode512, per_type, split, Q2K, Q3K, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8_0,
    };
    use super::super::dot::{chunks_per_block, QuantRows, CHUNK};
    use super::super::QType;
    use super::{centre, Panel, MR, NR};
    use std::arch::x86_64::*;

    const fn offset(t: u32) -> bool {
        matches!(t, Q4_1 | Q5_1 | Q2K | Q4K | Q5K)
    }

    /// # Safety
    /// AVX-512 VNNI is present; the panel was sized by `prepare` for these rows.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn pack(t: QType, w: &[u8], rows: usize, panel: &mut Panel) {
        per_type!(t, pack_body, t, w, rows, panel)
    }

    #[inline(always)]
    unsafe fn pack_body<const T: u32>(t: QType, w: &[u8], rows: usize, panel: &mut Panel) {
        let (per, bb) = (chunks_per_block(t), t.block_bytes());
        let rb = w.len() / rows;
        let c0 = centre(t);
        let cv = _mm512_set1_epi16(c0 as i16);
        let mut tmp = [0u32; 16];
        for j in 0..rows {
            for k in 0..panel.chunks {
                let dec = decode512::<T>(w.as_ptr().add(j * rb + k / per * bb), k % per);
                let wide = if T == Q8_0 {
                    _mm512_cvtepi8_epi16(dec.u)
                } else {
                    _mm512_cvtepu8_epi16(dec.u)
                };
                _mm512_storeu_si512(tmp.as_mut_ptr() as *mut _, _mm512_sub_epi16(wide, cv));
                let u = panel.u.as_mut_ptr().add(k * 16 * NR + j);
                for (p, &v) in tmp.iter().enumerate() {
                    *u.add(p * NR) = v;
                }
                for h in 0..2 {
                    *panel.a.get_unchecked_mut((k * 2 + h) * NR + j) = dec.a[h];
                    *panel.b.get_unchecked_mut((k * 2 + h) * NR + j) =
                        dec.b[h] + c0 as f32 * dec.a[h];
                }
            }
        }
    }

    /// # Safety
    /// AVX-512 VNNI is present; the sizes were checked by the caller; `y` as in
    /// `times_plain`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn times(
        t: QType,
        panel: &Panel,
        x: &QuantRows,
        rows: (usize, usize),
        y: *mut f32,
        y_rs: usize,
    ) {
        per_type!(t, times_body, panel, x, rows, y, y_rs)
    }

    #[inline(always)]
    unsafe fn times_body<const T: u32>(
        panel: &Panel,
        x: &QuantRows,
        (i0, i1): (usize, usize),
        y: *mut f32,
        y_rs: usize,
    ) {
        let mut i = i0;
        while i < i1 {
            let m = (i1 - i).min(MR);
            let yi = y.add(i * y_rs);
            match m {
                4 => tile::<T, 4>(panel, x, i, yi, y_rs),
                3 => tile::<T, 3>(panel, x, i, yi, y_rs),
                2 => tile::<T, 2>(panel, x, i, yi, y_rs),
                _ => tile::<T, 1>(panel, x, i, yi, y_rs),
            }
            i += m;
        }
    }

    /// Rows i0..i0 + R of x times the panel, into R rows of y (columns 0..panel.rows).
    #[inline(always)]
    unsafe fn tile<const T: u32, const R: usize>(
        panel: &Panel,
        x: &QuantRows,
        i0: usize,
        y: *mut f32,
        y_rs: usize,
    ) {
        let per_row = x.cols / CHUNK;
        let halves = if split(T) { 2 } else { 1 };
        let steps = 16 / halves;
        let mut fa = [[_mm512_setzero_ps(); 2]; R];
        let xq: [*const i32; R] =
            std::array::from_fn(|r| x.q.as_ptr().add((i0 + r) * x.cols) as *const i32);
        for k in 0..panel.chunks {
            let wk = panel.u.as_ptr().add(k * 16 * NR) as *const __m512i;
            for h in 0..halves {
                let mut ia = [[_mm512_setzero_si512(); 2]; R];
                for p in h * steps..(h + 1) * steps {
                    let w0 = _mm512_loadu_si512(wk.add(2 * p) as *const _);
                    let w1 = _mm512_loadu_si512(wk.add(2 * p + 1) as *const _);
                    for r in 0..R {
                        let xb = _mm512_set1_epi32(*xq[r].add(k * 16 + p));
                        ia[r][0] = _mm512_dpwssd_epi32(ia[r][0], w0, xb);
                        ia[r][1] = _mm512_dpwssd_epi32(ia[r][1], w1, xb);
                    }
                }
                let a = panel.a.as_ptr().add((k * 2 + h) * NR);
                let (a0, a1) = (_mm512_loadu_ps(a), _mm512_loadu_ps(a.add(16)));
                for r in 0..R {
                    let dx = _mm512_set1_ps(*x.d.get_unchecked((i0 + r) * per_row + k));
                    let (s0, s1) = (_mm512_mul_ps(a0, dx), _mm512_mul_ps(a1, dx));
                    fa[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][0]), s0, fa[r][0]);
                    fa[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][1]), s1, fa[r][1]);
                }
                if offset(T) && split(T) {
                    let b = panel.b.as_ptr().add((k * 2 + h) * NR);
                    let (b0, b1) = (_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(16)));
                    for (r, f) in fa.iter_mut().enumerate() {
                        let xc = (i0 + r) * per_row + k;
                        let xs = _mm512_set1_ps(*x.xs.get_unchecked(2 * xc + h));
                        f[0] = _mm512_fmadd_ps(b0, xs, f[0]);
                        f[1] = _mm512_fmadd_ps(b1, xs, f[1]);
                    }
                }
            }
            if offset(T) && !split(T) {
                // one offset per chunk: b × (Σ of both halves of x)
                let b = panel.b.as_ptr().add(k * 2 * NR);
                let (b0, b1) = (_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(16)));
                for (r, f) in fa.iter_mut().enumerate() {
                    let xc = (i0 + r) * per_row + k;
                    let s = *x.xs.get_unchecked(2 * xc) + *x.xs.get_unchecked(2 * xc + 1);
                    let xs = _mm512_set1_ps(s);
                    f[0] = _mm512_fmadd_ps(b0, xs, f[0]);
                    f[1] = _mm512_fmadd_ps(b1, xs, f[1]);
                }
            }
        }
        let n = panel.rows;
        let (m0, m1) = (mask(n), mask(n.saturating_sub(16)));
        for (r, f) in fa.iter().enumerate() {
            let yr = y.add(r * y_rs);
            _mm512_mask_storeu_ps(yr, m0, f[0]);
            _mm512_mask_storeu_ps(yr.add(16), m1, f[1]);
        }
    }

    #[inline(always)]
    fn mask(n: usize) -> u16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::dot::tests::{random_weights, random_x};
    use super::super::dot::{dot_plain, is_block_type};
    use super::*;
    use crate::rng::Rng;

    /// Packed panels (plain and SIMD) times x equal the plain block dot products, on every
    /// format, partial panels and row counts that are not multiples of the tile.
    #[test]
    fn panels_times_rows_equal_the_plain_dot_products() {
        let mut rng = Rng::new(11);
        let simd = available();
        eprintln!("packed integer GEMM on AVX-512 VNNI tested: {simd}");
        for t in QType::ALL.into_iter().filter(|t| is_block_type(*t)) {
            let cols_choices: &[usize] = if t.block() == 32 {
                &[32, 96, 544]
            } else {
                &[256, 768]
            };
            for &cols in cols_choices {
                for (out, n) in [(32, 13), (7, 6), (19, 1), (33, 8)] {
                    let w = random_weights(t, out, cols, &mut rng);
                    let x = random_x(n * cols, &mut rng);
                    let mut xq = QuantRows::default();
                    xq.quantize(&x, cols);
                    let rb = w.len() / out;
                    for j0 in (0..out).step_by(NR) {
                        let rows = (out - j0).min(NR);
                        let wp = &w[j0 * rb..(j0 + rows) * rb];
                        let mut deq = vec![0.0; rows * cols];
                        super::super::dequantize(t, wp, &mut deq);
                        let (mut plain, mut fast) = (Panel::default(), Panel::default());
                        pack_plain(t, wp, rows, cols, &mut plain);
                        pack(t, wp, rows, cols, &mut fast);
                        assert_eq!(plain.u, fast.u, "{t:?} digits");
                        assert_eq!(plain.a, fast.a, "{t:?} scales");
                        assert_eq!(plain.b, fast.b, "{t:?} offsets");
                        if !has_offset(t) {
                            assert!(plain.b.iter().all(|&b| b == 0.0), "{t:?} centred");
                        }
                        // one spare column each side of the panel's: never written
                        let ys = NR + 2;
                        let mut y0 = vec![f32::NAN; n * ys];
                        let mut y1 = vec![f32::NAN; n * ys];
                        // Safety: n rows of ys ≥ rows + 1 columns from offset 1.
                        unsafe {
                            times_plain(t, &plain, &xq, (0, n), y0.as_mut_ptr().add(1), ys);
                            times(t, &fast, &xq, (0, n), y1.as_mut_ptr().add(1), ys);
                        }
                        for i in 0..n {
                            for j in 0..rows {
                                let want = dot_plain(t, &wp[j * rb..(j + 1) * rb], &xq, i);
                                let wd = &deq[j * cols..(j + 1) * cols];
                                let mag: f32 = (0..cols)
                                    .map(|k| {
                                        let xv = xq.q[i * cols + k] as f32
                                            * xq.d[(i * cols + k) / CHUNK];
                                        (wd[k] * xv).abs()
                                    })
                                    .sum::<f32>()
                                    + 1e-6;
                                for (name, y) in [("plain", &y0), ("simd", &y1)] {
                                    let got = y[i * ys + 1 + j];
                                    assert!(
                                        (got - want).abs() <= 1e-5 * mag,
                                        "{t:?} {name} cols {cols} ({i}, {j}): {got} vs {want}"
                                    );
                                }
                            }
                            for y in [&y0, &y1] {
                                assert!(y[i * ys].is_nan() && y[i * ys + rows + 1].is_nan());
                            }
                        }
                    }
                }
            }
        }
    }
}

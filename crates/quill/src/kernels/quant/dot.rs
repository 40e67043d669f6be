//! Products with block-quantized weights that stay quantized: y = x · Wᵀ for W [out, in] in
//! any [`QType`] of 32- or 256-number blocks.
//!
//! The activations are quantized too: each run of 32 numbers of a row of x becomes 32 int16
//! values and one f32 scale (round to nearest of x / (max|x| / 32767)), with the sums of each
//! half's values kept beside them. llama.cpp quantizes them to int8; on SmolLM2-135M that
//! moved the logits by up to 1.4 (of about 30) from the dequantized model's and changed its
//! greedy text, where 16 bits move them by 0.008 (measured; BENCHMARKS.md). Every weight
//! format is then read 32 numbers
//! (a "chunk") at a time as 32 unsigned digits u and four f32 constants such that the chunk's
//! part of a dot product is
//!
//! ```text
//!     dx · (a₀·Σ₀ u·q + a₁·Σ₁ u·q + b₀·Σ₀ q + b₁·Σ₁ q)
//! ```
//!
//! (Σ₀ over the first 16 numbers, Σ₁ over the last 16; `dx` and `q` the activation chunk's
//! scale and int16 values): the digit products are integer dot products of 16-bit numbers,
//! which the CPU computes 32 at a time (AVX-512 VNNI `vpdpwssd`, AVX-512BW or AVX2
//! `vpmaddwd`, after widening the digits), and the scales and offsets (for example Q4_0's −8,
//! Q4_1's minimum, the K formats' sub-block minimums) are f32 arithmetic on the sums. Q8_0's
//! digits are signed.
//!
//! [`dot_plain`] is the scalar twin of the SIMD kernels: the same digits and constants (from
//! [`chunk`]), summed in a plain loop. The SIMD kernels add the same terms in another order,
//! so the two agree to float rounding (tested on every type and awkward sizes).

use super::QType;
use half::f16;

/// Numbers per chunk (of activations, and of a weight block as the kernels read it).
pub const CHUNK: usize = 32;

/// Rows of activations quantized to int16 per 32 numbers.
#[derive(Default, Debug, Clone)]
pub struct QuantRows {
    /// Numbers per row (a multiple of 32).
    pub cols: usize,
    /// One scale per chunk.
    pub d: Vec<f32>,
    /// The int16 values, row-major.
    pub q: Vec<i16>,
    /// Σ q over each half chunk (16 numbers).
    pub sums: Vec<i32>,
    /// The same sums times the chunk's scale (Σ of the quantized numbers of each half).
    pub xs: Vec<f32>,
    /// One row only (decoding): its values split into bytes, q = 256·hi + lo, for the
    /// unsigned × signed byte products (`vpdpbusd`) of the 32-number formats. See
    /// [`BytePairs`].
    pub bytes: BytePairs,
}

/// A row's int16 activations as bytes, in pairs of chunks (2p, 2p + 1) laid out as a pair
/// of weight blocks is decoded: 64 numbers per pair in the order chunk 2p's numbers 0–15,
/// chunk 2p + 1's 0–15, chunk 2p's 16–31, chunk 2p + 1's 16–31. A 32-bit lane of a 64-byte
/// register then holds four numbers of one chunk: lanes 0–3 and 8–11 chunk 2p, lanes 4–7
/// and 12–15 chunk 2p + 1. A trailing odd chunk has no pair and is not here.
#[derive(Default, Debug, Clone)]
pub struct BytePairs {
    /// q >> 8 (signed), 64 per pair.
    pub hi: Vec<i8>,
    /// q & 255 (unsigned), 64 per pair.
    pub lo: Vec<u8>,
    /// Each lane's chunk scale, 16 per pair.
    pub d: Vec<f32>,
    /// Each lane's Σ of its four values, 16 per pair.
    pub sums: Vec<i32>,
}

impl BytePairs {
    pub fn pairs(&self) -> usize {
        self.d.len() / 16
    }

    fn clear(&mut self) {
        self.hi.clear();
        self.lo.clear();
        self.d.clear();
        self.sums.clear();
    }

    /// Position j (0..64) of a pair → (which chunk of the pair, number within the chunk).
    #[inline]
    pub fn source(j: usize) -> (usize, usize) {
        let (g, i) = (j / 16, j % 16);
        (g % 2, 16 * (g / 2) + i)
    }

    /// The pairs of `q` (one row of whole chunks) with scales `d`.
    fn split(&mut self, q: &[i16], d: &[f32]) {
        let pairs = q.len() / (2 * CHUNK);
        self.hi.resize(64 * pairs, 0);
        self.lo.resize(64 * pairs, 0);
        self.d.resize(16 * pairs, 0.0);
        self.sums.resize(16 * pairs, 0);
        for p in 0..pairs {
            let qp = &q[p * 64..(p + 1) * 64];
            for g in 0..4 {
                let (c, from) = (g % 2, 16 * (g / 2));
                let src = &qp[c * CHUNK + from..c * CHUNK + from + 16];
                let at = p * 64 + g * 16;
                for (i, &v) in src.iter().enumerate() {
                    self.hi[at + i] = (v >> 8) as i8;
                    self.lo[at + i] = v as u8;
                }
                for l in 0..4 {
                    let lane = p * 16 + g * 4 + l;
                    self.d[lane] = d[2 * p + c];
                    self.sums[lane] = src[4 * l..4 * l + 4].iter().map(|&v| v as i32).sum();
                }
            }
        }
    }
}

/// Sixteen i32 in two registers narrowed to i16, in order (`packs` interleaves 128-bit lanes).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pack_i16(
    a: std::arch::x86_64::__m256i,
    b: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b))
}

/// The sum of sixteen i32 in two registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sum_i32(a: std::arch::x86_64::__m256i, b: std::arch::x86_64::__m256i) -> i32 {
    use std::arch::x86_64::*;
    let s = _mm256_add_epi32(a, b);
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)))
}

impl QuantRows {
    pub fn rows(&self) -> usize {
        self.d.len() * CHUNK / self.cols.max(1)
    }

    /// Quantizes x [n, cols] (cols a multiple of 32), reusing the buffers.
    pub fn quantize(&mut self, x: &[f32], cols: usize) {
        assert!(cols.is_multiple_of(CHUNK) && x.len().is_multiple_of(cols.max(1)));
        let chunks = x.len() / CHUNK;
        self.cols = cols;
        self.d.resize(chunks, 0.0);
        self.q.resize(x.len(), 0);
        self.sums.resize(2 * chunks, 0);
        self.xs.resize(2 * chunks, 0.0);
        let path = isa();
        match path {
            #[cfg(target_arch = "x86_64")]
            // Safety: isa() found AVX-512 F and BW; the buffers were sized above.
            Isa::Avx512Vnni => unsafe { self.quantize_avx512(x) },
            #[cfg(target_arch = "x86_64")]
            // Safety: isa() found AVX2; the buffers were sized above.
            Isa::Avx2 => unsafe { self.quantize_avx2(x) },
            _ => self.quantize_plain(x),
        }
        // the byte pairs feed only the VNNI decoding of one row
        if x.len() == cols && path == Isa::Avx512Vnni {
            self.bytes.split(&self.q, &self.d);
        } else {
            self.bytes.clear();
        }
    }

    /// [`QuantRows::quantize`]'s loop, plainly (the buffers already sized for x).
    fn quantize_plain(&mut self, x: &[f32]) {
        for (c, xs) in x.chunks_exact(CHUNK).enumerate() {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 32767.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            self.d[c] = d;
            let q = &mut self.q[c * CHUNK..(c + 1) * CHUNK];
            for (qv, &v) in q.iter_mut().zip(xs) {
                // ties to even, as the SIMD conversion rounds
                *qv = (v * id).round_ties_even().clamp(-32767.0, 32767.0) as i16;
            }
            self.sums[2 * c] = q[..16].iter().map(|&v| v as i32).sum();
            self.sums[2 * c + 1] = q[16..].iter().map(|&v| v as i32).sum();
            self.xs[2 * c] = d * self.sums[2 * c] as f32;
            self.xs[2 * c + 1] = d * self.sums[2 * c + 1] as f32;
        }
    }

    /// [`QuantRows::quantize`]'s loop on AVX2: the same numbers, as on AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX2; the buffers hold x.len() / 32 chunks.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(&mut self, x: &[f32]) {
        use std::arch::x86_64::*;
        let (lo, hi) = (_mm256_set1_epi32(-32767), _mm256_set1_epi32(32767));
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for c in 0..x.len() / CHUNK {
            let p = x.as_ptr().add(c * CHUNK);
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
            );
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 32767.0;
            let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            // round to nearest even (the default rounding mode), clamped
            let mut q = [_mm256_setzero_si256(); 4];
            for (q, v) in q.iter_mut().zip(v) {
                let r = _mm256_cvtps_epi32(_mm256_mul_ps(v, id));
                *q = _mm256_max_epi32(_mm256_min_epi32(r, hi), lo);
            }
            let out = self.q.as_mut_ptr().add(c * CHUNK) as *mut __m256i;
            _mm256_storeu_si256(out, pack_i16(q[0], q[1]));
            _mm256_storeu_si256(out.add(1), pack_i16(q[2], q[3]));
            let (s0, s1) = (sum_i32(q[0], q[1]), sum_i32(q[2], q[3]));
            *self.d.get_unchecked_mut(c) = d;
            *self.sums.get_unchecked_mut(2 * c) = s0;
            *self.sums.get_unchecked_mut(2 * c + 1) = s1;
            *self.xs.get_unchecked_mut(2 * c) = d * s0 as f32;
            *self.xs.get_unchecked_mut(2 * c + 1) = d * s1 as f32;
        }
    }

    /// [`QuantRows::quantize`]'s loop on AVX-512: the same numbers (the maximum is exact in
    /// any order, the products are the same f32 products, the conversion rounds to even).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW; the buffers hold x.len() / 32 chunks.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn quantize_avx512(&mut self, x: &[f32]) {
        use std::arch::x86_64::*;
        let (lo, hi) = (_mm512_set1_epi32(-32767), _mm512_set1_epi32(32767));
        for c in 0..x.len() / CHUNK {
            let p = x.as_ptr().add(c * CHUNK);
            let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let d = amax / 32767.0;
            let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
            let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
            let (q0, q1) = (
                _mm512_max_epi32(_mm512_min_epi32(q0, hi), lo),
                _mm512_max_epi32(_mm512_min_epi32(q1, hi), lo),
            );
            let out = self.q.as_mut_ptr().add(c * CHUNK) as *mut __m256i;
            _mm256_storeu_si256(out, _mm512_cvtepi32_epi16(q0));
            _mm256_storeu_si256(out.add(1), _mm512_cvtepi32_epi16(q1));
            let (s0, s1) = (_mm512_reduce_add_epi32(q0), _mm512_reduce_add_epi32(q1));
            *self.d.get_unchecked_mut(c) = d;
            *self.sums.get_unchecked_mut(2 * c) = s0;
            *self.sums.get_unchecked_mut(2 * c + 1) = s1;
            *self.xs.get_unchecked_mut(2 * c) = d * s0 as f32;
            *self.xs.get_unchecked_mut(2 * c + 1) = d * s1 as f32;
        }
    }
}

/// One weight chunk: 32 digits and the constants that turn their dot products into numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Chunk {
    pub u: [u8; 32],
    /// Q8_0: the digits are two's-complement int8, not unsigned.
    pub signed: bool,
    pub a: [f32; 2],
    pub b: [f32; 2],
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Chunks per block of `t`.
pub fn chunks_per_block(t: QType) -> usize {
    t.block() / CHUNK
}

/// Chunk `c` (numbers 32c..32c+32) of one block of `t`: number i is a·u[i] + b with the
/// a and b of its half (the numbers [`super::dequantize`] gives, to rounding).
pub fn chunk(t: QType, blk: &[u8], c: usize) -> Chunk {
    let mut u = [0u8; 32];
    let (a, b, signed);
    match t {
        QType::Q8_0 => {
            let d = h(blk, 0);
            u.copy_from_slice(&blk[2..34]);
            (a, b, signed) = ([d, d], [0.0, 0.0], true);
        }
        QType::Q4_0 | QType::Q4_1 => {
            let (d, qs) = (h(blk, 0), if t == QType::Q4_0 { 2 } else { 4 });
            for i in 0..16 {
                u[i] = blk[qs + i] & 15;
                u[16 + i] = blk[qs + i] >> 4;
            }
            let off = if t == QType::Q4_0 {
                -8.0 * d
            } else {
                h(blk, 2)
            };
            (a, b, signed) = ([d, d], [off, off], false);
        }
        QType::Q5_0 | QType::Q5_1 => {
            let d = h(blk, 0);
            let at = if t == QType::Q5_0 { 2 } else { 4 };
            let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
            for i in 0..16 {
                u[i] = (blk[at + 4 + i] & 15) | (((qh >> i) & 1) as u8) << 4;
                u[16 + i] = (blk[at + 4 + i] >> 4) | (((qh >> (16 + i)) & 1) as u8) << 4;
            }
            let off = if t == QType::Q5_0 {
                -16.0 * d
            } else {
                h(blk, 2)
            };
            (a, b, signed) = ([d, d], [off, off], false);
        }
        QType::Q2K => {
            let (sc, qs) = (&blk[..16], &blk[16..80]);
            let (d, dmin) = (h(blk, 80), h(blk, 82));
            let (g, j) = (c / 4, c % 4);
            for l in 0..32 {
                u[l] = (qs[32 * g + l] >> (2 * j)) & 3;
            }
            let s = [sc[2 * c], sc[2 * c + 1]];
            a = s.map(|s| d * (s & 15) as f32);
            b = s.map(|s| -(dmin * (s >> 4) as f32));
            signed = false;
        }
        QType::Q3K => {
            let (hmask, qs, sc) = (&blk[..32], &blk[32..96], &blk[96..108]);
            let d = h(blk, 108);
            let (g, j) = (c / 4, c % 4);
            for l in 0..32 {
                let low = (qs[32 * g + l] >> (2 * j)) & 3;
                let high = (hmask[l] >> c) & 1;
                u[l] = low | high << 2;
            }
            let scale = |i: usize| {
                let low = (sc[i % 8] >> (4 * (i / 8))) & 15;
                let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
                d * ((low | high << 4) as i32 - 32) as f32
            };
            a = [scale(2 * c), scale(2 * c + 1)];
            b = a.map(|x| -4.0 * x);
            signed = false;
        }
        QType::Q4K | QType::Q5K => {
            let (d, dmin) = (h(blk, 0), h(blk, 2));
            let (sc, mn) = super::scales_mins_k(&blk[4..16]);
            let (g, s) = (c / 2, c % 2);
            let qs = if t == QType::Q4K { 16 } else { 48 };
            for l in 0..32 {
                u[l] = (blk[qs + 32 * g + l] >> (4 * s)) & 15;
                if t == QType::Q5K {
                    u[l] |= ((blk[16 + l] >> c) & 1) << 4;
                }
            }
            let (x, m) = (d * sc[c] as f32, dmin * mn[c] as f32);
            (a, b, signed) = ([x, x], [-m, -m], false);
        }
        QType::Q6K => {
            let (ql, qh, sc) = (&blk[..128], &blk[128..192], &blk[192..208]);
            let d = h(blk, 208);
            let (g, j) = (c / 4, c % 4);
            for l in 0..32 {
                let low = (ql[64 * g + 32 * (j % 2) + l] >> (4 * (j / 2))) & 15;
                let high = (qh[32 * g + l] >> (2 * j)) & 3;
                u[l] = low | high << 4;
            }
            a = [d * sc[2 * c] as i8 as f32, d * sc[2 * c + 1] as i8 as f32];
            b = a.map(|x| -32.0 * x);
            signed = false;
        }
        QType::F32 | QType::F16 | QType::Bf16 => {
            unreachable!("float weights take the float kernels")
        }
    }
    Chunk { u, signed, a, b }
}

/// Whether quantized products handle this type (the block formats; floats have their own).
pub fn is_block_type(t: QType) -> bool {
    t.block() > 1
}

/// The dot product of one weight row (its bytes) with row `row` of `x`, plainly: the
/// twin of the SIMD kernels.
pub fn dot_plain(t: QType, w: &[u8], x: &QuantRows, row: usize) -> f32 {
    let per = chunks_per_block(t);
    let first = row * x.cols / CHUNK;
    let mut acc = 0.0f32;
    for (bi, blk) in w.chunks_exact(t.block_bytes()).enumerate() {
        for c in 0..per {
            let k = bi * per + c;
            let ch = chunk(t, blk, c);
            let q = &x.q[(first + k) * CHUNK..(first + k + 1) * CHUNK];
            let mut s = [0i32; 2];
            for (i, (&u, &qv)) in ch.u.iter().zip(q).enumerate() {
                let w = if ch.signed { u as i8 as i32 } else { u as i32 };
                s[i / 16] += w * qv as i32;
            }
            let xs = [x.sums[2 * (first + k)], x.sums[2 * (first + k) + 1]];
            let part = ch.a[0] * s[0] as f32
                + ch.a[1] * s[1] as f32
                + ch.b[0] * xs[0] as f32
                + ch.b[1] * xs[1] as f32;
            acc += x.d[first + k] * part;
        }
    }
    acc
}

/// The instruction set the quantized products use on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Plain,
    Avx2,
    Avx512Vnni,
}

/// The widest path this CPU offers (`QUILL_SIMD=scalar` forces the plain one).
pub fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if super::super::simd::has_avx512() && std::arch::is_x86_feature_detected!("avx512vnni") {
            return Isa::Avx512Vnni;
        }
        if super::super::simd::has_avx2() && std::arch::is_x86_feature_detected!("f16c") {
            return Isa::Avx2;
        }
    }
    Isa::Plain
}

/// y[i] = (row j of W) · (row i of x) for the rows i of `x` and one weight row `w`, written
/// to `y[i * y_rs]`, on the path `isa`.
pub fn dot_rows(isa: Isa, t: QType, w: &[u8], x: &QuantRows, y: &mut [f32], y_rs: usize) {
    let n = x.rows();
    debug_assert!(n == 0 || y.len() > (n - 1) * y_rs);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // Safety: `isa()` found the features each path is compiled for.
        Isa::Avx512Vnni => unsafe { x86::dot_rows_vnni(t, w, x, y, y_rs) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dot_rows_avx2(t, w, x, y, y_rs) },
        _ => {
            for i in 0..n {
                y[i * y_rs] = dot_plain(t, w, x, i);
            }
        }
    }
}

/// y[r] = (row r of W) · x for the `rows` consecutive weight rows in `w` and the one row of
/// `x` (decoding), on the path `isa`: [`dot_rows`] row by row, in memory order, with the
/// dispatch on the path and the format done once for all of them.
pub fn dot_one_row(isa: Isa, t: QType, w: &[u8], rows: usize, x: &QuantRows, y: &mut [f32]) {
    assert!(x.rows() == 1 && y.len() >= rows && (rows == 0 || w.len().is_multiple_of(rows)));
    let rb = w.len().checked_div(rows).unwrap_or(0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // Safety: `isa()` found the features the path is compiled for.
        Isa::Avx512Vnni => unsafe { x86::one_row_vnni(t, w, rows, x, y) },
        #[cfg(target_arch = "x86_64")]
        // Safety: as above.
        Isa::Avx2 => unsafe { x86::one_row_avx2(t, w, rows, x, y) },
        _ => {
            for r in 0..rows {
                dot_rows(isa, t, &w[r * rb..(r + 1) * rb], x, &mut y[r..], 1);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    //! Every helper is `#[inline(always)]` so that it compiles inside the entry points'
    //! target features, and the body is generic over the format (its GGML id) so that each
    //! format's loop has its decoding inlined with no branch on the type.
    use super::{chunks_per_block, QType, QuantRows, CHUNK};
    use std::arch::x86_64::*;

    /// Rows of x whose dot products share one decoding of a weight chunk.
    const XR: usize = 4;

    pub(in crate::kernels::quant) const Q4_0: u32 = 2;
    pub(in crate::kernels::quant) const Q4_1: u32 = 3;
    pub(in crate::kernels::quant) const Q5_0: u32 = 6;
    pub(in crate::kernels::quant) const Q5_1: u32 = 7;
    pub(in crate::kernels::quant) const Q8_0: u32 = 8;
    pub(in crate::kernels::quant) const Q2K: u32 = 10;
    pub(in crate::kernels::quant) const Q3K: u32 = 11;
    pub(in crate::kernels::quant) const Q4K: u32 = 12;
    pub(in crate::kernels::quant) const Q5K: u32 = 13;
    pub(in crate::kernels::quant) const Q6K: u32 = 14;

    /// The f16 at `p`.
    #[inline(always)]
    unsafe fn h(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// 16 bytes at `p` as 32 nibbles: low nibbles first, then high nibbles.
    #[inline(always)]
    unsafe fn nibbles16(p: *const u8) -> __m256i {
        let v = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(15);
        let lo = _mm_and_si128(v, m);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        _mm256_set_m128i(hi, lo)
    }

    /// Bits `shift`.. of each of 32 bytes, masked to `mask`.
    #[inline(always)]
    unsafe fn bits32(v: __m256i, shift: usize, mask: i8) -> __m256i {
        let s = _mm256_srl_epi16(v, _mm_cvtsi32_si128(shift as i32));
        _mm256_and_si256(s, _mm256_set1_epi8(mask))
    }

    /// The 32 fifth bits of a Q5 block (bit i of `qh` → 0x10 in byte i).
    #[inline(always)]
    unsafe fn fifth_bits(qh: u32) -> __m256i {
        let v = _mm256_set1_epi32(qh as i32);
        // byte i takes byte i / 8 of qh
        let spread = _mm256_shuffle_epi8(
            v,
            _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0x0000000000000000,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Sub-block `j`'s 6-bit scale and minimum from a K block's 12 packed bytes at `s`.
    #[inline(always)]
    unsafe fn scale_min_k(s: *const u8, j: usize) -> (u8, u8) {
        if j < 4 {
            (*s.add(j) & 63, *s.add(4 + j) & 63)
        } else {
            let (a, b, c) = (*s.add(j + 4), *s.add(j - 4), *s.add(j));
            ((a & 15) | ((b >> 6) << 4), (a >> 4) | ((c >> 6) << 4))
        }
    }

    /// A decoded chunk: 32 digits (signed for Q8_0), the scales of its halves and their
    /// offsets.
    pub(in crate::kernels::quant) struct Dec {
        pub u: __m256i,
        pub a: [f32; 2],
        pub b: [f32; 2],
    }

    /// Chunk `c` of the block at `b`, in format `T`.
    #[inline(always)]
    pub(in crate::kernels::quant) unsafe fn decode<const T: u32>(b: *const u8, c: usize) -> Dec {
        match T {
            Q8_0 => {
                let d = h(b);
                let u = _mm256_loadu_si256(b.add(2) as *const __m256i);
                Dec {
                    u,
                    a: [d, d],
                    b: [0.0; 2],
                }
            }
            Q4_0 => {
                let d = h(b);
                Dec {
                    u: nibbles16(b.add(2)),
                    a: [d, d],
                    b: [-8.0 * d; 2],
                }
            }
            Q4_1 => {
                let (d, m) = (h(b), h(b.add(2)));
                Dec {
                    u: nibbles16(b.add(4)),
                    a: [d, d],
                    b: [m, m],
                }
            }
            Q5_0 | Q5_1 => {
                let d = h(b);
                let at = if T == Q5_0 { 2 } else { 4 };
                let qh = (b.add(at) as *const u32).read_unaligned();
                let u = _mm256_or_si256(nibbles16(b.add(at + 4)), fifth_bits(qh));
                let off = if T == Q5_0 { -16.0 * d } else { h(b.add(2)) };
                Dec {
                    u,
                    a: [d, d],
                    b: [off, off],
                }
            }
            Q4K | Q5K => {
                let (sc, mn) = scale_min_k(b.add(4), c);
                let (x, m) = (h(b) * sc as f32, h(b.add(2)) * mn as f32);
                let qs = if T == Q4K { 16 } else { 48 };
                let v = _mm256_loadu_si256(b.add(qs + 32 * (c / 2)) as *const __m256i);
                let mut u = bits32(v, 4 * (c % 2), 15);
                if T == Q5K {
                    let qh = _mm256_loadu_si256(b.add(16) as *const __m256i);
                    u = _mm256_or_si256(u, _mm256_slli_epi16(bits32(qh, c, 1), 4));
                }
                Dec {
                    u,
                    a: [x, x],
                    b: [-m, -m],
                }
            }
            Q6K => {
                let d = h(b.add(208));
                let (g, j) = (c / 4, c % 4);
                let ql = _mm256_loadu_si256(b.add(64 * g + 32 * (j % 2)) as *const __m256i);
                let qh = _mm256_loadu_si256(b.add(128 + 32 * g) as *const __m256i);
                let low = bits32(ql, 4 * (j / 2), 15);
                let high = _mm256_slli_epi16(bits32(qh, 2 * j, 3), 4);
                let sc = b.add(192 + 2 * c) as *const i8;
                let a = [d * *sc as f32, d * *sc.add(1) as f32];
                Dec {
                    u: _mm256_or_si256(low, high),
                    a,
                    b: a.map(|x| -32.0 * x),
                }
            }
            Q2K => {
                let (d, dmin) = (h(b.add(80)), h(b.add(82)));
                let (g, j) = (c / 4, c % 4);
                let v = _mm256_loadu_si256(b.add(16 + 32 * g) as *const __m256i);
                let s = [*b.add(2 * c), *b.add(2 * c + 1)];
                Dec {
                    u: bits32(v, 2 * j, 3),
                    a: s.map(|s| d * (s & 15) as f32),
                    b: s.map(|s| -(dmin * (s >> 4) as f32)),
                }
            }
            Q3K => {
                let d = h(b.add(108));
                let (g, j) = (c / 4, c % 4);
                let v = _mm256_loadu_si256(b.add(32 + 32 * g) as *const __m256i);
                let hm = _mm256_loadu_si256(b as *const __m256i);
                let high = _mm256_slli_epi16(bits32(hm, c, 1), 2);
                let sc = b.add(96);
                let scale = |i: usize| {
                    let low = (*sc.add(i % 8) >> (4 * (i / 8))) & 15;
                    let high = (*sc.add(8 + i % 4) >> (2 * (i / 4))) & 3;
                    d * ((low | high << 4) as i32 - 32) as f32
                };
                let a = [scale(2 * c), scale(2 * c + 1)];
                Dec {
                    u: _mm256_or_si256(bits32(v, 2 * j, 3), high),
                    a,
                    b: a.map(|x| -4.0 * x),
                }
            }
            _ => unreachable!(),
        }
    }

    /// [`decode`] where AVX-512 (BW, VL) is present: the Q5 formats' fifth bits in one masked
    /// move (bit i of the mask sets 0x10 in byte i), the same digits as [`fifth_bits`].
    #[inline(always)]
    pub(in crate::kernels::quant) unsafe fn decode512<const T: u32>(b: *const u8, c: usize) -> Dec {
        if T == Q5_0 || T == Q5_1 {
            let d = h(b);
            let at = if T == Q5_0 { 2 } else { 4 };
            let qh = (b.add(at) as *const u32).read_unaligned();
            let high = _mm256_maskz_mov_epi8(qh, _mm256_set1_epi8(0x10));
            let off = if T == Q5_0 { -16.0 * d } else { h(b.add(2)) };
            return Dec {
                u: _mm256_or_si256(nibbles16(b.add(at + 4)), high),
                a: [d, d],
                b: [off, off],
            };
        }
        decode::<T>(b, c)
    }

    /// Whether the format's two halves of a chunk have scales of their own.
    pub(in crate::kernels::quant) const fn split(t: u32) -> bool {
        matches!(t, Q2K | Q3K | Q6K)
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// A chunk's 32 digits as 16-bit numbers in two registers (its halves), centred where
    /// the format's offset is a fixed multiple of its scale ([`centre`]).
    #[inline(always)]
    unsafe fn widen_avx2<const T: u32>(dec: &Dec) -> [__m256i; 2] {
        let (lo, hi) = (
            _mm256_castsi256_si128(dec.u),
            _mm256_extracti128_si256(dec.u, 1),
        );
        let u = if T == Q8_0 {
            [_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi)]
        } else {
            [_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi)]
        };
        let c0 = centre(T);
        if c0 == 0 {
            return u;
        }
        let c = _mm256_set1_epi16(c0);
        [_mm256_sub_epi16(u[0], c), _mm256_sub_epi16(u[1], c)]
    }

    /// Adds one widened chunk's products with activation chunk `xc` into `acc` (`vpmaddwd`
    /// sums the 16-bit products in pairs, exactly in i32), scaled; returns its offset term.
    #[inline(always)]
    unsafe fn chunk_avx2<const T: u32>(
        u: &[__m256i; 2],
        dec: &Dec,
        x: &QuantRows,
        xc: usize,
        acc: &mut __m256,
    ) -> f32 {
        let q = x.q.as_ptr().add(xc * CHUNK) as *const __m256i;
        let p0 = _mm256_madd_epi16(u[0], _mm256_loadu_si256(q));
        let p1 = _mm256_madd_epi16(u[1], _mm256_loadu_si256(q.add(1)));
        let dx = *x.d.get_unchecked(xc);
        if split(T) {
            let s0 = _mm256_set1_ps(dec.a[0] * dx);
            let s1 = _mm256_set1_ps(dec.a[1] * dx);
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), s0, *acc);
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), s1, *acc);
        } else {
            let p = _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1));
            *acc = _mm256_fmadd_ps(p, _mm256_set1_ps(dec.a[0] * dx), *acc);
        }
        if centre(T) != 0 || T == Q8_0 {
            return 0.0;
        }
        let xs = x.xs.as_ptr().add(2 * xc);
        dec.b[0] * *xs + dec.b[1] * *xs.add(1)
    }

    /// The AVX2 body: rows of x in groups of up to [`XR`] ([`rows_avx2`]), each chunk of W
    /// decoded once per group.
    #[inline(always)]
    unsafe fn body_avx2<const T: u32>(w: &[u8], x: &QuantRows, y: &mut [f32], y_rs: usize) {
        let n = x.rows();
        if n == 1 {
            let (v, off) = row_sum_avx2::<T>(w, x);
            *y.get_unchecked_mut(0) = hsum(v) + off;
            return;
        }
        let mut i0 = 0;
        while i0 < n {
            let y = y.get_unchecked_mut(i0 * y_rs..);
            match n - i0 {
                1 => rows_avx2::<T, 1>(w, x, i0, y, y_rs),
                2 => rows_avx2::<T, 2>(w, x, i0, y, y_rs),
                3 => rows_avx2::<T, 3>(w, x, i0, y, y_rs),
                _ => rows_avx2::<T, XR>(w, x, i0, y, y_rs),
            }
            i0 += XR;
        }
    }

    /// One weight row against rows i0..i0 + M of x (M fixed, so that the accumulators stay
    /// in registers), written to y[r * y_rs].
    #[inline(always)]
    unsafe fn rows_avx2<const T: u32, const M: usize>(
        w: &[u8],
        x: &QuantRows,
        i0: usize,
        y: &mut [f32],
        y_rs: usize,
    ) {
        let t = QType::from_ggml(T).expect("a block type");
        let (per, bb) = (chunks_per_block(t), t.block_bytes());
        let chunks_row = x.cols / CHUNK;
        let mut acc = [_mm256_setzero_ps(); M];
        let mut off = [0.0f32; M];
        for bi in 0..w.len() / bb {
            let b = w.as_ptr().add(bi * bb);
            for c in 0..per {
                let dec = decode::<T>(b, c);
                let u = widen_avx2::<T>(&dec);
                let k = bi * per + c;
                for r in 0..M {
                    let xc = (i0 + r) * chunks_row + k;
                    off[r] += chunk_avx2::<T>(&u, &dec, x, xc, &mut acc[r]);
                }
            }
        }
        for r in 0..M {
            *y.get_unchecked_mut(r * y_rs) = hsum(acc[r]) + off[r];
        }
    }

    /// One weight row against x's one row (decoding) on AVX2: two chunks at a time into two
    /// accumulators, so that one chunk's additions do not wait for the previous one's; its 8
    /// lanes of sums and its offset term, not yet added up.
    #[inline(always)]
    unsafe fn row_sum_avx2<const T: u32>(w: &[u8], x: &QuantRows) -> (__m256, f32) {
        let t = QType::from_ggml(T).expect("a block type");
        let (per, bb) = (chunks_per_block(t), t.block_bytes());
        let total = w.len() / bb * per;
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut o0, mut o1) = (0.0f32, 0.0f32);
        let p = w.as_ptr();
        if per == 1 {
            // 32-number blocks: two blocks at a time
            let mut k = 0;
            while k + 1 < total {
                o0 += chunk_at_avx2::<T>(p.add(k * bb), 0, x, k, &mut a0);
                o1 += chunk_at_avx2::<T>(p.add((k + 1) * bb), 0, x, k + 1, &mut a1);
                k += 2;
            }
            if k < total {
                o0 += chunk_at_avx2::<T>(p.add(k * bb), 0, x, k, &mut a0);
            }
        } else {
            // 256-number blocks (8 chunks): two chunks of a block at a time
            for bi in 0..total / per {
                let b = p.add(bi * bb);
                for c in (0..per).step_by(2) {
                    o0 += chunk_at_avx2::<T>(b, c, x, bi * per + c, &mut a0);
                    o1 += chunk_at_avx2::<T>(b, c + 1, x, bi * per + c + 1, &mut a1);
                }
            }
        }
        (_mm256_add_ps(a0, a1), o0 + o1)
    }

    /// Chunk `c` of the block at `b` against activation chunk `xc`, into `acc` (a function,
    /// not a closure: closures do not take the caller's target features).
    #[inline(always)]
    unsafe fn chunk_at_avx2<const T: u32>(
        b: *const u8,
        c: usize,
        x: &QuantRows,
        xc: usize,
        acc: &mut __m256,
    ) -> f32 {
        let dec = decode::<T>(b, c);
        chunk_avx2::<T>(&widen_avx2::<T>(&dec), &dec, x, xc, acc)
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `w` is `rows` whole rows of blocks of `t` for x's one
    /// row; y holds `rows` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn one_row_avx2(t: QType, w: &[u8], rows: usize, x: &QuantRows, y: &mut [f32]) {
        per_type!(t, one_row_body_avx2, w, rows, x, y)
    }

    #[inline(always)]
    unsafe fn one_row_body_avx2<const T: u32>(w: &[u8], rows: usize, x: &QuantRows, y: &mut [f32]) {
        let rb = w.len() / rows.max(1);
        let p = w.as_ptr();
        let mut r = 0;
        // four rows' lanes added up together: fewer instructions than four reductions
        while r + 4 <= rows {
            let row = |r: usize| std::slice::from_raw_parts(p.add(r * rb), rb);
            let (v0, o0) = row_sum_avx2::<T>(row(r), x);
            let (v1, o1) = row_sum_avx2::<T>(row(r + 1), x);
            let (v2, o2) = row_sum_avx2::<T>(row(r + 2), x);
            let (v3, o3) = row_sum_avx2::<T>(row(r + 3), x);
            let h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let s = _mm_add_ps(s, _mm_set_ps(o3, o2, o1, o0));
            _mm_storeu_ps(y.as_mut_ptr().add(r), s);
            r += 4;
        }
        while r < rows {
            let (v, off) = row_sum_avx2::<T>(w.get_unchecked(r * rb..(r + 1) * rb), x);
            *y.get_unchecked_mut(r) = hsum(v) + off;
            r += 1;
        }
    }

    /// The AVX-512 body: a chunk's 32 digits widened into one register, their products with
    /// the 32 activations in 16 i32 lanes (lanes 0–7 the first half: `vpdpwssd`), scaled into
    /// f32 accumulators.
    #[inline(always)]
    unsafe fn body_avx512<const T: u32>(w: &[u8], x: &QuantRows, y: &mut [f32], y_rs: usize) {
        let t = QType::from_ggml(T).expect("a block type");
        let (n, per, bb) = (x.rows(), chunks_per_block(t), t.block_bytes());
        let chunks_row = x.cols / CHUNK;
        if n == 1 {
            let (v, off) = row_sum::<T>(w, x);
            *y.get_unchecked_mut(0) = _mm512_reduce_add_ps(v) + off;
            return;
        }
        let mut i0 = 0;
        while i0 < n {
            let m = (n - i0).min(XR);
            let mut acc = [_mm512_setzero_ps(); XR];
            let mut off = [0.0f32; XR];
            for bi in 0..w.len() / bb {
                let b = w.as_ptr().add(bi * bb);
                for c in 0..per {
                    // widened once, used by every row of the block
                    let wide = widen512::<T>(&decode512::<T>(b, c));
                    let k = bi * per + c;
                    for r in 0..m {
                        let xc = (i0 + r) * chunks_row + k;
                        off[r] += chunk_avx512::<T>(&wide, x, xc, &mut acc[r]);
                    }
                }
            }
            for r in 0..m {
                *y.get_unchecked_mut((i0 + r) * y_rs) = _mm512_reduce_add_ps(acc[r]) + off[r];
            }
            i0 += m;
        }
    }

    /// Whether format `T` decodes with [`pair_vnni`]: one scale per 32-number block and
    /// unsigned digits below 128.
    const fn byte_pairs(t: u32) -> bool {
        matches!(t, Q4_0 | Q4_1 | Q5_0 | Q5_1)
    }

    /// Blocks `b` and the next one of a format of [`byte_pairs`] against activation pair `p`
    /// (chunks 2p, 2p + 1), added into `acc`; returns the offset term. The 64 digits sit
    /// in one register in [`super::BytePairs`]' order, as unsigned bytes; their products
    /// with the activations are two byte products, digits × hi (u8 × s8) and lo × digits
    /// (u8 × s8, the digits below 128), with Σ u·q = 256·Σ u·hi + Σ u·lo exactly in i32.
    #[inline(always)]
    unsafe fn pair_vnni<const T: u32>(
        b: *const u8,
        x: &QuantRows,
        p: usize,
        idx: __m512i,
        acc: &mut __m512,
    ) -> f32 {
        // the block's bytes, and where its nibbles start (after d; d and m; d and qh; all three)
        let (bb, qs) = match T {
            Q4_0 => (18, 2),
            Q4_1 => (20, 4),
            Q5_0 => (22, 6),
            _ => (24, 8),
        };
        let b1 = b.add(bb);
        let v = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(b.add(qs) as *const __m128i)),
            _mm_loadu_si128(b1.add(qs) as *const __m128i),
            1,
        );
        let lo4 = _mm256_and_si256(v, _mm256_set1_epi8(15));
        let hi4 = _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15));
        let mut u = _mm512_inserti64x4(_mm512_castsi256_si512(lo4), hi4, 1);
        if T == Q5_0 || T == Q5_1 {
            let at = if T == Q5_0 { 2 } else { 4 };
            let h0 = (b.add(at) as *const u32).read_unaligned() as u64;
            let h1 = (b1.add(at) as *const u32).read_unaligned() as u64;
            let mask = (h0 & 0xffff) | (h1 & 0xffff) << 16 | (h0 >> 16) << 32 | (h1 >> 16) << 48;
            u = _mm512_or_si512(u, _mm512_maskz_mov_epi8(mask, _mm512_set1_epi8(0x10)));
        }
        let bp = &x.bytes;
        let hi = _mm512_loadu_si512(bp.hi.as_ptr().add(64 * p) as *const _);
        let lo = _mm512_loadu_si512(bp.lo.as_ptr().add(64 * p) as *const _);
        let ph = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, hi);
        let pl = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, u);
        let mut pi = _mm512_add_epi32(_mm512_slli_epi32(ph, 8), pl);
        let c0 = centre(T);
        if c0 != 0 {
            let sums = _mm512_loadu_si512(bp.sums.as_ptr().add(16 * p) as *const _);
            // Σ (u − c)·q = Σ u·q − c·Σ q, c = 8 (Q4_0) or 16 (Q5_0)
            let cs = if T == Q4_0 {
                _mm512_slli_epi32::<3>(sums)
            } else {
                _mm512_slli_epi32::<4>(sums)
            };
            pi = _mm512_sub_epi32(pi, cs);
        }
        let dd = ((b as *const u16).read_unaligned() as i32)
            | ((b1 as *const u16).read_unaligned() as i32) << 16;
        let d2 = _mm_cvtph_ps(_mm_cvtsi32_si128(dd));
        let wd = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(d2));
        let scale = _mm512_mul_ps(wd, _mm512_loadu_ps(bp.d.as_ptr().add(16 * p)));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pi), scale, *acc);
        if c0 != 0 {
            return 0.0;
        }
        // Q4_1, Q5_1: the blocks' minimums times the sums of the chunks' quantized numbers
        let xs = x.xs.as_ptr().add(4 * p);
        h(b.add(2)) * (*xs + *xs.add(1)) + h(b1.add(2)) * (*xs.add(2) + *xs.add(3))
    }

    /// One weight row against x's one row (decoding): its 16 lanes of sums and its offset
    /// term, not yet added up.
    #[inline(always)]
    unsafe fn row_sum<const T: u32>(w: &[u8], x: &QuantRows) -> (__m512, f32) {
        let t = QType::from_ggml(T).expect("a block type");
        let (per, bb) = (chunks_per_block(t), t.block_bytes());
        let chunks_row = x.cols / CHUNK;
        // one row (decoding): two chunks at a time into two accumulators, so that the
        // additions of one chunk do not wait for the previous one's
        let total = w.len() / bb * per;
        let (mut acc, mut off) = ([_mm512_setzero_ps(); 2], [0.0f32; 2]);
        let mut k = 0;
        if byte_pairs(T) && x.bytes.pairs() == chunks_row / 2 {
            // two blocks per register with the activations' bytes (see BytePairs)
            let idx = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
            // two pairs an iteration, each into its own register (an index that varies
            // would keep the accumulators in memory)
            let (mut a0, mut a1) = (acc[0], acc[1]);
            while k + 3 < total {
                let b = w.as_ptr().add(k * bb);
                off[0] += pair_vnni::<T>(b, x, k / 2, idx, &mut a0);
                off[1] += pair_vnni::<T>(b.add(2 * bb), x, k / 2 + 1, idx, &mut a1);
                k += 4;
            }
            if k + 1 < total {
                off[0] += pair_vnni::<T>(w.as_ptr().add(k * bb), x, k / 2, idx, &mut a0);
                k += 2;
            }
            acc = [a0, a1];
        }
        while k < total {
            for (lane, kk) in [k, k + 1].into_iter().enumerate() {
                if kk < total {
                    let dec = decode512::<T>(w.as_ptr().add(kk / per * bb), kk % per);
                    off[lane] += chunk_avx512::<T>(&widen512::<T>(&dec), x, kk, &mut acc[lane]);
                }
            }
            k += 2;
        }
        (_mm512_add_ps(acc[0], acc[1]), off[0] + off[1])
    }

    /// A decoded chunk ready for AVX-512: its 32 digits as 16-bit numbers, and its halves'
    /// scales as [a₀ ×8, a₁ ×8].
    struct Wide {
        u: __m512i,
        a: __m512,
        b: [f32; 2],
    }

    #[inline(always)]
    unsafe fn widen512<const T: u32>(dec: &Dec) -> Wide {
        let u = if T == Q8_0 {
            _mm512_cvtepi8_epi16(dec.u)
        } else {
            _mm512_cvtepu8_epi16(dec.u)
        };
        // digits centred where the offset is a fixed multiple of the scale: no offset term
        let c0 = centre(T);
        let (u, b) = if c0 != 0 {
            (_mm512_sub_epi16(u, _mm512_set1_epi16(c0)), [0.0; 2])
        } else {
            (u, dec.b)
        };
        let a = if split(T) {
            _mm512_castsi512_ps(_mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_castps_si256(_mm256_set1_ps(dec.a[0]))),
                _mm256_castps_si256(_mm256_set1_ps(dec.a[1])),
                1,
            ))
        } else {
            _mm512_set1_ps(dec.a[0])
        };
        Wide { u, a, b }
    }

    /// Adds one chunk's scaled products against activation chunk `xc` into `acc` (16 lanes);
    /// returns its offset term.
    #[inline(always)]
    unsafe fn chunk_avx512<const T: u32>(
        w: &Wide,
        x: &QuantRows,
        xc: usize,
        acc: &mut __m512,
    ) -> f32 {
        let q = _mm512_loadu_si512(x.q.as_ptr().add(xc * CHUNK) as *const _);
        let p = _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w.u, q));
        let scale = _mm512_mul_ps(w.a, _mm512_set1_ps(*x.d.get_unchecked(xc)));
        *acc = _mm512_fmadd_ps(p, scale, *acc);
        if centre(T) != 0 || T == Q8_0 {
            return 0.0;
        }
        let xs = x.xs.as_ptr().add(2 * xc);
        w.b[0] * *xs + w.b[1] * *xs.add(1)
    }

    /// The value the digits of format `T` are centred on before their products (its offset
    /// is −centre × scale), as in the packed panels of [`super::super::gemm`].
    const fn centre(t: u32) -> i16 {
        match t {
            Q4_0 => 8,
            Q5_0 => 16,
            Q3K => 4,
            Q6K => 32,
            _ => 0,
        }
    }

    /// `$body::<id>(args)` for the format `$t`.
    macro_rules! per_type {
        ($t:expr, $body:ident, $($a:expr),*) => {
            match $t {
                QType::Q4_0 => $body::<Q4_0>($($a),*),
                QType::Q4_1 => $body::<Q4_1>($($a),*),
                QType::Q5_0 => $body::<Q5_0>($($a),*),
                QType::Q5_1 => $body::<Q5_1>($($a),*),
                QType::Q8_0 => $body::<Q8_0>($($a),*),
                QType::Q2K => $body::<Q2K>($($a),*),
                QType::Q3K => $body::<Q3K>($($a),*),
                QType::Q4K => $body::<Q4K>($($a),*),
                QType::Q5K => $body::<Q5K>($($a),*),
                QType::Q6K => $body::<Q6K>($($a),*),
                QType::F32 | QType::F16 | QType::Bf16 => unreachable!("a block type"),
            }
        };
    }
    pub(in crate::kernels::quant) use per_type;

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `w` is whole blocks of `t` for a row of `x.cols`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_avx2(t: QType, w: &[u8], x: &QuantRows, y: &mut [f32], y_rs: usize) {
        per_type!(t, body_avx2, w, x, y, y_rs)
    }

    /// # Safety
    /// The CPU has AVX-512 (F, BW, VL) with VNNI, AVX2, FMA and F16C; `w` is `rows` whole
    /// rows of blocks of `t` for x's one row; y holds `rows` values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn one_row_vnni(t: QType, w: &[u8], rows: usize, x: &QuantRows, y: &mut [f32]) {
        per_type!(t, one_row_avx512, w, rows, x, y)
    }

    #[inline(always)]
    unsafe fn one_row_avx512<const T: u32>(w: &[u8], rows: usize, x: &QuantRows, y: &mut [f32]) {
        let rb = w.len() / rows.max(1);
        let row = |r: usize| row_sum::<T>(w.get_unchecked(r * rb..(r + 1) * rb), x);
        let mut r = 0;
        // four rows' lanes added up together: fewer instructions than four reductions
        while r + 4 <= rows {
            let ((v0, o0), (v1, o1), (v2, o2), (v3, o3)) =
                (row(r), row(r + 1), row(r + 2), row(r + 3));
            let half = |v: __m512| {
                _mm256_add_ps(
                    _mm512_castps512_ps256(v),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
                )
            };
            let h = _mm256_hadd_ps(
                _mm256_hadd_ps(half(v0), half(v1)),
                _mm256_hadd_ps(half(v2), half(v3)),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let s = _mm_add_ps(s, _mm_set_ps(o3, o2, o1, o0));
            _mm_storeu_ps(y.as_mut_ptr().add(r), s);
            r += 4;
        }
        while r < rows {
            let (v, off) = row(r);
            *y.get_unchecked_mut(r) = _mm512_reduce_add_ps(v) + off;
            r += 1;
        }
    }

    /// # Safety
    /// The CPU has AVX-512 (F, BW, VL) with VNNI, AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_rows_vnni(t: QType, w: &[u8], x: &QuantRows, y: &mut [f32], y_rs: usize) {
        per_type!(t, body_avx512, w, x, y, y_rs)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::dequantize;
    use super::*;
    use crate::rng::Rng;

    fn block_types() -> impl Iterator<Item = QType> {
        QType::ALL.into_iter().filter(|t| is_block_type(*t))
    }

    /// Byte offsets of each format's f16 scales.
    fn scale_offsets(t: QType) -> &'static [usize] {
        match t {
            QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => &[0, 2],
            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => &[0],
            QType::Q2K => &[80, 82],
            QType::Q3K => &[108],
            QType::Q6K => &[208],
            _ => &[],
        }
    }

    /// `rows` rows of `cols` numbers of random blocks (random digits and sub-scales, finite
    /// f16 scales of either sign).
    pub fn random_weights(t: QType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        let n = rows * cols / t.block();
        let mut b: Vec<u8> = (0..n * t.block_bytes())
            .map(|_| rng.below(256) as u8)
            .collect();
        for blk in b.chunks_exact_mut(t.block_bytes()) {
            for &at in scale_offsets(t) {
                let d = half::f16::from_f32((rng.uniform() as f32 - 0.5) * 0.1);
                blk[at..at + 2].copy_from_slice(&d.to_le_bytes());
            }
        }
        b
    }

    pub fn random_x(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n)
            .map(|i| {
                // a few chunks of zeros and of one large value
                if i % 97 < 32 && i % 3 == 0 {
                    0.0
                } else {
                    (rng.normal() * if i % 41 == 0 { 8.0 } else { 1.0 }) as f32
                }
            })
            .collect()
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Plain];
        #[cfg(target_arch = "x86_64")]
        {
            let f16c = std::arch::is_x86_feature_detected!("f16c");
            if crate::kernels::simd::has_avx2() && f16c {
                v.push(Isa::Avx2);
            }
            if isa() == Isa::Avx512Vnni {
                v.push(Isa::Avx512Vnni);
            }
        }
        eprintln!("quantized product paths tested: {v:?}");
        v
    }

    /// Each chunk's digits and constants give the numbers `dequantize` gives.
    #[test]
    fn chunks_decode_to_the_dequantized_numbers() {
        let mut rng = Rng::new(1);
        for t in block_types() {
            let w = random_weights(t, 2, 2 * t.block(), &mut rng);
            let mut want = vec![0.0; 4 * t.block()];
            dequantize(t, &w, &mut want);
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (bi, blk) in w.chunks_exact(t.block_bytes()).enumerate() {
                for c in 0..chunks_per_block(t) {
                    let ch = chunk(t, blk, c);
                    for (i, &u) in ch.u.iter().enumerate() {
                        let digit = if ch.signed { u as i8 as f32 } else { u as f32 };
                        let got = ch.a[i / 16] * digit + ch.b[i / 16];
                        let w = want[bi * t.block() + c * CHUNK + i];
                        assert!((got - w).abs() <= 1e-6 * scale, "{t:?} {got} vs {w}");
                    }
                }
            }
        }
    }

    /// The plain dot product is the float64 product of the dequantized weights with the
    /// dequantized activations; each SIMD path equals the plain one to rounding; and the
    /// activation quantization costs at most half a step per number.
    #[test]
    fn simd_and_plain_products_agree_with_float64_on_awkward_sizes() {
        let mut rng = Rng::new(2);
        let paths = isas();
        for t in block_types() {
            let col_choices: &[usize] = if t.block() == 32 {
                &[32, 160, 192, 544]
            } else {
                &[256, 768]
            };
            for &cols in col_choices {
                for n in [1, 2, 3, 4, 5, 7, 9] {
                    // six weight rows: decoding's four-row group and a remainder
                    let out = 6;
                    let w = random_weights(t, out, cols, &mut rng);
                    let x = random_x(n * cols, &mut rng);
                    let mut xq = QuantRows::default();
                    xq.quantize(&x, cols);
                    assert_eq!(xq.rows(), n);
                    let rb = w.len() / out;
                    let mut wd = vec![0.0; out * cols];
                    dequantize(t, &w, &mut wd);
                    // one row of x: all the weight rows in one call too
                    let mut one = vec![vec![f32::NAN; out + 1]; paths.len()];
                    if n == 1 {
                        for (y, &p) in one.iter_mut().zip(&paths) {
                            dot_one_row(p, t, &w, out, &xq, y);
                            assert!(y[out].is_nan(), "wrote past its rows");
                        }
                    }
                    for j in 0..out {
                        let wrow = &wd[j * cols..(j + 1) * cols];
                        for (pi, &p) in paths.iter().enumerate() {
                            let mut y = vec![f32::NAN; n * 2];
                            dot_rows(p, t, &w[j * rb..(j + 1) * rb], &xq, &mut y, 2);
                            if n == 1 {
                                y[1] = one[pi][j];
                            }
                            for i in 0..n {
                                let (mut exact, mut deq, mut mag, mut bound) = (0.0, 0.0, 0.0, 0.0);
                                for k in 0..cols {
                                    let dx = xq.d[(i * cols + k) / CHUNK] as f64;
                                    let xv = x[i * cols + k] as f64;
                                    let qv = xq.q[i * cols + k] as f64 * dx;
                                    exact += wrow[k] as f64 * xv;
                                    deq += wrow[k] as f64 * qv;
                                    mag += (wrow[k] as f64 * qv).abs();
                                    bound += (wrow[k] as f64).abs() * dx * 0.5;
                                }
                                let got = y[2 * i] as f64;
                                let tol = 2e-6 * mag + 1e-7;
                                assert!(
                                    (got - deq).abs() <= tol,
                                    "{t:?} {p:?} cols {cols} n {n}: {got} vs {deq}"
                                );
                                assert!((got - exact).abs() <= bound * 1.01 + tol);
                                if n == 1 {
                                    // dot_one_row's value for this row
                                    let got = y[1] as f64;
                                    assert!(
                                        (got - deq).abs() <= tol,
                                        "{t:?} {p:?} cols {cols} one row {j}: {got} vs {deq}"
                                    );
                                } else {
                                    assert!(y[2 * i + 1].is_nan(), "wrote outside its stride");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The SIMD quantization gives the plain loop's numbers exactly, ties included.
    #[test]
    fn simd_and_plain_quantization_agree_exactly() {
        let mut rng = Rng::new(4);
        let mut x = random_x(40 * 64, &mut rng);
        // a chunk whose values fall on half steps (ties) and one of zeros
        for (i, v) in x[..32].iter_mut().enumerate() {
            *v = if i == 0 { 32767.0 } else { i as f32 + 0.5 };
        }
        x[32..64].fill(0.0);
        let mut fast = QuantRows::default();
        fast.quantize(&x, 64);
        let mut plain = fast.clone();
        plain.quantize_plain(&x);
        assert_eq!(fast.q, plain.q);
        assert_eq!(fast.d, plain.d);
        assert_eq!(fast.sums, plain.sums);
        assert_eq!(fast.xs, plain.xs);
    }

    #[test]
    fn activations_quantize_to_the_nearest_step() {
        let mut rng = Rng::new(3);
        let x = random_x(3 * 64, &mut rng);
        let mut q = QuantRows::default();
        q.quantize(&x, 64);
        for (c, xs) in x.chunks(32).enumerate() {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.d[c], amax / 32767.0);
            for (i, &v) in xs.iter().enumerate() {
                let qv = q.q[c * 32 + i] as f32;
                assert!(qv.abs() <= 32767.0);
                if q.d[c] > 0.0 {
                    assert!((qv - v / q.d[c]).abs() <= 0.5 + 1e-4);
                } else {
                    assert_eq!(qv, 0.0);
                }
            }
            let s: i32 = q.q[c * 32..c * 32 + 16].iter().map(|&v| v as i32).sum();
            assert_eq!(q.sums[2 * c], s);
        }
    }
}

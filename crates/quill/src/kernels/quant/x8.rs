//! Q4_0, Q4_1, Q5_0, Q8_0 and Q6_K matrices with their rows interleaved in groups of eight, for the AVX2
//! products (where the row-by-row kernels of [`super::dot`] spend most of their instructions
//! widening one row's digits and scaling one row's sums at a time).
//!
//! The layout is a permutation of the file's bits, the same size: the first ⌊rows / 8⌋ · 8
//! rows form groups of eight; a group holds, for each block column k in turn, the eight rows'
//! f16 scales (then, for Q4_1, their eight f16 minimums) and the eight rows' digits as 32-byte
//! vectors, the 32-bit lane r of each belonging to row r of the group:
//!
//! - Q4_0, Q4_1, Q5_0: four vectors; lane r of vector L holds eight nibbles: nibble j (j < 4,
//!   bits 4j..4j+4) is digit 2(4L + j) of the block, nibble 4 + j (bits 16 + 4j..) digit
//!   2(4L + j) + 1 (Q5_0: the low four bits of those digits); then for Q5_0 one vector of
//!   their fifth bits: bit 4L + j of lane r is digit 2(4L + j)'s, bit 16 + 4L + j digit
//!   2(4L + j) + 1's, so that one shift and a mask put it above its nibble's place;
//! - Q8_0: eight vectors; lane r of vector L holds the bytes of digits 4L, 4L + 2, 4L + 1,
//!   4L + 3, in that order.
//!
//! Q6_K's block columns (256 numbers) are laid out as the private module `q6k` says.
//!
//! Rows past the last whole group stay in the file's layout, where they were.
//!
//! One 256-bit load then gives, with a shift and a mask (or two arithmetic shifts) per pair,
//! the digits of eight rows as 16-bit pairs (digit 2m, digit 2m + 1) per lane, and `vpmaddwd`
//! against the activations' pair m broadcast to every lane adds both products into each row's
//! lane: the digits are never shuffled, and one conversion and one fused multiply-add scale
//! the eight rows' sums of a block together. For Q4_0 the offset −8 comes off the integer
//! sums (exactly: Σ (u − 8)·q = Σ u·q − 8·Σ q); Q4_1's minimum multiplies the activations'
//! sum.
//!
//! [`unpack_rows`], [`dequantize_row`] and [`dequantize_rows`] give rows back in the file's
//! layout or as numbers: every other reader (embedding rows, the prompt products, training
//! with a frozen base, the plain twin) goes through them.

use super::dot::{dot_plain, QuantRows, CHUNK};
use super::QType;
use rayon::prelude::*;

/// Rows per group.
pub const ROWS: usize = 8;

/// The formats that can be interleaved.
pub const TYPES: [QType; 5] = [
    QType::Q4_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q8_0,
    QType::Q6K,
];

/// Whether matrices of `t` can be interleaved.
pub fn packable(t: QType) -> bool {
    TYPES.contains(&t)
}

/// Whether a model opened here keeps matrices of `t` interleaved: where the quantized
/// products take their AVX2 path (on AVX-512 VNNI the row kernels pair blocks in one
/// register instead, and the plain path reads the file's layout).
pub fn wanted(t: QType) -> bool {
    packable(t) && super::dot::isa() == super::dot::Isa::Avx2
}

/// Bytes of the eight rows' scales (and minimums) at the start of a group's block column.
fn scale_bytes(t: QType) -> usize {
    if t == QType::Q4_1 {
        32
    } else {
        16
    }
}

/// Bytes of a block before its digits (d, or d and m, or d and Q5_0's fifth bits).
fn digits_at(t: QType) -> usize {
    match t {
        QType::Q4_1 => 4,
        QType::Q5_0 => 6,
        _ => 2,
    }
}

/// The 32 digits of a block in the file's layout (Q8_0's as two's-complement bytes).
fn digits(t: QType, blk: &[u8]) -> [u8; 32] {
    let at = digits_at(t);
    let mut u = [0u8; 32];
    if t == QType::Q8_0 {
        u.copy_from_slice(&blk[at..at + 32]);
        return u;
    }
    let qh = match t {
        QType::Q5_0 => u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]),
        _ => 0,
    };
    for i in 0..16 {
        u[i] = blk[at + i] & 15 | (((qh >> i) & 1) as u8) << 4;
        u[16 + i] = blk[at + i] >> 4 | (((qh >> (16 + i)) & 1) as u8) << 4;
    }
    u
}

/// Q5_0's vector of fifth bits: lane word of 32 digits.
fn fifth_word(u: &[u8; 32]) -> u32 {
    let mut w = 0u32;
    for l in 0..4 {
        for j in 0..4 {
            w |= ((u[8 * l + 2 * j] >> 4) as u32) << (4 * l + j);
            w |= ((u[8 * l + 2 * j + 1] >> 4) as u32) << (16 + 4 * l + j);
        }
    }
    w
}

/// Adds the fifth bits of a lane word from [`fifth_word`] back to the digits.
fn fifth_digits(w: u32, u: &mut [u8; 32]) {
    for l in 0..4 {
        for j in 0..4 {
            u[8 * l + 2 * j] |= (((w >> (4 * l + j)) & 1) as u8) << 4;
            u[8 * l + 2 * j + 1] |= (((w >> (16 + 4 * l + j)) & 1) as u8) << 4;
        }
    }
}

/// The 32-byte vectors of a block column, and the digits of vector L's lane as a u32.
fn vectors(t: QType) -> usize {
    if t == QType::Q8_0 {
        8
    } else {
        4
    }
}

fn lane_word(t: QType, u: &[u8; 32], l: usize) -> u32 {
    if t == QType::Q8_0 {
        return u32::from_le_bytes([u[4 * l], u[4 * l + 2], u[4 * l + 1], u[4 * l + 3]]);
    }
    let mut w = 0u32;
    for j in 0..4 {
        w |= ((u[8 * l + 2 * j] & 15) as u32) << (4 * j);
        w |= ((u[8 * l + 2 * j + 1] & 15) as u32) << (16 + 4 * j);
    }
    w
}

fn lane_digits(t: QType, w: u32, l: usize, u: &mut [u8; 32]) {
    if t == QType::Q8_0 {
        let b = w.to_le_bytes();
        (u[4 * l], u[4 * l + 2], u[4 * l + 1], u[4 * l + 3]) = (b[0], b[1], b[2], b[3]);
        return;
    }
    for j in 0..4 {
        u[8 * l + 2 * j] = (w >> (4 * j)) as u8 & 15;
        u[8 * l + 2 * j + 1] = (w >> (16 + 4 * j)) as u8 & 15;
    }
}

/// `bytes` (`rows` rows of `cols` numbers of `t`, the file's layout) with its whole groups
/// of eight rows interleaved.
pub fn pack(t: QType, bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    assert!(packable(t) && cols.is_multiple_of(t.block()));
    let (bb, blocks) = (t.block_bytes(), cols / t.block());
    let rb = blocks * bb;
    assert_eq!(bytes.len(), rows * rb);
    let sb = scale_bytes(t);
    let mut out = bytes.to_vec();
    // the groups over the threads (a 7B model's matrices are gigabytes)
    let whole = rows / ROWS * ROWS * rb;
    out[..whole]
        .par_chunks_mut(ROWS * rb)
        .enumerate()
        .for_each(|(g, out)| {
            for k in 0..blocks {
                let dst = &mut out[k * ROWS * bb..][..ROWS * bb];
                for r in 0..ROWS {
                    let blk = &bytes[(ROWS * g + r) * rb + k * bb..][..bb];
                    if t == QType::Q6K {
                        q6k::pack_block(blk, dst, r);
                        continue;
                    }
                    dst[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                    if t == QType::Q4_1 {
                        dst[16 + 2 * r..18 + 2 * r].copy_from_slice(&blk[2..4]);
                    }
                    let u = digits(t, blk);
                    for l in 0..vectors(t) {
                        let w = lane_word(t, &u, l);
                        dst[sb + 32 * l + 4 * r..][..4].copy_from_slice(&w.to_le_bytes());
                    }
                    if t == QType::Q5_0 {
                        let w = fifth_word(&u);
                        dst[sb + 128 + 4 * r..][..4].copy_from_slice(&w.to_le_bytes());
                    }
                }
            }
        });
    out
}

/// Row i's block (the file's layout) from one block column `src` of a group.
fn unpack_block(t: QType, src: &[u8], i: usize, blk: &mut [u8]) {
    if t == QType::Q6K {
        return q6k::unpack_block(src, i, blk);
    }
    blk[..2].copy_from_slice(&src[2 * i..2 * i + 2]);
    if t == QType::Q4_1 {
        blk[2..4].copy_from_slice(&src[16 + 2 * i..18 + 2 * i]);
    }
    let u = group_digits(t, src, i);
    let at = digits_at(t);
    if t == QType::Q8_0 {
        blk[at..at + 32].copy_from_slice(&u);
        return;
    }
    if t == QType::Q5_0 {
        let qh = (0..32).fold(0u32, |h, q| h | ((u[q] >> 4) as u32) << q);
        blk[2..6].copy_from_slice(&qh.to_le_bytes());
    }
    for q in 0..16 {
        blk[at + q] = (u[q] & 15) | (u[16 + q] & 15) << 4;
    }
}

/// Row i's 32 digits from one block column `src` of a group.
fn group_digits(t: QType, src: &[u8], i: usize) -> [u8; 32] {
    let sb = scale_bytes(t);
    let word = |at: usize| u32::from_le_bytes(src[at + 4 * i..][..4].try_into().unwrap());
    let mut u = [0u8; 32];
    for l in 0..vectors(t) {
        lane_digits(t, word(sb + 32 * l), l, &mut u);
    }
    if t == QType::Q5_0 {
        fifth_digits(word(sb + 128), &mut u);
    }
    u
}

/// Rows r0..r1 of a matrix that [`pack`] wrote (`rows` rows of `cols` numbers), in the
/// file's layout, into `out` (overwritten).
pub fn unpack_rows(
    t: QType,
    packed: &[u8],
    (rows, cols): (usize, usize),
    (r0, r1): (usize, usize),
    out: &mut Vec<u8>,
) {
    let (bb, blocks) = (t.block_bytes(), cols / t.block());
    let rb = blocks * bb;
    assert!(r0 <= r1 && r1 <= rows && packed.len() == rows * rb);
    let whole = rows / ROWS * ROWS;
    out.clear();
    out.resize((r1 - r0) * rb, 0);
    for r in r0..r1 {
        let dst = &mut out[(r - r0) * rb..][..rb];
        if r >= whole {
            dst.copy_from_slice(&packed[r * rb..][..rb]);
            continue;
        }
        let (g, i) = (r / ROWS, r % ROWS);
        for k in 0..blocks {
            let src = &packed[g * ROWS * rb + k * ROWS * bb..][..ROWS * bb];
            unpack_block(t, src, i, &mut dst[k * bb..][..bb]);
        }
    }
}

/// Row `r` of a matrix that [`pack`] wrote (`rows` rows of `cols` numbers), dequantized into
/// `dst` (`cols` numbers): the numbers [`super::dequantize`] gives for the file's row.
pub fn dequantize_row(
    t: QType,
    packed: &[u8],
    (rows, cols): (usize, usize),
    r: usize,
    dst: &mut [f32],
) {
    let (bb, blocks) = (t.block_bytes(), cols / t.block());
    let rb = blocks * bb;
    assert!(r < rows && packed.len() == rows * rb && dst.len() == cols);
    if r >= rows / ROWS * ROWS {
        return super::dequantize(t, &packed[r * rb..][..rb], dst);
    }
    let (g, i) = (r / ROWS, r % ROWS);
    let mut blk = [0u8; 210];
    for (k, o) in dst.chunks_exact_mut(t.block()).enumerate() {
        let src = &packed[g * ROWS * rb + k * ROWS * bb..][..ROWS * bb];
        unpack_block(t, src, i, &mut blk[..bb]);
        super::dequantize(t, &blk[..bb], o);
    }
}

/// Rows r0..r1 of a matrix that [`pack`] wrote, dequantized into `dst` ((r1 − r0) · cols
/// numbers): [`dequantize_row`] for each.
pub fn dequantize_rows(
    t: QType,
    packed: &[u8],
    (rows, cols): (usize, usize),
    (r0, r1): (usize, usize),
    dst: &mut [f32],
) {
    assert!(r0 <= r1 && dst.len() == (r1 - r0) * cols);
    for (r, out) in (r0..r1).zip(dst.chunks_exact_mut(cols.max(1))) {
        dequantize_row(t, packed, (rows, cols), r, out);
    }
}

/// Q6_K's group layout. A block column (8 rows × 210 bytes) holds the eight rows' f16 d, then
/// their int8 sub-block scales (sub-block s of row r at byte 16 + 8s + r), then per chunk c of
/// 32 numbers (0..8) four vectors of the digits' low four bits, as Q4_0's (digit 32c + 2(4L +
/// j) at nibble j of vector L), and two vectors of their top two bits: in vector h, bits
/// 2k..2k+2 of lane r's low half (k = 4(L − 2h) + j, L = 2h, 2h + 1) belong to digit
/// 32c + 2(4L + j), the same bits of its high half to the next digit.
mod q6k {
    use super::ROWS;

    /// Digit n (0..256) of a block in the file's layout, from `super::super::dequantize`'s
    /// reading of it: (number 128g + 32j + l has its low bits in nibble j / 2 of byte
    /// 64g + 32(j % 2) + l, its top bits at 2j of byte 128 + 32g + l).
    fn digit(blk: &[u8], n: usize) -> u8 {
        let (g, j, l) = (n / 128, n % 128 / 32, n % 32);
        let low = (blk[64 * g + 32 * (j % 2) + l] >> (4 * (j / 2))) & 15;
        let high = (blk[128 + 32 * g + l] >> (2 * j)) & 3;
        low | high << 4
    }

    fn set_digit(blk: &mut [u8], n: usize, u: u8) {
        let (g, j, l) = (n / 128, n % 128 / 32, n % 32);
        blk[64 * g + 32 * (j % 2) + l] |= (u & 15) << (4 * (j / 2));
        blk[128 + 32 * g + l] |= (u >> 4) << (2 * j);
    }

    /// Where chunk c's vectors start in a block column.
    pub(super) fn chunk_at(c: usize) -> usize {
        16 + 8 * 16 + 192 * c
    }

    pub(super) fn pack_block(blk: &[u8], dst: &mut [u8], r: usize) {
        dst[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
        for s in 0..16 {
            dst[16 + 8 * s + r] = blk[192 + s];
        }
        for c in 0..8 {
            let at = chunk_at(c);
            let u = |m: usize| digit(blk, 32 * c + m);
            for l in 0..4 {
                let mut w = 0u32;
                for j in 0..4 {
                    let m = 2 * (4 * l + j);
                    w |= ((u(m) & 15) as u32) << (4 * j) | ((u(m + 1) & 15) as u32) << (16 + 4 * j);
                }
                dst[at + 32 * l + 4 * r..][..4].copy_from_slice(&w.to_le_bytes());
            }
            for h in 0..2 {
                let mut w = 0u32;
                for k in 0..8 {
                    let m = 2 * (8 * h + k);
                    w |= ((u(m) >> 4) as u32) << (2 * k) | ((u(m + 1) >> 4) as u32) << (16 + 2 * k);
                }
                dst[at + 128 + 32 * h + 4 * r..][..4].copy_from_slice(&w.to_le_bytes());
            }
        }
        debug_assert!(r < ROWS);
    }

    pub(super) fn unpack_block(src: &[u8], i: usize, blk: &mut [u8]) {
        blk.fill(0);
        blk[208..210].copy_from_slice(&src[2 * i..2 * i + 2]);
        for s in 0..16 {
            blk[192 + s] = src[16 + 8 * s + i];
        }
        let word = |at: usize| u32::from_le_bytes(src[at + 4 * i..][..4].try_into().unwrap());
        for c in 0..8 {
            let at = chunk_at(c);
            let mut u = [0u8; 32];
            for l in 0..4 {
                let w = word(at + 32 * l);
                for j in 0..4 {
                    let m = 2 * (4 * l + j);
                    u[m] = (w >> (4 * j)) as u8 & 15;
                    u[m + 1] = (w >> (16 + 4 * j)) as u8 & 15;
                }
            }
            for h in 0..2 {
                let w = word(at + 128 + 32 * h);
                for k in 0..8 {
                    let m = 2 * (8 * h + k);
                    u[m] |= ((w >> (2 * k)) as u8 & 3) << 4;
                    u[m + 1] |= ((w >> (16 + 2 * k)) as u8 & 3) << 4;
                }
            }
            for (m, &v) in u.iter().enumerate() {
                set_digit(blk, 32 * c + m, v);
            }
        }
    }
}

/// y[i · y_rs + r] = (row r of the group) · (row i of x) for the eight rows of one group
/// (`group`: its bytes, whole block columns for rows of `x.cols`) and every row of x: on
/// AVX2 where `avx2` says so, else plainly (the rows unpacked, then [`dot_plain`]).
pub fn dot_group(avx2: bool, t: QType, group: &[u8], x: &QuantRows, y: &mut [f32], y_rs: usize) {
    let n = x.rows();
    assert!(packable(t) && x.cols.is_multiple_of(t.block()));
    assert_eq!(group.len(), ROWS * x.cols / t.block() * t.block_bytes());
    assert!(n == 0 || y.len() >= (n - 1) * y_rs + ROWS);
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // Safety: the caller found AVX2, FMA and F16C (`dot::isa`); sizes asserted above.
        return unsafe { x86::group_avx2(t, group, x, y, y_rs) };
    }
    let _ = avx2;
    let mut rows = Vec::new();
    unpack_rows(t, group, (ROWS, x.cols), (0, ROWS), &mut rows);
    let rb = rows.len() / ROWS;
    for (r, w) in rows.chunks_exact(rb).enumerate() {
        for i in 0..n {
            y[i * y_rs + r] = dot_plain(t, w, x, i);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QType, QuantRows, CHUNK};
    use std::arch::x86_64::*;

    const Q4_0: u32 = 2;
    const Q4_1: u32 = 3;
    const Q5_0: u32 = 6;
    const Q8_0: u32 = 8;

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `g` is one group of whole block columns for rows of
    /// `x.cols`; y reaches 8 values at each row of x (stride `y_rs`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_avx2(t: QType, g: &[u8], x: &QuantRows, y: &mut [f32], y_rs: usize) {
        match t {
            QType::Q4_0 => by_rows::<Q4_0>(g, x, y, y_rs),
            QType::Q4_1 => by_rows::<Q4_1>(g, x, y, y_rs),
            QType::Q5_0 => by_rows::<Q5_0>(g, x, y, y_rs),
            QType::Q6K => {
                // two rows of x at a time (two integer sums per row: its sub-blocks)
                let (n, y) = (x.rows(), y.as_mut_ptr());
                let mut i0 = 0;
                while i0 < n {
                    match n - i0 {
                        1 => rows_q6k::<1>(g, x, i0, y.add(i0 * y_rs), y_rs),
                        _ => rows_q6k::<2>(g, x, i0, y.add(i0 * y_rs), y_rs),
                    }
                    i0 += 2;
                }
            }
            _ => by_rows::<Q8_0>(g, x, y, y_rs),
        }
    }

    /// x's rows four at a time.
    #[inline(always)]
    unsafe fn by_rows<const T: u32>(g: &[u8], x: &QuantRows, y: &mut [f32], y_rs: usize) {
        let n = x.rows();
        let y = y.as_mut_ptr();
        let mut i0 = 0;
        while i0 < n {
            let yi = y.add(i0 * y_rs);
            match n - i0 {
                1 => rows::<T, 1>(g, x, i0, yi, y_rs),
                2 => rows::<T, 2>(g, x, i0, yi, y_rs),
                3 => rows::<T, 3>(g, x, i0, yi, y_rs),
                _ => rows::<T, 4>(g, x, i0, yi, y_rs),
            }
            i0 += 4;
        }
    }

    /// The 16-bit digit pairs of one 32-byte vector: `P` registers, pair j of them against the
    /// activations' pair word P·L + j.
    #[inline(always)]
    unsafe fn pairs<const T: u32>(v: __m256i) -> [__m256i; 4] {
        if T == Q8_0 {
            // bytes 0 and 2 of each lane, then bytes 1 and 3, sign-extended
            let lo = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(v));
            let hi = _mm256_srai_epi16::<8>(v);
            return [lo, hi, lo, hi];
        }
        let mask = _mm256_set1_epi32(0x000F_000F);
        [
            _mm256_and_si256(v, mask),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
            _mm256_and_si256(_mm256_srli_epi16::<8>(v), mask),
            _mm256_srli_epi16::<12>(v),
        ]
    }

    /// Bit `from` (0..16) of each 16-bit half of `v` moved to bit 4 (`from` is a constant
    /// once the loops are unrolled), the other bits along with it.
    #[inline(always)]
    unsafe fn to_bit4(v: __m256i, from: usize) -> __m256i {
        match from {
            0 => _mm256_slli_epi16::<4>(v),
            1 => _mm256_slli_epi16::<3>(v),
            2 => _mm256_slli_epi16::<2>(v),
            3 => _mm256_slli_epi16::<1>(v),
            4 => v,
            5 => _mm256_srli_epi16::<1>(v),
            6 => _mm256_srli_epi16::<2>(v),
            7 => _mm256_srli_epi16::<3>(v),
            8 => _mm256_srli_epi16::<4>(v),
            9 => _mm256_srli_epi16::<5>(v),
            10 => _mm256_srli_epi16::<6>(v),
            11 => _mm256_srli_epi16::<7>(v),
            12 => _mm256_srli_epi16::<8>(v),
            13 => _mm256_srli_epi16::<9>(v),
            14 => _mm256_srli_epi16::<10>(v),
            _ => _mm256_srli_epi16::<11>(v),
        }
    }

    /// Q5_0's fifth bits of pair j of vector l (bit 4l + j of each 16-bit half) at bit 4,
    /// above the nibble's place.
    #[inline(always)]
    unsafe fn fifth(f: __m256i, l: usize, j: usize) -> __m256i {
        _mm256_and_si256(to_bit4(f, 4 * l + j), _mm256_set1_epi32(0x0010_0010))
    }

    /// Q6_K's top two bits of pair j of vector l (bits 2k, k = 4(l % 2) + j, of each 16-bit
    /// half of the vector l / 2) at bits 4 and 5, above the nibble's place.
    #[inline(always)]
    unsafe fn high2(h: __m256i, k: usize) -> __m256i {
        _mm256_and_si256(to_bit4(h, 2 * k), _mm256_set1_epi32(0x0030_0030))
    }

    /// A Q6_K group against rows i0..i0 + M of x: per chunk, the sums of its two sub-blocks
    /// (vectors 0–1 and 2–3) apart, each scaled by its eight rows' int8 scales.
    #[inline(always)]
    unsafe fn rows_q6k<const M: usize>(
        g: &[u8],
        x: &QuantRows,
        i0: usize,
        y: *mut f32,
        y_rs: usize,
    ) {
        let (blocks, chunks_row) = (x.cols / 256, x.cols / CHUNK);
        let mask = _mm256_set1_epi32(0x000F_000F);
        let mut acc = [_mm256_setzero_ps(); M];
        let (xq, xd, xsum) = (x.q.as_ptr(), x.d.as_ptr(), x.sums.as_ptr());
        for b in 0..blocks {
            let p = g.as_ptr().add(b * 8 * 210);
            let dv = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            for c in 0..8 {
                let at = p.add(super::q6k::chunk_at(c));
                let hv = [
                    _mm256_loadu_si256(at.add(128) as *const __m256i),
                    _mm256_loadu_si256(at.add(160) as *const __m256i),
                ];
                let (mut sa, mut sb) = ([_mm256_setzero_si256(); M], [_mm256_setzero_si256(); M]);
                for l in 0..4 {
                    let v = _mm256_loadu_si256(at.add(32 * l) as *const __m256i);
                    let e = [
                        _mm256_and_si256(v, mask),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
                        _mm256_and_si256(_mm256_srli_epi16::<8>(v), mask),
                        _mm256_srli_epi16::<12>(v),
                    ];
                    for (j, e) in e.iter().enumerate() {
                        let e = _mm256_or_si256(*e, high2(hv[l / 2], 4 * (l % 2) + j));
                        for r in 0..M {
                            let cg = (i0 + r) * chunks_row + 8 * b + c;
                            let q = (xq.add(cg * CHUNK) as *const i32).add(4 * l + j);
                            let prod = _mm256_madd_epi16(e, _mm256_set1_epi32(q.read_unaligned()));
                            if l < 2 {
                                sa[r] = _mm256_add_epi32(sa[r], prod);
                            } else {
                                sb[r] = _mm256_add_epi32(sb[r], prod);
                            }
                        }
                    }
                }
                let sc = |s: usize| {
                    let v = _mm_loadl_epi64(p.add(16 + 8 * s) as *const __m128i);
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
                };
                let (sca, scb) = (sc(2 * c), sc(2 * c + 1));
                for (r, a) in acc.iter_mut().enumerate() {
                    let cg = (i0 + r) * chunks_row + 8 * b + c;
                    let dd = _mm256_mul_ps(dv, _mm256_set1_ps(*xd.add(cg)));
                    // the offset −32 off the integer sums, as Q4_0's −8
                    let ia = _mm256_sub_epi32(sa[r], _mm256_set1_epi32(32 * *xsum.add(2 * cg)));
                    let ib = _mm256_sub_epi32(sb[r], _mm256_set1_epi32(32 * *xsum.add(2 * cg + 1)));
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_mul_ps(sca, dd), *a);
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib), _mm256_mul_ps(scb, dd), *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(y.add(r * y_rs), *a);
        }
    }

    /// The group against rows i0..i0 + M of x (M fixed: the accumulators stay in registers).
    #[inline(always)]
    unsafe fn rows<const T: u32, const M: usize>(
        g: &[u8],
        x: &QuantRows,
        i0: usize,
        y: *mut f32,
        y_rs: usize,
    ) {
        let sb = if T == Q4_1 { 32 } else { 16 };
        let (vectors, per) = if T == Q8_0 { (8, 2) } else { (4, 4) };
        let gb = sb + 32 * vectors + if T == Q5_0 { 32 } else { 0 };
        let chunks_row = x.cols / CHUNK;
        let mut acc = [_mm256_setzero_ps(); M];
        let (xq, xd, xsum) = (x.q.as_ptr(), x.d.as_ptr(), x.sums.as_ptr());
        for k in 0..chunks_row {
            let p = g.as_ptr().add(k * gb);
            // one row of x: two integer accumulators, so that the additions overlap
            let mut s = [_mm256_setzero_si256(); M];
            let mut s2 = _mm256_setzero_si256();
            let f = match T {
                Q5_0 => _mm256_loadu_si256(p.add(sb + 128) as *const __m256i),
                _ => _mm256_setzero_si256(),
            };
            for l in 0..vectors {
                let mut e = pairs::<T>(_mm256_loadu_si256(p.add(sb + 32 * l) as *const __m256i));
                if T == Q5_0 {
                    for (j, e) in e.iter_mut().enumerate() {
                        *e = _mm256_or_si256(*e, fifth(f, l, j));
                    }
                }
                for (r, sr) in s.iter_mut().enumerate() {
                    // the activations' pair words per·l.. of this chunk
                    let q =
                        (xq.add(((i0 + r) * chunks_row + k) * CHUNK) as *const i32).add(per * l);
                    for (j, e) in e.iter().take(per).enumerate() {
                        let prod =
                            _mm256_madd_epi16(*e, _mm256_set1_epi32(q.add(j).read_unaligned()));
                        if M == 1 && j % 2 == 1 {
                            s2 = _mm256_add_epi32(s2, prod);
                        } else {
                            *sr = _mm256_add_epi32(*sr, prod);
                        }
                    }
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            for (r, a) in acc.iter_mut().enumerate() {
                let c = (i0 + r) * chunks_row + k;
                let mut si = s[r];
                if M == 1 {
                    si = _mm256_add_epi32(si, s2);
                }
                let sq = *xsum.add(2 * c) + *xsum.add(2 * c + 1);
                let dx = *xd.add(c);
                if T == Q4_0 || T == Q5_0 {
                    let c = if T == Q4_0 { 8 } else { 16 };
                    si = _mm256_sub_epi32(si, _mm256_set1_epi32(c * sq));
                }
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(dx));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), scale, *a);
                if T == Q4_1 {
                    let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
                    *a = _mm256_fmadd_ps(m, _mm256_set1_ps(dx * sq as f32), *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(y.add(r * y_rs), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::quantize::quantize;
    use crate::rng::Rng;

    #[test]
    fn pack_then_unpack_gives_the_rows_back() {
        let mut rng = Rng::new(3);
        for t in TYPES {
            for (rows, blocks) in [(8, 1), (19, 2), (3, 3), (24, 5)] {
                let cols = blocks * t.block();
                let w: Vec<f32> = (0..rows * cols)
                    .map(|_| rng.uniform() as f32 - 0.5)
                    .collect();
                let mut bytes = Vec::new();
                quantize(t, &w, &mut bytes);
                let packed = pack(t, &bytes, rows, cols);
                assert_eq!(packed.len(), bytes.len());
                assert!(rows < ROWS || packed != bytes, "interleaved");
                let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
                let rb = bytes.len() / rows;
                for r in 0..rows {
                    dequantize_row(t, &packed, (rows, cols), r, &mut a);
                    super::super::dequantize(t, &bytes[r * rb..(r + 1) * rb], &mut b);
                    assert_eq!(a, b, "{t:?} row {r}");
                }
                // every range, groups whole or cut
                let mut all = vec![0.0; rows * cols];
                super::super::dequantize(t, &bytes, &mut all);
                for (r0, r1) in [
                    (0, rows),
                    (1, rows),
                    (rows / 2, rows),
                    (0, rows.min(8)),
                    (2, 2),
                ] {
                    let mut got = vec![f32::NAN; (r1 - r0) * cols];
                    dequantize_rows(t, &packed, (rows, cols), (r0, r1), &mut got);
                    assert_eq!(got, all[r0 * cols..r1 * cols], "{t:?} rows {r0}..{r1}");
                }
                let mut back = Vec::new();
                unpack_rows(t, &packed, (rows, cols), (0, rows), &mut back);
                assert_eq!(back, bytes, "{t:?} {rows}x{cols}");
                unpack_rows(t, &packed, (rows, cols), (rows / 2, rows), &mut back);
                assert_eq!(back, bytes[rows / 2 * rb..], "{t:?} {rows}x{cols} tail");
            }
        }
    }

    /// The AVX2 kernel against the plain twin (the file's rows and `dot_plain`), on every
    /// count of x's rows up to 9 and rows of 1 to 7 blocks, with activations of very
    /// different sizes per chunk.
    #[test]
    fn the_avx2_groups_agree_with_the_plain_twin() {
        if super::super::dot::isa() == super::super::dot::Isa::Plain {
            eprintln!("no AVX2 here: only the plain twin runs");
            return;
        }
        let mut rng = Rng::new(5);
        for t in TYPES {
            for blocks in 1..=7 {
                let cols = blocks * t.block();
                let w: Vec<f32> = (0..ROWS * cols)
                    .map(|_| rng.uniform() as f32 - 0.5)
                    .collect();
                let mut bytes = Vec::new();
                quantize(t, &w, &mut bytes);
                let packed = pack(t, &bytes, ROWS, cols);
                let rb = bytes.len() / ROWS;
                for n in 1..=9 {
                    let x: Vec<f32> = (0..n * cols)
                        .map(|i| (rng.uniform() as f32 - 0.5) * (1 + (i / CHUNK) % 5 * 40) as f32)
                        .collect();
                    let mut xq = QuantRows::default();
                    xq.quantize(&x, cols);
                    let y_rs = ROWS + 3;
                    let mut y = vec![f32::NAN; n * y_rs];
                    dot_group(true, t, &packed, &xq, &mut y, y_rs);
                    for i in 0..n {
                        for r in 0..ROWS {
                            let want = dot_plain(t, &bytes[r * rb..(r + 1) * rb], &xq, i);
                            let got = y[i * y_rs + r];
                            let scale: f32 =
                                x[i * cols..(i + 1) * cols].iter().map(|v| v.abs()).sum();
                            assert!(
                                (got - want).abs() <= 1e-5 * scale,
                                "{t:?} blocks {blocks} n {n} row {r}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

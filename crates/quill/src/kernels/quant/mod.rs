//! Block-quantized number formats (the tensor types of GGUF files) and their plain
//! dequantization.
//!
//! A quantized row is a sequence of blocks; each block stores `block()` numbers in
//! `block_bytes()` bytes: small integers and one or more f16 scales. The 32-element formats
//! (Q4_0 … Q8_0) have one scale (and for the `_1` types an offset) per block; the "K"
//! formats group 256 numbers into a super-block of 8 or 16 sub-blocks whose 4- to 8-bit
//! scales are themselves scaled by f16 numbers.
//!
//! [`dequantize`] is the plain twin of every kernel that reads these formats: each number is
//! computed with the same f32 operations in the same order as the `gguf` Python package's
//! NumPy dequantizers, so the two agree bit for bit (tested on every type against that
//! package's output in `tests/fixtures/gguf/quants.gguf`).

use half::f16;

pub mod dot;
pub mod gemm;
pub mod quantize;
pub mod x8;

/// Numbers in a K-format super-block.
pub const QK_K: usize = 256;

/// A tensor's element format, with the GGML type id GGUF files store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl QType {
    pub const ALL: [QType; 13] = [
        QType::F32,
        QType::F16,
        QType::Bf16,
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q5_1,
        QType::Q8_0,
        QType::Q2K,
        QType::Q3K,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
    ];

    /// The type for GGML's id, if quill reads it.
    pub fn from_ggml(id: u32) -> Option<Self> {
        QType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    pub fn ggml_id(self) -> u32 {
        match self {
            QType::F32 => 0,
            QType::F16 => 1,
            QType::Q4_0 => 2,
            QType::Q4_1 => 3,
            QType::Q5_0 => 6,
            QType::Q5_1 => 7,
            QType::Q8_0 => 8,
            QType::Q2K => 10,
            QType::Q3K => 11,
            QType::Q4K => 12,
            QType::Q5K => 13,
            QType::Q6K => 14,
            QType::Bf16 => 30,
        }
    }

    /// The name llama.cpp and the `gguf` package use.
    pub fn name(self) -> &'static str {
        match self {
            QType::F32 => "F32",
            QType::F16 => "F16",
            QType::Bf16 => "BF16",
            QType::Q4_0 => "Q4_0",
            QType::Q4_1 => "Q4_1",
            QType::Q5_0 => "Q5_0",
            QType::Q5_1 => "Q5_1",
            QType::Q8_0 => "Q8_0",
            QType::Q2K => "Q2_K",
            QType::Q3K => "Q3_K",
            QType::Q4K => "Q4_K",
            QType::Q5K => "Q5_K",
            QType::Q6K => "Q6_K",
        }
    }

    /// Numbers per block.
    pub fn block(self) -> usize {
        match self {
            QType::F32 | QType::F16 | QType::Bf16 => 1,
            QType::Q4_0 | QType::Q4_1 | QType::Q5_0 | QType::Q5_1 | QType::Q8_0 => 32,
            QType::Q2K | QType::Q3K | QType::Q4K | QType::Q5K | QType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::F32 => 4,
            QType::F16 | QType::Bf16 => 2,
            QType::Q4_0 => 2 + 16,
            QType::Q4_1 => 2 + 2 + 16,
            QType::Q5_0 => 2 + 4 + 16,
            QType::Q5_1 => 2 + 2 + 4 + 16,
            QType::Q8_0 => 2 + 32,
            QType::Q2K => QK_K / 16 + QK_K / 4 + 2 + 2,
            QType::Q3K => QK_K / 8 + QK_K / 4 + 12 + 2,
            QType::Q4K => 2 + 2 + 12 + QK_K / 2,
            QType::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            QType::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Bytes of `n` numbers: None unless `n` is a whole number of blocks (or on overflow).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block()) {
            return None;
        }
        (n / self.block()).checked_mul(self.block_bytes())
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `out` = the numbers `bytes` encode in format `t`. `out.len()` must be a whole number of
/// blocks and `bytes` exactly their size (callers check both; a mismatch panics).
pub fn dequantize(t: QType, bytes: &[u8], out: &mut [f32]) {
    let bb = t.block_bytes();
    let n = t.block();
    assert!(out.len().is_multiple_of(n) && bytes.len() == out.len() / n * bb);
    for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(n)) {
        match t {
            QType::F32 => o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            QType::F16 => o[0] = f16_at(b, 0),
            QType::Bf16 => o[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
            QType::Q4_0 => block_q4_0(b, o),
            QType::Q4_1 => block_q4_1(b, o),
            QType::Q5_0 => block_q5(b, o, false),
            QType::Q5_1 => block_q5(b, o, true),
            QType::Q8_0 => {
                let d = f16_at(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..34]) {
                    *v = q as i8 as f32 * d;
                }
            }
            QType::Q2K => block_q2_k(b, o),
            QType::Q3K => block_q3_k(b, o),
            QType::Q4K => block_q45_k(b, o, false),
            QType::Q5K => block_q45_k(b, o, true),
            QType::Q6K => block_q6_k(b, o),
        }
    }
}

/// Q4_0: f16 scale d, then 16 bytes: number i < 16 in the low nibble of byte i, number
/// 16 + i in its high nibble; value d · (q − 8).
fn block_q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for i in 0..16 {
        o[i] = d * ((b[2 + i] & 15) as i32 - 8) as f32;
        o[16 + i] = d * ((b[2 + i] >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1: scale d, minimum m, then nibbles as Q4_0; value d · q + m.
fn block_q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for i in 0..16 {
        o[i] = d * (b[4 + i] & 15) as f32 + m;
        o[16 + i] = d * (b[4 + i] >> 4) as f32 + m;
    }
}

/// Q5_0 / Q5_1: scale d (and minimum m), 32 fifth bits in a little-endian u32 (bit i for
/// number i), then nibbles as Q4_0; value d · (q − 16), or d · q + m.
fn block_q5(b: &[u8], o: &mut [f32], with_min: bool) {
    let d = f16_at(b, 0);
    let (m, at) = if with_min {
        (f16_at(b, 2), 4)
    } else {
        (0.0, 2)
    };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 20];
    for i in 0..32 {
        let low = if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 };
        let q = low | (((qh >> i) & 1) as u8) << 4;
        o[i] = if with_min {
            d * q as f32 + m
        } else {
            d * (q as i32 - 16) as f32
        };
    }
}

/// Q2_K: 16 bytes of sub-block scales (low nibble: scale, high: minimum, each times the
/// f16 d / dmin at the end), 64 bytes of 2-bit numbers: number 128g + 32j + l is bits 2j..2j+2
/// of byte 32g + l. Sub-blocks are 16 numbers; value (d · sc) · q − dmin · m.
fn block_q2_k(b: &[u8], o: &mut [f32]) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for g in 0..2 {
        for j in 0..4 {
            for l in 0..32 {
                let i = 128 * g + 32 * j + l;
                let s = scales[i / 16];
                let q = (qs[32 * g + l] >> (2 * j)) & 3;
                o[i] = d * (s & 15) as f32 * q as f32 - dmin * (s >> 4) as f32;
            }
        }
    }
}

/// Q3_K: 32 bytes of high bits (number 32j + l: bit j of byte l), 64 bytes of low 2-bit
/// numbers laid out as Q2_K's, 12 bytes holding 16 six-bit scales, and the f16 d. A number is
/// its low bits minus 4 when its high bit is clear; value (d · (scale − 32)) · q.
fn block_q3_k(b: &[u8], o: &mut [f32]) {
    let (hmask, qs, sc) = (&b[..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let mut scales = [0f32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = (sc[i % 8] >> (4 * (i / 8))) & 15;
        let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = d * ((low | high << 4) as i32 - 32) as f32;
    }
    for g in 0..2 {
        for j in 0..4 {
            for l in 0..32 {
                let i = 128 * g + 32 * j + l;
                let low = ((qs[32 * g + l] >> (2 * j)) & 3) as i32;
                let high = (hmask[l] >> (i / 32)) & 1;
                let q = low - if high == 0 { 4 } else { 0 };
                o[i] = scales[i / 16] * q as f32;
            }
        }
    }
}

/// The eight 6-bit scales and minimums of a Q4_K/Q5_K super-block, packed in 12 bytes.
pub(crate) fn scales_mins_k(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[4 + j] & 63;
        sc[4 + j] = (s[8 + j] & 15) | ((s[j] >> 2) & 0x30);
        mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Q4_K / Q5_K: f16 d and dmin, 12 bytes of scales and minimums (eight sub-blocks of 32),
/// for Q5_K 32 bytes of fifth bits (number 32j + l: bit j of byte l), then 128 bytes of
/// nibbles: number 64g + 32s + l is nibble s of byte 32g + l. Value (d · sc) · q − dmin · m.
fn block_q45_k(b: &[u8], o: &mut [f32], fifth: bool) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = scales_mins_k(&b[4..16]);
    let (qh, qs) = if fifth {
        (&b[16..48], &b[48..176])
    } else {
        (&b[..0], &b[16..144])
    };
    for g in 0..4 {
        for s in 0..2 {
            let j = 2 * g + s;
            let (scale, min) = (d * sc[j] as f32, dmin * mn[j] as f32);
            for l in 0..32 {
                let mut q = (qs[32 * g + l] >> (4 * s)) & 15;
                if fifth {
                    q |= ((qh[l] >> j) & 1) << 4;
                }
                o[32 * j + l] = scale * q as f32 - min;
            }
        }
    }
}

/// Q6_K: 128 bytes of low nibbles (number 128g + 64s + l: nibble s of byte 64g + l), 64 bytes
/// of high 2-bit pairs (number 128g + 32j + l: bits 2j..2j+2 of byte 32g + l), 16 int8 scales
/// (sub-blocks of 16) and the f16 d. Value (d · scale) · (q − 32).
fn block_q6_k(b: &[u8], o: &mut [f32]) {
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for g in 0..2 {
        for l in 0..128 {
            let i = 128 * g + l;
            let (s, ll) = (l / 64, l % 64);
            let low = (ql[64 * g + ll] >> (4 * s)) & 15;
            let (j, lh) = (l / 32, l % 32);
            let high = (qh[32 * g + lh] >> (2 * j)) & 3;
            let q = (low | high << 4) as i32 - 32;
            o[i] = d * sc[i / 16] as i8 as f32 * q as f32;
        }
    }
}

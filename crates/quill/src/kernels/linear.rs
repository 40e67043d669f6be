//! y = x · Wᵀ for inference, with W [out, in] stored as f32, bf16 or f16 (for example straight
//! from a memory-mapped safetensors file). One row of x (decoding) runs a matrix-vector
//! product that reads each weight once, in its stored precision, with f32 accumulation;
//! several rows convert W to f32 a block of rows at a time and use the matrix multiply.

use super::bf16::{bf16_to_f32, widen_bf16, widen_f16};
use super::matmul::{bf16_is_rounded_f32, matmul_strided, round_in_place, round_row, Precision};
use super::product::{Accumulate, Dims, Fusion, Half, Strided, View, ViewMut};
use super::quant::dot::{dot_one_row, dot_rows, isa, Isa, QuantRows};
use super::quant::{dequantize, QType};
use super::quant::{gemm, x8};
use super::simd::multiversion;
use super::SendPtr;
use rayon::prelude::*;

/// A weight matrix [out, in], row-major, in its stored precision.
#[derive(Clone, Copy, Debug)]
pub enum MatRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
    /// Rows of blocks of a quantized format (each row whole blocks), in the file's layout or,
    /// where `x8`, interleaved by eight rows ([`super::quant::x8`]).
    Quant {
        bytes: &'a [u8],
        qtype: QType,
        x8: bool,
    },
}

impl MatRef<'_> {
    /// Numbers in the matrix.
    pub fn len(&self) -> usize {
        match self {
            MatRef::F32(w) => w.len(),
            MatRef::Bf16(w) | MatRef::F16(w) => w.len(),
            MatRef::Quant { bytes, qtype, .. } => bytes.len() / qtype.block_bytes() * qtype.block(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes per element as stored (rounded up for quantized formats).
    pub fn elem_bytes(&self) -> usize {
        match self {
            MatRef::F32(_) => 4,
            MatRef::Quant { qtype, .. } => qtype.block_bytes().div_ceil(qtype.block()),
            _ => 2,
        }
    }
    /// Row `r` (of width `cols`) converted to f32 into `dst`.
    pub fn row_into(&self, r: usize, cols: usize, dst: &mut [f32]) {
        match self {
            MatRef::F32(w) => dst.copy_from_slice(&w[r * cols..(r + 1) * cols]),
            MatRef::Bf16(w) => widen_bf16(dst, &w[r * cols..(r + 1) * cols]),
            MatRef::F16(w) => widen_f16(dst, &w[r * cols..(r + 1) * cols]),
            MatRef::Quant { bytes, qtype, x8 } => {
                let rb = cols / qtype.block() * qtype.block_bytes();
                if *x8 {
                    let rows = bytes.len() / rb;
                    x8::dequantize_row(*qtype, bytes, (rows, cols), r, &mut dst[..cols]);
                } else {
                    dequantize(*qtype, &bytes[r * rb..(r + 1) * rb], &mut dst[..cols]);
                }
            }
        }
    }
}

/// Rows of W converted per block when x has several rows.
const BLOCK_ELEMS: usize = 1 << 18;

/// y[i, j] = Σ_k x[i, k] · W[j, k] for the n rows of x [n, inp] and the `out` rows of W
/// [out, inp] (inp = W's length / out), written (overwriting) at row stride `y_rs`.
/// `scratch` holds converted blocks of W (grown as needed).
pub fn linear(
    y: &mut [f32],
    y_rs: usize,
    x: &[f32],
    w: MatRef<'_>,
    out: usize,
    scratch: &mut Vec<f32>,
) {
    let inp = w.len() / out.max(1);
    let n = x.len() / inp.max(1);
    assert!(w.len() == out * inp && x.len() >= n * inp);
    assert!(n == 0 || y.len() >= (n - 1) * y_rs + out);
    if n == 0 || out == 0 {
        return;
    }
    if let MatRef::Quant { bytes, qtype, x8 } = w {
        let part = QPart { bytes, qtype, x8 };
        return quant_linear(y, y_rs, &x[..n * inp], inp, &[part]);
    }
    if n == 1 {
        return matvec(&mut y[..out], &x[..inp], w, inp);
    }
    let yp = y.as_mut_ptr();
    match w {
        // Safety: the asserts above bound every index.
        // a few rows (batched decoding): tiles of dot products; many rows (a prompt): gemm
        MatRef::F32(_) if n <= F32_TILE_ROWS || (n <= X_BLOCK && !super::sgemm::available()) => {
            rows_times_rows(y, y_rs, &x[..n * inp], w, inp)
        }
        // so for half weights where AVX-512 widens them in registers, up to HALF_ROWS rows
        // (past them the bf16 kernel, or the f32 one widening as it packs, is faster)
        MatRef::Bf16(_) | MatRef::F16(_) if n <= HALF_ROWS && super::simd::has_avx512() => {
            rows_times_rows(y, y_rs, &x[..n * inp], w, inp)
        }
        // more rows (a batch, a prompt) where quill's f32 kernel runs: yᵀ [out, n] = W · xᵀ, so the
        // weights are read in place as the kernel's A and only x is packed (packing W into
        // panels cost a tenth of a 128-row product), then turned into y
        // Safety: the asserts above bound every index.
        MatRef::F32(w) if super::sgemm::available() => unsafe {
            weights_as_a(
                y,
                y_rs,
                x,
                (w.as_ptr(), Precision::F32),
                (out, inp, n),
                scratch,
            )
        },
        // Safety: the asserts above bound every index.
        MatRef::F32(w) => unsafe {
            matmul_strided(
                Precision::F32,
                Strided {
                    parallel: true,
                    ..Strided::new(
                        Dims::new(n, inp, out),
                        ViewMut::new(yp, y_rs),
                        View::new(x.as_ptr(), inp, 1),
                        View::new(w.as_ptr(), 1, inp),
                        Accumulate::Overwrite,
                    )
                },
            )
        },
        // prompts past X_BLOCK rows on bf16 weights where the CPU multiplies bf16
        // (`vdpbf16ps`): yᵀ [out, n] = W · xᵀ, the weights' pairs broadcast in place by the
        // bf16 kernel's tiles (no packing), the rows of x rounded to bf16 as they are packed
        // (a bf16 model's own precision, as transformers runs it in bf16; twice the f32
        // kernel's rate), f32 sums, then turned into y. Up to X_BLOCK rows x stays exact, as
        // in decoding: a short prompt's logits are those of the weights read into f32.
        // Safety: the asserts above bound every index; the weights' address is read as
        // 2-byte values by the bf16 kernel.
        MatRef::Bf16(w) if n > X_BLOCK && super::bf16::has_bf16() => unsafe {
            let w = w.as_ptr() as *const f32;
            weights_as_a(y, y_rs, x, (w, Precision::Bf16), (out, inp, n), scratch)
        },
        // half-precision weights, where quill's f32 kernel runs: widened as it packs them
        MatRef::Bf16(_) | MatRef::F16(_) if super::sgemm::available() => unsafe {
            let (ptr, kind) = match w {
                MatRef::Bf16(w) => (w.as_ptr(), Half::Bf16),
                MatRef::F16(w) => (w.as_ptr(), Half::F16),
                _ => unreachable!("matched above"),
            };
            let fusion = Fusion {
                b_half: Some(kind),
                ..Fusion::default()
            };
            // Safety: the asserts above bound every index; B's view is the weights' address,
            // read as 2-byte values by the kernel.
            matmul_strided(
                Precision::F32,
                Strided {
                    parallel: true,
                    fusion,
                    ..Strided::new(
                        Dims::new(n, inp, out),
                        ViewMut::new(yp, y_rs),
                        View::new(x.as_ptr(), inp, 1),
                        View::new(ptr as *const f32, 1, inp),
                        Accumulate::Overwrite,
                    )
                },
            )
        },
        _ => {
            let rows = (BLOCK_ELEMS / inp.max(1)).max(16).min(out);
            scratch.resize(rows * inp, 0.0);
            for r0 in (0..out).step_by(rows) {
                let r1 = (r0 + rows).min(out);
                let blk = &mut scratch[..(r1 - r0) * inp];
                blk.par_chunks_mut(inp)
                    .enumerate()
                    .for_each(|(i, row)| w.row_into(r0 + i, inp, row));
                // Safety: columns r0..r1 of rows 0..n lie inside y (asserted above).
                unsafe { times_panel(Precision::F32, yp.add(r0), y_rs, x, (n, inp), blk) }
            }
        }
    }
}

/// y = x·Wᵀ computed as yᵀ [out, n] = W · xᵀ into `scratch` (grown as needed, never
/// shrunk) and turned into y: the weights [out, inp] are the product's A, read in place (f32
/// on quill's f32 kernel; bf16 on the bf16 kernel, `Fusion::a_bf16`, x rounded to bf16), and
/// only x is packed.
///
/// # Safety
/// W holds out x inp weights (bf16 ones behind the cast pointer for `Precision::Bf16`), x
/// holds n x inp values, and y reaches `out` columns of n rows at stride y_rs.
unsafe fn weights_as_a(
    y: &mut [f32],
    y_rs: usize,
    x: &[f32],
    (w, precision): (*const f32, Precision),
    (out, inp, n): (usize, usize, usize),
    scratch: &mut Vec<f32>,
) {
    if scratch.len() < out * n {
        scratch.resize(out * n, 0.0);
    }
    let fusion = Fusion {
        a_bf16: precision == Precision::Bf16,
        ..Fusion::default()
    };
    matmul_strided(
        precision,
        Strided {
            parallel: true,
            fusion,
            ..Strided::new(
                Dims::new(out, inp, n),
                ViewMut::new(scratch.as_mut_ptr(), n),
                View::new(w, inp, 1),
                View::new(x.as_ptr(), 1, inp),
                Accumulate::Overwrite,
            )
        },
    );
    transpose_into(y, y_rs, &scratch[..out * n], (out, n));
}

/// y[t, o] = yt[o, t] for yt [out, n]: y's first `out` columns of n rows at row stride y_rs,
/// sixteen rows of y per task, each block turned by `tile::transpose` (16 x 16 register
/// blocks; turned one float at a time it was a tenth of a bf16 GPT-2 prompt), through a
/// buffer of the thread's own where y's rows are wider than `out`.
fn transpose_into(y: &mut [f32], y_rs: usize, yt: &[f32], (out, n): (usize, usize)) {
    const ROWS: usize = 16;
    thread_local! {
        static TURNED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    assert!(yt.len() >= out * n);
    y.par_chunks_mut(ROWS * y_rs)
        .take(n.div_ceil(ROWS))
        .enumerate()
        .for_each(|(b, ys)| {
            let t0 = b * ROWS;
            let rows = (n - t0).min(ROWS);
            // Safety: columns t0..t0 + rows of yt's `out` rows (stride n) lie inside yt.
            let turn = |dst: &mut [f32]| unsafe {
                super::tile::transpose(dst, yt.as_ptr().add(t0), n, out, rows)
            };
            if y_rs == out {
                turn(&mut ys[..rows * out]);
                return;
            }
            TURNED.with(|buf| {
                let mut buf = buf.borrow_mut();
                if buf.len() < rows * out {
                    buf.resize(rows * out, 0.0);
                }
                turn(&mut buf[..rows * out]);
                for (i, row) in buf[..rows * out].chunks_exact(out).enumerate() {
                    ys[i * y_rs..i * y_rs + out].copy_from_slice(row);
                }
            });
        });
}

/// y[i, j] = x[i] · panel[j] for the first n rows of x [n, inp] and the rows of `panel`
/// [m, inp] (f32 weight rows converted for the GEMM), written at `y` with row stride `y_rs`;
/// the product in `precision`.
///
/// # Safety
/// `y` reaches columns 0..m of n rows at stride `y_rs`, nothing else writes them, and x holds
/// n rows of `inp`.
unsafe fn times_panel(
    precision: Precision,
    y: *mut f32,
    y_rs: usize,
    x: &[f32],
    (n, inp): (usize, usize),
    panel: &[f32],
) {
    debug_assert!(x.len() >= n * inp && panel.len().is_multiple_of(inp.max(1)));
    matmul_strided(
        precision,
        Strided {
            parallel: true,
            ..Strided::new(
                Dims::new(n, inp, panel.len() / inp.max(1)),
                ViewMut::new(y, y_rs),
                View::new(x.as_ptr(), inp, 1),
                View::new(panel.as_ptr(), 1, inp),
                Accumulate::Overwrite,
            )
        },
    )
}

thread_local! {
    /// The quantized activations of the last quantized product on this thread (reused, so a
    /// decoding step allocates nothing once warm).
    static ACTS: std::cell::RefCell<QuantRows> = std::cell::RefCell::new(QuantRows::default());
}

/// Weight rows per parallel task of the quantized product.
const QUANT_ROWS: usize = 16;

/// One quantized matrix [rows, in] of a product whose matrices are stacked (q | k | v), in
/// the file's layout or, where `x8`, interleaved by eight rows ([`x8`]).
#[derive(Clone, Copy, Debug)]
pub struct QPart<'a> {
    pub bytes: &'a [u8],
    pub qtype: QType,
    pub x8: bool,
}

impl<'a> QPart<'a> {
    /// A matrix in the file's layout.
    pub fn rows(bytes: &'a [u8], qtype: QType) -> Self {
        QPart {
            bytes,
            qtype,
            x8: false,
        }
    }

    fn row_bytes(&self, inp: usize) -> usize {
        inp / self.qtype.block() * self.qtype.block_bytes()
    }

    /// Rows r0..r1 in the file's layout: borrowed, or unpacked into `buf`.
    fn file_rows<'b>(
        &'b self,
        inp: usize,
        (r0, r1): (usize, usize),
        buf: &'b mut Vec<u8>,
    ) -> &'b [u8] {
        let rb = self.row_bytes(inp);
        if !self.x8 {
            return &self.bytes[r0 * rb..r1 * rb];
        }
        let rows = self.bytes.len() / rb;
        x8::unpack_rows(self.qtype, self.bytes, (rows, inp), (r0, r1), buf);
        buf
    }
}

/// y = x · [W₀; W₁; …]ᵀ for quantized matrices stacked by rows (each part's outputs follow
/// the previous part's, at row stride `y_rs`): x's rows quantized once, to int16 per 32
/// numbers, then integer block dot products (see [`super::quant::dot`]); the rows of all the
/// parts split over the threads in one parallel pass, in tasks of up to 16 rows of one part
/// (starting at a multiple of 16 in it, so that interleaved groups of eight stay whole).
pub fn quant_linear(y: &mut [f32], y_rs: usize, x: &[f32], cols: usize, parts: &[QPart<'_>]) {
    assert!(parts.len() <= 8, "at most 8 stacked parts");
    let many = x.len() / cols.max(1) >= GEMM_ROWS;
    if many && !gemm::available() {
        return quant_gemm(y, y_rs, x, cols, parts);
    }
    let path = isa();
    ACTS.with(|acts| {
        let mut xq = acts.borrow_mut();
        xq.quantize(x, cols);
        let n = xq.rows();
        let xq = &*xq;
        // where each part's rows start, in output columns, and its first task
        let (mut starts, mut first) = ([0usize; 9], [0usize; 9]);
        for (i, p) in parts.iter().enumerate() {
            let rows = p.bytes.len() / p.row_bytes(cols);
            starts[i + 1] = starts[i] + rows;
            first[i + 1] = first[i] + rows.div_ceil(QUANT_ROWS);
        }
        let out = starts[parts.len()];
        assert!(n == 0 || (out <= y_rs && y.len() >= (n - 1) * y_rs + out));
        if many {
            return quant_panels(y, y_rs, xq, parts, &starts);
        }
        let yp = SendPtr(y.as_mut_ptr());
        let ylen = y.len();
        (0..first[parts.len()]).into_par_iter().for_each(|task| {
            let pi = (0..parts.len()).rfind(|&i| first[i] <= task).unwrap_or(0);
            let p = &parts[pi];
            let total = starts[pi + 1] - starts[pi];
            let r0 = (task - first[pi]) * QUANT_ROWS;
            let r1 = (r0 + QUANT_ROWS).min(total);
            let rb = p.row_bytes(cols);
            let mut r = r0;
            if p.x8 {
                // whole groups of eight (r0 is a multiple of 16)
                let (gb, end) = (x8::ROWS * rb, r1.min(total / x8::ROWS * x8::ROWS));
                while r + x8::ROWS <= end {
                    let j = starts[pi] + r;
                    // Safety: columns j..j + 8 of rows 0..n lie inside y (asserted above)
                    // and only this task writes them.
                    let yj = unsafe { std::slice::from_raw_parts_mut(yp.get().add(j), ylen - j) };
                    let g = &p.bytes[r / x8::ROWS * gb..][..gb];
                    x8::dot_group(path != Isa::Plain, p.qtype, g, xq, yj, y_rs);
                    r += x8::ROWS;
                }
            }
            // rows in the file's layout (past the last whole group, where interleaved)
            let (j, rows) = (starts[pi] + r, r1 - r);
            let w = &p.bytes[r * rb..r1 * rb];
            if n == 1 && rows > 0 {
                // decoding: the run in one call
                // Safety: y[j..j + rows] lies inside y (asserted above; one row of x) and
                // only this task writes it.
                let yj = unsafe { std::slice::from_raw_parts_mut(yp.get().add(j), rows) };
                dot_one_row(path, p.qtype, w, rows, xq, yj);
            } else {
                for (k, wk) in w.chunks_exact(rb).enumerate() {
                    // Safety: column j + k of rows 0..n lies inside y (asserted above) and
                    // only this task writes it.
                    let yj = unsafe {
                        std::slice::from_raw_parts_mut(yp.get().add(j + k), ylen - j - k)
                    };
                    dot_rows(path, p.qtype, wk, xq, yj, y_rs);
                }
            }
        });
    });
}

/// Rows of x from which a quantized product decodes each panel of weights once for all the
/// rows (a prompt): into int16 panels for the integer GEMM ([`gemm`], AVX-512 VNNI), or
/// where that is missing, to f32 for the f32 GEMM.
pub const GEMM_ROWS: usize = 32;

thread_local! {
    /// This thread's decoded weight panel of [`quant_panels`] (reused between calls).
    static QPANEL: std::cell::RefCell<gemm::Panel> = std::cell::RefCell::new(gemm::Panel::default());
}

/// [`quant_linear`] for many rows on the packed integer GEMM: tasks of one panel of 32 weight
/// rows (decoded once per task) times a share of x's rows; x's rows are split only as far as
/// the threads need work. `starts[p]` is part p's first output column.
fn quant_panels(y: &mut [f32], y_rs: usize, xq: &QuantRows, parts: &[QPart<'_>], starts: &[usize]) {
    let (n, cols) = (xq.rows(), xq.cols);
    // (part, first row of the panel)
    let panels: Vec<(usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(pi, _)| {
            (starts[pi]..starts[pi + 1])
                .step_by(gemm::NR)
                .map(move |j| (pi, j))
        })
        .collect();
    let threads = rayon::current_num_threads();
    let splits = (4 * threads)
        .div_ceil(panels.len().max(1))
        .min(n.div_ceil(8 * gemm::MR))
        .max(1);
    let share = n.div_ceil(splits).next_multiple_of(gemm::MR);
    let yp = SendPtr(y.as_mut_ptr());
    (0..panels.len() * splits).into_par_iter().for_each(|task| {
        let (pi, j) = panels[task / splits];
        let i0 = (task % splits) * share;
        let i1 = (i0 + share).min(n);
        if i0 >= i1 {
            return;
        }
        let p = &parts[pi];
        let r = j - starts[pi];
        let rows = (starts[pi + 1] - j).min(gemm::NR);
        QPANEL.with(|panel| {
            let mut panel = panel.borrow_mut();
            let mut buf = Vec::new();
            gemm::pack(
                p.qtype,
                p.file_rows(cols, (r, r + rows), &mut buf),
                rows,
                cols,
                &mut panel,
            );
            // Safety: columns j..j + rows of rows i0..i1 lie inside y (asserted by the
            // caller) and only this task writes them.
            unsafe { gemm::times(p.qtype, &panel, xq, (i0, i1), yp.get().add(j), y_rs) }
        });
    });
}

thread_local! {
    /// Dequantized weight rows of [`quant_gemm`] (reused between calls).
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`quant_linear`] for many rows of x: blocks of weight rows dequantized to f32 (over the
/// threads), then multiplied with the f32 GEMM. The numbers are the dequantized twin's.
fn quant_gemm(y: &mut [f32], y_rs: usize, x: &[f32], cols: usize, parts: &[QPart<'_>]) {
    let n = x.len() / cols;
    let yp = y.as_mut_ptr();
    let mut col0 = 0;
    PANEL.with(|panel| {
        let mut panel = panel.borrow_mut();
        for p in parts {
            let rb = p.row_bytes(cols);
            let out = p.bytes.len() / rb;
            assert!(col0 + out <= y_rs && y.len() >= (n - 1) * y_rs + col0 + out);
            // whole groups of eight rows per block, where interleaved
            let rows = (BLOCK_ELEMS / cols.max(1)).max(16) / 8 * 8;
            let rows = rows.min(out);
            panel.resize(rows * cols, 0.0);
            for r0 in (0..out).step_by(rows) {
                let r1 = (r0 + rows).min(out);
                let blk = &mut panel[..(r1 - r0) * cols];
                if p.x8 {
                    blk.par_chunks_mut(8 * cols)
                        .enumerate()
                        .for_each(|(i, dst)| {
                            let ra = r0 + 8 * i;
                            let rr = (ra + 8).min(r1);
                            x8::dequantize_rows(p.qtype, p.bytes, (out, cols), (ra, rr), dst)
                        });
                } else {
                    blk.par_chunks_mut(cols * 4)
                        .zip(p.bytes[r0 * rb..r1 * rb].par_chunks(rb * 4))
                        .for_each(|(dst, src)| dequantize(p.qtype, src, dst));
                }
                // Safety: columns col0 + r0..col0 + r1 of rows 0..n lie inside y (asserted).
                unsafe { times_panel(Precision::F32, yp.add(col0 + r0), y_rs, x, (n, cols), blk) }
            }
            col0 += out;
        }
    });
}

thread_local! {
    /// Converted weight rows of [`frozen_forward`] and [`frozen_backward`] (reused).
    static FROZEN: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Their other operand rounded to bf16 ([`bf16_is_rounded_f32`]; reused).
    static ROUNDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's reused buffer in `cell` (a buffer of its own for a nested call
/// on this thread, from rayon's work stealing).
fn with_buffer<R>(
    cell: &'static std::thread::LocalKey<std::cell::RefCell<Vec<f32>>>,
    f: impl FnOnce(&mut Vec<f32>) -> R,
) -> R {
    cell.with(|b| match b.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut Vec::new()),
    })
}

/// Calls `f` with rows r0..r1 of W [out, inp] converted to f32 (and rounded to bf16 when
/// `round`), block by block (a block's rows converted over the threads), in this thread's
/// reused buffer.
fn frozen_blocks(
    w: MatRef<'_>,
    (out, inp): (usize, usize),
    round: bool,
    mut f: impl FnMut(usize, usize, &[f32]),
) {
    let rows = (BLOCK_ELEMS / inp.max(1)).max(16).min(out);
    with_buffer(&FROZEN, |buf| {
        buf.resize(rows * inp, 0.0);
        for r0 in (0..out).step_by(rows.max(1)) {
            let r1 = (r0 + rows).min(out);
            let blk = &mut buf[..(r1 - r0) * inp];
            blk.par_chunks_mut(inp).enumerate().for_each(|(i, row)| {
                w.row_into(r0 + i, inp, row);
                if round {
                    round_in_place(row);
                }
            });
            f(r0, r1, blk);
        }
    });
}

/// The frozen products' precision: where a bf16 product rounds its operands into an f32 one
/// ([`bf16_is_rounded_f32`]), `rows` [n, cols] (row stride `rs`) rounded once into this
/// thread's buffer and f32 products of the rounded numbers (each weight block rounded as it
/// is converted): the same results as bf16 products, without rounding the activations again
/// for every block of weight rows. Otherwise `rows` as they are, in `precision`.
/// `f` gets (the rows, their row stride, the products' precision, whether to round W).
fn frozen_operand<R>(
    precision: Precision,
    (rows, n, cols, rs): (&[f32], usize, usize, usize),
    f: impl FnOnce(&[f32], usize, Precision, bool) -> R,
) -> R {
    if precision != Precision::Bf16 || !bf16_is_rounded_f32() {
        return f(rows, rs, precision, false);
    }
    with_buffer(&ROUNDED, |buf| {
        buf.resize(n * cols, 0.0);
        buf.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(i, d)| round_row(d, &rows[i * rs..i * rs + cols]));
        f(buf, cols, Precision::F32, true)
    })
}

/// y [n, out] (row stride `y_rs`, overwritten) = x [n, inp] · Wᵀ for W [out, inp] in any
/// stored precision, converted to f32 a block of rows at a time: the f32 twin's numbers
/// (the products in `precision`, as the training passes' others), with one block of
/// memory. The training passes use it for frozen weights that stay quantized or
/// memory-mapped (LoRA's base).
pub fn frozen_forward(
    y: &mut [f32],
    y_rs: usize,
    x: &[f32],
    w: MatRef<'_>,
    out: usize,
    precision: Precision,
) {
    let inp = w.len() / out.max(1);
    let n = x.len() / inp.max(1);
    assert!(w.len() == out * inp && x.len() == n * inp);
    assert!(n == 0 || (out <= y_rs && y.len() >= (n - 1) * y_rs + out));
    if n == 0 || out == 0 {
        return;
    }
    let yp = y.as_mut_ptr();
    frozen_operand(precision, (x, n, inp, inp), |x, _, precision, round| {
        frozen_blocks(w, (out, inp), round, |r0, _, blk| {
            // Safety: columns r0..r1 of rows 0..n lie inside y (asserted above).
            unsafe { times_panel(precision, yp.add(r0), y_rs, x, (n, inp), blk) }
        })
    });
}

/// dx [n, inp] (overwritten, or added to with [`Accumulate::Add`]) = dy [n, out] (row stride
/// `dy_rs`) · W for W [out, inp] in any stored precision, as [`frozen_forward`]: a frozen
/// weight's input gradient.
pub fn frozen_backward(
    dx: &mut [f32],
    (dy, dy_rs): (&[f32], usize),
    w: MatRef<'_>,
    out: usize,
    acc: Accumulate,
    precision: Precision,
) {
    let inp = w.len() / out.max(1);
    let n = dx.len() / inp.max(1);
    assert!(w.len() == out * inp && dx.len() == n * inp);
    assert!(n == 0 || (out <= dy_rs && dy.len() >= (n - 1) * dy_rs + out));
    if n == 0 {
        return;
    }
    if out == 0 {
        if acc == Accumulate::Overwrite {
            dx.fill(0.0);
        }
        return;
    }
    let dxp = dx.as_mut_ptr();
    frozen_operand(
        precision,
        (dy, n, out, dy_rs),
        |dy, dy_rs, precision, round| {
            frozen_blocks(w, (out, inp), round, |r0, r1, blk| {
                let acc = if r0 == 0 { acc } else { Accumulate::Add };
                // Safety: dy's columns r0..r1 of rows 0..n and all of dx lie inside the slices
                // (asserted above, and dy's rounded copy holds n rows of `out`); the block holds
                // r1 - r0 rows of inp.
                unsafe {
                    matmul_strided(
                        precision,
                        Strided {
                            parallel: true,
                            ..Strided::new(
                                Dims::new(n, r1 - r0, inp),
                                ViewMut::new(dxp, inp),
                                View::new(dy.as_ptr().add(r0), dy_rs, 1),
                                View::new(blk.as_ptr(), inp, 1),
                                acc,
                            )
                        },
                    )
                }
            })
        },
    );
}

/// Rows of x taken together by [`rows_times_rows`]: their block stays in L2 while every
/// weight row is read once for the whole block.
const X_BLOCK: usize = 64;

/// Rows of x up to which half-precision weights take [`rows_times_rows`].
const HALF_ROWS: usize = 8;

/// Rows of x up to which f32 weights take [`rows_times_rows`] where quill's f32 kernel runs
/// (elsewhere up to [`X_BLOCK`]): past them yᵀ = W·xᵀ on that kernel is faster (Zen 5,
/// 768 x 3072: 8 rows 453-473 us against 498-520, 64 rows 829-838 against 2,267-2,298; 4
/// rows 437-464 against 356-360).
const F32_TILE_ROWS: usize = 4;
/// Weight rows per parallel task of [`rows_times_rows`].
const W_TASK: usize = 16;

/// y[i, j] = x[i] · W[j] for x [n, inp] and W [out, inp], both row-major (rows times rows;
/// n from x's length), W in f32, bf16 or f16 (widened in registers, so x is multiplied as it
/// is, exactly as by the matrix-vector product).
/// For a few rows (batched decoding, prompts) of an [out, in] weight this beats packing
/// W for a general GEMM: each weight row is read once per block of 64 x rows, and a 4 x 4
/// register tile of (weight row, x row) dot products uses every load four times.
fn rows_times_rows(y: &mut [f32], y_rs: usize, x: &[f32], w: MatRef<'_>, inp: usize) {
    let (n, out) = (x.len() / inp, w.len() / inp);
    let yp = SendPtr(y.as_mut_ptr());
    for i0 in (0..n).step_by(X_BLOCK) {
        let i1 = (i0 + X_BLOCK).min(n);
        let xb = &x[i0 * inp..i1 * inp];
        (0..out.div_ceil(W_TASK)).into_par_iter().for_each(|t| {
            let j0 = t * W_TASK;
            let j1 = (j0 + W_TASK).min(out);
            // Safety: this task alone writes columns j0..j1 of rows i0..i1 of y.
            let yb = unsafe { yp.get().add(i0 * y_rs) };
            let rows = Rows { w, inp, j0, j1 };
            tile_dots(yb, y_rs, xb, rows);
        });
    }
}

/// Rows j0..j1 of a weight matrix [out, inp] in f32, bf16 or f16.
#[derive(Clone, Copy)]
struct Rows<'a> {
    w: MatRef<'a>,
    inp: usize,
    j0: usize,
    j1: usize,
}

impl Rows<'_> {
    /// The address of row j (counted from j0; past j1, the last row again).
    fn row(&self, j: usize) -> *const u8 {
        let r = (self.j0 + j).min(self.j1 - 1) * self.inp;
        match self.w {
            MatRef::F32(w) => w[r..r + self.inp].as_ptr() as *const u8,
            MatRef::Bf16(w) | MatRef::F16(w) => w[r..r + self.inp].as_ptr() as *const u8,
            MatRef::Quant { .. } => unreachable!("quantized weights go to quant_linear"),
        }
    }

    /// The bytes from one row to the next.
    fn row_bytes(&self) -> usize {
        match self.w {
            MatRef::F32(_) => self.inp * 4,
            _ => self.inp * 2,
        }
    }

    /// Weight k of row j (as [`Rows::row`] picks it), widened to f32.
    fn at(&self, j: usize, k: usize) -> f32 {
        let r = (self.j0 + j).min(self.j1 - 1) * self.inp + k;
        match self.w {
            MatRef::F32(w) => w[r],
            MatRef::Bf16(w) => bf16_to_f32(w[r]),
            MatRef::F16(w) => half::f16::from_bits(w[r]).to_f32(),
            MatRef::Quant { .. } => unreachable!("quantized weights go to quant_linear"),
        }
    }
}

/// Weight storage of the register tiles: f32, bf16, f16.
const KIND_F32: u8 = 0;
const KIND_BF16: u8 = 1;
const KIND_F16: u8 = 2;

/// 16 weights of kind `KIND` at p, as f32.
///
/// # Safety
/// The CPU has AVX-512F; p reaches 16 readable weights.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weights16<const KIND: u8>(p: *const u8, k: usize) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    match KIND {
        KIND_F32 => _mm512_loadu_ps((p as *const f32).add(k)),
        KIND_BF16 => {
            let h = _mm256_loadu_si256((p as *const u16).add(k) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
        _ => _mm512_cvtph_ps(_mm256_loadu_si256(
            (p as *const u16).add(k) as *const __m256i
        )),
    }
}

/// 16 dot products over the first `full` values (a multiple of 16) of weight rows w0..w3 (of
/// kind `KIND`) and x0..x3, in sixteen AVX-512 accumulators: result [a * 4 + b] = w_a · x_b.
///
/// # Safety
/// The CPU has AVX-512F, and each pointer reaches `full` readable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile4_avx512<const KIND: u8>(
    w: [*const u8; 4],
    x: [*const f32; 4],
    full: usize,
) -> [f32; 16] {
    use std::arch::x86_64::*;
    let z = _mm512_setzero_ps();
    let (mut a00, mut a01, mut a02, mut a03) = (z, z, z, z);
    let (mut a10, mut a11, mut a12, mut a13) = (z, z, z, z);
    let (mut a20, mut a21, mut a22, mut a23) = (z, z, z, z);
    let (mut a30, mut a31, mut a32, mut a33) = (z, z, z, z);
    let mut k = 0;
    while k < full {
        let (x0, x1) = (_mm512_loadu_ps(x[0].add(k)), _mm512_loadu_ps(x[1].add(k)));
        let (x2, x3) = (_mm512_loadu_ps(x[2].add(k)), _mm512_loadu_ps(x[3].add(k)));
        let w0 = weights16::<KIND>(w[0], k);
        a00 = _mm512_fmadd_ps(w0, x0, a00);
        a01 = _mm512_fmadd_ps(w0, x1, a01);
        a02 = _mm512_fmadd_ps(w0, x2, a02);
        a03 = _mm512_fmadd_ps(w0, x3, a03);
        let w1 = weights16::<KIND>(w[1], k);
        a10 = _mm512_fmadd_ps(w1, x0, a10);
        a11 = _mm512_fmadd_ps(w1, x1, a11);
        a12 = _mm512_fmadd_ps(w1, x2, a12);
        a13 = _mm512_fmadd_ps(w1, x3, a13);
        let w2 = weights16::<KIND>(w[2], k);
        a20 = _mm512_fmadd_ps(w2, x0, a20);
        a21 = _mm512_fmadd_ps(w2, x1, a21);
        a22 = _mm512_fmadd_ps(w2, x2, a22);
        a23 = _mm512_fmadd_ps(w2, x3, a23);
        let w3 = weights16::<KIND>(w[3], k);
        a30 = _mm512_fmadd_ps(w3, x0, a30);
        a31 = _mm512_fmadd_ps(w3, x1, a31);
        a32 = _mm512_fmadd_ps(w3, x2, a32);
        a33 = _mm512_fmadd_ps(w3, x3, a33);
        k += 16;
    }
    [
        a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33,
    ]
    .map(|v| _mm512_reduce_add_ps(v))
}

/// y[i, j0 + j] = x[i] · w[j] for the rows of x and the weight rows given, in 4 x 4 tiles
/// (AVX-512), or plainly (f32 weights elsewhere; half ones only come here with AVX-512).
fn tile_dots(y: *mut f32, y_rs: usize, x: &[f32], rows: Rows<'_>) {
    let inp = rows.inp;
    let n = x.len() / inp;
    let m = rows.j1 - rows.j0;
    let full = inp - inp % LANES;
    let avx512 = super::simd::has_avx512();
    let xrow = |i: usize| &x[i.min(n - 1) * inp..i.min(n - 1) * inp + inp];
    for jb in (0..m).step_by(4) {
        for ib in (0..n).step_by(4) {
            // edge tiles repeat the last row; the extra results are not stored
            let wr = [0, 1, 2, 3].map(|a| rows.row(jb + a));
            let xr = [xrow(ib), xrow(ib + 1), xrow(ib + 2), xrow(ib + 3)];
            let mut t = [0.0f32; 16];
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                let xp = xr.map(|r| r.as_ptr());
                // Safety: AVX-512F is present, and every row holds `inp` >= `full` values.
                t = unsafe {
                    match rows.w {
                        MatRef::F32(_) => tile4_avx512::<KIND_F32>(wr, xp, full),
                        MatRef::Bf16(_) => tile4_avx512::<KIND_BF16>(wr, xp, full),
                        _ => tile4_avx512::<KIND_F16>(wr, xp, full),
                    }
                };
                done = full;
            }
            if let (false, MatRef::F32(w)) = (avx512, rows.w) {
                // the plain 16 dot products
                let wrow = |a: usize| {
                    let r = (rows.j0 + jb + a).min(rows.j1 - 1) * inp;
                    &w[r..r + full]
                };
                let xs = xr.map(|r| &r[..full]);
                t = dots4x4([wrow(0), wrow(1), wrow(2), wrow(3)], xs);
                done = full;
            }
            for a in 0..(m - jb).min(4) {
                for b in 0..(n - ib).min(4) {
                    let mut sum = t[a * 4 + b];
                    for (kk, &xv) in xr[b].iter().enumerate().skip(done) {
                        sum += rows.at(jb + a, kk) * xv;
                    }
                    // Safety: the caller owns these columns of these rows.
                    unsafe {
                        *y.add((ib + b) * y_rs + rows.j0 + jb + a) = sum;
                    }
                }
            }
        }
    }
}

multiversion! {
    /// t[a * 4 + b] = w[a] · x[b]: a tile's 16 dot products, plainly, compiled for AVX2 where
    /// the CPU has it (the tiles' path without AVX-512; in the baseline x86-64's 4-wide
    /// registers, two to four rows of a 768 x 3072 product took as long as a GEMM does).
    fn dots4x4(w: [&[f32]; 4], x: [&[f32]; 4]) -> [f32; 16] {
        let mut t = [0.0f32; 16];
        for (a, wa) in w.iter().enumerate() {
            for (b, xb) in x.iter().enumerate() {
                t[a * 4 + b] = super::math::dot(wa, xb);
            }
        }
        t
    }
}

/// ys[j] = (weight row j of `rows`) · x (AVX-512): f32 rows four at a time, each load of x
/// serving four rows; half-precision rows one at a time, which read faster than four streams
/// interleaved (Zen 5, [`rows_dot_avx512`]).
#[cfg(target_arch = "x86_64")]
fn dots_avx512(ys: &mut [f32], x: &[f32], rows: Rows<'_>) {
    match rows.w {
        MatRef::F32(_) => dots_in_groups::<KIND_F32, 4, 2>(ys, x, rows),
        MatRef::Bf16(_) => dots_in_groups::<KIND_BF16, 1, 4>(ys, x, rows),
        _ => dots_in_groups::<KIND_F16, 1, 4>(ys, x, rows),
    }
}

/// [`dots_avx512`] for weights of kind `KIND`, R rows at a time with A accumulators each.
#[cfg(target_arch = "x86_64")]
fn dots_in_groups<const KIND: u8, const R: usize, const A: usize>(
    ys: &mut [f32],
    x: &[f32],
    rows: Rows<'_>,
) {
    let inp = rows.inp;
    let full = inp - inp % LANES;
    let m = rows.j1 - rows.j0;
    if m == 0 {
        return;
    }
    let (first, stride) = (rows.row(0), rows.row_bytes());
    for jb in (0..m).step_by(R) {
        // an edge group repeats the last row; its extra results are not stored
        let wr: [*const u8; R] = std::array::from_fn(|a| {
            // Safety: row min(jb + a, m - 1) lies inside `rows`.
            unsafe { first.add((jb + a).min(m - 1) * stride) }
        });
        // Safety: AVX-512F is present (the caller checked), and every row and x hold `inp`
        // >= `full` values.
        let t = unsafe { rows_dot_avx512::<KIND, R, A>(wr, x.as_ptr(), full) };
        for (a, y) in ys[jb..].iter_mut().take(R).enumerate() {
            *y = t[a];
            for (k, &xv) in x.iter().enumerate().skip(full) {
                *y += rows.at(jb + a, k) * xv;
            }
        }
    }
}

/// Dot products of the R weight rows at `w` (of kind `KIND`) with x over their first `full`
/// values (a multiple of 16), each row in A accumulators. Decoding's products wait on memory
/// only when enough chains hide the FMA's latency: one chain per row, each add waiting on
/// the last, read f32 rows at 45-50 GB/s where the memory gives 60-70 (2 threads, AMD EPYC
/// Zen 5); four f32 rows of two chains, x loaded once for the four, read 57-63. Half
/// rows widened in registers read 50-58 one row at a time in four chains, and 35 four rows
/// at a time.
///
/// # Safety
/// The CPU has AVX-512F, and each pointer reaches `full` readable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_dot_avx512<const KIND: u8, const R: usize, const A: usize>(
    w: [*const u8; R],
    x: *const f32,
    full: usize,
) -> [f32; R] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); A]; R];
    let mut k = 0;
    while k + A * LANES <= full {
        let xs: [__m512; A] = std::array::from_fn(|c| _mm512_loadu_ps(x.add(k + c * LANES)));
        for (row, wr) in acc.iter_mut().zip(&w) {
            for (c, (a, xv)) in row.iter_mut().zip(&xs).enumerate() {
                *a = _mm512_fmadd_ps(weights16::<KIND>(*wr, k + c * LANES), *xv, *a);
            }
        }
        k += A * LANES;
    }
    while k < full {
        let xv = _mm512_loadu_ps(x.add(k));
        for (row, wr) in acc.iter_mut().zip(&w) {
            row[0] = _mm512_fmadd_ps(weights16::<KIND>(*wr, k), xv, row[0]);
        }
        k += LANES;
    }
    acc.map(|a| {
        _mm512_reduce_add_ps(
            a.into_iter()
                .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, v)),
        )
    })
}

/// The most output rows per parallel task of the matrix-vector product.
const MATVEC_ROWS: usize = 64;

/// y [out] = W [out, inp] · x [inp]: each weight read once, rows split over the threads.
pub fn matvec(y: &mut [f32], x: &[f32], w: MatRef<'_>, inp: usize) {
    matvec_parts(y, x, &[w], inp)
}

/// y = [W₀; W₁; …] · x for matrices [rows_p, inp] stacked by rows (q | k | v, gate | up),
/// each read once in its stored precision, y holding their outputs one after the other. All
/// the parts' rows go through one parallel pass, in tasks of equal size whose count is a
/// multiple of the thread count: a part of 192 rows alone would have made three tasks of 64
/// for two threads, one thread idle for a third of the pass.
pub fn matvec_parts(y: &mut [f32], x: &[f32], parts: &[MatRef<'_>], inp: usize) {
    let out = y.len();
    assert!(
        x.len() == inp
            && parts.iter().all(|w| w.len().is_multiple_of(inp.max(1)))
            && parts.iter().map(|w| w.len() / inp.max(1)).sum::<usize>() == out
    );
    if out == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let tasks = out.div_ceil(MATVEC_ROWS).next_multiple_of(threads);
    let per = out.div_ceil(tasks);
    let yp = SendPtr(y.as_mut_ptr());
    (0..out.div_ceil(per)).into_par_iter().for_each(|t| {
        let (j0, j1) = (t * per, ((t + 1) * per).min(out));
        // the task's rows, one run per part they fall in
        let mut first = 0;
        for w in parts {
            let rows = w.len() / inp.max(1);
            let (r0, r1) = (
                j0.max(first) - first,
                j1.min(first + rows).max(first) - first,
            );
            if r0 < r1 {
                // Safety: task t alone writes y[j0..j1], which holds outputs first + r0 ..
                // first + r1 (rows r0..r1 of this part).
                let ys =
                    unsafe { std::slice::from_raw_parts_mut(yp.get().add(first + r0), r1 - r0) };
                dots(ys, x, *w, (r0, r1), inp);
            }
            first += rows;
        }
    });
}

/// ys = rows r0..r1 of W · x.
fn dots(ys: &mut [f32], x: &[f32], w: MatRef<'_>, (r0, r1): (usize, usize), inp: usize) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx512() && !matches!(w, MatRef::Quant { .. }) {
        let rows = Rows {
            w,
            inp,
            j0: r0,
            j1: r1,
        };
        return dots_avx512(ys, x, rows);
    }
    match w {
        MatRef::F32(w) => dots_f32(ys, &w[r0 * inp..r1 * inp], x),
        MatRef::Bf16(w) => dots_bf16(ys, &w[r0 * inp..r1 * inp], x),
        MatRef::F16(w) => dots_f16(ys, &w[r0 * inp..r1 * inp], x),
        // converted a row at a time (`linear` sends quantized weights to `quant_linear`)
        MatRef::Quant { .. } => {
            let mut row = vec![0.0f32; inp];
            for (i, yv) in ys.iter_mut().enumerate() {
                w.row_into(r0 + i, inp, &mut row);
                *yv = super::math::dot(&row, x);
            }
        }
    }
}

const LANES: usize = 16;

/// Output columns per parallel task of [`matvec_in_out`]: a block's accumulator stays in L1
/// and each weight row segment it reads is contiguous.
const COLS_PER_TASK: usize = 256;

/// y [out] = x [inp] · W [inp, out] (W stored input-major, as GPT-2's Conv1D weights): each
/// weight read once, in contiguous row segments; columns split over the threads.
pub fn matvec_in_out(y: &mut [f32], x: &[f32], w: &[f32]) {
    let (inp, out) = (x.len(), y.len());
    assert_eq!(w.len(), inp * out);
    let threads = rayon::current_num_threads().max(1);
    // enough tasks for every thread, but blocks no narrower than one cache line's worth
    let cols = out
        .div_ceil(threads * 2)
        .clamp(LANES * 4, COLS_PER_TASK * 4);
    let cols = cols.div_ceil(LANES) * LANES;
    y.par_chunks_mut(cols).enumerate().for_each(|(t, ys)| {
        axpy_rows(ys, x, w, t * cols, out);
    });
}

multiversion! {
    /// ys = Σ_i x[i] · W[i, j0 .. j0 + ys.len()].
    fn axpy_rows(ys: &mut [f32], x: &[f32], w: &[f32], j0: usize, out: usize) {
        ys.fill(0.0);
        let n = ys.len();
        let mut i = 0;
        // four rows at a time: one pass over the accumulator per four weight rows
        while i + 4 <= x.len() {
            let (a, b, c, d) = (x[i], x[i + 1], x[i + 2], x[i + 3]);
            let r0 = &w[i * out + j0..i * out + j0 + n];
            let r1 = &w[(i + 1) * out + j0..(i + 1) * out + j0 + n];
            let r2 = &w[(i + 2) * out + j0..(i + 2) * out + j0 + n];
            let r3 = &w[(i + 3) * out + j0..(i + 3) * out + j0 + n];
            for j in 0..n {
                ys[j] += a * r0[j] + b * r1[j] + c * r2[j] + d * r3[j];
            }
            i += 4;
        }
        while i < x.len() {
            let a = x[i];
            let r = &w[i * out + j0..i * out + j0 + n];
            for j in 0..n {
                ys[j] += a * r[j];
            }
            i += 1;
        }
    }
}

multiversion! {
    /// y[r] = (row r of w) · x without AVX-512 (which takes [`dots_avx512`]).
    fn dots_f32(y: &mut [f32], w: &[f32], x: &[f32]) {
        let inp = x.len();
        for (yv, row) in y.iter_mut().zip(w.chunks_exact(inp)) {
            *yv = super::math::dot(row, x);
        }
    }
}

/// y[r] = (row r of the f16 matrix w) · x without AVX-512 (which takes [`dots_avx512`]): 8
/// weights converted at a time by F16C on AVX2, else plainly.
fn dots_f16(y: &mut [f32], w: &[u16], x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() && std::arch::is_x86_feature_detected!("f16c") {
        // Safety: AVX2, FMA and F16C are present; rows are whole (checked by `matvec`).
        return unsafe { dots_half_avx2::<false>(y, w, x) };
    }
    let inp = x.len();
    for (yv, row) in y.iter_mut().zip(w.chunks_exact(inp)) {
        *yv = row
            .iter()
            .zip(x)
            .map(|(&h, &xv)| half::f16::from_bits(h).to_f32() * xv)
            .sum();
    }
}

/// Half-precision rows · x in 256-bit registers (Zen 3 and other CPUs without AVX-512; with
/// AVX-512, [`rows_dot_avx512`]), for f16 rows or, with `BF16`, bf16 ones: 8 weights widened at a time, four accumulators to cover
/// the FMA latency (bf16's compiled 16-lane loop kept two and ran at about two thirds of the
/// memory's speed).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `w` holds `y.len()` rows of `x.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn dots_half_avx2<const BF16: bool>(y: &mut [f32], w: &[u16], x: &[f32]) {
    use std::arch::x86_64::*;
    const L: usize = 8;
    let widen = |p: *const u16| if BF16 { bf16x8(p) } else { f16x8(p) };
    let one = |h: u16| match BF16 {
        true => f32::from_bits((h as u32) << 16),
        false => half::f16::from_bits(h).to_f32(),
    };
    let inp = x.len();
    let full = inp - inp % L;
    for (yv, row) in y.iter_mut().zip(w.chunks_exact(inp)) {
        let (w, xp) = (row.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut k = 0;
        while k + 4 * L <= full {
            for (u, a) in acc.iter_mut().enumerate() {
                let o = k + u * L;
                *a = _mm256_fmadd_ps(widen(w.add(o)), _mm256_loadu_ps(xp.add(o)), *a);
            }
            k += 4 * L;
        }
        while k < full {
            acc[0] = _mm256_fmadd_ps(widen(w.add(k)), _mm256_loadu_ps(xp.add(k)), acc[0]);
            k += L;
        }
        let mut sum = hsum8(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        for i in full..inp {
            sum += one(row[i]) * x[i];
        }
        *yv = sum;
    }
}

/// Eight f16 at `p` as f32 (a function, inlined into its caller's target features, where a
/// closure may not be).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f16x8(p: *const u16) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// y[r] = (row r of the bf16 matrix w) · x without AVX-512 (which takes [`dots_avx512`]).
fn dots_bf16(y: &mut [f32], w: &[u16], x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() && std::arch::is_x86_feature_detected!("f16c") {
        // Safety: AVX2, FMA and F16C are present; rows are whole (checked by `matvec`).
        return unsafe { dots_half_avx2::<true>(y, w, x) };
    }
    dots_bf16_lanes(y, w, x)
}

multiversion! {
    fn dots_bf16_lanes(y: &mut [f32], w: &[u16], x: &[f32]) {
        let inp = x.len();
        let full = inp - inp % LANES;
        for (yv, row) in y.iter_mut().zip(w.chunks_exact(inp)) {
            let mut acc = [0.0f32; LANES];
            for (cw, cx) in row[..full].chunks_exact(LANES).zip(x[..full].chunks_exact(LANES)) {
                for i in 0..LANES {
                    acc[i] += f32::from_bits((cw[i] as u32) << 16) * cx[i];
                }
            }
            let mut tail = 0.0f32;
            for i in full..inp {
                tail += f32::from_bits((row[i] as u32) << 16) * x[i];
            }
            *yv = acc.iter().sum::<f32>() + tail;
        }
    }
}

/// Eight bf16 at `p` as f32 (see [`f16x8`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bf16x8(p: *const u16) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
    _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
}

/// The sum of a register's eight lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum8(s: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{reference, testutil::*};
    use crate::rng::Rng;

    /// The frozen products (weights converted a block of rows at a time; in bf16, on a CPU
    /// that rounds into f32 products, the activations rounded once for all blocks) equal the
    /// plain product of the same precision, over several blocks, with a strided gradient.
    #[test]
    fn frozen_products_equal_the_plain_product() {
        use crate::kernels::matmul::{matmul, Operand};
        let mut rng = Rng::new(77);
        let (n, inp, out, dy_rs) = (5, 64, 4100, 4103);
        assert!(out * inp > BLOCK_ELEMS, "two blocks of rows at least");
        let x = randn(&mut rng, n * inp, 1.0);
        let w = randn(&mut rng, out * inp, 1.0);
        let dy = randn(&mut rng, n * dy_rs, 1.0);
        for precision in [Precision::F32, Precision::Bf16] {
            let mut want = vec![0.0; n * out];
            let (xo, wo) = (Operand::new(&x, n, inp), Operand::new(&w, out, inp));
            matmul(precision, &mut want, xo, wo.t(), Accumulate::Overwrite);
            let mut got = vec![f32::NAN; n * out];
            frozen_forward(&mut got, out, &x, MatRef::F32(&w), out, precision);
            let err = max_rel_err(&got, &to_f64(&want), 1.0);
            assert!(err <= 1e-5, "{precision:?} forward: {err}");

            let dense: Vec<f32> = (0..n)
                .flat_map(|i| dy[i * dy_rs..i * dy_rs + out].to_vec())
                .collect();
            let mut want = vec![0.0; n * inp];
            let dyo = Operand::new(&dense, n, out);
            matmul(precision, &mut want, dyo, wo, Accumulate::Overwrite);
            let mut got = vec![f32::NAN; n * inp];
            let w = MatRef::F32(&w);
            let over = Accumulate::Overwrite;
            frozen_backward(&mut got, (&dy, dy_rs), w, out, over, precision);
            let err = max_rel_err(&got, &to_f64(&want), 1.0);
            assert!(err <= 1e-5, "{precision:?} backward: {err}");
        }
    }

    #[test]
    fn input_major_matvec_matches_the_reference() {
        let mut rng = Rng::new(32);
        for &(inp, out) in &[(1, 1), (3, 5), (7, 17), (33, 130), (768, 2304), (5, 1000)] {
            let x = randn(&mut rng, inp, 1.0);
            let w = randn(&mut rng, inp * out, 1.0);
            let mut want = vec![0.0; out];
            reference::matmul(
                &mut want,
                &to_f64(&x),
                &to_f64(&w),
                (1, inp, out),
                (false, false),
            );
            let mut y = vec![7.0; out];
            matvec_in_out(&mut y, &x, &w);
            assert!(max_rel_err(&y, &want, 1.0) < 1e-5, "{inp},{out}");
        }
    }

    #[test]
    fn stacked_parts_in_one_pass_match_the_reference() {
        // parts of every stored precision, of sizes that end inside a task and tasks that
        // span several parts, on pools of 1, 2 and 3 threads
        let mut rng = Rng::new(37);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (inp, sizes) in [
                (40, vec![192usize, 64, 64]),
                (33, vec![1, 130, 7]),
                (576, vec![576, 192, 192]),
                (17, vec![3, 1, 200, 65]),
            ] {
                let x = randn(&mut rng, inp, 1.0);
                let ws: Vec<Vec<f32>> = sizes
                    .iter()
                    .map(|&r| randn(&mut rng, r * inp, 1.0))
                    .collect();
                let halves: Vec<Vec<u16>> = ws
                    .iter()
                    .map(|w| {
                        w.iter()
                            .map(|&v| half::f16::from_f32(v).to_bits())
                            .collect()
                    })
                    .collect();
                let brains: Vec<Vec<u16>> = ws
                    .iter()
                    .map(|w| {
                        w.iter()
                            .map(|&v| half::bf16::from_f32(v).to_bits())
                            .collect()
                    })
                    .collect();
                // part i stored as f16, bf16 or f32 in turn; the reference reads the same values
                let mut mats = Vec::new();
                let mut want = Vec::new();
                for (i, w) in ws.iter().enumerate() {
                    let (m, w64): (MatRef, Vec<f64>) = match i % 3 {
                        0 => (
                            MatRef::F16(&halves[i]),
                            halves[i]
                                .iter()
                                .map(|&h| half::f16::from_bits(h).to_f64())
                                .collect(),
                        ),
                        1 => (
                            MatRef::Bf16(&brains[i]),
                            brains[i]
                                .iter()
                                .map(|&h| half::bf16::from_bits(h).to_f64())
                                .collect(),
                        ),
                        _ => (MatRef::F32(w), to_f64(w)),
                    };
                    let mut part = vec![0.0; sizes[i]];
                    reference::matmul(
                        &mut part,
                        &to_f64(&x),
                        &w64,
                        (1, inp, sizes[i]),
                        (false, true),
                    );
                    want.extend(part);
                    mats.push(m);
                }
                let mut y = vec![f32::NAN; want.len()];
                pool.install(|| matvec_parts(&mut y, &x, &mats, inp));
                assert!(
                    max_rel_err(&y, &want, 1.0) < 1e-5,
                    "{threads} threads, {inp} {sizes:?}"
                );
            }
        }
    }

    #[test]
    fn every_precision_and_shape_matches_the_reference() {
        let mut rng = Rng::new(31);
        let mut scratch = Vec::new();
        for &(n, inp, out) in &[
            (1, 1, 1),
            (1, 17, 5),
            (1, 33, 130),
            (1, 48, 3),
            (1, 1000, 70),
            (3, 7, 9),
            (5, 40, 300),
            (2, 1000, 70),
            // a few rows: 4 x 4 register tiles, half weights widened in registers (AVX-512),
            // partial tiles and depths past the last 16
            (4, 768, 130),
            (7, 100, 37),
            (8, 33, 5),
            // prompts: half weights widened as the f32 kernel packs them (or, bf16 ones where
            // the CPU multiplies bf16, copied into the bf16 kernel's panels), across the
            // kernels' depth blocks and column blocks, with partial panels and odd depths
            (37, 1300, 70),
            (40, 700, 1601),
            // past X_BLOCK rows: f32 weights read in place (yᵀ = W·xᵀ, then turned)
            (70, 300, 130),
            (131, 700, 1601),
            (66, 385, 50),
        ] {
            let x = randn(&mut rng, n * inp, 1.0);
            let w = randn(&mut rng, out * inp, 1.0);
            let bf: Vec<u16> = w
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let hf: Vec<u16> = w
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let wb: Vec<f64> = bf
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f64())
                .collect();
            let wh: Vec<f64> = hf
                .iter()
                .map(|&b| half::f16::from_bits(b).to_f64())
                .collect();
            // where the CPU multiplies bf16, more than X_BLOCK rows times bf16 weights (the
            // bf16 kernel's) multiply x rounded to bf16 too
            let xb: Vec<f64> = x
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f64())
                .collect();
            let x_bf16 = n > X_BLOCK && crate::kernels::bf16::has_bf16();
            for (m, w64, x64) in [
                (MatRef::F32(&w), to_f64(&w), to_f64(&x)),
                (MatRef::Bf16(&bf), wb, if x_bf16 { xb } else { to_f64(&x) }),
                (MatRef::F16(&hf), wh, to_f64(&x)),
            ] {
                let mut want = vec![0.0; n * out];
                reference::matmul(&mut want, &x64, &w64, (n, inp, out), (false, true));
                // written at the row stride `out` and at a wider one, whose gaps must stay
                // untouched
                for rs in [out, out + 3] {
                    let mut y = vec![42.0f32; n * rs];
                    linear(&mut y, rs, &x[..n * inp], m, out, &mut scratch);
                    let got: Vec<f32> = (0..n)
                        .flat_map(|i| y[i * rs..i * rs + out].to_vec())
                        .collect();
                    let kind = match m {
                        MatRef::F32(_) => "f32",
                        MatRef::Bf16(_) => "bf16",
                        _ => "f16",
                    };
                    assert!(
                        max_rel_err(&got, &want, 1.0) < 1e-5,
                        "{kind} weights, {n},{inp},{out}, row stride {rs}"
                    );
                    assert!(
                        (0..n).all(|i| y[i * rs + out..(i + 1) * rs].iter().all(|&v| v == 42.0))
                    );
                }
            }
        }
    }

    /// Quantized products give the dequantized product, stacked parts (straddling the
    /// parallel tasks' rows) included, at a row stride wider than the outputs: of the
    /// activations quantized to int16 when decoding (one row, a few rows) and for prompts
    /// (GEMM_ROWS rows or more) where the integer GEMM runs (AVX-512 VNNI), of the
    /// activations themselves where prompts' weight panels are dequantized to f32.
    #[test]
    fn quantized_products_match_the_dequantized_product() {
        use crate::kernels::quant::quantize::quantize;
        let mut rng = Rng::new(33);
        let types = [
            QType::Q8_0,
            QType::Q4_0,
            QType::Q4_1,
            QType::Q5_0,
            QType::Q5_1,
            QType::Q4K,
            QType::Q6K,
        ];
        for t in types {
            let cols = t.block() * 2;
            for &(n, outs) in &[
                (1, [37usize, 1]),
                (1, [5, 30]),
                (1, [40, 17]),
                (3, [19, 2]),
                (6, [24, 9]),
                (GEMM_ROWS, [5, 3]),
                (GEMM_ROWS + 7, [37, 1]),
                (70, [2, 19]),
            ] {
                let x = randn(&mut rng, n * cols, 1.0);
                let (mut bytes, mut w64) = (Vec::new(), Vec::new());
                for &o in &outs {
                    let w = randn(&mut rng, o * cols, 0.1);
                    let mut b = Vec::new();
                    assert!(quantize(t, &w, &mut b));
                    let mut d = vec![0f32; o * cols];
                    dequantize(t, &b, &mut d);
                    w64.extend(d.iter().map(|&v| v as f64));
                    bytes.push(b);
                }
                let parts: Vec<QPart> = bytes.iter().map(|b| QPart::rows(b, t)).collect();
                let out: usize = outs.iter().sum();
                let mut want = vec![0.0; n * out];
                let x64: Vec<f64> = if n < GEMM_ROWS || gemm::available() {
                    let mut xq = QuantRows::default();
                    xq.quantize(&x, cols);
                    let d = |k: usize| xq.d[k / crate::kernels::quant::dot::CHUNK] as f64;
                    xq.q.iter()
                        .enumerate()
                        .map(|(k, &q)| q as f64 * d(k))
                        .collect()
                } else {
                    to_f64(&x)
                };
                reference::matmul(&mut want, &x64, &w64, (n, cols, out), (false, true));
                // the interleavable formats also interleaved by eight rows, whatever this CPU
                let packed: Vec<Vec<u8>> = match x8::packable(t) {
                    true => bytes
                        .iter()
                        .zip(&outs)
                        .map(|(b, &o)| x8::pack(t, b, o, cols))
                        .collect(),
                    false => Vec::new(),
                };
                let x8_parts: Vec<QPart> = packed
                    .iter()
                    .map(|b| QPart {
                        bytes: b,
                        qtype: t,
                        x8: true,
                    })
                    .collect();
                let layouts: &[&[QPart]] = match x8::packable(t) {
                    true => &[&parts, &x8_parts],
                    false => &[&parts],
                };
                for parts in layouts {
                    let rs = out + 2;
                    let mut y = vec![42.0f32; n * rs];
                    quant_linear(&mut y, rs, &x, cols, parts);
                    let got: Vec<f32> = (0..n)
                        .flat_map(|i| y[i * rs..i * rs + out].to_vec())
                        .collect();
                    let x8 = parts[0].x8;
                    assert!(
                        max_rel_err(&got, &want, 1.0) < 1e-5,
                        "{t:?} {n} {outs:?} x8 {x8}"
                    );
                    let gaps =
                        (0..n).all(|i| y[i * rs + out..(i + 1) * rs].iter().all(|&v| v == 42.0));
                    assert!(gaps);
                }
            }
        }
    }
}

//! The matrices a model multiplies by. A [`Weight`] knows its shape, which way round it is
//! stored and where its numbers live: in the model's flat f32 buffer, or memory-mapped from
//! a file in f32, bf16 or f16. A [`Linear`] is one projection: a weight made of one or more
//! stacked parts (q | k | v, gate | up) and an optional bias.
//!
//! The forward and backward passes call `Linear::forward`/`backward` (training) and
//! `Linear::infer` (generation) and never look at the storage: a new storage type (a block-
//! quantized format, say) is a new [`Storage`] variant and a new arm in [`Weight::mat`] /
//! [`Linear::infer`], and no model code changes.

use super::params::View;
use crate::kernels::linear::{self, MatRef, QPart};
use crate::kernels::matmul::{matmul, matmul_fused, Accumulate, Fused, Operand, Precision};
use crate::kernels::quant::QType;
use crate::kernels::reduce;
use memmap2::Mmap;
use std::sync::Arc;

/// Which way round a matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orient {
    /// [out, in], as `nn.Linear` (Llama family): y = x · Wᵀ.
    OutIn,
    /// [in, out], as GPT-2's `Conv1D`: y = x · W.
    InOut,
}

/// Element type of a memory-mapped matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MappedDtype {
    F32,
    Bf16,
    F16,
}

impl MappedDtype {
    pub fn bytes(self) -> usize {
        match self {
            MappedDtype::F32 => 4,
            MappedDtype::Bf16 | MappedDtype::F16 => 2,
        }
    }
}

/// Where a weight's numbers live.
#[derive(Clone, Debug)]
pub enum Storage {
    /// In the model's flat f32 parameter buffer (trainable).
    Params(View),
    /// In a read-only memory map, in the file's precision; `start` is the byte offset of the
    /// first element inside `map` (checked in bounds and aligned by [`Storage::mapped`]).
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        dtype: MappedDtype,
    },
    /// Block-quantized rows (a GGUF tensor), read in place by the quantized kernels; where
    /// `x8`, interleaved by eight rows for the AVX2 products ([`crate::kernels::quant::x8`]).
    Quant {
        bytes: QBytes,
        qtype: QType,
        x8: bool,
    },
}

/// The bytes of a quantized matrix: a range of a read-only memory map, or an owned copy
/// (rows reordered when the file was opened).
#[derive(Clone, Debug)]
pub enum QBytes {
    Map {
        map: Arc<Mmap>,
        range: std::ops::Range<usize>,
    },
    Owned(Arc<Vec<u8>>),
}

impl QBytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            QBytes::Map { map, range } => &map[range.clone()],
            QBytes::Owned(v) => v,
        }
    }
}

impl Storage {
    /// A memory-mapped matrix of `len` elements at byte `start` of `map`; None when the bytes
    /// are out of bounds or misaligned for the element type (the caller then copies them).
    pub fn mapped(map: Arc<Mmap>, start: usize, len: usize, dtype: MappedDtype) -> Option<Self> {
        let size = dtype.bytes();
        let end = len.checked_mul(size)?.checked_add(start)?;
        let aligned = (map.as_ptr() as usize + start).is_multiple_of(size);
        (end <= map.len() && aligned).then_some(Storage::Mapped { map, start, dtype })
    }
}

/// A matrix of `rows` outputs by `cols` inputs.
#[derive(Clone, Debug)]
pub struct Weight {
    pub rows: usize,
    pub cols: usize,
    pub orient: Orient,
    pub storage: Storage,
    /// Its place in the parameter layout (and so in every gradient and optimizer buffer).
    pub view: View,
}

impl Weight {
    pub fn new(view: View, rows: usize, cols: usize, orient: Orient) -> Self {
        Weight {
            rows,
            cols,
            orient,
            storage: Storage::Params(view),
            view,
        }
    }

    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the numbers live outside the f32 parameter buffer (a memory map, or quantized).
    pub fn is_mapped(&self) -> bool {
        !matches!(self.storage, Storage::Params(_))
    }

    /// Whether the numbers are block-quantized.
    pub fn quantized(&self) -> bool {
        matches!(self.storage, Storage::Quant { .. })
    }

    /// The stored numbers, in their stored precision and layout.
    pub fn mat<'a>(&'a self, params: &'a [f32]) -> MatRef<'a> {
        match &self.storage {
            Storage::Params(v) => MatRef::F32(v.of(params)),
            Storage::Mapped { map, start, dtype } => {
                let bytes = &map[*start..*start + self.len() * dtype.bytes()];
                // Safety: `Storage::mapped` checked bounds and alignment; the map is
                // read-only and lives as long as `self` (files are replaced by rename,
                // never written in place).
                unsafe {
                    match dtype {
                        MappedDtype::F32 => MatRef::F32(std::slice::from_raw_parts(
                            bytes.as_ptr() as *const f32,
                            self.len(),
                        )),
                        MappedDtype::Bf16 => MatRef::Bf16(std::slice::from_raw_parts(
                            bytes.as_ptr() as *const u16,
                            self.len(),
                        )),
                        MappedDtype::F16 => MatRef::F16(std::slice::from_raw_parts(
                            bytes.as_ptr() as *const u16,
                            self.len(),
                        )),
                    }
                }
            }
            Storage::Quant { bytes, qtype, x8 } => MatRef::Quant {
                bytes: bytes.as_slice(),
                qtype: *qtype,
                x8: *x8,
            },
        }
    }

    /// Stored row `r` in f32 (an embedding lookup).
    pub fn row_into(&self, params: &[f32], r: usize, dst: &mut [f32]) {
        debug_assert_eq!(self.orient, Orient::OutIn);
        self.mat(params).row_into(r, self.cols, dst)
    }

    /// Bytes one pass over the matrix reads.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::Params(_) => self.len() * 4,
            Storage::Mapped { dtype, .. } => self.len() * dtype.bytes(),
            Storage::Quant { bytes, .. } => bytes.as_slice().len(),
        }
    }

    /// y [n, rows] (row stride `y_rs`, overwritten) = x [n, cols] · W for inference: one row
    /// of x (decoding) takes a matrix-vector kernel that reads W once in its stored
    /// precision; several rows take register tiles or the product kernel.
    pub(crate) fn infer(
        &self,
        params: &[f32],
        y: &mut [f32],
        y_rs: usize,
        x: &[f32],
        scratch: &mut Vec<f32>,
    ) {
        let n = x.len() / self.cols;
        match (self.orient, self.mat(params)) {
            (Orient::OutIn, w) => linear::linear(y, y_rs, x, w, self.rows, scratch),
            (Orient::InOut, MatRef::F32(w)) if n == 1 => {
                linear::matvec_in_out(&mut y[..self.rows], x, w)
            }
            (Orient::InOut, MatRef::F32(w)) => {
                debug_assert_eq!(y_rs, self.rows);
                let y = &mut y[..n * self.rows];
                matmul(
                    Precision::F32,
                    y,
                    Operand::new(x, n, self.cols),
                    Operand::new(w, self.cols, self.rows),
                    Accumulate::Overwrite,
                )
            }
            (Orient::InOut, _) => unreachable!("input-major weights are never mapped"),
        }
    }
}

/// Whether a linear layer's backward pass sums its bias gradient itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasGrad {
    /// Sum it (fused into dW's product where the layout allows).
    Sum,
    /// The caller summed it already (GELU's backward sweep does, in f32).
    Done,
}

/// The parameters and operand precision a training pass reads.
#[derive(Clone, Copy)]
pub struct Train<'a> {
    pub params: &'a [f32],
    pub precision: Precision,
}

/// One projection y = x · W (+ b): a weight stored as one or more stacked parts (q | k | v,
/// gate | up) that lie next to each other in the parameter layout, and an optional bias.
#[derive(Clone, Debug)]
pub struct Linear {
    pub parts: Vec<Weight>,
    pub bias: Option<View>,
    /// All parts as one matrix (the parameter layout keeps them adjacent).
    pub whole: View,
    /// Outputs (the parts' rows together) and inputs.
    pub rows: usize,
    pub cols: usize,
}

impl Linear {
    /// A projection over `parts`, which must be adjacent in the layout, in order.
    pub fn new(parts: Vec<Weight>, bias: Option<View>) -> Self {
        let first = parts[0].view;
        let cols = parts[0].cols;
        let mut end = first.offset;
        for p in &parts {
            assert!(
                p.view.offset == end && p.cols == cols,
                "parts must be adjacent"
            );
            end += p.view.len;
        }
        Linear {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            whole: View {
                offset: first.offset,
                len: end - first.offset,
            },
            parts,
            bias,
        }
    }

    pub fn orient(&self) -> Orient {
        self.parts[0].orient
    }

    /// Training forward: y [n, rows] = x [n, cols] · W + b (+ residual), the bias and the
    /// residual fused into the product as its starting value.
    pub fn forward(&self, tr: Train, y: &mut [f32], x: &[f32], residual: Option<&[f32]>) {
        let n = x.len() / self.cols;
        if self.is_frozen() {
            let (y, x) = (&mut y[..n * self.rows], &x[..n * self.cols]);
            return self.forward_frozen(tr, y, x, residual);
        }
        let fused = Fused {
            bias: self.bias.map(|b| b.of(tr.params)),
            residual,
            col_sums: None,
        };
        let trans_b = self.orient() == Orient::OutIn;
        let (w, out) = (self.whole.of(tr.params), &mut y[..n * self.rows]);
        let (m, k, nn) = (n, self.cols, self.rows);
        matmul_fused(
            tr.precision,
            out,
            Operand::new(x, m, k),
            Operand::op(w, k, nn, trans_b),
            Accumulate::Overwrite,
            fused,
        );
    }

    /// Training backward of [`Linear::forward`], given the output gradient and the input
    /// (dy, x): dx [n, cols] = dy · Wᵀ (overwritten),
    /// dW += the product of x and dy, and with [`BiasGrad::Sum`] db += Σ rows of dy (fused into
    /// dW's product for input-major weights, whose product takes dy as its right operand).
    pub fn backward(
        &self,
        tr: Train,
        grads: &mut [f32],
        dx: &mut [f32],
        (dy, x): (&[f32], &[f32]),
        bias: BiasGrad,
    ) {
        let (n, inp, out, prec) = (x.len() / self.cols, self.cols, self.rows, tr.precision);
        assert!(!self.is_frozen(), "a frozen layer has no weight gradient");
        let w = self.whole;
        let bias = self.bias.filter(|_| bias == BiasGrad::Sum);
        match self.orient() {
            Orient::InOut => {
                matmul(
                    prec,
                    dx,
                    Operand::new(dy, n, out),
                    Operand::new(w.of(tr.params), inp, out).t(),
                    Accumulate::Overwrite,
                );
                match bias {
                    Some(b) => {
                        let (gw, gb) = View::pair_mut(w, b, grads);
                        let fused = Fused {
                            col_sums: Some(gb),
                            ..Fused::default()
                        };
                        matmul_fused(
                            prec,
                            gw,
                            Operand::new(x, n, inp).t(),
                            Operand::new(dy, n, out),
                            Accumulate::Add,
                            fused,
                        );
                    }
                    None => matmul(
                        prec,
                        w.of_mut(grads),
                        Operand::new(x, n, inp).t(),
                        Operand::new(dy, n, out),
                        Accumulate::Add,
                    ),
                }
            }
            Orient::OutIn => {
                matmul(
                    prec,
                    dx,
                    Operand::new(dy, n, out),
                    Operand::new(w.of(tr.params), out, inp),
                    Accumulate::Overwrite,
                );
                matmul(
                    prec,
                    w.of_mut(grads),
                    Operand::new(dy, n, out).t(),
                    Operand::new(x, n, inp),
                    Accumulate::Add,
                );
                if let Some(b) = bias {
                    reduce::col_sum_acc(b.of_mut(grads), dy, n);
                }
            }
        }
    }

    /// The input gradient of [`Linear::backward`] alone, dx [n, cols] = dy · Wᵀ
    /// (overwritten), for a frozen weight.
    pub fn backward_input(&self, tr: Train, dx: &mut [f32], dy: &[f32]) {
        let (n, inp, out) = (dy.len() / self.rows, self.cols, self.rows);
        if self.is_frozen() {
            // each part's rows of W times its columns of dy, added up
            let mut col = 0;
            for (i, part) in self.parts.iter().enumerate() {
                let acc = match i {
                    0 => Accumulate::Overwrite,
                    _ => Accumulate::Add,
                };
                let (dx, w) = (&mut dx[..n * inp], part.mat(tr.params));
                linear::frozen_backward(dx, (&dy[col..], out), w, part.rows, acc, tr.precision);
                col += part.rows;
            }
            return;
        }
        let w = self.whole.of(tr.params);
        let b = match self.orient() {
            Orient::InOut => Operand::new(w, inp, out).t(),
            Orient::OutIn => Operand::new(w, out, inp),
        };
        matmul(
            tr.precision,
            &mut dx[..n * inp],
            Operand::new(dy, n, out),
            b,
            Accumulate::Overwrite,
        );
    }

    /// Whether a part lives outside the f32 parameter buffer (quantized or memory-mapped):
    /// then the layer is frozen, and the training passes convert its rows to f32 a block
    /// at a time ([`linear::frozen_forward`]) instead of reading the buffer.
    pub fn is_frozen(&self) -> bool {
        self.parts.iter().any(Weight::is_mapped)
    }

    /// [`Linear::forward`] for a frozen layer: each part's columns of y, then the bias and
    /// the residual added.
    fn forward_frozen(&self, tr: Train, y: &mut [f32], x: &[f32], residual: Option<&[f32]>) {
        let (params, prec) = (tr.params, tr.precision);
        let mut col = 0;
        for part in &self.parts {
            debug_assert_eq!(part.orient, Orient::OutIn, "frozen weights are [out, in]");
            let (w, rows) = (part.mat(params), part.rows);
            linear::frozen_forward(&mut y[col..], self.rows, x, w, rows, prec);
            col += part.rows;
        }
        let b = self.bias.map(|b| b.of(params));
        for (i, row) in y.chunks_exact_mut(self.rows).enumerate() {
            if let Some(b) = b {
                row.iter_mut().zip(b).for_each(|(v, bv)| *v += bv);
            }
            if let Some(r) = residual {
                let r = &r[i * self.rows..(i + 1) * self.rows];
                row.iter_mut().zip(r).for_each(|(v, rv)| *v += rv);
            }
        }
    }

    /// Inference: y [n, rows] = x [n, cols] · W + b, each part read in its stored precision.
    pub fn infer(&self, params: &[f32], y: &mut [f32], x: &[f32], scratch: &mut Vec<f32>) {
        let n = x.len() / self.cols;
        let out = self.rows;
        if self.orient() == Orient::InOut && n > 1 {
            // a few rows through an input-major f32 matrix: the bias is the product's start
            let fused = Fused {
                bias: self.bias.map(|b| b.of(params)),
                ..Fused::default()
            };
            let w = self.whole.of(params);
            let y = &mut y[..n * out];
            return matmul_fused(
                Precision::F32,
                y,
                Operand::new(x, n, self.cols),
                Operand::new(w, self.cols, out),
                Accumulate::Overwrite,
                fused,
            );
        }
        let stacked = self.parts.len() > 1 && self.parts.iter().all(|p| p.quantized());
        if stacked {
            // q | k | v or gate | up in one parallel pass over one quantization of x
            let mut parts = [QPart::rows(&[], QType::Q8_0); 8];
            for (slot, p) in parts.iter_mut().zip(&self.parts) {
                if let MatRef::Quant { bytes, qtype, x8 } = p.mat(params) {
                    *slot = QPart { bytes, qtype, x8 };
                }
            }
            linear::quant_linear(
                y,
                out,
                &x[..n * self.cols],
                self.cols,
                &parts[..self.parts.len()],
            );
        } else if n == 1
            && (2..=8).contains(&self.parts.len())
            && self.orient() == Orient::OutIn
            && !self.parts.iter().any(Weight::quantized)
        {
            // decoding through stacked f32/bf16/f16 parts: one parallel pass over all rows
            let mut mats = [MatRef::F32(&[]); 8];
            for (slot, p) in mats.iter_mut().zip(&self.parts) {
                *slot = p.mat(params);
            }
            let mats = &mats[..self.parts.len()];
            linear::matvec_parts(&mut y[..out], &x[..self.cols], mats, self.cols);
        } else {
            let mut col = 0;
            for part in &self.parts {
                part.infer(params, &mut y[col..], out, x, scratch);
                col += part.rows;
            }
        }
        if let Some(b) = self.bias {
            let b = b.of(params);
            for row in y[..n * out].chunks_mut(out) {
                for (v, bv) in row.iter_mut().zip(b) {
                    *v += bv;
                }
            }
        }
    }
}

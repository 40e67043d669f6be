//! The decoder's training passes over a batch [B, T]: `forward` keeps every activation,
//! `backward` walks the same layers in reverse, accumulating every parameter's gradient.

use super::decoder::Norm;
use super::decoder::{qk_cols, rotate_qk, Mlp, Model, Positions, Saved};
use super::lora::{Lora, LoraActs, Target};
use super::weight::{BiasGrad, Linear, Train};
use crate::kernels::attention::{self, Heads};
use crate::kernels::crossentropy::{self, IGNORE};
use crate::kernels::matmul::{
    bf16_is_rounded_f32, matmul, round_in_place, Accumulate, Operand, Precision,
};
use crate::kernels::rope::{Direction, Rope, RowPositions};
use crate::kernels::{embedding, gelu, linear, swiglu};
use crate::kernels::{RowStats, Stats};
use crate::{Error, Result};
use rayon::prelude::*;

/// Layer `l`'s slice of a buffer holding `per` values for each layer.
fn at(buf: &[f32], l: usize, per: usize) -> &[f32] {
    &buf[l * per..(l + 1) * per]
}

fn at_mut(buf: &mut [f32], l: usize, per: usize) -> &mut [f32] {
    &mut buf[l * per..(l + 1) * per]
}

/// Rows of a batch [B, T]: row r at position r % T.
fn batch_positions(t: usize) -> RowPositions {
    RowPositions {
        first: 0,
        period: Some(t),
    }
}

/// Rotates the query and key heads of a batch's rows: at `positions` when the sequences pack
/// documents, else at each row's place in its sequence.
fn rotate_batch(
    rope: &Rope,
    qkv: &mut [f32],
    hs: Heads,
    t: usize,
    positions: &[u32],
    dir: Direction,
) {
    if positions.is_empty() {
        return rotate_qk(rope, qkv, hs, batch_positions(t), dir);
    }
    for cols in qk_cols(hs) {
        rope.apply_at(qkv, cols, positions, dir);
    }
}

/// The forward passes of layer `l`'s adapters at `targets` (none without LoRA): each adds
/// its share into its projection's output `y`, from the projection's input `x`.
fn adapt(
    lora: &mut Option<(&Lora, &mut LoraActs)>,
    l: usize,
    targets: &[Target],
    x: &[f32],
    y: &mut [f32],
) {
    if let Some((lo, la)) = lora {
        for k in lo.at(l, targets) {
            lo.forward_into(k, la, x, y);
        }
    }
}

/// Layer `l`'s rows of a norm's statistics (`mean` is empty for RMSNorm).
fn row_stats<'a>(mean: &'a mut [f32], rstd: &'a mut [f32], l: usize, n: usize) -> RowStats<'a> {
    let m = if mean.is_empty() { 0 } else { n };
    RowStats {
        mean: at_mut(mean, l, m),
        rstd: at_mut(rstd, l, n),
    }
}

/// A norm's input and layer `l`'s statistics, for its backward pass.
fn saved<'a>(x: &'a [f32], mean: &'a [f32], rstd: &'a [f32], l: usize, n: usize) -> Saved<'a> {
    let m = if mean.is_empty() { 0 } else { n };
    Saved {
        x,
        stats: Stats {
            mean: at(mean, l, m),
            rstd: at(rstd, l, n),
        },
    }
}

impl Model {
    /// Forward pass over ids [B, T] (row-major) for training; fills every activation and
    /// the logits. Needs f32 weights in the checkpoint's layout.
    pub fn forward(&self, a: &mut Activations, ids: &[u32]) -> Result<()> {
        a.starts.clear();
        a.positions.clear();
        self.forward_pass(a, ids, None)
    }

    /// [`Model::forward`] (packed when `starts` is given) with LoRA adapters beside the
    /// frozen weights; `la` keeps what their backward pass needs.
    pub fn forward_lora(
        &self,
        a: &mut Activations,
        ids: &[u32],
        starts: Option<&[u32]>,
        lora: (&Lora, &mut LoraActs),
    ) -> Result<()> {
        match starts {
            Some(s) => self.set_documents(a, ids, s)?,
            None => {
                a.starts.clear();
                a.positions.clear();
            }
        }
        self.forward_pass(a, ids, Some(lora))
    }

    /// [`Model::forward`] over sequences that pack several documents (fine-tuning examples):
    /// `starts[r]` is where row r's document starts in its sequence. Each document is
    /// computed as if alone: its positions count from 0, and its rows attend only to its own
    /// rows. [`Model::backward`] then follows the same documents.
    pub fn forward_packed(&self, a: &mut Activations, ids: &[u32], starts: &[u32]) -> Result<()> {
        self.set_documents(a, ids, starts)?;
        self.forward_pass(a, ids, None)
    }

    /// Checks packed documents' starts and keeps them (and each row's position) in `a`.
    fn set_documents(&self, a: &mut Activations, ids: &[u32], starts: &[u32]) -> Result<()> {
        let t = a.t;
        if starts.len() != ids.len() {
            return Err(Error::Input(format!(
                "{} document starts for {} ids",
                starts.len(),
                ids.len()
            )));
        }
        a.starts.clear();
        a.positions.clear();
        for (r, &s) in starts.iter().enumerate() {
            let i = r % t;
            // a document starts at or before its row, and where the previous row's did or at it
            let prev = if i == 0 { 0 } else { starts[r - 1] as usize };
            if s as usize > i || (s as usize != prev && s as usize != i) {
                return Err(Error::Input(format!(
                    "row {r}: a document start of {s} does not follow the rows before it"
                )));
            }
            a.positions.push((i - s as usize) as u32);
        }
        a.starts.extend_from_slice(starts);
        Ok(())
    }

    fn forward_pass(
        &self,
        a: &mut Activations,
        ids: &[u32],
        mut lora: Option<(&Lora, &mut LoraActs)>,
    ) -> Result<()> {
        self.check_batch(a, ids, lora.is_some())?;
        let (n, c, t, hs) = (a.b * a.t, self.width, a.t, self.heads);
        let (w, hd, up, f) = (hs.qkv_width(), hs.h * hs.d, a.up_width, self.mlp_width);
        let p = &self.params;
        let tr = Train {
            params: p,
            precision: self.precision,
        };
        self.embed_batch(&mut a.x0, ids, t, &a.positions);
        for (l, blk) in self.blocks.iter().enumerate() {
            let inp = if l == 0 {
                &a.x0
            } else {
                at(&a.res3, l - 1, n * c)
            };
            let stats = row_stats(&mut a.mean1, &mut a.rstd1, l, n);
            let ln1 = at_mut(&mut a.ln1, l, n * c);
            blk.attn_norm.forward(p, ln1, stats, inp);
            let qkv = at_mut(&mut a.qkv, l, n * w);
            blk.qkv.forward(tr, qkv, ln1, None);
            adapt(&mut lora, l, &[Target::Q, Target::K, Target::V], ln1, qkv);
            if let Positions::Rotary(rope) = &self.positions {
                rotate_batch(rope, qkv, hs, t, &a.positions, Direction::Forward);
            }
            let (lse, atty) = (
                at_mut(&mut a.lse, l, n * hs.h),
                at_mut(&mut a.atty, l, n * hd),
            );
            let layer = self.attention_layer(l, a.b, t, &a.starts);
            attention::forward(layer, atty, lse, &mut a.attn_scratch, qkv);
            let res2 = at_mut(&mut a.res2, l, n * c);
            blk.o.forward(tr, res2, atty, Some(inp));
            adapt(&mut lora, l, &[Target::O], atty, res2);
            let stats = row_stats(&mut a.mean2, &mut a.rstd2, l, n);
            let ln2 = at_mut(&mut a.ln2, l, n * c);
            blk.mlp_norm.forward(p, ln2, stats, res2);
            let (up_out, act) = (at_mut(&mut a.up, l, n * up), at_mut(&mut a.act, l, n * f));
            blk.up.forward(tr, up_out, ln2, None);
            adapt(&mut lora, l, &[Target::Gate, Target::Up], ln2, up_out);
            match self.mlp {
                Mlp::Gelu => gelu::forward(act, up_out),
                Mlp::SwiGlu => swiglu::forward(act, up_out, f),
            }
            let res3 = at_mut(&mut a.res3, l, n * c);
            blk.down.forward(tr, res3, act, Some(res2));
            adapt(&mut lora, l, &[Target::Down], act, res3);
        }
        let last = at(&a.res3, self.blocks.len() - 1, n * c);
        let stats = RowStats {
            mean: &mut a.lnf_mean,
            rstd: &mut a.lnf_rstd,
        };
        self.final_norm.forward(p, &mut a.lnf, stats, last);
        // where bf16 products round their operands as they copy them, lnf is rounded once
        // here: the head's product has many column blocks (V / 1,536 of them), and each
        // would round A again
        a.lnf_rounded = tr.precision == Precision::Bf16 && bf16_is_rounded_f32();
        if a.lnf_rounded {
            a.lnf[..n * c]
                .par_chunks_mut(c.max(1) * 64)
                .for_each(round_in_place);
        }
        // logits [M, V] = lnf [M, C] · headᵀ (head stored [V, C]) for the M rows the head
        // computes: all N, or the counted ones moved to the front of lnf
        let m = a.gather_head_rows(c);
        let v = self.vocab;
        if m == 0 {
            return Ok(());
        }
        if self.head.is_mapped() {
            let logits = &mut a.logits[..m * v];
            let (lnf, w) = (&a.lnf[..m * c], self.head.mat(p));
            linear::frozen_forward(logits, v, lnf, w, v, tr.precision);
            return Ok(());
        }
        let lnf = Operand::new(&a.lnf[..m * c], m, c);
        matmul(
            tr.precision,
            &mut a.logits[..m * v],
            if a.lnf_rounded { lnf.rounded() } else { lnf },
            Operand::new(self.head.view.of(p), v, c).t(),
            Accumulate::Overwrite,
        );
        Ok(())
    }

    /// Sum of the cross-entropy losses of the logits from the last `forward` against targets
    /// [B·T] (`crossentropy::IGNORE` skips a position), and the positions counted.
    pub fn loss(&self, acts: &mut Activations, targets: &[u32]) -> (f64, usize) {
        let h = acts.head_loss_parts(targets, self.vocab);
        crossentropy::forward(h.losses, h.logits, h.targets, self.vocab);
        crossentropy::sum_counted(h.losses, h.targets)
    }

    /// Backward pass after `forward`: turns the logits into their gradient in place, then
    /// pushes it back through every layer, adding d loss/d parameter · `grad_scale` into
    /// `grads` (same layout as the parameters). The loss is the mean over counted targets,
    /// times `grad_scale` (1/accumulation steps). Returns (sum of losses, counted positions).
    pub fn backward(&self, a: &mut Activations, grads: &mut [f32], batch: Batch) -> (f64, usize) {
        self.backward_into(a, Grads::Base(grads), batch)
    }

    /// Backward pass after [`Model::forward_lora`]: the model's weights stay frozen (none of
    /// their gradients is computed); the adapters' gradients are added into `grads` (the
    /// adapters' layout).
    pub fn backward_lora(
        &self,
        a: &mut Activations,
        lora: (&Lora, &mut LoraActs),
        grads: &mut [f32],
        batch: Batch,
    ) -> (f64, usize) {
        let (lora, la) = lora;
        self.backward_into(a, Grads::Lora { lora, la, grads }, batch)
    }

    fn backward_into(&self, a: &mut Activations, mut g: Grads, batch: Batch) -> (f64, usize) {
        let (n, c, t, hs, v) = (a.b * a.t, self.width, a.t, self.heads, self.vocab);
        let (w, hd, up, f) = (hs.qkv_width(), hs.h * hs.d, a.up_width, self.mlp_width);
        let p = &self.params;
        let tr = Train {
            params: p,
            precision: self.precision,
        };
        let targets = batch.targets;
        let counted = batch.over.unwrap_or_else(|| {
            targets
                .iter()
                .filter(|&&x| x != crossentropy::IGNORE)
                .count()
        });
        let scale = batch.grad_scale / counted.max(1) as f32;
        let h = a.head_loss_parts(targets, v);
        let m = h.targets.len();
        // where bf16 products round their operands into copies, the logits' gradient (the
        // largest operand of the step, [M, V]) is rounded once here, as it is written, and
        // both of its products read it in place
        let round = tr.precision == Precision::Bf16 && bf16_is_rounded_f32();
        crossentropy::forward_backward_inplace(h.logits, h.losses, h.targets, v, (scale, round));
        let result = crossentropy::sum_counted(h.losses, h.targets);

        // logits = lnf · headᵀ over the head's M rows (the first M of lnf)
        let (d_logits, head) = (&a.logits[..m * v], self.head.view);
        let d_lnf = &mut a.d_lnf[..m * c];
        if m > 0 && self.head.is_mapped() {
            let (over, w) = (Accumulate::Overwrite, self.head.mat(p));
            linear::frozen_backward(d_lnf, (d_logits, v), w, v, over, tr.precision);
        } else if m > 0 {
            let d_logits = Operand::new(d_logits, m, v);
            matmul(
                tr.precision,
                d_lnf,
                if round { d_logits.rounded() } else { d_logits },
                Operand::new(head.of(p), v, c),
                Accumulate::Overwrite,
            );
        }
        if let (Grads::Base(grads), true) = (&mut g, m > 0) {
            let d_logits = Operand::new(d_logits, m, v).t();
            let lnf = Operand::new(&a.lnf[..m * c], m, c);
            matmul(
                tr.precision,
                head.of_mut(grads),
                if round { d_logits.rounded() } else { d_logits },
                if a.lnf_rounded && round {
                    lnf.rounded()
                } else {
                    lnf
                },
                Accumulate::Add,
            );
        }
        a.scatter_head_rows(c);
        a.d_res.fill(0.0);
        let last = at(&a.res3, self.blocks.len() - 1, n * c);
        let fin = Saved {
            x: last,
            stats: Stats {
                mean: &a.lnf_mean,
                rstd: &a.lnf_rstd,
            },
        };
        g.norm(&self.final_norm, p, &mut a.d_res, &a.d_lnf, fin);

        for (l, blk) in self.blocks.iter().enumerate().rev() {
            let inp = if l == 0 {
                &a.x0
            } else {
                at(&a.res3, l - 1, n * c)
            };
            let (up_out, act) = (at(&a.up, l, n * up), at(&a.act, l, n * f));
            let res2 = at(&a.res2, l, n * c);

            // MLP: res3 = res2 + down(activation(up(norm(res2))))
            let d_up = &mut a.d_up[..n * up];
            let bias = match self.mlp {
                Mlp::Gelu => {
                    // GELU is elementwise: its input gradient overwrites its output's in place
                    g.linear(&blk.down, tr, d_up, (&a.d_res, act), BiasGrad::Sum);
                    match (self.precision, blk.up.bias, &mut g) {
                        // in f32 the bias gradient is summed in GELU's sweep; in bf16, while
                        // the gradient is packed for dW's product (free there)
                        (Precision::F32, Some(b), Grads::Base(grads)) => {
                            gelu::backward_inplace_col_sums(d_up, up_out, f, b.of_mut(grads));
                            BiasGrad::Done
                        }
                        _ => {
                            gelu::backward_inplace(d_up, up_out);
                            BiasGrad::Sum
                        }
                    }
                }
                Mlp::SwiGlu => {
                    g.linear(&blk.down, tr, &mut a.d_act, (&a.d_res, act), BiasGrad::Sum);
                    g.adapters(l, &[Target::Down], &mut a.d_act, (&a.d_res, act));
                    swiglu::backward(d_up, &a.d_act, up_out, f);
                    BiasGrad::Sum
                }
            };
            let ln2 = at(&a.ln2, l, n * c);
            g.linear(&blk.up, tr, &mut a.d_ln, (d_up, ln2), bias);
            g.adapters(l, &[Target::Gate, Target::Up], &mut a.d_ln, (d_up, ln2));
            let norm2 = saved(res2, &a.mean2, &a.rstd2, l, n);
            g.norm(&blk.mlp_norm, p, &mut a.d_res, &a.d_ln, norm2);

            // Attention: res2 = inp + o(attention(positions(qkv(norm(inp)))))
            let (atty, qkv) = (at(&a.atty, l, n * hd), at(&a.qkv, l, n * w));
            g.linear(&blk.o, tr, &mut a.d_atty, (&a.d_res, atty), BiasGrad::Sum);
            g.adapters(l, &[Target::O], &mut a.d_atty, (&a.d_res, atty));
            let lse = at(&a.lse, l, n * hs.h);
            let (d_qkv, scratch) = (&mut a.d_qkv, &mut a.attn_scratch);
            let fwd = attention::Saved {
                qkv,
                out: atty,
                lse,
            };
            let layer = self.attention_layer(l, a.b, t, &a.starts);
            attention::backward(layer, d_qkv, scratch, &a.d_atty, fwd);
            if let Positions::Rotary(rope) = &self.positions {
                rotate_batch(rope, &mut a.d_qkv, hs, t, &a.positions, Direction::Inverse);
            }
            let ln1 = at(&a.ln1, l, n * c);
            g.linear(&blk.qkv, tr, &mut a.d_ln, (&a.d_qkv, ln1), BiasGrad::Sum);
            let qkv_targets = [Target::Q, Target::K, Target::V];
            g.adapters(l, &qkv_targets, &mut a.d_ln, (&a.d_qkv, ln1));
            let norm1 = saved(inp, &a.mean1, &a.rstd1, l, n);
            g.norm(&blk.attn_norm, p, &mut a.d_res, &a.d_ln, norm1);
        }
        let Grads::Base(grads) = g else {
            // the embedding is frozen too
            return result;
        };
        match self.positions {
            Positions::Learned(wpe) => {
                let (gte, gpe) = super::params::View::pair_mut(self.embed.view, wpe, grads);
                if a.positions.is_empty() {
                    embedding::backward(gte, gpe, &a.d_res, batch.ids, t, c);
                } else {
                    embedding::backward_at(gte, gpe, &a.d_res, batch.ids, &a.positions, c);
                }
            }
            Positions::Rotary(_) => {
                embedding::backward_tokens(self.embed.view.of_mut(grads), &a.d_res, batch.ids, c)
            }
        }
        result
    }

    /// x0 [B·T, C]: each token's embedding row, plus its position's row when learned (at
    /// `positions` when given, else at its place in its sequence).
    fn embed_batch(&self, x0: &mut [f32], ids: &[u32], t: usize, positions: &[u32]) {
        let (c, p) = (self.width, &self.params);
        if self.embed.is_mapped() {
            // a frozen table that stays quantized or mapped: each row converted
            for (i, (row, &id)) in x0.chunks_exact_mut(c).zip(ids).enumerate() {
                self.embed.row_into(p, id as usize, row);
                if let Positions::Learned(wpe) = self.positions {
                    let at = positions.get(i).map_or(i % t, |&q| q as usize);
                    let pos = &wpe.of(p)[at * c..(at + 1) * c];
                    row.iter_mut().zip(pos).for_each(|(v, pv)| *v += pv);
                }
            }
            return;
        }
        match self.positions {
            Positions::Learned(wpe) if positions.is_empty() => {
                embedding::forward(x0, ids, self.embed.view.of(p), wpe.of(p), t, c)
            }
            Positions::Learned(wpe) => {
                embedding::forward_at(x0, ids, self.embed.view.of(p), wpe.of(p), positions, c)
            }
            Positions::Rotary(_) => embedding::forward_tokens(x0, ids, self.embed.view.of(p), c),
        }
    }

    /// Layer `l`'s attention over a batch of `b` sequences of `t` positions.
    fn attention_layer<'a>(
        &self,
        l: usize,
        b: usize,
        t: usize,
        starts: &'a [u32],
    ) -> attention::Layer<'a> {
        attention::Layer {
            b,
            t,
            heads: self.heads,
            scale: self.attention[l].scale,
            precision: self.precision,
            starts: (!starts.is_empty()).then_some(starts),
        }
    }

    /// `frozen`: the model's weights do not train (LoRA), so they may stay quantized or
    /// memory-mapped.
    fn check_batch(&self, a: &Activations, ids: &[u32], frozen: bool) -> Result<()> {
        let (b, t) = (a.b, a.t);
        if ids.len() != b * t {
            return Err(Error::Input(format!(
                "expected {} ids, got {}",
                b * t,
                ids.len()
            )));
        }
        if t > self.context {
            return Err(Error::Input(format!(
                "sequence of {t} tokens is longer than the context ({} positions)",
                self.context
            )));
        }
        if let Some(w) = self
            .attention
            .iter()
            .filter_map(|x| x.window)
            .find(|&w| w < t)
        {
            return Err(Error::Input(format!(
                "training on sequences longer than the sliding window ({w}) is not supported"
            )));
        }
        if a.up_width != self.up_width() || a.layers != self.blocks.len() {
            return Err(Error::Input("activations of another model".into()));
        }
        if !frozen {
            self.check_trainable()?;
        }
        self.check_ids(ids)
    }

    fn up_width(&self) -> usize {
        match self.mlp {
            Mlp::Gelu => self.mlp_width,
            Mlp::SwiGlu => 2 * self.mlp_width,
        }
    }

    /// Buffers for a training batch of `b` sequences of `t` tokens.
    pub fn new_acts(&self, b: usize, t: usize) -> Activations {
        Activations::new(self, b, t)
    }
}

/// Where a backward pass puts its gradients: every parameter's, or (the model frozen) the
/// LoRA adapters' only.
enum Grads<'g> {
    Base(&'g mut [f32]),
    Lora {
        lora: &'g Lora,
        la: &'g mut LoraActs,
        grads: &'g mut [f32],
    },
}

impl Grads<'_> {
    /// A projection's backward: its input gradient, and its weight gradients unless frozen.
    fn linear(
        &mut self,
        lin: &Linear,
        tr: Train,
        dx: &mut [f32],
        dy_x: (&[f32], &[f32]),
        bias: BiasGrad,
    ) {
        match self {
            Grads::Base(grads) => lin.backward(tr, grads, dx, dy_x, bias),
            Grads::Lora { .. } => lin.backward_input(tr, dx, dy_x.0),
        }
    }

    /// A norm's backward: its input gradient, and its gain (and bias) gradients unless frozen.
    fn norm(&mut self, norm: &Norm, p: &[f32], dx: &mut [f32], dout: &[f32], s: Saved) {
        match self {
            Grads::Base(grads) => norm.backward(p, grads, dx, dout, s),
            Grads::Lora { la, .. } => norm.backward_input(p, (dx, &mut la.gains), dout, s),
        }
    }

    /// The backward passes of layer `l`'s adapters at `targets` (none without LoRA): their
    /// gradients, and their share of the input gradient `dx`.
    fn adapters(&mut self, l: usize, targets: &[Target], dx: &mut [f32], dy_x: (&[f32], &[f32])) {
        if let Grads::Lora { lora, la, grads } = self {
            for k in lora.at(l, targets) {
                lora.backward_from(k, la, dy_x, dx, grads);
            }
        }
    }
}

/// One batch's inputs to [`Model::backward`].
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    pub ids: &'a [u32],
    pub targets: &'a [u32],
    /// Multiplies the mean loss's gradient (1/accumulation steps).
    pub grad_scale: f32,
    /// The positions the mean is over: those counted in this batch (None), or in the whole
    /// global batch that this one is a rank's rows of.
    pub over: Option<usize>,
}

impl<'a> Batch<'a> {
    pub fn new(ids: &'a [u32], targets: &'a [u32], grad_scale: f32) -> Self {
        Batch {
            ids,
            targets,
            grad_scale,
            over: None,
        }
    }

    /// The loss is the mean over `counted` positions of a global batch (of which this one
    /// holds some rows).
    pub fn over(self, counted: usize) -> Self {
        Batch {
            over: Some(counted),
            ..self
        }
    }
}

/// What the loss of the head's rows works on ([`Activations::head_loss_parts`]).
struct HeadLoss<'a> {
    targets: &'a [u32],
    losses: &'a mut [f32],
    logits: &'a mut [f32],
}

/// Every activation of a training forward pass for a batch [B, T], plus backward scratch.
/// Per-layer buffers hold all L layers back to back.
pub struct Activations {
    pub b: usize,
    pub t: usize,
    layers: usize,
    up_width: usize,
    x0: Vec<f32>,
    ln1: Vec<f32>,
    /// Row means of the two norms of each layer (LayerNorm only; empty for RMSNorm).
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    qkv: Vec<f32>,
    /// Log-sum-exp of each attention row [L, B, H, T] (flash-style: no T x T matrix kept).
    lse: Vec<f32>,
    atty: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
    /// The MLP's up projection [L, N, F or 2F] and its activation [L, N, F].
    up: Vec<f32>,
    act: Vec<f32>,
    res3: Vec<f32>,
    lnf: Vec<f32>,
    /// Whether `forward` rounded lnf to bf16 as it wrote it (bf16 products emulated in f32):
    /// the head's two products then read it as it is.
    lnf_rounded: bool,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    /// [B·T, V]: the logits after `forward`, their gradient after `backward` (only the
    /// first rows, in order, after [`Activations::logits_where_counted`]).
    pub logits: Vec<f32>,
    pub losses: Vec<f32>,
    d_res: Vec<f32>,
    d_ln: Vec<f32>,
    d_qkv: Vec<f32>,
    d_atty: Vec<f32>,
    d_up: Vec<f32>,
    /// The activation's output gradient (SwiGLU only: GELU's runs in place in `d_up`).
    d_act: Vec<f32>,
    attn_scratch: Vec<f32>,
    d_lnf: Vec<f32>,
    /// Packed documents ([`Model::forward_packed`]): where each row's document starts, and
    /// each row's position in it. Empty: one document per sequence.
    starts: Vec<u32>,
    positions: Vec<u32>,
    /// The rows the head computes logits for, ascending ([`Activations::logits_where_counted`]),
    /// or every row (`None`); and those rows' targets, gathered for the loss.
    head_rows: Option<Vec<u32>>,
    head_targets: Vec<u32>,
}

impl Activations {
    pub fn new(m: &Model, b: usize, t: usize) -> Self {
        let (n, c, l, v, f, hs) = (
            b * t,
            m.width,
            m.blocks.len(),
            m.vocab,
            m.mlp_width,
            m.heads,
        );
        let up = m.up_width();
        let layer_norm = m.final_norm.b.is_some();
        let z = |len: usize| vec![0.0f32; len];
        let means = |len: usize| z(if layer_norm { len } else { 0 });
        let (w, hd) = (hs.qkv_width(), hs.h * hs.d);
        Activations {
            b,
            t,
            layers: l,
            up_width: up,
            x0: z(n * c),
            ln1: z(l * n * c),
            mean1: means(l * n),
            rstd1: z(l * n),
            qkv: z(l * n * w),
            lse: z(l * b * hs.h * t),
            atty: z(l * n * hd),
            res2: z(l * n * c),
            ln2: z(l * n * c),
            mean2: means(l * n),
            rstd2: z(l * n),
            up: z(l * n * up),
            act: z(l * n * f),
            res3: z(l * n * c),
            lnf: z(n * c),
            lnf_rounded: false,
            lnf_mean: means(n),
            lnf_rstd: z(n),
            logits: z(n * v),
            losses: z(n),
            d_res: z(n * c),
            d_ln: z(n * c),
            d_qkv: z(n * w),
            d_atty: z(n * hd),
            d_up: z(n * up),
            d_act: z(if m.mlp == Mlp::SwiGlu { n * f } else { 0 }),
            attn_scratch: z(attention::scratch_len(b, t, hs)),
            d_lnf: z(n * c),
            starts: Vec::new(),
            positions: Vec::new(),
            head_rows: None,
            head_targets: Vec::with_capacity(n),
        }
    }

    /// From the next forward pass on, the head computes logits only at the rows whose target
    /// in `targets` [B·T] counts (is not `crossentropy::IGNORE`): in fine-tuning most rows
    /// are context (a prompt), and the head over a large vocabulary is a large share of the
    /// work. `logits` then holds those rows' logits, in order, and `loss` and `backward` must
    /// be given the same targets. The losses and gradients are those of every row.
    pub fn logits_where_counted(&mut self, targets: &[u32]) {
        assert_eq!(targets.len(), self.b * self.t, "one target per row");
        let rows = self
            .head_rows
            .get_or_insert_with(|| Vec::with_capacity(targets.len()));
        rows.clear();
        let counted = targets.iter().enumerate().filter(|(_, &x)| x != IGNORE);
        rows.extend(counted.map(|(r, _)| r as u32));
    }

    /// From the next forward pass on, the head computes the logits of every row (the default).
    pub fn logits_everywhere(&mut self) {
        self.head_rows = None;
    }

    /// Moves the head's rows of `lnf` [N, C] to its front (in place: row `rows[i]` ≥ i goes
    /// to i, ascending, so no row is overwritten before it moves); returns their number.
    fn gather_head_rows(&mut self, c: usize) -> usize {
        let Some(rows) = &self.head_rows else {
            return self.b * self.t;
        };
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            if r != i {
                self.lnf.copy_within(r * c..(r + 1) * c, i * c);
            }
        }
        rows.len()
    }

    /// The inverse of [`Activations::gather_head_rows`] for the gradient: row i of `d_lnf`
    /// goes back to row `rows[i]` (descending, so no row is overwritten before it moves),
    /// and the rows the head skipped get a zero gradient.
    fn scatter_head_rows(&mut self, c: usize) {
        let Some(rows) = &self.head_rows else {
            return;
        };
        let n = self.b * self.t;
        let mut end = n;
        for (i, &r) in rows.iter().enumerate().rev() {
            let r = r as usize;
            self.d_lnf[(r + 1) * c..end * c].fill(0.0);
            if r != i {
                self.d_lnf.copy_within(i * c..(i + 1) * c, r * c);
            }
            end = r;
        }
        self.d_lnf[..end * c].fill(0.0);
    }

    /// The targets of the head's rows, and the buffers of their losses and logits (or
    /// logits' gradient).
    fn head_loss_parts<'a>(&'a mut self, targets: &'a [u32], v: usize) -> HeadLoss<'a> {
        let targets = match &self.head_rows {
            None => targets,
            Some(rows) => {
                assert_eq!(targets.len(), self.b * self.t, "one target per row");
                self.head_targets.clear();
                let gathered = rows.iter().map(|&r| targets[r as usize]);
                self.head_targets.extend(gathered);
                let elsewhere = targets.iter().filter(|&&x| x != IGNORE).count();
                assert!(
                    !self.head_targets.contains(&IGNORE) && elsewhere == rows.len(),
                    "the targets differ from those the head's rows were chosen by"
                );
                &self.head_targets
            }
        };
        let m = targets.len();
        HeadLoss {
            targets,
            losses: &mut self.losses[..m],
            logits: &mut self.logits[..m * v],
        }
    }

    /// Number of f32 values held (for memory accounting).
    pub fn floats(&self) -> usize {
        [
            &self.x0,
            &self.ln1,
            &self.mean1,
            &self.rstd1,
            &self.qkv,
            &self.lse,
            &self.atty,
            &self.res2,
            &self.ln2,
            &self.mean2,
            &self.rstd2,
            &self.up,
            &self.act,
            &self.res3,
            &self.lnf,
            &self.lnf_mean,
            &self.lnf_rstd,
            &self.logits,
            &self.losses,
            &self.d_res,
            &self.d_ln,
            &self.d_qkv,
            &self.d_atty,
            &self.d_up,
            &self.d_act,
            &self.attn_scratch,
            &self.d_lnf,
        ]
        .iter()
        .map(|v| v.len())
        .sum()
    }
}

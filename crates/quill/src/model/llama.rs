//! The Llama family (Llama 2/3, Mistral, Qwen2), exactly as Hugging Face `transformers`
//! defines it: token embedding; pre-RMSNorm blocks of causal grouped-query self-attention
//! with rotary position embeddings and a SwiGLU MLP; a final RMSNorm; an LM head, separate
//! (`lm_head.weight`) or tied to the embedding.
//!
//! Weights use nn.Linear's layout, [out, in], so y = x · Wᵀ (+ b). The layout keeps q/k/v
//! (and gate/up) of a block next to each other, so each pair or triple is one matrix
//! multiply in training.
//!
//! Inference (`forward_cached`) reads weight matrices either from the flat f32 buffer or,
//! for a model opened with a memory map, straight from the files in bf16/f16/f32.

use super::llama_config::LlamaConfig;
use super::params::{Mapped, ParamLayout, View};
use crate::kernels::attention::{self, Heads};
use crate::kernels::linear::{self, MatRef};
use crate::kernels::rope::{self, Rope};
use crate::kernels::{
    add_inplace, crossentropy,
    matmul::{matmul_fused, matmul_p, Fused, Precision},
    reduce, rmsnorm, swiglu,
};
use crate::rng::Rng;
use crate::{Error, Result};
use std::sync::Arc;

#[derive(Clone, Copy, Debug)]
pub struct LlamaBlock {
    pub input_norm: View,
    /// q_proj | k_proj | v_proj weights: [(H + 2KV)·D, C] as one matrix.
    pub qkv_w: View,
    pub q_w: View,
    pub k_w: View,
    pub v_w: View,
    pub qkv_b: Option<View>,
    pub o_w: View, // [C, H·D]
    pub o_b: Option<View>,
    pub post_norm: View,
    /// gate_proj | up_proj weights: [2F, C] as one matrix.
    pub gu_w: View,
    pub gate_w: View,
    pub up_w: View,
    pub down_w: View, // [C, F]
}

#[derive(Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub layout: ParamLayout,
    /// Every parameter in f32, except the matrices held in `mapped` (whose part of this
    /// buffer stays zero and is never touched, so it costs no memory).
    pub params: Vec<f32>,
    pub mapped: Option<Arc<Mapped>>,
    pub rope: Rope,
    pub embed: View,
    pub blocks: Vec<LlamaBlock>,
    pub norm: View,
    pub lm_head: Option<View>,
    /// Operand precision of the training products (`--dtype`); f32 unless set.
    pub precision: Precision,
}

impl Llama {
    /// A model with every parameter zero; see [`Llama::init`].
    pub fn new(config: LlamaConfig) -> Result<Self> {
        config.validate()?;
        let cfg = &config;
        let (v, c, f) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
        let (h, kv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let mut l = ParamLayout::default();
        let embed = l.push("model.embed_tokens.weight", &[v, c]);
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}.");
                let input_norm = l.push(format!("{p}input_layernorm.weight"), &[c]);
                let q_w = l.push(format!("{p}self_attn.q_proj.weight"), &[h * d, c]);
                let k_w = l.push(format!("{p}self_attn.k_proj.weight"), &[kv * d, c]);
                let v_w = l.push(format!("{p}self_attn.v_proj.weight"), &[kv * d, c]);
                let qkv_b = cfg.qkv_bias.then(|| {
                    let q = l.push(format!("{p}self_attn.q_proj.bias"), &[h * d]);
                    l.push(format!("{p}self_attn.k_proj.bias"), &[kv * d]);
                    l.push(format!("{p}self_attn.v_proj.bias"), &[kv * d]);
                    View {
                        offset: q.offset,
                        len: (h + 2 * kv) * d,
                    }
                });
                let o_w = l.push(format!("{p}self_attn.o_proj.weight"), &[c, h * d]);
                let o_b = cfg
                    .o_bias
                    .then(|| l.push(format!("{p}self_attn.o_proj.bias"), &[c]));
                let post_norm = l.push(format!("{p}post_attention_layernorm.weight"), &[c]);
                let gate_w = l.push(format!("{p}mlp.gate_proj.weight"), &[f, c]);
                let up_w = l.push(format!("{p}mlp.up_proj.weight"), &[f, c]);
                let down_w = l.push(format!("{p}mlp.down_proj.weight"), &[c, f]);
                LlamaBlock {
                    input_norm,
                    qkv_w: View {
                        offset: q_w.offset,
                        len: q_w.len + k_w.len + v_w.len,
                    },
                    q_w,
                    k_w,
                    v_w,
                    qkv_b,
                    o_w,
                    o_b,
                    post_norm,
                    gu_w: View {
                        offset: gate_w.offset,
                        len: 2 * gate_w.len,
                    },
                    gate_w,
                    up_w,
                    down_w,
                }
            })
            .collect();
        let norm = l.push("model.norm.weight", &[c]);
        let lm_head = (!cfg.tie_word_embeddings).then(|| l.push("lm_head.weight", &[v, c]));
        let params = vec![0.0; l.total];
        let inv = rope::inv_freq(d, cfg.rope_theta, &cfg.rope_scaling);
        let rope = Rope::new(inv, cfg.max_position_embeddings);
        Ok(Llama {
            config,
            layout: l,
            params,
            mapped: None,
            rope,
            embed,
            blocks,
            norm,
            lm_head,
            precision: Precision::F32,
        })
    }

    /// Initialisation for training from scratch: N(0, 0.02) for matrices, N(0, 0.02/√(2L))
    /// for the projections that write into the residual stream, zero biases, unit norms.
    pub fn init(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        let proj_std = 0.02 / (2.0 * self.config.num_hidden_layers as f64).sqrt();
        for t in &self.layout.tensors {
            let buf = t.view.of_mut(&mut self.params);
            let name = t.name.as_str();
            if name.ends_with("norm.weight") {
                buf.fill(1.0);
            } else if name.ends_with(".bias") {
                buf.fill(0.0);
            } else {
                let std = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                    proj_std
                } else {
                    0.02
                };
                for x in buf.iter_mut() {
                    *x = (rng.normal() * std) as f32;
                }
            }
        }
        self.mapped = None;
    }

    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    pub fn heads(&self) -> Heads {
        Heads {
            h: self.config.num_attention_heads,
            kv: self.config.num_key_value_heads,
            d: self.config.head_dim,
        }
    }

    fn head(&self) -> View {
        self.lm_head.unwrap_or(self.embed)
    }

    fn scale(&self) -> f32 {
        1.0 / (self.config.head_dim as f32).sqrt()
    }

    /// A weight matrix as stored: mapped from its file, or from the f32 buffer.
    pub fn mat(&self, v: View) -> MatRef<'_> {
        if let Some(r) = self.mapped.as_ref().and_then(|m| m.get(v)) {
            return r;
        }
        MatRef::F32(v.of(&self.params))
    }

    /// Copies every memory-mapped matrix into the f32 buffer (needed for training).
    pub fn materialize(&mut self) {
        let Some(m) = self.mapped.take() else {
            return;
        };
        let tensors = self.layout.tensors.clone();
        for t in &tensors {
            if let Some(r) = m.get(t.view) {
                let cols = *t.shape.last().unwrap_or(&1);
                let dst = t.view.of_mut(&mut self.params);
                use rayon::prelude::*;
                dst.par_chunks_mut(cols)
                    .enumerate()
                    .for_each(|(i, row)| r.row_into(i, cols, row));
            }
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Forward pass over ids [B, T] (row-major) for training; fills every activation and
    /// the logits. Needs f32 weights (see [`Llama::materialize`]).
    pub fn forward(&self, acts: &mut LlamaActivations, ids: &[u32]) -> Result<()> {
        let (b, t) = (acts.b, acts.t);
        if ids.len() != b * t {
            return Err(Error::Input(format!(
                "expected {} ids, got {}",
                b * t,
                ids.len()
            )));
        }
        let cfg = &self.config;
        if t > cfg.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence of {t} tokens is longer than the context ({} positions)",
                cfg.max_position_embeddings
            )));
        }
        if let Some(w) = cfg.sliding_window.iter().flatten().find(|&&w| w < t) {
            return Err(Error::Input(format!(
                "training on sequences longer than the sliding window ({w}) is not supported"
            )));
        }
        if self.mapped.is_some() {
            return Err(Error::Input(
                "the weights are memory-mapped; convert them to f32 (materialize) first".into(),
            ));
        }
        self.check_ids(ids)?;
        let hs = self.heads();
        let (c, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (w, hd) = (hs.qkv_width(), hs.h * hs.d);
        let n = b * t;
        let eps = cfg.rms_norm_eps;
        let p = &self.params;
        let a = acts;
        let emb = self.embed.of(p);
        for (row, &id) in a.x0.chunks_mut(c).zip(ids) {
            row.copy_from_slice(&emb[id as usize * c..(id as usize + 1) * c]);
        }
        for (l, blk) in self.blocks.iter().enumerate() {
            let inp: &[f32] = if l == 0 {
                &a.x0
            } else {
                &a.res3[(l - 1) * n * c..l * n * c]
            };
            let ln1 = &mut a.ln1[l * n * c..(l + 1) * n * c];
            let r1 = &mut a.rstd1[l * n..(l + 1) * n];
            rmsnorm::forward(ln1, r1, inp, blk.input_norm.of(p), c, eps);
            let qkv = &mut a.qkv[l * n * w..(l + 1) * n * w];
            linear_t(
                self.precision,
                qkv,
                ln1,
                blk.qkv_w.of(p),
                blk.qkv_b.map(|b| b.of(p)),
                None,
                n,
                c,
                w,
            );
            self.rope.apply(qkv, w, 0, hs.h, 0, t, false);
            self.rope.apply(qkv, w, hd, hs.kv, 0, t, false);
            let lse = &mut a.lse[l * b * hs.h * t..(l + 1) * b * hs.h * t];
            let atty = &mut a.atty[l * n * hd..(l + 1) * n * hd];
            attention::forward(
                atty,
                lse,
                &mut a.attn_scratch,
                qkv,
                b,
                t,
                hs,
                self.scale(),
                self.precision,
            );
            let res2 = &mut a.res2[l * n * c..(l + 1) * n * c];
            linear_t(
                self.precision,
                res2,
                atty,
                blk.o_w.of(p),
                blk.o_b.map(|b| b.of(p)),
                Some(inp),
                n,
                hd,
                c,
            );
            let ln2 = &mut a.ln2[l * n * c..(l + 1) * n * c];
            let r2 = &mut a.rstd2[l * n..(l + 1) * n];
            rmsnorm::forward(ln2, r2, res2, blk.post_norm.of(p), c, eps);
            let gu = &mut a.gu[l * n * 2 * f..(l + 1) * n * 2 * f];
            linear_t(
                self.precision,
                gu,
                ln2,
                blk.gu_w.of(p),
                None,
                None,
                n,
                c,
                2 * f,
            );
            let hmid = &mut a.hmid[l * n * f..(l + 1) * n * f];
            swiglu::forward(hmid, gu, f);
            let res3 = &mut a.res3[l * n * c..(l + 1) * n * c];
            linear_t(
                self.precision,
                res3,
                hmid,
                blk.down_w.of(p),
                None,
                Some(res2),
                n,
                f,
                c,
            );
        }
        let last = &a.res3[(cfg.num_hidden_layers - 1) * n * c..];
        rmsnorm::forward(&mut a.lnf, &mut a.rstdf, last, self.norm.of(p), c, eps);
        matmul_p(
            self.precision,
            &mut a.logits,
            &a.lnf,
            self.head().of(p),
            n,
            c,
            v,
            false,
            true,
            false,
        );
        Ok(())
    }

    /// Sum of the cross-entropy losses of the last `forward` over counted targets.
    pub fn loss(&self, acts: &mut LlamaActivations, targets: &[u32]) -> (f64, usize) {
        crossentropy::forward(
            &mut acts.losses,
            &acts.logits,
            targets,
            self.config.vocab_size,
        );
        crossentropy::sum_counted(&acts.losses, targets)
    }

    /// Backward pass after `forward` (same contract as [`super::Gpt2::backward`]).
    pub fn backward(
        &self,
        acts: &mut LlamaActivations,
        grads: &mut [f32],
        ids: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> (f64, usize) {
        let cfg = &self.config;
        let (b, t) = (acts.b, acts.t);
        let hs = self.heads();
        let (c, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (w, hd) = (hs.qkv_width(), hs.h * hs.d);
        let n = b * t;
        let p = &self.params;
        let a = acts;
        let counted = targets
            .iter()
            .filter(|&&x| x != crossentropy::IGNORE)
            .count();
        let scale = grad_scale / counted.max(1) as f32;
        crossentropy::forward_backward_inplace(&mut a.logits, &mut a.losses, targets, v, scale);
        let result = crossentropy::sum_counted(&a.losses, targets);
        let d_logits = &a.logits;
        matmul_p(
            self.precision,
            &mut a.d_lnf,
            d_logits,
            self.head().of(p),
            n,
            v,
            c,
            false,
            false,
            false,
        );
        matmul_p(
            self.precision,
            self.head().of_mut(grads),
            d_logits,
            &a.lnf,
            v,
            n,
            c,
            true,
            false,
            true,
        );
        a.d_res.fill(0.0);
        let last = &a.res3[(cfg.num_hidden_layers - 1) * n * c..];
        rmsnorm::backward(
            &mut a.d_res,
            self.norm.of_mut(grads),
            &a.d_lnf,
            last,
            self.norm.of(p),
            &a.rstdf,
            c,
        );
        for (l, blk) in self.blocks.iter().enumerate().rev() {
            let inp: &[f32] = if l == 0 {
                &a.x0
            } else {
                &a.res3[(l - 1) * n * c..l * n * c]
            };
            let ln1 = &a.ln1[l * n * c..(l + 1) * n * c];
            let qkv = &a.qkv[l * n * w..(l + 1) * n * w];
            let lse = &a.lse[l * b * hs.h * t..(l + 1) * b * hs.h * t];
            let atty = &a.atty[l * n * hd..(l + 1) * n * hd];
            let res2 = &a.res2[l * n * c..(l + 1) * n * c];
            let ln2 = &a.ln2[l * n * c..(l + 1) * n * c];
            let gu = &a.gu[l * n * 2 * f..(l + 1) * n * 2 * f];
            let hmid = &a.hmid[l * n * f..(l + 1) * n * f];

            // MLP: res3 = res2 + swiglu(ln2 · Wguᵀ) · Wdownᵀ
            linear_t_backward(
                self.precision,
                &mut a.d_h,
                grads,
                blk.down_w,
                None,
                &a.d_res,
                hmid,
                p,
                n,
                f,
                c,
            );
            swiglu::backward(&mut a.d_gu, &a.d_h, gu, f);
            linear_t_backward(
                self.precision,
                &mut a.d_ln,
                grads,
                blk.gu_w,
                None,
                &a.d_gu,
                ln2,
                p,
                n,
                c,
                2 * f,
            );
            rmsnorm::backward(
                &mut a.d_res,
                blk.post_norm.of_mut(grads),
                &a.d_ln,
                res2,
                blk.post_norm.of(p),
                &a.rstd2[l * n..(l + 1) * n],
                c,
            );
            // Attention: res2 = inp + attention(rope(ln1 · Wqkvᵀ + b)) · Woᵀ + bo
            linear_t_backward(
                self.precision,
                &mut a.d_atty,
                grads,
                blk.o_w,
                blk.o_b,
                &a.d_res,
                atty,
                p,
                n,
                hd,
                c,
            );
            attention::backward(
                &mut a.d_qkv,
                &mut a.attn_scratch,
                &a.d_atty,
                qkv,
                atty,
                lse,
                b,
                t,
                hs,
                self.scale(),
                self.precision,
            );
            self.rope.apply(&mut a.d_qkv, w, 0, hs.h, 0, t, true);
            self.rope.apply(&mut a.d_qkv, w, hd, hs.kv, 0, t, true);
            linear_t_backward(
                self.precision,
                &mut a.d_ln,
                grads,
                blk.qkv_w,
                blk.qkv_b,
                &a.d_qkv,
                ln1,
                p,
                n,
                c,
                w,
            );
            rmsnorm::backward(
                &mut a.d_res,
                blk.input_norm.of_mut(grads),
                &a.d_ln,
                inp,
                blk.input_norm.of(p),
                &a.rstd1[l * n..(l + 1) * n],
                c,
            );
        }
        let ge = self.embed.of_mut(grads);
        for (r, &id) in ids.iter().enumerate() {
            let d = &a.d_res[r * c..(r + 1) * c];
            let g = &mut ge[id as usize * c..(id as usize + 1) * c];
            for i in 0..c {
                g[i] += d[i];
            }
        }
        result
    }

    pub fn new_cache(&self, capacity: usize) -> LlamaCache {
        let cap = capacity.min(self.config.max_position_embeddings).max(1);
        let hs = self.heads();
        let size = self.config.num_hidden_layers * cap * hs.kv * hs.d;
        LlamaCache {
            len: 0,
            capacity: cap,
            k: vec![0.0; size],
            v: vec![0.0; size],
            s: Scratch::default(),
            capture: None,
            captured: Vec::new(),
        }
    }

    /// y [n, Σ rows] = x [n, inp] · [parts]ᵀ (+ bias): one projection whose weight matrix is
    /// stored as consecutive parts (q|k|v, gate|up), each possibly memory-mapped.
    #[allow(clippy::too_many_arguments)]
    fn proj(
        &self,
        y: &mut [f32],
        x: &[f32],
        n: usize,
        inp: usize,
        parts: &[View],
        bias: Option<View>,
        scratch: &mut Vec<f32>,
    ) {
        let out: usize = parts.iter().map(|v| v.len / inp).sum();
        let mut col = 0;
        for &part in parts {
            let rows = part.len / inp;
            linear::linear(&mut y[col..], out, x, n, inp, self.mat(part), rows, scratch);
            col += rows;
        }
        if let Some(bv) = bias {
            let bias = bv.of(&self.params);
            for row in y[..n * out].chunks_mut(out) {
                add_inplace_serial(row, bias);
            }
        }
    }

    /// Runs `ids` at positions cache.len .. cache.len + ids.len() of one sequence, appending
    /// their keys and values to the cache. Writes the logits of the last position into
    /// `logits` [V], or of every new position [n, V] when `all_positions`.
    pub fn forward_cached(
        &self,
        cache: &mut LlamaCache,
        ids: &[u32],
        logits: &mut Vec<f32>,
        all_positions: bool,
    ) -> Result<()> {
        let cfg = &self.config;
        let hs = self.heads();
        let (c, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (w, hd, kvd) = (hs.qkv_width(), hs.h * hs.d, hs.kv * hs.d);
        let n = ids.len();
        let pos = cache.len;
        if n == 0 {
            return Err(Error::Input("no tokens to run".into()));
        }
        if pos + n > cache.capacity {
            return Err(Error::Input(format!(
                "context full: {} positions requested, the cache holds {}",
                pos + n,
                cache.capacity
            )));
        }
        self.check_ids(ids)?;
        let p = &self.params;
        let eps = cfg.rms_norm_eps;
        let s = &mut cache.s;
        s.resize(n, c, w, hd, f);
        s.scores
            .resize(attention::cached_scratch_len(cache.capacity), 0.0);
        let emb = self.mat(self.embed);
        for (row, &id) in s.x.chunks_mut(c).zip(ids) {
            emb.row_into(id as usize, c, row);
        }
        let kv_len = cache.capacity * kvd;
        for (l, blk) in self.blocks.iter().enumerate() {
            rmsnorm::forward(&mut s.ln, &mut s.rstd, &s.x, blk.input_norm.of(p), c, eps);
            self.proj(
                &mut s.qkv,
                &s.ln,
                n,
                c,
                &[blk.q_w, blk.k_w, blk.v_w],
                blk.qkv_b,
                &mut s.wbuf,
            );
            self.rope
                .apply(&mut s.qkv, w, 0, hs.h, pos, usize::MAX, false);
            self.rope
                .apply(&mut s.qkv, w, hd, hs.kv, pos, usize::MAX, false);
            let kc = &mut cache.k[l * kv_len..(l + 1) * kv_len];
            let vc = &mut cache.v[l * kv_len..(l + 1) * kv_len];
            for i in 0..n {
                let row = &s.qkv[i * w..(i + 1) * w];
                kc[(pos + i) * kvd..(pos + i + 1) * kvd].copy_from_slice(&row[hd..hd + kvd]);
                vc[(pos + i) * kvd..(pos + i + 1) * kvd].copy_from_slice(&row[hd + kvd..]);
            }
            attention::forward_cached(
                &mut s.atty,
                &s.qkv,
                w,
                kc,
                vc,
                n,
                pos,
                hs.h,
                hs.kv,
                hs.d,
                self.scale(),
                cfg.sliding_window[l].unwrap_or(usize::MAX),
                &mut s.scores,
            );
            if let Some((cl, ch)) = cache.capture {
                if cl == l {
                    let kc = &cache.k[l * kv_len..(l + 1) * kv_len];
                    cache.captured.clear();
                    attention::weights_cached(
                        &mut cache.captured,
                        &s.qkv,
                        w,
                        kc,
                        n,
                        pos,
                        ch,
                        hs.h,
                        hs.kv,
                        hs.d,
                        self.scale(),
                        cfg.sliding_window[l].unwrap_or(usize::MAX),
                    );
                }
            }
            self.proj(&mut s.tmp, &s.atty, n, hd, &[blk.o_w], blk.o_b, &mut s.wbuf);
            add_inplace(&mut s.x, &s.tmp);
            rmsnorm::forward(&mut s.ln, &mut s.rstd, &s.x, blk.post_norm.of(p), c, eps);
            self.proj(
                &mut s.gu,
                &s.ln,
                n,
                c,
                &[blk.gate_w, blk.up_w],
                None,
                &mut s.wbuf,
            );
            swiglu::forward(&mut s.hmid, &s.gu, f);
            self.proj(&mut s.tmp, &s.hmid, n, f, &[blk.down_w], None, &mut s.wbuf);
            add_inplace(&mut s.x, &s.tmp);
        }
        cache.len += n;
        let rows = if all_positions { n } else { 1 };
        let first = n - rows;
        rmsnorm::forward(
            &mut s.ln[..rows * c],
            &mut s.rstd,
            &s.x[first * c..],
            self.norm.of(p),
            c,
            eps,
        );
        logits.resize(rows * v, 0.0);
        linear::linear(
            logits,
            v,
            &s.ln[..rows * c],
            rows,
            c,
            self.mat(self.head()),
            v,
            &mut s.wbuf,
        );
        Ok(())
    }
}

impl Llama {
    /// One new token for each of several sequences (continuous batching): `ids[i]` runs at
    /// position caches[i].len of sequence i. The weights are read once for all of them.
    /// Writes logits [n, V].
    pub fn forward_batch(
        &self,
        caches: &mut [&mut LlamaCache],
        ids: &[u32],
        logits: &mut Vec<f32>,
        s: &mut Scratch,
    ) -> Result<()> {
        let cfg = &self.config;
        let hs = self.heads();
        let (c, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (w, hd, kvd) = (hs.qkv_width(), hs.h * hs.d, hs.kv * hs.d);
        let n = ids.len();
        if n == 0 || caches.len() != n {
            return Err(Error::Input("one token per sequence".into()));
        }
        self.check_ids(ids)?;
        if let Some(full) = caches.iter().find(|k| k.len >= k.capacity) {
            return Err(Error::Input(format!(
                "context full: the cache holds {} positions",
                full.capacity
            )));
        }
        let p = &self.params;
        let eps = cfg.rms_norm_eps;
        s.resize(n, c, w, hd, f);
        let most = caches.iter().map(|k| k.capacity).max().unwrap_or(1);
        s.scores.resize(attention::cached_scratch_len(most), 0.0);
        let emb = self.mat(self.embed);
        for (row, &id) in s.x.chunks_mut(c).zip(ids) {
            emb.row_into(id as usize, c, row);
        }
        for (l, blk) in self.blocks.iter().enumerate() {
            rmsnorm::forward(&mut s.ln, &mut s.rstd, &s.x, blk.input_norm.of(p), c, eps);
            self.proj(
                &mut s.qkv,
                &s.ln,
                n,
                c,
                &[blk.q_w, blk.k_w, blk.v_w],
                blk.qkv_b,
                &mut s.wbuf,
            );
            for (i, cache) in caches.iter_mut().enumerate() {
                let pos = cache.len;
                let row = &mut s.qkv[i * w..(i + 1) * w];
                self.rope.apply(row, w, 0, hs.h, pos, usize::MAX, false);
                self.rope.apply(row, w, hd, hs.kv, pos, usize::MAX, false);
                let kv_len = cache.capacity * kvd;
                let kc = &mut cache.k[l * kv_len..(l + 1) * kv_len];
                kc[pos * kvd..(pos + 1) * kvd].copy_from_slice(&row[hd..hd + kvd]);
                let vc = &mut cache.v[l * kv_len..(l + 1) * kv_len];
                vc[pos * kvd..(pos + 1) * kvd].copy_from_slice(&row[hd + kvd..]);
                attention::forward_cached(
                    &mut s.atty[i * hd..(i + 1) * hd],
                    &s.qkv[i * w..(i + 1) * w],
                    w,
                    &cache.k[l * kv_len..(l + 1) * kv_len],
                    &cache.v[l * kv_len..(l + 1) * kv_len],
                    1,
                    pos,
                    hs.h,
                    hs.kv,
                    hs.d,
                    self.scale(),
                    cfg.sliding_window[l].unwrap_or(usize::MAX),
                    &mut s.scores,
                );
            }
            self.proj(&mut s.tmp, &s.atty, n, hd, &[blk.o_w], blk.o_b, &mut s.wbuf);
            add_inplace(&mut s.x, &s.tmp);
            rmsnorm::forward(&mut s.ln, &mut s.rstd, &s.x, blk.post_norm.of(p), c, eps);
            self.proj(
                &mut s.gu,
                &s.ln,
                n,
                c,
                &[blk.gate_w, blk.up_w],
                None,
                &mut s.wbuf,
            );
            swiglu::forward(&mut s.hmid, &s.gu, f);
            self.proj(&mut s.tmp, &s.hmid, n, f, &[blk.down_w], None, &mut s.wbuf);
            add_inplace(&mut s.x, &s.tmp);
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        rmsnorm::forward(&mut s.ln, &mut s.rstd, &s.x, self.norm.of(p), c, eps);
        logits.resize(n * v, 0.0);
        linear::linear(
            logits,
            v,
            &s.ln,
            n,
            c,
            self.mat(self.head()),
            v,
            &mut s.wbuf,
        );
        Ok(())
    }
}

fn add_inplace_serial(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// y [N, OUT] = x [N, IN] · Wᵀ (+ b) (+ residual [N, OUT]), W stored [OUT, IN]; the bias and
/// the residual connection are fused into the product (its starting value).
#[allow(clippy::too_many_arguments)]
fn linear_t(
    prec: Precision,
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    residual: Option<&[f32]>,
    n: usize,
    inp: usize,
    out: usize,
) {
    let fused = Fused {
        bias: b,
        residual,
        ..Fused::default()
    };
    matmul_fused(
        prec,
        &mut y[..n * out],
        x,
        w,
        n,
        inp,
        out,
        false,
        true,
        false,
        fused,
    );
}

/// Gradients of y = x · Wᵀ + b (W [OUT, IN]): dx = dy · W (overwritten), dW += dyᵀ · x,
/// db += Σ rows dy.
#[allow(clippy::too_many_arguments)]
fn linear_t_backward(
    prec: Precision,
    dx: &mut [f32],
    grads: &mut [f32],
    w: View,
    b: Option<View>,
    dy: &[f32],
    x: &[f32],
    params: &[f32],
    n: usize,
    inp: usize,
    out: usize,
) {
    matmul_p(prec, dx, dy, w.of(params), n, out, inp, false, false, false);
    matmul_p(prec, w.of_mut(grads), dy, x, out, n, inp, true, false, true);
    if let Some(b) = b {
        reduce::col_sum_acc(b.of_mut(grads), dy, n);
    }
}

/// Every activation of a training forward pass for a batch [B, T], plus backward scratch.
pub struct LlamaActivations {
    pub b: usize,
    pub t: usize,
    x0: Vec<f32>,
    ln1: Vec<f32>,
    rstd1: Vec<f32>,
    qkv: Vec<f32>,
    /// Log-sum-exp of each attention row [L, B, H, T] (flash-style: no T x T matrix kept).
    lse: Vec<f32>,
    atty: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    rstd2: Vec<f32>,
    gu: Vec<f32>,
    hmid: Vec<f32>,
    res3: Vec<f32>,
    lnf: Vec<f32>,
    rstdf: Vec<f32>,
    /// [B·T, V]: the logits after `forward`, their gradient after `backward`.
    pub logits: Vec<f32>,
    pub losses: Vec<f32>,
    d_res: Vec<f32>,
    d_ln: Vec<f32>,
    d_qkv: Vec<f32>,
    d_atty: Vec<f32>,
    d_gu: Vec<f32>,
    d_h: Vec<f32>,
    attn_scratch: Vec<f32>,
    d_lnf: Vec<f32>,
}

impl LlamaActivations {
    pub fn new(cfg: &LlamaConfig, b: usize, t: usize) -> Self {
        let (c, v, f, l) = (
            cfg.hidden_size,
            cfg.vocab_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
        );
        let (h, kv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let (w, hd) = ((h + 2 * kv) * d, h * d);
        let n = b * t;
        let z = |len: usize| vec![0.0f32; len];
        LlamaActivations {
            b,
            t,
            x0: z(n * c),
            ln1: z(l * n * c),
            rstd1: z(l * n),
            qkv: z(l * n * w),
            lse: z(l * b * h * t),
            atty: z(l * n * hd),
            res2: z(l * n * c),
            ln2: z(l * n * c),
            rstd2: z(l * n),
            gu: z(l * n * 2 * f),
            hmid: z(l * n * f),
            res3: z(l * n * c),
            lnf: z(n * c),
            rstdf: z(n),
            logits: z(n * v),
            losses: z(n),
            d_res: z(n * c),
            d_ln: z(n * c),
            d_qkv: z(n * w),
            d_atty: z(n * hd),
            d_gu: z(n * 2 * f),
            d_h: z(n * f),
            attn_scratch: z(attention::scratch_len(b, t, Heads { h, kv, d })),
            d_lnf: z(n * c),
        }
    }

    /// Number of f32 values held (for memory accounting).
    pub fn floats(&self) -> usize {
        [
            &self.x0,
            &self.ln1,
            &self.rstd1,
            &self.qkv,
            &self.lse,
            &self.atty,
            &self.res2,
            &self.ln2,
            &self.rstd2,
            &self.gu,
            &self.hmid,
            &self.res3,
            &self.lnf,
            &self.rstdf,
            &self.logits,
            &self.losses,
            &self.d_res,
            &self.d_ln,
            &self.d_qkv,
            &self.d_atty,
            &self.d_gu,
            &self.d_h,
            &self.attn_scratch,
            &self.d_lnf,
        ]
        .iter()
        .map(|v| v.len())
        .sum()
    }
}

/// Keys and values of every layer for the positions seen so far: [L, capacity, KV·D] each
/// (grouped-query attention stores only the kv heads).
pub struct LlamaCache {
    pub len: usize,
    pub capacity: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Scratch,
    /// (layer, head) whose attention weights the next `forward_cached` keeps in `captured`.
    pub capture: Option<(usize, usize)>,
    pub captured: Vec<f32>,
}

impl LlamaCache {
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    ln: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    tmp: Vec<f32>,
    gu: Vec<f32>,
    hmid: Vec<f32>,
    wbuf: Vec<f32>,
    scores: Vec<f32>,
}

impl Scratch {
    fn resize(&mut self, n: usize, c: usize, w: usize, hd: usize, f: usize) {
        self.x.resize(n * c, 0.0);
        self.ln.resize(n * c, 0.0);
        self.rstd.resize(n, 0.0);
        self.qkv.resize(n * w, 0.0);
        self.atty.resize(n * hd, 0.0);
        self.tmp.resize(n * c, 0.0);
        self.gu.resize(n * 2 * f, 0.0);
        self.hmid.resize(n * f, 0.0);
    }
}

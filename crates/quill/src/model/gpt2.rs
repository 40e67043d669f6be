//! GPT-2, exactly as Hugging Face `transformers` defines it: token + learned position
//! embeddings; pre-LayerNorm blocks of causal multi-head self-attention and a GELU (tanh) MLP;
//! a final LayerNorm; an LM head tied to the token embedding (or a separate `lm_head.weight`
//! when `tie_word_embeddings` is false).
//!
//! Weights use HF's Conv1D layout, [in, out], so y = x · W + b.
//!
//! `forward` / `backward` run a batch [B, T] for training with every activation kept;
//! `forward_cached` runs new positions of one sequence against a KV cache for generation.

use super::config::Gpt2Config;
use super::params::{ParamLayout, View};
use crate::kernels::attention::Heads;
use crate::kernels::linear::{self, MatRef};
use crate::kernels::{
    add_inplace, attention, crossentropy, embedding, gelu, layernorm,
    matmul::{matmul_fused, matmul_p, Fused, Precision},
};
use crate::rng::Rng;
use crate::{Error, Result};

/// Views of one block's parameters.
#[derive(Clone, Copy, Debug)]
pub struct BlockViews {
    pub ln_1_w: View,
    pub ln_1_b: View,
    pub c_attn_w: View, // [C, 3C]
    pub c_attn_b: View,
    pub attn_proj_w: View, // [C, C]
    pub attn_proj_b: View,
    pub ln_2_w: View,
    pub ln_2_b: View,
    pub c_fc_w: View, // [C, F]
    pub c_fc_b: View,
    pub mlp_proj_w: View, // [F, C]
    pub mlp_proj_b: View,
}

#[derive(Clone, Debug)]
pub struct Gpt2 {
    pub config: Gpt2Config,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    pub wte: View, // [V, C]
    pub wpe: View, // [n_positions, C]
    pub blocks: Vec<BlockViews>,
    pub ln_f_w: View,
    pub ln_f_b: View,
    /// Separate LM head [V, C] when the embedding is not tied.
    pub lm_head: Option<View>,
    /// Operand precision of the training products (`--dtype`); f32 unless set.
    pub precision: Precision,
    /// The block matrices are stored transposed, [out, in], for decoding: every
    /// matrix-vector product then reads contiguous rows (see [`Gpt2::to_inference_layout`]).
    /// Training and saving need the HF layout.
    pub inference_layout: bool,
}

impl Gpt2 {
    /// A model with every parameter zero; see [`Gpt2::init`] for training from scratch.
    pub fn new(config: Gpt2Config) -> Result<Self> {
        config.validate()?;
        let (v, c, f) = (config.vocab_size, config.n_embd, config.mlp_dim());
        let mut l = ParamLayout::default();
        let wte = l.push("transformer.wte.weight", &[v, c]);
        let wpe = l.push("transformer.wpe.weight", &[config.n_positions, c]);
        let blocks = (0..config.n_layer)
            .map(|i| {
                let p = format!("transformer.h.{i}.");
                BlockViews {
                    ln_1_w: l.push(format!("{p}ln_1.weight"), &[c]),
                    ln_1_b: l.push(format!("{p}ln_1.bias"), &[c]),
                    c_attn_w: l.push(format!("{p}attn.c_attn.weight"), &[c, 3 * c]),
                    c_attn_b: l.push(format!("{p}attn.c_attn.bias"), &[3 * c]),
                    attn_proj_w: l.push(format!("{p}attn.c_proj.weight"), &[c, c]),
                    attn_proj_b: l.push(format!("{p}attn.c_proj.bias"), &[c]),
                    ln_2_w: l.push(format!("{p}ln_2.weight"), &[c]),
                    ln_2_b: l.push(format!("{p}ln_2.bias"), &[c]),
                    c_fc_w: l.push(format!("{p}mlp.c_fc.weight"), &[c, f]),
                    c_fc_b: l.push(format!("{p}mlp.c_fc.bias"), &[f]),
                    mlp_proj_w: l.push(format!("{p}mlp.c_proj.weight"), &[f, c]),
                    mlp_proj_b: l.push(format!("{p}mlp.c_proj.bias"), &[c]),
                }
            })
            .collect();
        let ln_f_w = l.push("transformer.ln_f.weight", &[c]);
        let ln_f_b = l.push("transformer.ln_f.bias", &[c]);
        let lm_head = (!config.tie_word_embeddings).then(|| l.push("lm_head.weight", &[v, c]));
        let params = vec![0.0; l.total];
        Ok(Gpt2 {
            config,
            layout: l,
            params,
            wte,
            wpe,
            blocks,
            ln_f_w,
            ln_f_b,
            lm_head,
            precision: Precision::F32,
            inference_layout: false,
        })
    }

    /// Stores every block matrix transposed ([out, in]) for generation. Matrix-vector
    /// products over contiguous rows read memory about 1.5x faster than over columns
    /// (BENCHMARKS.md); the model can then no longer train or be saved.
    pub fn to_inference_layout(&mut self) {
        if self.inference_layout {
            return;
        }
        use rayon::prelude::*;
        let (c, f) = (self.config.n_embd, self.config.mlp_dim());
        let mut tmp = Vec::new();
        for w in self.blocks.clone() {
            for (v, inp, out) in [
                (w.c_attn_w, c, 3 * c),
                (w.attn_proj_w, c, c),
                (w.c_fc_w, c, f),
                (w.mlp_proj_w, f, c),
            ] {
                let m = v.of_mut(&mut self.params);
                tmp.clear();
                tmp.extend_from_slice(m);
                m.par_chunks_mut(inp).enumerate().for_each(|(j, row)| {
                    for (i, x) in row.iter_mut().enumerate() {
                        *x = tmp[i * out + j];
                    }
                });
            }
        }
        self.inference_layout = true;
    }

    /// GPT-2 initialisation: N(0, 0.02) for matrices and embeddings, N(0, 0.02/√(2L)) for the
    /// projections that write into the residual stream, zero biases, unit norm weights.
    pub fn init(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        let proj_std = 0.02 / (2.0 * self.config.n_layer as f64).sqrt();
        for t in &self.layout.tensors {
            let buf = t.view.of_mut(&mut self.params);
            let name = t.name.as_str();
            if name.contains("ln_") {
                buf.fill(if name.ends_with(".weight") { 1.0 } else { 0.0 });
            } else if name.ends_with(".bias") {
                buf.fill(0.0);
            } else {
                let std = if name.ends_with("c_proj.weight") {
                    proj_std
                } else {
                    0.02
                };
                for x in buf.iter_mut() {
                    *x = (rng.normal() * std) as f32;
                }
            }
        }
    }

    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    fn head(&self) -> View {
        self.lm_head.unwrap_or(self.wte)
    }

    fn attn_scale(&self, layer: usize) -> f32 {
        let mut s = if self.config.scale_attn_weights {
            1.0 / (self.config.head_dim() as f32).sqrt()
        } else {
            1.0
        };
        if self.config.scale_attn_by_inverse_layer_idx {
            s /= (layer + 1) as f32;
        }
        s
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

    /// Forward pass over ids [B, T] (row-major); fills every activation and the logits.
    pub fn forward(&self, acts: &mut Activations, ids: &[u32]) -> Result<()> {
        let (b, t) = (acts.b, acts.t);
        if ids.len() != b * t {
            return Err(Error::Input(format!(
                "expected {} ids, got {}",
                b * t,
                ids.len()
            )));
        }
        if t > self.config.n_positions {
            return Err(Error::Input(format!(
                "sequence of {t} tokens is longer than the context ({} positions)",
                self.config.n_positions
            )));
        }
        if self.inference_layout {
            return Err(Error::Input(
                "this model was opened for generation (transposed weights); open it for training"
                    .into(),
            ));
        }
        self.check_ids(ids)?;
        let cfg = &self.config;
        let (c, h, v, f) = (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.mlp_dim());
        let n = b * t;
        let eps = cfg.layer_norm_epsilon;
        let p = &self.params;
        let a = acts;
        embedding::forward(&mut a.encoded, ids, self.wte.of(p), self.wpe.of(p), t, c);
        for (l, w) in self.blocks.iter().enumerate() {
            let inp: &[f32] = if l == 0 {
                &a.encoded
            } else {
                &a.res3[(l - 1) * n * c..l * n * c]
            };
            let ln1 = &mut a.ln1[l * n * c..(l + 1) * n * c];
            let (m1, r1) = (
                &mut a.ln1_mean[l * n..(l + 1) * n],
                &mut a.ln1_rstd[l * n..(l + 1) * n],
            );
            layernorm::forward(ln1, m1, r1, inp, w.ln_1_w.of(p), w.ln_1_b.of(p), c, eps);
            let qkv = &mut a.qkv[l * n * 3 * c..(l + 1) * n * 3 * c];
            linear(
                self.precision,
                qkv,
                ln1,
                w.c_attn_w.of(p),
                w.c_attn_b.of(p),
                None,
                n,
                c,
                3 * c,
            );
            let lse = &mut a.lse[l * b * h * t..(l + 1) * b * h * t];
            let atty = &mut a.atty[l * n * c..(l + 1) * n * c];
            attention::forward(
                atty,
                lse,
                &mut a.attn_scratch,
                qkv,
                b,
                t,
                Heads::mha(c, h),
                self.attn_scale(l),
                self.precision,
            );
            let res2 = &mut a.res2[l * n * c..(l + 1) * n * c];
            linear(
                self.precision,
                res2,
                atty,
                w.attn_proj_w.of(p),
                w.attn_proj_b.of(p),
                Some(inp),
                n,
                c,
                c,
            );
            let ln2 = &mut a.ln2[l * n * c..(l + 1) * n * c];
            let (m2, r2) = (
                &mut a.ln2_mean[l * n..(l + 1) * n],
                &mut a.ln2_rstd[l * n..(l + 1) * n],
            );
            layernorm::forward(ln2, m2, r2, res2, w.ln_2_w.of(p), w.ln_2_b.of(p), c, eps);
            let fch = &mut a.fch[l * n * f..(l + 1) * n * f];
            let fch_gelu = &mut a.fch_gelu[l * n * f..(l + 1) * n * f];
            {
                linear(
                    self.precision,
                    fch,
                    ln2,
                    w.c_fc_w.of(p),
                    w.c_fc_b.of(p),
                    None,
                    n,
                    c,
                    f,
                );
                gelu::forward(fch_gelu, fch);
            }
            let fch_gelu = &a.fch_gelu[l * n * f..(l + 1) * n * f];
            let res3 = &mut a.res3[l * n * c..(l + 1) * n * c];
            linear(
                self.precision,
                res3,
                fch_gelu,
                w.mlp_proj_w.of(p),
                w.mlp_proj_b.of(p),
                Some(res2),
                n,
                f,
                c,
            );
        }
        let last = &a.res3[(cfg.n_layer - 1) * n * c..];
        layernorm::forward(
            &mut a.lnf,
            &mut a.lnf_mean,
            &mut a.lnf_rstd,
            last,
            self.ln_f_w.of(p),
            self.ln_f_b.of(p),
            c,
            eps,
        );
        // logits [N, V] = lnf [N, C] · headᵀ (head stored [V, C])
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

    /// Mean cross-entropy of the logits from the last `forward` against targets [B·T]
    /// (`crossentropy::IGNORE` skips a position). Returns (sum of losses, counted positions).
    pub fn loss(&self, acts: &mut Activations, targets: &[u32]) -> (f64, usize) {
        let v = self.config.vocab_size;
        crossentropy::forward(&mut acts.losses, &acts.logits, targets, v);
        crossentropy::sum_counted(&acts.losses, targets)
    }

    /// Backward pass after `forward`: turns the logits into their gradient in place, then
    /// pushes it back through every layer, adding d loss/d parameter · `grad_scale` into
    /// `grads` (same layout as the parameters). The loss is the mean over counted targets,
    /// times `grad_scale` (1/accumulation steps). Returns (sum of losses, counted positions).
    pub fn backward(
        &self,
        acts: &mut Activations,
        grads: &mut [f32],
        ids: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> (f64, usize) {
        let cfg = &self.config;
        let (b, t) = (acts.b, acts.t);
        let (c, h, v, f) = (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.mlp_dim());
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

        // logits = lnf · headᵀ
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
        let last = &a.res3[(cfg.n_layer - 1) * n * c..];
        let (gw, gb) = View::pair_mut(self.ln_f_w, self.ln_f_b, grads);
        layernorm::backward(
            &mut a.d_res,
            gw,
            gb,
            &a.d_lnf,
            last,
            self.ln_f_w.of(p),
            &a.lnf_mean,
            &a.lnf_rstd,
            c,
        );

        for (l, w) in self.blocks.iter().enumerate().rev() {
            let inp: &[f32] = if l == 0 {
                &a.encoded
            } else {
                &a.res3[(l - 1) * n * c..l * n * c]
            };
            let ln1 = &a.ln1[l * n * c..(l + 1) * n * c];
            let qkv = &a.qkv[l * n * 3 * c..(l + 1) * n * 3 * c];
            let lse = &a.lse[l * b * h * t..(l + 1) * b * h * t];
            let atty = &a.atty[l * n * c..(l + 1) * n * c];
            let res2 = &a.res2[l * n * c..(l + 1) * n * c];
            let ln2 = &a.ln2[l * n * c..(l + 1) * n * c];
            let fch = &a.fch[l * n * f..(l + 1) * n * f];
            let fch_gelu = &a.fch_gelu[l * n * f..(l + 1) * n * f];

            // MLP: res3 = res2 + gelu(ln2 · Wfc + bfc) · Wproj + bproj
            let d_fch = &mut a.d_fch[..n * f];
            linear_backward(
                self.precision,
                d_fch,
                grads,
                w.mlp_proj_w,
                Some(w.mlp_proj_b),
                &a.d_res,
                fch_gelu,
                p,
                n,
                f,
                c,
            );
            // the fc bias gradient: in f32, summed in GELU's backward sweep; in bf16, while
            // the gradient is packed for dW's product (free there)
            let fc_b = if self.precision == Precision::F32 {
                gelu::backward_inplace_col_sums(d_fch, fch, f, w.c_fc_b.of_mut(grads));
                None
            } else {
                gelu::backward_inplace(d_fch, fch);
                Some(w.c_fc_b)
            };
            linear_backward(
                self.precision,
                &mut a.d_ln,
                grads,
                w.c_fc_w,
                fc_b,
                d_fch,
                ln2,
                p,
                n,
                c,
                f,
            );
            let (gw, gb) = View::pair_mut(w.ln_2_w, w.ln_2_b, grads);
            let (m2, r2) = (
                &a.ln2_mean[l * n..(l + 1) * n],
                &a.ln2_rstd[l * n..(l + 1) * n],
            );
            layernorm::backward(
                &mut a.d_res,
                gw,
                gb,
                &a.d_ln,
                res2,
                w.ln_2_w.of(p),
                m2,
                r2,
                c,
            );

            // Attention: res2 = inp + attention(ln1 · Wqkv + bqkv) · Wo + bo
            linear_backward(
                self.precision,
                &mut a.d_atty,
                grads,
                w.attn_proj_w,
                Some(w.attn_proj_b),
                &a.d_res,
                atty,
                p,
                n,
                c,
                c,
            );
            let scale = self.attn_scale(l);
            attention::backward(
                &mut a.d_qkv,
                &mut a.attn_scratch,
                &a.d_atty,
                qkv,
                atty,
                lse,
                b,
                t,
                Heads::mha(c, h),
                scale,
                self.precision,
            );
            linear_backward(
                self.precision,
                &mut a.d_ln,
                grads,
                w.c_attn_w,
                Some(w.c_attn_b),
                &a.d_qkv,
                ln1,
                p,
                n,
                c,
                3 * c,
            );
            let (gw, gb) = View::pair_mut(w.ln_1_w, w.ln_1_b, grads);
            let (m1, r1) = (
                &a.ln1_mean[l * n..(l + 1) * n],
                &a.ln1_rstd[l * n..(l + 1) * n],
            );
            layernorm::backward(
                &mut a.d_res,
                gw,
                gb,
                &a.d_ln,
                inp,
                w.ln_1_w.of(p),
                m1,
                r1,
                c,
            );
        }
        let (gte, gpe) = View::pair_mut(self.wte, self.wpe, grads);
        embedding::backward(gte, gpe, &a.d_res, ids, t, c);
        result
    }

    /// Runs `ids` at positions cache.len .. cache.len + ids.len() of one sequence, appending
    /// their keys and values to the cache. Writes the logits of the last position into
    /// `logits` [V], or of every new position [n, V] when `all_positions`.
    pub fn forward_cached(
        &self,
        cache: &mut KvCache,
        ids: &[u32],
        logits: &mut Vec<f32>,
        all_positions: bool,
    ) -> Result<()> {
        let cfg = &self.config;
        let (c, h, v, f) = (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.mlp_dim());
        let n = ids.len();
        let pos = cache.len;
        if n == 0 {
            return Err(Error::Input("no tokens to run".into()));
        }
        if pos + n > cache.capacity {
            return Err(Error::Input(format!(
                "context full: {} positions requested, the model has {}",
                pos + n,
                cache.capacity
            )));
        }
        self.check_ids(ids)?;
        let p = &self.params;
        let eps = cfg.layer_norm_epsilon;
        let s = &mut cache.scratch;
        s.resize(n, c, f);
        s.scores
            .resize(attention::cached_scratch_len(cache.capacity), 0.0);
        let wpe = self.wpe.of(p);
        let wte = self.wte.of(p);
        for (i, &id) in ids.iter().enumerate() {
            let row = &mut s.x[i * c..(i + 1) * c];
            let (tok, ps) = (&wte[id as usize * c..][..c], &wpe[(pos + i) * c..][..c]);
            for j in 0..c {
                row[j] = tok[j] + ps[j];
            }
        }
        let kv_len = cache.capacity * c;
        for (l, w) in self.blocks.iter().enumerate() {
            layernorm::forward(
                &mut s.ln,
                &mut s.mean,
                &mut s.rstd,
                &s.x,
                w.ln_1_w.of(p),
                w.ln_1_b.of(p),
                c,
                eps,
            );
            linear_cached(
                self.inference_layout,
                &mut s.qkv,
                &s.ln,
                w.c_attn_w.of(p),
                w.c_attn_b.of(p),
                n,
                c,
                3 * c,
            );
            let kc = &mut cache.k[l * kv_len..(l + 1) * kv_len];
            let vc = &mut cache.v[l * kv_len..(l + 1) * kv_len];
            for i in 0..n {
                let row = &s.qkv[i * 3 * c..(i + 1) * 3 * c];
                kc[(pos + i) * c..(pos + i + 1) * c].copy_from_slice(&row[c..2 * c]);
                vc[(pos + i) * c..(pos + i + 1) * c].copy_from_slice(&row[2 * c..]);
            }
            let d = cfg.head_dim();
            attention::forward_cached(
                &mut s.atty,
                &s.qkv,
                3 * c,
                kc,
                vc,
                n,
                pos,
                h,
                h,
                d,
                self.attn_scale(l),
                usize::MAX,
                &mut s.scores,
            );
            if let Some((cl, ch)) = cache.capture {
                if cl == l {
                    let kc = &cache.k[l * kv_len..(l + 1) * kv_len];
                    cache.captured.clear();
                    attention::weights_cached(
                        &mut cache.captured,
                        &s.qkv,
                        3 * c,
                        kc,
                        n,
                        pos,
                        ch,
                        h,
                        h,
                        d,
                        self.attn_scale(l),
                        usize::MAX,
                    );
                }
            }
            linear_cached(
                self.inference_layout,
                &mut s.tmp,
                &s.atty,
                w.attn_proj_w.of(p),
                w.attn_proj_b.of(p),
                n,
                c,
                c,
            );
            add_inplace(&mut s.x, &s.tmp);
            layernorm::forward(
                &mut s.ln,
                &mut s.mean,
                &mut s.rstd,
                &s.x,
                w.ln_2_w.of(p),
                w.ln_2_b.of(p),
                c,
                eps,
            );
            linear_cached(
                self.inference_layout,
                &mut s.fch,
                &s.ln,
                w.c_fc_w.of(p),
                w.c_fc_b.of(p),
                n,
                c,
                f,
            );
            gelu::forward(&mut s.fch_gelu, &s.fch);
            linear_cached(
                self.inference_layout,
                &mut s.tmp,
                &s.fch_gelu,
                w.mlp_proj_w.of(p),
                w.mlp_proj_b.of(p),
                n,
                f,
                c,
            );
            add_inplace(&mut s.x, &s.tmp);
        }
        cache.len += n;
        let rows = if all_positions { n } else { 1 };
        let first = n - rows;
        let x_last = &s.x[first * c..];
        layernorm::forward(
            &mut s.ln[..rows * c],
            &mut s.mean,
            &mut s.rstd,
            x_last,
            self.ln_f_w.of(p),
            self.ln_f_b.of(p),
            c,
            eps,
        );
        logits.resize(rows * v, 0.0);
        let head = MatRef::F32(self.head().of(p));
        linear::linear(
            logits,
            v,
            &s.ln[..rows * c],
            rows,
            c,
            head,
            v,
            &mut Vec::new(),
        );
        Ok(())
    }

    /// One new token for each of several sequences (continuous batching): `ids[i]` runs at
    /// position caches[i].len of sequence i. The weights are read once for all of them.
    /// Writes logits [n, V].
    pub fn forward_batch(
        &self,
        caches: &mut [&mut KvCache],
        ids: &[u32],
        logits: &mut Vec<f32>,
        s: &mut Scratch,
    ) -> Result<()> {
        let cfg = &self.config;
        let (c, h, v, f) = (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.mlp_dim());
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
        let eps = cfg.layer_norm_epsilon;
        let t = self.inference_layout;
        s.resize(n, c, f);
        let most = caches.iter().map(|k| k.capacity).max().unwrap_or(1);
        s.scores.resize(attention::cached_scratch_len(most), 0.0);
        let (wte, wpe) = (self.wte.of(p), self.wpe.of(p));
        for (i, &id) in ids.iter().enumerate() {
            let pos = caches[i].len;
            let row = &mut s.x[i * c..(i + 1) * c];
            let (tok, ps) = (&wte[id as usize * c..][..c], &wpe[pos * c..][..c]);
            for j in 0..c {
                row[j] = tok[j] + ps[j];
            }
        }
        let d = cfg.head_dim();
        for (l, w) in self.blocks.iter().enumerate() {
            layernorm::forward(
                &mut s.ln,
                &mut s.mean,
                &mut s.rstd,
                &s.x,
                w.ln_1_w.of(p),
                w.ln_1_b.of(p),
                c,
                eps,
            );
            let (cw, cb) = (w.c_attn_w.of(p), w.c_attn_b.of(p));
            linear_cached(t, &mut s.qkv, &s.ln, cw, cb, n, c, 3 * c);
            for (i, cache) in caches.iter_mut().enumerate() {
                let pos = cache.len;
                let kv_len = cache.capacity * c;
                let row = &s.qkv[i * 3 * c..(i + 1) * 3 * c];
                let kc = &mut cache.k[l * kv_len..(l + 1) * kv_len];
                kc[pos * c..(pos + 1) * c].copy_from_slice(&row[c..2 * c]);
                let vc = &mut cache.v[l * kv_len..(l + 1) * kv_len];
                vc[pos * c..(pos + 1) * c].copy_from_slice(&row[2 * c..]);
                let (kc, vc) = (
                    &cache.k[l * kv_len..(l + 1) * kv_len],
                    &cache.v[l * kv_len..(l + 1) * kv_len],
                );
                attention::forward_cached(
                    &mut s.atty[i * c..(i + 1) * c],
                    row,
                    3 * c,
                    kc,
                    vc,
                    1,
                    pos,
                    h,
                    h,
                    d,
                    self.attn_scale(l),
                    usize::MAX,
                    &mut s.scores,
                );
            }
            let (pw, pb) = (w.attn_proj_w.of(p), w.attn_proj_b.of(p));
            linear_cached(t, &mut s.tmp, &s.atty, pw, pb, n, c, c);
            add_inplace(&mut s.x, &s.tmp);
            layernorm::forward(
                &mut s.ln,
                &mut s.mean,
                &mut s.rstd,
                &s.x,
                w.ln_2_w.of(p),
                w.ln_2_b.of(p),
                c,
                eps,
            );
            let (fw, fb) = (w.c_fc_w.of(p), w.c_fc_b.of(p));
            linear_cached(t, &mut s.fch, &s.ln, fw, fb, n, c, f);
            gelu::forward(&mut s.fch_gelu, &s.fch);
            let (mw, mb) = (w.mlp_proj_w.of(p), w.mlp_proj_b.of(p));
            linear_cached(t, &mut s.tmp, &s.fch_gelu, mw, mb, n, f, c);
            add_inplace(&mut s.x, &s.tmp);
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        layernorm::forward(
            &mut s.ln,
            &mut s.mean,
            &mut s.rstd,
            &s.x,
            self.ln_f_w.of(p),
            self.ln_f_b.of(p),
            c,
            eps,
        );
        logits.resize(n * v, 0.0);
        let head = MatRef::F32(self.head().of(p));
        linear::linear(logits, v, &s.ln, n, c, head, v, &mut Vec::new());
        Ok(())
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.config)
    }
}

/// y [N, OUT] = x [N, IN] · W [IN, OUT] + b (+ residual [N, OUT]): the bias and the residual
/// are the product's starting value (fused into it).
#[allow(clippy::too_many_arguments)]
fn linear(
    prec: Precision,
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    residual: Option<&[f32]>,
    n: usize,
    inp: usize,
    out: usize,
) {
    let fused = Fused {
        bias: Some(b),
        residual,
        col_sums: None,
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
        false,
        false,
        fused,
    );
}

/// As [`linear`] for `forward_cached`: W is [out, in] when `t` (the inference layout), and one
/// row (decoding) takes a matrix-vector kernel.
#[allow(clippy::too_many_arguments)]
fn linear_cached(
    t: bool,
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    inp: usize,
    out: usize,
) {
    if t {
        linear::linear(y, out, x, n, inp, MatRef::F32(w), out, &mut Vec::new());
        for row in y[..n * out].chunks_mut(out) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
    } else if n == 1 {
        let y = &mut y[..out];
        linear::matvec_in_out(y, &x[..inp], w);
        for (v, bv) in y.iter_mut().zip(b) {
            *v += bv;
        }
    } else {
        linear(Precision::F32, y, x, w, b, None, n, inp, out);
    }
}

/// Gradients of y = x · W + b: dx = dy · Wᵀ (overwritten), dW += xᵀ · dy, and with `b`,
/// db += Σ rows dy (fused into dW's product; None when the caller summed it already).
#[allow(clippy::too_many_arguments)]
fn linear_backward(
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
    matmul_p(prec, dx, dy, w.of(params), n, out, inp, false, true, false);
    match b {
        Some(b) => {
            let (gw, gb) = View::pair_mut(w, b, grads);
            let fused = Fused {
                col_sums: Some(gb),
                ..Fused::default()
            };
            matmul_fused(prec, gw, x, dy, inp, n, out, true, false, true, fused);
        }
        None => matmul_p(prec, w.of_mut(grads), x, dy, inp, n, out, true, false, true),
    }
}

/// Every activation of a training forward pass for a batch [B, T], plus backward scratch.
/// Per-layer buffers hold all L layers back to back.
pub struct Activations {
    pub b: usize,
    pub t: usize,
    encoded: Vec<f32>,
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    /// Log-sum-exp of each attention row [L, B, H, T] (flash-style: no T x T matrix kept).
    lse: Vec<f32>,
    atty: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    res3: Vec<f32>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    /// [B·T, V]: the logits after `forward`, their gradient after `backward`.
    pub logits: Vec<f32>,
    pub losses: Vec<f32>,
    d_res: Vec<f32>,
    d_ln: Vec<f32>,
    d_qkv: Vec<f32>,
    d_atty: Vec<f32>,
    d_fch: Vec<f32>,
    attn_scratch: Vec<f32>,
    d_lnf: Vec<f32>,
}

impl Activations {
    pub fn new(cfg: &Gpt2Config, b: usize, t: usize) -> Self {
        let (c, h, v, f, l) = (
            cfg.n_embd,
            cfg.n_head,
            cfg.vocab_size,
            cfg.mlp_dim(),
            cfg.n_layer,
        );
        let n = b * t;
        let z = |len: usize| vec![0.0f32; len];
        Activations {
            b,
            t,
            encoded: z(n * c),
            ln1: z(l * n * c),
            ln1_mean: z(l * n),
            ln1_rstd: z(l * n),
            qkv: z(l * n * 3 * c),
            lse: z(l * b * h * t),
            atty: z(l * n * c),
            res2: z(l * n * c),
            ln2: z(l * n * c),
            ln2_mean: z(l * n),
            ln2_rstd: z(l * n),
            fch: z(l * n * f),
            fch_gelu: z(l * n * f),
            res3: z(l * n * c),
            lnf: z(n * c),
            lnf_mean: z(n),
            lnf_rstd: z(n),
            logits: z(n * v),
            losses: z(n),
            d_res: z(n * c),
            d_ln: z(n * c),
            d_qkv: z(n * 3 * c),
            d_atty: z(n * c),
            d_fch: z(n * f),
            attn_scratch: z(attention::scratch_len(b, t, Heads::mha(c, h))),
            d_lnf: z(n * c),
        }
    }

    /// Number of f32 values held (for memory accounting).
    pub fn floats(&self) -> usize {
        [
            &self.encoded,
            &self.ln1,
            &self.ln1_mean,
            &self.ln1_rstd,
            &self.qkv,
            &self.lse,
            &self.atty,
            &self.res2,
            &self.ln2,
            &self.ln2_mean,
            &self.ln2_rstd,
            &self.fch,
            &self.fch_gelu,
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
            &self.d_fch,
            &self.attn_scratch,
            &self.d_lnf,
        ]
        .iter()
        .map(|v| v.len())
        .sum()
    }
}

/// Keys and values of every layer for the positions seen so far: [L, capacity, C] each.
pub struct KvCache {
    pub len: usize,
    pub capacity: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    scratch: Scratch,
    /// (layer, head) whose attention weights the next `forward_cached` keeps in `captured`.
    pub capture: Option<(usize, usize)>,
    pub captured: Vec<f32>,
}

impl KvCache {
    pub fn new(cfg: &Gpt2Config) -> Self {
        let size = cfg.n_layer * cfg.n_positions * cfg.n_embd;
        KvCache {
            len: 0,
            capacity: cfg.n_positions,
            k: vec![0.0; size],
            v: vec![0.0; size],
            scratch: Scratch::default(),
            capture: None,
            captured: Vec::new(),
        }
    }

    /// Forgets every position (the buffers stay allocated).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// Work buffers of `forward_cached`, grown to the largest n seen.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    ln: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    tmp: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
    scores: Vec<f32>,
}

impl Scratch {
    fn resize(&mut self, n: usize, c: usize, f: usize) {
        self.x.resize(n * c, 0.0);
        self.ln.resize(n * c, 0.0);
        self.mean.resize(n, 0.0);
        self.rstd.resize(n, 0.0);
        self.qkv.resize(n * 3 * c, 0.0);
        self.atty.resize(n * c, 0.0);
        self.tmp.resize(n * c, 0.0);
        self.fch.resize(n * f, 0.0);
        self.fch_gelu.resize(n * f, 0.0);
    }
}

//! The one decoder. GPT-2 and the Llama family (Llama 2/3, Mistral, Qwen2) are the same
//! stack of blocks
//!
//! ```text
//! embed -> [norm -> q|k|v -> positions -> attention -> o + residual
//!           -> norm -> up -> activation -> down + residual] x L -> norm -> head
//! ```
//!
//! whose parts the configuration chooses: LayerNorm or RMSNorm; learned positions or rotary
//! ones; a GELU MLP or SwiGLU; grouped-query heads; biases where the checkpoint has them; a
//! sliding window. [`Model`] holds those choices and the weights; the block body is written
//! once for training (`training.rs`) and once for inference (`inference.rs`). Each
//! architecture's file (`gpt2.rs`, `llama.rs`) only lays its weights out under its Hugging
//! Face names, and `Model::new` (in `mod.rs`) picks the file the configuration names.

use super::config::Gpt2Config;
use super::llama_config::LlamaConfig;
use super::params::{ParamLayout, View};
use super::weight::{Linear, Orient, Storage, Weight};
use crate::kernels::attention::Heads;
use crate::kernels::matmul::Precision;
use crate::kernels::rope::{Direction, HeadCols, Rope, RowPositions};
use crate::kernels::{layernorm, rmsnorm, RowStats, Stats};
use crate::rng::Rng;
use crate::{Error, Result};

/// The Hugging Face classes quill runs.
pub const SUPPORTED_ARCHITECTURES: [&str; 4] = [
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
];

/// A model's `config.json`, as the architecture's own struct (kept for saving it back).
#[derive(Clone, Debug, PartialEq)]
pub enum Config {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
}

/// The largest model quill lays out: 2^36 parameters (a 256 GiB f32 buffer), far beyond any
/// machine it runs on, so that sizes from files and flags are refused before arithmetic on
/// them can overflow.
pub const MAX_PARAMETERS: usize = 1 << 36;

/// `n` zeroed numbers, or a clear error when the memory cannot be had (the allocation is
/// lazy: pages a memory-mapped model never writes cost nothing).
fn zeroed(n: usize) -> crate::Result<Vec<f32>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let too_big = || {
        crate::Error::Input(format!(
            "cannot allocate {:.1} GB for a model of {n} parameters",
            n as f64 * 4.0 / 1e9
        ))
    };
    let layout = std::alloc::Layout::array::<f32>(n).map_err(|_| too_big())?;
    // Safety: the layout has a non-zero size; a non-null result is a zeroed block of n f32s
    // from the global allocator with Vec<f32>'s layout for capacity n, which Vec takes over.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut f32;
        if p.is_null() {
            return Err(too_big());
        }
        Ok(Vec::from_raw_parts(p, n, n))
    }
}

impl Config {
    pub fn architecture(&self) -> &'static str {
        match self {
            Config::Gpt2(_) => "GPT2LMHeadModel",
            Config::Llama(c) => c.architecture(),
        }
    }

    pub fn to_hf_json(&self) -> serde_json::Value {
        match self {
            Config::Gpt2(c) => c.to_hf_json(),
            Config::Llama(c) => c.to_hf_json(),
        }
    }
}

/// Which normalisation every norm of the model applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// (x - mean) / std · w + b (GPT-2).
    Layer,
    /// x / rms · w (Llama family).
    Rms,
}

/// One normalisation layer: its kind, epsilon and parameters.
#[derive(Clone, Copy, Debug)]
pub struct Norm {
    pub kind: NormKind,
    pub eps: f32,
    pub w: View,
    /// LayerNorm's bias.
    pub b: Option<View>,
}

impl Norm {
    /// out [N, C] = norm(x [N, C]); keeps each row's mean (LayerNorm) and 1/std for backward.
    pub fn forward(&self, p: &[f32], out: &mut [f32], stats: RowStats, x: &[f32]) {
        let w = self.w.of(p);
        match (self.kind, self.b) {
            (NormKind::Layer, Some(b)) => layernorm::forward(out, stats, x, w, b.of(p), self.eps),
            _ => rmsnorm::forward(out, stats.rstd, x, w, w.len(), self.eps),
        }
    }

    /// dx [N, C] += the gradient through the norm of dout, given its input `x` and the
    /// statistics of its forward pass; the weight (and bias) gradients accumulate into
    /// `grads`.
    pub fn backward(
        &self,
        p: &[f32],
        grads: &mut [f32],
        dx: &mut [f32],
        dout: &[f32],
        saved: Saved,
    ) {
        let w = self.w.of(p);
        match (self.kind, self.b) {
            (NormKind::Layer, Some(b)) => {
                let gw_gb = View::pair_mut(self.w, b, grads);
                layernorm::backward(dx, gw_gb, dout, saved.x, w, saved.stats)
            }
            _ => rmsnorm::backward(dx, self.w.of_mut(grads), dout, saved.x, w, saved.stats.rstd),
        }
    }
}

impl Norm {
    /// The input gradient of [`Norm::backward`] alone (a frozen norm): the gain (and bias)
    /// gradients go to `scratch` (grown to twice the width once, then reused).
    pub fn backward_input(
        &self,
        p: &[f32],
        (dx, scratch): (&mut [f32], &mut Vec<f32>),
        dout: &[f32],
        saved: Saved,
    ) {
        let w = self.w.of(p);
        if scratch.len() < 2 * w.len() {
            scratch.resize(2 * w.len(), 0.0);
        }
        let (gw, gb) = scratch[..2 * w.len()].split_at_mut(w.len());
        match (self.kind, self.b) {
            (NormKind::Layer, Some(_)) => {
                layernorm::backward(dx, (gw, gb), dout, saved.x, w, saved.stats)
            }
            _ => rmsnorm::backward(dx, gw, dout, saved.x, w, saved.stats.rstd),
        }
    }
}

/// What a norm's backward pass reads: its input and the statistics of its forward pass.
#[derive(Clone, Copy)]
pub struct Saved<'a> {
    pub x: &'a [f32],
    pub stats: Stats<'a>,
}

/// How positions enter the model.
#[derive(Clone)]
pub enum Positions {
    /// A learned table [context, C] added to the token embedding (GPT-2).
    Learned(View),
    /// Rotary embeddings applied to queries and keys (Llama family).
    Rotary(Rope),
}

/// Where the query heads and the key heads lie in rows of q | k | v (`heads`): the columns
/// RoPE rotates.
pub(super) fn qk_cols(heads: Heads) -> [HeadCols; 2] {
    let (stride, hd) = (heads.qkv_width(), heads.h * heads.d);
    [(0, heads.h), (hd, heads.kv)].map(|(col0, n)| HeadCols {
        stride,
        col0,
        heads: n,
    })
}

/// Rotates the query and key heads of rows of q | k | v (`heads`; row width their
/// `qkv_width`) at the positions `at` gives them.
pub(super) fn rotate_qk(
    rope: &Rope,
    qkv: &mut [f32],
    heads: Heads,
    at: RowPositions,
    dir: Direction,
) {
    for cols in qk_cols(heads) {
        rope.apply(qkv, cols, at, dir);
    }
}

/// The MLP's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mlp {
    /// up [N, F] -> gelu (tanh) -> down (GPT-2).
    Gelu,
    /// up = gate | up [N, 2F] -> silu(gate) · up -> down (Llama family).
    SwiGlu,
}

/// One block's layers.
#[derive(Clone, Debug)]
pub struct Block {
    pub attn_norm: Norm,
    /// q | k | v in one projection: [(H + 2 KV) · D] outputs.
    pub qkv: Linear,
    pub o: Linear,
    pub mlp_norm: Norm,
    /// fc (GELU) or gate | up (SwiGLU).
    pub up: Linear,
    pub down: Linear,
}

/// Per-layer attention settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerAttention {
    pub scale: f32,
    /// Each position attends to at most this many positions up to itself.
    pub window: Option<usize>,
}

/// A decoder-only transformer: the parts its configuration chose, and its weights.
#[derive(Clone)]
pub struct Model {
    pub config: Config,
    pub layout: ParamLayout,
    /// Every parameter in f32, except the matrices memory-mapped from their files (whose
    /// part of this buffer stays zero and untouched, so it costs no memory).
    pub params: Vec<f32>,
    pub vocab: usize,
    pub width: usize,
    pub context: usize,
    pub heads: Heads,
    /// The MLP's hidden width F.
    pub mlp_width: usize,
    pub mlp: Mlp,
    pub positions: Positions,
    /// Token embedding [V, C].
    pub embed: Weight,
    pub blocks: Vec<Block>,
    pub attention: Vec<LayerAttention>,
    pub final_norm: Norm,
    /// LM head [V, C]: the embedding itself when tied.
    pub head: Weight,
    /// Operand precision of the training products (`--dtype`); f32 unless set.
    pub precision: Precision,
    /// What inference adds beside the weights: LoRA adapters left unmerged (a base that
    /// stays quantized); None unless set.
    pub adapters: Option<std::sync::Arc<dyn super::beside::Beside>>,
}

/// What an architecture's file reads off its configuration: (vocabulary, width, context,
/// heads, MLP width, MLP activation).
pub(super) type Shape = (usize, usize, usize, Heads, usize, Mlp);

/// The weights an architecture's file lays out: (token embedding, positions, blocks,
/// per-layer attention settings, final norm, LM head).
pub(super) type Layers = (
    Weight,
    Positions,
    Vec<Block>,
    Vec<LayerAttention>,
    Norm,
    Weight,
);

impl Config {
    /// The number of parameters a configuration lays out (None on overflow).
    pub fn parameter_count(&self) -> Option<usize> {
        let config = self;
        let sum = |xs: &[Option<usize>]| xs.iter().try_fold(0usize, |a, x| a.checked_add((*x)?));
        let mul = |a: usize, b: usize| a.checked_mul(b);
        match config {
            Config::Gpt2(c) => {
                let (v, d, f) = (c.vocab_size, c.n_embd, c.mlp_dim());
                let layer = sum(&[
                    mul(4, d),
                    mul(d, d).and_then(|x| mul(x, 3)),
                    mul(3, d),
                    mul(d, d),
                    Some(d),
                    mul(d, f),
                    Some(f),
                    mul(f, d),
                    Some(d),
                ])?;
                let head = if c.tie_word_embeddings { 0 } else { mul(v, d)? };
                sum(&[
                    mul(v, d),
                    mul(c.n_positions, d),
                    mul(2, d),
                    Some(head),
                    mul(layer, c.n_layer),
                ])
            }
            Config::Llama(c) => {
                let (v, d, f) = (c.vocab_size, c.hidden_size, c.intermediate_size);
                let q = mul(c.num_attention_heads, c.head_dim)?;
                let kv = mul(c.num_key_value_heads, c.head_dim)?;
                let qkv = sum(&[Some(q), mul(kv, 2)])?;
                let layer = sum(&[
                    mul(2, d),
                    mul(d, qkv),
                    mul(q, d),
                    mul(d, f).and_then(|x| mul(x, 3)),
                    Some(if c.qkv_bias { qkv } else { 0 }),
                    Some(if c.o_bias { d } else { 0 }),
                ])?;
                let head = if c.tie_word_embeddings { 0 } else { mul(v, d)? };
                sum(&[
                    mul(v, d),
                    Some(d),
                    Some(head),
                    mul(layer, c.num_hidden_layers),
                ])
            }
        }
    }
}

impl Model {
    /// A model with every parameter zero, from what an architecture's file laid out.
    pub(super) fn assemble(
        config: Config,
        layout: ParamLayout,
        shape: Shape,
        layers: Layers,
    ) -> crate::Result<Model> {
        let (vocab, width, context, heads, mlp_width, mlp) = shape;
        let (embed, positions, blocks, attention, final_norm, head) = layers;
        Ok(Model {
            params: zeroed(layout.total)?,
            layout,
            config,
            vocab,
            width,
            context,
            heads,
            mlp_width,
            mlp,
            positions,
            embed,
            blocks,
            attention,
            final_norm,
            head,
            precision: Precision::F32,
            adapters: None,
        })
    }

    /// Initialisation for training from scratch (GPT-2's recipe, used for both families):
    /// N(0, 0.02) for matrices and embeddings, N(0, 0.02/√(2L)) for the projections that
    /// write into the residual stream (o, down), zero biases, unit norm weights.
    pub fn init(&mut self, seed: u64) {
        let mut rng = Rng::new(seed);
        let proj_std = 0.02 / (2.0 * self.blocks.len() as f64).sqrt();
        let mut norms: Vec<Norm> = vec![self.final_norm];
        let mut residual_proj = Vec::new();
        for b in &self.blocks {
            norms.extend([b.attn_norm, b.mlp_norm]);
            residual_proj.extend([b.o.whole.offset, b.down.whole.offset]);
        }
        for t in &self.layout.tensors {
            let buf = t.view.of_mut(&mut self.params);
            if norms.iter().any(|n| n.w == t.view) {
                buf.fill(1.0);
            } else if !t.is_matrix() {
                buf.fill(0.0);
            } else {
                let std = if residual_proj.contains(&t.view.offset) {
                    proj_std
                } else {
                    0.02
                };
                for x in buf.iter_mut() {
                    *x = (rng.normal() * std) as f32;
                }
            }
        }
        self.for_each_weight(|w| w.storage = Storage::Params(w.view));
    }

    /// Every weight matrix (the embedding and a tied head both appear).
    pub fn for_each_weight(&mut self, mut f: impl FnMut(&mut Weight)) {
        f(&mut self.embed);
        f(&mut self.head);
        for b in &mut self.blocks {
            for lin in [&mut b.qkv, &mut b.o, &mut b.up, &mut b.down] {
                lin.parts.iter_mut().for_each(&mut f);
            }
        }
    }

    /// Every weight matrix, without allocating (the training step checks them).
    fn weights(&self) -> impl Iterator<Item = &Weight> + '_ {
        let blocks = self.blocks.iter().flat_map(|b| {
            [&b.qkv, &b.o, &b.up, &b.down]
                .into_iter()
                .flat_map(|lin| lin.parts.iter())
        });
        [&self.embed, &self.head].into_iter().chain(blocks)
    }

    /// Whether any weight is block-quantized.
    pub fn is_quantized(&self) -> bool {
        self.weights().any(|w| w.quantized())
    }

    /// Whether any weight is read from a memory map.
    pub fn is_mapped(&self) -> bool {
        self.weights().any(|w| w.is_mapped())
    }

    /// Whether the block matrices were turned around for decoding
    /// ([`Model::to_inference_layout`]).
    pub fn is_transposed(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| b.qkv.parts[0].orient != self.layout_orient())
    }

    /// How the checkpoint stores its block matrices.
    fn layout_orient(&self) -> Orient {
        match self.config {
            Config::Gpt2(_) => Orient::InOut,
            Config::Llama(_) => Orient::OutIn,
        }
    }

    /// Training and saving need every weight in f32, in the checkpoint's layout.
    pub fn check_trainable(&self) -> Result<()> {
        if self.is_mapped() {
            return Err(Error::Input(
                "the weights are memory-mapped; convert them to f32 (materialize) first".into(),
            ));
        }
        if self.is_transposed() {
            return Err(Error::Input(
                "this model was opened for generation (transposed weights); open it for training"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Stores every input-major block matrix ([in, out], GPT-2) as [out, in] for generation:
    /// matrix-vector products over contiguous rows read memory about 1.5x faster than over
    /// columns (BENCHMARKS.md). The model can then no longer train or be saved.
    pub fn to_inference_layout(&mut self) {
        use rayon::prelude::*;
        let mut tmp = Vec::new();
        let params = &mut self.params;
        for b in &mut self.blocks {
            for lin in [&mut b.qkv, &mut b.o, &mut b.up, &mut b.down] {
                for w in lin.parts.iter_mut().filter(|w| w.orient == Orient::InOut) {
                    let (inp, out) = (w.cols, w.rows);
                    let m = w.view.of_mut(params);
                    tmp.clear();
                    tmp.extend_from_slice(m);
                    m.par_chunks_mut(inp).enumerate().for_each(|(j, row)| {
                        for (i, x) in row.iter_mut().enumerate() {
                            *x = tmp[i * out + j];
                        }
                    });
                    w.orient = Orient::OutIn;
                }
            }
        }
    }

    /// Copies every memory-mapped matrix into the f32 buffer (needed for training).
    pub fn materialize(&mut self) {
        use rayon::prelude::*;
        let mut params = std::mem::take(&mut self.params);
        let mut done: Vec<View> = Vec::new();
        self.for_each_weight(|w| {
            // a tied head is the embedding's view: its rows are copied once
            if w.is_mapped() && !done.contains(&w.view) {
                let (mat, cols) = (w.mat(&[]), w.cols);
                w.view
                    .of_mut(&mut params)
                    .par_chunks_mut(cols)
                    .enumerate()
                    .for_each(|(i, row)| mat.row_into(i, cols, row));
                done.push(w.view);
            }
            w.storage = Storage::Params(w.view);
        });
        self.params = params;
    }

    pub fn architecture(&self) -> &'static str {
        self.config.architecture()
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Positions the model can attend over.
    pub fn context(&self) -> usize {
        self.context
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &self.config {
            Config::Gpt2(c) => c.eos_token_id.into_iter().collect(),
            Config::Llama(c) => c.eos_token_ids.clone(),
        }
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        match &self.config {
            Config::Gpt2(c) => c.bos_token_id,
            Config::Llama(c) => c.bos_token_id,
        }
    }

    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The parameters and their layout, the buffer mutable (for the optimizer).
    pub fn params_mut(&mut self) -> (&ParamLayout, &mut Vec<f32>) {
        (&self.layout, &mut self.params)
    }

    /// Operand precision of the training products: f32, or bf16 operands with f32
    /// accumulation, master weights and everything else (mixed precision).
    pub fn set_precision(&mut self, p: Precision) {
        self.precision = p;
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Layers and query heads (for choosing an attention map).
    pub fn layers_heads(&self) -> (usize, usize) {
        (self.blocks.len(), self.heads.h)
    }

    /// A short description: architecture, layers, heads, width, parameters.
    pub fn describe(&self) -> String {
        let p = self.num_params() as f64 / 1e6;
        let (l, h, c) = (self.blocks.len(), self.heads.h, self.width);
        match &self.config {
            Config::Gpt2(_) => {
                format!("GPT-2 {l} layers, {h} heads, width {c}, {p:.2}M parameters")
            }
            Config::Llama(cfg) => format!(
                "{} {l} layers, {h} heads ({} kv), width {c}, {p:.2}M parameters",
                cfg.architecture().trim_end_matches("ForCausalLM"),
                self.heads.kv,
            ),
        }
    }

    /// Bytes of weights read per decoded token: every matrix once in its stored precision,
    /// vectors in f32; the embedding (one row) and a learned position table do not count
    /// unless the embedding is also the head.
    pub fn weight_bytes_per_token(&self) -> usize {
        let mut skip = vec![self.embed.view];
        if let Positions::Learned(v) = self.positions {
            skip.push(v);
        }
        let tied = self.head.view == self.embed.view;
        self.layout
            .tensors
            .iter()
            .filter(|t| (tied && t.view == self.embed.view) || !skip.contains(&t.view))
            .map(|t| {
                self.weights()
                    .find(|w| w.view == t.view)
                    .map_or(t.view.len * 4, |w| w.bytes())
            })
            .sum()
    }

    pub(super) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab
            )));
        }
        Ok(())
    }
}

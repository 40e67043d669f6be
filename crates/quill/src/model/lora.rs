//! LoRA (Hu et al., 2021): low-rank adapters beside a frozen model's projections. A target
//! projection y = W x becomes y = W x + s · B (A x), with A [r, in], B [out, r] and the scale
//! s = alpha / r (or alpha / √r with rsLoRA). Only A and B train; B starts at zero, so the
//! adapted model starts as the base model.
//!
//! The adapters live in their own flat buffer (with its own [`ParamLayout`]), so gradients
//! and AdamW moments cost the adapters' size, not the model's. They are saved and read in
//! PEFT's format (`adapter_config.json`, `adapter_model.safetensors` under
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` names), and can be merged
//! into the weights (W += s · B A) for inference or for a merged model folder. (Reading and
//! writing PEFT's files is io/peft.rs.)
//!
//! The training passes call [`Lora::forward_into`] and [`Lora::backward_from`] at each target
//! projection (model/training.rs).

use super::beside::{Beside, Projection};
use super::decoder::{Mlp, Model};
use super::params::{ParamLayout, View};
use crate::kernels::matmul::{matmul, Accumulate, Operand, Precision};
use crate::rng::Rng;
use crate::{Error, Result};

/// A projection an adapter can sit beside (the Llama family's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

pub const ALL_TARGETS: [Target; 7] = [
    Target::Q,
    Target::K,
    Target::V,
    Target::O,
    Target::Gate,
    Target::Up,
    Target::Down,
];

impl Target {
    /// The module's name in Hugging Face's Llama (and PEFT's `target_modules`).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    pub fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    /// `q` or `q_proj` (and so on).
    pub fn parse(s: &str) -> Result<Target> {
        ALL_TARGETS
            .into_iter()
            .find(|t| t.module() == s || t.module().trim_end_matches("_proj") == s)
            .ok_or_else(|| {
                Error::Input(format!(
                    "unknown LoRA target {s:?} (expected q, k, v, o, gate, up or down)"
                ))
            })
    }
}

/// The adapters' shape and training settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Vec<Target>,
    /// rsLoRA: scale alpha / √r instead of alpha / r.
    pub rslora: bool,
    /// LoRA+ (Hayou et al., 2024): the B matrices learn at `plus_ratio` × the learning rate
    /// of the A matrices (1: plain LoRA).
    pub plus_ratio: f32,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// One adapter: its layer and target, its A [r, inp] and B [out, r] in the adapters'
/// buffer, and where its output lies in the fused projection's output rows (q | k | v,
/// gate | up) of width `width`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adapter {
    pub layer: usize,
    pub target: Target,
    pub a: View,
    pub b: View,
    pub inp: usize,
    pub out: usize,
    pub col0: usize,
    pub width: usize,
}

/// The adapters of one model.
#[derive(Clone, Debug)]
pub struct Lora {
    pub config: LoraConfig,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    pub adapters: Vec<Adapter>,
}

/// (inputs, outputs, first output column, output row width) of a target in `m`.
fn dims(m: &Model, t: Target) -> (usize, usize, usize, usize) {
    let (c, hs, f) = (m.width, m.heads, m.mlp_width);
    let (q, kv) = (hs.h * hs.d, hs.kv * hs.d);
    match t {
        Target::Q => (c, q, 0, hs.qkv_width()),
        Target::K => (c, kv, q, hs.qkv_width()),
        Target::V => (c, kv, q + kv, hs.qkv_width()),
        Target::O => (q, c, 0, c),
        Target::Gate => (c, f, 0, 2 * f),
        Target::Up => (c, f, f, 2 * f),
        Target::Down => (f, c, 0, c),
    }
}

/// PEFT's name of an adapter matrix (`ab` is "A" or "B").
pub fn peft_name(layer: usize, t: Target, ab: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{ab}.weight",
        t.parent(),
        t.module()
    )
}

impl Lora {
    /// Adapters for `model` (zero until [`Lora::init`] or a load). The model must be of the
    /// Llama family; the rank must be at least 1 and at most the smaller side of every target.
    pub fn new(model: &Model, config: LoraConfig) -> Result<Lora> {
        if model.mlp != Mlp::SwiGlu {
            return Err(Error::Input(
                "LoRA adapters are for the Llama family (Llama, Mistral, Qwen2, SmolLM); this model is a GPT-2".into(),
            ));
        }
        let mut targets = config.targets.clone();
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err(Error::Input("LoRA needs at least one target".into()));
        }
        let r = config.rank;
        for &t in &targets {
            let (inp, out, _, _) = dims(model, t);
            if r == 0 || r > inp.min(out) {
                return Err(Error::Input(format!(
                    "LoRA rank {r} does not fit {} ({out} x {inp}): it must be 1 to {}",
                    t.module(),
                    inp.min(out)
                )));
            }
        }
        if !(config.alpha.is_finite() && config.alpha > 0.0) {
            return Err(Error::Input(format!(
                "LoRA alpha must be a number above 0 (got {})",
                config.alpha
            )));
        }
        if !(config.plus_ratio.is_finite() && config.plus_ratio > 0.0) {
            return Err(Error::Input(format!(
                "the LoRA+ ratio must be a positive number (got {})",
                config.plus_ratio
            )));
        }
        if !(0.0..1.0).contains(&config.dropout) {
            return Err(Error::Input(format!(
                "LoRA dropout must be at least 0 and below 1 (got {})",
                config.dropout
            )));
        }
        let mut layout = ParamLayout::default();
        let mut adapters = Vec::new();
        for layer in 0..model.blocks.len() {
            for &t in &targets {
                let (inp, out, col0, width) = dims(model, t);
                let a = layout.push(peft_name(layer, t, "A"), &[r, inp]);
                let b = layout.push(peft_name(layer, t, "B"), &[out, r]);
                adapters.push(Adapter {
                    layer,
                    target: t,
                    a,
                    b,
                    inp,
                    out,
                    col0,
                    width,
                });
            }
        }
        let params = vec![0.0; layout.total];
        Ok(Lora {
            config: LoraConfig { targets, ..config },
            layout,
            params,
            adapters,
        })
    }

    /// Each tensor's learning-rate factor, in the layout's order: LoRA+'s ratio for the B
    /// matrices, 1 for the A matrices.
    pub fn lr_factors(&self) -> Vec<f32> {
        let mut f = vec![1.0; self.layout.tensors.len()];
        for ad in &self.adapters {
            let i = self
                .layout
                .tensors
                .partition_point(|t| t.view.offset < ad.b.offset);
            f[i] = self.config.plus_ratio;
        }
        f
    }

    /// PEFT's initialisation: A uniform in ±1/√inp (Kaiming-uniform with a = √5), B zero.
    pub fn init(&mut self, seed: u64) {
        let mut rng = Rng::new(seed ^ 0x10ea);
        for ad in &self.adapters {
            let bound = 1.0 / (ad.inp as f64).sqrt();
            for x in ad.a.of_mut(&mut self.params) {
                *x = ((2.0 * rng.uniform() - 1.0) * bound) as f32;
            }
            ad.b.of_mut(&mut self.params).fill(0.0);
        }
    }

    pub fn scale(&self) -> f32 {
        self.config.scale()
    }

    /// The indices of the adapters of `layer` at `targets`.
    pub fn at<'a>(
        &'a self,
        layer: usize,
        targets: &'a [Target],
    ) -> impl Iterator<Item = usize> + 'a {
        self.adapters
            .iter()
            .enumerate()
            .filter(move |(_, a)| a.layer == layer && targets.contains(&a.target))
            .map(|(k, _)| k)
    }

    /// The weight matrices [`Lora::merge_into`] changes (each fused projection once).
    pub fn touched(&self, model: &Model) -> Vec<View> {
        let mut views: Vec<View> = Vec::new();
        for ad in &self.adapters {
            let blk = &model.blocks[ad.layer];
            let v = match ad.target {
                Target::Q | Target::K | Target::V => blk.qkv.whole,
                Target::O => blk.o.whole,
                Target::Gate | Target::Up => blk.up.whole,
                Target::Down => blk.down.whole,
            };
            if !views.contains(&v) {
                views.push(v);
            }
        }
        views
    }

    /// W += s · B A for every adapter: the model then computes what base + adapters do.
    /// Memory-mapped or quantized weights become f32 first.
    pub fn merge_into(&self, model: &mut Model) -> Result<()> {
        model.materialize();
        model.check_trainable()?;
        let s = self.scale();
        for ad in &self.adapters {
            let blk = &model.blocks[ad.layer];
            let (linear, row0) = match ad.target {
                Target::Q | Target::K | Target::V => (&blk.qkv, ad.col0),
                Target::O => (&blk.o, 0),
                Target::Gate | Target::Up => (&blk.up, ad.col0),
                Target::Down => (&blk.down, 0),
            };
            if linear.orient() != super::weight::Orient::OutIn {
                return Err(Error::Input(
                    "LoRA merges into [out, in] weights only".into(),
                ));
            }
            let (a, b) = (ad.a.of(&self.params), ad.b.of(&self.params));
            let mut delta = vec![0.0f32; ad.out * ad.inp];
            matmul(
                Precision::F32,
                &mut delta,
                Operand::new(b, ad.out, self.config.rank),
                Operand::new(a, self.config.rank, ad.inp),
                Accumulate::Overwrite,
            );
            let w = linear.whole.of_mut(&mut model.params);
            let rows = &mut w[row0 * ad.inp..(row0 + ad.out) * ad.inp];
            for (x, d) in rows.iter_mut().zip(&delta) {
                *x += s * d;
            }
        }
        Ok(())
    }
}

impl Beside for Lora {
    fn add(&self, (layer, p): (usize, Projection), x: &[f32], y: &mut [f32], buf: &mut Vec<f32>) {
        let targets: &[Target] = match p {
            Projection::Qkv => &[Target::Q, Target::K, Target::V],
            Projection::O => &[Target::O],
            Projection::Up => &[Target::Gate, Target::Up],
            Projection::Down => &[Target::Down],
        };
        self.add_infer((layer, targets), x, y, buf)
    }
}

/// Per-batch buffers of the adapters' training passes: each adapter's A x [N, r], and
/// scratch for its input (after dropout), output and gradients.
pub struct LoraActs {
    u: Vec<f32>,
    xd: Vec<f32>,
    y: Vec<f32>,
    du: Vec<f32>,
    /// Seeds the dropout masks of this micro-batch (the backward pass regenerates them).
    pub seed: u64,
    /// Token rows of the global batch before this one's first (a data-parallel rank's): the
    /// masks are drawn by position in the global batch, whatever the number of ranks.
    pub first_row: usize,
    /// Where the frozen norms' backward passes put the gradients nobody needs.
    pub gains: Vec<f32>,
}

/// The adapters' own products run in f32 whatever the model's (`--dtype bf16` included): at
/// rank r they are a few percent of a step's work, but a bf16 product would first convert
/// its wide operand (an input [N, in] or output gradient [N, out]) for every one of them,
/// which costs more than the product (measured: 5% of a LoRA step of SmolLM2 on AMD EPYC
/// Zen 3, where bf16 rounds into f32 copies).
const ADAPTER_PRECISION: Precision = Precision::F32;

/// Whether element `i` of adapter `k`'s input survives dropout `p`: a hash of (seed, k, i),
/// so that the backward pass draws the same mask without storing it.
fn keep(seed: u64, k: usize, i: usize, p: f32) -> bool {
    let mut z = seed ^ ((k as u64) << 40) ^ i as u64;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32) >= p
}

impl LoraActs {
    pub fn new(lora: &Lora, n: usize) -> Self {
        let r = lora.config.rank;
        let max_in = lora.adapters.iter().map(|a| a.inp).max().unwrap_or(0);
        let max_out = lora.adapters.iter().map(|a| a.out).max().unwrap_or(0);
        LoraActs {
            u: vec![0.0; lora.adapters.len() * n * r],
            xd: vec![0.0; n * max_in],
            y: vec![0.0; n * max_out.max(max_in)],
            du: vec![0.0; n * r],
            seed: 0,
            first_row: 0,
            gains: Vec::new(),
        }
    }
}

impl Lora {
    /// The adapter's input after dropout: `x` itself, or its scaled survivors in scratch.
    /// `(seed, base)`: the masks' seed and the global index of x's first element.
    fn dropped<'a>(
        &self,
        k: usize,
        x: &'a [f32],
        xd: &'a mut [f32],
        (seed, base): (u64, usize),
    ) -> &'a [f32] {
        let p = self.config.dropout;
        if p == 0.0 {
            return x;
        }
        let inv = 1.0 / (1.0 - p);
        for (i, (d, &v)) in xd.iter_mut().zip(x).enumerate() {
            *d = if keep(seed, k, base + i, p) {
                v * inv
            } else {
                0.0
            };
        }
        &xd[..x.len()]
    }

    /// Forward of adapter `k` over `n` rows: y[:, col0..col0+out] += s · B (A dropout(x)).
    pub fn forward_into(&self, k: usize, la: &mut LoraActs, x: &[f32], y: &mut [f32]) {
        let (ad, prec) = (self.adapters[k], ADAPTER_PRECISION);
        let r = self.config.rank;
        let n = x.len() / ad.inp;
        let u = &mut la.u[k * n * r..(k + 1) * n * r];
        let xd = self.dropped(
            k,
            x,
            &mut la.xd[..n * ad.inp],
            (la.seed, la.first_row * ad.inp),
        );
        self.low_rank(ad, prec, xd, (u, &mut la.y[..n * ad.out]), y);
    }

    /// y[:, col0..col0+out] += s · (x Aᵀ) Bᵀ for adapter `ad` over x's n rows, with
    /// u [n, r] = x Aᵀ and tmp [n, out] as its buffers (u kept for the backward pass).
    fn low_rank(
        &self,
        ad: Adapter,
        prec: Precision,
        x: &[f32],
        (u, tmp): (&mut [f32], &mut [f32]),
        y: &mut [f32],
    ) {
        let (r, s, n) = (self.config.rank, self.scale(), x.len() / ad.inp);
        let (a, b) = (ad.a.of(&self.params), ad.b.of(&self.params));
        let over = Accumulate::Overwrite;
        let x = Operand::new(x, n, ad.inp);
        matmul(prec, u, x, Operand::new(a, r, ad.inp).t(), over);
        let u = Operand::new(u, n, r);
        matmul(prec, tmp, u, Operand::new(b, ad.out, r).t(), over);
        for (row, t) in y.chunks_mut(ad.width).zip(tmp.chunks(ad.out)) {
            for (v, d) in row[ad.col0..ad.col0 + ad.out].iter_mut().zip(t) {
                *v += s * d;
            }
        }
    }

    /// Inference beside the weights (unmerged): y [n, width] += s · (x Aᵀ) Bᵀ in each adapter
    /// of `layer` at one of `targets`, on its columns of the fused projection's output.
    /// `scratch` holds x Aᵀ and the product (grown as needed).
    fn add_infer(
        &self,
        (layer, targets): (usize, &[Target]),
        x: &[f32],
        y: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let r = self.config.rank;
        for k in self.at(layer, targets) {
            let ad = self.adapters[k];
            let n = x.len() / ad.inp;
            scratch.resize(n * (r + ad.out), 0.0);
            let bufs = scratch.split_at_mut(n * r);
            self.low_rank(ad, Precision::F32, &x[..n * ad.inp], bufs, y);
        }
    }

    /// Backward of adapter `k`: from the gradient of its output columns in `dy` and its
    /// input `x`, adds dA and dB into `grads` (the adapters' layout) and the input's gradient
    /// into `dx`.
    pub fn backward_from(
        &self,
        k: usize,
        la: &mut LoraActs,
        (dy, x): (&[f32], &[f32]),
        dx: &mut [f32],
        grads: &mut [f32],
    ) {
        let (ad, prec) = (self.adapters[k], ADAPTER_PRECISION);
        let (r, s) = (self.config.rank, self.scale());
        let n = x.len() / ad.inp;
        let u = &la.u[k * n * r..(k + 1) * n * r];
        // this adapter's columns of dy, scaled by s: [N, out]
        let dyc = &mut la.y[..n * ad.out];
        for (d, row) in dyc.chunks_mut(ad.out).zip(dy.chunks(ad.width)) {
            for (o, v) in d.iter_mut().zip(&row[ad.col0..ad.col0 + ad.out]) {
                *o = s * v;
            }
        }
        let (a, b) = (ad.a.of(&self.params), ad.b.of(&self.params));
        // dB += (s dy)ᵀ u; du = (s dy) B
        matmul(
            prec,
            ad.b.of_mut(grads),
            Operand::new(dyc, n, ad.out).t(),
            Operand::new(u, n, r),
            Accumulate::Add,
        );
        let du = &mut la.du[..n * r];
        matmul(
            prec,
            du,
            Operand::new(dyc, n, ad.out),
            Operand::new(b, ad.out, r),
            Accumulate::Overwrite,
        );
        // dA += duᵀ dropout(x)
        let xd = self.dropped(
            k,
            x,
            &mut la.xd[..n * ad.inp],
            (la.seed, la.first_row * ad.inp),
        );
        matmul(
            prec,
            ad.a.of_mut(grads),
            Operand::new(du, n, r).t(),
            Operand::new(xd, n, ad.inp),
            Accumulate::Add,
        );
        // dx += dropout'(du A)
        let dxa = &mut la.y[..n * ad.inp];
        matmul(
            prec,
            dxa,
            Operand::new(du, n, r),
            Operand::new(a, r, ad.inp),
            Accumulate::Overwrite,
        );
        let p = self.config.dropout;
        if p == 0.0 {
            for (d, v) in dx.iter_mut().zip(dxa.iter()) {
                *d += v;
            }
        } else {
            let inv = 1.0 / (1.0 - p);
            let base = la.first_row * ad.inp;
            for (i, (d, v)) in dx.iter_mut().zip(dxa.iter()).enumerate() {
                if keep(la.seed, k, base + i, p) {
                    *d += v * inv;
                }
            }
        }
    }
}

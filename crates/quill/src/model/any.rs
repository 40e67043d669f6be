//! One type for every supported architecture, so that commands, the trainer and the sampler
//! need not care which one a folder holds.

use super::{Activations, Gpt2, KvCache, Llama, LlamaActivations, LlamaCache, ParamLayout};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The Hugging Face classes quill runs.
pub const SUPPORTED_ARCHITECTURES: [&str; 4] = [
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
];

#[derive(Clone)]
pub enum Model {
    Gpt2(Gpt2),
    Llama(Llama),
}

pub enum Cache {
    Gpt2(KvCache),
    Llama(LlamaCache),
}

pub enum Acts {
    Gpt2(Activations),
    Llama(LlamaActivations),
}

impl Model {
    /// Opens a model folder, choosing the architecture from config.json. With `map` (for
    /// inference only), Llama family weights stay memory-mapped in their stored precision
    /// (see [`crate::io::hf::load_llama`]) and GPT-2's block matrices are transposed for
    /// decoding ([`Gpt2::to_inference_layout`]); without it the model can train.
    pub fn load(dir: &Path, map: bool) -> Result<Model> {
        let config_path = dir.join("config.json");
        if dir.is_dir() && config_path.is_file() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&config_path, format!("not valid JSON: {e}")))?;
            let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
            return match model_type {
                "gpt2" => {
                    let mut m = crate::io::hf::load_gpt2(dir)?;
                    if map {
                        m.to_inference_layout();
                    }
                    Ok(Model::Gpt2(m))
                }
                "llama" | "mistral" | "qwen2" => {
                    Ok(Model::Llama(crate::io::hf::load_llama(dir, map)?))
                }
                _ => {
                    let arch = v
                        .get("architectures")
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "none".into());
                    Err(Error::format(
                        &config_path,
                        format!(
                            "model_type {model_type:?} (architectures {arch}) is not supported; supported: {}",
                            SUPPORTED_ARCHITECTURES.join(", ")
                        ),
                    ))
                }
            };
        }
        // let the GPT-2 loader word the missing-folder / missing-config errors
        Ok(Model::Gpt2(crate::io::hf::load_gpt2(dir)?))
    }

    pub fn architecture(&self) -> &'static str {
        match self {
            Model::Gpt2(_) => "GPT2LMHeadModel",
            Model::Llama(m) => m.config.architecture(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Model::Gpt2(m) => m.config.vocab_size,
            Model::Llama(m) => m.config.vocab_size,
        }
    }

    /// Positions the model can attend over.
    pub fn context(&self) -> usize {
        match self {
            Model::Gpt2(m) => m.config.n_positions,
            Model::Llama(m) => m.config.max_position_embeddings,
        }
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        match self {
            Model::Gpt2(m) => m.config.eos_token_id.into_iter().collect(),
            Model::Llama(m) => m.config.eos_token_ids.clone(),
        }
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            Model::Gpt2(m) => m.config.bos_token_id,
            Model::Llama(m) => m.config.bos_token_id,
        }
    }

    pub fn num_params(&self) -> usize {
        self.layout().total
    }

    pub fn layout(&self) -> &ParamLayout {
        match self {
            Model::Gpt2(m) => &m.layout,
            Model::Llama(m) => &m.layout,
        }
    }

    pub fn params(&self) -> &[f32] {
        match self {
            Model::Gpt2(m) => &m.params,
            Model::Llama(m) => &m.params,
        }
    }

    /// The parameters and their layout, the buffer mutable (for the optimizer).
    pub fn params_mut(&mut self) -> (&ParamLayout, &mut Vec<f32>) {
        match self {
            Model::Gpt2(m) => (&m.layout, &mut m.params),
            Model::Llama(m) => (&m.layout, &mut m.params),
        }
    }

    pub fn init(&mut self, seed: u64) {
        match self {
            Model::Gpt2(m) => m.init(seed),
            Model::Llama(m) => m.init(seed),
        }
    }

    /// Operand precision of the training products: f32, or bf16 operands with f32
    /// accumulation, master weights and everything else (mixed precision).
    pub fn set_precision(&mut self, p: crate::kernels::matmul::Precision) {
        match self {
            Model::Gpt2(m) => m.precision = p,
            Model::Llama(m) => m.precision = p,
        }
    }

    pub fn precision(&self) -> crate::kernels::matmul::Precision {
        match self {
            Model::Gpt2(m) => m.precision,
            Model::Llama(m) => m.precision,
        }
    }

    /// Converts memory-mapped weights into the f32 buffer (for training or saving).
    pub fn materialize(&mut self) {
        if let Model::Llama(m) = self {
            m.materialize();
        }
    }

    /// A short description: architecture, layers, heads, width, parameters.
    pub fn describe(&self) -> String {
        let p = self.num_params() as f64 / 1e6;
        match self {
            Model::Gpt2(m) => {
                let c = &m.config;
                format!(
                    "GPT-2 {} layers, {} heads, width {}, {p:.2}M parameters",
                    c.n_layer, c.n_head, c.n_embd
                )
            }
            Model::Llama(m) => {
                let c = &m.config;
                format!(
                    "{} {} layers, {} heads ({} kv), width {}, {p:.2}M parameters",
                    c.architecture().trim_end_matches("ForCausalLM"),
                    c.num_hidden_layers,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.hidden_size
                )
            }
        }
    }

    pub fn new_acts(&self, b: usize, t: usize) -> Acts {
        match self {
            Model::Gpt2(m) => Acts::Gpt2(Activations::new(&m.config, b, t)),
            Model::Llama(m) => Acts::Llama(LlamaActivations::new(&m.config, b, t)),
        }
    }

    pub fn forward(&self, acts: &mut Acts, ids: &[u32]) -> Result<()> {
        match (self, acts) {
            (Model::Gpt2(m), Acts::Gpt2(a)) => m.forward(a, ids),
            (Model::Llama(m), Acts::Llama(a)) => m.forward(a, ids),
            _ => Err(Error::Input("activations of another architecture".into())),
        }
    }

    pub fn loss(&self, acts: &mut Acts, targets: &[u32]) -> (f64, usize) {
        match (self, acts) {
            (Model::Gpt2(m), Acts::Gpt2(a)) => m.loss(a, targets),
            (Model::Llama(m), Acts::Llama(a)) => m.loss(a, targets),
            _ => panic!("activations of another architecture"),
        }
    }

    pub fn backward(
        &self,
        acts: &mut Acts,
        grads: &mut [f32],
        ids: &[u32],
        targets: &[u32],
        grad_scale: f32,
    ) -> (f64, usize) {
        match (self, acts) {
            (Model::Gpt2(m), Acts::Gpt2(a)) => m.backward(a, grads, ids, targets, grad_scale),
            (Model::Llama(m), Acts::Llama(a)) => m.backward(a, grads, ids, targets, grad_scale),
            _ => panic!("activations of another architecture"),
        }
    }

    /// A KV cache for up to `capacity` positions (at most the context).
    pub fn new_cache(&self, capacity: usize) -> Cache {
        match self {
            Model::Gpt2(m) => Cache::Gpt2(m.new_cache()),
            Model::Llama(m) => Cache::Llama(m.new_cache(capacity)),
        }
    }

    pub fn forward_cached(
        &self,
        cache: &mut Cache,
        ids: &[u32],
        logits: &mut Vec<f32>,
        all_positions: bool,
    ) -> Result<()> {
        match (self, cache) {
            (Model::Gpt2(m), Cache::Gpt2(c)) => m.forward_cached(c, ids, logits, all_positions),
            (Model::Llama(m), Cache::Llama(c)) => m.forward_cached(c, ids, logits, all_positions),
            _ => Err(Error::Input("a cache of another architecture".into())),
        }
    }

    /// The logits [n, V] of every position of one sequence (through the KV cache, so it
    /// also works on memory-mapped weights).
    pub fn logits_all(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.len() > self.context() {
            return Err(Error::Input(format!(
                "{} tokens are more than the model's context of {} positions",
                ids.len(),
                self.context()
            )));
        }
        let mut cache = self.new_cache(ids.len());
        let mut logits = Vec::new();
        self.forward_cached(&mut cache, ids, &mut logits, true)?;
        Ok(logits)
    }

    /// Layers and query heads (for choosing an attention map).
    pub fn layers_heads(&self) -> (usize, usize) {
        match self {
            Model::Gpt2(m) => (m.config.n_layer, m.config.n_head),
            Model::Llama(m) => (m.config.num_hidden_layers, m.config.num_attention_heads),
        }
    }

    /// Attention weights [T, T] of `layer`'s query `head` over the sequence `ids` (row i: how
    /// much position i attends to each position 0..=i).
    pub fn attention_map(&self, ids: &[u32], layer: usize, head: usize) -> Result<Vec<f32>> {
        let (layers, heads) = self.layers_heads();
        if layer >= layers || head >= heads {
            return Err(Error::Input(format!(
                "layer {layer}, head {head}: the model has {layers} layers of {heads} heads"
            )));
        }
        if ids.is_empty() || ids.len() > self.context() {
            return Err(Error::Input(format!(
                "{} tokens: an attention map needs 1 to {} tokens",
                ids.len(),
                self.context()
            )));
        }
        let mut cache = self.new_cache(ids.len());
        match &mut cache {
            Cache::Gpt2(c) => c.capture = Some((layer, head)),
            Cache::Llama(c) => c.capture = Some((layer, head)),
        }
        let mut logits = Vec::new();
        self.forward_cached(&mut cache, ids, &mut logits, false)?;
        Ok(match cache {
            Cache::Gpt2(c) => c.captured,
            Cache::Llama(c) => c.captured,
        })
    }

    /// Writes config.json + model.safetensors (f32) into `dir`, atomically.
    pub fn save(&self, dir: &Path, meta: &BTreeMap<String, String>) -> Result<()> {
        match self {
            Model::Gpt2(m) => crate::io::hf::save_gpt2(dir, m, meta),
            Model::Llama(m) => crate::io::hf::save_llama(dir, m, meta),
        }
    }

    /// Bytes of weights read per decoded token (every matrix once, in its stored precision;
    /// the embedding contributes one row).
    pub fn weight_bytes_per_token(&self) -> usize {
        match self {
            Model::Gpt2(m) => {
                let c = m.config.n_embd;
                let skip = m.config.n_positions * c
                    + if m.lm_head.is_some() {
                        m.config.vocab_size * c
                    } else {
                        0
                    };
                (m.num_params() - skip) * 4
            }
            Model::Llama(m) => m
                .layout
                .tensors
                .iter()
                .map(|t| {
                    if t.view == m.embed && m.lm_head.is_some() {
                        return 0;
                    }
                    t.view.len * m.mat(t.view).elem_bytes()
                })
                .sum(),
        }
    }
}

/// Work buffers of [`Model::forward_batch`], grown to the largest batch seen.
#[derive(Default)]
pub struct BatchScratch {
    gpt2: super::gpt2::Scratch,
    llama: super::llama::Scratch,
}

impl Model {
    /// One new token for each of several sequences, in one pass over the weights
    /// (continuous batching): `ids[i]` continues the sequence of `caches[i]`. Writes
    /// logits [n, V]; every cache grows by one position.
    pub fn forward_batch(
        &self,
        caches: &mut [&mut Cache],
        ids: &[u32],
        logits: &mut Vec<f32>,
        scratch: &mut BatchScratch,
    ) -> Result<()> {
        match self {
            Model::Gpt2(m) => {
                let mut cs: Vec<&mut KvCache> = Vec::with_capacity(caches.len());
                for c in caches.iter_mut() {
                    match c {
                        Cache::Gpt2(k) => cs.push(k),
                        _ => return Err(Error::Input("a cache of another architecture".into())),
                    }
                }
                m.forward_batch(&mut cs, ids, logits, &mut scratch.gpt2)
            }
            Model::Llama(m) => {
                let mut cs: Vec<&mut LlamaCache> = Vec::with_capacity(caches.len());
                for c in caches.iter_mut() {
                    match c {
                        Cache::Llama(k) => cs.push(k),
                        _ => return Err(Error::Input("a cache of another architecture".into())),
                    }
                }
                m.forward_batch(&mut cs, ids, logits, &mut scratch.llama)
            }
        }
    }
}

impl Cache {
    pub fn len(&self) -> usize {
        match self {
            Cache::Gpt2(c) => c.len,
            Cache::Llama(c) => c.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        match self {
            Cache::Gpt2(c) => c.capacity,
            Cache::Llama(c) => c.capacity,
        }
    }

    pub fn clear(&mut self) {
        match self {
            Cache::Gpt2(c) => c.clear(),
            Cache::Llama(c) => c.clear(),
        }
    }
}

impl Acts {
    pub fn logits(&self) -> &[f32] {
        match self {
            Acts::Gpt2(a) => &a.logits,
            Acts::Llama(a) => &a.logits,
        }
    }

    pub fn floats(&self) -> usize {
        match self {
            Acts::Gpt2(a) => a.floats(),
            Acts::Llama(a) => a.floats(),
        }
    }
}

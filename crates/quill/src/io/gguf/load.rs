//! A GGUF file opened as a quill model: the architecture and hyper-parameters from its
//! metadata (`general.architecture` = `llama`, `qwen2` or `gpt2`, and `<arch>.*`), every
//! tensor under its Hugging Face name, the tokenizer stored in the file and its chat
//! template.
//!
//! llama.cpp's converter reorders the rows of each `llama` head's q and k projections from
//! Hugging Face's rotate-half convention to adjacent pairs; they are put back here (as for
//! llama2.c checkpoints). `qwen2` files keep Hugging Face's order.

use super::reader::{Gguf, TensorInfo, ValueType};
use crate::chat::ChatTemplate;
use crate::io::generation::GenerationConfig;
use crate::io::llama2c::pairs_to_halves;
use crate::io::opened::Opened;
use crate::kernels::quant::{x8, QType};
use crate::kernels::rope::{self, RopeScaling};
use crate::model::weight::{MappedDtype, Orient, QBytes, Storage};
use crate::model::{Config, Gpt2Config, LlamaConfig, Model};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Arc;

/// Architectures read from `general.architecture`.
pub const ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "gpt2"];

/// Whether `path` starts with GGUF's magic number.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Opens a GGUF file with its tokenizer, chat template and end-of-text ids.
pub fn open(path: &Path) -> Result<Opened> {
    let g = Gguf::open(path)?;
    let model = load(&g, Weights::InPlace)?;
    let (tok, special) = tokenizer(&g)?;
    if tok.vocab_size() > model.vocab_size() {
        return Err(Error::format(
            path,
            format!(
                "the tokenizer has {} tokens but the model only {}",
                tok.vocab_size(),
                model.vocab_size()
            ),
        ));
    }
    let template = match g.str_opt("tokenizer.chat_template")? {
        Some(src) => Some(
            ChatTemplate::with_special(src, special)
                .map_err(|e| Error::format(path, format!("tokenizer.chat_template: {e}")))?,
        ),
        None => None,
    };
    let mut eos = model.eos_token_ids();
    eos.extend(token_id(&g, "tokenizer.ggml.eot_token_id")?);
    eos.sort_unstable();
    eos.dedup();
    Ok(Opened {
        model,
        tok,
        template,
        gen: GenerationConfig::default(),
        eos,
    })
}

/// How the weight matrices of a GGUF file are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// In place, in the file's type: block-quantized matrices run on the quantized kernels,
    /// f16/bf16/f32 ones on the float kernels (the default).
    InPlace,
    /// Every tensor converted to f32 when the file is opened: the plain twin of the quantized
    /// path, and what training needs.
    Dequantized,
}

/// The model. Norm weights, biases and learned positions are always converted to f32.
pub fn load(g: &Gguf, weights: Weights) -> Result<Model> {
    let config = config(g)?;
    let (permute, heads) = match &config {
        Config::Llama(c) if c.model_type == "llama" => (
            true,
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        ),
        _ => (false, (0, 0, 0)),
    };
    // every parameter must come from the file: a model larger than the file's numbers is a
    // crafted header, refused before anything is allocated for it
    let stored = g
        .tensors()
        .iter()
        .try_fold(0usize, |a, t| a.checked_add(t.elements()));
    let wanted = config.parameter_count();
    match (wanted, stored) {
        (Some(w), Some(s)) if w <= s => {}
        _ => {
            return Err(Error::format(
                &g.path,
                format!(
                    "the metadata describes a model of {} parameters, more than the file's tensors hold",
                    wanted.map_or("too many".into(), |w| w.to_string())
                ),
            ))
        }
    }
    let mut model = Model::new(config)?;
    debug_assert_eq!(Some(model.layout.total), wanted);
    let matrices: Vec<crate::model::View> = {
        let mut v = Vec::new();
        model.for_each_weight(|w| v.push(w.view));
        v
    };
    let mut kept: Vec<(crate::model::View, Storage)> = Vec::new();
    for spec in model.layout.tensors.clone() {
        let name = gguf_name(&spec.name).ok_or_else(|| {
            Error::format(&g.path, format!("no GGUF name for tensor {}", spec.name))
        })?;
        let t = g.tensor(&name).ok_or_else(|| {
            Error::format(
                &g.path,
                format!("missing tensor {name} (quill's {})", spec.name),
            )
        })?;
        // GPT-2's Conv1D matrices are [in, out] in quill (and transformers), [out, in] in GGUF
        let transposed = spec.shape.len() == 2 && is_conv1d(&spec.name);
        let want: Vec<usize> = if transposed {
            vec![spec.shape[1], spec.shape[0]]
        } else {
            spec.shape.clone()
        };
        check_shape(g, t, &want)?;
        let (h, kvh, hd) = heads;
        let qk_heads = match permute {
            true if spec.name.contains("self_attn.q_proj.") => Some(h),
            true if spec.name.contains("self_attn.k_proj.") => Some(kvh),
            _ => None,
        };
        let matrix = weights == Weights::InPlace && matrices.contains(&spec.view);
        if matrix && t.qtype.block() > 1 {
            let bytes = match qk_heads {
                None => QBytes::Map {
                    map: g.map().clone(),
                    range: t.range.clone(),
                },
                Some(heads) => {
                    let row_bytes = t.range.len() / (heads * hd);
                    let rows = pairs_to_halves(g.bytes(t), heads, hd, row_bytes);
                    QBytes::Owned(std::sync::Arc::new(rows))
                }
            };
            let qtype = t.qtype;
            // interleaved by eight rows where the AVX2 products read them so
            let (rows, cols) = (want[0], want.get(1).copied().unwrap_or(1));
            let x8 = want.len() == 2 && rows >= x8::ROWS && x8::wanted(qtype);
            let bytes = match x8 {
                true => QBytes::Owned(Arc::new(x8::pack(qtype, bytes.as_slice(), rows, cols))),
                false => bytes,
            };
            kept.push((spec.view, Storage::Quant { bytes, qtype, x8 }));
            continue;
        }
        let float = match t.qtype {
            QType::F32 => Some(MappedDtype::F32),
            QType::F16 => Some(MappedDtype::F16),
            QType::Bf16 => Some(MappedDtype::Bf16),
            _ => None,
        };
        if let (true, Some(dtype), None) = (matrix, float, qk_heads) {
            let (map, start) = (g.map().clone(), t.range.start);
            if let Some(st) = Storage::mapped(map, start, t.elements(), dtype) {
                kept.push((spec.view, st));
                continue;
            }
        }
        let mut data = g.dequantize(t);
        if let Some(heads) = qk_heads {
            let cols = if spec.shape.len() == 2 {
                spec.shape[1]
            } else {
                1
            };
            data = pairs_to_halves(&data, heads, hd, cols);
        }
        let dst = spec.view.of_mut(&mut model.params);
        if transposed {
            let (rows, cols) = (want[0], want[1]);
            for r in 0..rows {
                for c in 0..cols {
                    dst[c * rows + r] = data[r * cols + c];
                }
            }
        } else {
            dst.copy_from_slice(&data);
        }
    }
    // weights kept in the file are [out, in] whatever the architecture's f32 layout
    model.for_each_weight(|w| {
        if let Some((_, s)) = kept.iter().find(|(v, _)| *v == w.view) {
            w.storage = s.clone();
            w.orient = Orient::OutIn;
        }
    });
    if weights == Weights::InPlace && matches!(model.config, Config::Gpt2(_)) {
        // f32 matrices left in the buffer are turned around for decoding
        model.to_inference_layout();
    }
    Ok(model)
}

/// Whether a tensor is one of GPT-2's Conv1D matrices ([in, out] in quill, [out, in] in GGUF).
pub(super) fn is_conv1d(hf: &str) -> bool {
    ["attn.c_attn.", "attn.c_proj.", "mlp.c_fc.", "mlp.c_proj."]
        .iter()
        .any(|p| hf.contains(p))
        && hf.ends_with(".weight")
}

fn check_shape(g: &Gguf, t: &TensorInfo, want: &[usize]) -> Result<()> {
    // a vector may be stored as [n] or [1, n]
    let shape: Vec<usize> = t.shape().into_iter().skip_while(|&d| d == 1).collect();
    let want_trim: Vec<usize> = want.iter().copied().skip_while(|&d| d == 1).collect();
    if shape != want_trim {
        return Err(Error::format(
            &g.path,
            format!(
                "tensor {} has shape {:?} but the metadata implies {want:?}",
                t.name,
                t.shape()
            ),
        ));
    }
    Ok(())
}

/// The GGUF name of a tensor quill names as `transformers` does.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        ("transformer.wte.weight", "token_embd.weight"),
        ("transformer.wpe.weight", "position_embd.weight"),
        ("transformer.ln_f.weight", "output_norm.weight"),
        ("transformer.ln_f.bias", "output_norm.bias"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf
        .strip_prefix("model.layers.")
        .or_else(|| hf.strip_prefix("transformer.h."))?;
    let (layer, part) = rest.split_once('.')?;
    let (module, kind) = part.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" | "ln_1" => "attn_norm",
        "post_attention_layernorm" | "ln_2" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" | "attn.c_proj" => "attn_output",
        "attn.c_attn" => "attn_qkv",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" | "mlp.c_fc" => "ffn_up",
        "mlp.down_proj" | "mlp.c_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// A token id from the metadata: a u32 (a larger number is an error, not a truncation).
fn token_id(g: &Gguf, key: &str) -> Result<Option<u32>> {
    g.usize_opt(key)?
        .map(|x| {
            u32::try_from(x)
                .map_err(|_| Error::format(&g.path, format!("{key} {x} is not a token id")))
        })
        .transpose()
}

/// The architecture's configuration from the metadata.
fn config(g: &Gguf) -> Result<Config> {
    let arch = g
        .str_opt("general.architecture")?
        .ok_or_else(|| Error::format(&g.path, "metadata general.architecture is missing"))?;
    if !ARCHITECTURES.contains(&arch) {
        return Err(Error::format(
            &g.path,
            format!(
                "architecture {arch:?} is not supported; supported: {}",
                ARCHITECTURES.join(", ")
            ),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let embd = g
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::format(&g.path, "missing tensor token_embd.weight"))?;
    let vocab = *embd.dims.get(1).unwrap_or(&1);
    let width = g.usize(&key("embedding_length"))?;
    let layers = g.usize(&key("block_count"))?;
    // each block has tensors of its own: a count above the file's tensors is a crafted header
    if layers > g.tensors().len() {
        return Err(Error::format(
            &g.path,
            format!(
                "metadata {arch}.block_count is {layers} but the file holds only {} tensors",
                g.tensors().len()
            ),
        ));
    }
    let heads = g.usize(&key("attention.head_count"))?;
    let context = g.usize(&key("context_length"))?;
    let ffn = g.usize(&key("feed_forward_length"))?;
    let tied = g.tensor("output.weight").is_none();
    let bos = token_id(g, "tokenizer.ggml.bos_token_id")?;
    let eos = token_id(g, "tokenizer.ggml.eos_token_id")?;
    if arch == "gpt2" {
        let mut c = Gpt2Config::new(vocab, context, width, layers, heads);
        c.layer_norm_epsilon = g
            .f64_opt(&key("attention.layer_norm_epsilon"))?
            .unwrap_or(1e-5) as f32;
        c.n_inner = Some(ffn);
        c.tie_word_embeddings = tied;
        c.bos_token_id = bos;
        c.eos_token_id = eos;
        return Ok(Config::Gpt2(c));
    }
    let kv_heads = g
        .usize_opt(&key("attention.head_count_kv"))?
        .unwrap_or(heads);
    let mut c = LlamaConfig::new(vocab, context, width, layers, heads, kv_heads);
    c.model_type = arch.into();
    c.intermediate_size = ffn;
    c.head_dim = match g.usize_opt(&key("attention.key_length"))? {
        Some(d) => d,
        None => width / heads.max(1),
    };
    if let Some(rot) = g.usize_opt(&key("rope.dimension_count"))? {
        if rot != c.head_dim {
            return Err(Error::format(
                &g.path,
                format!(
                    "rotary embedding over {rot} of {} head dimensions is not supported",
                    c.head_dim
                ),
            ));
        }
    }
    c.rms_norm_eps = g
        .f64_opt(&key("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-5) as f32;
    c.rope_theta = g.f64_opt(&key("rope.freq_base"))?.unwrap_or(10000.0);
    c.rope_scaling = match g.str_opt(&key("rope.scaling.type"))? {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: g.f64_opt(&key("rope.scaling.factor"))?.unwrap_or(1.0),
        },
        Some(other) => {
            return Err(Error::format(
                &g.path,
                format!("RoPE scaling {other:?} is not supported (none, linear)"),
            ))
        }
    };
    if let Some(t) = g.tensor("rope_freqs.weight") {
        // Llama 3's scaling, as llama.cpp stores it: a divisor per frequency
        if t.elements() != c.head_dim / 2 || c.rope_scaling != RopeScaling::None {
            return Err(Error::format(
                &g.path,
                format!(
                    "rope_freqs.weight has {} numbers for heads of {} (and must not be combined with rope.scaling.type)",
                    t.elements(),
                    c.head_dim
                ),
            ));
        }
        let factors = g.dequantize(t);
        c.rope_scaling = rope::llama3_from_factors(c.head_dim, c.rope_theta, &factors)
            .ok_or_else(|| {
                Error::format(
                    &g.path,
                    "rope_freqs.weight does not follow Llama 3's frequency scaling (the only per-frequency scaling supported)",
                )
            })?;
    }
    c.tie_word_embeddings = tied;
    c.qkv_bias = g.tensor("blk.0.attn_q.bias").is_some();
    c.o_bias = g.tensor("blk.0.attn_output.bias").is_some();
    c.bos_token_id = bos;
    c.eos_token_ids = eos.into_iter().collect();
    Ok(Config::Llama(c))
}

/// The pre-tokenizer of a byte-level BPE vocabulary, from `tokenizer.ggml.pre` (how the
/// text was split into words when its merges were learned).
fn pre_tokenizer(pre: &str) -> Option<Value> {
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false)]})
    };
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // digits one by one, then GPT-2's words (SmolLM's tokenizer.json)
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3" => split(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2),
        _ => return None,
    })
}

/// The `tokenizer.ggml.pre` name of a tokenizer.json pre-tokenizer: the name whose
/// pre-tokenizer splits text the same way (offset trimming aside).
pub fn pre_tokenizer_name(v: &Value) -> Option<&'static str> {
    fn canonical(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| k.as_str() != "trim_offsets")
                    .map(|(k, x)| (k.clone(), canonical(x)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
            other => other.clone(),
        }
    }
    let want = canonical(v);
    ["default", "smollm", "llama-bpe", "qwen2"]
        .into_iter()
        .find(|name| pre_tokenizer(name).map(|p| canonical(&p)) == Some(want.clone()))
}

/// Token types llama.cpp stores in `tokenizer.ggml.token_type`.
const CONTROL: f64 = 3.0;
const USER_DEFINED: f64 = 4.0;

/// The tokenizer stored in the file, and the special-token strings for the chat template.
pub fn tokenizer(g: &Gguf) -> Result<(Tokenizer, Map<String, Value>)> {
    let model = g.str_opt("tokenizer.ggml.model")?.ok_or_else(|| {
        Error::format(
            &g.path,
            "the file holds no tokenizer (tokenizer.ggml.model)",
        )
    })?;
    if model != "gpt2" && model != "llama" {
        return Err(Error::format(
            &g.path,
            format!(
                "tokenizer.ggml.model {model:?} is not supported (gpt2: byte-level BPE; llama: SentencePiece)"
            ),
        ));
    }
    let tokens_arr = g
        .array_opt("tokenizer.ggml.tokens", ValueType::String)?
        .ok_or_else(|| Error::format(&g.path, "metadata tokenizer.ggml.tokens is missing"))?;
    let tokens: Vec<&str> = g.strings(tokens_arr).collect();
    let types = per_token(g, "tokenizer.ggml.token_type", tokens.len(), 1.0)?;
    let spm = model == "llama";
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (&t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if spm {
            // as transformers builds it: a repeated piece keeps its last id
            vocab.insert(t.to_string(), json!(id));
        } else {
            vocab.entry(t.to_string()).or_insert(json!(id));
        }
        if ty == CONTROL || ty == USER_DEFINED {
            added.push(
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == CONTROL}),
            );
        }
    }
    let token_at = |key: &str| -> Result<Option<String>> {
        Ok(g.usize_opt(key)?
            .and_then(|i| tokens.get(i))
            .map(|s| s.to_string()))
    };
    let bos = token_at("tokenizer.ggml.bos_token_id")?;
    // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    let add_bos = g.bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(spm);
    let post = match (&bos, add_bos) {
        (Some(b), true) => {
            let id = g.usize("tokenizer.ggml.bos_token_id")?;
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b.as_str(): {"id": b, "ids": [id], "tokens": [b]}}})
        }
        _ => Value::Null,
    };
    let json = if spm {
        let scores = per_token(g, "tokenizer.ggml.scores", tokens.len(), 0.0)?;
        let unk = token_at("tokenizer.ggml.unknown_token_id")?.unwrap_or("<unk>".into());
        let prefix = g
            .bool_opt("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true);
        sentencepiece_json(
            &tokens,
            &scores,
            vocab,
            SpmParts {
                added,
                post,
                unk,
                prefix,
            },
        )
    } else {
        let merges: Vec<&str> = match g.array_opt("tokenizer.ggml.merges", ValueType::String)? {
            Some(a) => g.strings(a).collect(),
            None => Vec::new(),
        };
        let pre_name = g.str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
        let pre = pre_tokenizer(pre_name).ok_or_else(|| {
            Error::format(
                &g.path,
                format!("tokenizer.ggml.pre {pre_name:?} is not supported (default, gpt2, smollm, llama-bpe, qwen2, …)"),
            )
        })?;
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": null, "pre_tokenizer": pre,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        })
    };
    let tok = Tokenizer::from_json_str(&json.to_string(), &g.path)?;
    let mut special = Map::new();
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(t) = token_at(key)? {
            special.insert(name.into(), Value::String(t));
        }
    }
    Ok((tok, special))
}

/// A numeric array with one entry per token (`default` for each when the file has none); an
/// error when its length is not the vocabulary's.
fn per_token(g: &Gguf, key: &str, tokens: usize, default: f64) -> Result<Vec<f64>> {
    let v = match g.get(key) {
        Some(crate::io::gguf::Value::Array(a)) => g.numbers(a)?,
        _ => vec![default; tokens],
    };
    if v.len() != tokens {
        return Err(Error::format(
            &g.path,
            format!("{key} has {} entries for {tokens} tokens", v.len()),
        ));
    }
    Ok(v)
}

/// What a SentencePiece tokenizer.json takes besides its vocabulary.
struct SpmParts {
    added: Vec<Value>,
    post: Value,
    unk: String,
    /// Whether a "▁" is put before the text (`tokenizer.ggml.add_space_prefix`).
    prefix: bool,
}

/// A SentencePiece (BPE with scores) vocabulary as a `tokenizers` BPE: the merges recovered
/// from the scores as transformers recovers them (every split of a piece into two pieces of
/// the vocabulary, best merged score first), spaces as "▁", unknown bytes as <0xNN> tokens.
/// (SentencePiece's own encoder merges the best-scoring pair first, which these ranks give.)
fn sentencepiece_json(
    tokens: &[&str],
    scores: &[f64],
    vocab: Map<String, Value>,
    p: SpmParts,
) -> Value {
    let id = |t: &str| vocab.get(t).and_then(Value::as_u64);
    // (left, right, score of the merged piece), per piece in the file's order, each piece's
    // splits ordered by the ids of their halves
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    let mut last_score: std::collections::HashMap<&str, f64> = std::collections::HashMap::new();
    for (&t, &sc) in tokens.iter().zip(scores) {
        last_score.insert(t, sc);
    }
    let mut seen = std::collections::HashSet::new();
    for &t in tokens {
        if !seen.insert(t) {
            continue;
        }
        let score = last_score[t];
        let mut local: Vec<(&str, &str, f64)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&t[..i], &t[i..]))
            .filter(|(l, r)| id(l).is_some() && id(r).is_some())
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (id(l), id(r)));
        merges.extend(local);
    }
    // best score first; among equal scores longer left, then longer right pieces first
    // (a stable sort, as Python's sorted(reverse=True))
    merges.sort_by(|a, b| {
        (b.2, b.0.chars().count(), b.1.chars().count())
            .partial_cmp(&(a.2, a.0.chars().count(), a.1.chars().count()))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let merges: Vec<Value> = merges.iter().map(|(l, r, _)| json!([l, r])).collect();
    // spaces become "▁", and one is put first unless the text starts with a space
    // (transformers' Llama tokenizer: Metaspace, prepend_scheme "first")
    let scheme = if p.prefix { "first" } else { "never" };
    let pre = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": scheme, "split": false});
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if p.prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": p.added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": p.post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": p.unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    })
}

//! `quill quantize`: any model quill opens (a Hugging Face folder, a GGUF file, a llama2.c
//! checkpoint) written as a GGUF file of a chosen type, laid out as llama.cpp's converter lays
//! it out: its tensor names, matrices as [out, in], the q/k rows of `llama` heads in adjacent
//! rotary pairs, the architecture's hyper-parameters under `<arch>.*`, and the tokenizer and
//! chat template under `tokenizer.*`.
//!
//! From a GGUF file, every metadata value is copied as it is (only the file type changes) and
//! each tensor is dequantized and quantized again.
//!
//! Which type each tensor gets follows llama.cpp's choices for its file types: vectors
//! (norms, biases) stay f32; the output matrix (or a tied embedding) takes Q6_K in the
//! 4- and 5-bit files; Q4_K_M gives Q6_K to the value and down projections of the first and
//! last eighth of the layers and of every third layer between; a matrix whose rows are not
//! whole blocks of its type falls back (Q4_K → Q5_0, Q6_K → Q8_0, 32-number types → F16).

use super::load::{gguf_name, is_conv1d, is_gguf, load, Weights};
use super::reader::Gguf;
use super::write::{write, Meta, Metadata, TensorOut};
use crate::chat::ChatTemplate;
use crate::io::llama2c::halves_to_pairs;
use crate::kernels::quant::quantize::quantize;
use crate::kernels::quant::QType;
use crate::kernels::rope::{self, RopeScaling};
use crate::model::{Config, Model};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use rayon::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The file types `quill quantize --type` writes (llama.cpp's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4KM,
    Q6K,
}

impl FileType {
    pub const ALL: [FileType; 10] = [
        FileType::F32,
        FileType::F16,
        FileType::Bf16,
        FileType::Q8_0,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q4KM,
        FileType::Q6K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::Bf16 => "bf16",
            FileType::Q8_0 => "q8_0",
            FileType::Q4_0 => "q4_0",
            FileType::Q4_1 => "q4_1",
            FileType::Q5_0 => "q5_0",
            FileType::Q5_1 => "q5_1",
            FileType::Q4KM => "q4_k_m",
            FileType::Q6K => "q6_k",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        FileType::ALL
            .into_iter()
            .find(|t| t.name() == lower)
            .ok_or_else(|| {
                let names: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
                Error::Input(format!(
                    "--type {s:?} is not a type quill writes; one of: {}",
                    names.join(", ")
                ))
            })
    }

    /// llama.cpp's number for the file type (`general.file_type`).
    fn llama_ftype(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4KM => 15,
            FileType::Q6K => 18,
            FileType::Bf16 => 32,
        }
    }

    /// The type of most matrices.
    fn base(self) -> QType {
        match self {
            FileType::F32 => QType::F32,
            FileType::F16 => QType::F16,
            FileType::Bf16 => QType::Bf16,
            FileType::Q8_0 => QType::Q8_0,
            FileType::Q4_0 => QType::Q4_0,
            FileType::Q4_1 => QType::Q4_1,
            FileType::Q5_0 => QType::Q5_0,
            FileType::Q5_1 => QType::Q5_1,
            FileType::Q4KM => QType::Q4K,
            FileType::Q6K => QType::Q6K,
        }
    }
}

/// Where a tensor sits, for choosing its type.
struct Place<'a> {
    name: &'a str,
    /// Numbers per row (the innermost dimension); 0 for a vector.
    cols: usize,
    layers: usize,
    /// Whether this is the output matrix (or the embedding that stands in for it).
    output: bool,
}

/// Layers llama.cpp gives more bits in its _M types: the first and last eighth, and every
/// third layer between.
fn more_bits(layer: usize, layers: usize) -> bool {
    // (the last test runs only when layer ≥ layers / 8)
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

fn tensor_type(ft: FileType, p: &Place) -> QType {
    if p.cols == 0 {
        return QType::F32;
    }
    let layer = p
        .name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<usize>().ok());
    let quantized = !matches!(ft, FileType::F32 | FileType::F16 | FileType::Bf16);
    let mut t = ft.base();
    if quantized && p.output && ft != FileType::Q8_0 {
        t = QType::Q6K;
    } else if ft == FileType::Q4KM {
        let wide = p.name.ends_with("attn_v.weight") || p.name.ends_with("ffn_down.weight");
        if wide && layer.is_some_and(|l| more_bits(l, p.layers)) {
            t = QType::Q6K;
        }
    }
    // rows that are not whole blocks take the next type that fits
    if !p.cols.is_multiple_of(t.block()) {
        t = match t {
            QType::Q4K => QType::Q5_0,
            QType::Q6K => QType::Q8_0,
            other => other,
        };
    }
    if !p.cols.is_multiple_of(t.block()) {
        t = QType::F16;
    }
    t
}

/// What was written: tensors per type, and the file's size.
#[derive(Debug, Default)]
pub struct Written {
    pub types: BTreeMap<&'static str, usize>,
    pub bytes: u64,
    pub parameters: usize,
}

/// Writes the model at `model` (with `tokenizer` for a llama2.c checkpoint) to `out` as a GGUF
/// file of type `ft`.
pub fn export(model: &Path, tokenizer: Option<&Path>, ft: FileType, out: &Path) -> Result<Written> {
    let (m, mut meta) = if !model.is_dir() && is_gguf(model) {
        if tokenizer.is_some() {
            return Err(Error::Input(format!(
                "{}: a GGUF file brings its own tokenizer; drop --tokenizer",
                model.display()
            )));
        }
        let g = Gguf::open(model)?;
        let m = load(&g, Weights::Dequantized)?;
        let meta: Metadata = g
            .metadata()
            .iter()
            .filter(|(k, _)| k != "general.file_type" && k != "general.quantization_version")
            .map(|(k, v)| (k.clone(), Meta::copy(&g, v)))
            .collect();
        (m, meta)
    } else {
        let opened = crate::io::open(model, tokenizer)?;
        let m = if model.is_dir() {
            crate::io::hf::load(model, false)?
        } else {
            opened.model
        };
        let name = model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let mut meta = vec![("general.name".to_string(), Meta::Str(name))];
        meta.extend(architecture_meta(&m.config)?);
        meta.extend(tokenizer_meta(&opened.tok, &m, opened.template.as_ref())?);
        if let Some(t) = &opened.template {
            meta.push((
                "tokenizer.chat_template".into(),
                Meta::Str(t.source().into()),
            ));
        }
        (m, meta)
    };
    meta.push(("general.file_type".into(), Meta::U32(ft.llama_ftype())));
    meta.push(("general.quantization_version".into(), Meta::U32(2)));
    // general.architecture first, as llama.cpp writes it
    if let Some(i) = meta.iter().position(|(k, _)| k == "general.architecture") {
        let a = meta.remove(i);
        meta.insert(0, a);
    }
    write_tensors(&m, ft, &meta, out)
}

/// `general.architecture` and `<arch>.*` for a configuration.
fn architecture_meta(config: &Config) -> Result<Metadata> {
    let mut m: Metadata = Vec::new();
    let mut put = |arch: &str, k: &str, v: Meta| {
        let key = if k == "general.architecture" {
            k.to_string()
        } else {
            format!("{arch}.{k}")
        };
        m.push((key, v));
    };
    let u = |x: usize| -> Result<Meta> {
        u32::try_from(x)
            .map(Meta::U32)
            .map_err(|_| Error::Input(format!("{x} does not fit GGUF's 32-bit field")))
    };
    match config {
        Config::Gpt2(c) => {
            let tanh = ["gelu_new", "gelu_pytorch_tanh", "gelu_fast"];
            if !tanh.contains(&c.activation_function.as_str())
                || !c.scale_attn_weights
                || c.scale_attn_by_inverse_layer_idx
            {
                return Err(Error::Input(format!(
                    "a GPT-2 with activation {:?}{} cannot be described in GGUF's gpt2 metadata",
                    c.activation_function,
                    if c.scale_attn_by_inverse_layer_idx || !c.scale_attn_weights {
                        " and non-standard attention scaling"
                    } else {
                        ""
                    }
                )));
            }
            let a = "gpt2";
            put(a, "general.architecture", Meta::Str(a.into()));
            put(a, "context_length", u(c.n_positions)?);
            put(a, "embedding_length", u(c.n_embd)?);
            put(a, "block_count", u(c.n_layer)?);
            put(a, "feed_forward_length", u(c.mlp_dim())?);
            put(a, "attention.head_count", u(c.n_head)?);
            put(
                a,
                "attention.layer_norm_epsilon",
                Meta::F32(c.layer_norm_epsilon),
            );
        }
        Config::Llama(c) => {
            if c.sliding_window.iter().any(Option::is_some) {
                return Err(Error::Input(
                    "sliding-window attention has no place in GGUF's llama/qwen2 metadata; this model cannot be written as GGUF"
                        .into(),
                ));
            }
            let a = if c.model_type == "qwen2" {
                "qwen2"
            } else {
                "llama"
            };
            put(a, "general.architecture", Meta::Str(a.into()));
            put(a, "context_length", u(c.max_position_embeddings)?);
            put(a, "embedding_length", u(c.hidden_size)?);
            put(a, "block_count", u(c.num_hidden_layers)?);
            put(a, "feed_forward_length", u(c.intermediate_size)?);
            put(a, "attention.head_count", u(c.num_attention_heads)?);
            put(a, "attention.head_count_kv", u(c.num_key_value_heads)?);
            if c.head_dim * c.num_attention_heads != c.hidden_size {
                put(a, "attention.key_length", u(c.head_dim)?);
                put(a, "attention.value_length", u(c.head_dim)?);
            }
            put(a, "rope.dimension_count", u(c.head_dim)?);
            put(a, "rope.freq_base", Meta::F32(c.rope_theta as f32));
            put(
                a,
                "attention.layer_norm_rms_epsilon",
                Meta::F32(c.rms_norm_eps),
            );
            match c.rope_scaling {
                RopeScaling::None => {}
                RopeScaling::Linear { factor } => {
                    put(a, "rope.scaling.type", Meta::Str("linear".into()));
                    put(a, "rope.scaling.factor", Meta::F32(factor as f32));
                }
                // a divisor per frequency in the tensor rope_freqs.weight, as llama.cpp keeps it
                RopeScaling::Llama3 { .. } => {}
            }
        }
    }
    Ok(m)
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// GPT-2's printable spelling of byte `b` in byte-level vocabularies.
fn byte_symbol(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("in range")
}

/// `tokenizer.*` for a tokenizer: the vocabulary with its token types, merges (byte-level BPE)
/// or scores (SentencePiece), the pre-tokenizer's name and the special ids.
fn tokenizer_meta(
    tok: &Tokenizer,
    model: &Model,
    template: Option<&ChatTemplate>,
) -> Result<Metadata> {
    let mut m: Metadata = Vec::new();
    let mut bos = model.bos_token_id();
    let mut eos = model.eos_token_ids().first().copied();
    let mut add_bos = false;
    match tok {
        Tokenizer::Char(c) => {
            if let Some(ch) = c.chars().iter().find(|ch| !ch.is_ascii()) {
                return Err(Error::Input(format!(
                    "a character-level vocabulary with {ch:?} (not ASCII) has no GGUF form; GGUF's byte-level vocabularies spell each byte"
                )));
            }
            let tokens = c
                .chars()
                .iter()
                .map(|&ch| byte_symbol(ch as u8).to_string())
                .collect::<Vec<_>>();
            m.push(("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())));
            m.push(("tokenizer.ggml.pre".into(), Meta::Str("default".into())));
            m.push((
                "tokenizer.ggml.token_type".into(),
                Meta::I32s(vec![NORMAL; tokens.len()]),
            ));
            m.push(("tokenizer.ggml.tokens".into(), Meta::Strs(tokens)));
            m.push(("tokenizer.ggml.merges".into(), Meta::Strs(vec![])));
        }
        Tokenizer::Llama2c(t) => {
            let (mut tokens, mut scores, mut types) = (Vec::new(), Vec::new(), Vec::new());
            for (id, (piece, score)) in t.pieces().enumerate() {
                let s = String::from_utf8(piece.to_vec()).map_err(|_| {
                    Error::Input(format!(
                        "tokenizer piece {id} is not UTF-8; it has no GGUF form"
                    ))
                })?;
                // llama2.c's export spelled SentencePiece's "▁" as a space and wrapped the
                // control pieces in newlines; GGUF keeps SentencePiece's own spelling
                let s = match id {
                    1 => "<s>".to_string(),
                    2 => "</s>".to_string(),
                    _ => s.replace(' ', "\u{2581}"),
                };
                types.push(match id {
                    0 => UNKNOWN,
                    1 | 2 => CONTROL,
                    _ if s.len() == 6 && s.starts_with("<0x") && s.ends_with('>') => BYTE,
                    _ => NORMAL,
                });
                tokens.push(s);
                scores.push(score);
            }
            m.push(("tokenizer.ggml.model".into(), Meta::Str("llama".into())));
            m.push(("tokenizer.ggml.tokens".into(), Meta::Strs(tokens)));
            m.push(("tokenizer.ggml.scores".into(), Meta::F32s(scores)));
            m.push(("tokenizer.ggml.token_type".into(), Meta::I32s(types)));
            m.push(("tokenizer.ggml.unknown_token_id".into(), Meta::U32(0)));
            bos = Some(crate::tokenizer::llama2c::BOS);
            eos = Some(crate::tokenizer::llama2c::EOS);
            add_bos = true;
        }
        Tokenizer::Hf(_) => {
            let json: Value = serde_json::from_str(&tok.to_json()?)
                .map_err(|e| Error::Input(format!("tokenizer.json: {e}")))?;
            let (entries, first) = hf_tokenizer_meta(&json, tok.vocab_size())?;
            m.extend(entries);
            if let Some(b) = first {
                bos = Some(b);
                add_bos = true;
            }
        }
    }
    let special = |key: &str| {
        template
            .and_then(|t| t.special_token(key))
            .and_then(|s| tok.token_to_id(s))
    };
    bos = bos.or_else(|| special("bos_token"));
    eos = eos.or_else(|| special("eos_token"));
    if let Some(b) = bos {
        m.push(("tokenizer.ggml.bos_token_id".into(), Meta::U32(b)));
    }
    if let Some(e) = eos {
        m.push(("tokenizer.ggml.eos_token_id".into(), Meta::U32(e)));
    }
    if let Some(p) = special("pad_token") {
        m.push(("tokenizer.ggml.padding_token_id".into(), Meta::U32(p)));
    }
    m.push(("tokenizer.ggml.add_bos_token".into(), Meta::Bool(add_bos)));
    Ok(m)
}

/// A Hugging Face BPE tokenizer.json as GGUF metadata, and the id of a BOS token its
/// post-processor puts first (if it does).
fn hf_tokenizer_meta(json: &Value, vocab_size: usize) -> Result<(Metadata, Option<u32>)> {
    let model = &json["model"];
    let kind = model["type"].as_str().unwrap_or("?");
    if kind != "BPE" {
        return Err(Error::Input(format!(
            "a {kind} tokenizer.json has no GGUF form (byte-level BPE and SentencePiece BPE do)"
        )));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![NORMAL; vocab_size];
    let mut place = |id: u64, t: &str, ty: i32| {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(t.to_string());
            types[id as usize] = ty;
        }
    };
    if let Some(v) = model["vocab"].as_object() {
        for (t, id) in v {
            if let Some(id) = id.as_u64() {
                place(id, t, NORMAL);
            }
        }
    }
    for a in json["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) {
            let special = a["special"].as_bool().unwrap_or(false);
            place(id, t, if special { CONTROL } else { USER_DEFINED });
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| match x {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();
    // the post-processor's leading special token is the BOS it adds
    let first = json["post_processor"]["single"]
        .as_array()
        .and_then(|s| s.first())
        .and_then(|x| x["SpecialToken"]["id"].as_str())
        .and_then(|t| {
            json["post_processor"]["special_tokens"][t]["ids"]
                .as_array()
                .and_then(|ids| ids.first())
                .and_then(Value::as_u64)
        })
        .map(|x| x as u32);
    let mut m: Metadata = Vec::new();
    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    if byte_fallback {
        // SentencePiece as BPE: scores that give the merges back in their order (each piece's
        // score is minus the rank of the first merge that makes it)
        let mut scores = vec![-1e9f32; vocab_size];
        let index: std::collections::HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        for (rank, mg) in merges.iter().enumerate() {
            let joined: String = mg.split(' ').collect();
            if let Some(&i) = index.get(joined.as_str()) {
                if scores[i] == -1e9 {
                    scores[i] = -(rank as f32);
                }
            }
        }
        for (i, t) in tokens.iter().enumerate() {
            if types[i] == NORMAL && t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                types[i] = BYTE;
            }
        }
        if let Some(unk) = model["unk_token"].as_str().and_then(|u| index.get(u)) {
            types[*unk] = UNKNOWN;
            m.push((
                "tokenizer.ggml.unknown_token_id".into(),
                Meta::U32(*unk as u32),
            ));
        }
        let prefix = !matches!(
            json["pre_tokenizer"]["prepend_scheme"].as_str(),
            Some("never")
        );
        m.push(("tokenizer.ggml.model".into(), Meta::Str("llama".into())));
        m.push(("tokenizer.ggml.add_space_prefix".into(), Meta::Bool(prefix)));
        m.push(("tokenizer.ggml.scores".into(), Meta::F32s(scores)));
    } else {
        let pre = super::load::pre_tokenizer_name(&json["pre_tokenizer"]).ok_or_else(|| {
            Error::Input(format!(
                "the tokenizer's pre-tokenizer has no GGUF name quill knows: {}",
                json["pre_tokenizer"]
            ))
        })?;
        m.push(("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())));
        m.push(("tokenizer.ggml.pre".into(), Meta::Str(pre.into())));
        m.push(("tokenizer.ggml.merges".into(), Meta::Strs(merges)));
    }
    m.push(("tokenizer.ggml.tokens".into(), Meta::Strs(tokens)));
    m.push(("tokenizer.ggml.token_type".into(), Meta::I32s(types)));
    Ok((m, first))
}

/// Every parameter under its GGUF name, in its GGUF layout, quantized and written.
fn write_tensors(m: &Model, ft: FileType, meta: &[(String, Meta)], out: &Path) -> Result<Written> {
    let (permute, heads, hd, layers) = match &m.config {
        Config::Llama(c) => (
            c.model_type != "qwen2",
            (c.num_attention_heads, c.num_key_value_heads),
            c.head_dim,
            c.num_hidden_layers,
        ),
        Config::Gpt2(c) => (false, (0, 0), 0, c.n_layer),
    };
    let has_output = m.layout.tensors.iter().any(|t| t.name == "lm_head.weight");
    let mut outs = Vec::new();
    let mut specs = Vec::new();
    for spec in &m.layout.tensors {
        let name = gguf_name(&spec.name)
            .ok_or_else(|| Error::Input(format!("no GGUF name for tensor {}", spec.name)))?;
        let conv1d = spec.shape.len() == 2 && is_conv1d(&spec.name);
        // [rows, cols] as GGUF stores it
        let (rows, cols) = match (spec.shape.len(), conv1d) {
            (2, false) => (spec.shape[0], spec.shape[1]),
            (2, true) => (spec.shape[1], spec.shape[0]),
            _ => (1, spec.shape.iter().product()),
        };
        let output = name == "output.weight" || (!has_output && name == "token_embd.weight");
        let place = Place {
            name: &name,
            cols: if spec.shape.len() == 2 { cols } else { 0 },
            layers,
            output,
        };
        let qtype = tensor_type(ft, &place);
        let dims = if spec.shape.len() == 2 {
            vec![cols, rows]
        } else {
            vec![cols]
        };
        let qk = match permute {
            true if spec.name.contains("self_attn.q_proj.") => Some(heads.0),
            true if spec.name.contains("self_attn.k_proj.") => Some(heads.1),
            _ => None,
        };
        specs.push((spec.view, conv1d, rows, cols, qk));
        outs.push(TensorOut { name, dims, qtype });
    }
    // Llama 3's RoPE scaling travels as a tensor of per-frequency divisors
    let mut extra: Vec<Vec<f32>> = Vec::new();
    if let Config::Llama(c) = &m.config {
        if matches!(c.rope_scaling, RopeScaling::Llama3 { .. }) {
            let f = rope::frequency_factors(c.head_dim, c.rope_theta, &c.rope_scaling);
            outs.push(TensorOut {
                name: "rope_freqs.weight".into(),
                dims: vec![f.len()],
                qtype: QType::F32,
            });
            extra.push(f);
        }
    }
    let mut written = Written::default();
    for t in &outs {
        *written.types.entry(t.qtype.name()).or_default() += 1;
    }
    write(out, meta, &outs, |i, buf| {
        let Some(&(view, conv1d, rows, cols, qk)) = specs.get(i) else {
            let f = &extra[i - specs.len()];
            quantize(QType::F32, f, buf);
            return Ok(());
        };
        let src = view.of(&m.params);
        if let Some(bad) = src.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!(
                "tensor {} holds a non-finite number ({}) at {bad}; refusing to write it",
                outs[i].name, src[bad]
            )));
        }
        let mut data: Vec<f32> = if conv1d {
            let mut d = vec![0f32; src.len()];
            // quill's [in, out] → GGUF's [out, in]
            for r in 0..rows {
                for c in 0..cols {
                    d[r * cols + c] = src[c * rows + r];
                }
            }
            d
        } else {
            src.to_vec()
        };
        if let Some(h) = qk {
            data = halves_to_pairs(&data, h, hd, cols);
        }
        let qtype = outs[i].qtype;
        let parts: Vec<Vec<u8>> = data
            .par_chunks(cols.max(1) * 16)
            .map(|rows| {
                let mut b = Vec::new();
                quantize(qtype, rows, &mut b);
                b
            })
            .collect();
        parts.iter().for_each(|p| buf.extend_from_slice(p));
        written.parameters += data.len();
        Ok(())
    })?;
    written.bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_follow_llama_cpps_choices() {
        let p = |name, cols, output| Place {
            name,
            cols,
            layers: 16,
            output,
        };
        let t = |ft, pl: Place| tensor_type(ft, &pl);
        assert_eq!(
            t(FileType::Q4KM, p("blk.0.attn_norm.weight", 0, false)),
            QType::F32
        );
        assert_eq!(
            t(FileType::Q4KM, p("blk.5.attn_q.weight", 512, false)),
            QType::Q4K
        );
        assert_eq!(
            t(FileType::Q4KM, p("blk.0.attn_v.weight", 512, false)),
            QType::Q6K
        );
        assert_eq!(
            t(FileType::Q4KM, p("blk.4.attn_v.weight", 512, false)),
            QType::Q6K
        );
        assert_eq!(
            t(FileType::Q4KM, p("blk.5.ffn_down.weight", 512, false)),
            QType::Q4K
        );
        assert_eq!(
            t(FileType::Q4KM, p("blk.15.ffn_down.weight", 512, false)),
            QType::Q6K
        );
        assert_eq!(t(FileType::Q4KM, p("output.weight", 512, true)), QType::Q6K);
        // rows that are not whole super-blocks
        assert_eq!(
            t(FileType::Q4KM, p("blk.5.attn_q.weight", 576, false)),
            QType::Q5_0
        );
        assert_eq!(
            t(FileType::Q6K, p("blk.5.attn_q.weight", 576, false)),
            QType::Q8_0
        );
        assert_eq!(
            t(FileType::Q4_0, p("token_embd.weight", 576, true)),
            QType::Q8_0
        );
        assert_eq!(
            t(FileType::Q4_0, p("token_embd.weight", 576, false)),
            QType::Q4_0
        );
        assert_eq!(
            t(FileType::Q8_0, p("output.weight", 512, true)),
            QType::Q8_0
        );
        assert_eq!(
            t(FileType::Q8_0, p("blk.0.ffn_up.weight", 48, false)),
            QType::F16
        );
        assert_eq!(t(FileType::F16, p("output.weight", 48, true)), QType::F16);
        assert!(FileType::parse("Q4_K_M").is_ok() && FileType::parse("q3_k").is_err());
    }

    #[test]
    fn byte_symbols_are_gpt2s() {
        assert_eq!(byte_symbol(b'a'), 'a');
        assert_eq!(byte_symbol(b' '), 'Ġ');
        assert_eq!(byte_symbol(b'\n'), 'Ċ');
        assert_eq!(byte_symbol(0), 'Ā');
    }
}

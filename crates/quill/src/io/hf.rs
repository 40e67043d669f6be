//! Hugging Face model folders: `config.json` + `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), under HF's weight names.

pub use super::generation::GenerationConfig;
use super::opened::Opened;
use super::safetensors::{write_f32, SafetensorsFile};
use crate::model::weight::{MappedDtype, Orient, Storage};
use crate::model::{Config, Gpt2Config, LlamaConfig, Model, View, SUPPORTED_ARCHITECTURES};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The weight files of a folder, and which file holds each tensor.
pub struct Weights {
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
}

impl Weights {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index_path, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index_path, "no weight_map object"))?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(String::from))
                .collect();
            shards.sort();
            shards.dedup();
            shards
                .iter()
                .map(|s| super::paths::file_inside(dir, s, "model.safetensors.index.json"))
                .collect::<Result<Vec<_>>>()?
        } else if dir.join("pytorch_model.bin").exists() {
            return Err(Error::Input(format!(
                "{}: only safetensors weights are supported (found pytorch_model.bin)",
                dir.display()
            )));
        } else {
            return Err(Error::Input(format!(
                "{}: no model.safetensors in this folder",
                dir.display()
            )));
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for p in paths {
            let f = SafetensorsFile::open(&p)?;
            for name in f.names()? {
                index.insert(name, files.len());
            }
            files.push(f);
        }
        Ok(Weights { files, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn read_into(&self, name: &str, shape: &[usize], dst: &mut [f32]) -> Result<()> {
        let f = &self.files[self.index[name]];
        f.read_into(name, shape, dst)
    }

    /// The file holding tensor `name`.
    pub fn file(&self, name: &str) -> Option<&SafetensorsFile> {
        self.index.get(name).map(|&i| &self.files[i])
    }

    /// The file holding tensor `name`, its stored dtype and its bytes.
    fn raw(&self, name: &str) -> Result<(&SafetensorsFile, ::safetensors::Dtype, &[u8])> {
        let file = self
            .file(name)
            .ok_or_else(|| Error::Input(format!("no tensor named {name}")))?;
        let (dtype, bytes) = file.raw(name)?;
        Ok((file, dtype, bytes))
    }

    pub fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        match self.index.get(name) {
            Some(&i) => self.files[i].shape(name),
            None => Ok(None),
        }
    }
}

/// The stored names most like `name`, for "missing tensor" messages.
fn nearest<'a>(name: &str, names: impl Iterator<Item = &'a String>) -> String {
    let score = |s: &str| {
        let common = name
            .bytes()
            .zip(s.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        common as i64 * 4 - (s.len() as i64 - name.len() as i64).abs()
    };
    let mut v: Vec<&String> = names.collect();
    v.sort_by_key(|s| -score(s));
    v.iter()
        .take(3)
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Opens a model folder, choosing the architecture from config.json's `model_type`. With
/// `map` (for inference only), weight matrices stay in the files, memory-mapped in their
/// stored precision (f32, bf16 or f16), and input-major matrices (GPT-2's) are turned around
/// for decoding ([`Model::to_inference_layout`]); without it every tensor is read into f32
/// and the model can train. GPT-2 folders may use `transformer.`-prefixed names
/// (GPT2LMHeadModel) or bare ones (GPT2Model, as in OpenAI's original upload); a stored
/// `lm_head.weight` of a tied model is ignored (it equals the embedding).
pub fn load(dir: &Path, map: bool) -> Result<Model> {
    let config_path = model_dir_config(dir)?;
    let config = read_config(&config_path)?;
    let weights = Weights::open(dir)?;
    // every parameter must come from the files: a config.json that describes a larger model
    // is refused before anything is allocated for it
    let stored = weights
        .files
        .iter()
        .try_fold(0usize, |a, f| a.checked_add(f.elements()?));
    match (config.parameter_count(), stored) {
        (Some(w), Some(s)) if w <= s => {}
        (w, _) => {
            return Err(Error::Input(format!(
            "{}: config.json describes a model of {} parameters but the weights hold only {} ({})",
            dir.display(),
            w.map_or("too many".into(), |w| w.to_string()),
            stored.map_or("?".into(), |s| s.to_string()),
            shape_fields(&config)
        )))
        }
    }
    let mut model = Model::new(config)?;
    let mut mapped: Vec<(View, Storage)> = Vec::new();
    let mut mappable: Vec<View> = Vec::new();
    // input-major matrices (GPT-2's): view, outputs, inputs
    let mut input_major: Vec<(View, usize, usize)> = Vec::new();
    model.for_each_weight(|w| match w.orient {
        Orient::OutIn => mappable.push(w.view),
        Orient::InOut => input_major.push((w.view, w.rows, w.cols)),
    });
    let mut turned: Vec<View> = Vec::new();
    for spec in &model.layout.tensors.clone() {
        let bare = spec.name.strip_prefix("transformer.").unwrap_or(&spec.name);
        let Some(stored) = [spec.name.as_str(), bare]
            .into_iter()
            .find(|n| weights.contains(n))
        else {
            return Err(Error::Input(format!(
                "{}: missing tensor {} (nearest present: {})",
                dir.display(),
                spec.name,
                nearest(&spec.name, weights.names())
            )));
        };
        if let Some(shape) = weights.shape(stored)? {
            if shape != spec.shape {
                return Err(Error::Input(format!(
                    "{}: tensor {} has shape {:?} but config.json implies {:?} ({})",
                    dir.display(),
                    stored,
                    shape,
                    spec.shape,
                    shape_fields(&model.config)
                )));
            }
        }
        if map && mappable.contains(&spec.view) {
            if let Some(storage) = map_tensor(&weights, stored, spec.view.len)? {
                mapped.push((spec.view, storage));
                continue;
            }
        }
        if let Some(&(view, rows, cols)) = input_major.iter().find(|m| map && m.0 == spec.view) {
            if let Some(storage) = turn_half(&weights, stored, rows, cols)? {
                mapped.push((view, storage));
                turned.push(view);
                continue;
            }
        }
        weights.read_into(stored, &spec.shape, spec.view.of_mut(&mut model.params))?;
    }
    model.for_each_weight(|w| {
        if let Some((_, s)) = mapped.iter().find(|(v, _)| *v == w.view) {
            w.storage = s.clone();
        }
        if turned.contains(&w.view) {
            w.orient = Orient::OutIn;
        }
    });
    if map {
        model.to_inference_layout();
    }
    Ok(model)
}

/// The config.json fields that set tensor shapes, for shape-mismatch messages.
fn shape_fields(config: &Config) -> String {
    match config {
        Config::Gpt2(c) => format!(
            "vocab_size={}, n_positions={}, n_embd={}, n_inner={}",
            c.vocab_size,
            c.n_positions,
            c.n_embd,
            c.mlp_dim()
        ),
        Config::Llama(c) => format!(
            "vocab_size={}, hidden_size={}, intermediate_size={}, heads={}, kv_heads={}, head_dim={}",
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim
        ),
    }
}

/// Tensor `name` left in its file: None when its bytes cannot be read in place (misaligned),
/// an error for a dtype quill cannot multiply by.
fn map_tensor(weights: &Weights, name: &str, len: usize) -> Result<Option<Storage>> {
    let (file, dtype, bytes) = weights.raw(name)?;
    let md = match dtype {
        ::safetensors::Dtype::F32 => MappedDtype::F32,
        ::safetensors::Dtype::BF16 => MappedDtype::Bf16,
        ::safetensors::Dtype::F16 => MappedDtype::F16,
        other => {
            return Err(Error::format(
                &file.path,
                format!(
                    "tensor {name}: dtype {other:?} is not supported (supported: F32, F16, BF16)"
                ),
            ))
        }
    };
    let map = file.map();
    if bytes.len() != len * md.bytes() {
        return Ok(None);
    }
    let start = bytes.as_ptr() as usize - map.as_ptr() as usize;
    Ok(Storage::mapped(map, start, len, md))
}

/// An input-major half-precision matrix (`[in, out]`, GPT-2's Conv1D layout) turned to
/// `[out, in]` in anonymous memory, still in its stored bf16 or f16, so that decoding reads
/// two bytes per weight as it does for a mapped output-major matrix. None for f32 (read into
/// the parameters and turned there by [`Model::to_inference_layout`]) and for sizes that do
/// not match (left to `read_into`'s error).
fn turn_half(weights: &Weights, name: &str, rows: usize, cols: usize) -> Result<Option<Storage>> {
    use rayon::prelude::*;
    let (file, dtype, bytes) = weights.raw(name)?;
    let md = match dtype {
        ::safetensors::Dtype::BF16 => MappedDtype::Bf16,
        ::safetensors::Dtype::F16 => MappedDtype::F16,
        _ => return Ok(None),
    };
    let len = rows * cols;
    if bytes.len() != len * 2 || len == 0 {
        return Ok(None);
    }
    let mut turned =
        memmap2::MmapMut::map_anon(bytes.len()).map_err(|e| Error::io(&file.path, e))?;
    // 16 output rows per task: each input's 16 weights are one 32-byte run of the file
    const ROWS: usize = 16;
    turned
        .par_chunks_mut(ROWS * cols * 2)
        .enumerate()
        .for_each(|(t, dst)| {
            let (j0, n) = (t * ROWS, dst.len() / (cols * 2));
            for i in 0..cols {
                let src = &bytes[(i * rows + j0) * 2..(i * rows + j0 + n) * 2];
                for (r, w) in src.chunks_exact(2).enumerate() {
                    let at = (r * cols + i) * 2;
                    dst[at..at + 2].copy_from_slice(w);
                }
            }
        });
    let map = std::sync::Arc::new(
        turned
            .make_read_only()
            .map_err(|e| Error::io(&file.path, e))?,
    );
    Ok(Storage::mapped(map, 0, len, md))
}

/// Reads config.json into the architecture's configuration.
fn read_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
    match model_type {
        "gpt2" => Ok(Config::Gpt2(Gpt2Config::load(path)?)),
        "llama" | "mistral" | "qwen2" => Ok(Config::Llama(LlamaConfig::load(path)?)),
        _ => {
            let arch = v
                .get("architectures")
                .map(|a| a.to_string())
                .unwrap_or_else(|| "none".into());
            Err(Error::format(
                path,
                format!(
                    "model_type {model_type:?} (architectures {arch}) is not supported; supported: {}",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            ))
        }
    }
}

fn model_dir_config(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(Error::Input(format!(
            "{}: no such model folder",
            dir.display()
        )));
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::Input(format!(
            "{}: no config.json in this folder",
            dir.display()
        )));
    }
    Ok(config_path)
}

/// Writes the model as `config.json` + `model.safetensors` (f32) into `dir`, each atomically.
pub fn save(dir: &Path, model: &Model, extra_metadata: &BTreeMap<String, String>) -> Result<()> {
    model.check_trainable()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut meta = extra_metadata.clone();
    meta.insert("format".into(), "pt".into());
    let tensors: Vec<(&str, &[usize], &[f32])> = model
        .layout
        .tensors
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.shape.as_slice(),
                t.view.of(&model.params),
            )
        })
        .collect();
    write_f32(&dir.join("model.safetensors"), &tensors, &meta)?;
    let config =
        serde_json::to_string_pretty(&model.config.to_hf_json()).expect("config serializes");
    super::atomic::write_text(&dir.join("config.json"), &(config + "\n"))
}

/// A model folder opened for inference: weights (memory-mapped where they can be), the
/// tokenizer, the chat template, generation_config.json's defaults and the ids that end a
/// reply (generation_config, config.json and tokenizer_config.json's `eos_token`, else
/// `<|endoftext|>`).
pub fn open(dir: &Path) -> Result<Opened> {
    let model = load(dir, true)?;
    let p = dir.join("tokenizer.json");
    if !p.is_file() {
        return Err(Error::Input(format!(
            "{}: no tokenizer.json in this folder",
            dir.display()
        )));
    }
    let tok = crate::tokenizer::Tokenizer::load(&p)?;
    if tok.vocab_size() > model.vocab_size() {
        return Err(Error::Input(format!(
            "{}: the tokenizer has {} tokens but the model only {}",
            dir.display(),
            tok.vocab_size(),
            model.vocab_size()
        )));
    }
    let template = crate::chat::ChatTemplate::load(dir)?;
    let gen = GenerationConfig::load(dir)?;
    let mut eos = gen.eos_token_ids.clone();
    eos.extend(model.eos_token_ids());
    let specials = crate::chat::special_tokens(dir)?;
    if let Some(id) = specials
        .get("eos_token")
        .and_then(|v| v.as_str())
        .and_then(|t| tok.token_to_id(t))
    {
        eos.push(id);
    }
    if eos.is_empty() {
        eos.extend(tok.token_to_id(crate::tokenizer::END_OF_TEXT));
    }
    eos.sort_unstable();
    eos.dedup();
    Ok(Opened {
        model,
        tok,
        template,
        gen,
        eos,
    })
}

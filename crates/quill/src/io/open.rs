//! Opening whatever the user names: a Hugging Face model folder, a GGUF file, or a llama2.c
//! checkpoint (with its tokenizer.bin).

use super::generation::GenerationConfig;
use super::opened::Opened;
use super::{gguf, hf, llama2c};
use crate::model::Model;
use crate::{Error, Result};
use std::path::Path;

/// Opens a model folder, a GGUF file (its tokenizer and chat template inside), or a llama2.c
/// checkpoint file with `tokenizer` naming its `tokenizer.bin`.
pub fn open(path: &Path, tokenizer: Option<&Path>) -> Result<Opened> {
    let what = if path.is_dir() {
        "a model folder brings its tokenizer.json"
    } else if gguf::load::is_gguf(path) {
        "a GGUF file brings its own tokenizer"
    } else {
        return open_llama2c(path, tokenizer);
    };
    if tokenizer.is_some() {
        return Err(Error::Input(format!(
            "{}: --tokenizer is for llama2.c checkpoints; {what}",
            path.display()
        )));
    }
    match path.is_dir() {
        true => hf::open(path),
        false => gguf::load::open(path),
    }
}

fn open_llama2c(path: &Path, tokenizer: Option<&Path>) -> Result<Opened> {
    if !path.exists() {
        return Err(Error::Input(format!(
            "{}: no such model folder or file",
            path.display()
        )));
    }
    let Some(tok_path) = tokenizer else {
        return Err(Error::Input(format!(
            "{}: not a model folder or GGUF file; a llama2.c checkpoint needs --tokenizer (its tokenizer.bin)",
            path.display()
        )));
    };
    let model = llama2c::load(path)?;
    let tok = crate::tokenizer::Llama2cTokenizer::load(tok_path, model.vocab_size())?;
    Ok(Opened {
        eos: model.eos_token_ids(),
        model,
        tok: crate::tokenizer::Tokenizer::Llama2c(Box::new(tok)),
        template: None,
        gen: GenerationConfig::default(),
    })
}

/// [`open`], then a LoRA adapter folder (PEFT's format) merged into the weights when given:
/// the model then computes what base + adapter compute. Merging turns the weights it touches,
/// and any memory-mapped or quantized ones, into f32.
pub fn open_adapted(
    path: &Path,
    tokenizer: Option<&Path>,
    adapter: Option<&Path>,
) -> Result<Opened> {
    let mut o = open(path, tokenizer)?;
    if let Some(dir) = adapter {
        adapt(&mut o.model, dir)?;
    }
    Ok(o)
}

/// Adds the LoRA adapter in `dir` to `model`: merged into its weights, or beside them (unmerged)
/// when they are quantized.
pub fn adapt(model: &mut Model, dir: &Path) -> Result<()> {
    if !dir.join("adapter_config.json").is_file() {
        return Err(Error::Input(format!(
            "{}: not a LoRA adapter folder (no adapter_config.json)",
            dir.display()
        )));
    }
    let lora = super::peft::load(dir, model)?;
    if model.is_quantized() {
        // a quantized base stays quantized (its speed and memory): the adapters run
        // beside it, unmerged
        model.adapters = Some(std::sync::Arc::new(lora));
        return Ok(());
    }
    lora.merge_into(model)
}

/// A model for inference from a Hugging Face folder (weights memory-mapped), a GGUF file or a
/// llama2.c checkpoint.
pub fn load_model(path: &Path) -> Result<Model> {
    if path.is_dir() {
        hf::load(path, true)
    } else if gguf::load::is_gguf(path) {
        gguf::load::load(&gguf::Gguf::open(path)?, gguf::load::Weights::InPlace)
    } else {
        llama2c::load(path)
    }
}

/// [`load_model`] with a GGUF file's weights converted to f32 (the plain twin of the
/// quantized kernels); other formats as [`load_model`].
pub fn load_model_dequantized(path: &Path) -> Result<Model> {
    if !path.is_dir() && gguf::load::is_gguf(path) {
        return gguf::load::load(&gguf::Gguf::open(path)?, gguf::load::Weights::Dequantized);
    }
    load_model(path)
}

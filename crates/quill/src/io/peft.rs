//! LoRA adapters in PEFT's format: `adapter_config.json` (rank, alpha, dropout, rsLoRA,
//! target modules, the base's name) and `adapter_model.safetensors` (each adapter's A [r, in]
//! and B [out, r] under `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`
//! names). What quill cannot run (DoRA, per-module ranks, trained biases, GPT-2's Conv1D
//! layout, adapters on some layers only) is refused by name.

use super::safetensors::{write_f32, SafetensorsFile};
use crate::model::lora::{Lora, LoraConfig, Target, ALL_TARGETS};
use crate::model::Model;
use crate::{Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `adapter_config.json` and `adapter_model.safetensors` (atomically) into `dir`.
pub fn save(lora: &Lora, dir: &Path, base: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let c = &lora.config;
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "use_rslora": c.rslora,
        "target_modules": c.targets.iter().map(|t| t.module()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    let text = serde_json::to_string_pretty(&cfg).expect("serializes") + "\n";
    let tensors: Vec<(&str, &[usize], &[f32])> = lora
        .layout
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice(), t.view.of(&lora.params)))
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_f32(&dir.join("adapter_model.safetensors"), &tensors, &meta)?;
    crate::io::atomic::write_text(&dir.join("adapter_config.json"), &text)
}

/// Reads a PEFT LoRA adapter folder for `model`: every adapter matrix must be there with
/// the shape the model gives it.
pub fn load(dir: &Path, model: &Model) -> Result<Lora> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
    let bad = |msg: String| Error::format(&cfg_path, msg);
    if let Some(p) = v.get("peft_type").and_then(Value::as_str) {
        if p != "LORA" {
            return Err(bad(format!("a {p} adapter; quill reads LoRA adapters")));
        }
    }
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("no rank \"r\"".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("no \"lora_alpha\"".into()))? as f32;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    let rslora = v
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(format!("per-module {key} is not supported")));
        }
    }
    if v.get("bias")
        .and_then(Value::as_str)
        .is_some_and(|b| b != "none")
    {
        return Err(bad("adapters with trained biases are not supported".into()));
    }
    if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "DoRA adapters are not supported (only plain LoRA)".into()
        ));
    }
    for key in ["layers_to_transform", "modules_to_save"] {
        if v.get(key).is_some_and(|x| !x.is_null()) {
            return Err(bad(format!(
                "{key} is not supported (adapters on every layer only)"
            )));
        }
    }
    if v.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "fan_in_fan_out adapters (GPT-2's Conv1D) are not supported".into(),
        ));
    }
    let targets = match v.get("target_modules") {
        Some(Value::Array(list)) => list
            .iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| bad("target_modules must be names".into()))
            })
            .map(|s| s.and_then(|s| Target::parse(s).map_err(|e| bad(e.to_string()))))
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(s)) => ALL_TARGETS
            .into_iter()
            .filter(|t| s.contains(t.module()))
            .collect(),
        _ => return Err(bad("no \"target_modules\" list".into())),
    };
    let config = LoraConfig {
        rank,
        alpha,
        dropout,
        targets,
        rslora,
        // a training setting, not the adapter's: PEFT keeps it with the optimizer
        plus_ratio: 1.0,
    };
    let mut lora = Lora::new(model, config).map_err(|e| bad(e.to_string()))?;
    let wpath = dir.join("adapter_model.safetensors");
    let f = SafetensorsFile::open(&wpath)?;
    for t in lora.layout.tensors.clone() {
        match f.shape(&t.name)? {
            None => {
                return Err(Error::format(
                    &wpath,
                    format!("no tensor {} (is this adapter for another model?)", t.name),
                ))
            }
            Some(s) if s != t.shape => {
                return Err(Error::format(
                    &wpath,
                    format!(
                    "{} is {s:?}, but this model needs {:?}: the adapter was made for another base",
                    t.name, t.shape
                ),
                ))
            }
            Some(_) => f.read_into(&t.name, &t.shape, t.view.of_mut(&mut lora.params))?,
        }
    }
    if lora.params.iter().any(|x| !x.is_finite()) {
        return Err(Error::format(
            &wpath,
            "the adapter holds NaN or infinite numbers",
        ));
    }
    Ok(lora)
}

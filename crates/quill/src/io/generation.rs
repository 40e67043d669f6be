//! generation_config.json: a model folder's sampling defaults.

use crate::model::config::token_ids;
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// The defaults of a folder's `generation_config.json` (all optional; `min_p` as
/// transformers names it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub max_new_tokens: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; a folder without one gives the empty config.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
        let bad = |k: &str, what: &str| {
            Error::format(
                &path,
                format!(
                    "{k} must be {what} (got {})",
                    v.get(k).unwrap_or(&Value::Null)
                ),
            )
        };
        // a number within [lo, hi] when present (null is absent)
        let f = |k: &str, lo: f64, hi: f64| -> Result<Option<f32>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => match x.as_f64() {
                    Some(n) if n.is_finite() && (lo..=hi).contains(&n) => Ok(Some(n as f32)),
                    _ => Err(bad(k, &format!("a number from {lo} to {hi}"))),
                },
            }
        };
        let u = |k: &str| -> Result<Option<usize>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| bad(k, "a non-negative integer")),
            }
        };
        let ids = |k: &str| token_ids(v.get(k), k).map_err(|e| Error::format(&path, e.to_string()));
        let do_sample = match v.get("do_sample") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => return Err(bad("do_sample", "true or false")),
        };
        Ok(GenerationConfig {
            do_sample,
            temperature: f("temperature", 0.0, 1e6)?,
            top_p: f("top_p", 0.0, 1.0)?,
            top_k: u("top_k")?,
            min_p: f("min_p", 0.0, 1.0)?,
            max_new_tokens: u("max_new_tokens")?,
            repetition_penalty: f("repetition_penalty", 1e-6, 1e6)?,
            eos_token_ids: ids("eos_token_id")?,
            bos_token_id: ids("bos_token_id")?.first().copied(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// generation_config.json's sampling defaults, under transformers' names; a folder
    /// without the file gives the empty config.
    #[test]
    fn reads_generation_config_defaults() {
        let dir = std::env::temp_dir().join(format!("quill-gencfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            GenerationConfig::load(&dir).unwrap(),
            GenerationConfig::default()
        );
        let json = r#"{"do_sample": true, "temperature": 0.7, "top_k": 7, "top_p": 0.9,
            "min_p": 0.05, "repetition_penalty": 1.1, "eos_token_id": [2, 5], "max_new_tokens": 9}"#;
        std::fs::write(dir.join("generation_config.json"), json).unwrap();
        let g = GenerationConfig::load(&dir).unwrap();
        assert_eq!(
            (
                g.do_sample,
                g.top_k,
                g.min_p,
                g.max_new_tokens,
                g.eos_token_ids.clone()
            ),
            (Some(true), Some(7), Some(0.05), Some(9), vec![2, 5])
        );
        assert_eq!(
            (g.temperature, g.top_p, g.repetition_penalty),
            (Some(0.7), Some(0.9), Some(1.1))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

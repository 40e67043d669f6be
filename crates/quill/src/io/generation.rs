//! generation_config.json: a model folder's sampling defaults.

use crate::{Error, Result};
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
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).map(|x| x as f32);
        let u = |k: &str| v.get(k).and_then(|x| x.as_u64());
        let eos_token_ids = match v.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => vec![],
        };
        Ok(GenerationConfig {
            do_sample: v.get("do_sample").and_then(|x| x.as_bool()),
            temperature: f("temperature"),
            top_p: f("top_p"),
            top_k: u("top_k").map(|x| x as usize),
            min_p: f("min_p"),
            max_new_tokens: u("max_new_tokens").map(|x| x as usize),
            repetition_penalty: f("repetition_penalty"),
            eos_token_ids,
            bos_token_id: u("bos_token_id").map(|x| x as u32),
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

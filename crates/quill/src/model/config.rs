//! GPT-2 configuration with Hugging Face `GPT2Config` field names, read from and written to
//! `config.json`.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

fn default_eps() -> f32 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}

/// The config.json fields that size the model (each must be positive).
const SIZE_FIELDS: [&str; 6] = [
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
];

/// Activation names that mean GELU with the tanh approximation in `transformers`.
const TANH_GELUS: [&str; 3] = ["gelu_new", "gelu_pytorch_tanh", "gelu_fast"];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f32,
    /// MLP width; `null` means 4 · n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

impl Gpt2Config {
    /// A fresh configuration for training.
    pub fn new(
        vocab_size: usize,
        n_positions: usize,
        n_embd: usize,
        n_layer: usize,
        n_head: usize,
    ) -> Self {
        Gpt2Config {
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            layer_norm_epsilon: 1e-5,
            n_inner: None,
            activation_function: default_activation(),
            tie_word_embeddings: true,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn mlp_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Checks what the math relies on; the message names the field.
    pub fn validate(&self) -> Result<()> {
        // the fields under their config.json names (this struct serializes as config.json)
        let fields = serde_json::to_value(self).unwrap_or_default();
        for name in SIZE_FIELDS {
            let zero = match name {
                "n_inner" => self.mlp_dim() == 0,
                _ => fields.get(name).and_then(Value::as_u64) == Some(0),
            };
            if zero {
                return Err(Error::Config(format!(
                    "config field {name} must be positive"
                )));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::Config(format!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        if !TANH_GELUS.contains(&self.activation_function.as_str()) {
            return Err(Error::Config(format!(
                "activation_function {:?} is not supported (supported: {})",
                self.activation_function,
                TANH_GELUS.join(", ")
            )));
        }
        if self.layer_norm_epsilon.is_nan() || self.layer_norm_epsilon <= 0.0 {
            return Err(Error::Config("layer_norm_epsilon must be positive".into()));
        }
        if self.vocab_size > u32::MAX as usize / 2 {
            return Err(Error::Config("vocab_size is too large".into()));
        }
        Ok(())
    }

    /// Reads `config.json`, requiring a GPT-2 model type.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        if model_type != "gpt2" {
            return Err(Error::format(
                path,
                format!("model_type {model_type:?} is not supported (supported: \"gpt2\")"),
            ));
        }
        let cfg: Gpt2Config = serde_json::from_value(value)
            .map_err(|e| Error::format(path, format!("bad config: {e}")))?;
        cfg.validate()
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok(cfg)
    }

    /// The full HF `config.json` object: loadable by `transformers.AutoConfig`.
    /// Dropout probabilities are 0: quill trains without dropout.
    pub fn to_hf_json(&self) -> Value {
        let mut m = match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let extra = serde_json::json!({
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_ctx": self.n_positions,
            "reorder_and_upcast_attn": false, "initializer_range": 0.02, "attn_pdrop": 0.0,
            "embd_pdrop": 0.0, "resid_pdrop": 0.0, "summary_first_dropout": 0.0,
        });
        if let Value::Object(extra) = extra {
            m.extend(extra);
        }
        hf_json_common(m)
    }
}

/// The fields every config.json quill writes ends with: f32 weights, a KV cache.
pub(super) fn hf_json_common(mut m: Map<String, Value>) -> Value {
    m.insert("use_cache".into(), true.into());
    m.insert("torch_dtype".into(), "float32".into());
    m.insert("dtype".into(), "float32".into());
    Value::Object(m)
}

/// Token ids from a config field (`eos_token_id` and kin): absent or null for none, one
/// integer, or a list of integers, each one a u32 (a larger id is an error, not a truncation).
pub fn token_ids(v: Option<&Value>, field: &str) -> crate::Result<Vec<u32>> {
    let one = |x: &Value| -> crate::Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                crate::Error::Config(format!(
                    "{field} must hold token ids (integers below 2^32), not {x}"
                ))
            })
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_reference_config_and_round_trips() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/gpt2-tiny/config.json");
        let cfg = Gpt2Config::load(&p).unwrap();
        assert_eq!(
            (
                cfg.n_layer,
                cfg.n_embd,
                cfg.n_head,
                cfg.vocab_size,
                cfg.n_positions
            ),
            (2, 64, 4, 256, 64)
        );
        assert_eq!(cfg.eos_token_id, Some(255));
        let back: Gpt2Config = serde_json::from_value(cfg.to_hf_json()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn rejects_bad_fields() {
        // each size field at zero, set in the config.json form
        for field in SIZE_FIELDS {
            let mut v = serde_json::to_value(Gpt2Config::new(10, 8, 12, 1, 4)).unwrap();
            v[field] = 0.into();
            let c: Gpt2Config = serde_json::from_value(v).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("positive"), "{e}");
        }
        let mut c = Gpt2Config::new(10, 8, 12, 1, 5);
        assert!(c.validate().unwrap_err().to_string().contains("divisible"));
        c.n_head = 4;
        c.activation_function = "relu".into();
        assert!(c.validate().unwrap_err().to_string().contains("relu"));
    }
}

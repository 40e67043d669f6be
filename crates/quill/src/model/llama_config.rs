//! Configuration of the Llama family (Llama, Mistral, Qwen2) with Hugging Face field names,
//! read from and written to `config.json`.

use super::config::hf_json_common;
use crate::kernels::rope::RopeScaling;
use crate::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// The `model_type`s this configuration covers, with their HF class names.
pub const LLAMA_FAMILY: [(&str, &str); 3] = [
    ("llama", "LlamaForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
];

/// The most layers a configuration may ask for (real models have at most a few hundred).
pub const MAX_LAYERS: usize = 1 << 16;

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Keys older than this many positions are not attended to, per layer (Mistral's
    /// `sliding_window`, or layers marked "sliding_attention" in `layer_types`).
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// A fresh Llama configuration for training (untied head, theta 10000, eps 1e-5).
    pub fn new(
        vocab_size: usize,
        max_positions: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        // SwiGLU width: 8/3 of the hidden size (the Llama recipe), rounded up to 32
        let ffn = (8 * hidden / 3).div_ceil(32) * 32;
        LlamaConfig {
            model_type: "llama".into(),
            vocab_size,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads.max(1),
            max_position_embeddings: max_positions,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            sliding_window: vec![None; layers],
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    pub fn architecture(&self) -> &'static str {
        LLAMA_FAMILY
            .iter()
            .find(|(t, _)| *t == self.model_type)
            .map(|(_, a)| *a)
            .unwrap_or("LlamaForCausalLM")
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::Config(format!(
                    "config field {name} must be positive"
                )));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::Config(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if self.head_dim > 2 * crate::kernels::rope::MAX_HALF {
            return Err(Error::Config(format!(
                "head_dim ({}) above {} is not supported",
                self.head_dim,
                2 * crate::kernels::rope::MAX_HALF
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            )));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(Error::Config("rms_norm_eps must be positive".into()));
        }
        // frequencies are theta^(-2i/d): a base at or below 1 makes them grow, not fall
        if !self.rope_theta.is_finite() || self.rope_theta <= 1.0 {
            return Err(Error::Config(format!(
                "rope_theta must be a finite number above 1 (got {})",
                self.rope_theta
            )));
        }
        let positive = |name: &str, x: f64| -> Result<()> {
            match x.is_finite() && x > 0.0 {
                true => Ok(()),
                false => Err(Error::Config(format!(
                    "rope scaling {name} must be a finite number above 0 (got {x})"
                ))),
            }
        };
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => positive("factor", factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", factor)?;
                positive("low_freq_factor", low_freq_factor)?;
                positive("high_freq_factor", high_freq_factor)?;
                positive(
                    "original_max_position_embeddings",
                    original_max_position_embeddings,
                )?;
                if high_freq_factor <= low_freq_factor {
                    return Err(Error::Config(format!(
                        "rope scaling high_freq_factor ({high_freq_factor}) must be above low_freq_factor ({low_freq_factor})"
                    )));
                }
            }
        }
        if self.sliding_window.contains(&Some(0)) {
            return Err(Error::Config(
                "sliding_window must be positive (or null for none)".into(),
            ));
        }
        if self.vocab_size > u32::MAX as usize / 2 {
            return Err(Error::Config("vocab_size is too large".into()));
        }
        if self.sliding_window.len() != self.num_hidden_layers {
            return Err(Error::Config(
                "layer_types must have one entry per layer".into(),
            ));
        }
        Ok(())
    }

    /// Parses a config.json object of model_type llama, mistral or qwen2.
    pub fn from_json(v: &Value) -> Result<Self> {
        let bad = |m: String| Error::Config(m);
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if !LLAMA_FAMILY.iter().any(|(t, _)| *t == model_type) {
            return Err(bad(format!(
                "model_type {model_type:?} is not a Llama-family model"
            )));
        }
        let uint = |k: &str| -> Result<Option<usize>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| bad(format!("config field {k} must be a non-negative integer"))),
            }
        };
        let req = |k: &str| -> Result<usize> {
            uint(k)?.ok_or_else(|| bad(format!("config.json has no {k}")))
        };
        let float = |k: &str, obj: &Value| -> Result<Option<f64>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("config field {k} must be a number"))),
            }
        };
        let flag = |k: &str| v.get(k).and_then(Value::as_bool);
        let hidden = req("hidden_size")?;
        let heads = req("num_attention_heads")?;
        let layers = req("num_hidden_layers")?;
        // per-layer settings are allocated from this count: bounded before anything else
        if layers > MAX_LAYERS {
            return Err(bad(format!(
                "num_hidden_layers {layers} is beyond quill's limit of {MAX_LAYERS}"
            )));
        }
        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(bad(format!(
                "hidden_act {act:?} is not supported (supported: \"silu\")"
            )));
        }
        if flag("mlp_bias") == Some(true) {
            return Err(bad("mlp_bias = true is not supported".into()));
        }
        // transformers 5 keeps RoPE settings in rope_parameters; older files use
        // rope_theta + rope_scaling at the top level.
        let rp = v.get("rope_parameters").filter(|x| x.is_object());
        let rs = v.get("rope_scaling").filter(|x| x.is_object());
        let rope_theta = rp
            .map(|o| float("rope_theta", o))
            .transpose()?
            .flatten()
            .or(float("rope_theta", v)?)
            .unwrap_or(10000.0);
        let scaling_obj = rp.or(rs);
        let rope_scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(o) => {
                let kind = o
                    .get("rope_type")
                    .or_else(|| o.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let num = |k: &str| -> Result<f64> {
                    float(k, o)?.ok_or_else(|| bad(format!("rope scaling {kind:?} needs {k}")))
                };
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: num("factor")?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    },
                    other => {
                        return Err(bad(format!(
                        "rope type {other:?} is not supported (supported: default, linear, llama3)"
                    )))
                    }
                }
            }
        };
        let window = uint("sliding_window")?;
        let sliding_window = match v.get("layer_types").and_then(Value::as_array) {
            Some(types) => types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => window,
                    _ => None,
                })
                .collect(),
            None if model_type == "mistral" => vec![window; layers],
            None if model_type == "qwen2" && flag("use_sliding_window") == Some(true) => {
                let full = uint("max_window_layers")?.unwrap_or(layers);
                (0..layers)
                    .map(|l| if l >= full { window } else { None })
                    .collect()
            }
            None => vec![None; layers],
        };
        let attention_bias = flag("attention_bias").unwrap_or(false);
        let eos_token_ids = super::config::token_ids(v.get("eos_token_id"), "eos_token_id")?;
        let bos = super::config::token_ids(v.get("bos_token_id"), "bos_token_id")?;
        let cfg = LlamaConfig {
            vocab_size: req("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: uint("num_key_value_heads")?.unwrap_or(heads),
            head_dim: uint("head_dim")?.unwrap_or(hidden / heads.max(1)),
            max_position_embeddings: uint("max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: float("rms_norm_eps", v)?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: flag("tie_word_embeddings").unwrap_or(false),
            qkv_bias: model_type == "qwen2" || attention_bias,
            o_bias: model_type == "llama" && attention_bias,
            sliding_window,
            bos_token_id: bos.first().copied(),
            eos_token_ids,
            model_type,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&v).map_err(|e| Error::format(path, e.to_string()))
    }

    /// The HF `config.json` object, loadable by `transformers.AutoConfig`.
    pub fn to_hf_json(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("architectures", json!([self.architecture()]));
        put("model_type", self.model_type.clone().into());
        put("vocab_size", self.vocab_size.into());
        put("hidden_size", self.hidden_size.into());
        put("intermediate_size", self.intermediate_size.into());
        put("num_hidden_layers", self.num_hidden_layers.into());
        put("num_attention_heads", self.num_attention_heads.into());
        put("num_key_value_heads", self.num_key_value_heads.into());
        put("head_dim", self.head_dim.into());
        put(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        put("rms_norm_eps", (self.rms_norm_eps as f64).into());
        put("hidden_act", "silu".into());
        let mut rope = json!({"rope_theta": self.rope_theta, "rope_type": "default"});
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                rope =
                    json!({"rope_theta": self.rope_theta, "rope_type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                rope = json!({"rope_theta": self.rope_theta, "rope_type": "llama3", "factor": factor,
                    "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings as u64})
            }
        }
        put("rope_parameters", rope.clone());
        put("rope_theta", self.rope_theta.into());
        if self.rope_scaling != RopeScaling::None {
            put("rope_scaling", rope);
        }
        put("tie_word_embeddings", self.tie_word_embeddings.into());
        if self.model_type == "llama" {
            put("attention_bias", self.qkv_bias.into());
            put("mlp_bias", false.into());
        }
        let window = self.sliding_window.iter().flatten().next().copied();
        put(
            "sliding_window",
            window.map(Value::from).unwrap_or(Value::Null),
        );
        if self.model_type == "qwen2" {
            put("use_sliding_window", window.is_some().into());
        }
        if window.is_some() || self.model_type == "qwen2" {
            let types: Vec<&str> = self
                .sliding_window
                .iter()
                .map(|w| {
                    if w.is_some() {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            put("layer_types", json!(types));
        }
        put("attention_dropout", 0.0.into());
        put("initializer_range", 0.02.into());
        put(
            "bos_token_id",
            self.bos_token_id.map(Value::from).unwrap_or(Value::Null),
        );
        put(
            "eos_token_id",
            match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => (*one).into(),
                many => json!(many),
            },
        );
        hf_json_common(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_rope_layouts_and_round_trips() {
        let old = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "eos_token_id": [5, 6]});
        let c = LlamaConfig::from_json(&old).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.eos_token_ids, vec![5, 6]);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        let back = LlamaConfig::from_json(&c.to_hf_json()).unwrap();
        assert_eq!(back, c);
        let bad = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 3,
            "num_key_value_heads": 2});
        assert!(LlamaConfig::from_json(&bad)
            .unwrap_err()
            .to_string()
            .contains("multiple"));
        let yarn = json!({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
            "rope_scaling": {"type": "yarn", "factor": 4.0}});
        assert!(LlamaConfig::from_json(&yarn)
            .unwrap_err()
            .to_string()
            .contains("yarn"));
    }
}

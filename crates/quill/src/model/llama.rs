//! The Llama family's weights (Llama 2/3, Mistral, Qwen2), exactly as Hugging Face
//! `transformers` lays them out: a token embedding; pre-RMSNorm blocks whose matrices use
//! `nn.Linear`'s [out, in] layout (y = x · Wᵀ), with grouped-query attention (q/k/v biases
//! for Qwen2 and Llama's `attention_bias`, o bias for the latter), rotary positions and a
//! SwiGLU MLP; a final RMSNorm; an LM head, separate or tied to the embedding. q, k and v
//! (and gate, up) are laid out next to each other, so each group is one matrix product in
//! training. The forward and backward passes are the decoder's ([`super::decoder`]).

use super::decoder::{Block, Config, LayerAttention, Mlp, Model, Norm, NormKind, Positions};
use super::llama_config::LlamaConfig;
use super::params::{ParamLayout, View};
use super::weight::{Linear, Orient, Weight};
use crate::kernels::attention::Heads;
use crate::kernels::rope::{self, Rope};
use crate::Result;

/// A Llama-family model of this configuration with every parameter zero.
pub fn build(config: LlamaConfig) -> Result<Model> {
    config.validate()?;
    let cfg = &config;
    let (v, c, f) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
    let heads = Heads {
        h: cfg.num_attention_heads,
        kv: cfg.num_key_value_heads,
        d: cfg.head_dim,
    };
    let (hd, kvd) = (heads.h * heads.d, heads.kv * heads.d);
    let mut l = ParamLayout::default();
    let matrix = |l: &mut ParamLayout, name: String, out: usize, inp: usize| {
        Weight::new(l.push(name, &[out, inp]), out, inp, Orient::OutIn)
    };
    let rms_norm = |l: &mut ParamLayout, name: String| Norm {
        kind: NormKind::Rms,
        eps: cfg.rms_norm_eps,
        w: l.push(name, &[c]),
        b: None,
    };
    let embed = matrix(&mut l, "model.embed_tokens.weight".into(), v, c);
    let blocks = (0..cfg.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}.");
            let attn_norm = rms_norm(&mut l, format!("{p}input_layernorm.weight"));
            let parts = [("q", hd), ("k", kvd), ("v", kvd)]
                .map(|(x, rows)| matrix(&mut l, format!("{p}self_attn.{x}_proj.weight"), rows, c));
            let qkv_bias = cfg.qkv_bias.then(|| {
                let b = [("q", hd), ("k", kvd), ("v", kvd)]
                    .map(|(x, rows)| l.push(format!("{p}self_attn.{x}_proj.bias"), &[rows]));
                View {
                    offset: b[0].offset,
                    len: hd + 2 * kvd,
                }
            });
            let o = matrix(&mut l, format!("{p}self_attn.o_proj.weight"), c, hd);
            let o_bias = cfg
                .o_bias
                .then(|| l.push(format!("{p}self_attn.o_proj.bias"), &[c]));
            let mlp_norm = rms_norm(&mut l, format!("{p}post_attention_layernorm.weight"));
            let gate_up =
                ["gate", "up"].map(|x| matrix(&mut l, format!("{p}mlp.{x}_proj.weight"), f, c));
            let down = matrix(&mut l, format!("{p}mlp.down_proj.weight"), c, f);
            Block {
                attn_norm,
                qkv: Linear::new(parts.to_vec(), qkv_bias),
                o: Linear::new(vec![o], o_bias),
                mlp_norm,
                up: Linear::new(gate_up.to_vec(), None),
                down: Linear::new(vec![down], None),
            }
        })
        .collect();
    let final_norm = rms_norm(&mut l, "model.norm.weight".into());
    let head = match cfg.tie_word_embeddings {
        true => embed.clone(),
        false => matrix(&mut l, "lm_head.weight".into(), v, c),
    };
    let attention = cfg
        .sliding_window
        .iter()
        .map(|&window| LayerAttention {
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
            window,
        })
        .collect();
    let inv = rope::inv_freq(cfg.head_dim, cfg.rope_theta, &cfg.rope_scaling);
    let rope = Rope::new(inv, cfg.max_position_embeddings);
    let context = cfg.max_position_embeddings;
    let shape = (v, c, context, heads, f, Mlp::SwiGlu);
    let positions = Positions::Rotary(rope);
    let layers = (embed, positions, blocks, attention, final_norm, head);
    Model::assemble(Config::Llama(config), l, shape, layers)
}

//! GPT-2's weights, exactly as Hugging Face `transformers` lays them out: token + learned
//! position embeddings; pre-LayerNorm blocks whose matrices use `Conv1D`'s [in, out] layout
//! (y = x · W + b) with q|k|v in one `c_attn` matrix; a GELU (tanh) MLP of width `n_inner`
//! (4C by default); a final LayerNorm; an LM head tied to the token embedding, or a separate
//! `lm_head.weight` when `tie_word_embeddings` is false. The forward and backward passes are
//! the decoder's ([`super::decoder`]).

use super::config::Gpt2Config;
use super::decoder::{Block, Config, LayerAttention, Mlp, Model, Norm, NormKind, Positions};
use super::params::ParamLayout;
use super::weight::{Linear, Orient, Weight};
use crate::kernels::attention::Heads;
use crate::Result;

/// A GPT-2 of this configuration with every parameter zero.
pub fn build(config: Gpt2Config) -> Result<Model> {
    config.validate()?;
    let (v, c, f, eps) = (
        config.vocab_size,
        config.n_embd,
        config.mlp_dim(),
        config.layer_norm_epsilon,
    );
    let mut l = ParamLayout::default();
    // a Conv1D matrix [in, out] and its bias
    let conv = |l: &mut ParamLayout, name: &str, inp: usize, out: usize| {
        let w = l.push(format!("{name}.weight"), &[inp, out]);
        let b = l.push(format!("{name}.bias"), &[out]);
        Linear::new(vec![Weight::new(w, out, inp, Orient::InOut)], Some(b))
    };
    let layer_norm = |l: &mut ParamLayout, name: &str| Norm {
        kind: NormKind::Layer,
        eps,
        w: l.push(format!("{name}.weight"), &[c]),
        b: Some(l.push(format!("{name}.bias"), &[c])),
    };
    let wte = l.push("transformer.wte.weight", &[v, c]);
    let wpe = l.push("transformer.wpe.weight", &[config.n_positions, c]);
    let blocks = (0..config.n_layer)
        .map(|i| {
            let p = format!("transformer.h.{i}.");
            Block {
                attn_norm: layer_norm(&mut l, &format!("{p}ln_1")),
                qkv: conv(&mut l, &format!("{p}attn.c_attn"), c, 3 * c),
                o: conv(&mut l, &format!("{p}attn.c_proj"), c, c),
                mlp_norm: layer_norm(&mut l, &format!("{p}ln_2")),
                up: conv(&mut l, &format!("{p}mlp.c_fc"), c, f),
                down: conv(&mut l, &format!("{p}mlp.c_proj"), f, c),
            }
        })
        .collect();
    let final_norm = layer_norm(&mut l, "transformer.ln_f");
    let embed = Weight::new(wte, v, c, Orient::OutIn);
    let head = match config.tie_word_embeddings {
        true => embed.clone(),
        false => Weight::new(l.push("lm_head.weight", &[v, c]), v, c, Orient::OutIn),
    };
    let attention = (0..config.n_layer)
        .map(|layer| LayerAttention {
            scale: attn_scale(&config, layer),
            window: None,
        })
        .collect();
    let heads = Heads::mha(c, config.n_head);
    let shape = (v, c, config.n_positions, heads, f, Mlp::Gelu);
    let positions = Positions::Learned(wpe);
    let layers = (embed, positions, blocks, attention, final_norm, head);
    Model::assemble(Config::Gpt2(config), l, shape, layers)
}

/// 1/√D (unless `scale_attn_weights` is off), divided by the layer number when
/// `scale_attn_by_inverse_layer_idx` is on.
fn attn_scale(config: &Gpt2Config, layer: usize) -> f32 {
    let mut s = if config.scale_attn_weights {
        1.0 / (config.head_dim() as f32).sqrt()
    } else {
        1.0
    };
    if config.scale_attn_by_inverse_layer_idx {
        s /= (layer + 1) as f32;
    }
    s
}

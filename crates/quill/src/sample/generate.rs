//! Generation: run the prompt once through the model (filling the KV cache), then sample one
//! token at a time, each costing one position of compute.

use super::sampler::Sampler;
use crate::model::Model;
use crate::{Error, Result};

/// When generation stops: after `max_new` tokens, or at any id in `eos` (which is returned).
#[derive(Clone, Copy, Debug)]
pub struct Stop<'a> {
    pub max_new: usize,
    pub eos: &'a [u32],
}

pub enum GenerateEvent {
    /// The prompt was longer than the context: only its last `kept` tokens are used.
    PromptTruncated { dropped: usize, kept: usize },
    /// The context filled up: the cache was rebuilt from the last `kept` tokens.
    ContextShifted { kept: usize },
}

/// Generates tokens after `prompt` until `stop` says, calling `on_token` with each new id as
/// it is drawn (return false to stop). Returns the new ids.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    stop: Stop,
    sampler: &mut Sampler,
    mut on_event: impl FnMut(GenerateEvent),
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Vec<u32>> {
    let Stop { max_new, eos } = stop;
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty (no tokens)".into()));
    }
    let ctx = model.context();
    let mut tokens: Vec<u32> = prompt.to_vec();
    if tokens.len() > ctx {
        let dropped = tokens.len() - ctx;
        tokens.drain(..dropped);
        on_event(GenerateEvent::PromptTruncated { dropped, kept: ctx });
    }
    // a cache no longer than this generation can need
    let mut cache = model.new_cache((tokens.len() + max_new).min(ctx));
    tokens.reserve(max_new);
    let mut logits = Vec::new();
    model.forward_cached(&mut cache, &tokens, &mut logits, false)?;
    let mut out = Vec::with_capacity(max_new);
    sampler.start(&tokens);
    while out.len() < max_new {
        let next = sampler.draw(&logits).token;
        out.push(next);
        tokens.push(next);
        if !on_token(next)? || eos.contains(&next) || out.len() == max_new {
            break;
        }
        if cache.len() == cache.capacity() {
            // the context ends here: keep the most recent half and recompute its cache
            let kept = (cache.capacity() / 2).max(1);
            tokens.drain(..tokens.len() - kept);
            cache.clear();
            model.forward_cached(&mut cache, &tokens, &mut logits, false)?;
            on_event(GenerateEvent::ContextShifted { kept });
        } else {
            model.forward_cached(&mut cache, &[next], &mut logits, false)?;
        }
    }
    Ok(out)
}

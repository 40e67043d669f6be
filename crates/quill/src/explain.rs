//! How a model decides: for a prompt, each token's surprisal (−log₂ p under the model given
//! the tokens before it); for each generated token, the softmax distribution it was drawn
//! from (the top candidates at temperature 1, the rest summed), the set the
//! temperature/top-k/top-p/min-p cut kept, and the token drawn: all read from the
//! [`Sampler`] that drew it. Shared by `quill explain` and the
//! server's explain view.

use crate::model::Model;
use crate::sample::{log_softmax_at, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::Result;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct PromptToken {
    pub id: u32,
    pub text: String,
    /// ln p(token | tokens before it); None for the first token (nothing predicts it).
    pub logprob: Option<f32>,
    /// p(token | tokens before it).
    pub prob: Option<f32>,
    /// −log₂ p: bits of surprise.
    pub surprisal_bits: Option<f32>,
}

#[derive(Debug, Serialize)]
pub struct Candidate {
    pub id: u32,
    pub text: String,
    /// The raw score before softmax.
    pub logit: f32,
    /// softmax probability at temperature 1.
    pub prob: f32,
}

#[derive(Debug, Serialize)]
pub struct Step {
    /// The most likely tokens, most likely first.
    pub candidates: Vec<Candidate>,
    /// log Σ exp(logit) over every token not among the candidates (the tail), and over all.
    pub rest_logsumexp: f32,
    pub logsumexp: f32,
    /// The probability of every token not among the candidates (at temperature 1).
    pub rest_prob: f32,
    /// Ids the cut (temperature, top-k, top-p) kept, with their renormalised probabilities
    /// (the 200 most likely of them), and how many it kept in all.
    pub kept: Vec<(u32, f32)>,
    pub kept_count: usize,
    pub chosen: u32,
    pub chosen_text: String,
    pub chosen_prob: f32,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub prompt: Vec<PromptToken>,
    pub steps: Vec<Step>,
    pub params: SamplingParamsView,
}

#[derive(Debug, Serialize)]
pub struct SamplingParamsView {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
}

/// How much an explanation shows: generated tokens, and candidates per token.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub steps: usize,
    pub top: usize,
}

/// The prompt's surprisal and `steps` generated tokens with their distributions (until an
/// id in `eos`).
pub fn explain(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    params: SamplingParams,
    size: Size,
    eos: &[u32],
) -> Result<Explanation> {
    let Size { steps, top } = size;
    let ctx = model.context();
    let prompt = &prompt[prompt
        .len()
        .saturating_sub(ctx.saturating_sub(steps).max(1))..];
    let v = model.vocab_size();
    let limit = if params.vocab_limit > 0 {
        params.vocab_limit.min(v)
    } else {
        v
    };
    let mut sampler = Sampler::new(params.clone())?;
    sampler.start(prompt);
    let mut cache = model.new_cache((prompt.len() + steps).min(ctx));
    let mut all = Vec::new();
    model.forward_cached(&mut cache, prompt, &mut all, true)?;
    let text_of = |id: u32| tok.decode(&[id]).unwrap_or_default();
    let mut out_prompt = Vec::with_capacity(prompt.len());
    for (i, &id) in prompt.iter().enumerate() {
        let lp = (i > 0).then(|| log_softmax_at(&all[(i - 1) * v..(i - 1) * v + limit], id));
        out_prompt.push(PromptToken {
            id,
            text: text_of(id),
            logprob: lp,
            prob: lp.map(f32::exp),
            surprisal_bits: lp.map(|l| -l / std::f32::consts::LN_2),
        });
    }
    let mut logits = all[(prompt.len() - 1) * v..prompt.len() * v].to_vec();
    let mut out_steps = Vec::new();
    for _ in 0..steps {
        let chosen = sampler.draw(&logits).token;
        let top_k = sampler.top(top);
        let kept = sampler.kept();
        out_steps.push(Step {
            candidates: top_k
                .candidates
                .iter()
                .map(|&(id, logit, prob)| Candidate {
                    id,
                    text: text_of(id),
                    logit,
                    prob,
                })
                .collect(),
            rest_logsumexp: top_k.rest_logsumexp,
            logsumexp: top_k.logsumexp,
            rest_prob: top_k.rest_prob,
            kept_count: kept.len(),
            kept: kept.into_iter().take(200).collect(),
            chosen,
            chosen_text: text_of(chosen),
            chosen_prob: sampler.prob_t1(chosen),
        });
        if eos.contains(&chosen) || cache.len() >= cache.capacity() {
            break;
        }
        model.forward_cached(&mut cache, &[chosen], &mut logits, false)?;
    }
    Ok(Explanation {
        prompt: out_prompt,
        steps: out_steps,
        params: SamplingParamsView {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
        },
    })
}

//! How a model decides: for a prompt, each token's surprisal (−log₂ p under the model given
//! the tokens before it); for each generated token, the softmax distribution it was drawn
//! from (the top candidates at temperature 1, the rest summed), the set the
//! temperature/top-k/top-p cut kept, and the token drawn. Shared by `quill explain` and the
//! server's explain view.

use crate::model::Model;
use crate::sample::{apply_repetition_penalty, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::Result;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct PromptToken {
    pub id: u32,
    pub text: String,
    /// ln p(token | tokens before it); None for the first token (nothing predicts it).
    pub logprob: Option<f32>,
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
}

fn logsumexp(xs: impl Iterator<Item = f32> + Clone) -> f32 {
    let mx = xs.clone().fold(f32::NEG_INFINITY, f32::max);
    if mx == f32::NEG_INFINITY {
        return mx;
    }
    (xs.map(|x| ((x - mx) as f64).exp()).sum::<f64>().ln() as f32) + mx
}

/// The prompt's surprisal and `steps` generated tokens with their distributions.
pub fn explain(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    steps: usize,
    params: SamplingParams,
    top: usize,
    eos: &[u32],
) -> Result<Explanation> {
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
    let mut cache = model.new_cache((prompt.len() + steps).min(ctx));
    let mut all = Vec::new();
    model.forward_cached(&mut cache, prompt, &mut all, true)?;
    let text_of = |id: u32| tok.decode(&[id]).unwrap_or_default();
    let mut out_prompt = Vec::with_capacity(prompt.len());
    for (i, &id) in prompt.iter().enumerate() {
        let lp = (i > 0).then(|| {
            let row = &all[(i - 1) * v..i * v];
            row[id as usize] - logsumexp(row[..limit].iter().copied())
        });
        out_prompt.push(PromptToken {
            id,
            text: text_of(id),
            logprob: lp,
            surprisal_bits: lp.map(|l| -l / std::f32::consts::LN_2),
        });
    }
    let mut logits = all[(prompt.len() - 1) * v..prompt.len() * v].to_vec();
    let mut history = prompt.to_vec();
    let mut out_steps = Vec::new();
    for _ in 0..steps {
        apply_repetition_penalty(&mut logits, &history, params.repetition_penalty);
        logits[limit..].fill(f32::NEG_INFINITY);
        let lse = logsumexp(logits.iter().copied());
        let mut order: Vec<u32> = (0..limit as u32).collect();
        let k = top.clamp(1, order.len());
        order.select_nth_unstable_by(k - 1, |a, b| {
            logits[*b as usize].total_cmp(&logits[*a as usize])
        });
        order.truncate(k);
        order.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        let in_top = |i: u32| order.contains(&i);
        let rest = logsumexp(
            (0..limit as u32)
                .filter(|&i| !in_top(i))
                .map(|i| logits[i as usize])
                .collect::<Vec<_>>()
                .into_iter(),
        );
        let kept = sampler.candidates(&logits);
        let chosen = sampler.sample(&logits);
        out_steps.push(Step {
            candidates: order
                .iter()
                .map(|&i| Candidate {
                    id: i,
                    text: text_of(i),
                    logit: logits[i as usize],
                    prob: (logits[i as usize] - lse).exp(),
                })
                .collect(),
            rest_logsumexp: rest,
            logsumexp: lse,
            kept_count: kept.len(),
            kept: kept.into_iter().take(200).collect(),
            chosen,
            chosen_text: text_of(chosen),
            chosen_prob: (logits[chosen as usize] - lse).exp(),
        });
        history.push(chosen);
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
        },
    })
}

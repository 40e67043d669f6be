//! How a model decides: for a prompt, each token's surprisal (−log₂ p under the model given
//! the tokens before it); for each generated token, the softmax distribution it was drawn
//! from (the top candidates at temperature 1, the rest summed), the set the
//! temperature/top-k/top-p/min-p cut kept, and the token drawn: all read from the
//! [`Sampler`] that drew it. Shared by `quill explain` and the
//! server's explain view, whose sliders ask [`recut`] for one step's cut under other
//! settings (the page computes no probabilities itself).

use crate::model::Model;
use crate::sample::{log_softmax_at, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
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

/// One of the most likely tokens under a [`Cut`].
#[derive(Debug, Serialize)]
pub struct CutCandidate {
    pub id: u32,
    pub text: String,
    /// Its probability after the penalties and the temperature, before the cut (at
    /// temperature 1 when greedy).
    pub prob: f32,
    /// Whether the cut kept it, and its probability among what was kept (0 when cut).
    pub kept: bool,
    pub kept_prob: f32,
}

/// One step's distribution under some sampling settings: what a draw would choose from.
#[derive(Debug, Serialize)]
pub struct Cut {
    /// The most likely tokens, most likely first.
    pub candidates: Vec<CutCandidate>,
    /// Every other token together: its probability before the cut, how many of them the cut
    /// kept and their probability among what was kept.
    pub rest_prob: f32,
    pub rest_kept: usize,
    pub rest_kept_prob: f32,
    /// How many tokens the cut kept in all.
    pub kept_count: usize,
    pub params: SamplingParamsView,
}

/// The cut a draw after `prompt` and `generated` (tokens drawn earlier, which the penalties
/// count) would make under `params`: the `top` most likely tokens and the rest together.
pub fn recut(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    generated: &[u32],
    params: SamplingParams,
    top: usize,
) -> Result<Cut> {
    let n = prompt.len() + generated.len();
    if prompt.is_empty() || n > model.context() {
        return Err(Error::Input(format!(
            "give a prompt of 1 to {} tokens with what was generated after it (got {n})",
            model.context()
        )));
    }
    let v = model.vocab_size();
    if let Some(&id) = prompt.iter().chain(generated).find(|&&i| i as usize >= v) {
        return Err(Error::Input(format!(
            "token id {id} is outside the vocabulary of {v}"
        )));
    }
    let text: Vec<u32> = prompt.iter().chain(generated).copied().collect();
    let mut cache = model.new_cache(n);
    let mut logits = Vec::new();
    model.forward_cached(&mut cache, &text, &mut logits, false)?;
    let mut sampler = Sampler::new(params.clone())?;
    sampler.start(prompt);
    generated.iter().for_each(|&id| sampler.accept(id));
    sampler.look(&logits);
    let kept = sampler.kept();
    let mut kept_prob = vec![None; sampler.distribution().len()];
    for &(id, p) in &kept {
        kept_prob[id as usize] = Some(p);
    }
    let probs = sampler.distribution();
    let ids: Vec<u32> = sampler.top(top).candidates.iter().map(|c| c.0).collect();
    let candidates: Vec<CutCandidate> = ids
        .iter()
        .map(|&id| CutCandidate {
            id,
            text: tok.decode(&[id]).unwrap_or_default(),
            prob: probs[id as usize],
            kept: kept_prob[id as usize].is_some(),
            kept_prob: kept_prob[id as usize].unwrap_or(0.0),
        })
        .collect();
    let mut shown = vec![false; probs.len()];
    ids.iter().for_each(|&id| shown[id as usize] = true);
    let rest =
        |x: &dyn Fn(usize) -> f64| -> f64 { (0..probs.len()).filter(|&i| !shown[i]).map(x).sum() };
    let rest_prob = rest(&|i| probs[i] as f64) as f32;
    let rest_kept_prob = rest(&|i| kept_prob[i].unwrap_or(0.0) as f64) as f32;
    let rest_kept = kept.iter().filter(|&&(id, _)| !shown[id as usize]).count();
    Ok(Cut {
        candidates,
        rest_prob,
        rest_kept,
        rest_kept_prob,
        kept_count: kept.len(),
        params: SamplingParamsView {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
        },
    })
}

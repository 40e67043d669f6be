//! Scoring a text: each token's log-probability under the model given the tokens before it,
//! the mean loss and bits per byte.

use super::sampler::logsumexp;
use crate::model::Model;
use crate::{Error, Result};

/// The model's log-probabilities of a token sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    /// (id, ln p(id | the ids before it)) for every id but the first (nothing predicts it).
    pub tokens: Vec<(u32, f64)>,
    /// Mean −ln p over the scored tokens (nats per token).
    pub mean_loss: f64,
    /// Σ −log₂ p / the UTF-8 bytes the scored tokens stand for.
    pub bits_per_byte: f64,
}

/// Scores `ids` (at least two, at most the context) with `model`; `token_bytes[id]` is the
/// number of UTF-8 bytes token `id` stands for (the tokenizer's `token_bytes`).
pub fn score(model: &Model, ids: &[u32], token_bytes: &[u32]) -> Result<Score> {
    if ids.len() < 2 {
        return Err(Error::Input(
            "the text needs at least two tokens to score (the first has nothing before it)".into(),
        ));
    }
    let all = model.logits_all(ids)?;
    let v = model.vocab_size();
    let (mut nats, mut bytes) = (0.0f64, 0u64);
    let tokens: Vec<(u32, f64)> = (1..ids.len())
        .map(|i| {
            let logits = &all[(i - 1) * v..i * v];
            let id = ids[i];
            let lp = logits[id as usize] as f64 - logsumexp(logits);
            nats -= lp;
            bytes += token_bytes.get(id as usize).copied().unwrap_or(0) as u64;
            (id, lp)
        })
        .collect();
    Ok(Score {
        mean_loss: nats / tokens.len() as f64,
        bits_per_byte: nats / std::f64::consts::LN_2 / bytes.max(1) as f64,
        tokens,
    })
}

/// A text's perplexity, measured as llama.cpp's `llama-perplexity` measures it: the tokens are
/// cut into consecutive chunks of the context length, and in each chunk only the second half
/// is scored (each of those tokens then has at least half a context before it).
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    pub chunks: usize,
    pub scored_tokens: usize,
    /// Mean −ln p over the scored tokens, and its exponential.
    pub mean_loss: f64,
    pub perplexity: f64,
    /// Σ −log₂ p / the UTF-8 bytes the scored tokens stand for.
    pub bits_per_byte: f64,
}

/// The perplexity of `ids` in chunks of `context` tokens (a text shorter than one chunk is
/// one chunk); `on_chunk(done, total, mean loss so far)` reports progress.
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    token_bytes: &[u32],
    context: usize,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<Perplexity> {
    let n = context.min(model.context()).min(ids.len());
    if n < 4 {
        return Err(Error::Input(format!(
            "perplexity needs a text of at least 4 tokens and a context of at least 4 (got {} tokens, context {context})",
            ids.len()
        )));
    }
    let chunks = ids.len() / n;
    let (mut nats, mut bytes, mut scored) = (0.0f64, 0u64, 0usize);
    for c in 0..chunks {
        let chunk = &ids[c * n..(c + 1) * n];
        let s = score(model, chunk, token_bytes)?;
        // s.tokens[i] predicts position i + 1: keep positions n/2 ..
        for &(id, lp) in &s.tokens[n / 2 - 1..] {
            nats -= lp;
            bytes += token_bytes.get(id as usize).copied().unwrap_or(0) as u64;
            scored += 1;
        }
        on_chunk(c + 1, chunks, nats / scored as f64);
    }
    let mean_loss = nats / scored as f64;
    Ok(Perplexity {
        chunks,
        scored_tokens: scored,
        mean_loss,
        perplexity: mean_loss.exp(),
        bits_per_byte: nats / std::f64::consts::LN_2 / bytes.max(1) as f64,
    })
}

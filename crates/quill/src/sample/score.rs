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

//! Beam search: keeps the `beams` most likely continuations instead of one, and returns the
//! finished one of highest length-normalised log-probability. The rules are those of
//! `transformers`' `generate(num_beams=k, do_sample=False)` (its defaults, `early_stopping`
//! false):
//!
//! - each step scores every live beam's every next token (the beam's summed log-probability
//!   plus the token's, under the model's own softmax, no processing) and takes the best
//!   max(2, 1 + |eos|) · k candidates in order;
//! - a candidate among the first k that ends (an `eos` id, or the `max_new`-th token) becomes
//!   a finished hypothesis, scored sum / n^length_penalty over its n generated tokens (the end
//!   token counted, and its log-probability in the sum); the best k candidates that do not end
//!   are the next step's beams;
//! - at most k hypotheses are kept (the best k); the search is done when k are kept and the
//!   best live beam, normalised by its length, does not beat the worst of them.
//!
//! The beams run as the segments of one batched step, so the weights are read once per step
//! for all of them; each beam has its own KV cache, copied from its parent's when beams
//! change places.

use super::sampler::logsumexp;
use crate::model::inference::{Cache, Rows, Scratch, Segment};
use crate::model::Model;
use crate::{Error, Result};

/// The search's width, length and length penalty (`transformers`' `num_beams`,
/// `max_new_tokens`, `length_penalty`; 1 divides a hypothesis's log-probability by its
/// length).
#[derive(Clone, Copy, Debug)]
pub struct BeamSearch {
    pub beams: usize,
    pub max_new: usize,
    pub length_penalty: f32,
}

/// The most beams a search runs.
pub const MAX_BEAMS: usize = 64;

/// A live beam: its generated tokens and summed log-probability.
#[derive(Clone)]
struct Beam {
    tokens: Vec<u32>,
    score: f64,
}

/// The finished hypotheses, at most k, with their normalised scores.
struct Finished {
    k: usize,
    penalty: f64,
    hyps: Vec<(f64, Vec<u32>)>,
}

impl Finished {
    fn normalised(&self, sum: f64, n: usize) -> f64 {
        sum / (n.max(1) as f64).powf(self.penalty)
    }

    /// A hypothesis of `n` generated tokens (`tokens`, without an end token) and summed
    /// log-probability `sum`.
    fn add(&mut self, tokens: Vec<u32>, sum: f64, n: usize) {
        let score = self.normalised(sum, n);
        if self.hyps.len() < self.k || score > self.worst() {
            self.hyps.push((score, tokens));
            if self.hyps.len() > self.k {
                let (i, _) = self
                    .hyps
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0))
                    .expect("non-empty");
                self.hyps.remove(i);
            }
        }
    }

    fn worst(&self) -> f64 {
        self.hyps.iter().map(|h| h.0).fold(f64::INFINITY, f64::min)
    }

    /// Done: k hypotheses, and the best live beam (`best_sum` over `generated` tokens) does
    /// not beat the worst.
    fn done(&self, best_sum: f64, generated: usize) -> bool {
        self.hyps.len() >= self.k && self.normalised(best_sum, generated) <= self.worst()
    }
}

/// The best `n` (token, log-probability) of one row of logits, best first (ties: the lower id).
fn top_logprobs_of(logits: &[f32], n: usize, out: &mut Vec<(u32, f64)>) {
    out.clear();
    let lse = logsumexp(logits);
    for (i, &x) in logits.iter().enumerate() {
        if out.len() == n && x as f64 - lse <= out[n - 1].1 {
            continue;
        }
        let lp = x as f64 - lse;
        let at = out.partition_point(|&(_, p)| p >= lp);
        out.insert(at, (i as u32, lp));
        out.truncate(n);
    }
}

/// The tokens of the best hypothesis after `prompt` (without its end token), by beam search.
pub fn beam_search(model: &Model, prompt: &[u32], eos: &[u32], b: BeamSearch) -> Result<Vec<u32>> {
    let k = b.beams;
    if !(1..=MAX_BEAMS).contains(&k) {
        return Err(Error::Input(format!(
            "the number of beams must be 1 to {MAX_BEAMS} (got {k})"
        )));
    }
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty (no tokens)".into()));
    }
    let ctx = model.context();
    if prompt.len() >= ctx {
        return Err(Error::Input(format!(
            "the prompt ({} tokens) leaves no room in the model's context of {ctx} positions",
            prompt.len()
        )));
    }
    // no beam can grow past the context
    let max_new = b.max_new.min(ctx - prompt.len());
    if max_new == 0 {
        return Ok(Vec::new());
    }
    let cap = prompt.len() + max_new;
    let mut caches: Vec<Cache> = (0..k).map(|_| model.new_cache(cap)).collect();
    let mut spare: Vec<Cache> = (0..k).map(|_| model.new_cache(cap)).collect();
    let mut logits = Vec::new();
    model.forward_cached(&mut caches[0], prompt, &mut logits, false)?;
    let mut beams = vec![Beam {
        tokens: Vec::new(),
        score: 0.0,
    }];
    let mut finished = Finished {
        k,
        penalty: b.length_penalty as f64,
        hyps: Vec::new(),
    };
    let v = model.vocab;
    let keep = 2.max(1 + eos.len()) * k;
    let (mut top, mut cands, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    let mut scratch = Scratch::default();
    let mut generated = 0;
    loop {
        // the best candidates over every beam: (score, beam, token)
        cands.clear();
        for (i, beam) in beams.iter().enumerate() {
            top_logprobs_of(&logits[i * v..(i + 1) * v], keep, &mut top);
            cands.extend(top.iter().map(|&(t, lp)| (beam.score + lp, i, t)));
        }
        // best first; ties: the earlier beam, then the lower id
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        cands.truncate(keep);
        generated += 1;
        let last = generated == max_new;
        let mut next: Vec<(usize, u32, f64)> = Vec::with_capacity(k);
        for (rank, &(score, i, t)) in cands.iter().enumerate() {
            let ends = eos.contains(&t);
            if ends || last {
                if rank < k {
                    let mut tokens = beams[i].tokens.clone();
                    if !ends {
                        tokens.push(t);
                    }
                    finished.add(tokens, score, generated);
                }
            } else if next.len() < k {
                next.push((i, t, score));
            }
        }
        if last || next.is_empty() || finished.done(next[0].2, generated) {
            return Ok(best(finished));
        }
        // the new beams, each continuing its parent's cache: a parent's first child takes
        // its cache over (a swap), the others copy it (before any is taken)
        let mut taken = [false; MAX_BEAMS];
        let first: Vec<bool> = next
            .iter()
            .map(|&(i, _, _)| !std::mem::replace(&mut taken[i], true))
            .collect();
        for (j, &(i, _, _)) in next.iter().enumerate() {
            if !first[j] {
                spare[j].copy_from(&caches[i]);
            }
        }
        for (j, &(i, _, _)) in next.iter().enumerate() {
            if first[j] {
                std::mem::swap(&mut spare[j], &mut caches[i]);
            }
        }
        std::mem::swap(&mut caches, &mut spare);
        beams = next
            .iter()
            .map(|&(i, t, score)| {
                let mut tokens = beams[i].tokens.clone();
                tokens.push(t);
                Beam { tokens, score }
            })
            .collect();
        ids.clear();
        ids.extend(next.iter().map(|&(_, t, _)| t));
        let mut segs: Vec<Segment> = caches
            .iter_mut()
            .zip(ids.chunks(1))
            .map(|(cache, ids)| Segment { cache, ids })
            .collect();
        model.step(&mut segs, Rows::Last, &mut logits, &mut scratch)?;
    }
}

fn best(f: Finished) -> Vec<u32> {
    f.hyps
        .into_iter()
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|h| h.1)
        .unwrap_or_default()
}

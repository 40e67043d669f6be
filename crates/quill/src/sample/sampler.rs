//! The sampler: penalties -> temperature -> softmax -> top-k -> top-p -> min-p -> draw, and the
//! log-probability helpers the rest of quill reads (see the room's documentation).

use crate::rng::Rng;
use crate::{Error, Result};
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: no limit).
    pub top_p: f32,
    /// Keep only tokens at least this fraction as likely as the most likely one (0: off).
    pub min_p: f32,
    /// `transformers`' repetition penalty: the logit of every token already in the text
    /// (prompt included) is divided by it when positive, multiplied when negative (1: off).
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty: subtracted once from the logit of every token generated
    /// so far (0: off).
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted from a token's logit once per time it was
    /// generated so far (0: off).
    pub frequency_penalty: f32,
    /// Only ids below this can be drawn (0: no limit). Models often have more rows in their
    /// LM head than their tokenizer has tokens; ids without text are never chosen.
    pub vocab_limit: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            vocab_limit: 0,
            seed: 1337,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Input(format!(
                "temperature must be a finite number >= 0 (got {})",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!(
                "top-p must be in (0, 1] (got {})",
                self.top_p
            )));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::Input(format!(
                "min-p must be in [0, 1] (got {})",
                self.min_p
            )));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::Input(format!(
                "repetition penalty must be > 0 (got {})",
                self.repetition_penalty
            )));
        }
        for (name, v) in [
            ("presence penalty", self.presence_penalty),
            ("frequency penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::Input(format!("{name} must be in [-2, 2] (got {v})")));
            }
        }
        Ok(())
    }

    /// Whether anything cuts the distribution before the draw.
    fn cuts(&self) -> bool {
        self.top_k > 0 || self.top_p < 1.0 || self.min_p > 0.0
    }
}

/// softmax(logits / temperature), computed stably (max subtracted).
fn softmax(logits: &[f32], temperature: f32, probs: &mut Vec<f32>) {
    let mx = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    probs.clear();
    let mut sum = 0.0f64;
    for &l in logits {
        let e = ((l - mx) / temperature).exp();
        sum += e as f64;
        probs.push(e);
    }
    let inv = (1.0 / sum) as f32;
    probs.iter_mut().for_each(|p| *p *= inv);
}

/// log Σ exp(x), stably, in f64; −∞ for no values (or all −∞).
pub fn logsumexp(xs: &[f32]) -> f64 {
    let mx = xs.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if mx == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let s: f64 = xs.iter().map(|&x| ((x - mx) as f64).exp()).sum();
    s.ln() + mx as f64
}

/// ln softmax(logits)[id]: the model's log-probability of `id`.
pub fn log_softmax_at(logits: &[f32], id: u32) -> f32 {
    (logits[id as usize] as f64 - logsumexp(logits)) as f32
}

/// The `k` most likely ids with their log-probabilities under softmax(logits), most likely
/// first (ties by id).
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let lse = logsumexp(logits);
    most_likely(logits, k)
        .into_iter()
        .map(|i| (i, (logits[i as usize] as f64 - lse) as f32))
        .collect()
}

/// The `k` ids of the largest values, largest first (ties by id).
fn most_likely(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let by = |a: &u32, b: &u32| {
        values[*b as usize]
            .total_cmp(&values[*a as usize])
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(k - 1, by);
    idx.truncate(k);
    idx.sort_unstable_by(by);
    idx
}

/// Index of the largest value (the first on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// The most likely tokens of a distribution, for display.
#[derive(Clone, Debug, PartialEq)]
pub struct Top {
    /// (id, logit, probability), most likely first.
    pub candidates: Vec<(u32, f32, f32)>,
    /// log Σ exp(logit) over every other token, and over all.
    pub rest_logsumexp: f32,
    pub logsumexp: f32,
    /// The probability of every other token together.
    pub rest_prob: f32,
}

/// What one draw chose.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    pub token: u32,
    /// ln p(token) under the model's own distribution (before penalties and temperature),
    /// over the drawable ids.
    pub logprob: f32,
}

/// The logits processor and draw: deterministic (the same seed, logits and history give the
/// same tokens). It remembers the text so far: the context it was started with (for the
/// repetition penalty) and the tokens it drew (for every penalty).
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    /// The processed logits of the last draw (penalties applied, drawable ids only).
    logits: Vec<f32>,
    /// softmax(logits / temperature) (temperature 1 when greedy).
    probs: Vec<f32>,
    /// The kept ids, most likely first (filled on demand when nothing cuts).
    order: Vec<u32>,
    order_ready: bool,
    /// Every token of the text so far, and how often each generated token appeared.
    history: Vec<u32>,
    seen: HashMap<u32, u32>,
    generated: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = Rng::new(params.seed);
        Ok(Sampler {
            params,
            rng,
            logits: Vec::new(),
            probs: Vec::new(),
            order: Vec::new(),
            order_ready: false,
            history: Vec::new(),
            seen: HashMap::new(),
            generated: HashMap::new(),
        })
    }

    /// Starts a new text from `context` (the prompt): the repetition penalty counts its
    /// tokens; the presence and frequency penalties count only generated ones.
    pub fn start(&mut self, context: &[u32]) {
        self.history.clear();
        self.seen.clear();
        self.generated.clear();
        for &id in context {
            self.history.push(id);
            *self.seen.entry(id).or_insert(0) += 1;
        }
    }

    /// Processes `logits` (the next position's, [V]), draws a token and adds it to the text.
    pub fn draw(&mut self, logits: &[f32]) -> Draw {
        let logits = self.look(logits);
        let token = self.choose();
        self.record(token);
        Draw {
            token,
            logprob: log_softmax_at(logits, token),
        }
    }

    /// Processes `logits` as a draw would (penalties, temperature, the cut) without drawing:
    /// afterwards [`distribution`](Self::distribution), [`top`](Self::top) and
    /// [`kept`](Self::kept) describe what a draw would choose from. Returns the drawable ids'
    /// logits.
    pub fn look<'a>(&mut self, logits: &'a [f32]) -> &'a [f32] {
        let limit = match self.params.vocab_limit {
            0 => logits.len(),
            l => l.min(logits.len()),
        };
        let logits = &logits[..limit];
        self.process(logits);
        logits
    }

    /// Adds a token to the text as if it had been drawn (for the penalties): replays a
    /// generation made earlier.
    pub fn accept(&mut self, token: u32) {
        self.record(token);
    }

    /// Adds a drawn token to the text.
    fn record(&mut self, token: u32) {
        self.history.push(token);
        *self.seen.entry(token).or_insert(0) += 1;
        *self.generated.entry(token).or_insert(0) += 1;
    }

    /// The text so far: the context, then every accepted token.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Penalties, then softmax at the temperature, then the cut.
    fn process(&mut self, logits: &[f32]) {
        let p = &self.params;
        self.logits.clear();
        self.logits.extend_from_slice(logits);
        if p.repetition_penalty != 1.0 {
            for &id in self.seen.keys() {
                if let Some(l) = self.logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &count) in &self.generated {
                if let Some(l) = self.logits.get_mut(id as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
        let t = if p.temperature == 0.0 {
            1.0
        } else {
            p.temperature
        };
        softmax(&self.logits, t, &mut self.probs);
        self.order_ready = false;
        if p.temperature == 0.0 {
            self.order.clear();
            self.order.push(argmax(&self.logits));
            self.order_ready = true;
        } else if p.cuts() {
            self.cut();
        }
    }

    /// Fills `order` with the kept ids, most likely first: top-k, then top-p, then min-p.
    fn cut(&mut self) {
        let p = &self.params;
        let probs = &self.probs;
        self.order.clear();
        self.order.extend(0..probs.len() as u32);
        let by_prob = |a: &u32, b: &u32| {
            probs[*b as usize]
                .total_cmp(&probs[*a as usize])
                .then(a.cmp(b))
        };
        if p.top_k > 0 && p.top_k < self.order.len() {
            self.order.select_nth_unstable_by(p.top_k - 1, by_prob);
            self.order.truncate(p.top_k);
        }
        self.order.sort_unstable_by(by_prob);
        if p.top_p < 1.0 {
            let total: f32 = self.order.iter().map(|&i| probs[i as usize]).sum();
            let mut cum = 0.0;
            let mut keep = self.order.len();
            for (n, &i) in self.order.iter().enumerate() {
                cum += probs[i as usize] / total;
                if cum >= p.top_p {
                    keep = n + 1;
                    break;
                }
            }
            self.order.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[self.order[0] as usize];
            let keep = self
                .order
                .iter()
                .take_while(|&&i| probs[i as usize] >= floor)
                .count();
            self.order.truncate(keep.max(1));
        }
        self.order_ready = true;
    }

    /// Draws from what the cut kept (straight from the softmax when nothing cuts).
    fn choose(&mut self) -> u32 {
        if self.params.temperature == 0.0 {
            return self.order[0];
        }
        if !self.order_ready {
            let u = self.rng.uniform() as f32;
            let mut cum = 0.0;
            for (i, &pr) in self.probs.iter().enumerate() {
                cum += pr;
                if u < cum {
                    return i as u32;
                }
            }
            return argmax(&self.probs);
        }
        let total: f32 = self.order.iter().map(|&i| self.probs[i as usize]).sum();
        let u = self.rng.uniform() as f32 * total;
        let mut cum = 0.0;
        for &i in &self.order {
            cum += self.probs[i as usize];
            if u < cum {
                return i;
            }
        }
        self.order[0]
    }

    /// The distribution of the last draw before the cut: softmax of the penalised logits at
    /// the temperature (at 1 when greedy), over the drawable ids.
    pub fn distribution(&self) -> &[f32] {
        &self.probs
    }

    /// The penalised logits of the last draw.
    pub fn processed_logits(&self) -> &[f32] {
        &self.logits
    }

    /// The last draw's penalised distribution at temperature 1 (what the model, with the
    /// penalties, says before temperature and the cut): its `k` most likely ids, and the
    /// rest taken together.
    pub fn top(&self, k: usize) -> Top {
        let lse = logsumexp(&self.logits);
        let p = |l: f32| ((l as f64 - lse).exp()) as f32;
        let ids = most_likely(&self.logits, k.max(1));
        let rest: Vec<f32> = {
            let mut top = vec![false; self.logits.len()];
            ids.iter().for_each(|&i| top[i as usize] = true);
            (0..self.logits.len())
                .filter(|&i| !top[i])
                .map(|i| self.logits[i])
                .collect()
        };
        let rest_lse = logsumexp(&rest);
        Top {
            candidates: ids
                .iter()
                .map(|&i| (i, self.logits[i as usize], p(self.logits[i as usize])))
                .collect(),
            rest_logsumexp: rest_lse as f32,
            logsumexp: lse as f32,
            rest_prob: (rest_lse - lse).exp() as f32,
        }
    }

    /// p(id) under the last draw's penalised distribution at temperature 1.
    pub fn prob_t1(&self, id: u32) -> f32 {
        let l = self
            .logits
            .get(id as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY);
        ((l as f64 - logsumexp(&self.logits)).exp()) as f32
    }

    /// What the cut of the last draw kept, most likely first, with renormalised
    /// probabilities (greedy keeps one token).
    pub fn kept(&mut self) -> Vec<(u32, f32)> {
        if !self.order_ready {
            self.cut();
        }
        let total: f32 = self.order.iter().map(|&i| self.probs[i as usize]).sum();
        self.order
            .iter()
            .map(|&i| (i, self.probs[i as usize] / total))
            .collect()
    }
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;

//! Sampling: turn the last position's logits into a probability distribution with softmax,
//! cut it (temperature -> top-k -> top-p), and draw the next token from what is left.
//! Temperature 0 means greedy: the most likely token.

mod generate;
pub use generate::{generate, GenerateEvent};

use crate::rng::Rng;
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy; otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: no limit).
    pub top_p: f32,
    /// `transformers`' repetition penalty: the logit of every token already in the text is
    /// divided by it when positive, multiplied when negative (1: off).
    pub repetition_penalty: f32,
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
            repetition_penalty: 1.0,
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
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::Input(format!(
                "repetition penalty must be > 0 (got {})",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// Applies a repetition penalty in place to the logits of every distinct id in `history`.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for &id in history {
        if seen.insert(id) {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// softmax(logits / temperature), computed stably (max subtracted).
pub fn softmax(logits: &[f32], temperature: f32, probs: &mut Vec<f32>) {
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

/// A deterministic sampler: the same seed and logits give the same tokens.
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    probs: Vec<f32>,
    order: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = Rng::new(params.seed);
        Ok(Sampler {
            params,
            rng,
            probs: Vec::new(),
            order: Vec::new(),
        })
    }

    /// The kept candidates after the cut, most likely first, with their renormalised
    /// probabilities (for display and tests). Greedy keeps one.
    pub fn candidates(&mut self, logits: &[f32]) -> Vec<(u32, f32)> {
        if self.params.temperature == 0.0 {
            return vec![(argmax(logits), 1.0)];
        }
        self.cut(logits);
        let total: f32 = self.order.iter().map(|&i| self.probs[i as usize]).sum();
        self.order
            .iter()
            .map(|&i| (i, self.probs[i as usize] / total))
            .collect()
    }

    /// Fills `order` with the kept token ids, most likely first.
    fn cut(&mut self, logits: &[f32]) {
        let p = &self.params;
        softmax(logits, p.temperature, &mut self.probs);
        let probs = &self.probs;
        self.order.clear();
        self.order.extend(0..logits.len() as u32);
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
    }

    /// Draws the next token from the logits of the last position.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        if p.top_k == 0 && p.top_p >= 1.0 {
            // no cut: draw straight from the softmax, no sort needed
            softmax(logits, p.temperature, &mut self.probs);
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
        self.cut(logits);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: usize, p: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            seed: 5,
            ..Default::default()
        }
    }

    #[test]
    fn softmax_is_a_distribution_and_temperature_sharpens() {
        let logits = [1.0, 2.0, 3.0, -1.0];
        let mut p = vec![];
        softmax(&logits, 1.0, &mut p);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let want = (3.0f32).exp() / logits.iter().map(|l: &f32| l.exp()).sum::<f32>();
        assert!((p[2] - want).abs() < 1e-6);
        let mut cold = vec![];
        softmax(&logits, 0.5, &mut cold);
        assert!(cold[2] > p[2]);
    }

    #[test]
    fn greedy_top_k_and_top_p_cut_as_defined() {
        let logits = [0.0, 3.0, 1.0, 2.0, -5.0];
        let mut s = Sampler::new(params(0.0, 0, 1.0)).unwrap();
        assert_eq!(s.sample(&logits), 1);
        let mut s = Sampler::new(params(1.0, 2, 1.0)).unwrap();
        let ids: Vec<u32> = s.candidates(&logits).iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![1, 3]);
        for _ in 0..200 {
            assert!([1, 3].contains(&s.sample(&logits)));
        }
        // probabilities: ~0.64, 0.24, 0.09, 0.03, ... ; p = 0.8 keeps the first two
        let mut s = Sampler::new(params(1.0, 0, 0.8)).unwrap();
        let c = s.candidates(&logits);
        assert_eq!(c.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((c.iter().map(|c| c.1).sum::<f32>() - 1.0).abs() < 1e-6);
        // a tiny p keeps only the best
        let mut s = Sampler::new(params(1.0, 0, 1e-6)).unwrap();
        assert_eq!(s.candidates(&logits).len(), 1);
    }

    #[test]
    fn draws_follow_the_distribution_and_seed_reproduces() {
        let logits = [0.0f32, 1.0, 2.0];
        let mut probs = vec![];
        softmax(&logits, 1.0, &mut probs);
        let mut s = Sampler::new(params(1.0, 0, 1.0)).unwrap();
        let n = 60_000;
        let mut counts = [0usize; 3];
        let first: Vec<u32> = (0..20).map(|_| s.sample(&logits)).collect();
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        for i in 0..3 {
            assert!(
                (counts[i] as f32 / n as f32 - probs[i]).abs() < 0.01,
                "{counts:?}"
            );
        }
        let mut again = Sampler::new(params(1.0, 0, 1.0)).unwrap();
        assert_eq!(
            first,
            (0..20).map(|_| again.sample(&logits)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(Sampler::new(params(-0.1, 0, 1.0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 0.0)).is_err());
        assert!(Sampler::new(params(1.0, 0, 1.5)).is_err());
        assert!(Sampler::new(params(f32::NAN, 0, 1.0)).is_err());
    }
}

//! Training data: a token sequence split into train and validation parts, random training
//! windows drawn from a seeded generator, and the validation split cut into windows that
//! predict every validation token exactly once.

use crate::kernels::crossentropy::IGNORE;
use crate::rng::Rng;
use crate::{Error, Result};

pub struct Split {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

/// The first (1 - val_fraction) of the tokens train, the rest validate.
pub fn split(tokens: Vec<u32>, val_fraction: f64, context: usize) -> Result<Split> {
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(Error::Input(format!(
            "validation fraction {val_fraction} must be in [0, 1)"
        )));
    }
    let n_val = (tokens.len() as f64 * val_fraction) as usize;
    let n_train = tokens.len() - n_val;
    if n_train < context + 1 {
        return Err(Error::Input(format!(
            "the training split has {n_train} tokens; at least {} are needed for a context of {context}",
            context + 1
        )));
    }
    let mut train = tokens;
    let val = train.split_off(n_train);
    Ok(Split { train, val })
}

/// ids/targets [B, T] from random windows of `data`: targets are the ids shifted by one.
pub fn sample_batch(
    rng: &mut Rng,
    data: &[u32],
    b: usize,
    t: usize,
    ids: &mut [u32],
    targets: &mut [u32],
) {
    for bi in 0..b {
        let start = rng.below(data.len() - t);
        ids[bi * t..(bi + 1) * t].copy_from_slice(&data[start..start + t]);
        targets[bi * t..(bi + 1) * t].copy_from_slice(&data[start + 1..start + t + 1]);
    }
}

/// Number of evaluation windows of length t over `data` (consecutive, non-overlapping).
pub fn eval_windows(data: &[u32], t: usize) -> usize {
    data.len().saturating_sub(1).div_ceil(t)
}

/// Fills ids/targets [B, T] with windows first..first+B; positions past the end are padding
/// with IGNORE targets (causal attention keeps them from affecting the real positions).
pub fn eval_batch(
    data: &[u32],
    t: usize,
    first: usize,
    b: usize,
    ids: &mut [u32],
    targets: &mut [u32],
) {
    let last = data.len().saturating_sub(1);
    for bi in 0..b {
        for ti in 0..t {
            let pos = (first + bi) * t + ti;
            let k = bi * t + ti;
            if pos < last {
                ids[k] = data[pos];
                targets[k] = data[pos + 1];
            } else {
                ids[k] = 0;
                targets[k] = IGNORE;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_windows_predict_each_token_once() {
        let data: Vec<u32> = (0..23).collect();
        let t = 5;
        let w = eval_windows(&data, t);
        assert_eq!(w, 5);
        let mut seen = vec![];
        let (mut ids, mut tg) = (vec![0; 2 * t], vec![0; 2 * t]);
        let mut first = 0;
        while first < w {
            eval_batch(&data, t, first, 2, &mut ids, &mut tg);
            for k in 0..2 * t {
                if tg[k] != IGNORE {
                    assert_eq!(tg[k], ids[k] + 1);
                    seen.push(tg[k]);
                }
            }
            first += 2;
        }
        assert_eq!(seen, (1..23).collect::<Vec<u32>>());
    }

    #[test]
    fn batches_are_shifted_windows_and_split_checks_sizes() {
        let s = split((0..100).collect(), 0.1, 8).unwrap();
        assert_eq!((s.train.len(), s.val.len(), s.val[0]), (90, 10, 90));
        assert!(split((0..5).collect(), 0.1, 8).is_err());
        let mut rng = Rng::new(1);
        let (mut ids, mut tg) = (vec![0; 24], vec![0; 24]);
        sample_batch(&mut rng, &s.train, 3, 8, &mut ids, &mut tg);
        for k in 0..24 {
            assert_eq!(tg[k], ids[k] + 1);
        }
    }
}

//! Softmax + cross-entropy, fused: the loss of each row and, in place, its gradient.
//! loss = logsumexp(logits) - logits[target]; d loss / d logits = softmax(logits) - onehot(target).

use super::rows_per_task;
use rayon::prelude::*;

/// A target that takes no part in the loss (HF's -100).
pub const IGNORE: u32 = u32::MAX;

#[inline(always)]
fn logsumexp(row: &[f32]) -> f32 {
    let mx = super::math::max(row);
    let mut acc = [0.0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&v| super::math::exp(v - mx))
        .sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += super::math::exp(c[i] - mx);
        }
    }
    (acc.iter().sum::<f32>() + tail).ln() + mx
}

/// losses [N] = cross-entropy of each row of logits [N,V] (0 where the target is IGNORE).
pub fn forward(losses: &mut [f32], logits: &[f32], targets: &[u32], v: usize) {
    let n = targets.len();
    assert!(logits.len() >= n * v && losses.len() >= n);
    losses[..n]
        .par_iter_mut()
        .zip(logits.par_chunks(v).zip(targets.par_iter()))
        .for_each(|(l, (row, &tg))| *l = row_loss(row, tg));
}

super::simd::multiversion! {
    fn row_loss(row: &[f32], tg: u32) -> f32 {
        if tg == IGNORE {
            0.0
        } else {
            logsumexp(row) - row[tg as usize]
        }
    }
}

/// Fills losses [N] and overwrites logits [N,V] with grad_scale · d loss_row / d logits
/// (zero rows where the target is IGNORE). No second vocabulary-sized buffer is kept. With
/// `round_bf16`, each gradient is then rounded to bf16 (to nearest even), while its row is
/// still in cache: for bf16 products that would round it anyway, once per product, over the
/// whole [N, V] buffer.
pub fn forward_backward_inplace(
    logits: &mut [f32],
    losses: &mut [f32],
    targets: &[u32],
    v: usize,
    (grad_scale, round_bf16): (f32, bool),
) {
    let n = targets.len();
    assert!(logits.len() >= n * v && losses.len() >= n);
    let rpt = rows_per_task(n, v);
    logits[..n * v]
        .par_chunks_mut(rpt * v)
        .zip(losses[..n].par_chunks_mut(rpt).zip(targets.par_chunks(rpt)))
        .for_each(|(lg, (ls, tg))| rows_backward(lg, ls, tg, v, (grad_scale, round_bf16)));
}

super::simd::multiversion! {
    fn rows_backward(lg: &mut [f32], ls: &mut [f32], tg: &[u32], v: usize, scale_round: (f32, bool)) {
            let (grad_scale, round) = scale_round;
            for (r, (&t, l)) in tg.iter().zip(ls.iter_mut()).enumerate() {
                let row = &mut lg[r * v..(r + 1) * v];
                if t == IGNORE {
                    *l = 0.0;
                    row.fill(0.0);
                    continue;
                }
                let lse = logsumexp(row);
                *l = lse - row[t as usize];
                for x in row.iter_mut() {
                    *x = super::math::exp(*x - lse) * grad_scale;
                }
                row[t as usize] -= grad_scale;
                if round {
                    super::bf16::round_in_place(row);
                }
            }
    }
}

/// (Σ losses, count) over the positions whose target is not [`IGNORE`].
pub fn sum_counted(losses: &[f32], targets: &[u32]) -> (f64, usize) {
    let mut sum = 0.0f64;
    let mut count = 0;
    for (&l, &t) in losses.iter().zip(targets) {
        if t != IGNORE {
            sum += l as f64;
            count += 1;
        }
    }
    (sum, count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bf16::{bf16_to_f32, round_bf16};
    use crate::kernels::{reference, testutil::*};
    use crate::rng::Rng;

    #[test]
    fn loss_and_gradient_match_reference_and_finite_differences() {
        let mut rng = Rng::new(8);
        let (n, v) = (7, 13);
        let logits = randn(&mut rng, n * v, 3.0);
        let targets: Vec<u32> = (0..n as u32)
            .map(|i| if i == 3 { IGNORE } else { (i * 5) % v as u32 })
            .collect();
        let counted = 6.0;
        let mut losses = vec![0.0; n];
        forward(&mut losses, &logits, &targets, v);
        let mean = losses.iter().sum::<f32>() / counted;
        let want = reference::cross_entropy(&to_f64(&logits), &targets, v);
        assert!((mean as f64 - want).abs() < 1e-5);

        let mut g = logits.clone();
        let mut l2 = vec![0.0; n];
        forward_backward_inplace(&mut g, &mut l2, &targets, v, (1.0 / counted, false));
        assert_eq!(losses, l2);
        let fd = finite_diff(&to_f64(&logits), |x| {
            reference::cross_entropy(x, &targets, v)
        });
        assert!(max_rel_err(&g, &fd, 1e-2) < 1e-5);

        // rounded to bf16 as written: exactly the gradient, rounded afterwards
        let mut r = logits.clone();
        forward_backward_inplace(&mut r, &mut l2, &targets, v, (1.0 / counted, true));
        assert_eq!(losses, l2);
        let want: Vec<f32> = g.iter().map(|&x| bf16_to_f32(round_bf16(x))).collect();
        assert_eq!(r, want);
        assert_ne!(r, g, "rounding changed nothing");
    }
}

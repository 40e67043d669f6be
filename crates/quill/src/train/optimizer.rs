//! AdamW with decoupled weight decay (Loshchilov & Hutter), as PyTorch's `torch.optim.AdamW`:
//! decay applies to matrices only (embeddings included), not to biases or norm weights.

use crate::model::ParamLayout;
use rayon::prelude::*;

pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// First and second moments, same layout as the parameters.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Number of updates done.
    pub t: u64,
}

const CHUNK: usize = 1 << 14;

impl AdamW {
    pub fn new(n: usize, beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    pub fn step(&mut self, layout: &ParamLayout, params: &mut [f32], grads: &[f32], lr: f32) {
        self.t += 1;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let bc1 = 1.0 - (b1 as f64).powi(self.t as i32);
        let bc2 = 1.0 - (b2 as f64).powi(self.t as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        for spec in &layout.tensors {
            let decay = if spec.is_matrix() {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            let r = spec.view.offset..spec.view.offset + spec.view.len;
            params[r.clone()]
                .par_chunks_mut(CHUNK)
                .zip(grads[r.clone()].par_chunks(CHUNK))
                .zip(
                    self.m[r.clone()]
                        .par_chunks_mut(CHUNK)
                        .zip(self.v[r].par_chunks_mut(CHUNK)),
                )
                .for_each(|((p, g), (m, v))| {
                    for i in 0..p.len() {
                        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                        let denom = v[i].sqrt() * inv_sqrt_bc2 + eps;
                        p[i] = p[i] * decay - step_size * m[i] / denom;
                    }
                });
        }
    }
}

/// The global L2 norm of the gradient, summed in fixed chunks and a fixed order so the
/// result does not depend on the thread count.
pub fn grad_norm(grads: &[f32]) -> f32 {
    let partial: Vec<f64> = grads
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>())
        .collect();
    partial.iter().sum::<f64>().sqrt() as f32
}

/// Scales the gradient down so its norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = grad_norm(grads);
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        grads.par_iter_mut().for_each(|g| *g *= s);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One scalar AdamW step written out from the paper's algorithm, in f64.
    fn reference_step(p: f64, g: f64, m: &mut f64, v: &mut f64, t: i32, lr: f64, wd: f64) -> f64 {
        let (b1, b2, eps) = (0.9, 0.95, 1e-8);
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        let mhat = *m / (1.0 - b1.powi(t));
        let vhat = *v / (1.0 - b2.powi(t));
        p * (1.0 - lr * wd) - lr * mhat / (vhat.sqrt() + eps)
    }

    #[test]
    fn matches_written_out_adamw_and_decays_matrices_only() {
        let mut layout = ParamLayout::default();
        layout.push("w", &[2, 2]);
        layout.push("b", &[3]);
        let mut params = vec![0.5f32, -1.0, 2.0, 0.1, 1.0, -0.3, 0.7];
        let mut opt = AdamW::new(7, 0.9, 0.95, 1e-8, 0.1);
        let mut want: Vec<f64> = params.iter().map(|&p| p as f64).collect();
        let (mut m, mut v) = (vec![0.0; 7], vec![0.0; 7]);
        for t in 1..=5 {
            let grads: Vec<f32> = (0..7).map(|i| ((i * t) as f32 * 0.7).sin()).collect();
            opt.step(&layout, &mut params, &grads, 0.01);
            for i in 0..7 {
                let wd = if i < 4 { 0.1 } else { 0.0 };
                want[i] =
                    reference_step(want[i], grads[i] as f64, &mut m[i], &mut v[i], t, 0.01, wd);
            }
        }
        for i in 0..7 {
            assert!(
                (params[i] as f64 - want[i]).abs() < 1e-6,
                "{i}: {} vs {}",
                params[i],
                want[i]
            );
        }
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
        let mut small = vec![0.3f32, 0.4];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.3, 0.4]);
    }
}

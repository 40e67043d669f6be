//! AdamW with decoupled weight decay (Loshchilov & Hutter), as PyTorch's `torch.optim.AdamW`:
//! decay applies to matrices only (embeddings included), not to biases or norm weights.

use crate::kernels::simd::multiversion;
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
    /// A learning-rate factor per tensor of the layout (LoRA+'s larger rate for B); empty
    /// when every tensor learns at the schedule's rate.
    pub lr_factors: Vec<f32>,
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
            lr_factors: Vec::new(),
        }
    }

    pub fn step(&mut self, layout: &ParamLayout, params: &mut [f32], grads: &[f32], lr: f32) {
        self.update(layout, (params, 0), grads, lr, 1.0);
    }

    /// AdamW on the part of the flat parameter vector that starts at `offset` (a rank's
    /// shard in a ZeRO-1 run): `params` and `grads` are that part, `m` and `v` hold its
    /// moments alone, and `g_scale` multiplies the gradient (clipping's factor, from the
    /// whole gradient's norm).
    pub fn step_part(
        &mut self,
        layout: &ParamLayout,
        (params, offset): (&mut [f32], usize),
        grads: &[f32],
        lr: f32,
        g_scale: f32,
    ) {
        self.update(layout, (params, offset), grads, lr, g_scale);
    }

    /// Gradient clipping and the update in one: the global norm of `grads` is measured, and
    /// when it exceeds `max_norm` (> 0) every gradient is scaled by max_norm / (norm + 1e-6)
    /// as it is read, as `clip_grad_norm` followed by `step` would do, without the pass that
    /// rescales the gradient in memory. Returns the norm before clipping.
    pub fn step_clipped(
        &mut self,
        layout: &ParamLayout,
        params: &mut [f32],
        grads: &[f32],
        lr: f32,
        max_norm: f32,
    ) -> f32 {
        let norm = grad_norm(grads);
        self.update(layout, (params, 0), grads, lr, clip_scale(norm, max_norm));
        norm
    }

    /// One AdamW update with the gradient `grads · g_scale` of the parameters from `offset`
    /// on. The vector is cut into fixed chunks processed in parallel in one pass; each chunk
    /// applies the decay of the tensors it overlaps.
    fn update(
        &mut self,
        layout: &ParamLayout,
        (params, offset): (&mut [f32], usize),
        grads: &[f32],
        lr: f32,
        g_scale: f32,
    ) {
        self.t += 1;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let bc1 = 1.0 - (b1 as f64).powi(self.t as i32);
        let bc2 = 1.0 - (b2 as f64).powi(self.t as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        let wd = self.weight_decay;
        let tensors = &layout.tensors;
        let factors = &self.lr_factors;
        assert!(factors.is_empty() || factors.len() == tensors.len());
        let n = params.len();
        assert!(grads.len() == n && self.m.len() == n && self.v.len() == n);
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(
                self.m
                    .par_chunks_mut(CHUNK)
                    .zip(self.v.par_chunks_mut(CHUNK)),
            )
            .enumerate()
            .for_each(|(ci, ((p, g), (m, v)))| {
                // flat indices of the chunk (the update is elementwise: where chunks start
                // changes nothing but which tensor's decay applies, found from these)
                let (c0, c1) = (offset + ci * CHUNK, offset + ci * CHUNK + p.len());
                // the first tensor that ends after c0 (tensors are laid out back to back)
                let mut ti = tensors.partition_point(|t| t.view.offset + t.view.len <= c0);
                let mut i0 = c0;
                while i0 < c1 {
                    // the tensor's rate (as a PyTorch parameter group of its own: the decay
                    // follows the group's rate)
                    let (f, end, matrix) = match tensors.get(ti) {
                        Some(t) => (
                            factors.get(ti).copied().unwrap_or(1.0),
                            (t.view.offset + t.view.len).min(c1),
                            t.is_matrix(),
                        ),
                        None => (1.0, c1, false),
                    };
                    let decay = if matrix { 1.0 - lr * f * wd } else { 1.0 };
                    let r = i0 - c0..end - c0;
                    adamw_span(
                        &mut p[r.clone()],
                        &g[r.clone()],
                        &mut m[r.clone()],
                        &mut v[r],
                        [b1, b2, eps, decay, step_size * f, inv_sqrt_bc2, g_scale],
                    );
                    i0 = end;
                    ti += 1;
                }
            });
    }
}

multiversion! {
    fn adamw_span(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: [f32; 7]) {
        let [b1, b2, eps, decay, step_size, inv_sqrt_bc2, g_scale] = k;
        let n = p.len();
        let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let gi = g[i] * g_scale;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let denom = v[i].sqrt() * inv_sqrt_bc2 + eps;
            p[i] = p[i] * decay - step_size * m[i] / denom;
        }
    }
}

/// The factor clipping applies to a gradient of norm `norm`.
pub fn clip_scale(norm: f32, max_norm: f32) -> f32 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

multiversion! {
    /// Σ g² of one chunk in f64, in eight interleaved lanes (vectorised; the order is fixed).
    fn sum_sq_f64(g: &[f32]) -> f64 {
        let mut acc = [0.0f64; 8];
        let chunks = g.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..8 {
                let x = c[i] as f64;
                acc[i] += x * x;
            }
        }
        let tail: f64 = rest.iter().map(|&x| (x as f64) * (x as f64)).sum();
        acc.iter().sum::<f64>() + tail
    }
}

thread_local! {
    /// Per-chunk partial sums of `grad_norm`, reused (no allocation once grown).
    static PARTIAL: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The global L2 norm of the gradient, summed in fixed chunks and a fixed order so the
/// result does not depend on the thread count.
pub fn grad_norm(grads: &[f32]) -> f32 {
    sum_sq(grads).sqrt() as f32
}

/// Σ g² in f64, in fixed chunks and order (a rank's part of a gradient whose norm is summed
/// over ranks).
pub fn sum_sq(grads: &[f32]) -> f64 {
    PARTIAL.with(|cell| {
        let mut partial = cell.borrow_mut();
        grads
            .par_chunks(CHUNK)
            .map(sum_sq_f64)
            .collect_into_vec(&mut partial);
        partial.iter().sum::<f64>()
    })
}

/// Scales the gradient down so its norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> f32 {
    let norm = grad_norm(grads);
    let s = clip_scale(norm, max_norm);
    if s != 1.0 {
        grads.par_iter_mut().for_each(|g| *g *= s);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One scalar AdamW step written out from the paper's algorithm, in f64.
    fn reference_step(
        p: f64,
        g: f64,
        (m, v): (&mut f64, &mut f64),
        t: i32,
        lr: f64,
        wd: f64,
    ) -> f64 {
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
                want[i] = reference_step(
                    want[i],
                    grads[i] as f64,
                    (&mut m[i], &mut v[i]),
                    t,
                    0.01,
                    wd,
                );
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

    /// Tensors that straddle the parallel chunks (and a matrix-vector mix) against the
    /// written-out update, with clipping active: the fused `step_clipped` equals clipping the
    /// gradient in memory and then stepping, bit for bit, and matches the f64 algorithm.
    #[test]
    fn fused_clipping_matches_clip_then_step_across_chunks() {
        let mut layout = ParamLayout::default();
        layout.push("a", &[3, CHUNK / 3 + 5]);
        layout.push("bias", &[CHUNK + 7]);
        layout.push("c", &[17, 19]);
        layout.push("d", &[5]);
        let n = layout.total;
        let init: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let (mut p1, mut p2) = (init.clone(), init.clone());
        let mut want: Vec<f64> = init.iter().map(|&p| p as f64).collect();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut o1 = AdamW::new(n, 0.9, 0.95, 1e-8, 0.1);
        let mut o2 = AdamW::new(n, 0.9, 0.95, 1e-8, 0.1);
        for t in 1..=3 {
            let g: Vec<f32> = (0..n).map(|i| ((i * t) as f32 * 0.11).cos()).collect();
            let norm = o1.step_clipped(&layout, &mut p1, &g, 0.01, 1.0);
            let mut g2 = g.clone();
            assert_eq!(clip_grad_norm(&mut g2, 1.0), norm);
            assert!(norm > 1.0, "clipping must be active");
            o2.step(&layout, &mut p2, &g2, 0.01);
            assert_eq!(p1, p2, "step {t}");
            let exact: f64 = g
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt();
            assert!((norm as f64 - exact).abs() < 1e-6 * exact);
            for spec in &layout.tensors {
                let wd = if spec.is_matrix() { 0.1 } else { 0.0 };
                for i in spec.view.offset..spec.view.offset + spec.view.len {
                    let gi = g2[i] as f64;
                    want[i] =
                        reference_step(want[i], gi, (&mut m[i], &mut v[i]), t as i32, 0.01, wd);
                }
            }
        }
        let worst = p1
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(
                0.0,
                |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
            );
        assert!(worst < 1e-5, "{worst}");
    }

    /// Per-tensor learning-rate factors act as PyTorch parameter groups of their own (the
    /// group's rate scales both the step and the decoupled decay), on tensors that straddle
    /// the parallel chunks.
    #[test]
    fn lr_factors_act_as_parameter_groups() {
        let mut layout = ParamLayout::default();
        layout.push("a", &[3, CHUNK / 3 + 5]);
        layout.push("b", &[CHUNK + 7, 2]);
        layout.push("bias", &[9]);
        layout.push("c", &[17, 19]);
        let factors = [1.0f32, 16.0, 0.5, 3.0];
        let n = layout.total;
        let mut p: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
        let mut want: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let mut opt = AdamW::new(n, 0.9, 0.95, 1e-8, 0.1);
        opt.lr_factors = factors.to_vec();
        for t in 1..=3 {
            let g: Vec<f32> = (0..n).map(|i| ((i * t) as f32 * 0.11).cos()).collect();
            opt.step(&layout, &mut p, &g, 0.002);
            for (spec, &f) in layout.tensors.iter().zip(&factors) {
                let wd = if spec.is_matrix() { 0.1 } else { 0.0 };
                let lr = 0.002 * f as f64;
                for i in spec.view.offset..spec.view.offset + spec.view.len {
                    want[i] = reference_step(
                        want[i],
                        g[i] as f64,
                        (&mut m[i], &mut v[i]),
                        t as i32,
                        lr,
                        wd,
                    );
                }
            }
        }
        let worst = p
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(
                0.0,
                |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
            );
        // (ignoring a factor would be off by its share of about 3 · 0.002 per element)
        assert!(worst < 1e-5, "{worst}");
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

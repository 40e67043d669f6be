//! Rotary position embeddings (RoPE) in Hugging Face's "rotate_half" convention: dimension j
//! of a head is paired with j + D/2, and the pair is rotated by the angle pos · inv_freq[j]:
//! (a, b) -> (a cos - b sin, b cos + a sin). Keys and queries are rotated, values are not.
//!
//! Angles are formed as in `transformers` (an f32 product of the position and an f32 inverse
//! frequency), so that long positions round the same way.

use rayon::prelude::*;

/// How the inverse frequencies are adjusted for long contexts (`rope_scaling` /
/// `rope_parameters` in config.json).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Every frequency divided by `factor` ("linear").
    Linear {
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling ("llama3").
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Inverse frequencies [D/2] for a head of width `d`.
pub fn inv_freq(d: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..d / 2)
        .map(|i| {
            let e = (2 * i) as f32 / d as f32;
            1.0f32 / (theta.powf(e as f64) as f32)
        })
        .collect();
    match *scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => {
            base.iter().map(|&f| (f as f64 / factor) as f32).collect()
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let v = if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    v as f32
                })
                .collect()
        }
    }
}

/// Positions covered by the precomputed table; later positions are computed when needed.
const TABLE_POSITIONS: usize = 4096;

/// Largest head width / 2 supported (head_dim up to 1024).
pub const MAX_HALF: usize = 512;

/// cos/sin tables for one head width.
#[derive(Clone, Debug)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    positions: usize,
}

impl Rope {
    pub fn new(inv_freq: Vec<f32>, max_positions: usize) -> Self {
        assert!(
            inv_freq.len() <= MAX_HALF,
            "head_dim above {}",
            2 * MAX_HALF
        );
        let positions = max_positions.min(TABLE_POSITIONS);
        let half = inv_freq.len();
        let mut cos = vec![0.0; positions * half];
        let mut sin = vec![0.0; positions * half];
        for p in 0..positions {
            angles(
                &inv_freq,
                p,
                &mut cos[p * half..(p + 1) * half],
                &mut sin[p * half..(p + 1) * half],
            );
        }
        Rope {
            inv_freq,
            cos,
            sin,
            positions,
        }
    }

    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// Rotates the heads `cols` names in each row of `x`; row r sits at the position `at`
    /// gives it. [`Direction::Inverse`] applies the transposed rotation (the backward pass).
    pub fn apply(&self, x: &mut [f32], cols: HeadCols, at: RowPositions, direction: Direction) {
        let HeadCols {
            stride: rs,
            col0,
            heads,
        } = cols;
        let inverse = direction == Direction::Inverse;
        let half = self.half();
        let rows_per_task = (4096 / rs.max(1)).max(1);
        x.par_chunks_mut(rs * rows_per_task)
            .enumerate()
            .for_each(|(task, chunk)| {
                // room for positions past the table, on the stack (no allocation per call)
                let mut cbuf = [0.0f32; MAX_HALF];
                let mut sbuf = [0.0f32; MAX_HALF];
                for (k, row) in chunk.chunks_mut(rs).enumerate() {
                    let r = task * rows_per_task + k;
                    let pos = at.first + at.period.map_or(r, |p| r % p);
                    let (c, s): (&[f32], &[f32]) = if pos < self.positions {
                        (
                            &self.cos[pos * half..(pos + 1) * half],
                            &self.sin[pos * half..(pos + 1) * half],
                        )
                    } else {
                        angles(&self.inv_freq, pos, &mut cbuf[..half], &mut sbuf[..half]);
                        (&cbuf[..half], &sbuf[..half])
                    };
                    for hd in 0..heads {
                        let v = &mut row[col0 + hd * 2 * half..col0 + (hd + 1) * 2 * half];
                        rotate(v, c, s, inverse);
                    }
                }
            });
    }
}

/// Where the heads to rotate lie in each row: `heads` heads of width 2·half from column
/// `col0`, in rows `stride` apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadCols {
    pub stride: usize,
    pub col0: usize,
    pub heads: usize,
}

/// The position of each row: `first + r` for one sequence (`period` None), or
/// `first + r % period` for a batch [B, T] of sequences (period T).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowPositions {
    pub first: usize,
    pub period: Option<usize>,
}

/// The rotation (forward pass) or its transpose (backward pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Inverse,
}

fn angles(inv_freq: &[f32], pos: usize, cos: &mut [f32], sin: &mut [f32]) {
    for (j, &f) in inv_freq.iter().enumerate() {
        let a = (pos as f32 * f) as f64;
        cos[j] = a.cos() as f32;
        sin[j] = a.sin() as f32;
    }
}

#[inline(always)]
fn rotate(v: &mut [f32], c: &[f32], s: &[f32], inverse: bool) {
    let half = c.len();
    let (lo, hi) = v.split_at_mut(half);
    if inverse {
        for j in 0..half {
            let (a, b) = (lo[j], hi[j]);
            lo[j] = a * c[j] + b * s[j];
            hi[j] = b * c[j] - a * s[j];
        }
    } else {
        for j in 0..half {
            let (a, b) = (lo[j], hi[j]);
            lo[j] = a * c[j] - b * s[j];
            hi[j] = b * c[j] + a * s[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{reference, testutil::*};
    use crate::rng::Rng;

    #[test]
    fn matches_reference_and_inverse_undoes_it() {
        let mut rng = Rng::new(23);
        let (d, heads, t, b) = (6, 3, 9, 2);
        let rs = heads * d + 5; // extra columns that must stay untouched
        let inv = inv_freq(d, 10000.0, &RopeScaling::None);
        // beyond the table too: positions from 4090
        for &(pos0, max_pos) in &[(0, 64), (4090, 8192)] {
            let rope = Rope::new(inv.clone(), max_pos);
            let x = randn(&mut rng, b * t * rs, 1.0);
            let mut y = x.clone();
            let cols = HeadCols {
                stride: rs,
                col0: 2,
                heads,
            };
            let at = RowPositions {
                first: pos0,
                period: Some(t),
            };
            rope.apply(&mut y, cols, at, Direction::Forward);
            let inv64: Vec<f64> = inv.iter().map(|&f| f as f64).collect();
            for r in 0..b * t {
                let row = &x[r * rs..(r + 1) * rs];
                assert_eq!(&y[r * rs..r * rs + 2], &row[..2]);
                assert_eq!(
                    &y[r * rs + 2 + heads * d..(r + 1) * rs],
                    &row[2 + heads * d..]
                );
                for hd in 0..heads {
                    let c0 = 2 + hd * d;
                    let want = reference::rope(&to_f64(&row[c0..c0 + d]), pos0 + r % t, &inv64);
                    assert!(max_rel_err(&y[r * rs + c0..r * rs + c0 + d], &want, 1.0) < 2e-4);
                }
            }
            rope.apply(&mut y, cols, at, Direction::Inverse);
            assert!(max_rel_err(&y, &to_f64(&x), 1.0) < 1e-5);
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let base = inv_freq(128, 500000.0, &RopeScaling::None);
        let scaled = inv_freq(128, 500000.0, &s);
        assert_eq!(scaled[0], base[0]);
        let last = base.len() - 1;
        assert!((scaled[last] * 8.0 - base[last]).abs() <= base[last] * 1e-6);
        // the medium band lies between the two
        for (a, b) in scaled.iter().zip(&base) {
            assert!(*a <= *b && *a >= b / 8.0 * (1.0 - 1e-6));
        }
    }
}

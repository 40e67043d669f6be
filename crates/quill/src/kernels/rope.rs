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

/// Per-frequency divisors of a scaling (unscaled inverse frequency / scaled one), as
/// llama.cpp stores Llama 3's scaling in a GGUF file (`rope_freqs.weight`).
pub fn frequency_factors(d: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let base = inv_freq(d, theta, &RopeScaling::None);
    let scaled = inv_freq(d, theta, scaling);
    base.iter()
        .zip(&scaled)
        .map(|(&b, &s)| (b as f64 / s as f64) as f32)
        .collect()
}

/// Llama 3's scaling parameters that give per-frequency divisors `factors` (a GGUF file's
/// `rope_freqs.weight`; equal divisors are linear scaling), or None when no such parameters
/// reproduce them (within 1e-5).
///
/// The divisors are 1 for the fast frequencies, `factor` for the slow ones, and between
/// them 1 / ((1 − s) / factor + s) with s linear in the frequency; the original context length
/// is not determined by the divisors (it scales with the two band limits), so 8192 (Llama
/// 3.1's) is taken and the band limits fitted to the blended frequencies.
pub fn llama3_from_factors(d: usize, theta: f64, factors: &[f32]) -> Option<RopeScaling> {
    let base = inv_freq(d, theta, &RopeScaling::None);
    if factors.len() != base.len() || factors.iter().any(|f| !f.is_finite() || *f < 1.0 - 1e-6) {
        return None;
    }
    let factor = factors.iter().fold(1f32, |m, &f| m.max(f)) as f64;
    if factor <= 1.0 + 1e-6 {
        return Some(RopeScaling::None);
    }
    if factors
        .iter()
        .all(|&f| (f as f64 - factor).abs() <= 1e-5 * factor)
    {
        // one divisor for every frequency: linear scaling
        return Some(RopeScaling::Linear { factor });
    }
    let old = 8192.0;
    let tau = 2.0 * std::f64::consts::PI;
    // (old / wavelength, blend s) of the frequencies between the bands
    let mid: Vec<(f64, f64)> = base
        .iter()
        .zip(factors)
        .filter(|(_, &f)| f as f64 > 1.0 + 1e-5 && (f as f64) < factor * (1.0 - 1e-5))
        .map(|(&b, &f)| {
            let s = (1.0 / f as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
            (old * b as f64 / tau, s)
        })
        .collect();
    let u = |i: usize| old * base[i] as f64 / tau;
    // the slowest unscaled frequency and the fastest fully scaled one bound the blend
    let fast = base
        .iter()
        .zip(factors)
        .rposition(|(_, &f)| f <= 1.0 + 1e-5)
        .map(u);
    let slow = base
        .iter()
        .zip(factors)
        .position(|(_, &f)| f as f64 >= factor * (1.0 - 1e-5))
        .map(u);
    let (low, high) = match mid.len() {
        // s = (u − low) / (high − low): the line through the two ends of the blend
        2.. => {
            let (u0, s0) = mid[mid.len() - 1];
            let (u1, s1) = mid[0];
            let slope = (s1 - s0) / (u1 - u0);
            if slope <= 0.0 {
                return None;
            }
            let low = u0 - s0 / slope;
            (low, low + 1.0 / slope)
        }
        // one blended frequency: a band through it that stays clear of its neighbours
        1 => {
            let (um, sm) = mid[0];
            let room_low = slow.map_or(f64::INFINITY, |us| (um - us) / sm.max(1e-12));
            let room_high = fast.map_or(f64::INFINITY, |uf| (uf - um) / (1.0 - sm).max(1e-12));
            let width = 0.5 * room_low.min(room_high).min(um.max(1e-12));
            if !(width.is_finite() && width > 0.0) {
                return None;
            }
            let low = um - sm * width;
            (low, low + width)
        }
        // no blend: a narrow band between the two
        _ => {
            let m = (fast? * slow?).sqrt();
            (m * 0.999, m * 1.001)
        }
    };
    let fitted = RopeScaling::Llama3 {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: old,
    };
    let again = frequency_factors(d, theta, &fitted);
    let close = again
        .iter()
        .zip(factors)
        .all(|(&a, &f)| ((a - f) as f64).abs() <= 1e-5 * f as f64);
    close.then_some(fitted)
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
        self.apply_with(x, cols, direction, |r| {
            at.first + at.period.map_or(r, |p| r % p)
        });
    }

    /// As [`Rope::apply`], with each row's position given: row r sits at `positions[r]`
    /// (packed documents, each counting from 0).
    pub fn apply_at(&self, x: &mut [f32], cols: HeadCols, positions: &[u32], direction: Direction) {
        assert_eq!(positions.len() * cols.stride, x.len());
        self.apply_with(x, cols, direction, |r| positions[r] as usize);
    }

    fn apply_with(
        &self,
        x: &mut [f32],
        cols: HeadCols,
        direction: Direction,
        position: impl Fn(usize) -> usize + Sync,
    ) {
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
                    let pos = position(r);
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

    #[test]
    fn llama3_scaling_is_recovered_from_its_frequency_factors() {
        for (d, theta, factor, low, high, old) in [
            (128, 500000.0, 8.0, 1.0, 4.0, 8192.0),
            (64, 500000.0, 32.0, 1.0, 4.0, 8192.0),
            (32, 10000.0, 4.0, 1.0, 2.0, 64.0),
            (16, 10000.0, 2.0, 1.0, 8.0, 256.0),
            (32, 500000.0, 8.0, 1.0, 4.0, 32.0),
        ] {
            let s = RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: old,
            };
            let f = frequency_factors(d, theta, &s);
            let back = llama3_from_factors(d, theta, &f).expect("recovered");
            let (a, b) = (inv_freq(d, theta, &s), inv_freq(d, theta, &back));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 2e-6 * x.abs(), "{d} {theta}: {x} vs {y}");
            }
        }
        let plain = vec![1f32; 8];
        assert_eq!(
            llama3_from_factors(16, 1e4, &plain),
            Some(RopeScaling::None)
        );
        assert_eq!(
            llama3_from_factors(16, 1e4, &[2.0; 8]),
            Some(RopeScaling::Linear { factor: 2.0 })
        );
        // factors that follow no band structure
        let odd: Vec<f32> = (0..8).map(|i| if i % 2 == 0 { 1.0 } else { 3.0 }).collect();
        assert_eq!(llama3_from_factors(16, 1e4, &odd), None);
        assert_eq!(llama3_from_factors(16, 1e4, &[0.5; 8]), None);
        assert_eq!(llama3_from_factors(16, 1e4, &[1.0; 7]), None);
    }
}

//! Token embedding, with learned positions (GPT-2: x[b,t] = wte[ids[b,t]] + wpe[t]) or
//! without (rotary models: x[r] = wte[ids[r]]).

use rayon::prelude::*;

/// out [B·T, C] from ids [B·T] (row-major over B then T), wte [V,C], wpe [>=T, C].
pub fn forward(out: &mut [f32], ids: &[u32], wte: &[f32], wpe: &[f32], t: usize, c: usize) {
    assert_eq!(out.len(), ids.len() * c);
    out.par_chunks_mut(c)
        .zip(ids.par_iter())
        .enumerate()
        .for_each(|(row, (o, &id))| {
            let tok = &wte[id as usize * c..(id as usize + 1) * c];
            let p = &wpe[(row % t) * c..(row % t + 1) * c];
            for i in 0..c {
                o[i] = tok[i] + p[i];
            }
        });
}

/// As [`forward`], with each row's position given (packed documents, each counting from 0).
pub fn forward_at(
    out: &mut [f32],
    ids: &[u32],
    wte: &[f32],
    wpe: &[f32],
    positions: &[u32],
    c: usize,
) {
    assert!(out.len() == ids.len() * c && positions.len() == ids.len());
    out.par_chunks_mut(c)
        .zip(ids.par_iter().zip(positions.par_iter()))
        .for_each(|(o, (&id, &pos))| {
            let tok = &wte[id as usize * c..(id as usize + 1) * c];
            let p = &wpe[pos as usize * c..(pos as usize + 1) * c];
            for i in 0..c {
                o[i] = tok[i] + p[i];
            }
        });
}

/// Gradients of [`forward_at`]: rows added in row order (deterministic).
pub fn backward_at(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    ids: &[u32],
    positions: &[u32],
    c: usize,
) {
    backward_tokens(dwte, dout, ids, c);
    for (r, &pos) in positions.iter().enumerate() {
        let g = &mut dwpe[pos as usize * c..(pos as usize + 1) * c];
        for (gi, d) in g.iter_mut().zip(&dout[r * c..(r + 1) * c]) {
            *gi += d;
        }
    }
}

/// out [N, C] from ids [N] and wte [V, C]: each row a copy of its token's row.
pub fn forward_tokens(out: &mut [f32], ids: &[u32], wte: &[f32], c: usize) {
    assert_eq!(out.len(), ids.len() * c);
    for (o, &id) in out.chunks_mut(c).zip(ids) {
        o.copy_from_slice(&wte[id as usize * c..(id as usize + 1) * c]);
    }
}

/// dwte[ids[r]] += dout[r], sequential in row order (rows may share a token), so the sums
/// do not depend on the thread count.
pub fn backward_tokens(dwte: &mut [f32], dout: &[f32], ids: &[u32], c: usize) {
    for (r, &id) in ids.iter().enumerate() {
        let d = &dout[r * c..(r + 1) * c];
        let g = &mut dwte[id as usize * c..(id as usize + 1) * c];
        for i in 0..c {
            g[i] += d[i];
        }
    }
}

/// dwte[ids[r]] += dout[r]; dwpe[t] += sum over b of dout[b,t]. Sequential in row order for
/// the token table (rows may share a token), so the sums do not depend on thread count.
pub fn backward(dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], ids: &[u32], t: usize, c: usize) {
    let b = ids.len() / t;
    backward_tokens(dwte, dout, ids, c);
    dwpe[..t * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(ti, g)| {
            for bi in 0..b {
                let d = &dout[(bi * t + ti) * c..(bi * t + ti + 1) * c];
                for i in 0..c {
                    g[i] += d[i];
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_is_the_transpose_of_forward() {
        // <forward(wte, wpe), r> is linear in (wte, wpe); its gradient is backward(r).
        let (v, t, c) = (5, 3, 4);
        let ids = [1u32, 4, 1, 0, 1, 2];
        let r: Vec<f32> = (0..ids.len() * c)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; t * c]);
        backward(&mut dwte, &mut dwpe, &r, &ids, t, c);
        for which in 0..2 {
            for idx in 0..if which == 0 { v * c } else { t * c } {
                let mut wte = vec![0.0; v * c];
                let mut wpe = vec![0.0; t * c];
                if which == 0 {
                    wte[idx] = 1.0
                } else {
                    wpe[idx] = 1.0
                }
                let mut out = vec![0.0; ids.len() * c];
                forward(&mut out, &ids, &wte, &wpe, t, c);
                let dot: f32 = out.iter().zip(&r).map(|(a, b)| a * b).sum();
                let g = if which == 0 { dwte[idx] } else { dwpe[idx] };
                assert!((dot - g).abs() < 1e-5);
            }
        }
    }
}

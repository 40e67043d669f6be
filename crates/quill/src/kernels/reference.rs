//! Plain float64 twins of every kernel: written for clarity, not speed. Tests compare the
//! fast f32 kernels with these, and these with finite differences.

/// c[m,n] += op(a) · op(b): `a` stored [m, k], or [k, m] when `ta`; `b` stored [k, n], or
/// [n, k] when `tb`.
pub fn matmul(
    c: &mut [f64],
    a: &[f64],
    b: &[f64],
    (m, k, n): (usize, usize, usize),
    (ta, tb): (bool, bool),
) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av * bv;
            }
            c[i * n + j] += s;
        }
    }
}

/// LayerNorm over rows of width c: out = (x - mean) / sqrt(var + eps) * w + b.
pub fn layernorm_forward(x: &[f64], w: &[f64], b: &[f64], c: usize, eps: f64) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks(c).zip(out.chunks_mut(c)) {
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for i in 0..c {
            o[i] = (row[i] - mean) * rstd * w[i] + b[i];
        }
    }
    out
}

/// Gradients of LayerNorm: (dx, dw, db).
pub fn layernorm_backward(
    dout: &[f64],
    x: &[f64],
    w: &[f64],
    c: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; c];
    let mut db = vec![0.0; c];
    for ((row, d), dxr) in x.chunks(c).zip(dout.chunks(c)).zip(dx.chunks_mut(c)) {
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        let norm: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
        let dnorm: Vec<f64> = (0..c).map(|i| d[i] * w[i]).collect();
        let mean_dnorm = dnorm.iter().sum::<f64>() / c as f64;
        let mean_dnorm_norm = (0..c).map(|i| dnorm[i] * norm[i]).sum::<f64>() / c as f64;
        for i in 0..c {
            dw[i] += d[i] * norm[i];
            db[i] += d[i];
            dxr[i] = (dnorm[i] - mean_dnorm - norm[i] * mean_dnorm_norm) * rstd;
        }
    }
    (dx, dw, db)
}

pub fn gelu(x: f64) -> f64 {
    let s = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (s * (x + 0.044715 * x * x * x)).tanh())
}

pub fn gelu_grad(x: f64) -> f64 {
    let s = (2.0 / std::f64::consts::PI).sqrt();
    let u = s * (x + 0.044715 * x * x * x);
    let t = u.tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * s * (1.0 + 3.0 * 0.044715 * x * x)
}

/// Causal attention. qkv [B,T,(H+2KV)·D] with q|k|v blocks; query head i reads kv head
/// i / (H/KV); returns y [B,T,H·D].
pub fn attention_forward(
    qkv: &[f64],
    b: usize,
    t: usize,
    (h, kv, d): (usize, usize, usize),
    scale: f64,
) -> Vec<f64> {
    let w = (h + 2 * kv) * d;
    let oc = h * d;
    let mut y = vec![0.0; b * t * oc];
    for bi in 0..b {
        for hi in 0..h {
            let kvh = hi / (h / kv);
            let q = |ti: usize, di: usize| qkv[(bi * t + ti) * w + hi * d + di];
            let k = |ti: usize, di: usize| qkv[(bi * t + ti) * w + oc + kvh * d + di];
            let v = |ti: usize, di: usize| qkv[(bi * t + ti) * w + oc + (kv + kvh) * d + di];
            for i in 0..t {
                let scores: Vec<f64> = (0..=i)
                    .map(|j| (0..d).map(|x| q(i, x) * k(j, x)).sum::<f64>() * scale)
                    .collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for x in 0..d {
                    y[(bi * t + i) * oc + hi * d + x] = (0..=i).map(|j| e[j] / z * v(j, x)).sum();
                }
            }
        }
    }
    y
}

/// RMSNorm over rows of width c: out = x / sqrt(mean(x²) + eps) · w.
pub fn rmsnorm_forward(x: &[f64], w: &[f64], c: usize, eps: f64) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks(c).zip(out.chunks_mut(c)) {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / c as f64;
        let r = 1.0 / (ms + eps).sqrt();
        for i in 0..c {
            o[i] = row[i] * r * w[i];
        }
    }
    out
}

pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU over rows [gate (F) | up (F)]: out = silu(gate) · up, [N, F].
pub fn swiglu_forward(gu: &[f64], f: usize) -> Vec<f64> {
    gu.chunks(2 * f)
        .flat_map(|r| (0..f).map(move |i| silu(r[i]) * r[f + i]))
        .collect()
}

/// Rotary embedding of one head vector x [D] at position `pos`, HF "rotate_half" pairs
/// (j, j + D/2), with inverse frequencies `inv_freq` [D/2].
pub fn rope(x: &[f64], pos: usize, inv_freq: &[f64]) -> Vec<f64> {
    let half = x.len() / 2;
    let mut y = x.to_vec();
    for j in 0..half {
        let a = pos as f64 * inv_freq[j];
        let (s, c) = a.sin_cos();
        y[j] = x[j] * c - x[j + half] * s;
        y[j + half] = x[j + half] * c + x[j] * s;
    }
    y
}

/// Mean cross-entropy over rows whose target is not `u32::MAX`.
pub fn cross_entropy(logits: &[f64], targets: &[u32], v: usize) -> f64 {
    let mut total = 0.0;
    let mut count = 0;
    for (row, &tg) in logits.chunks(v).zip(targets) {
        if tg == u32::MAX {
            continue;
        }
        let mx = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln() + mx;
        total += lse - row[tg as usize];
        count += 1;
    }
    total / count.max(1) as f64
}

//! Causal multi-head self-attention: each position attends to itself and the positions
//! before it. scores = q·kᵀ · scale, masked above the diagonal, softmax over each row,
//! then the probabilities weight the values. Sequences may pack several documents (fine-tuning
//! examples): then a position attends only to the positions of its own document
//! ([`Layer::starts`]).
//!
//! Tasks run in parallel over (batch, head); inside a task the products run on one thread.

use super::matmul::Precision;
use super::product::{Accumulate, Dims, Strided, View, ViewMut};
use super::tile::Causal;
use super::SendPtr;
use rayon::prelude::*;

/// One-thread strided product (the tasks already run in parallel over batch and heads), in
/// the training precision. f32 products whose B has contiguous columns run on the in-place
/// tile kernel ([`super::tile`]) where the CPU has AVX-512 or AVX2, skipping the tiles that
/// `causal` leaves out; otherwise on the product entry ([`super::matmul::matmul_strided`]),
/// computing them all.
///
/// # Safety
/// As [`super::matmul::matmul_strided`].
#[inline]
unsafe fn mm(prec: Precision, s: Strided, causal: Causal) {
    match prec {
        Precision::F32 if s.b.cs == 1 && (super::simd::has_avx512() || super::simd::has_avx2()) => {
            super::tile::gemm(s, causal)
        }
        _ => super::matmul::matmul_strided(
            prec,
            Strided {
                parallel: false,
                ..s
            },
        ),
    }
}

/// Rows per block when skipping the masked (upper) part of the T x T score matrix.
const CAUSAL_BLOCK: usize = 32;

/// Head counts of one attention layer: `h` query heads and `kv` key/value heads (grouped-query
/// attention when kv < h: query head i reads kv head i / (h / kv)), each of width `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub h: usize,
    pub kv: usize,
    pub d: usize,
}

impl Heads {
    /// Plain multi-head attention: every query head has its own key and value head.
    pub fn mha(c: usize, h: usize) -> Self {
        Heads { h, kv: h, d: c / h }
    }
    /// Width of a packed q | k | v row: (h + 2 kv) · d.
    pub fn qkv_width(&self) -> usize {
        (self.h + 2 * self.kv) * self.d
    }
    fn group(&self) -> usize {
        self.h / self.kv
    }
}

/// One attention layer's training pass: `b` sequences of `t` positions, the heads, the score
/// scale, the products' precision and where packed documents start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layer<'a> {
    pub b: usize,
    pub t: usize,
    pub heads: Heads,
    pub scale: f32,
    pub precision: Precision,
    /// For each row of the batch [B·T], the position in its sequence where its document
    /// starts: the row attends to the keys from there through itself. None: every sequence
    /// is one document (plain causal attention).
    pub starts: Option<&'a [u32]>,
}

impl Layer<'_> {
    /// Where the document of query `i` of sequence `bi` starts (its first visible key).
    fn first_key(&self, bi: usize, i: usize) -> usize {
        self.starts.map_or(0, |s| s[bi * self.t + i] as usize)
    }
}

/// What [`backward`] reads of its [`forward`] pass: the input, the output and the
/// log-sum-exp of each row.
#[derive(Clone, Copy)]
pub struct Saved<'a> {
    pub qkv: &'a [f32],
    pub out: &'a [f32],
    pub lse: &'a [f32],
}

/// Scratch floats that [`forward`] and [`backward`] need for a batch: per (batch, head)
/// task, two strips of CAUSAL_BLOCK x T scores, T row sums, and the head's keys and values
/// transposed (for the f32 products). Never a T x T matrix.
pub fn scratch_len(b: usize, t: usize, hs: Heads) -> usize {
    b * hs.h * task_scratch(t, hs.d)
}

/// Strips (2 x CAUSAL_BLOCK x T), row sums (T), then Kᵀ and Vᵀ (D x T each).
fn task_scratch(t: usize, d: usize) -> usize {
    2 * CAUSAL_BLOCK * t + t + 2 * d * t
}

/// qkv [B,T,(H+2KV)·D] with blocks q | k | v (head i in columns i·D .. i·D+D of its block)
/// -> out [B,T,H·D] (heads side by side) and lse [B,H,T], the log-sum-exp of each row's
/// scaled scores: all that the backward pass keeps of the softmax.
///
/// Flash-style: queries go in strips of CAUSAL_BLOCK rows; a strip's scores against the keys
/// it may see (causal) are computed, soft-maxed and applied to the values at once, in
/// `scratch` (see [`scratch_len`]); no T x T matrix is stored.
pub fn forward(layer: Layer, out: &mut [f32], lse: &mut [f32], scratch: &mut [f32], qkv: &[f32]) {
    let Layer {
        b,
        t,
        heads: hs,
        scale,
        precision: prec,
        starts,
    } = layer;
    let (h, d, w) = (hs.h, hs.d, hs.qkv_width());
    let oc = h * d;
    assert!(out.len() == b * t * oc && qkv.len() == b * t * w && lse.len() >= b * h * t);
    assert!(starts.is_none_or(|s| s.len() == b * t));
    assert!(hs.kv > 0 && h % hs.kv == 0 && scratch.len() >= scratch_len(b, t, hs));
    let out_p = SendPtr(out.as_mut_ptr());
    let ts = task_scratch(t, d);
    scratch[..b * h * ts]
        .par_chunks_mut(ts)
        .zip(lse[..b * h * t].par_chunks_mut(t))
        .enumerate()
        .for_each(|(task, (buf, lse))| {
            let (bi, hi) = (task / h, task % h);
            let kvh = hi / hs.group();
            let row0 = qkv[bi * t * w..].as_ptr();
            let (strip, rest) = buf.split_at_mut(CAUSAL_BLOCK * t);
            let kt = &mut rest[CAUSAL_BLOCK * t + t..];
            // Safety: strides stay inside qkv and inside this task's rows/columns of out.
            unsafe {
                let q = row0.add(hi * d);
                let k = row0.add(oc + kvh * d);
                let v = row0.add(oc + hs.kv * d + kvh * d);
                // Kᵀ as B: f32 reads it in place from the transposed copy; bf16 packs it
                let (kb, kb_rs, kb_cs) = if prec == Precision::F32 {
                    super::tile::transpose(kt, k, w, t, d);
                    (kt.as_ptr(), t, 1)
                } else {
                    (k, 1, w)
                };
                let sp = strip.as_mut_ptr();
                for i0 in (0..t).step_by(CAUSAL_BLOCK) {
                    let i1 = (i0 + CAUSAL_BLOCK).min(t);
                    // S = Q[i0..i1] · K[0..i1]ᵀ: the strip only needs keys up to its last row
                    mm(
                        prec,
                        Strided::new(
                            Dims::new(i1 - i0, d, i1),
                            ViewMut::new(sp, t),
                            View::new(q.add(i0 * w), w, 1),
                            View::new(kb, kb_rs, kb_cs),
                            Accumulate::Overwrite,
                        ),
                        Causal::ColsUpTo(i0),
                    );
                    for r in 0..i1 - i0 {
                        let row = &mut strip[r * t..r * t + i1];
                        let first = layer.first_key(bi, i0 + r);
                        lse[i0 + r] = softmax_causal_row(row, first, i0 + r, scale);
                    }
                    // O[i0..i1] = P · V[0..i1]
                    mm(
                        prec,
                        Strided::new(
                            Dims::new(i1 - i0, i1, d),
                            ViewMut::new(out_p.get().add(bi * t * oc + hi * d + i0 * oc), oc),
                            View::new(sp, t, 1),
                            View::new(v, w, 1),
                            Accumulate::Overwrite,
                        ),
                        Causal::DepthUpTo(i0),
                    );
                }
            }
        });
}

super::simd::multiversion! {
/// row[first..=last] <- softmax(row[first..=last] · scale); the rest <- 0. Returns the
/// log-sum-exp of the scaled scores.
fn softmax_causal_row(row: &mut [f32], first: usize, last: usize, scale: f32) -> f32 {
    let (before, row) = row.split_at_mut(first);
    before.fill(0.0);
    let (live, masked) = row.split_at_mut(last + 1 - first);
    let mx = super::math::max(live) * scale;
    for v in live.iter_mut() {
        *v = super::math::exp(*v * scale - mx);
    }
    let sum = super::math::sum(live);
    let inv = 1.0 / sum;
    for v in live.iter_mut() {
        *v *= inv;
    }
    masked.fill(0.0);
    mx + sum.ln()
}
}

/// What the rows of a column strip (queries j0..) bring to its softmax backward: their
/// log-sum-exps, their D = dO · O, and where their documents start (when packed).
#[derive(Clone, Copy)]
struct StripRows<'a> {
    lse: &'a [f32],
    dsum: &'a [f32],
    j0: usize,
    firsts: Option<&'a [u32]>,
}

super::simd::multiversion! {
/// s[j] = q · (row j of `k`, row stride `rs`) for every j of `s`: one query's scores against
/// the cached keys, the dot product inlined (one call per row of keys cost a sixth of a long
/// context's decoding step).
fn key_scores(s: &mut [f32], q: &[f32], k: &[f32], rs: usize) {
    let d = q.len();
    for (j, s) in s.iter_mut().enumerate() {
        // the rows lie a whole cache row apart (every head's keys between them): asked for
        // KEYS_AHEAD rows early, their reads overlap
        #[cfg(target_arch = "x86_64")]
        super::simd::prefetch_tile(k.as_ptr().wrapping_add((j + KEYS_AHEAD) * rs), rs, 1, d, false);
        *s = super::math::dot(q, &k[j * rs..j * rs + d]);
    }
}
}

/// How many rows of cached keys or values ahead [`key_scores`] and [`weighted_rows`] ask for.
const KEYS_AHEAD: usize = 16;

super::simd::multiversion! {
/// Rows r of a column strip hold query j0 + r against keys j0 .. j0 + cols (row stride
/// CAUSAL_BLOCK). P = exp(S·scale - lse) where the key is visible to the query (not after
/// it, and not before its document's start `firsts[r] - j0` when given), else 0, written
/// over S; dS = P ⊙ (dP - D) · scale written over dP.
fn strip_softmax_backward(s: &mut [f32], dp: &mut [f32], rows: StripRows, cols: usize, scale: f32) {
    let StripRows { lse, dsum, j0, firsts } = rows;
    for r in 0..lse.len() {
        let sr = &mut s[r * CAUSAL_BLOCK..r * CAUSAL_BLOCK + cols];
        let dr = &mut dp[r * CAUSAL_BLOCK..r * CAUSAL_BLOCK + cols];
        let (l, dd) = (lse[r], dsum[r]);
        // the first visible column of this strip for query j0 + r
        let lo = firsts.map_or(0, |f| (f[r] as usize).saturating_sub(j0));
        // past the diagonal (c > r) the scores may be unwritten: only zeros are stored there
        // (three loops without a branch, so the visible part's runs in vectors)
        let hi = (r + 1).min(cols);
        let lo = lo.min(hi);
        for (sv, dv) in sr[lo..hi].iter_mut().zip(&mut dr[lo..hi]) {
            let p = super::math::exp(*sv * scale - l);
            *sv = p;
            *dv = p * (*dv - dd) * scale;
        }
        for part in [0..lo, hi..cols] {
            sr[part.clone()].fill(0.0);
            dr[part].fill(0.0);
        }
    }
}
}

/// Gradients of [`forward`]: dout [B,T,H·D] -> dqkv [B,T,(H+2KV)·D] (overwritten), given
/// the forward's `out` and `lse`. Tasks run over (batch, kv head), so the query heads that
/// share a kv head add their key and value gradients in one place, in a fixed order.
///
/// Keys go in column strips of CAUSAL_BLOCK: the strip's scores against every query that
/// sees it are recomputed and turned back into probabilities with the saved log-sum-exp;
/// they give the strip's dK and dV in one product each, and a rank-CAUSAL_BLOCK update of dQ.
pub fn backward(layer: Layer, dqkv: &mut [f32], scratch: &mut [f32], dout: &[f32], saved: Saved) {
    let Layer {
        b,
        t,
        heads: hs,
        scale,
        precision: prec,
        starts,
    } = layer;
    let Saved { qkv, out, lse } = saved;
    assert!(starts.is_none_or(|s| s.len() == b * t));
    let (h, d, w) = (hs.h, hs.d, hs.qkv_width());
    let oc = h * d;
    let g = hs.group();
    assert!(dqkv.len() == b * t * w && dout.len() == b * t * oc && qkv.len() == b * t * w);
    assert!(out.len() == b * t * oc && lse.len() >= b * h * t);
    assert!(scratch.len() >= scratch_len(b, t, hs));
    let dqkv_p = SendPtr(dqkv.as_mut_ptr());
    let ts = task_scratch(t, d) * g;
    scratch[..b * hs.kv * ts]
        .par_chunks_mut(ts)
        .enumerate()
        .for_each(|(task, buf)| {
            let (bi, kvh) = (task / hs.kv, task % hs.kv);
            let (sbuf, rest) = buf.split_at_mut(CAUSAL_BLOCK * t);
            let (dpbuf, rest) = rest.split_at_mut(CAUSAL_BLOCK * t);
            let (dsum, rest) = rest.split_at_mut(t);
            let (kt, rest) = rest.split_at_mut(d * t);
            let vt = &mut rest[..d * t];
            let bs = CAUSAL_BLOCK;
            // Safety (all pointer arithmetic below): every view stays inside its buffer; this
            // task alone writes the columns of its kv head and of the query heads in its group.
            let row0 = unsafe { qkv.as_ptr().add(bi * t * w) };
            let (k, v) = unsafe { (row0.add(oc + kvh * d), row0.add(oc + hs.kv * d + kvh * d)) };
            // Kᵀ and Vᵀ as B: f32 reads them in place from transposed copies; bf16 packs them
            let f32_path = prec == Precision::F32;
            if f32_path {
                unsafe {
                    super::tile::transpose(kt, k, w, t, d);
                    super::tile::transpose(vt, v, w, t, d);
                }
            }
            for gi in 0..g {
                let hi = kvh * g + gi;
                let lse = &lse[(bi * h + hi) * t..(bi * h + hi + 1) * t];
                // D[i] = dO[i] · O[i] (= Σ_j P[i,j] dP[i,j])
                for (i, dv) in dsum.iter_mut().enumerate() {
                    let o = (bi * t + i) * oc + hi * d;
                    *dv = dot(&dout[o..o + d], &out[o..o + d]);
                }
                let acc = gi > 0;
                unsafe {
                    let q = row0.add(hi * d);
                    let dy = dout.as_ptr().add(bi * t * oc + hi * d);
                    let drow0 = dqkv_p.get().add(bi * t * w);
                    let dq = drow0.add(hi * d);
                    let dk = drow0.add(oc + kvh * d);
                    let dv = drow0.add(oc + hs.kv * d + kvh * d);
                    let (sp, dpp) = (sbuf.as_mut_ptr(), dpbuf.as_mut_ptr());
                    for j0 in (0..t).step_by(CAUSAL_BLOCK) {
                        let j1 = (j0 + CAUSAL_BLOCK).min(t);
                        let (cols, rows) = (j1 - j0, t - j0);
                        let (jo, yo) = (j0 * w, j0 * oc);
                        // columns j0..j1 of Kᵀ and Vᵀ
                        let ((kb, kb_rs, kb_cs), (vb, vb_rs, vb_cs)) = if f32_path {
                            ((kt.as_ptr().add(j0), t, 1), (vt.as_ptr().add(j0), t, 1))
                        } else {
                            ((k.add(jo), 1, w), (v.add(jo), 1, w))
                        };
                        // S = Q[j0..t] · K[j0..j1]ᵀ, dP = dO[j0..t] · V[j0..j1]ᵀ
                        mm(
                            prec,
                            Strided::new(
                                Dims::new(rows, d, cols),
                                ViewMut::new(sp, bs),
                                View::new(q.add(jo), w, 1),
                                View::new(kb, kb_rs, kb_cs),
                                Accumulate::Overwrite,
                            ),
                            Causal::ColsUpTo(0),
                        );
                        mm(
                            prec,
                            Strided::new(
                                Dims::new(rows, d, cols),
                                ViewMut::new(dpp, bs),
                                View::new(dy.add(yo), oc, 1),
                                View::new(vb, vb_rs, vb_cs),
                                Accumulate::Overwrite,
                            ),
                            Causal::ColsUpTo(0),
                        );
                        strip_softmax_backward(
                            &mut sbuf[..rows * CAUSAL_BLOCK],
                            &mut dpbuf[..rows * CAUSAL_BLOCK],
                            StripRows {
                                lse: &lse[j0..],
                                dsum: &dsum[j0..],
                                j0,
                                firsts: starts.map(|s| &s[bi * t + j0..(bi + 1) * t]),
                            },
                            cols,
                            scale,
                        );
                        // dV[j0..j1] (+)= Pᵀ · dO[j0..t]; dK[j0..j1] (+)= dSᵀ · Q[j0..t]
                        mm(
                            prec,
                            Strided::new(
                                Dims::new(cols, rows, d),
                                ViewMut::new(dv.add(jo), w),
                                View::new(sp, 1, bs),
                                View::new(dy.add(yo), oc, 1),
                                Accumulate::from(acc),
                            ),
                            Causal::DepthFrom,
                        );
                        mm(
                            prec,
                            Strided::new(
                                Dims::new(cols, rows, d),
                                ViewMut::new(dk.add(jo), w),
                                View::new(dpp, 1, bs),
                                View::new(q.add(jo), w, 1),
                                Accumulate::from(acc),
                            ),
                            Causal::DepthFrom,
                        );
                        // dQ[j0..t] (+)= dS · K[j0..j1]; the first strip reaches every row
                        mm(
                            prec,
                            Strided::new(
                                Dims::new(rows, cols, d),
                                ViewMut::new(dq.add(jo), w),
                                View::new(dpp, bs, 1),
                                View::new(k.add(jo), w, 1),
                                Accumulate::from(j0 > 0),
                            ),
                            Causal::DepthUpTo(0),
                        );
                    }
                }
            }
        });
}

super::simd::multiversion! {
/// o <- Σ_j w[j] · v[j·rs .. j·rs + o.len()] (the probabilities of one query row applied to the
/// values).
fn weighted_rows(o: &mut [f32], w: &[f32], v: &[f32], rs: usize) {
    o.fill(0.0);
    let d = o.len();
    for (j, &wj) in w.iter().enumerate() {
        #[cfg(target_arch = "x86_64")]
        super::simd::prefetch_tile(v.as_ptr().wrapping_add((j + KEYS_AHEAD) * rs), rs, 1, d, false);
        for (o, &x) in o.iter_mut().zip(&v[j * rs..j * rs + d]) {
            *o += wj * x;
        }
    }
}
}

/// New rows from which [`CachedAttention::forward`] runs in strips of products.
const STRIP_MIN: usize = 16;

thread_local! {
    /// Scores and transposed keys of one strip task of [`CachedAttention::forward`].
    static STRIP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Floats of `scores` scratch that [`CachedAttention::forward`] needs for `total` cached positions.
pub fn cached_scratch_len(total: usize) -> usize {
    rayon::current_num_threads().max(1) * total
}

/// One layer's attention for new positions `pos`, `pos + 1`, … against a KV cache holding
/// the keys and values of every position up to the last new one. The typed operand of
/// [`CachedAttention::forward`] and [`CachedAttention::weights`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CachedAttention {
    pub heads: Heads,
    pub scale: f32,
    /// Each position attends to at most this many positions up to itself (None: all).
    pub window: Option<usize>,
    /// Position of the first new query.
    pub pos: usize,
}

impl CachedAttention {
    /// The first key position that query `i` (absolute position `len - 1`) may see.
    fn first(&self, len: usize) -> usize {
        self.window.map_or(0, |w| len.saturating_sub(w))
    }

    /// out [n, H·D] from q [n, ≥ H·D] (row stride `q_rs`; n = q.len() / q_rs) and the cache's
    /// (keys, values), rows of KV·D (grouped-query: query head h reads kv head h / (H / KV)).
    /// `scores` is scratch of at least [`cached_scratch_len`]`(pos + n)` floats.
    pub fn forward(
        &self,
        out: &mut [f32],
        q: &[f32],
        q_rs: usize,
        kv: (&[f32], &[f32]),
        scores: &mut [f32],
    ) {
        let Heads { h, kv: n_kv, d } = self.heads;
        let (k_cache, v_cache) = kv;
        let (n, pos) = (q.len() / q_rs, self.pos);
        let kv_rs = n_kv * d;
        let total = pos + n;
        assert!(k_cache.len() >= total * kv_rs && v_cache.len() >= total * kv_rs);
        assert!(out.len() >= n * h * d && q_rs >= h * d && n_kv > 0 && h % n_kv == 0);
        if n >= STRIP_MIN {
            return self.forward_strips(out, q, q_rs, kv);
        }
        self.forward_rows(out, q, q_rs, kv, scores)
    }

    /// [`CachedAttention::forward`] one query row at a time (decoding, a few rows): dot
    /// products with each visible key, the softmax, the weighted sum of values.
    fn forward_rows(
        &self,
        out: &mut [f32],
        q: &[f32],
        q_rs: usize,
        kv: (&[f32], &[f32]),
        scores: &mut [f32],
    ) {
        let Heads { h, kv: n_kv, d } = self.heads;
        let (k_cache, v_cache) = kv;
        let (n, pos, scale) = (q.len() / q_rs, self.pos, self.scale);
        let kv_rs = n_kv * d;
        let total = pos + n;
        let threads = rayon::current_num_threads().max(1);
        assert!(scores.len() >= threads * total);
        let out_p = SendPtr(out.as_mut_ptr());
        let scores_p = SendPtr(scores.as_mut_ptr());
        let group = h / n_kv;
        (0..h * n).into_par_iter().for_each(|task| {
            let (hi, i) = (task / n, task % n);
            let kvh = hi / group;
            let qrow = &q[i * q_rs + hi * d..i * q_rs + hi * d + d];
            let len = pos + i + 1;
            let first = self.first(len);
            // Safety: each pool thread owns its slice of `scores`, and the task body never
            // yields to another task of this loop on the same thread.
            let tid = rayon::current_thread_index().unwrap_or(0) % threads;
            let scores =
                unsafe { std::slice::from_raw_parts_mut(scores_p.get().add(tid * total), total) };
            key_scores(
                &mut scores[first..len],
                qrow,
                &k_cache[first * kv_rs + kvh * d..],
                kv_rs,
            );
            softmax_causal_row(&mut scores[..len], first, len - 1, scale);
            // Safety: (i, hi) owns out[i, hi·D .. hi·D+D].
            let o =
                unsafe { std::slice::from_raw_parts_mut(out_p.get().add(i * h * d + hi * d), d) };
            let vs = &v_cache[first * kv_rs + kvh * d..];
            weighted_rows(o, &scores[first..len], vs, kv_rs);
        });
    }

    /// [`CachedAttention::forward`] for many new rows (a prompt), as the training pass does
    /// it: per (query head, strip of CAUSAL_BLOCK queries) the strip's scores against the keys
    /// it may see are one product (Q · Kᵀ, with Kᵀ copied from the cache), soft-maxed in
    /// place, then applied to the values (P · V) in a second product; products skip the
    /// tiles the causal mask leaves out. Scratch is per thread.
    fn forward_strips(&self, out: &mut [f32], q: &[f32], q_rs: usize, kv: (&[f32], &[f32])) {
        let Heads { h, kv: n_kv, d } = self.heads;
        let (k_cache, v_cache) = kv;
        let (n, pos) = (q.len() / q_rs, self.pos);
        let (kv_rs, oc) = (n_kv * d, h * d);
        let strips = n.div_ceil(CAUSAL_BLOCK);
        let out_p = SendPtr(out.as_mut_ptr());
        // the last strips see the most keys: they go first
        (0..h * strips).into_par_iter().for_each(|task| {
            let (si, hi) = (strips - 1 - task / h, task % h);
            let kvh = hi / (h / n_kv);
            let (i0, i1) = (si * CAUSAL_BLOCK, (si * CAUSAL_BLOCK + CAUSAL_BLOCK).min(n));
            // keys k0..k1: from the first that the strip's first query sees (later queries'
            // windows start no earlier) through its last query's own
            let (k0, k1) = (self.first(pos + i0 + 1), pos + i1);
            let keys = k1 - k0;
            let off = pos + i0 - k0;
            STRIP.with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.resize(CAUSAL_BLOCK * keys + d * keys, 0.0);
                let (strip, kt) = buf.split_at_mut(CAUSAL_BLOCK * keys);
                let sp = strip.as_mut_ptr();
                // Safety: the strides stay inside q, the cache's rows k0..k1 and this task's
                // rows i0..i1 and head columns of out; the scratch is this thread's.
                unsafe {
                    super::tile::transpose(
                        kt,
                        k_cache[k0 * kv_rs + kvh * d..].as_ptr(),
                        kv_rs,
                        keys,
                        d,
                    );
                    mm(
                        Precision::F32,
                        Strided::new(
                            Dims::new(i1 - i0, d, keys),
                            ViewMut::new(sp, keys),
                            View::new(q[i0 * q_rs + hi * d..].as_ptr(), q_rs, 1),
                            View::new(kt.as_ptr(), keys, 1),
                            Accumulate::Overwrite,
                        ),
                        Causal::ColsUpTo(off),
                    );
                    for r in 0..i1 - i0 {
                        let len = pos + i0 + r + 1;
                        let row = &mut strip[r * keys..(r + 1) * keys];
                        softmax_causal_row(row, self.first(len) - k0, len - 1 - k0, self.scale);
                    }
                    mm(
                        Precision::F32,
                        Strided::new(
                            Dims::new(i1 - i0, keys, d),
                            ViewMut::new(out_p.get().add(i0 * oc + hi * d), oc),
                            View::new(sp, keys, 1),
                            View::new(v_cache[k0 * kv_rs + kvh * d..].as_ptr(), kv_rs, 1),
                            Accumulate::Overwrite,
                        ),
                        Causal::DepthUpTo(off),
                    );
                }
            });
        });
    }

    /// The attention weights of query head `head` for the new positions (as
    /// [`CachedAttention::forward`] computes them), appended to `out` as rows of `pos + n`
    /// values (zero outside each row's window): for showing where attention looks.
    pub fn weights(
        &self,
        out: &mut Vec<f32>,
        q: &[f32],
        q_rs: usize,
        k_cache: &[f32],
        head: usize,
    ) {
        let Heads { h, kv: n_kv, d } = self.heads;
        let (n, pos) = (q.len() / q_rs, self.pos);
        let kv_rs = n_kv * d;
        let total = pos + n;
        let kvh = head / (h / n_kv);
        for i in 0..n {
            let qrow = &q[i * q_rs + head * d..i * q_rs + head * d + d];
            let len = pos + i + 1;
            let first = self.first(len);
            let mut row = vec![0.0f32; total];
            let mut mx = f32::NEG_INFINITY;
            for (j, s) in row.iter_mut().enumerate().take(len).skip(first) {
                let krow = &k_cache[j * kv_rs + kvh * d..j * kv_rs + kvh * d + d];
                *s = dot(qrow, krow) * self.scale;
                mx = mx.max(*s);
            }
            let mut sum = 0.0;
            for s in row[first..len].iter_mut() {
                *s = (*s - mx).exp();
                sum += *s;
            }
            for s in row[first..len].iter_mut() {
                *s /= sum;
            }
            out.extend_from_slice(&row);
        }
    }
}

super::simd::multiversion! {
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        super::math::dot(a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{reference, testutil::*};
    use crate::rng::Rng;

    fn loss64(qkv: &[f64], r: &[f64], b: usize, t: usize, hs: Heads, s: f64) -> f64 {
        let y = reference::attention_forward(qkv, b, t, (hs.h, hs.kv, hs.d), s);
        y.iter().zip(r).map(|(a, b)| a * b).sum()
    }

    #[test]
    fn forward_and_backward_match_reference_and_finite_differences() {
        let mut rng = Rng::new(5);
        // (b, t, h, kv, d): multi-head, grouped-query and one kv head, odd sizes
        for &(b, t, h, kv, d) in &[
            (1, 1, 1, 1, 4),
            (2, 5, 3, 3, 4),
            (1, 9, 2, 2, 5),
            (3, 17, 4, 4, 4),
            (1, 70, 2, 2, 4),
            (2, 7, 4, 2, 3),
            (1, 37, 6, 1, 2),
            (2, 33, 6, 3, 5),
        ] {
            let hs = Heads { h, kv, d };
            let scale = 1.0 / (d as f32).sqrt();
            let qkv = randn(&mut rng, b * t * hs.qkv_width(), 1.0);
            let r = randn(&mut rng, b * t * h * d, 1.0);
            let want = reference::attention_forward(&to_f64(&qkv), b, t, (h, kv, d), scale as f64);
            let (q64, r64) = (to_f64(&qkv), to_f64(&r));
            let fd = finite_diff(&q64, |x| loss64(x, &r64, b, t, hs, scale as f64));
            // bf16 operands: 8 bits of mantissa in every product's inputs
            for (prec, tol_f, tol_b) in
                [(Precision::F32, 1e-5, 1e-4), (Precision::Bf16, 2e-2, 3e-2)]
            {
                let mut y = vec![0.0; b * t * h * d];
                let mut lse = vec![0.0; b * h * t];
                let mut scratch = vec![f32::NAN; scratch_len(b, t, hs)];
                forward(
                    Layer {
                        b,
                        t,
                        heads: hs,
                        scale,
                        precision: prec,
                        starts: None,
                    },
                    &mut y,
                    &mut lse,
                    &mut scratch,
                    &qkv,
                );
                let err = max_rel_err(&y, &want, 1.0);
                assert!(err < tol_f, "forward {prec:?} {hs:?} {b},{t}: {err}");

                let mut dqkv = vec![7.0; qkv.len()];
                scratch.fill(f32::NAN);
                backward(
                    Layer {
                        b,
                        t,
                        heads: hs,
                        scale,
                        precision: prec,
                        starts: None,
                    },
                    &mut dqkv,
                    &mut scratch,
                    &r,
                    Saved {
                        qkv: &qkv,
                        out: &y,
                        lse: &lse,
                    },
                );
                let err = max_rel_err(&dqkv, &fd, 1.0);
                assert!(err < tol_b, "backward {prec:?} {hs:?} {b},{t}: {err}");
            }
        }
    }

    /// The float64 reference over packed documents: each document (rows `lo..hi` of a
    /// sequence) computed alone, as its own sequence of `hi - lo` positions.
    fn packed_reference(
        qkv: &[f64],
        docs: &[(usize, usize, usize)],
        t: usize,
        hs: Heads,
        s: f64,
    ) -> Vec<f64> {
        let (w, oc) = (hs.qkv_width(), hs.h * hs.d);
        let b = qkv.len() / (t * w);
        let mut y = vec![0.0; b * t * oc];
        for &(bi, lo, hi) in docs {
            let part = &qkv[(bi * t + lo) * w..(bi * t + hi) * w];
            let o = reference::attention_forward(part, 1, hi - lo, (hs.h, hs.kv, hs.d), s);
            y[(bi * t + lo) * oc..(bi * t + hi) * oc].copy_from_slice(&o);
        }
        y
    }

    #[test]
    fn packed_documents_attend_only_within_themselves() {
        let mut rng = Rng::new(9);
        // sequences split into documents of random lengths (some of one token), across the
        // CAUSAL_BLOCK strips; GQA and MHA
        for &(b, t, h, kv, d) in &[(2, 13, 2, 1, 4), (1, 70, 4, 2, 3), (3, 40, 3, 3, 2)] {
            let hs = Heads { h, kv, d };
            let scale = 1.0 / (d as f32).sqrt();
            let (mut starts, mut docs) = (Vec::new(), Vec::new());
            for bi in 0..b {
                let mut lo = 0;
                while lo < t {
                    let hi = (lo + 1 + rng.below(23)).min(t);
                    starts.extend(std::iter::repeat_n(lo as u32, hi - lo));
                    docs.push((bi, lo, hi));
                    lo = hi;
                }
            }
            assert!(docs.len() > b, "some sequence holds several documents");
            let qkv = randn(&mut rng, b * t * hs.qkv_width(), 1.0);
            let r = randn(&mut rng, b * t * h * d, 1.0);
            let (q64, r64) = (to_f64(&qkv), to_f64(&r));
            let want = packed_reference(&q64, &docs, t, hs, scale as f64);
            let fd = finite_diff(&q64, |x| {
                let y = packed_reference(x, &docs, t, hs, scale as f64);
                y.iter().zip(&r64).map(|(a, b)| a * b).sum()
            });
            for (prec, tol_f, tol_b) in
                [(Precision::F32, 1e-5, 1e-4), (Precision::Bf16, 2e-2, 3e-2)]
            {
                let layer = Layer {
                    b,
                    t,
                    heads: hs,
                    scale,
                    precision: prec,
                    starts: Some(&starts),
                };
                let mut y = vec![0.0; b * t * h * d];
                let mut lse = vec![0.0; b * h * t];
                let mut scratch = vec![f32::NAN; scratch_len(b, t, hs)];
                forward(layer, &mut y, &mut lse, &mut scratch, &qkv);
                let err = max_rel_err(&y, &want, 1.0);
                assert!(err < tol_f, "forward {prec:?} {hs:?} {b},{t}: {err}");
                let mut dqkv = vec![7.0; qkv.len()];
                scratch.fill(f32::NAN);
                let saved = Saved {
                    qkv: &qkv,
                    out: &y,
                    lse: &lse,
                };
                backward(layer, &mut dqkv, &mut scratch, &r, saved);
                let err = max_rel_err(&dqkv, &fd, 1.0);
                assert!(err < tol_b, "backward {prec:?} {hs:?} {b},{t}: {err}");
            }
        }
    }

    #[test]
    fn cached_attention_matches_full_attention() {
        let mut rng = Rng::new(6);
        let (t, c, h) = (11, 12, 3);
        let d = c / h;
        let scale = 1.0 / (d as f32).sqrt();
        let qkv = randn(&mut rng, t * 3 * c, 1.0);
        let mut full = vec![0.0; t * c];
        let mut lse = vec![0.0; h * t];
        let hs = Heads::mha(c, h);
        let mut scratch = vec![0.0; scratch_len(1, t, hs)];
        forward(
            Layer {
                b: 1,
                t,
                heads: hs,
                scale,
                precision: Precision::F32,
                starts: None,
            },
            &mut full,
            &mut lse,
            &mut scratch,
            &qkv,
        );
        let mut kc = vec![0.0; t * c];
        let mut vc = vec![0.0; t * c];
        for i in 0..t {
            kc[i * c..(i + 1) * c].copy_from_slice(&qkv[i * 3 * c + c..i * 3 * c + 2 * c]);
            vc[i * c..(i + 1) * c].copy_from_slice(&qkv[i * 3 * c + 2 * c..i * 3 * c + 3 * c]);
        }
        // a prefill of 4 positions, then one position at a time
        let mut got = vec![0.0; t * c];
        let at = |pos| CachedAttention {
            heads: hs,
            scale,
            window: None,
            pos,
        };
        let mut scores = vec![0.0; cached_scratch_len(t)];
        at(0).forward(
            &mut got[..4 * c],
            &qkv[..4 * 3 * c],
            3 * c,
            (&kc, &vc),
            &mut scores,
        );
        for p in 4..t {
            let mut o = vec![0.0; c];
            let q = &qkv[p * 3 * c..(p + 1) * 3 * c];
            at(p).forward(&mut o, q, 3 * c, (&kc, &vc), &mut scores);
            got[p * c..(p + 1) * c].copy_from_slice(&o);
        }
        for (a, b) in got.iter().zip(&full) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    /// A prompt's rows in strips of products equal the row-at-a-time path, with grouped-query
    /// heads, a cache already holding positions, a partial last strip and a sliding window.
    #[test]
    fn cached_strips_equal_cached_rows() {
        let mut rng = Rng::new(7);
        let hs = Heads { h: 4, kv: 2, d: 8 };
        let (pos, n) = (5, 2 * CAUSAL_BLOCK + 7);
        let total = pos + n;
        let q_rs = hs.h * hs.d + 3;
        let q = randn(&mut rng, n * q_rs, 1.0);
        let kc = randn(&mut rng, total * hs.kv * hs.d, 1.0);
        let vc = randn(&mut rng, total * hs.kv * hs.d, 1.0);
        for window in [None, Some(7), Some(40)] {
            let at = CachedAttention {
                heads: hs,
                scale: 0.3,
                window,
                pos,
            };
            let mut rows = vec![0.0; n * hs.h * hs.d];
            let mut strips = vec![f32::NAN; n * hs.h * hs.d];
            let mut scores = vec![0.0; cached_scratch_len(total)];
            at.forward_rows(&mut rows, &q, q_rs, (&kc, &vc), &mut scores);
            at.forward(&mut strips, &q, q_rs, (&kc, &vc), &mut scores);
            for (a, b) in strips.iter().zip(&rows) {
                assert!((a - b).abs() < 1e-5, "{window:?}: {a} vs {b}");
            }
        }
    }
}

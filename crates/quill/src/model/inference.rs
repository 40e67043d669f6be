//! The decoder's inference pass: one step over a batch of segments, each continuing its own
//! sequence from its own KV cache. A prompt is one segment of n tokens; batched decoding
//! (continuous batching in the server) is n segments of one token each. The weights are
//! read once per step for all of them.

use super::beside::{Beside, Projection};
use super::decoder::{rotate_qk, Mlp, Model, Positions};
use crate::kernels::rope::{Direction, RowPositions};
use crate::kernels::RowStats;
use crate::kernels::{add_inplace, attention, gelu, swiglu};
use crate::{Error, Result};

/// Keys and values of every layer for the positions seen so far: [L, capacity, KV·D] each
/// (grouped-query attention stores only the key/value heads).
pub struct Cache {
    pub len: usize,
    pub capacity: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Work buffers of [`Model::forward_cached`], kept with the cache so that decoding one
    /// sequence allocates nothing after its first step.
    scratch: Scratch,
    /// (layer, head) whose attention weights the next step keeps in `captured`.
    pub capture: Option<(usize, usize)>,
    pub captured: Vec<f32>,
}

impl Cache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position (the buffers stay allocated).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Becomes a copy of `other`'s positions (a cache of the same model and capacity): a
    /// beam that continues another's sequence.
    pub fn copy_from(&mut self, other: &Cache) {
        assert_eq!(self.k.len(), other.k.len(), "caches of different sizes");
        self.k.copy_from_slice(&other.k);
        self.v.copy_from_slice(&other.v);
        self.len = other.len;
    }
}

/// New tokens `ids` continuing the sequence held in `cache`.
pub struct Segment<'a> {
    pub cache: &'a mut Cache,
    pub ids: &'a [u32],
}

/// Which positions' logits a step writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// The last position of each segment: [segments, V].
    Last,
    /// Every new position: [Σ n, V].
    All,
}

/// Work buffers of a step, grown to the largest step seen.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    ln: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    tmp: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    last: Vec<f32>,
    wbuf: Vec<f32>,
    scores: Vec<f32>,
}

impl Model {
    /// A KV cache for up to `capacity` positions (at most the context).
    pub fn new_cache(&self, capacity: usize) -> Cache {
        let cap = capacity.min(self.context).max(1);
        let size = self.blocks.len() * cap * self.heads.kv * self.heads.d;
        Cache {
            len: 0,
            capacity: cap,
            k: vec![0.0; size],
            v: vec![0.0; size],
            scratch: Scratch::default(),
            capture: None,
            captured: Vec::new(),
        }
    }

    /// Runs every segment's tokens at the positions that follow its cache, appending their
    /// keys and values to it, and writes the logits of `rows` into `logits`.
    pub fn step(
        &self,
        segs: &mut [Segment],
        rows: Rows,
        logits: &mut Vec<f32>,
        s: &mut Scratch,
    ) -> Result<()> {
        if rayon::current_thread_index().is_none() {
            // Called from outside every rayon pool (a library caller's own thread): the step
            // runs on a worker of the global pool, so that its products (about fifty a token)
            // start from inside the pool instead of waking it from outside each time. GPT-2 f32
            // decoding on an AMD EPYC Zen 5 read 42-51 GB/s from outside, 47-59 from inside.
            return rayon::scope(|_| self.step(segs, rows, logits, s));
        }
        self.check_segments(segs)?;
        let (c, v, f, hs, p) = (
            self.width,
            self.vocab,
            self.mlp_width,
            self.heads,
            &self.params,
        );
        let (w, hd, kvd) = (hs.qkv_width(), hs.h * hs.d, hs.kv * hs.d);
        let n: usize = segs.iter().map(|g| g.ids.len()).sum();
        let up = if self.mlp == Mlp::SwiGlu { 2 * f } else { f };
        for (buf, len) in [
            (&mut s.x, c),
            (&mut s.ln, c),
            (&mut s.qkv, w),
            (&mut s.atty, hd),
        ]
        .into_iter()
        .chain([
            (&mut s.tmp, c),
            (&mut s.up, up),
            (&mut s.act, f),
            (&mut s.mean, 1),
        ])
        .chain([(&mut s.rstd, 1)])
        {
            buf.resize(n * len, 0.0);
        }
        let most = segs.iter().map(|g| g.cache.capacity).max().unwrap_or(1);
        s.scores.resize(attention::cached_scratch_len(most), 0.0);

        let mut rows_x = s.x.chunks_mut(c);
        for g in segs.iter() {
            for (i, (&id, row)) in g.ids.iter().zip(&mut rows_x).enumerate() {
                self.embed.row_into(p, id as usize, row);
                if let Positions::Learned(wpe) = self.positions {
                    add_inplace_serial(row, &wpe.of(p)[(g.cache.len + i) * c..][..c]);
                }
            }
        }
        let lora = self.adapters.as_deref();
        for (l, blk) in self.blocks.iter().enumerate() {
            let stats = RowStats {
                mean: &mut s.mean,
                rstd: &mut s.rstd,
            };
            blk.attn_norm.forward(p, &mut s.ln, stats, &s.x);
            blk.qkv.infer(p, &mut s.qkv, &s.ln, &mut s.wbuf);
            adapt(lora, (l, Projection::Qkv), &s.ln, &mut s.qkv, &mut s.wbuf);
            let mut r0 = 0;
            for g in segs.iter_mut() {
                let (k, pos) = (g.ids.len(), g.cache.len);
                let qkv = &mut s.qkv[r0 * w..(r0 + k) * w];
                if let Positions::Rotary(rope) = &self.positions {
                    let at = RowPositions {
                        first: pos,
                        period: None,
                    };
                    rotate_qk(rope, qkv, hs, at, Direction::Forward);
                }
                let cache = &mut *g.cache;
                let layer = l * cache.capacity * kvd..(l + 1) * cache.capacity * kvd;
                let (kc, vc) = (&mut cache.k[layer.clone()], &mut cache.v[layer]);
                for (i, row) in qkv.chunks(w).enumerate() {
                    kc[(pos + i) * kvd..][..kvd].copy_from_slice(&row[hd..hd + kvd]);
                    vc[(pos + i) * kvd..][..kvd].copy_from_slice(&row[hd + kvd..]);
                }
                let at = attention::CachedAttention {
                    heads: hs,
                    scale: self.attention[l].scale,
                    window: self.attention[l].window,
                    pos,
                };
                let kv = (&*kc, &*vc);
                at.forward(
                    &mut s.atty[r0 * hd..(r0 + k) * hd],
                    qkv,
                    w,
                    kv,
                    &mut s.scores,
                );
                if let Some((_, head)) = cache.capture.filter(|&(cl, _)| cl == l) {
                    cache.captured.clear();
                    at.weights(&mut cache.captured, qkv, w, kc, head);
                }
                r0 += k;
            }
            blk.o.infer(p, &mut s.tmp, &s.atty, &mut s.wbuf);
            adapt(lora, (l, Projection::O), &s.atty, &mut s.tmp, &mut s.wbuf);
            add_inplace(&mut s.x, &s.tmp);
            let stats = RowStats {
                mean: &mut s.mean,
                rstd: &mut s.rstd,
            };
            blk.mlp_norm.forward(p, &mut s.ln, stats, &s.x);
            blk.up.infer(p, &mut s.up, &s.ln, &mut s.wbuf);
            adapt(lora, (l, Projection::Up), &s.ln, &mut s.up, &mut s.wbuf);
            match self.mlp {
                Mlp::Gelu => gelu::forward(&mut s.act, &s.up),
                Mlp::SwiGlu => swiglu::forward(&mut s.act, &s.up, f),
            }
            blk.down.infer(p, &mut s.tmp, &s.act, &mut s.wbuf);
            adapt(lora, (l, Projection::Down), &s.act, &mut s.tmp, &mut s.wbuf);
            add_inplace(&mut s.x, &s.tmp);
        }
        for g in segs.iter_mut() {
            g.cache.len += g.ids.len();
        }

        // the final norm and the head, on the rows whose logits were asked for
        let x: &[f32] = if rows == Rows::All || segs.len() == n {
            &s.x
        } else {
            s.last.resize(segs.len() * c, 0.0);
            let mut end = 0;
            for (g, dst) in segs.iter().zip(s.last.chunks_mut(c)) {
                end += g.ids.len();
                dst.copy_from_slice(&s.x[(end - 1) * c..end * c]);
            }
            &s.last
        };
        let m = x.len() / c;
        let stats = RowStats {
            mean: &mut s.mean[..m],
            rstd: &mut s.rstd[..m],
        };
        self.final_norm.forward(p, &mut s.ln[..m * c], stats, x);
        logits.resize(m * v, 0.0);
        self.head.infer(p, logits, v, &s.ln[..m * c], &mut s.wbuf);
        // NaN or infinite scores come from broken weights or settings; sampling from them
        // would print one token forever
        if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
            return Err(crate::Error::Input(format!(
                "the model's scores hold {} (token {} of row {}): its weights or configuration are broken",
                logits[i],
                i % v,
                i / v
            )));
        }
        Ok(())
    }

    fn check_segments(&self, segs: &[Segment]) -> Result<()> {
        if segs.is_empty() || segs.iter().any(|g| g.ids.is_empty()) {
            return Err(Error::Input("no tokens to run".into()));
        }
        for g in segs {
            let (pos, n) = (g.cache.len, g.ids.len());
            if pos + n > g.cache.capacity {
                return Err(Error::Input(format!(
                    "context full: {} positions requested, the cache holds {}",
                    pos + n,
                    g.cache.capacity
                )));
            }
            if g.cache.k.len()
                != self.blocks.len() * g.cache.capacity * self.heads.kv * self.heads.d
            {
                return Err(Error::Input("a cache of another model".into()));
            }
            self.check_ids(g.ids)?;
        }
        Ok(())
    }

    /// [`Model::step`] over one segment: runs `ids` at positions cache.len .. cache.len +
    /// ids.len() of one sequence, appending their keys and values to the cache. Writes the logits of the last position into
    /// `logits` [V], or of every new position [n, V] when `all_positions`.
    pub fn forward_cached(
        &self,
        cache: &mut Cache,
        ids: &[u32],
        logits: &mut Vec<f32>,
        all_positions: bool,
    ) -> Result<()> {
        let mut s = std::mem::take(&mut cache.scratch);
        let rows = if all_positions { Rows::All } else { Rows::Last };
        let r = self.step(&mut [Segment { cache, ids }], rows, logits, &mut s);
        cache.scratch = s;
        r
    }

    /// The logits [n, V] of every position of one sequence (through the KV cache, so it
    /// also works on memory-mapped weights).
    pub fn logits_all(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.len() > self.context {
            return Err(Error::Input(format!(
                "{} tokens are more than the model's context of {} positions",
                ids.len(),
                self.context
            )));
        }
        let mut cache = self.new_cache(ids.len());
        let mut logits = Vec::new();
        self.forward_cached(&mut cache, ids, &mut logits, true)?;
        Ok(logits)
    }

    /// Attention weights [T, T] of `layer`'s query `head` over the sequence `ids` (row i: how
    /// much position i attends to each position 0..=i).
    pub fn attention_map(&self, ids: &[u32], layer: usize, head: usize) -> Result<Vec<f32>> {
        let (layers, heads) = self.layers_heads();
        if layer >= layers || head >= heads {
            return Err(Error::Input(format!(
                "layer {layer}, head {head}: the model has {layers} layers of {heads} heads"
            )));
        }
        if ids.is_empty() || ids.len() > self.context {
            return Err(Error::Input(format!(
                "{} tokens: an attention map needs 1 to {} tokens",
                ids.len(),
                self.context
            )));
        }
        let mut cache = self.new_cache(ids.len());
        cache.capture = Some((layer, head));
        let mut logits = Vec::new();
        self.forward_cached(&mut cache, ids, &mut logits, false)?;
        Ok(cache.captured)
    }
}

fn add_inplace_serial(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Adds what sits beside a projection of layer `at.0` (unmerged adapters), if anything.
fn adapt(
    beside: Option<&dyn Beside>,
    at: (usize, Projection),
    x: &[f32],
    y: &mut [f32],
    buf: &mut Vec<f32>,
) {
    if let Some(b) = beside {
        b.add(at, x, y, buf);
    }
}

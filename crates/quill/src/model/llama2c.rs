//! llama2.c checkpoints (Karpathy's `run.c` "legacy" version-0 `.bin` format) and their
//! `tokenizer.bin`: a Llama forward pass (RMSNorm, rotary embeddings on adjacent pairs,
//! grouped-query attention, SwiGLU) for generation, and the tokenizer as `run.c` encodes and
//! prints. The byte layout is described in tests/fixtures/stories260K/FORMAT.md.

use crate::kernels::attention::{CachedAttention, Heads};
use crate::{Error, Result};
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct Llama2cConfig {
    pub dim: usize,
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    pub seq_len: usize,
    pub shared_classifier: bool,
}

pub struct Llama2c {
    pub config: Llama2cConfig,
    emb: Vec<f32>,                // [V, dim]
    att_norm: Vec<f32>,           // [L, dim]
    wq: Vec<f32>,                 // [L, dim, dim]
    wk: Vec<f32>,                 // [L, kv_dim, dim]
    wv: Vec<f32>,                 // [L, kv_dim, dim]
    wo: Vec<f32>,                 // [L, dim, dim]
    ffn_norm: Vec<f32>,           // [L, dim]
    w1: Vec<f32>,                 // [L, hidden, dim]
    w2: Vec<f32>,                 // [L, dim, hidden]
    w3: Vec<f32>,                 // [L, hidden, dim]
    final_norm: Vec<f32>,         // [dim]
    classifier: Option<Vec<f32>>, // [V, dim] when not shared
}

/// Keys and values of every layer for positions 0..len: [L, seq_len, kv_dim] each.
pub struct Llama2cCache {
    pub len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn matvec(out: &mut [f32], w: &[f32], x: &[f32]) {
    let n = x.len();
    for (o, row) in out.iter_mut().zip(w.chunks_exact(n)) {
        *o = row.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}

fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32]) {
    let ss = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ss + 1e-5).sqrt();
    for i in 0..x.len() {
        out[i] = w[i] * (s * x[i]);
    }
}

/// Rotates adjacent pairs (2m, 2m+1) of each head by pos · 10000^(-2m/head_size).
fn rope(x: &mut [f32], pos: usize, head_size: usize) {
    for (i, pair) in x.chunks_exact_mut(2).enumerate() {
        let hd = (i * 2) % head_size;
        let freq = 1.0 / 10000f32.powf(hd as f32 / head_size as f32);
        let (s, c) = (pos as f32 * freq).sin_cos();
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

impl Llama2c {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if bytes.len() < 28 {
            return Err(Error::format(
                path,
                "not a llama2.c checkpoint (shorter than its 28-byte header)",
            ));
        }
        let int =
            |i: usize| i32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        let h: Vec<i32> = (0..7).map(int).collect();
        if h.iter()
            .enumerate()
            .any(|(i, &v)| v == 0 || (i != 5 && v < 0))
        {
            return Err(Error::format(
                path,
                format!("not a llama2.c checkpoint (header {h:?})"),
            ));
        }
        let cfg = Llama2cConfig {
            dim: h[0] as usize,
            hidden_dim: h[1] as usize,
            n_layers: h[2] as usize,
            n_heads: h[3] as usize,
            n_kv_heads: h[4] as usize,
            vocab_size: h[5].unsigned_abs() as usize,
            seq_len: h[6] as usize,
            shared_classifier: h[5] > 0,
        };
        if !cfg.dim.is_multiple_of(cfg.n_heads)
            || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads)
            || !(cfg.dim / cfg.n_heads).is_multiple_of(2)
        {
            return Err(Error::format(
                path,
                format!("inconsistent llama2.c header {h:?}"),
            ));
        }
        let (d, hd, l, v) = (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size);
        let kv = d * cfg.n_kv_heads / cfg.n_heads;
        let head = d / cfg.n_heads;
        let sizes = [
            v * d,
            l * d,
            l * d * d,
            l * kv * d,
            l * kv * d,
            l * d * d,
            l * d,
            l * hd * d,
            l * d * hd,
            l * hd * d,
            d,
            cfg.seq_len * head / 2,
            cfg.seq_len * head / 2,
            if cfg.shared_classifier { 0 } else { v * d },
        ];
        let floats: usize = sizes.iter().sum();
        let want = 28 + 4 * floats as u64;
        if bytes.len() as u64 != want {
            return Err(Error::format(
                path,
                format!(
                    "the header ({h:?}) implies {want} bytes but the file has {}: not a llama2.c checkpoint, or truncated",
                    bytes.len()
                ),
            ));
        }
        let mut off = 28;
        let mut take = |n: usize| -> Vec<f32> {
            let v: Vec<f32> = bytes[off..off + 4 * n]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            off += 4 * n;
            v
        };
        let mut t: Vec<Vec<f32>> = sizes.iter().map(|&n| take(n)).collect();
        let classifier = if cfg.shared_classifier {
            None
        } else {
            Some(t.pop().expect("14 parts"))
        };
        let mut it = t.into_iter();
        let mut next = || it.next().expect("13 parts");
        Ok(Llama2c {
            emb: next(),
            att_norm: next(),
            wq: next(),
            wk: next(),
            wv: next(),
            wo: next(),
            ffn_norm: next(),
            w1: next(),
            w2: next(),
            w3: next(),
            final_norm: next(),
            classifier,
            config: cfg,
        })
    }

    pub fn new_cache(&self) -> Llama2cCache {
        let c = &self.config;
        let kv = c.dim * c.n_kv_heads / c.n_heads;
        Llama2cCache {
            len: 0,
            k: vec![0.0; c.n_layers * c.seq_len * kv],
            v: vec![0.0; c.n_layers * c.seq_len * kv],
        }
    }

    /// Runs `token` at position cache.len; returns the logits of the next token.
    pub fn forward(&self, cache: &mut Llama2cCache, token: u32) -> Result<Vec<f32>> {
        let c = &self.config;
        let pos = cache.len;
        if pos >= c.seq_len {
            return Err(Error::Input(format!(
                "context full: the model has {} positions",
                c.seq_len
            )));
        }
        if token as usize >= c.vocab_size {
            return Err(Error::Input(format!(
                "token id {token} is outside the vocabulary ({})",
                c.vocab_size
            )));
        }
        let (d, hd) = (c.dim, c.hidden_dim);
        let head = d / c.n_heads;
        let kv = d * c.n_kv_heads / c.n_heads;
        let mut x = self.emb[token as usize * d..(token as usize + 1) * d].to_vec();
        let (mut xb, mut q, mut att, mut tmp) =
            (vec![0.0; d], vec![0.0; d], vec![0.0; d], vec![0.0; d]);
        let (mut k, mut v) = (vec![0.0; kv], vec![0.0; kv]);
        let (mut h1, mut h3) = (vec![0.0; hd], vec![0.0; hd]);
        let mut scores = vec![0.0; crate::kernels::attention::cached_scratch_len(pos + 1)];
        for l in 0..c.n_layers {
            rmsnorm(&mut xb, &x, &self.att_norm[l * d..(l + 1) * d]);
            matvec(&mut q, &self.wq[l * d * d..(l + 1) * d * d], &xb);
            matvec(&mut k, &self.wk[l * kv * d..(l + 1) * kv * d], &xb);
            matvec(&mut v, &self.wv[l * kv * d..(l + 1) * kv * d], &xb);
            rope(&mut q, pos, head);
            rope(&mut k, pos, head);
            let layer = l * c.seq_len * kv;
            cache.k[layer + pos * kv..layer + (pos + 1) * kv].copy_from_slice(&k);
            cache.v[layer + pos * kv..layer + (pos + 1) * kv].copy_from_slice(&v);
            let (kc, vc) = (
                &cache.k[layer..layer + c.seq_len * kv],
                &cache.v[layer..layer + c.seq_len * kv],
            );
            let scale = 1.0 / (head as f32).sqrt();
            let at = CachedAttention {
                heads: Heads {
                    h: c.n_heads,
                    kv: c.n_kv_heads,
                    d: head,
                },
                scale,
                window: None,
                pos,
            };
            at.forward(&mut att, &q, d, (kc, vc), &mut scores);
            matvec(&mut tmp, &self.wo[l * d * d..(l + 1) * d * d], &att);
            x.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
            rmsnorm(&mut xb, &x, &self.ffn_norm[l * d..(l + 1) * d]);
            matvec(&mut h1, &self.w1[l * hd * d..(l + 1) * hd * d], &xb);
            matvec(&mut h3, &self.w3[l * hd * d..(l + 1) * hd * d], &xb);
            for i in 0..hd {
                let g = h1[i];
                h1[i] = g / (1.0 + (-g).exp()) * h3[i];
            }
            matvec(&mut tmp, &self.w2[l * d * hd..(l + 1) * d * hd], &h1);
            x.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
        }
        rmsnorm(&mut xb, &x, &self.final_norm);
        let cls = self.classifier.as_ref().unwrap_or(&self.emb);
        let mut logits = vec![0.0; c.vocab_size];
        matvec(&mut logits, cls, &xb);
        cache.len += 1;
        Ok(logits)
    }
}

/// llama2.c's `tokenizer.bin`: pieces with merge scores; BPE as `run.c` does it.
pub struct Llama2cTokenizer {
    pieces: Vec<Vec<u8>>,
    scores: Vec<f32>,
    index: std::collections::HashMap<Vec<u8>, u32>,
}

pub const BOS: u32 = 1;
pub const EOS: u32 = 2;

impl Llama2cTokenizer {
    pub fn load(path: &Path, vocab_size: usize) -> Result<Self> {
        let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = || {
            Error::format(
                path,
                format!("not a llama2.c tokenizer for {vocab_size} tokens (truncated or damaged)"),
            )
        };
        let mut off = 4;
        let (mut pieces, mut scores) = (
            Vec::with_capacity(vocab_size),
            Vec::with_capacity(vocab_size),
        );
        for _ in 0..vocab_size {
            let score =
                f32::from_le_bytes(b.get(off..off + 4).ok_or_else(bad)?.try_into().expect("4"));
            let len = i32::from_le_bytes(
                b.get(off + 4..off + 8)
                    .ok_or_else(bad)?
                    .try_into()
                    .expect("4"),
            );
            let len = usize::try_from(len).map_err(|_| bad())?;
            let piece = b.get(off + 8..off + 8 + len).ok_or_else(bad)?.to_vec();
            off += 8 + len;
            pieces.push(piece);
            scores.push(score);
        }
        if off != b.len() {
            return Err(Error::format(
                path,
                format!(
                    "{} bytes after the {vocab_size} tokens: wrong vocabulary size?",
                    b.len() - off
                ),
            ));
        }
        let index = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        Ok(Llama2cTokenizer {
            pieces,
            scores,
            index,
        })
    }

    /// `run.c`'s encode: optional BOS, a dummy " " prefix, code points (or byte fallback),
    /// then merges by highest score.
    pub fn encode(&self, text: &str, bos: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        if bos {
            ids.push(BOS);
        }
        // the dummy prefix takes part in the merges (" " + "Once" -> " Once")
        let mut tokens: Vec<u32> = Vec::new();
        if !text.is_empty() {
            if let Some(&sp) = self.index.get(&b" "[..]) {
                tokens.push(sp);
            }
        }
        for ch in text.chars() {
            let mut buf = [0u8; 4];
            let s = ch.encode_utf8(&mut buf).as_bytes();
            match self.index.get(s) {
                Some(&id) => tokens.push(id),
                None => tokens.extend(s.iter().map(|&b| b as u32 + 3)),
            }
        }
        loop {
            let mut best: Option<(f32, usize, u32)> = None;
            for i in 0..tokens.len().saturating_sub(1) {
                let mut merged = self.pieces[tokens[i] as usize].clone();
                merged.extend_from_slice(&self.pieces[tokens[i + 1] as usize]);
                if let Some(&id) = self.index.get(&merged) {
                    if best.is_none_or(|b| self.scores[id as usize] > b.0) {
                        best = Some((self.scores[id as usize], i, id));
                    }
                }
            }
            let Some((_, i, id)) = best else { break };
            tokens[i] = id;
            tokens.remove(i + 1);
        }
        ids.extend(tokens);
        ids
    }

    /// The bytes `run.c` prints for `token` following `prev`.
    pub fn decode_piece(&self, prev: u32, token: u32) -> Vec<u8> {
        let mut p: &[u8] = self
            .pieces
            .get(token as usize)
            .map(|v| v.as_slice())
            .unwrap_or(b"");
        if prev == BOS && p.first() == Some(&b' ') {
            p = &p[1..];
        }
        if p.len() == 6 && p.starts_with(b"<0x") && p.ends_with(b">") {
            if let Ok(byte) = u8::from_str_radix(std::str::from_utf8(&p[3..5]).unwrap_or(""), 16) {
                return vec![byte];
            }
        }
        if p.len() == 1 && !(p[0].is_ascii_graphic() || p[0].is_ascii_whitespace()) {
            return vec![];
        }
        p.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/stories260K")
            .join(name)
    }

    /// llama2.c's own greedy output for "Once upon a time" (256 steps), token for token and
    /// byte for byte.
    #[test]
    fn reproduces_llama2c_greedy_output() {
        let model = Llama2c::load(&fixture("stories260K.bin")).unwrap();
        let tok = Llama2cTokenizer::load(&fixture("tok512.bin"), model.config.vocab_size).unwrap();
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("reference_greedy.json")).unwrap(),
        )
        .unwrap();
        let case = &reference["cases"][0];
        let prompt = case["prompt"].as_str().unwrap();
        let want_prompt: Vec<u32> = case["prompt_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let want_seq: Vec<u32> = case["sequence_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(prompt, true);
        assert_eq!(ids, want_prompt);
        let mut cache = model.new_cache();
        let mut seq = vec![ids[0]];
        let mut out = Vec::new();
        let mut token = ids[0];
        for pos in 0..256 {
            let logits = model.forward(&mut cache, token).unwrap();
            let next = if pos + 1 < ids.len() {
                ids[pos + 1]
            } else {
                crate::sample::argmax(&logits)
            };
            if next == BOS {
                break;
            }
            out.extend(tok.decode_piece(token, next));
            seq.push(next);
            token = next;
        }
        assert_eq!(seq, want_seq);
        out.push(b'\n');
        assert_eq!(
            String::from_utf8(out).unwrap(),
            case["stdout"].as_str().unwrap()
        );
    }

    #[test]
    fn refuses_files_whose_header_does_not_match_their_size() {
        let dir = std::env::temp_dir().join(format!("quill-l2c-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let b = std::fs::read(fixture("stories260K.bin")).unwrap();
        std::fs::write(dir.join("t.bin"), &b[..b.len() - 4]).unwrap();
        let e = Llama2c::load(&dir.join("t.bin")).err().unwrap().to_string();
        assert!(e.contains("implies") && e.contains("truncated"), "{e}");
        std::fs::write(dir.join("h.bin"), &b[..20]).unwrap();
        assert!(Llama2c::load(&dir.join("h.bin")).is_err());
        assert!(Llama2cTokenizer::load(&fixture("tok512.bin"), 600).is_err());
        assert!(Llama2cTokenizer::load(&fixture("tok512.bin"), 400).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

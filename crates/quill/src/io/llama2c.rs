//! llama2.c checkpoints (Karpathy's `run.c` "legacy" version-0 `.bin` format; the byte
//! layout is in tests/fixtures/stories260K/FORMAT.md) opened as a Llama-family [`Model`]:
//! RMSNorm (eps 1e-5), rotary positions (theta 10000), grouped-query attention, SwiGLU.
//!
//! llama2.c rotates adjacent pairs (2m, 2m+1) of each head; Hugging Face's Llama rotates
//! halves (m, m + D/2). As the Hugging Face converter does, the rows of wq and wk are
//! permuted within each head (row 2m+s moves to s·D/2 + m), which turns one convention into
//! the other, so the checkpoint runs through the same decoder as every other model.

use crate::kernels::rope::RopeScaling;
use crate::model::{Config, LlamaConfig, Model};
use crate::{Error, Result};
use std::path::Path;

/// The header's seven int32 fields.
const HEADER: usize = 28;

/// Opens a llama2.c checkpoint.
pub fn load(path: &Path) -> Result<Model> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let config = read_header(path, &bytes)?;
    let mut model = Model::new(Config::Llama(config.clone()))?;
    let (d, hidden, layers, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.vocab_size,
    );
    let (heads, kv_heads, hd) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    );
    let kv = kv_heads * hd;
    // (name pattern, rows, columns), in the file's order; "{}" is the layer
    let per_layer: [(&str, usize, usize); 9] = [
        ("input_layernorm.weight", 1, d),
        ("self_attn.q_proj.weight", d, d),
        ("self_attn.k_proj.weight", kv, d),
        ("self_attn.v_proj.weight", kv, d),
        ("self_attn.o_proj.weight", d, d),
        ("post_attention_layernorm.weight", 1, d),
        ("mlp.gate_proj.weight", hidden, d),
        ("mlp.down_proj.weight", d, hidden),
        ("mlp.up_proj.weight", hidden, d),
    ];
    let mut off = HEADER;
    let mut take = |n: usize| -> Vec<f32> {
        let v = bytes[off..off + 4 * n]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        off += 4 * n;
        v
    };
    let mut tensors: Vec<(String, Vec<f32>)> =
        vec![("model.embed_tokens.weight".into(), take(v * d))];
    for (name, rows, cols) in per_layer {
        for l in 0..layers {
            let mut t = take(rows * cols);
            match name {
                "self_attn.q_proj.weight" => t = pairs_to_halves(&t, heads, hd, cols),
                "self_attn.k_proj.weight" => t = pairs_to_halves(&t, kv_heads, hd, cols),
                _ => {}
            }
            tensors.push((format!("model.layers.{l}.{name}"), t));
        }
    }
    tensors.push(("model.norm.weight".into(), take(d)));
    let _rope_tables = take(2 * config.max_position_embeddings * hd / 2);
    if !config.tie_word_embeddings {
        tensors.push(("lm_head.weight".into(), take(v * d)));
    }
    for (name, data) in tensors {
        let spec = model
            .layout
            .get(&name)
            .ok_or_else(|| Error::Input(format!("no tensor named {name}")))?
            .view;
        spec.of_mut(&mut model.params).copy_from_slice(&data);
    }
    Ok(model)
}

/// Rows of each head reordered from adjacent rotary pairs to rotate-half order: row 2m+s of
/// a head of width `hd` moves to s·hd/2 + m. A row is `cols` elements (numbers, or the bytes
/// of a quantized row).
pub(crate) fn pairs_to_halves<T: Copy + Default>(
    w: &[T],
    heads: usize,
    hd: usize,
    cols: usize,
) -> Vec<T> {
    reorder_rotary_rows(w, heads, hd, cols, true)
}

/// The inverse of [`pairs_to_halves`]: rotate-half rows back to adjacent pairs (the order
/// llama.cpp's files keep).
pub(crate) fn halves_to_pairs<T: Copy + Default>(
    w: &[T],
    heads: usize,
    hd: usize,
    cols: usize,
) -> Vec<T> {
    reorder_rotary_rows(w, heads, hd, cols, false)
}

fn reorder_rotary_rows<T: Copy + Default>(
    w: &[T],
    heads: usize,
    hd: usize,
    cols: usize,
    to_halves: bool,
) -> Vec<T> {
    let mut out = vec![T::default(); w.len()];
    for h in 0..heads {
        for m in 0..hd / 2 {
            for s in 0..2 {
                let pair = (h * hd + 2 * m + s) * cols;
                let half = (h * hd + s * hd / 2 + m) * cols;
                let (from, to) = if to_halves {
                    (pair, half)
                } else {
                    (half, pair)
                };
                out[to..to + cols].copy_from_slice(&w[from..from + cols]);
            }
        }
    }
    out
}

/// The configuration the header describes, after checking that the file holds exactly the
/// bytes it implies (every size computed with overflow checks).
fn read_header(path: &Path, bytes: &[u8]) -> Result<LlamaConfig> {
    if bytes.len() < HEADER {
        return Err(Error::format(
            path,
            "not a llama2.c checkpoint (shorter than its 28-byte header)",
        ));
    }
    let h: Vec<i32> = bytes[..HEADER]
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let bad = |why: &str| {
        Error::format(
            path,
            format!("not a llama2.c checkpoint: {why} (header {h:?})"),
        )
    };
    if h.iter()
        .enumerate()
        .any(|(i, &x)| x == 0 || (i != 5 && x < 0))
        || h[5] == i32::MIN
    {
        return Err(bad("zero or negative sizes"));
    }
    let [dim, hidden, layers, heads, kv_heads, _, seq_len] =
        [h[0], h[1], h[2], h[3], h[4], h[5], h[6]].map(|x| x.unsigned_abs() as usize);
    let vocab = h[5].unsigned_abs() as usize;
    let shared = h[5] > 0;
    if !dim.is_multiple_of(heads)
        || !heads.is_multiple_of(kv_heads)
        || !(dim / heads).is_multiple_of(2)
    {
        return Err(bad("inconsistent head counts"));
    }
    let hd = dim / heads;
    let kv = kv_heads * hd;
    let want = (|| {
        let m = |a: usize, b: usize| a.checked_mul(b);
        let per_layer = [
            Some(2 * dim),
            m(2, m(dim, dim)?),
            m(2, m(kv, dim)?),
            m(3, m(hidden, dim)?),
        ];
        let per_layer = per_layer
            .iter()
            .try_fold(0usize, |a, x| a.checked_add((*x)?))?;
        let tables = [
            m(vocab, dim),
            m(layers, per_layer),
            Some(dim),
            m(seq_len, hd),
            if shared { Some(0) } else { m(vocab, dim) },
        ];
        let floats = tables
            .iter()
            .try_fold(0usize, |a, x| a.checked_add((*x)?))?;
        floats.checked_mul(4)?.checked_add(HEADER)
    })();
    match want {
        Some(want) if want == bytes.len() => {}
        Some(want) => {
            return Err(Error::format(
                path,
                format!(
                    "the header ({h:?}) implies {want} bytes but the file has {}: not a llama2.c checkpoint, or truncated",
                    bytes.len()
                ),
            ))
        }
        None => return Err(bad("sizes too large")),
    }
    let mut config = LlamaConfig::new(vocab, seq_len, dim, layers, heads, kv_heads);
    config.intermediate_size = hidden;
    config.tie_word_embeddings = shared;
    config.bos_token_id = Some(crate::tokenizer::llama2c::BOS);
    // run.c ends a story at BOS; EOS ends text in SentencePiece's convention
    config.eos_token_ids = vec![
        crate::tokenizer::llama2c::BOS,
        crate::tokenizer::llama2c::EOS,
    ];
    config.rope_scaling = RopeScaling::None;
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::llama2c::{Llama2cTokenizer, BOS};
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/stories260K")
            .join(name)
    }

    /// llama2.c's own greedy output for "Once upon a time" (256 steps), token for token and
    /// byte for byte, through the shared decoder (prompt tokens forced one at a time, as
    /// run.c does).
    #[test]
    fn reproduces_llama2c_greedy_output() {
        let model = load(&fixture("stories260K.bin")).unwrap();
        let tok = Llama2cTokenizer::load(&fixture("tok512.bin"), model.vocab_size()).unwrap();
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("reference_greedy.json")).unwrap(),
        )
        .unwrap();
        let case = &reference["cases"][0];
        let prompt = case["prompt"].as_str().unwrap();
        let ids_of = |k: &str| -> Vec<u32> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let ids = tok.encode(prompt, true);
        assert_eq!(ids, ids_of("prompt_tokens"));
        let mut cache = model.new_cache(model.context());
        let (mut seq, mut out, mut logits) = (vec![ids[0]], Vec::new(), Vec::new());
        let mut token = ids[0];
        for pos in 0..256 {
            model
                .forward_cached(&mut cache, &[token], &mut logits, false)
                .unwrap();
            let next = if pos + 1 < ids.len() {
                ids[pos + 1]
            } else {
                // greedy: the first of the largest logits, as run.c's argmax
                (0..logits.len()).fold(0, |b, j| if logits[j] > logits[b] { j } else { b }) as u32
            };
            if next == BOS {
                break;
            }
            out.extend(tok.decode_piece(token, next));
            seq.push(next);
            token = next;
        }
        assert_eq!(seq, ids_of("sequence_tokens"));
        out.push(b'\n');
        assert_eq!(
            String::from_utf8(out).unwrap(),
            case["stdout"].as_str().unwrap()
        );
    }

    /// The row permutation is a rotation convention change: rotating adjacent pairs before
    /// it equals rotating halves after it (checked with the rotary kernel on random rows).
    #[test]
    fn permuted_rows_turn_pair_rotation_into_half_rotation() {
        use crate::kernels::rope::{inv_freq, Direction, HeadCols, Rope, RowPositions};
        let (heads, hd, cols, pos) = (3, 8, 5, 7);
        let w: Vec<f32> = (0..heads * hd * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let x: Vec<f32> = (0..cols).map(|i| i as f32 * 0.3 - 0.5).collect();
        let project = |w: &[f32]| -> Vec<f32> {
            w.chunks(cols)
                .map(|r| r.iter().zip(&x).map(|(a, b)| a * b).sum())
                .collect()
        };
        // llama2.c: rotate (2m, 2m+1) by pos · theta^(-2m/hd)
        let mut pairs = project(&w);
        for h in 0..heads {
            for m in 0..hd / 2 {
                let f = pos as f32 * 10000f32.powf(-((2 * m) as f32) / hd as f32);
                let (s, c) = f.sin_cos();
                let (a, b) = (pairs[h * hd + 2 * m], pairs[h * hd + 2 * m + 1]);
                pairs[h * hd + 2 * m] = a * c - b * s;
                pairs[h * hd + 2 * m + 1] = a * s + b * c;
            }
        }
        let mut halves = project(&pairs_to_halves(&w, heads, hd, cols));
        let rope = Rope::new(inv_freq(hd, 10000.0, &RopeScaling::None), 16);
        let cols = HeadCols {
            stride: heads * hd,
            col0: 0,
            heads,
        };
        rope.apply(
            &mut halves,
            cols,
            RowPositions {
                first: pos,
                period: None,
            },
            Direction::Forward,
        );
        let back = pairs_to_halves(&pairs, heads, hd, 1);
        for (a, b) in halves.iter().zip(&back) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn refuses_files_whose_header_does_not_match_their_size() {
        let dir = std::env::temp_dir().join(format!("quill-l2c-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let b = std::fs::read(fixture("stories260K.bin")).unwrap();
        std::fs::write(dir.join("t.bin"), &b[..b.len() - 4]).unwrap();
        let e = load(&dir.join("t.bin")).err().unwrap().to_string();
        assert!(e.contains("implies") && e.contains("truncated"), "{e}");
        std::fs::write(dir.join("h.bin"), &b[..20]).unwrap();
        assert!(load(&dir.join("h.bin")).is_err());
        // sizes whose products overflow
        let mut huge = b[..28].to_vec();
        huge[..4].copy_from_slice(&i32::MAX.to_le_bytes());
        std::fs::write(dir.join("o.bin"), &huge).unwrap();
        assert!(load(&dir.join("o.bin")).is_err());
        assert!(Llama2cTokenizer::load(&fixture("tok512.bin"), 600).is_err());
        assert!(Llama2cTokenizer::load(&fixture("tok512.bin"), 400).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! A fast encoder for GPT-2 style byte-level BPE tokenizers (ByteLevel pre-tokenizer with
//! the GPT-2 pattern, no normalizer, BPE merges by rank). It gives exactly the ids of the
//! `tokenizers` library (differential test below) at several times its speed, which is what
//! `quill prepare` spends its time on.
//!
//! Pre-tokenisation: the GPT-2 pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
//! ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` without the look-ahead (the `regex` crate has none): a
//! whitespace run of two or more characters followed by a non-space gives back its last
//! character, which then starts the next piece — what `\s+(?!\S)` does.

use serde_json::Value;
use std::collections::HashMap;

pub struct ByteBpe {
    pre: regex::Regex,
    /// id of the token made of one byte
    byte_id: [u32; 256],
    /// (left id, right id) -> (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
}

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("in range")
        };
    }
    table
}

impl ByteBpe {
    /// Builds the encoder when the tokenizer.json is of the supported shape, else None.
    pub fn from_json(v: &Value) -> Option<ByteBpe> {
        let pre = v.get("pre_tokenizer")?;
        let ok_pre = pre.get("type")?.as_str()? == "ByteLevel"
            && pre
                .get("use_regex")
                .and_then(Value::as_bool)
                .unwrap_or(true)
            && !pre
                .get("add_prefix_space")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let model = v.get("model")?;
        let empty = |k: &str| {
            model
                .get(k)
                .is_none_or(|x| x.is_null() || x.as_str() == Some(""))
        };
        let ok_model = model.get("type")?.as_str()? == "BPE"
            && v.get("normalizer").is_none_or(Value::is_null)
            && model.get("dropout").is_none_or(Value::is_null)
            && empty("continuing_subword_prefix")
            && empty("end_of_word_suffix")
            && !model
                .get("byte_fallback")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            && !model
                .get("ignore_merges")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        if !ok_pre || !ok_model {
            return None;
        }
        let table = bytes_to_unicode();
        let mut inverse = HashMap::new();
        for (b, &c) in table.iter().enumerate() {
            inverse.insert(c, b as u8);
        }
        let to_bytes =
            |s: &str| -> Option<Vec<u8>> { s.chars().map(|c| inverse.get(&c).copied()).collect() };
        let mut vocab: HashMap<Vec<u8>, u32> = HashMap::new();
        for (k, id) in model.get("vocab")?.as_object()? {
            if let Some(bytes) = to_bytes(k) {
                vocab.insert(bytes, id.as_u64()? as u32);
            }
        }
        let mut byte_id = [0u32; 256];
        for (b, id) in byte_id.iter_mut().enumerate() {
            *id = *vocab.get(&vec![b as u8])?;
        }
        let mut merges = HashMap::new();
        for (rank, m) in model.get("merges")?.as_array()?.iter().enumerate() {
            let (a, b) = match m {
                Value::String(s) => {
                    let mut it = s.splitn(2, ' ');
                    (it.next()?.to_string(), it.next()?.to_string())
                }
                Value::Array(p) if p.len() == 2 => {
                    (p[0].as_str()?.to_string(), p[1].as_str()?.to_string())
                }
                _ => return None,
            };
            let (ab, bb) = (to_bytes(&a)?, to_bytes(&b)?);
            let (ia, ib) = (*vocab.get(&ab)?, *vocab.get(&bb)?);
            let merged: Vec<u8> = ab.iter().chain(&bb).copied().collect();
            let im = *vocab.get(&merged)?;
            merges.entry((ia, ib)).or_insert((rank as u32, im));
        }
        let pre =
            regex::Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+")
                .ok()?;
        Some(ByteBpe {
            pre,
            byte_id,
            merges,
        })
    }

    /// Appends the ids of `text` (no special-token handling) to `out`. `cache` maps
    /// pre-tokens already seen to their ids; keep one per thread and per piece of work.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>, cache: &mut HashMap<String, Vec<u32>>) {
        let mut pos = 0;
        let mut word: Vec<u32> = Vec::with_capacity(32);
        while pos < text.len() {
            let Some(m) = self.pre.find_at(text, pos) else {
                break;
            };
            let mut end = m.end();
            let piece = &text[m.start()..end];
            // \s+(?!\S): a whitespace run followed by a non-space leaves its last character
            if end < text.len()
                && piece.chars().nth(1).is_some()
                && piece.chars().all(char::is_whitespace)
            {
                let last = piece.chars().next_back().expect("non-empty");
                end -= last.len_utf8();
            }
            let piece = &text[m.start()..end];
            pos = end;
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                continue;
            }
            word.clear();
            word.extend(piece.bytes().map(|b| self.byte_id[b as usize]));
            self.merge(&mut word);
            if cache.len() < 1 << 16 {
                cache.insert(piece.to_string(), word.clone());
            }
            out.extend_from_slice(&word);
        }
    }

    /// Applies merges, lowest rank first, until none applies.
    fn merge(&self, word: &mut Vec<u32>) {
        while word.len() > 1 {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..word.len() - 1 {
                if let Some(&(rank, id)) = self.merges.get(&(word[i], word[i + 1])) {
                    if best.is_none_or(|b| rank < b.0) {
                        best = Some((rank, i, id));
                    }
                }
            }
            let Some((rank, _, id)) = best else { break };
            // merge every occurrence of this pair, left to right
            let a = std::mem::take(word);
            let mut merged = Vec::with_capacity(a.len());
            let mut i = 0;
            while i < a.len() {
                if i + 1 < a.len()
                    && self
                        .merges
                        .get(&(a[i], a[i + 1]))
                        .is_some_and(|m| m.0 == rank)
                {
                    merged.push(id);
                    i += 2;
                } else {
                    merged.push(a[i]);
                    i += 1;
                }
            }
            *word = merged;
        }
    }
}

//! Character-level tokenizer: the vocabulary is the set of characters of the training
//! corpus, saved as a `tokenizer.json` that the Hugging Face `tokenizers` library loads
//! (a BPE model with no merges and a Fuse decoder, so each character is one token).

use crate::{Error, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct CharTokenizer {
    chars: Vec<char>,
    index: HashMap<char, u32>,
}

impl CharTokenizer {
    /// The sorted set of characters in `text`.
    pub fn from_text(text: &str) -> Result<Self> {
        let mut chars: Vec<char> = text
            .chars()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if chars.is_empty() {
            return Err(Error::Input(
                "cannot build a vocabulary from empty text".into(),
            ));
        }
        chars.sort();
        Ok(Self::from_chars(chars))
    }

    fn from_chars(chars: Vec<char>) -> Self {
        let index = chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        CharTokenizer { chars, index }
    }

    /// The vocabulary: token i is `chars()[i]`.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|c| {
                self.index.get(&c).copied().ok_or_else(|| {
                    Error::Input(format!(
                        "character {c:?} (U+{:04X}) is not in the model's character vocabulary",
                        c as u32
                    ))
                })
            })
            .collect()
    }

    /// Ids outside the vocabulary decode to U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{FFFD}'))
            .collect()
    }

    /// UTF-8 bytes of each token, for bits-per-byte.
    pub fn token_bytes(&self) -> Vec<u32> {
        self.chars.iter().map(|c| c.len_utf8() as u32).collect()
    }

    pub fn id_of(&self, c: char) -> Option<u32> {
        self.index.get(&c).copied()
    }

    /// The `tokenizer.json` text.
    pub fn to_json(&self) -> String {
        let vocab: serde_json::Map<String, Value> = self
            .chars
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), Value::from(i)))
            .collect();
        let v = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": []
            }
        });
        serde_json::to_string_pretty(&v).expect("json serializes") + "\n"
    }

    /// Whether a parsed `tokenizer.json` is a character-level one: a BPE model without
    /// merges whose tokens are single characters.
    pub fn is_char_level(v: &Value) -> bool {
        let Some(model) = v.get("model") else {
            return false;
        };
        let merges_empty = model
            .get("merges")
            .and_then(Value::as_array)
            .is_some_and(|m| m.is_empty());
        let single_chars = model
            .get("vocab")
            .and_then(Value::as_object)
            .is_some_and(|voc| !voc.is_empty() && voc.keys().all(|k| k.chars().count() == 1));
        // a byte-level vocabulary without merges (every token one byte) is not one
        let byte_level = v
            .get("decoder")
            .and_then(|d| d.get("type"))
            .and_then(Value::as_str)
            == Some("ByteLevel");
        merges_empty
            && single_chars
            && !byte_level
            && v.get("added_tokens")
                .and_then(Value::as_array)
                .is_none_or(|a| a.is_empty())
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let model = v
            .get("model")
            .ok_or_else(|| Error::format(path, "not a tokenizer file (no \"model\" entry)"))?;
        let merges_empty = model
            .get("merges")
            .and_then(Value::as_array)
            .is_some_and(|m| m.is_empty());
        let vocab = model.get("vocab").and_then(Value::as_object);
        let (Some(vocab), true) = (vocab, merges_empty) else {
            return Err(Error::format(
                path,
                "not a character-level tokenizer (it has merges or no vocabulary)",
            ));
        };
        let mut chars = vec![None; vocab.len()];
        for (k, id) in vocab {
            let mut it = k.chars();
            let (Some(c), None) = (it.next(), it.next()) else {
                return Err(Error::format(
                    path,
                    format!("token {k:?} is not a single character"),
                ));
            };
            let id = id.as_u64().map(|i| i as usize).filter(|&i| i < chars.len());
            let Some(id) = id else {
                return Err(Error::format(path, format!("token {k:?} has a bad id")));
            };
            chars[id] = Some(c);
        }
        let chars: Option<Vec<char>> = chars.into_iter().collect();
        let chars = chars.ok_or_else(|| Error::format(path, "token ids are not 0..n"))?;
        Ok(Self::from_chars(chars))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_encodes_decodes_and_round_trips_through_json() {
        let t = CharTokenizer::from_text("hello, wörld\n").unwrap();
        assert_eq!(t.vocab_size(), 11);
        let ids = t.encode("low\n").unwrap();
        assert_eq!(t.decode(&ids), "low\n");
        assert_eq!(t.token_bytes()[t.id_of('ö').unwrap() as usize], 2);
        let e = t.encode("lox").unwrap_err().to_string();
        assert!(e.contains("'x'"), "{e}");
        let dir = std::env::temp_dir().join(format!("quill-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, t.to_json()).unwrap();
        let load = |p: &Path| -> Result<CharTokenizer> {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap())
                .map_err(|e| Error::format(p, e.to_string()))?;
            CharTokenizer::from_json(&v, p)
        };
        assert_eq!(load(&p).unwrap(), t);
        std::fs::write(&p, "{\"model\": 3").unwrap();
        assert!(load(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(CharTokenizer::from_text("").is_err());
    }
}

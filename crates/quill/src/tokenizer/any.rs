//! [`Tokenizer`]: any of the tokenizers quill reads, behind one interface.

use super::bytebpe;
use super::char::CharTokenizer;
use super::llama2c::Llama2cTokenizer;
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// OpenAI's GPT-2 tokenizer (byte-level BPE, 50,257 tokens), embedded: `gpt2` on the command line.
pub const GPT2_TOKENIZER_JSON: &str =
    include_str!("../../../../data/gpt2-tokenizer/tokenizer.json");

pub enum Tokenizer {
    Char(CharTokenizer),
    Hf(Box<HfTokenizer>),
    Llama2c(Box<Llama2cTokenizer>),
}

/// A `tokenizers` tokenizer, plus a twin without added tokens for plain-text encoding
/// (special-token strings in the text encoded as ordinary text, as OpenAI's encoder does).
pub struct HfTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub(super) plain: tokenizers::Tokenizer,
    json: String,
    byte_level: bool,
    /// Cached: `tokenizers` rebuilds its whole vocabulary map to count it.
    vocab_size: usize,
    /// Our own encoder for GPT-2 style byte-level BPE files (same ids, several times faster).
    fast: Option<bytebpe::ByteBpe>,
}

impl Tokenizer {
    /// Reads a `tokenizer.json` file, or the one in a model folder.
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::from_json_str(&text, &file)
    }

    /// `char` is not a file; `gpt2` is the embedded GPT-2 tokenizer; anything else a path.
    pub fn from_spec(spec: &str) -> Result<Self> {
        if spec == "gpt2" {
            return Self::from_json_str(
                GPT2_TOKENIZER_JSON,
                Path::new("<embedded gpt2 tokenizer.json>"),
            );
        }
        Self::load(Path::new(spec))
    }

    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| {
            Error::format(path, format!("not a tokenizer file (invalid JSON: {e})"))
        })?;
        if !v.is_object() || v.get("model").is_none() {
            return Err(Error::format(
                path,
                "not a tokenizer file (no \"model\" entry)",
            ));
        }
        if CharTokenizer::is_char_level(&v) {
            return Ok(Tokenizer::Char(CharTokenizer::from_json(&v, path)?));
        }
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes()).map_err(|e| {
            Error::format(
                path,
                format!("not a tokenizer the `tokenizers` library accepts: {e}"),
            )
        })?;
        let mut plain_v = v.clone();
        plain_v["added_tokens"] = Value::Array(vec![]);
        let plain = tokenizers::Tokenizer::from_bytes(plain_v.to_string().as_bytes())
            .map_err(|e| Error::format(path, format!("bad tokenizer: {e}")))?;
        let byte_level = v
            .get("decoder")
            .and_then(|d| d.get("type"))
            .and_then(Value::as_str)
            == Some("ByteLevel");
        let vocab_size = inner.get_vocab_size(true);
        let fast = bytebpe::ByteBpe::from_json(&v);
        Ok(Tokenizer::Hf(Box::new(HfTokenizer {
            fast,
            vocab_size,
            inner,
            plain,
            json: text.to_string(),
            byte_level,
        })))
    }

    /// Encodes text. Special-token strings (e.g. `<|endoftext|>`) become their special ids,
    /// as Hugging Face tokenizers do; no BOS/EOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char(t) => t.encode(text),
            Tokenizer::Hf(t) => hf_ids(&t.inner, text, false),
            Tokenizer::Llama2c(t) => Ok(t.encode(text, false)),
        }
    }

    /// Encodes text as `transformers`' `tokenizer(text)` does: with whatever the tokenizer's
    /// post-processor adds (Llama's BOS, for example; nothing for GPT-2 or Qwen2).
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char(t) => t.encode(text),
            Tokenizer::Hf(t) => hf_ids(&t.inner, text, true),
            // SentencePiece Llama tokenizers add BOS
            Tokenizer::Llama2c(t) => Ok(t.encode(text, true)),
        }
    }

    /// Encodes text as plain text: special-token strings are ordinary characters.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char(t) => t.encode(text),
            Tokenizer::Hf(t) => match &t.fast {
                Some(fast) => {
                    let mut out = Vec::with_capacity(text.len() / 3);
                    fast.encode(text, &mut out, &mut std::collections::HashMap::new());
                    Ok(out)
                }
                None => hf_ids(&t.plain, text, false),
            },
            Tokenizer::Llama2c(t) => Ok(t.encode(text, false)),
        }
    }

    /// Decodes ids to text (special tokens included). Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let v = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary (size {v})"
            )));
        }
        match self {
            Tokenizer::Char(t) => Ok(t.decode(ids)),
            Tokenizer::Hf(t) => t
                .inner
                .decode(ids, false)
                .map_err(|e| Error::Input(format!("cannot decode: {e}"))),
            Tokenizer::Llama2c(t) => Ok(t.decode(ids)),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(t) => t.vocab_size(),
            Tokenizer::Hf(t) => t.vocab_size,
            Tokenizer::Llama2c(t) => t.vocab_size(),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Char(t) => {
                let mut cs = token.chars();
                match (cs.next(), cs.next()) {
                    (Some(c), None) => t.id_of(c),
                    _ => None,
                }
            }
            Tokenizer::Hf(t) => t.inner.token_to_id(token),
            Tokenizer::Llama2c(t) => t.token_to_id(token),
        }
    }

    /// UTF-8 bytes each token stands for (for bits per byte).
    pub fn token_bytes(&self) -> Vec<u32> {
        match self {
            Tokenizer::Char(t) => t.token_bytes(),
            Tokenizer::Hf(t) => (0..self.vocab_size() as u32)
                .map(|id| match t.inner.id_to_token(id) {
                    // byte-level tokens spell one byte per character
                    Some(tok) if t.byte_level => tok.chars().count() as u32,
                    _ => t
                        .inner
                        .decode(&[id], false)
                        .map(|s| s.len() as u32)
                        .unwrap_or(1),
                })
                .collect(),
            Tokenizer::Llama2c(t) => (0..self.vocab_size() as u32)
                .map(|id| t.bytes_of(id).len() as u32)
                .collect(),
        }
    }

    /// The `tokenizer.json` text (a llama2.c tokenizer has none).
    pub fn to_json(&self) -> Result<String> {
        match self {
            Tokenizer::Char(t) => Ok(t.to_json()),
            Tokenizer::Hf(t) => Ok(t.json.clone()),
            Tokenizer::Llama2c(_) => Err(Error::Input(
                "a llama2.c tokenizer.bin cannot be written as tokenizer.json".into(),
            )),
        }
    }
}

fn hf_ids(tok: &tokenizers::Tokenizer, text: &str, add_special: bool) -> Result<Vec<u32>> {
    Ok(tok
        .encode_fast(text, add_special)
        .map_err(|e| Error::Input(format!("cannot tokenize: {e}")))?
        .get_ids()
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn loads_char_and_bpe_files_and_refuses_others() {
        let c = CharTokenizer::from_text("abc\n").unwrap();
        let t = Tokenizer::from_json_str(&c.to_json(), Path::new("x")).unwrap();
        assert!(matches!(t, Tokenizer::Char(_)));
        let g = Tokenizer::from_spec("gpt2").unwrap();
        assert!(matches!(g, Tokenizer::Hf(_)));
        assert_eq!(g.vocab_size(), 50257);
        assert_eq!(g.token_to_id("<|endoftext|>"), Some(50256));
        for bad in ["[1, 2]", "{", "{\"model\": {\"type\": \"Nope\"}}"] {
            assert!(
                Tokenizer::from_json_str(bad, Path::new("bad.json")).is_err(),
                "{bad}"
            );
        }
        assert!(g.decode(&[50257]).is_err());
    }

    /// The fast encoder gives the `tokenizers` library's ids on random text.
    #[test]
    fn bytebpe_agrees_with_the_tokenizers_library() {
        let v: Value = serde_json::from_str(GPT2_TOKENIZER_JSON).unwrap();
        let fast = bytebpe::ByteBpe::from_json(&v).expect("GPT-2 is supported");
        let Tokenizer::Hf(hf) = Tokenizer::from_spec("gpt2").unwrap() else {
            panic!()
        };
        let pieces = [
            "a",
            "Hello",
            " world",
            "'s",
            "'ll",
            "'re",
            "don't",
            " ",
            "  ",
            "   ",
            "\t",
            "\n",
            "\n\n",
            "\r\n",
            " \n ",
            "é",
            "e\u{301}",
            "こんにちは",
            "😀",
            "👍🏽",
            "\u{feff}",
            "\u{200b}",
            "\u{a0}",
            "\u{3000}",
            "123",
            "3.14",
            "!!",
            "...",
            "<|endoftext|>",
            "ǅ",
            "Ⅻ",
            "٣",
            "x\u{2028}y",
            "  a",
            " \u{a0}b",
        ];
        let mut rng = Rng::new(99);
        let mut cache = std::collections::HashMap::new();
        for i in 0..3000 {
            let mut s = String::new();
            for _ in 0..rng.below(16) {
                if rng.below(5) == 0 {
                    if let Some(c) = char::from_u32(rng.below(0x3_0000) as u32) {
                        s.push(c);
                    }
                } else {
                    s.push_str(pieces[rng.below(pieces.len())]);
                }
            }
            let want = hf
                .plain
                .encode_fast(s.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            let mut got = Vec::new();
            fast.encode(&s, &mut got, &mut cache);
            assert_eq!(got, want, "case {i}: {s:?}");
        }
    }
}

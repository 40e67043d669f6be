//! llama2.c's `tokenizer.bin` (the format is described in
//! tests/fixtures/stories260K/FORMAT.md): SentencePiece-style pieces with merge scores, a
//! dummy space prefix and byte fallback, encoded and printed as llama2.c's `run.c` does.

use crate::{Error, Result};
use std::path::Path;

/// llama2.c's `tokenizer.bin`: pieces with merge scores; BPE as `run.c` does it.
#[derive(Clone, Debug)]
pub struct Llama2cTokenizer {
    pieces: Vec<Vec<u8>>,
    scores: Vec<f32>,
    index: std::collections::HashMap<Vec<u8>, u32>,
}

pub const BOS: u32 = 1;
pub const EOS: u32 = 2;

/// Every byte value, for byte-fallback pieces.
const BYTES: [u8; 256] = {
    let mut b = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        b[i] = i as u8;
        i += 1;
    }
    b
};

impl Llama2cTokenizer {
    pub fn load(path: &Path, vocab_size: usize) -> Result<Self> {
        let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = || {
            Error::format(
                path,
                format!("not a llama2.c tokenizer for {vocab_size} tokens (truncated or damaged)"),
            )
        };
        if vocab_size < 3 {
            return Err(Error::format(
                path,
                format!("a llama2.c vocabulary needs <unk>, <s> and </s>: {vocab_size} tokens are too few"),
            ));
        }
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
                // byte fallback: <0xNN> is token NN + 3; a vocabulary too small to hold
                // the byte tokens gives the unknown token instead
                None => tokens.extend(s.iter().map(|&b| {
                    let id = b as u32 + 3;
                    if (id as usize) < self.pieces.len() {
                        id
                    } else {
                        0
                    }
                })),
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

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Every piece as stored (spaces as "▁", bytes as `<0xNN>`) with its merge score.
    pub fn pieces(&self) -> impl Iterator<Item = (&[u8], f32)> {
        self.pieces
            .iter()
            .map(Vec::as_slice)
            .zip(self.scores.iter().copied())
    }

    pub fn token_to_id(&self, piece: &str) -> Option<u32> {
        self.index.get(piece.as_bytes()).copied()
    }

    /// The bytes token `id` stands for: a byte-fallback piece `<0xAB>` is one byte, the
    /// control tokens (unknown, BOS, EOS) none.
    pub fn bytes_of(&self, id: u32) -> &[u8] {
        let p = self
            .pieces
            .get(id as usize)
            .map_or(&b""[..], |v| v.as_slice());
        if id < 3 {
            return b"";
        }
        if p.len() == 6 && p.starts_with(b"<0x") && p.ends_with(b">") {
            let hex = std::str::from_utf8(&p[3..5]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return &BYTES[b as usize..b as usize + 1];
            }
        }
        p
    }

    /// Text of `ids` as SentencePiece decodes it: the pieces' bytes joined, the dummy space
    /// prefix of the first piece dropped, invalid UTF-8 replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.bytes_of(id));
        }
        let start = usize::from(out.first() == Some(&b' '));
        String::from_utf8_lossy(&out[start..]).into_owned()
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

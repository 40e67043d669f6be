//! Streaming detokenisation: byte-level BPE tokens can end in the middle of a UTF-8
//! character, so text is released only once it decodes cleanly.

use super::any::Tokenizer;
use crate::Result;

#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Bytes of the decoded text already handed out.
    emitted: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the new text that is complete (maybe empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() < self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(String::new());
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        // keep the decoded window short: once everything is flushed, keep only the last few
        // tokens as context (decoders treat the start of a sequence specially)
        if self.ids.len() > 64 {
            self.ids = self.ids.split_off(self.ids.len() - 8);
            self.emitted = tok.decode(&self.ids)?.len();
        }
        Ok(new)
    }

    /// The text still held back (at the end of generation).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let text = tok.decode(&self.ids)?;
        let rest = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(rest)
    }
}

//! tokenizer.json on arbitrary bytes: read as quill reads a model folder's tokenizer (character
//! vocabularies by our own reader, the rest by `tokenizers` plus our byte-level BPE encoder),
//! then a fixed text and the input itself encoded and decoded. It must return an error or a
//! tokenizer, never panic.
//!
//!   TMPDIR=/dev/shm cargo +nightly fuzz run tokenizer fuzz/corpus/tokenizer -- -max_len=8192
#![no_main]

use libfuzzer_sys::fuzz_target;
use quill::tokenizer::Tokenizer;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(tok) = Tokenizer::from_json_str(text, Path::new("tokenizer.json")) else {
        return;
    };
    // the input's first 256 bytes or fewer, cut at a character boundary
    let cut = (0..=text.len().min(256))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    for sample in ["Hello, world! 123 ünïcödé <|endoftext|>\n\t", &text[..cut]] {
        for ids in [
            tok.encode(sample),
            tok.encode_plain(sample),
            tok.encode_with_special(sample),
        ]
        .into_iter()
        .flatten()
        {
            let _ = tok.decode(&ids);
        }
    }
    let _ = tok.decode(&[0, 1, 2, u32::MAX]);
    let _ = tok.token_bytes();
});

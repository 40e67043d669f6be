//! Training a byte-level BPE tokenizer (GPT-2 style: byte alphabet, GPT-2 pre-tokenisation
//! pattern, `<|endoftext|>` as the special token) with the `tokenizers` library.

use super::any::Tokenizer;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer as HfTok};

pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Trains on the given UTF-8 text files; the vocabulary has `vocab_size` entries
/// (256 bytes + merges + `<|endoftext|>`).
pub fn train_byte_level_bpe(files: &[PathBuf], vocab_size: usize) -> Result<Tokenizer> {
    if vocab_size < 258 {
        return Err(Error::Input(format!(
            "a byte-level BPE vocabulary needs at least 258 entries (256 bytes, a merge, <|endoftext|>); got {vocab_size}"
        )));
    }
    for f in files {
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        if meta.len() == 0 {
            return Err(Error::Input(format!("{}: the file is empty", f.display())));
        }
        // the trainer reads files as UTF-8; check first so the error names the place
        let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        if let Err(e) = std::str::from_utf8(&bytes) {
            return Err(Error::Input(format!(
                "{}: not valid UTF-8 (at byte {})",
                f.display(),
                e.valid_up_to()
            )));
        }
    }
    let mut tok = HfTok::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .build()
        .into();
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    tok.train_from_files(&mut trainer, names)
        .map_err(|e| Error::Input(format!("training the tokenizer failed: {e}")))?;
    let json = tok
        .to_string(true)
        .map_err(|e| Error::Input(format!("cannot serialise the tokenizer: {e}")))?;
    Tokenizer::from_json_str(&json, Path::new("<trained tokenizer>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_a_byte_level_bpe_that_round_trips() {
        let dir = std::env::temp_dir().join(format!("quill-bpe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.txt");
        let text = "the cat sat on the mat. the dog sat on the log. ".repeat(200) + "naïve 🦀";
        std::fs::write(&f, &text).unwrap();
        let tok = train_byte_level_bpe(std::slice::from_ref(&f), 300).unwrap();
        assert!(tok.vocab_size() <= 300 && tok.vocab_size() > 257);
        assert!(tok.token_to_id(END_OF_TEXT).is_some());
        let ids = tok.encode("the cat sat on the log 🦀").unwrap();
        assert!(ids.len() < 20, "merges shorten common words: {ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), "the cat sat on the log 🦀");
        assert!(train_byte_level_bpe(&[f], 100).is_err());
        std::fs::write(dir.join("bad.txt"), b"ok\xff").unwrap();
        let e = train_byte_level_bpe(&[dir.join("bad.txt")], 300)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("UTF-8") && e.contains("byte 2"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

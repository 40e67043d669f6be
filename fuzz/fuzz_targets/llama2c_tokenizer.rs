//! A llama2.c tokenizer file on arbitrary bytes (the first two input bytes are the vocabulary
//! size the model would ask for): read, then a fixed text and the file's own bytes encoded and
//! decoded. It must return an error or a tokenizer, never panic.
//!
//!   TMPDIR=/dev/shm cargo +nightly fuzz run llama2c_tokenizer fuzz/corpus/llama2c_tokenizer
#![no_main]

use libfuzzer_sys::fuzz_target;
use quill::tokenizer::Llama2cTokenizer;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let vocab = u16::from_le_bytes([data[0], data[1]]) as usize;
    let path = std::env::temp_dir().join(format!("quill-fuzz-{}.tok", std::process::id()));
    if std::fs::write(&path, &data[2..]).is_err() {
        return;
    }
    if let Ok(tok) = Llama2cTokenizer::load(&path, vocab) {
        let tail = String::from_utf8_lossy(&data[2..data.len().min(130)]).into_owned();
        for text in ["Once upon a time, ünïcödé\n", tail.as_str()] {
            let ids = tok.encode(text, true);
            assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
            let _ = tok.decode(&ids);
        }
    }
});

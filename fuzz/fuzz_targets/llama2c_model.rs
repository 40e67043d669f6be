//! A llama2.c checkpoint on arbitrary bytes: its header checked against the file's size, the
//! model laid out, and, when the file holds a whole model, one token run through it with a KV
//! cache sized by the header's context. It must return an error or a model, never panic, and
//! never allocate for sizes the file does not back.
//!
//!   TMPDIR=/dev/shm cargo +nightly fuzz run llama2c_model fuzz/corpus/llama2c_model tests/fixtures/stories260K
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("quill-fuzz-{}.bin", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(model) = quill::io::llama2c::load(&path) {
        let _ = model.logits_all(&[0, 1]);
    }
});

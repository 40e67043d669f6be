//! generation_config.json on arbitrary bytes: read as quill reads a model folder's sampling
//! defaults (every field typed and ranged). It must return an error or a config, never panic.
//!
//!   TMPDIR=/dev/shm cargo +nightly fuzz run generation_config fuzz/corpus/generation_config tests/fixtures/llama-tiny
#![no_main]

use libfuzzer_sys::fuzz_target;
use quill::io::hf::GenerationConfig;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("quill-fuzz-gc-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    if std::fs::write(dir.join("generation_config.json"), data).is_err() {
        return;
    }
    if let Ok(c) = GenerationConfig::load(&dir) {
        assert!(c.temperature.is_none_or(|t| t.is_finite() && t >= 0.0));
        assert!(c.top_p.is_none_or(|p| (0.0..=1.0).contains(&p)));
    }
});

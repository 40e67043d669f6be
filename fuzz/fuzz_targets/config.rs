//! config.json on arbitrary bytes: parsed as quill parses a model folder's config, its
//! parameter count computed with overflow checks, and a model laid out when it is small. It
//! must return an error or a model, never panic, and never allocate for sizes it refuses.
//!
//!   cargo +nightly fuzz run config fuzz/corpus/config tests/fixtures/llama-tiny -- -runs=10000000
#![no_main]

use libfuzzer_sys::fuzz_target;
use quill::model::{Config, Gpt2Config, LlamaConfig, Model};

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let config = match v.get("model_type").and_then(|t| t.as_str()) {
        Some("gpt2") => match serde_json::from_value::<Gpt2Config>(v) {
            Ok(c) if c.validate().is_ok() => Config::Gpt2(c),
            _ => return,
        },
        _ => match LlamaConfig::from_json(&v) {
            Ok(c) => Config::Llama(c),
            Err(_) => return,
        },
    };
    if config.parameter_count().is_some_and(|n| n <= 1 << 20) {
        let _ = Model::new(config);
    }
});

//! A chat template on arbitrary bytes: compiled and rendered for a short conversation with
//! the output cap quill serves with and a step limit of 100,000 (a twentieth of the served
//! one: the same code stops a runaway template, in less of the fuzzer's time). It must
//! return an error or text, never panic, never run past its step limit, never write more
//! than its output cap.
//!
//!   cargo +nightly fuzz run chat_template fuzz/corpus/chat_template -- -max_len=4096
#![no_main]

use libfuzzer_sys::fuzz_target;
use quill::chat::{ChatTemplate, Message};

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let mut special = serde_json::Map::new();
    special.insert("bos_token".into(), "<s>".into());
    special.insert("eos_token".into(), "</s>".into());
    let Ok(t) = ChatTemplate::with_special(source, special) else {
        return;
    };
    let t = t.with_fuel(100_000);
    let messages = [
        Message::new("system", "Be brief."),
        Message::new("user", "What is the capital of France?"),
        Message::new("assistant", "Paris."),
        Message::new("user", "And of Italy?"),
    ];
    for add in [true, false] {
        if let Ok(text) = t.render(&messages, add) {
            assert!(text.len() <= 16 << 20);
        }
    }
});

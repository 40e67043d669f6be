//! The GGUF reader on arbitrary bytes: it must return an error or read everything the bytes
//! declare (every metadata array's items, every tensor's numbers), never panic, and never
//! allocate beyond a small multiple of the input (libFuzzer's -rss_limit_mb catches that).
//!
//!   cargo +nightly fuzz run gguf fuzz/corpus/gguf tests/fixtures/gguf -- -runs=10000000
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = quill::io::gguf::reader::check_bytes(data);
});

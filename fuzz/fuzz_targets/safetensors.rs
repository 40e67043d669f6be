//! A safetensors file on arbitrary bytes: opened as quill opens one (header parsed once,
//! every tensor's range checked) and every tensor read as f32. It must return an error or
//! read what the header declares, never panic, and never allocate beyond the file's size.
//!
//!   cargo +nightly fuzz run safetensors fuzz/corpus/safetensors tests/fixtures/gpt2-tiny -- -runs=10000000
#![no_main]

use libfuzzer_sys::fuzz_target;
use quill::io::safetensors::SafetensorsFile;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("quill-fuzz-{}.safetensors", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(f) = SafetensorsFile::open(&path) {
        for name in f.names().unwrap_or_default() {
            if let Ok(Some(shape)) = f.shape(&name) {
                // the header's shapes are checked against the bytes: never more than the file
                let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                let n = n.expect("a validated shape's size fits");
                assert!(n <= data.len());
                let mut dst = vec![0f32; n];
                let _ = f.read_into(&name, &shape, &mut dst);
            }
        }
    }
});

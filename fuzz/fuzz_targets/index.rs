//! model.safetensors.index.json on arbitrary bytes, in a folder that also holds one real
//! weight file (`a.safetensors`, the tiny Llama fixture's weights): the index is read as
//! quill reads a sharded folder's (names resolved inside the folder only), every tensor
//! looked up. It must return an error or the weights, never panic, never open a file outside
//! the folder, and never hang on a FIFO.
//!
//!   TMPDIR=/dev/shm cargo +nightly fuzz run index fuzz/corpus/index
#![no_main]

use libfuzzer_sys::fuzz_target;
use quill::io::hf::Weights;

const WEIGHTS: &[u8] = include_bytes!("../../tests/fixtures/llama-tiny/model.safetensors");

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("quill-fuzz-index-{}", std::process::id()));
    if !dir.join("a.safetensors").is_file() {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("a.safetensors"), WEIGHTS);
    }
    if std::fs::write(dir.join("model.safetensors.index.json"), data).is_err() {
        return;
    }
    if let Ok(w) = Weights::open(&dir) {
        let names: Vec<String> = w.names().cloned().collect();
        for name in names {
            let _ = w.shape(&name);
        }
    }
});

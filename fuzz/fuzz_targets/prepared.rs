//! A prepared data folder on arbitrary bytes: the input is meta.json, a zero byte, then the
//! bytes of a shard file named `s.bin` beside it. The folder is opened as `quill train
//! --data` opens it (shard names resolved inside the folder, counts checked against the
//! files) and every token read. It must return an error or the tokens, never panic, hang on
//! a named FIFO or device, or read outside the folder.
//!
//!   TMPDIR=/dev/shm cargo +nightly fuzz run prepared fuzz/corpus/prepared
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(cut) = data.iter().position(|&b| b == 0) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("quill-fuzz-prep-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    if std::fs::write(dir.join("meta.json"), &data[..cut]).is_err()
        || std::fs::write(dir.join("s.bin"), &data[cut + 1..]).is_err()
    {
        return;
    }
    if let Ok((_meta, split)) = quill::data::prepare::load(&dir) {
        for part in [&split.train, &split.val] {
            // every token the counts promise is backed by the files
            assert!(part.len() <= data.len());
            let mut out = vec![0u32; part.len()];
            part.read(0, &mut out);
        }
    }
});

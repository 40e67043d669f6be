//! Continuous batching: one batched step over several sequences (each at its own position,
//! with its own cache) gives each sequence the logits its own cached step gives.

use quill::model::{BatchScratch, Model};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

#[test]
fn batched_steps_equal_single_steps() {
    for name in ["gpt2-tiny", "llama-tiny", "qwen2-tiny"] {
        let model = Model::load(&fixture(name), true).unwrap();
        let v = model.vocab_size();
        let prompts: [&[u32]; 3] = [&[5, 6, 7], &[1], &[9, 8, 7, 6, 5, 4, 3, 2]];
        let mut single: Vec<_> = prompts.iter().map(|_| model.new_cache(40)).collect();
        let mut batched: Vec<_> = prompts.iter().map(|_| model.new_cache(40)).collect();
        let mut logits = Vec::new();
        let mut next: Vec<u32> = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            model
                .forward_cached(&mut single[i], p, &mut logits, false)
                .unwrap();
            model
                .forward_cached(&mut batched[i], p, &mut logits, false)
                .unwrap();
            next.push(quill::sample::argmax(&logits));
        }
        let mut scratch = BatchScratch::default();
        for step in 0..6 {
            let mut want = Vec::new();
            for (i, c) in single.iter_mut().enumerate() {
                model
                    .forward_cached(c, &[next[i]], &mut logits, false)
                    .unwrap();
                want.extend_from_slice(&logits);
            }
            let mut refs: Vec<_> = batched.iter_mut().collect();
            let mut got = Vec::new();
            model
                .forward_batch(&mut refs, &next, &mut got, &mut scratch)
                .unwrap();
            assert_eq!(got.len(), 3 * v);
            let d = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(d < 1e-4, "{name} step {step}: batched logits differ by {d}");
            next = (0..3)
                .map(|i| quill::sample::argmax(&got[i * v..(i + 1) * v]))
                .collect();
            for (a, b) in single.iter().zip(&batched) {
                assert_eq!(a.len(), b.len());
            }
        }
    }
}

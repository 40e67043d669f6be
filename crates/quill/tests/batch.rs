//! One inference step over several segments (continuous batching): each segment continues
//! its own sequence from its own cache, at its own position, with as many new tokens as it
//! has, and gets the logits its own single-sequence step gives.

use quill::io::hf::load;
use quill::model::{Rows, Scratch, Segment};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

#[test]
fn batched_steps_equal_single_steps() {
    for name in ["gpt2-tiny", "llama-tiny", "qwen2-tiny"] {
        let model = load(&fixture(name), true).unwrap();
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
        let mut scratch = Scratch::default();
        for step in 0..6 {
            let mut want = Vec::new();
            for (i, c) in single.iter_mut().enumerate() {
                model
                    .forward_cached(c, &[next[i]], &mut logits, false)
                    .unwrap();
                want.extend_from_slice(&logits);
            }
            let mut segs: Vec<Segment> = batched
                .iter_mut()
                .zip(next.chunks(1))
                .map(|(cache, ids)| Segment { cache, ids })
                .collect();
            let mut got = Vec::new();
            model
                .step(&mut segs, Rows::Last, &mut got, &mut scratch)
                .unwrap();
            let d = max_diff(&got, &want);
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

/// A step whose segments have different lengths (a new prompt beside sequences that decode
/// one token, as when a request joins a running batch): with `Rows::Last` each segment's
/// last logits, with `Rows::All` every position's, equal to one sequence at a time.
#[test]
fn segments_of_different_lengths_in_one_step() {
    for name in ["gpt2-tiny", "llama-tiny", "qwen2-tiny"] {
        let model = load(&fixture(name), true).unwrap();
        let v = model.vocab_size();
        let first: [&[u32]; 3] = [&[3, 1, 4], &[1, 5], &[9, 2, 6, 5]];
        let then: [&[u32]; 3] = [&[3], &[5, 8, 9, 7, 9], &[3, 2]];
        for rows in [Rows::Last, Rows::All] {
            let mut want = Vec::new();
            let mut logits = Vec::new();
            let mut batched = Vec::new();
            for (p, q) in first.iter().zip(&then) {
                let mut c = model.new_cache(32);
                model.forward_cached(&mut c, p, &mut logits, false).unwrap();
                let mut b = model.new_cache(32);
                model.forward_cached(&mut b, p, &mut logits, false).unwrap();
                batched.push(b);
                model
                    .forward_cached(&mut c, q, &mut logits, rows == Rows::All)
                    .unwrap();
                want.extend_from_slice(&logits);
            }
            let mut segs: Vec<Segment> = batched
                .iter_mut()
                .zip(then)
                .map(|(cache, ids)| Segment { cache, ids })
                .collect();
            let mut got = Vec::new();
            model
                .step(&mut segs, rows, &mut got, &mut Scratch::default())
                .unwrap();
            let n: usize = then.iter().map(|q| q.len()).sum();
            assert_eq!(got.len(), if rows == Rows::All { n * v } else { 3 * v });
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "{name} {rows:?}: logits differ by {d}");
            for (c, (p, q)) in batched.iter().zip(first.iter().zip(&then)) {
                assert_eq!(c.len(), p.len() + q.len());
            }
        }
    }
}

/// A step that cannot run changes no cache: an empty segment, or one past its capacity.
#[test]
fn a_bad_segment_is_an_error() {
    let model = load(&fixture("llama-tiny"), true).unwrap();
    let mut a = model.new_cache(4);
    let mut b = model.new_cache(4);
    let mut logits = Vec::new();
    let mut s = Scratch::default();
    let mut segs = [
        Segment {
            cache: &mut a,
            ids: &[1, 2],
        },
        Segment {
            cache: &mut b,
            ids: &[1, 2, 3, 4, 5],
        },
    ];
    let e = model
        .step(&mut segs, Rows::Last, &mut logits, &mut s)
        .unwrap_err();
    assert!(e.to_string().contains("context full"), "{e}");
    let mut segs = [Segment {
        cache: &mut a,
        ids: &[],
    }];
    assert!(model
        .step(&mut segs, Rows::Last, &mut logits, &mut s)
        .is_err());
    assert_eq!((a.len(), b.len()), (0, 0));
}

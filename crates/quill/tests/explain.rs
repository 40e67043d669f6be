//! The explain view's cut under other settings (`explain::recut`, what the web page's sliders
//! ask for), on llama2.c's stories260K: the same cut the sampler made when it drew the
//! token, and probabilities that are softmax(logits / T) of the model's own logits, computed
//! here independently in float64.

use quill::explain::{explain, recut, Size};
use quill::model::Model;
use quill::sample::SamplingParams;
use quill::tokenizer::{Llama2cTokenizer, Tokenizer};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/stories260K")
        .join(name)
}

fn open() -> (Model, Tokenizer) {
    let model = quill::io::llama2c::load(&fixture("stories260K.bin")).unwrap();
    let tok = Llama2cTokenizer::load(&fixture("tok512.bin"), model.vocab_size()).unwrap();
    (model, Tokenizer::Llama2c(Box::new(tok)))
}

/// softmax(logits / t) of the next token after `ids`, in float64.
fn softmax_after(model: &Model, ids: &[u32], t: f64) -> Vec<f64> {
    let mut cache = model.new_cache(ids.len());
    let mut logits = Vec::new();
    model
        .forward_cached(&mut cache, ids, &mut logits, false)
        .unwrap();
    let m = logits.iter().fold(f64::MIN, |m, &l| m.max(l as f64 / t));
    let e: Vec<f64> = logits.iter().map(|&l| (l as f64 / t - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

#[test]
fn recut_repeats_the_cut_each_explained_step_was_drawn_from() {
    let (model, tok) = open();
    let prompt = tok.encode_with_special("Once upon a time").unwrap();
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 12,
        top_p: 0.9,
        presence_penalty: 0.5,
        frequency_penalty: 0.3,
        repetition_penalty: 1.2,
        seed: 7,
        ..Default::default()
    };
    let ex = explain(
        &model,
        &tok,
        &prompt,
        params.clone(),
        Size { steps: 6, top: 20 },
        &[],
    )
    .unwrap();
    assert_eq!(ex.steps.len(), 6);
    let generated: Vec<u32> = ex.steps.iter().map(|s| s.chosen).collect();
    for (i, step) in ex.steps.iter().enumerate() {
        let cut = recut(&model, &tok, &prompt, &generated[..i], params.clone(), 20).unwrap();
        assert_eq!(cut.kept_count, step.kept_count, "step {i}");
        let kept: Vec<(u32, f32)> = cut
            .candidates
            .iter()
            .filter(|c| c.kept)
            .map(|c| (c.id, c.kept_prob))
            .collect();
        // The same ids; probabilities up to the rounding of one full-prompt forward against
        // the cached, token-by-token one the explanation made.
        for (a, b) in kept.iter().zip(&step.kept) {
            assert_eq!(a.0, b.0, "step {i}");
            assert!((a.1 - b.1).abs() < 1e-5, "step {i}: {a:?} vs {b:?}");
        }
        assert!(kept.iter().any(|&(id, _)| id == step.chosen), "step {i}");
    }
}

#[test]
fn recut_probabilities_are_the_tempered_softmax_and_the_cut_renormalises() {
    let (model, tok) = open();
    let prompt = tok.encode_with_special("Lily saw a big").unwrap();
    for (t, k, p) in [(1.0, 0, 1.0), (0.4, 0, 1.0), (1.7, 3, 1.0), (1.0, 0, 0.5)] {
        let params = SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            ..Default::default()
        };
        let cut = recut(&model, &tok, &prompt, &[], params, 20).unwrap();
        let want = softmax_after(&model, &prompt, t as f64);
        assert_eq!(cut.candidates.len(), 20);
        for w in cut.candidates.windows(2) {
            assert!(w[0].prob >= w[1].prob);
        }
        let mut shown = 0.0;
        for c in &cut.candidates {
            let w = want[c.id as usize];
            assert!((c.prob as f64 - w).abs() < 1e-5, "T={t}: {} vs {w}", c.prob);
            shown += w;
        }
        assert!((cut.rest_prob as f64 - (1.0 - shown)).abs() < 1e-5);
        // What is kept: the k most likely (top-k), or the fewest most likely reaching p.
        let kept: Vec<_> = cut.candidates.iter().filter(|c| c.kept).collect();
        let mass: f64 = kept.iter().map(|c| want[c.id as usize]).sum();
        if k > 0 {
            assert_eq!(kept.len(), k);
            assert_eq!(cut.kept_count, k);
        } else if p < 1.0 {
            let before = mass - want[kept.last().unwrap().id as usize];
            assert!(mass >= p as f64 - 1e-6 && before < p as f64);
            assert_eq!(cut.rest_kept, 0);
        } else {
            assert_eq!(kept.len(), 20);
            assert_eq!(cut.kept_count, model.vocab_size());
            assert!((cut.rest_kept_prob - cut.rest_prob).abs() < 1e-5);
        }
        for c in &kept {
            let renorm = want[c.id as usize] / (mass + cut.rest_kept_prob as f64);
            assert!((c.kept_prob as f64 - renorm).abs() < 1e-5);
        }
        let total: f32 = kept.iter().map(|c| c.kept_prob).sum::<f32>() + cut.rest_kept_prob;
        assert!((total - 1.0).abs() < 1e-4);
    }
}

#[test]
fn recut_greedy_keeps_the_most_likely_token_and_refuses_bad_ids() {
    let (model, tok) = open();
    let prompt = tok.encode_with_special("The dog").unwrap();
    let greedy = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let cut = recut(&model, &tok, &prompt, &[], greedy.clone(), 5).unwrap();
    assert_eq!(cut.kept_count, 1);
    assert!(cut.candidates[0].kept && cut.candidates[0].kept_prob == 1.0);
    assert!(cut.candidates[1..].iter().all(|c| !c.kept));
    let v = model.vocab_size() as u32;
    for (p, g) in [
        (&[][..], &[][..]),
        (&prompt[..], &[v][..]),
        (&[v][..], &[][..]),
    ] {
        let e = recut(&model, &tok, p, g, greedy.clone(), 5).unwrap_err();
        assert!(!e.to_string().contains('\n'));
    }
    let long = vec![1u32; model.context() + 1];
    assert!(recut(&model, &tok, &long, &[], greedy, 5).is_err());
}

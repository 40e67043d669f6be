//! The sampler against references made elsewhere: `transformers`' logits processors
//! (tests/fixtures/sampling/reference.json, made by scripts/fixtures/make_sampling_reference.py),
//! OpenAI's published presence/frequency formula, and the definitions of min-p and of
//! drawing from a distribution.

use super::*;
use std::path::PathBuf;

fn params(t: f32, k: usize, p: f32) -> SamplingParams {
    SamplingParams {
        temperature: t,
        top_k: k,
        top_p: p,
        seed: 5,
        ..Default::default()
    }
}

fn kept_ids(s: &mut Sampler) -> Vec<u32> {
    s.kept().iter().map(|c| c.0).collect()
}

#[test]
fn softmax_is_a_distribution_and_temperature_sharpens() {
    let logits = [1.0, 2.0, 3.0, -1.0];
    let mut p = vec![];
    softmax(&logits, 1.0, &mut p);
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    let want = (3.0f32).exp() / logits.iter().map(|l: &f32| l.exp()).sum::<f32>();
    assert!((p[2] - want).abs() < 1e-6);
    let mut cold = vec![];
    softmax(&logits, 0.5, &mut cold);
    assert!(cold[2] > p[2]);
    assert!((log_softmax_at(&logits, 2) - want.ln()).abs() < 1e-6);
    let top = top_logprobs(&logits, 2);
    assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
}

#[test]
fn greedy_top_k_and_top_p_cut_as_defined() {
    let logits = [0.0, 3.0, 1.0, 2.0, -5.0];
    let mut s = Sampler::new(params(0.0, 0, 1.0)).unwrap();
    assert_eq!(s.draw(&logits).token, 1);
    assert_eq!(s.kept(), vec![(1, 1.0)]);
    let mut s = Sampler::new(params(1.0, 2, 1.0)).unwrap();
    s.draw(&logits);
    assert_eq!(kept_ids(&mut s), vec![1, 3]);
    for _ in 0..200 {
        assert!([1, 3].contains(&s.draw(&logits).token));
    }
    // probabilities: ~0.64, 0.24, 0.09, 0.03, ... ; p = 0.8 keeps the first two
    let mut s = Sampler::new(params(1.0, 0, 0.8)).unwrap();
    s.draw(&logits);
    let c = s.kept();
    assert_eq!(c.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 3]);
    assert!((c.iter().map(|c| c.1).sum::<f32>() - 1.0).abs() < 1e-6);
    // a tiny p keeps only the best
    let mut s = Sampler::new(params(1.0, 0, 1e-6)).unwrap();
    s.draw(&logits);
    assert_eq!(s.kept().len(), 1);
    // ids past the vocabulary limit are never drawn nor kept
    let mut s = Sampler::new(SamplingParams {
        vocab_limit: 3,
        ..params(1.0, 0, 1.0)
    })
    .unwrap();
    for _ in 0..100 {
        assert!(s.draw(&logits).token < 3);
    }
    assert_eq!(s.kept().len(), 3);
}

#[test]
fn draws_follow_the_distribution_and_seed_reproduces() {
    let logits = [0.0f32, 1.0, 2.0];
    let mut probs = vec![];
    softmax(&logits, 1.0, &mut probs);
    let mut s = Sampler::new(params(1.0, 0, 1.0)).unwrap();
    let n = 60_000;
    let mut counts = [0usize; 3];
    let first: Vec<u32> = (0..20).map(|_| s.draw(&logits).token).collect();
    for _ in 0..n {
        counts[s.draw(&logits).token as usize] += 1;
    }
    for i in 0..3 {
        assert!(
            (counts[i] as f32 / n as f32 - probs[i]).abs() < 0.01,
            "{counts:?}"
        );
    }
    let mut again = Sampler::new(params(1.0, 0, 1.0)).unwrap();
    let second: Vec<u32> = (0..20).map(|_| again.draw(&logits).token).collect();
    assert_eq!(first, second);
    // the log-probability reported is the model's own, whatever the processing
    let mut s = Sampler::new(params(0.3, 1, 1.0)).unwrap();
    let d = s.draw(&logits);
    assert!((d.logprob - log_softmax_at(&logits, d.token)).abs() < 1e-7);
}

#[test]
fn rejects_bad_parameters() {
    assert!(Sampler::new(params(-0.1, 0, 1.0)).is_err());
    assert!(Sampler::new(params(1.0, 0, 0.0)).is_err());
    assert!(Sampler::new(params(1.0, 0, 1.5)).is_err());
    assert!(Sampler::new(params(f32::NAN, 0, 1.0)).is_err());
    for bad in [
        SamplingParams {
            min_p: 1.5,
            ..Default::default()
        },
        SamplingParams {
            min_p: f32::NAN,
            ..Default::default()
        },
        SamplingParams {
            presence_penalty: 2.5,
            ..Default::default()
        },
        SamplingParams {
            frequency_penalty: f32::NAN,
            ..Default::default()
        },
        SamplingParams {
            repetition_penalty: 0.0,
            ..Default::default()
        },
    ] {
        assert!(Sampler::new(bad).is_err());
    }
}

fn reference() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/sampling/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The repetition penalty on the same logits and history as transformers'
/// `RepetitionPenaltyLogitsProcessor`.
#[test]
fn repetition_penalty_matches_transformers() {
    for case in reference()["cases"].as_array().unwrap() {
        let logits = floats(&case["logits"]);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: case["repetition_penalty"].as_f64().unwrap() as f32,
            ..Default::default()
        })
        .unwrap();
        s.start(&ids(&case["history"]));
        s.draw(&logits);
        let want = floats(&case["after_repetition_penalty"]);
        for (a, b) in s.processed_logits().iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}

/// Temperature -> top-k -> top-p -> min-p after the repetition penalty keeps exactly the ids
/// transformers' warpers keep, with the same renormalised probabilities.
#[test]
fn the_cut_matches_transformers_warpers() {
    let mut checked = 0;
    for case in reference()["cases"].as_array().unwrap() {
        let logits = floats(&case["logits"]);
        for cut in case["cuts"].as_array().unwrap() {
            let mut s = Sampler::new(SamplingParams {
                temperature: cut["temperature"].as_f64().unwrap() as f32,
                top_k: cut["top_k"].as_u64().unwrap() as usize,
                top_p: cut["top_p"].as_f64().unwrap() as f32,
                min_p: cut["min_p"].as_f64().unwrap() as f32,
                repetition_penalty: case["repetition_penalty"].as_f64().unwrap() as f32,
                ..Default::default()
            })
            .unwrap();
            s.start(&ids(&case["history"]));
            let d = s.draw(&logits);
            let mut kept = s.kept();
            assert!(kept.iter().any(|k| k.0 == d.token), "drew outside the cut");
            kept.sort_by_key(|k| k.0);
            assert_eq!(
                kept.iter().map(|k| k.0).collect::<Vec<_>>(),
                ids(&cut["kept"]),
                "{cut}"
            );
            for (k, p) in kept.iter().zip(floats(&cut["kept_probs"])) {
                assert!((k.1 - p).abs() < 1e-5, "{} vs {p}", k.1);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 36);
}

/// OpenAI's presence and frequency penalties, as their documentation writes them:
/// mu[j] -> mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty, where
/// c[j] counts how often token j was sampled before (the prompt does not count).
#[test]
fn presence_and_frequency_penalties_follow_openai_formula() {
    let v = 12;
    let (presence, frequency) = (0.7f32, 0.4f32);
    let mut s = Sampler::new(SamplingParams {
        presence_penalty: presence,
        frequency_penalty: frequency,
        temperature: 0.0,
        ..Default::default()
    })
    .unwrap();
    let prompt = [1u32, 1, 2];
    s.start(&prompt);
    // force draws of 3, 3, 5, 3 with one dominant logit each time
    let mut c = vec![0.0f32; v];
    for &forced in &[3u32, 3, 5, 3] {
        let mut l = vec![0.0f32; v];
        l[forced as usize] = 100.0;
        assert_eq!(s.draw(&l).token, forced);
        c[forced as usize] += 1.0;
    }
    let logits: Vec<f32> = (0..v).map(|i| (i as f32 * 0.73).sin() * 2.0).collect();
    s.draw(&logits);
    for j in 0..v {
        let want = logits[j] - c[j] * frequency - if c[j] > 0.0 { presence } else { 0.0 };
        assert!((s.processed_logits()[j] - want).abs() < 1e-6, "token {j}");
    }
}

/// min-p keeps exactly the tokens whose probability (at the temperature) is at least min_p
/// times the largest.
#[test]
fn min_p_keeps_what_its_definition_keeps() {
    let mut rng = crate::rng::Rng::new(3);
    for &(t, min_p) in &[(1.0f32, 0.05f32), (0.6, 0.2), (1.5, 0.01), (1.0, 1.0)] {
        let logits: Vec<f32> = (0..200).map(|_| (rng.normal() * 2.5) as f32).collect();
        let mut s = Sampler::new(SamplingParams {
            temperature: t,
            min_p,
            ..Default::default()
        })
        .unwrap();
        s.draw(&logits);
        let z: f64 = logits.iter().map(|&l| (l as f64 / t as f64).exp()).sum();
        let p: Vec<f64> = logits
            .iter()
            .map(|&l| (l as f64 / t as f64).exp() / z)
            .collect();
        let pmax = p.iter().cloned().fold(0.0, f64::max);
        let mut want: Vec<u32> = (0..200u32)
            .filter(|&i| p[i as usize] >= min_p as f64 * pmax)
            .collect();
        want.sort();
        let mut got = kept_ids(&mut s);
        got.sort();
        assert_eq!(got, want, "t {t} min_p {min_p}");
    }
}
